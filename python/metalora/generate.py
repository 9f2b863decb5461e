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

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np

from ._progress import Progress
from .adapter import Adapter
from .bank import Bank, combine_adapters
from .coefficients import OPERATORS, NeuralOperator, coefficients, select_temperature
from .datasets import Dataset, load_dataset
from .distances import distances, get_metric, pairwise_distances

__all__ = ["generate", "Generation", "bank_signatures", "bank_distance_matrix", "query_distances",
           "parameter_gram", "metric_params", "neural_operator_path", "signature_kind",
           "NEURAL_OPERATOR_FILE"]

#: Where ``metalora bank index --neural`` saves a bank's trained neural operator.
NEURAL_OPERATOR_FILE = "neural_operator.onnx"


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

    def top(self, k: int = 8) -> List[tuple]:
        """The k largest coefficients as ``(id, coefficient, distance)``."""
        order = np.argsort(-self.coefficients, kind="stable")[:k]
        return [(self.ids[i], float(self.coefficients[i]), float(self.distances[i]))
                for i in order if self.coefficients[i] > 0]


def signature_kind(metric: str) -> str:
    """``"embedding"`` for the point-cloud metrics, ``"tokens"`` for the paper's token metrics
    (``METRICS[metric].kind.signature``)."""
    return get_metric(metric).kind.signature


def metric_params(metric: str, extra: Optional[dict] = None) -> dict:
    """The options ``generate`` passes to the metric: its pinned defaults (e.g. Sinkhorn's
    ``eps``; :meth:`metalora.distances.Metric.generate_options`) updated by ``extra``, checked."""
    return get_metric(metric).generate_options(extra)


def bank_distance_matrix(sigs: list, metric: str, params: Optional[dict] = None,
                         threads: int = 0) -> np.ndarray:
    """Bank-vs-bank distances ``D[i, j]`` between the signatures of :func:`bank_signatures`
    (used to pick ``tau``, train the neural operator and draw the bank heatmap)."""
    convert = get_metric(metric).kind.convert
    return pairwise_distances([convert(s) for s in sigs], metric=metric, threads=threads,
                              **(metric_params(metric) if params is None else params))


def query_distances(query: Any, sigs: list, metric: str, params: Optional[dict] = None,
                    threads: int = 0) -> np.ndarray:
    """Distances from one dataset's signature to each bank signature (one row of ``generate``)."""
    convert = get_metric(metric).kind.convert
    return distances(convert(query), [convert(s) for s in sigs], metric=metric, threads=threads,
                     **(metric_params(metric) if params is None else params))


def neural_operator_path(bank: Bank) -> Optional[Path]:
    """Where the bank's trained neural operator lives (its directory), None for in-memory banks."""
    if bank.path is None:
        return None
    root = Path(bank.path)
    return (root if root.is_dir() else root.parent) / NEURAL_OPERATOR_FILE


def bank_signatures(bank: Bank, *, kind: str = "embedding", embedder=None, tokenizer=None,
                    cache: Any = True, n: Optional[int] = None, seed: int = 0,
                    progress: bool = True) -> list:
    """Signatures of every bank adapter's dataset (from the cache when already computed).

    Raises a ValueError naming the adapters whose manifest entry has no ``dataset``.
    """
    from .signatures import signature

    missing = [k for k in bank.ids if bank.dataset_path(k) is None]
    if missing:
        raise ValueError(f"bank adapters {missing[:5]} have no dataset: add a \"dataset\" path to "
                         f"their line of the bank's bank.jsonl manifest")
    if kind == "embedding" and embedder is None:
        from .embed import Embedder

        embedder = Embedder(progress=False)  # one bar for the whole bank below
    with Progress(len(bank), "metalora bank signatures", "dataset",
                  None if progress else False) as bar:
        sigs = []
        for k in bank.ids:
            sigs.append(signature(bank.dataset_path(k), kind=kind, embedder=embedder,
                                  tokenizer=tokenizer, cache=cache, n=n, seed=seed))
            bar.update()
    return sigs


def parameter_gram(bank: Bank) -> np.ndarray:
    r"""``G[i, j] = <theta_i, theta_j>`` with :math:`\theta` all lora_A and lora_B entries.

    The leave-one-out error of an operator (:func:`metalora.coefficients.loo_errors`) needs only
    this matrix. Computed module by module in float64 from the memory-mapped factors.
    """
    from ._arrays import BFLOAT16

    K = len(bank)
    G = np.zeros((K, K))
    for m in bank.modules:
        for which in (0, 1):
            rows = []
            for k in bank.ids:
                x = bank[k].factors(m)[which]
                if x.dtype == np.uint16:
                    x = x.view(BFLOAT16)
                rows.append(np.asarray(x, dtype=np.float32).reshape(-1))
            X = np.stack(rows).astype(np.float64)
            G += X @ X.T
    return G


def _resolve_tau(tau: Union[float, str], bank: Bank, metric: str, sigs: list, operator: str,
                 top_k: Optional[int], model, params: dict, threads: int) -> float:
    if tau != "auto":
        return float(tau)
    if len(bank) < 3:
        raise ValueError("tau='auto' needs a bank of at least 3 adapters (leave-one-out)")
    D = bank_distance_matrix(sigs, metric, params, threads)
    return float(select_temperature(D, parameter_gram(bank), operator=operator, top_k=top_k,
                                    model=model))


