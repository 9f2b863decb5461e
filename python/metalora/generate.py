r"""The main job, end to end: a dataset and a bank in, a new LoRA adapter out.

.. code-block:: text

    dataset ──signature──▶ s ─┐
                              ├─ distances ──▶ d[j] ── operator ──▶ w[j] ── combine ──▶ adapter
    bank datasets ─(cached)─▶ s_j ┘                                  (bank factors, mmap)

Embedding metrics (``sinkhorn``, ``sliced_wasserstein``, ``mmd``, ``energy``, ``gaussian_w2``,
``mean_cosine``) compare sentence-embedding clouds; the paper's token metrics
(``wasserstein_1d``, ``token_mmd``, ``kl``, ``js``) compare token-id samples or vocabulary
histograms under the base model's tokenizer (``tokenizer=``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from .adapter import Adapter
from .bank import Bank, combine_adapters
from .bank_index import BankIndex, bank_signatures
from .coefficients import OPERATORS, coefficients
from .datasets import Dataset, load_dataset
from .distances import distances, get_metric
from ._io import positive_int
from .signatures import DEFAULT_N, DEFAULT_SEED

__all__ = ["generate", "Generation", "query_distances", "check_out_path", "check_rank",
           "check_degenerate", "MIN_DISTINCT_EXAMPLES"]


@dataclass
class Generation:
    """What :func:`generate` decided and how long each stage took."""

    ids: List[str]
    distances: np.ndarray
    coefficients: np.ndarray
    distance: str
    operator: str
    tau: float
    timings: Dict[str, float] = field(default_factory=dict)
    demonstration: bool = False
    #: the search of ``refine=`` (:class:`metalora.refine.RefineResult`), else None
    refine: Any = None

    def top(self, k: int = 8) -> List[tuple]:
        """The k largest coefficients as ``(id, coefficient, distance)``."""
        order = np.argsort(-self.coefficients, kind="stable")[:k]
        return [(self.ids[i], float(self.coefficients[i]), float(self.distances[i]))
                for i in order if self.coefficients[i] > 0]


def query_distances(query: Any, sigs: list, metric: str, params: Optional[dict] = None,
                    threads: int = 0) -> np.ndarray:
    """Distances from one dataset's signature to each bank signature (one row of ``generate``);
    ``params`` are the metric's options (its defaults where absent)."""
    spec = get_metric(metric)
    return distances(spec.kind.convert(query), [spec.kind.convert(s) for s in sigs], metric=metric,
                     threads=threads, **spec.generate_options(params))


