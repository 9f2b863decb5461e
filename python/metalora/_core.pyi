"""Type stubs of the native extension module metalora._core."""

from typing import Any, Sequence

def capabilities() -> dict[str, Any]:
    """compiled / available / active / default levels and whether OpenMP is on."""

def set_isa(name: str) -> None:
    """Make the kernels use the given available level ("serial", "avx2", "avx512", "neon")."""

def resolve_threads(threads: int = 0) -> int:
    """Threads a call with ``threads`` asks for (0 = all cores; never more than the CPUs this
    process may use). The task pool may use fewer per call: no more than its tasks, nor than
    the cores other processes leave idle (see :func:`pool_stats`)."""

def pool_stats() -> dict[str, Any]:
    """Counters of the kernels' task pool: ``calls``, ``tasks``, ``helper_tasks`` (tasks run by
    helper threads) since :func:`pool_reset`; ``last_requested`` / ``last_threads`` (threads the
    last call asked for / was allowed); ``cap`` (cores other processes leave idle now; the CPU
    count when ``METALORA_NO_BUSY_CHECK=1``); ``workers`` (helper threads alive); ``cpus``;
    ``others_running``; ``busy_check``."""

def pool_reset() -> None:
    """Zero the pool's counters and drop its cached busy reading."""

def _pool_probe(n: int, threads: int, sleep_s: float = 0.0, fail_at: int = -1) -> dict[str, Any]:
    """Test hook: n tasks on the pool; ``threads_seen`` and per-task run counts ``ran``."""

def combine_op(op: str, modules: Sequence[dict[str, Any]], threads: int = 0) -> None:
    """One step of the combination ("linear", "cat", "gram", "project") over many modules,
    writing into the output arrays of each module spec, with the GIL released."""
