r"""Combine the low-rank factors of several LoRA adapters into one adapter.

Notation (per module): adapter :math:`j` has factors :math:`A_j \in \mathbb{R}^{r_j\times n_{in}}`,
:math:`B_j \in \mathbb{R}^{n_{out}\times r_j}`, scaling :math:`s_j` (``lora_alpha / r``, or
``lora_alpha / sqrt(r)`` for rsLoRA) and mixing weight :math:`w_j`; its update is
:math:`\Delta W_j = s_j B_j A_j`. Every function returns factors whose plain product
``B_new @ A_new`` is the combined update: all weights and scalings are folded into ``B_new``,
so a PEFT config for the result uses ``lora_alpha = r``.

Modes
-----
``linear``
    The rule of arXiv:2507.01806: :math:`A = \sum_j w_j A_j`, :math:`B = \sum_j w_j s_j B_j`.
    Equal ranks only. Not exact: :math:`BA` carries the cross terms :math:`w_i w_j B_i A_j`.
``cat``
    Exact: :math:`A = [A_1; \dots; A_K]`, :math:`B = [w_1 s_1 B_1, \dots, w_K s_K B_K]`, so
    :math:`BA = \sum_j w_j s_j B_j A_j`, with rank :math:`R = \sum_j r_j`.
``svd``
    The exact sum recompressed to rank ``rank``: with :math:`B_{cat} = Q_B R_B` and
    :math:`A_{cat}^T = Q_A R_A` (thin QR, taken here from the eigen-decompositions of the
    :math:`R\times R` Gram matrices), the SVD of the core :math:`R_B R_A^T = U S V^T` gives
    :math:`B = Q_B U_r S_r` and :math:`A = V_r^T Q_A^T`: the best rank-:math:`r` approximation
    of :math:`\Delta W` in Frobenius norm. The dense :math:`n_{out}\times n_{in}` matrix is never
    formed. The kept energy is :math:`\sum_{k\le r} S_k^2 / \sum_k S_k^2`.

Adapters whose weight is exactly 0 are not read. The modes are defined in
:mod:`metalora.combine.modes` (one record each, :data:`MODES`); the svd mode's small dense step
is in :mod:`metalora.combine.svd`.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import numpy as np

from .. import _core
from .._arrays import BFLOAT16, OUT_DTYPES, all_finite, as_kernel_array, to_out_dtype
from .._io import check_threads, positive_int
from .modes import MODES, Mode, ModuleJob, _run_linear, get_mode, register

__all__ = ["combine", "combine_modules", "check_options", "estimate_bytes", "available_memory", "MODES", "Mode", "register", "get_mode"]

ArrayLike = object
Scalings = Union[Sequence[float], Mapping[str, Sequence[float]], None]


def _floats(values: object, K: int, what: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be a sequence of {K} numbers") from exc
    if arr.size != K:
        raise ValueError(f"{what} has {arr.size} values but there are {K} adapters (len(A) = {K})")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{what}[{bad[0]}] is {arr[bad[0]]}: every value must be finite")
    return arr


def _shapes(where: str, A: Sequence[np.ndarray], B: Sequence[np.ndarray]) -> tuple:
    """Per-adapter (in, out, rank) of kernel arrays, naming the adapter when shapes disagree."""
    sa = [a.shape for a in A]
    sb = [b.shape for b in B]
    if (len({(x[1], y[0]) for x, y in zip(sa, sb)}) == 1
            and all(x[0] == y[1] and x[0] > 0 for x, y in zip(sa, sb))):
        return [x[1] for x in sa], [y[0] for y in sb], [x[0] for x in sa]
    # Slow path: find the first problem and name it.
    for j, (a, b) in enumerate(zip(sa, sb)):
        if a[0] != b[1]:
            raise ValueError(f"{where}adapter {j}: A has rank {a[0]} (shape {a}) but B has rank "
                             f"{b[1]} (shape {b}); A is [r, in], B is [out, r]")
        if a[0] < 1:
            raise ValueError(f"{where}adapter {j}: rank 0 factors")
    for j in range(1, len(sa)):
        if sa[j][1] != sa[0][1] or sb[j][0] != sb[0][0]:
            raise ValueError(f"{where}adapter {j}: update shape (out={sb[j][0]}, in={sa[j][1]}) "
                             f"differs from adapter 0's (out={sb[0][0]}, in={sa[0][1]})")
    raise AssertionError("unreachable")  # pragma: no cover


def _prepare(name: str, A: Sequence[ArrayLike], B: Sequence[ArrayLike], w: np.ndarray,
             s: np.ndarray, mode: Mode, rank: Optional[int]) -> ModuleJob:
    where = f"module {name!r}: " if name else ""
    K = len(w)
    if len(A) != K or len(B) != K:
        raise ValueError(f"{where}got {len(A)} A factors, {len(B)} B factors and {K} weights; "
                         f"give one A, one B and one weight per adapter")
    used = [j for j in range(K) if w[j] != 0.0]
    if not used:
        raise ValueError(f"{where}all {K} weights are zero, so the combined update is zero; give at "
                         f"least one non-zero weight")
    # Only the used adapters are converted (and so read); the others are never touched.
    A_used = [as_kernel_array(A[j], f"{where}adapter {j}: A") for j in used]
    B_used = [as_kernel_array(B[j], f"{where}adapter {j}: B") for j in used]
    shapes_in, shapes_out, ranks = _shapes(where, A_used, B_used)
    job = ModuleJob(name=name, A=A_used, B=B_used, used=used, w=w[used], s=s[used],
                    n_in=shapes_in[0], n_out=shapes_out[0], ranks=ranks)
    job.rank = mode.output_rank(ranks, rank, where)
    return job


def check_finite_outputs(job: ModuleJob, keys: Sequence[str] = ("A", "B")) -> None:
    """Raise naming the adapter whose factors hold NaN/Inf when a result is not finite, or an
    OverflowError when finite inputs overflowed float32."""
    arrays = [job.out[k] for k in keys]
    # One summing pass without temporaries; a non-finite sum can also come from finite values
    # that overflow, so only then pay for the exact elementwise check.
    with np.errstate(invalid="ignore", over="ignore"):
        if all(np.isfinite(np.add.reduce(x, axis=None)) or np.isfinite(x).all() for x in arrays):
            return
    for j, a, b in zip(job.used, job.A, job.B):
        for x, nm in ((a, "A"), (b, "B")):
            if not all_finite(x):
                raise ValueError(f"{job.where}adapter {j}: {nm} contains NaN or Inf; fix or drop "
                                 f"this adapter (or give it weight 0)")
    raise OverflowError(f"{job.where}the combination overflows float32; check the weights and "
                        f"scalings")


def check_options(mode: object, rank: object, out_dtype: object, threads: object) -> Mode:
    """Validate the options shared by every combine entry point; returns the :class:`Mode`."""
    m = get_mode(mode)
    if rank is not None:
        if not m.takes_rank:
            raise ValueError(f"rank={rank} applies to mode='svd' only (mode={mode!r} keeps the ranks "
                             f"it is given)")
        positive_int(rank, "rank")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype={out_dtype!r} is not one of {OUT_DTYPES}")
    check_threads(threads)
    return m


def estimate_bytes(jobs: list, mode: Mode) -> int:
    """Memory a combine call allocates for ``jobs`` (outputs plus, for ``svd``, the float64
    ``R x R`` Grams and the batched small dense step's temporaries, about 8 of them per module,
    R = the sum of the used adapters' ranks)."""
    total = 0
    for j in jobs:
        R = int(sum(j.ranks))
        r = R if mode.name == "cat" else max(j.ranks) if mode.name == "linear" else R
        if mode.name == "svd":
            total += 8 * 8 * R * R + 4 * min(R, j.rank or R) * (j.n_in + j.n_out)
        else:
            total += 4 * r * (j.n_in + j.n_out)
    return total


def available_memory() -> Optional[int]:
    """Bytes this process can still allocate: ``MemAvailable`` of /proc/meminfo, or the cgroup
    limit less its usage when lower; ``$METALORA_MEMORY_LIMIT`` (bytes) overrides. None where
    unknown (then nothing is refused)."""
    import os

    env = os.environ.get("METALORA_MEMORY_LIMIT")
    if env:
        try:
            return int(env)
        except ValueError:
            raise ValueError(f"METALORA_MEMORY_LIMIT={env!r} is not a number of bytes") from None
    best = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    best = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            lim = f.read().strip()
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            cur = int(f.read().strip())
        if lim != "max":
            left = int(lim) - cur
            best = left if best is None else min(best, left)
    except (OSError, ValueError):
        pass
    return best


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**27 else f"{n / 2**20:.0f} MiB"


def check_memory(jobs: list, mode: Mode) -> None:
    """Refuse, before allocating, a call that needs more memory than is available."""
    need = estimate_bytes(jobs, mode)
    if need < 2**28:  # under 256 MiB: never worth a refusal
        return
    have = available_memory()
    if have is not None and need > 0.9 * have:
        R = max(int(sum(j.ranks)) for j in jobs)
        K = max(len(j.ranks) for j in jobs)
        raise MemoryError(
            f"combine mode={mode.name!r} of {K} adapters (summed rank up to {R}, {len(jobs)} "
            f"modules) needs about {_gib(need)} but only {_gib(have)} is available: keep fewer "
            f"adapters (top_k=, --top-k; the svd cost grows with the square of the summed rank), "
            f"or use mode='linear'")


def _execute(jobs: list, mode: Mode, threads: int) -> None:
    check_memory(jobs, mode)
    mode.run(jobs, threads)
    for job in jobs:
        check_finite_outputs(job)


def _info(job: ModuleJob, mode: Mode) -> dict:
    return {"mode": mode.name, "rank": job.rank, "used": list(job.used), **mode.info(job)}


def combine(A: Sequence[ArrayLike], B: Sequence[ArrayLike], weights: Sequence[float], *,
            scalings: Sequence[float] | None = None, mode: str = "svd", rank: int | None = None,
            out_dtype: str = "float32", threads: int = 0, log: bool = False):
    r"""Combine K LoRA adapters of one module into one pair of factors.

    Parameters
    ----------
    A : sequence of K array-likes, shape ``[r_j, in]``
        The ``lora_A`` factors. C-contiguous float32, float16 or bfloat16 arrays
        (``ml_dtypes.bfloat16`` or raw ``uint16`` bits) are read in place; anything else
        numeric (a strided view, float64, a nested list) is converted to float32 once.
    B : sequence of K array-likes, shape ``[out, r_j]``
        The ``lora_B`` factors, same rules.
    weights : sequence of K floats
        Mixing weights :math:`w_j`, any sign. Adapters with weight 0 are not read.
    scalings : sequence of K floats, optional
        Per-adapter scaling :math:`s_j` of the update (``lora_alpha / r``); default 1.
    mode : {"svd", "cat", "linear"}, or any name in :data:`metalora.combine.MODES`
        ``linear``: :math:`A=\sum_j w_j A_j`, :math:`B=\sum_j w_j s_j B_j` (the paper's rule,
        equal ranks). ``cat``: exact, :math:`BA=\sum_j w_j s_j B_j A_j`, rank :math:`\sum r_j`.
        ``svd``: the exact sum truncated to its best rank-``rank`` approximation.
    rank : int, optional
        Output rank for ``svd`` (default: the largest :math:`r_j` among used adapters).
    out_dtype : {"float32", "float16", "bfloat16"}
        dtype of the returned factors (computation is float32, Gram/SVD steps float64).
    threads : int
        Threads of the native kernels; 0 means all cores. A call uses fewer when other
        processes keep cores busy (the task pool's cap; ``METALORA_NO_BUSY_CHECK=1`` lifts it).
    log : bool
        If true, also return a dict with ``mode``, ``rank``, ``used`` (indices of the adapters
        read) and, for ``svd``, ``singular_values`` of the exact update and ``energy``, the kept
        fraction of :math:`\|\Delta W\|_F^2`.

    Returns
    -------
    A_new : ndarray ``[r', in]``
    B_new : ndarray ``[out, r']``
        ``B_new @ A_new`` is the combined update with every weight and scaling folded in.
    info : dict
        Only when ``log=True``.

    Raises
    ------
    ValueError
        Mismatched shapes or counts, all weights zero, NaN/Inf in a used factor (naming it).
    OverflowError
        The result does not fit float32 (or ``out_dtype``).

    Examples
    --------
    >>> A_new, B_new = metalora.combine([A1, A2], [B1, B2], [0.7, 0.3], scalings=[2.0, 2.0],
    ...                                 mode="svd", rank=16)
    """
    m = check_options(mode, rank, out_dtype, threads)
    K = len(A)
    if K == 0:
        raise ValueError("no adapters given: A, B and weights are empty")
    w = _floats(weights, K, "weights")
    s = _floats(np.ones(K) if scalings is None else scalings, K, "scalings")
    job = _prepare("", A, B, w, s, m, rank)
    _execute([job], m, check_threads(threads))
    A_new = to_out_dtype(job.out["A"], out_dtype, "A_new")
    B_new = to_out_dtype(job.out["B"], out_dtype, "B_new")
    if log:
        return A_new, B_new, _info(job, m)
    return A_new, B_new


def combine_modules(modules: Mapping[str, tuple], weights: Sequence[float], *,
                    scalings: Scalings = None, mode: str = "svd", rank: int | None = None,
                    out_dtype: str = "float32", threads: int = 0, log: bool = False):
    r"""Combine a whole adapter: every module at once, in parallel over modules.

    Parameters
    ----------
    modules : mapping ``name -> (A_list, B_list)``
        For each module, the K adapters' ``lora_A`` and ``lora_B`` factors, as in
        :func:`combine`: C-contiguous arrays of a kernel dtype are read in place (a
        memory-mapped safetensors view is never copied); other array-likes are converted once.
    weights : sequence of K floats
        One weight per adapter, shared by all modules.
    scalings : K floats, or mapping ``name -> K floats``, optional
        Per-adapter scalings, per module when adapters use ``alpha_pattern`` / ``rank_pattern``.
    mode, rank, out_dtype, threads
        As in :func:`combine`; ``rank`` applies to every module.
    log : bool
        If true, also return ``{name: info}`` with the per-module diagnostics of :func:`combine`.

    Returns
    -------
    dict ``name -> (A_new, B_new)``, and the info dict when ``log=True``.

    Notes
    -----
    The Gram and projection kernels run once for all modules with the GIL released; the
    eigen-decompositions and the SVD of the small ``R x R`` cores are batched numpy LAPACK calls
    (about 1 ms per module at R = 128, far below the cost of the tall-skinny products).
    """
    m = check_options(mode, rank, out_dtype, threads)
    if not modules:
        raise ValueError("no modules given")
    K = len(weights)
    if K == 0:
        raise ValueError("no adapters given: weights is empty")
    w = _floats(weights, K, "weights")
    if m.run is _run_linear:
        fast = _linear_fast(modules, w, scalings, m, out_dtype, check_threads(threads), log)
        if fast is not None:
            return fast
    jobs = []
    for name, pair in modules.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"module {name!r}: expected a pair (A_list, B_list)")
        if isinstance(scalings, Mapping):
            if name not in scalings:
                raise ValueError(f"module {name!r}: no scalings given for it")
            s = _floats(scalings[name], K, f"scalings[{name!r}]")
        else:
            s = _floats(np.ones(K) if scalings is None else scalings, K, "scalings")
        jobs.append(_prepare(name, pair[0], pair[1], w, s, m, rank))
    _execute(jobs, m, check_threads(threads))
    result = {j.name: (to_out_dtype(j.out["A"], out_dtype, f"{j.name}: A_new"),
                       to_out_dtype(j.out["B"], out_dtype, f"{j.name}: B_new")) for j in jobs}
    if log:
        return result, {j.name: _info(j, m) for j in jobs}
    return result