def generate(dataset: Union[str, Path, Dataset], bank: Union[str, Path, Bank], *,
             distance: str = "sinkhorn", operator: str = "normalized",
             tau: Union[float, str] = 1.0, mode: str = "svd", rank: Optional[int] = None,
             top_k: Optional[int] = 16, out: Union[str, Path, None] = None,
             format: str = "peft", format_options: Optional[dict] = None,
             overwrite: bool = False, embedder=None, tokenizer=None, cache: Any = True,
             n: Optional[int] = DEFAULT_N, seed: int = DEFAULT_SEED, threads: int = 0,
             distance_params: Optional[dict] = None, refine: Any = None,
             progress: bool = False) -> Adapter:
    r"""Make a LoRA adapter for ``dataset`` from ``bank``, without gradient training.

    Parameters
    ----------
    dataset : path or Dataset
        The new task's examples (JSONL with ``input``/``output``, JSON, CSV, Parquet, BIG-bench
        ``task.json``; see :func:`metalora.load_dataset`).
    bank : path or Bank
        Adapters with a pointer to the dataset each was trained on (``bank.jsonl``).
    distance : str
        An embedding metric (``sinkhorn`` default, ``sliced_wasserstein``, ``mmd``, ``energy``,
        ``gaussian_w2``, ``mean_cosine``) or a token metric of the paper (``wasserstein_1d``,
        ``token_mmd``, ``kl``, ``js``; these need ``tokenizer=`` the base model's tokenizer.json).
    operator : {"normalized", "attentional", "neural"}
        Distances to coefficients (:func:`metalora.coefficients`). ``neural`` loads the bank's
        operator trained for ``distance`` (``metalora bank index BANK --neural --distance D``);
        one trained for another metric or an older state of the bank is refused.
    tau : float or "auto"
        Temperature; ``"auto"`` picks it by leave-one-out on the bank (computed once and kept in
        the bank index, :mod:`metalora.bank_index`).
    mode, rank : see :func:`metalora.combine`.
    top_k : int or None
        Keep the k largest coefficients (renormalised); default 16. ``None`` uses every adapter:
        the paper's choice, cheap for ``linear`` but for ``svd``/``cat`` the cost grows with
        :math:`(\sum_j r_j)^2`, so a large bank needs a ``top_k``.
    out : path, optional
        Write the adapter there (atomically; ``overwrite`` to replace).
    format : str
        Output format of ``out``, a name in :data:`metalora.writers.WRITERS` (``"peft"``,
        ``"gguf"``).
    format_options : dict, optional
        Options of that format's writer (``{"base": "model.gguf"}`` for ``"gguf"``), checked
        before any work starts.
    embedder, cache, n, seed, threads, distance_params
        Signature and distance options: a custom :class:`metalora.Embedder`, the signature
        cache, the seeded subsample of ``n`` examples per signature, for the dataset and the
        bank's datasets alike (default :data:`metalora.signatures.DEFAULT_N`, what every
        command uses and what a bank's shipped index is made with; ``None``: every example),
        threads of the native kernels, extra metric options.
    refine : RefineOptions, mapping or model path, optional
        Weigh the bank's adapters on the dataset's own examples with forward passes of the base
        model (:mod:`metalora.refine`; needs ``pip install 'metalora[refine]'``): a seeded part
        of the dataset is held out for scoring and the rest is used for the distances; the
        written adapter is the best combination found, in ``mode``.

    Every option is checked before the first embedding (a rank ``mode`` cannot give, a missing
    or unreadable tokenizer, an output path that cannot be written, ...): a run that cannot
    finish fails in milliseconds, not after the slow part.

    Returns
    -------
    Adapter
        The combined adapter. ``adapter.generation`` (:class:`Generation`) holds the bank ids,
        distances, coefficients and the time of each stage; ``adapter.provenance`` is what is
        written to ``metalora.json``.
    """
    timings: Dict[str, float] = {}
    t = time.perf_counter()
    spec = get_metric(distance, "distance")  # unknown metric: fails before any signature
    if operator not in OPERATORS:
        raise ValueError(f"operator={operator!r} is not one of {OPERATORS}")
    if not (tau == "auto" or (isinstance(tau, (int, float)) and tau > 0)):
        raise ValueError(f"tau must be a positive number or 'auto', got {tau!r}")
    params = spec.generate_options(distance_params)  # unknown options too
    if spec.kind.signature == "tokens" and tokenizer is None:
        raise ValueError(f"distance={distance!r} compares token ids: pass tokenizer= the base "
                         f"model's tokenizer.json (or use an embedding metric such as 'sinkhorn')")
    positive_int(n, "n", allow_none=True)
    positive_int(top_k, "top_k", allow_none=True)
    from .combine import check_options

    check_options(mode, rank, "float32", threads)  # e.g. rank= with mode='cat'
    if spec.kind.signature == "tokens":  # a bad tokenizer file fails now, not mid-run
        from .tokens import load_tokenizer

        load_tokenizer(tokenizer)
    if not isinstance(bank, Bank):
        bank = Bank(bank)
    check_rank(bank, mode, rank, top_k)
    if tau == "auto" and len(bank) < 3:
        raise ValueError(f"tau='auto' chooses the temperature by leave-one-out on the bank, which "
                         f"needs at least 3 adapters (this bank has {len(bank)}): pass a number "
                         f"as tau=")
    if out is not None:  # before any work: never into the bank, never over an adapter unasked
        check_out_path(out, bank, dataset, overwrite=overwrite)
    if isinstance(dataset, (str, Path)):
        dataset = load_dataset(dataset)
    degenerate = check_degenerate(dataset)
    from .writers import get_writer, prepare_options

    format_options = prepare_options(get_writer(format), dict(format_options or {}))
    index = BankIndex(bank)
    if operator == "neural":  # refuse a missing or mismatched operator before the slow part
        index.neural_operator(None, distance, params)
    held_out, scorer_model = None, None
    if refine is not None:  # the model is checked against the bank before any embedding
        from . import refine as refinement

        options = refinement.RefineOptions.of(refine)
        if options.model is None:
            raise ValueError("refinement needs the base model: refine={'model': PATH} (a "
                             "transformers folder or a .gguf file)")
        refinement.require_extra(options.optimizer)
        if any(o is None for o in dataset.outputs):
            raise ValueError("refinement scores the dataset's outputs, but it has none")
        kept, held = refinement.holdout_split(len(dataset), options.examples, options.seed)
        held_out = [(dataset.inputs[i], dataset.outputs[i]) for i in held]
        dataset = dataset.select(kept)
        from .refine.scorer import check_model_matches_bank, load_model

        scorer_model = load_model(options.model, dtype=options.dtype)
        check_model_matches_bank(scorer_model[0], bank)
    timings["load"] = time.perf_counter() - t

    from .signatures import signature

    t = time.perf_counter()
    packs = index.packs() if spec.kind.signature == "embedding" else []
    # the bank's pack may hold the query's signature too (the built-in bank's example task)
    query = signature(dataset, kind=spec.kind.signature, embedder=embedder, tokenizer=tokenizer,
                      cache=cache, n=n, seed=seed, packs=packs)
    sigs = bank_signatures(bank, kind=spec.kind.signature, embedder=embedder, tokenizer=tokenizer,
                           cache=cache, n=n, seed=seed, progress=progress, packs=packs)
    timings["signatures"] = time.perf_counter() - t

    t = time.perf_counter()
    d = query_distances(query, sigs, distance, params, threads)
    timings["distances"] = time.perf_counter() - t

    t = time.perf_counter()
    model = index.neural_operator(sigs, distance, params) if operator == "neural" else None
    if tau == "auto":
        tau_value = index.temperature(sigs, distance, params, operator=operator, top_k=top_k,
                                      model=model, threads=threads)
    else:
        tau_value = float(tau)
    w = coefficients(d, operator=operator, tau=tau_value, top_k=top_k, model=model)
    timings["operator"] = time.perf_counter() - t

    refined = None
    if held_out is not None:
        t = time.perf_counter()
        from .refine.scorer import TorchScorer

        candidates = [int(i) for i in np.argsort(-w, kind="stable") if w[i] > 0]
        scorer = TorchScorer(*scorer_model, bank, candidates, held_out, template=options.template,
                             max_tokens=options.max_tokens, threads=options.threads)
        refined = refinement.search(scorer, w[candidates], options)
        w_prior, w = w, np.zeros_like(w)
        w[candidates] = refined.coefficients
        timings["refine"] = time.perf_counter() - t

    t = time.perf_counter()
    gen = Generation(ids=list(bank.ids), distances=d, coefficients=w, distance=distance,
                     operator=operator, tau=tau_value, timings=timings,
                     demonstration=bool(bank.path is not None and _is_demo(bank.path)))
    prov = {"distance": distance, "distance_params": params, "operator": operator,
            "tau": tau_value, "tau_auto": tau == "auto",
            "dataset": {"source": None if dataset.source is None else str(dataset.source),
                        "examples": len(dataset), "content_hash": dataset.content_hash(),
                        "distinct_examples": degenerate["distinct"],
                        **({"warning": degenerate["warning"]} if degenerate["warning"] else {})},
            "distances": {k: float(v) for k, v in zip(bank.ids, d)}, "timings_s": timings}
    if gen.demonstration:
        prov["demonstration_bank"] = True
    base_best = refined is not None and not np.any(w)
    if base_best:  # nothing in the bank beat the base model: an adapter that changes nothing
        w = w_prior
    adapter = combine_adapters(bank, w, mode=mode, rank=rank, threads=threads, provenance=prov)
    if base_best:
        for m in adapter.names:
            adapter.factors(m)[1][...] = 0.0
    timings["combine"] = time.perf_counter() - t
    if refined is not None:
        gen.refine = refined
        written = scorer.nll_adapter(adapter)
        adapter.provenance["refine"] = {
            "model": str(options.model), "budget": options.budget, "examples": options.examples,
            "seed": options.seed, "l1": options.l1, "evaluations": refined.evaluations,
            "start_objective": refined.start_objective, "objective": refined.objective,
            "base_objective": refined.base_objective if np.isfinite(refined.base_objective)
            else None, "written_nll": written, "base_model_best": bool(base_best),
            "seconds": refined.seconds, "tried": refined.tried}
        if base_best:
            import warnings

            warnings.warn("refinement: the base model alone scored best on the held-out examples "
                          "(no combination of the bank helped); the adapter written changes "
                          "nothing", RuntimeWarning, stacklevel=2)

    if out is not None:
        t = time.perf_counter()
        adapter.save(out, format=format, overwrite=overwrite, **format_options)
        timings["write"] = time.perf_counter() - t
    adapter.generation = gen
    return adapter


