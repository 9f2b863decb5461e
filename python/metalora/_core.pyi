"""Type stubs of the native extension module metalora._core."""

from typing import Any, Sequence

def capabilities() -> dict[str, Any]:
    """compiled / available / active / default levels and whether OpenMP is on."""

def set_isa(name: str) -> None:
    """Make the kernels use the given available level ("serial", "avx2", "avx512", "neon")."""

def resolve_threads(threads: int = 0) -> int:
    """Threads a call with ``threads`` uses (0 = all cores)."""

def combine_op(op: str, modules: Sequence[dict[str, Any]], threads: int = 0) -> None:
    """One step of the combination ("linear", "cat", "gram", "project") over many modules,
    writing into the output arrays of each module spec, with the GIL released."""