def _linear_fast(modules: Mapping[str, tuple], w: np.ndarray, scalings: Scalings, m: Mode,
                 out_dtype: str, threads: int, log: bool):
    """combine_modules for the built-in ``linear`` mode in one native call: the per-module loop,
    the checks of the factors (2-D, C-contiguous, a kernel dtype, consistent shapes) and the
    NaN/Inf check of the outputs (inside the kernel, on blocks still in cache) run in C++.
    Returns None, having computed nothing, whenever an input is not of that form or a check
    would raise: the general path then does the work and words every error as before."""
    K = len(w)
    used = [j for j in range(K) if w[j] != 0.0]
    if not used:
        return None
    names = list(modules)
    wu = w[used]
    try:
        if isinstance(scalings, Mapping):
            cb = [list(wu * _floats(scalings[n], K, "")[used]) for n in names]
        else:
            s = np.ones(K) if scalings is None else _floats(scalings, K, "scalings")
            cb = list(wu * s[used])
    except (KeyError, TypeError, ValueError):
        return None
    got = _core.combine_linear_modules([modules[n] for n in names], K, used, list(wu), cb,
                                       BFLOAT16, threads, 2**28)
    if got is None:
        return None
    outs, bad = got
    for i in bad:  # name the adapter whose factors hold NaN/Inf, or report the overflow
        name = names[i]
        s_i = (_floats(scalings[name], K, f"scalings[{name!r}]") if isinstance(scalings, Mapping)
               else np.ones(K) if scalings is None else _floats(scalings, K, "scalings"))
        job = _prepare(name, modules[name][0], modules[name][1], w, s_i, m, None)
        job.out = {"A": outs[i][0], "B": outs[i][1]}
        check_finite_outputs(job)
    result = {n: (to_out_dtype(a, out_dtype, f"{n}: A_new"), to_out_dtype(b, out_dtype, f"{n}: B_new"))
              for n, (a, b) in zip(names, outs)}
    if log:
        return result, {n: {"mode": m.name, "rank": int(a.shape[0]), "used": list(used)}
                        for n, (a, _) in zip(names, outs)}
    return result
