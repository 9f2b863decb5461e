r"""Refinement: weigh the bank's adapters on the task's own labelled examples, forward passes only.

The distance-based coefficients :math:`w` are a cheap prior; refinement holds out a few of the
user's examples (a fixed, seeded split: the rest stays the dataset for the distances) and
searches, within a budget of model evaluations, for the coefficients :math:`c` that minimise

.. math:: f(c) = \overline{\mathrm{NLL}}(c) + \lambda \|c\|_1

the mean teacher-forced negative log-likelihood per target token of the held-out outputs under
the base model plus :math:`\sum_j c_j s_j B_j A_j` (optionally with LoraHub's L1 term). No
gradient is taken. The search, in order:

1. the start: the distance-based coefficients, as :func:`metalora.generate` would use them;
2. a structured grid around it: the base model alone (:math:`c = 0`: the honest answer when
   nothing in the bank fits), and the top-k of the prior, renormalised, for each ``k`` in
   ``top_ks`` at each global ``scale`` in ``scales``;
3. CMA-ES (the ``cma`` package; or nevergrad's ``NGOpt`` with ``optimizer="ngopt"``) on the
   coefficient vector of the best grid point's adapters, started there, bounded to
   ``[-bound, bound]``, until the budget is spent. Each generation's candidates are scored in
   batched forward passes.

The start is always evaluated and the best point found is returned, so the result is never worse
on the objective than the start. Deterministic for a seed (and a fixed thread count).
Needs the ``refine`` extra: ``pip install 'metalora[refine]'`` (torch, transformers, cma, gguf).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple, Union

import numpy as np

from .._io import positive_int
from .._progress import Progress

__all__ = ["RefineOptions", "RefineResult", "holdout_split", "search", "require_extra"]

INSTALL = "pip install 'metalora[refine]'"
#: step 3's optimisers, with the package each needs
OPTIMIZERS = {"cma": "cma", "ngopt": "nevergrad"}


#: Model evaluations of a refinement unless told otherwise (see :class:`RefineOptions`).
DEFAULT_BUDGET = 64


@dataclass(frozen=True)
class RefineOptions:
    r"""Options of :func:`metalora.generate`'s ``refine=`` (a mapping with these keys works too).

    Attributes
    ----------
    model : path
        The base model the bank was trained for: a transformers folder or a ``.gguf`` file.
    budget : int
        Model evaluations in all, the start included (default :data:`DEFAULT_BUDGET`, 64: on the
        quality benchmark's 52 tasks, 64 evaluations closed 46 % of the base-to-trained Rouge-L
        gap and 24 closed 31 %, at 43 and 22 CPU seconds per task for SmolLM2-135M).
    examples : int
        Held-out examples scored per evaluation (default 16), taken from the dataset by a fixed
        ``seed``; the rest of the dataset is used for the distances.
    seed : int
        Seed of the held-out split and of CMA-ES.
    top_ks, scales : tuple
        The structured grid (step 2): prior top-k sizes and global scales.
    l1 : float
        Weight of the L1 penalty :math:`\lambda` (LoraHub uses 0.05; default 0).
    bound : float
        The optimiser keeps every coefficient in ``[-bound, bound]`` (LoraHub's 1.5).
    optimizer : {"cma", "ngopt"}
        Step 3's gradient-free optimiser: CMA-ES from ``cma`` (the default) or nevergrad's
        ``NGOpt`` (needs ``pip install nevergrad``), which LoraHub uses.
    template : str
        Prompt of an example, ``template.format(input=...)``: the format the bank was trained on
        (the built-in bank: ``"{input}\\n"``).
    max_tokens : int
        Prompt + target tokens per example (prompts cut from the left).
    dtype : {"float32", "bfloat16"}
        Model dtype for scoring.
    threads : int
        torch threads (0: torch's default).
    progress : bool
        One bar step per evaluation, with the best objective so far.
    """

    model: Union[str, Path, None] = None
    budget: int = DEFAULT_BUDGET
    examples: int = 16
    seed: int = 0
    top_ks: Tuple[int, ...] = (1, 4, 16)
    scales: Tuple[float, ...] = (0.5, 1.0)
    l1: float = 0.0
    bound: float = 1.5
    optimizer: str = "cma"
    template: str = "{input}\n"
    max_tokens: int = 128
    dtype: str = "float32"
    threads: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        positive_int(self.budget, "refine budget (--refine-budget)")
        positive_int(self.examples, "refine examples (--refine-examples)")
        if self.examples < 2:
            raise ValueError("refine examples (--refine-examples) must be at least 2")
        for k in self.top_ks:
            positive_int(k, "refine top_ks")
        if not self.top_ks or not self.scales or any(not s > 0 for s in self.scales):
            raise ValueError("refine top_ks and scales must be non-empty; scales positive")
        if not self.l1 >= 0 or not self.bound > 0:
            raise ValueError(f"refine l1 must be >= 0 and bound > 0, got {self.l1}, {self.bound}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"refine optimizer must be one of {sorted(OPTIMIZERS)}, got "
                             f"{self.optimizer!r}")
        if "{input}" not in self.template:
            raise ValueError(f"refine template must contain '{{input}}', got {self.template!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"refine dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

    @classmethod
    def of(cls, value: Any) -> "RefineOptions":
        """``value`` as options: RefineOptions, a mapping of its fields, or a model path."""
        if isinstance(value, cls):
            return value
        if isinstance(value, (str, Path)):
            return cls(model=value)
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(cls.__dataclass_fields__))
            if unknown:
                raise TypeError(f"refine options {unknown} are unknown; the options are "
                                f"{sorted(cls.__dataclass_fields__)}")
            return cls(**value)
        raise TypeError(f"refine= takes RefineOptions, a mapping or a model path, not "
                        f"{type(value).__name__}")


@dataclass
class RefineResult:
    """What the search found (see :func:`search`)."""

    coefficients: np.ndarray  # over the candidates
    objective: float
    start_objective: float
    base_objective: float
    evaluations: int
    tried: List[Dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> Dict[str, Any]:
        d = asdict(self)
        d["coefficients"] = [float(x) for x in self.coefficients]
        return d


def require_extra(optimizer: str = "cma") -> None:
    """Raise one ImportError line naming the extra when torch, transformers or the optimiser's
    package is missing."""
    import importlib.util

    needed = ("torch", "transformers", OPTIMIZERS.get(optimizer, "cma"))
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing == ["nevergrad"]:
        raise ImportError("refine optimizer 'ngopt' needs nevergrad: pip install nevergrad")
    if missing:
        raise ImportError(f"refinement needs {', '.join(missing)}: {INSTALL}")


def holdout_split(n: int, examples: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Positions ``(kept, held_out)`` of a dataset of ``n`` examples: ``examples`` held out by a
    seeded permutation, at least 4 kept for the distances."""
    if n < examples + 4:
        raise ValueError(f"refinement holds out {examples} examples and needs at least 4 more for "
                         f"the distances, but the dataset has {n}: add examples or lower "
                         f"refine examples (--refine-examples)")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[examples:]), np.sort(order[:examples])


def _topk(prior: np.ndarray, k: int) -> np.ndarray:
    """The k largest prior coefficients, renormalised to the prior's sum (ties: order)."""
    c = np.zeros_like(prior)
    keep = np.argsort(-prior, kind="stable")[:k]
    c[keep] = prior[keep]
    s = c.sum()
    return c * (prior.sum() / s) if s > 0 else c


def search(scorer, start: np.ndarray, options: RefineOptions) -> RefineResult:
    """Minimise the objective over coefficient vectors of the scorer's candidates.

    ``start`` is the distance-based coefficient vector over the candidates (sorted by it, largest
    first, or not: only its values matter). See the module docstring for the steps.
    """
    t0 = time.perf_counter()
    start = np.asarray(start, dtype=np.float64)
    K = start.size
    budget = options.budget
    seen: Dict[bytes, float] = {}
    tried: List[Dict[str, Any]] = []
    best = {"c": start, "f": np.inf}
    bar = Progress(budget, "metalora refine", "evaluation", True if options.progress else False)

    def evaluate(cands: List[np.ndarray], labels: List[Dict[str, Any]]) -> List[float]:
        cands = [np.clip(c, -options.bound, options.bound) if lab.get("stage") in ("cma", "ngopt") else c
                 for c, lab in zip(cands, labels)]
        todo = [i for i, c in enumerate(cands) if c.tobytes() not in seen]
        room = budget - len(seen)
        todo = todo[:max(room, 0)]
        if todo:
            nll = scorer.nll_many([cands[i] for i in todo])
            for i, v in zip(todo, nll):
                f = float(v) + options.l1 * float(np.abs(cands[i]).sum())
                seen[cands[i].tobytes()] = f
                tried.append({**labels[i], "nll": float(v), "objective": f})
                if f < best["f"]:
                    best.update(c=cands[i].copy(), f=f)
                bar.note(f"best {best['f']:.4f}")
                bar.update()
        return [seen.get(c.tobytes(), np.inf) for c in cands]

    try:
        f_start = evaluate([start], [{"stage": "start"}])[0]
        f_base = evaluate([np.zeros(K)], [{"stage": "grid", "k": 0, "scale": 0.0}])[0]
        grid, labels = [], []
        for k in sorted({min(k, K) for k in options.top_ks}):
            for scale in options.scales:
                c = scale * _topk(start, k)
                if np.allclose(c, start, rtol=1e-12, atol=0.0):
                    continue  # the start itself (all of its adapters at scale 1)
                grid.append(c)
                labels.append({"stage": "grid", "k": k, "scale": float(scale)})
        evaluate(grid, labels)
        if len(seen) < budget and best["f"] < np.inf:
            # CMA-ES on the support of the best point (of the prior's top 4 if that is the base)
            support = np.flatnonzero(best["c"])
            if support.size == 0:
                support = np.argsort(-start, kind="stable")[:min(4, K)]
            x0 = best["c"][support]
            sigma = 0.25 * max(float(np.abs(x0).max()), 0.2)
            if support.size == 1:  # cma needs two dimensions: scan the one scale instead
                for s in (0.25, 0.75, 1.25, 1.5, 2.0):
                    c = np.zeros(K)
                    c[support] = np.clip(s * (x0 if x0[0] != 0 else start[support]),
                                         -options.bound, options.bound)
                    evaluate([c], [{"stage": "scan", "k": 1, "scale": float(s)}])
            else:
                optimise = _cma if options.optimizer == "cma" else _ngopt
                optimise(evaluate, x0, sigma, support, K, options, lambda: len(seen) < budget)
    finally:
        bar.close()
    return RefineResult(coefficients=best["c"], objective=float(best["f"]),
                        start_objective=float(f_start), base_objective=float(f_base),
                        evaluations=len(seen), tried=tried, seconds=time.perf_counter() - t0)


def _cma(evaluate, x0, sigma, support, K, options: RefineOptions, room) -> None:
    """CMA-ES generations until the budget is spent (``room()`` false) or CMA-ES stops."""
    import cma

    es = cma.CMAEvolutionStrategy(x0, sigma, {"seed": options.seed + 1, "verbose": -9,
                                              "bounds": [-options.bound, options.bound]})
    generation = 0
    while room() and not es.stop():
        xs = es.ask()
        generation += 1
        fs = evaluate([_embed(x, support, K) for x in xs],
                      [{"stage": "cma", "generation": generation}] * len(xs))
        if any(not np.isfinite(f) for f in fs):  # budget ran out mid-generation
            break
        es.tell(xs, fs)


def _ngopt(evaluate, x0, sigma, support, K, options: RefineOptions, room, batch: int = 4) -> None:
    """nevergrad's NGOpt, ``batch`` asks scored together, until the budget is spent (or it
    keeps proposing points already scored)."""
    import nevergrad as ng

    param = ng.p.Array(init=np.clip(x0, -options.bound, options.bound), lower=-options.bound,
                       upper=options.bound).set_mutation(sigma=sigma)
    param.random_state = np.random.RandomState(options.seed + 1)
    opt = ng.optimizers.NGOpt(parametrization=param, budget=options.budget, num_workers=batch)
    for round_ in range(1, 4 * options.budget + 1):
        if not room():
            break
        asks = [opt.ask() for _ in range(batch)]
        fs = evaluate([_embed(np.asarray(a.value, dtype=np.float64), support, K) for a in asks],
                      [{"stage": "ngopt", "round": round_}] * batch)
        for a, f in zip(asks, fs):
            if np.isfinite(f):
                opt.tell(a, f)


def _embed(x: np.ndarray, support: np.ndarray, K: int) -> np.ndarray:
    """The full coefficient vector with ``x`` on ``support``."""
    c = np.zeros(K)
    c[support] = x
    return c