#: fewer distinct non-empty examples than this draw a warning (and a provenance note): a
#: dataset distance compares two empirical distributions, and with a handful of points the
#: sampling error of every metric is of the order of the differences between bank tasks (the
#: bank's own datasets hold hundreds of examples each).
MIN_DISTINCT_EXAMPLES = 8


def check_degenerate(dataset: Dataset) -> dict:
    """Refuse a dataset with no non-empty example (its signature would be that of the empty
    string, identical for every such dataset); warn when it has fewer than
    :data:`MIN_DISTINCT_EXAMPLES` distinct non-empty examples. Returns ``{"distinct": n,
    "warning": text or None}`` for the provenance."""
    import warnings

    texts = dataset.texts()
    distinct = {t for t in texts if t.strip()}
    where = dataset.source or "the dataset"
    if not distinct:
        raise ValueError(f"{where}: every example is empty (only whitespace): there is nothing "
                         f"to compare with the bank's datasets")
    warning = None
    if len(distinct) < MIN_DISTINCT_EXAMPLES:
        warning = (f"{where}: only {len(distinct)} distinct non-empty example(s) of {len(texts)}; "
                   f"distances from fewer than {MIN_DISTINCT_EXAMPLES} are dominated by sampling "
                   f"noise, so the adapter chosen is unreliable (give more examples)")
        warnings.warn(warning, RuntimeWarning, stacklevel=3)
    return {"distinct": len(distinct), "warning": warning}


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_out_path(out: Union[str, Path], bank: Bank, dataset: Any = None, *,
                   overwrite: bool = False) -> None:
    """Refuse an output path that is (or resolves, through symlinks, into) anything the run
    reads: the bank's directory, a bank adapter's directory, a bank dataset or the dataset;
    without ``overwrite``, one that already exists; one whose directory is missing or cannot be
    written. Raises ValueError / FileExistsError / FileNotFoundError / PermissionError."""
    real = os.path.realpath(out)
    protected = []
    if bank.path is not None:
        bp = Path(bank.path)
        protected.append(("the bank", bp if bp.is_dir() else bp.parent))
    for i, k in enumerate(bank.ids):
        if bank[i].path is not None:
            protected.append((f"bank adapter {k!r}", Path(bank[i].path)))
        ds = bank.dataset_path(k)
        if ds is not None:
            protected.append((f"the dataset of bank adapter {k!r}", Path(ds)))
    if isinstance(dataset, (str, Path)):
        protected.append(("the dataset", Path(dataset)))
    elif isinstance(dataset, Dataset) and dataset.source is not None:
        protected.append(("the dataset", Path(dataset.source)))
    for what, p in protected:
        root = os.path.realpath(p)
        if _inside(real, root):
            raise ValueError(f"out={str(out)!r} is inside {what} ({root}), which this run reads; "
                             f"nothing in a bank is ever modified: choose an output path outside "
                             f"it")
    if not overwrite and os.path.lexists(out):
        raise FileExistsError(f"{Path(out).absolute()}: already exists; pass overwrite=True to "
                              f"replace it, or choose another path")
    _check_writable(out)


