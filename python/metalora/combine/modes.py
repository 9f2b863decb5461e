r"""The combination modes: one small definition each, picked by name.

A mode says which ranks it accepts, the rank of its result, and how it fills the combined
factors of a batch of modules. Every mode folds the weights :math:`w_j` and the adapters' own
scalings :math:`s_j` into ``B``, so ``B_new @ A_new`` is the combined update (scaling 1).

To add a mode, write its :class:`Mode` here (or anywhere) and :func:`register` it; the API
(:func:`metalora.combine`, :func:`metalora.combine_modules`, :func:`metalora.combine_adapters`),
the ``metalora generate --mode`` choices and the provenance pick it up by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np

from .. import _core
from .._registry import Registry
from .svd import small_step

__all__ = ["Mode", "ModuleJob", "MODES", "register", "get_mode"]


@dataclass
class ModuleJob:
    """One module's validated input (the adapters with non-zero weight) and its outputs."""

    name: str
    A: list  # kernel views of the used A_j, [r_j, in]
    B: list  # kernel views of the used B_j, [out, r_j]
    used: list  # indices (among the caller's adapters) of the used adapters
    w: np.ndarray  # their weights
    s: np.ndarray  # their scalings
    n_in: int
    n_out: int
    ranks: list
    rank: int = 0  # output rank, from Mode.output_rank
    out: dict = field(default_factory=dict)  # "A", "B" (float32) and mode-specific extras

    @property
    def where(self) -> str:
        return f"module {self.name!r}: " if self.name else ""

    def kernel_spec(self) -> dict:
        """The C++ driver's description of this module: inputs and B's coefficients w_j s_j."""
        return {"A": self.A, "B": self.B, "in": self.n_in, "out": self.n_out,
                "cb": list(self.w * self.s)}


@dataclass(frozen=True)
class Mode:
    """A combination rule.

    Attributes
    ----------
    name : str
    summary : str
        One line for ``--help`` and errors.
    output_rank : callable ``(ranks, rank, where) -> int``
        The result's rank from the used adapters' ranks and the caller's ``rank`` (None unless
        ``takes_rank``); raises ValueError (prefixed by ``where``) when they do not fit.
    run : callable ``(jobs, threads) -> None``
        Fills ``job.out["A"]`` ``[rank, in]`` and ``job.out["B"]`` ``[out, rank]`` (float32) of
        every job.
    takes_rank : bool
        Whether ``rank=`` applies.
    info : callable ``job -> dict``, optional
        Extra per-module diagnostics for ``log=True``.

    The API checks every result for NaN/Inf after ``run`` (naming the adapter whose factors hold
    them, or reporting an overflow), so a mode need not.
    """

    name: str
    summary: str
    output_rank: Callable[[Sequence[int], Optional[int], str], int]
    run: Callable[[List[ModuleJob], int], None]
    takes_rank: bool = False
    info: Callable[[ModuleJob], dict] = lambda job: {}


#: name -> :class:`Mode`, in registration order (what ``--mode`` lists).
MODES: Registry[Mode] = Registry("combine mode", "mode", Mode)


def register(mode: Mode, *, replace: bool = False) -> Mode:
    """Add ``mode`` to :data:`MODES` (``replace=True`` to redefine a name); returns it."""
    return MODES.register(mode, replace=replace)


def get_mode(name: object) -> Mode:
    """The registered mode called ``name``, or a ValueError listing the modes."""
    return MODES.lookup(name)


def _empty(job: ModuleJob, rank: int) -> tuple:
    job.out["A"] = np.empty((rank, job.n_in), np.float32)
    job.out["B"] = np.empty((job.n_out, rank), np.float32)
    return job.out["A"], job.out["B"]


# -- linear: the paper's factor-wise average -----------------------------------------------------


def _linear_rank(ranks: Sequence[int], rank: Optional[int], where: str) -> int:
    if len(set(ranks)) > 1:
        raise ValueError(f"{where}mode='linear' needs equal ranks, got {list(ranks)} (the used "
                         f"adapters'); use mode='svd' (exact sum, recompressed) or mode='cat'")
    return ranks[0]


def _run_linear(jobs: List[ModuleJob], threads: int) -> None:
    specs = []
    for job in jobs:
        spec = job.kernel_spec()
        spec["wa"] = list(job.w)  # A = sum_j w_j A_j; B = sum_j w_j s_j B_j
        spec["A_out"], spec["B_out"] = _empty(job, job.rank)
        specs.append(spec)
    _core.combine_op("linear", specs, threads)


register(Mode("linear", "the paper's rule: A = sum w_j A_j, B = sum w_j s_j B_j (equal ranks; "
              "not exact: cross terms)", _linear_rank, _run_linear))


# -- cat: exact, stacked factors -----------------------------------------------------------------


def _run_cat(jobs: List[ModuleJob], threads: int) -> None:
    specs = []
    for job in jobs:
        spec = job.kernel_spec()  # A = [A_1; ...; A_K], B = [w_1 s_1 B_1, ..., w_K s_K B_K]
        spec["A_out"], spec["B_out"] = _empty(job, job.rank)
        specs.append(spec)
    _core.combine_op("cat", specs, threads)


register(Mode("cat", "exact: B A = sum w_j s_j B_j A_j with stacked factors, rank sum r_j",
              lambda ranks, rank, where: int(sum(ranks)), _run_cat))


# -- svd: exact, then truncated --------------------------------------------------------------------


def _svd_rank(ranks: Sequence[int], rank: Optional[int], where: str) -> int:
    R = int(sum(ranks))
    out = max(ranks) if rank is None else int(rank)
    if out > R:
        raise ValueError(f"{where}rank={out} exceeds the rank of the exact sum, {R} = sum of the "
                         f"ranks of the adapters with non-zero weight")
    return out


def _run_svd(jobs: List[ModuleJob], threads: int) -> None:
    from . import check_finite_outputs

    specs = []
    for job in jobs:
        R = sum(job.ranks)
        spec = job.kernel_spec()
        job.out["GA"] = spec["GA"] = np.empty((R, R), np.float64)
        job.out["GB"] = spec["GB"] = np.empty((R, R), np.float64)
        specs.append(spec)
    _core.combine_op("gram", specs, threads)
    for job in jobs:
        check_finite_outputs(job, ("GA", "GB"))
    # The small dense step, batched over modules that share (R, rank).
    groups: dict = {}
    for job in jobs:
        groups.setdefault((sum(job.ranks), job.rank), []).append(job)
    for (_, rank), group in groups.items():
        PB, QA, S = small_step([j.out.pop("GA") for j in group], [j.out.pop("GB") for j in group],
                               rank, threads)
        for i, job in enumerate(group):
            job.out["PB"] = np.ascontiguousarray(PB[i])
            job.out["QA"] = np.ascontiguousarray(QA[i], dtype=np.float32)
            job.out["S"] = S[i]
    for job, spec in zip(jobs, specs):
        del spec["GA"], spec["GB"]
        spec.update(m=job.rank, QA=job.out["QA"], PB=job.out["PB"])
        spec["A_out"], spec["B_out"] = _empty(job, job.rank)
    _core.combine_op("project", specs, threads)


def _svd_info(job: ModuleJob) -> dict:
    S = job.out["S"]
    total = float(np.sum(S**2))
    return {"singular_values": S,
            "energy": float(np.sum(S[: job.rank] ** 2) / total) if total > 0 else 1.0}


register(Mode("svd", "the exact sum truncated to its best rank-`rank` approximation (never forms "
              "the dense update)", _svd_rank, _run_svd, takes_rank=True, info=_svd_info))