def generate(dataset: Union[str, Path, Dataset], bank: Union[str, Path, Bank], *,
             distance: str = "sinkhorn", operator: str = "normalized",
             tau: Union[float, str] = 1.0, mode: str = "svd", rank: Optional[int] = None,
             top_k: Optional[int] = 16, out: Union[str, Path, None] = None,
             overwrite: bool = False, embedder=None, tokenizer=None, cache: Any = True,
             n: Optional[int] = None, seed: int = 0, threads: int = 0,
             distance_params: Optional[dict] = None, progress: bool = False) -> Adapter:
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
        trained operator (``metalora bank index --neural``).
    tau : float or "auto"
        Temperature; ``"auto"`` picks it by leave-one-out on the bank.
    mode, rank : see :func:`metalora.combine`.
    top_k : int or None
        Keep the k largest coefficients (renormalised); default 16. ``None`` uses every adapter:
        the paper's choice, cheap for ``linear`` but for ``svd``/``cat`` the cost grows with
        :math:`(\sum_j r_j)^2`, so a large bank needs a ``top_k``.
    out : path, optional
        Write the PEFT adapter directory there (atomically; ``overwrite`` to replace).
    embedder, cache, n, seed, threads, distance_params
        Signature and distance options: a custom :class:`metalora.Embedder`, the signature
        cache, subsampling to ``n`` examples, OpenMP threads, extra metric options.

    Returns
    -------
    Adapter
        The combined adapter. ``adapter.generation`` (:class:`Generation`) holds the bank ids,
        distances, coefficients and the time of each stage; ``adapter.provenance`` is what is
        written to ``metalora.json``.
    """
    timings: Dict[str, float] = {}
    t = time.perf_counter()
    # an unknown metric or option fails here, before any signature is computed
    params = get_metric(distance, "distance").generate_options(distance_params)
    if operator not in OPERATORS:
        raise ValueError(f"operator={operator!r} is not one of {OPERATORS}")
    if not (tau == "auto" or (isinstance(tau, (int, float)) and tau > 0)):
        raise ValueError(f"tau must be a positive number or 'auto', got {tau!r}")
    kind = signature_kind(distance)
    if kind == "tokens" and tokenizer is None:
        raise ValueError(f"distance={distance!r} compares token ids: pass tokenizer= the base "
                         f"model's tokenizer.json (or use an embedding metric such as 'sinkhorn')")
    if not isinstance(bank, Bank):
        bank = Bank(bank)
    if isinstance(dataset, (str, Path)):
        dataset = load_dataset(dataset)
    model = None
    if operator == "neural":
        path = neural_operator_path(bank)
        if path is None or not path.is_file():
            raise ValueError("operator='neural' needs a trained operator saved with the bank: run "
                             "`metalora bank index BANK --neural` first")
        model = NeuralOperator.load(path)
    timings["load"] = time.perf_counter() - t

    from .signatures import signature

    t = time.perf_counter()
    query = signature(dataset, kind=kind, embedder=embedder, tokenizer=tokenizer, cache=cache,
                      n=n, seed=seed)
    sigs = bank_signatures(bank, kind=kind, embedder=embedder, tokenizer=tokenizer, cache=cache,
                           n=n, seed=seed, progress=progress)
    timings["signatures"] = time.perf_counter() - t

    t = time.perf_counter()
    d = query_distances(query, sigs, distance, params, threads)
    timings["distances"] = time.perf_counter() - t

    t = time.perf_counter()
    tau_value = _resolve_tau(tau, bank, distance, sigs, operator, top_k, model, params, threads)
    w = coefficients(d, operator=operator, tau=tau_value, top_k=top_k, model=model)
    timings["operator"] = time.perf_counter() - t

    t = time.perf_counter()
    gen = Generation(ids=list(bank.ids), distances=d, coefficients=w, distance=distance,
                     operator=operator, tau=tau_value, timings=timings,
                     demonstration=bool(bank.path is not None and _is_demo(bank.path)))
    prov = {"distance": distance, "distance_params": params, "operator": operator,
            "tau": tau_value, "tau_auto": tau == "auto",
            "dataset": {"source": None if dataset.source is None else str(dataset.source),
                        "examples": len(dataset), "content_hash": dataset.content_hash()},
            "distances": {k: float(v) for k, v in zip(bank.ids, d)}, "timings_s": timings}
    if gen.demonstration:
        prov["demonstration_bank"] = True
    adapter = combine_adapters(bank, w, mode=mode, rank=rank, threads=threads, provenance=prov)
    timings["combine"] = time.perf_counter() - t

    if out is not None:
        t = time.perf_counter()
        adapter.save(out, overwrite=overwrite)
        timings["write"] = time.perf_counter() - t
    adapter.generation = gen
    return adapter


def _is_demo(path: Union[str, Path]) -> bool:
    p = Path(path)
    marker = (p if p.is_dir() else p.parent) / "DEMONSTRATION_BANK"
    return marker.exists()