def check_rank(bank: Bank, mode: str, rank: Optional[int], top_k: Optional[int]) -> None:
    """Refuse, before any work, a ``rank`` that ``mode='svd'`` cannot give: above the rank of
    the exact sum, i.e. the sum of the ``top_k`` largest adapter ranks of some module (all
    adapters' when ``top_k`` is None)."""
    if rank is None or mode != "svd" or len(bank) == 0:
        return
    k = len(bank) if top_k is None else min(int(top_k), len(bank))
    worst, where = None, None
    for m in bank.modules:
        ranks = sorted((bank[i].ranks.get(m, 0) for i in range(len(bank))), reverse=True)
        total = int(sum(ranks[:k]))
        if worst is None or total < worst:
            worst, where = total, m
    if worst is not None and rank > worst:
        used = "of all its adapters" if top_k is None else f"of the top_k={k} adapters used"
        raise ValueError(f"rank={rank} exceeds the largest rank mode='svd' can give here, {worst} "
                         f"(the sum of the ranks {used}, module {where}): pass a smaller rank= or "
                         f"a larger top_k=")


def _check_writable(out: Union[str, Path]) -> None:
    """The directory that will hold ``out`` exists and can be written (checked before any work)."""
    parent = Path(os.path.abspath(out)).parent
    if not parent.is_dir():
        raise FileNotFoundError(f"out={str(out)!r}: its directory {parent} does not exist; create "
                                f"it or choose another out=")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"out={str(out)!r}: cannot write in {parent} (permission denied); "
                              f"choose another out=")


def _is_demo(path: Union[str, Path]) -> bool:
    p = Path(path)
    marker = (p if p.is_dir() else p.parent) / "DEMONSTRATION_BANK"
    return marker.exists()
