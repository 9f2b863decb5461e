"""Run-time CPU dispatch: which SIMD level the native kernels use."""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator

from . import _core

__all__ = ["capabilities", "set_isa", "use_isa", "LEVELS", "one_blas_thread"]

#: Every level the project knows, lowest first on each architecture.
LEVELS = ("serial", "avx2", "avx512", "neon")


def capabilities() -> dict:
    """Describe the instruction-set levels of this build and CPU.

    Returns
    -------
    dict
        ``compiled``: levels whose kernels are in this binary; ``available``: those this CPU
        and OS support; ``active``: the level the kernels use now; ``default``: the level chosen
        at load time without ``METALORA_ISA``; ``openmp``: whether the build has OpenMP;
        ``threads``: the number of threads ``threads=0`` means.
    """
    caps = dict(_core.capabilities())
    caps["threads"] = int(_core.resolve_threads(0))
    return caps


def set_isa(level: str | None) -> None:
    """Force the kernels onto one instruction-set level (``None`` restores the default).

    The level must be in ``capabilities()["available"]``. The same choice can be made before
    import with the environment variable ``METALORA_ISA`` (for example ``METALORA_ISA=serial``).

    Raises
    ------
    ValueError
        If the level is unknown or not available on this machine.
    """
    if level is None:
        level = _core.capabilities()["default"]
    level = str(level).lower()
    available = _core.capabilities()["available"]
    if level not in available:
        raise ValueError(
            f"instruction-set level {level!r} is not available here; choose one of {available}"
        )
    _core.set_isa(level)


@contextlib.contextmanager
def use_isa(level: str) -> Iterator[None]:
    """Context manager that runs the kernels at ``level`` and then restores the previous one."""
    previous = _core.capabilities()["active"]
    set_isa(level)
    try:
        yield
    finally:
        _core.set_isa(previous)


def one_blas_thread():
    """Context in which numpy's BLAS/LAPACK runs on one thread (threadpoolctl).

    For the many small dense problems metalora hands to numpy (R x R Gram roots and
    eigen-decompositions, per-pair Gaussian statistics), run from several threads of its own:
    OpenBLAS's threads gain nothing there and, on busy cores or right after the OpenMP kernels,
    cost 3-25x (measured on 2 cores: a stack of 32 eigh(128 x 128) took 0.16-0.18 s on one
    thread and 0.5-4.3 s threaded).
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1, user_api="blas")


def _check_environment() -> None:
    want = os.environ.get("METALORA_ISA")
    if not want:
        return
    caps = _core.capabilities()
    if want.lower() not in caps["available"]:
        warnings.warn(
            f"METALORA_ISA={want!r} is not available on this machine (available: "
            f"{caps['available']}); using {caps['active']!r}",
            RuntimeWarning,
            stacklevel=3,
        )
    elif caps["active"] != want.lower():
        _core.set_isa(want.lower())


_check_environment()
