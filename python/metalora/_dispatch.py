"""Run-time CPU dispatch: which SIMD level the native kernels use.

The level is one setting of the whole process. Each native call (one Sinkhorn solve, one cost
matrix, one combination step over all modules) takes it once when it starts and keeps it to the
end, its pool threads included, so a switch from another thread never mixes levels inside a
call; it applies from the next call.
"""

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
        at load time without ``METALORA_ISA``; ``openmp``: whether the build links OpenMP
        (the kernels no longer use it: they run on metalora's own task pool);
        ``threads``: the number of threads ``threads=0`` means.
    """
    caps = dict(_core.capabilities())
    caps["threads"] = int(_core.resolve_threads(0))
    return caps


def set_isa(level: str | None) -> None:
    """Force the kernels onto one instruction-set level (``None`` restores the default).

    The level must be in ``capabilities()["available"]``. The same choice can be made before
    import with the environment variable ``METALORA_ISA`` (for example ``METALORA_ISA=serial``).

    The setting is process-wide, not per thread. A native call already running keeps the level
    it started with; the next one, from any thread, uses the new one. A Python function that
    makes several native calls (``distances`` over a bank, ``combine(mode="svd")``) can thus run
    them at different levels if another thread switches meanwhile: switch levels while nothing
    is computing.

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
    """Context manager that runs the kernels at ``level`` and then restores the previous one.

    It sets the process-wide level (see :func:`set_isa`): every thread's calls run at ``level``
    inside the block, not only the calling thread's. Use it from one thread at a time: blocks
    entered and left from several threads restore each other's levels in whatever order they
    exit.
    """
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
    OpenBLAS's threads gain nothing there and, on busy cores or right after the native kernels,
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
