r"""The bank index: what is computed once per bank and stored beside it.

``metalora bank index`` and :func:`metalora.generate` share it. For a bank it holds

* the signatures of the bank's datasets (in the content-addressed signature cache,
  :mod:`metalora.signatures`; ``metalora bank index --pack`` also stores them *in* the index as
  a float16, checksummed :class:`~metalora.signatures.SignaturePack`, so that a bank given
  away with its ``metalora-index/`` folder is never embedded again — the built-in bank ships
  one; :func:`pack_bank`),
* per metric and options, the bank-vs-bank distance matrix :math:`D` (used by ``tau="auto"``, the
  neural operator and ``metalora plot``), computed in independent row blocks
  (:func:`distance_block`) so that the blocks can run anywhere and be assembled,
* the parameter Gram matrix :math:`G_{ij} = \langle\theta_i, \theta_j\rangle`,
* the chosen temperature of ``tau="auto"`` per metric, operator and ``top_k``,
* the neural operator, with the metric and options it was trained on.

:func:`index_bank` (what ``metalora bank index`` runs) computes the signatures and :math:`D` on an
:class:`Executor`: :class:`LocalExecutor` here, or a Ray cluster
(:class:`metalora.bank_index_ray.RayExecutor`, ``--ray``; the ``ray`` extra), with the same
results; the driver alone writes the cache and the index.

Every entry records content hashes of what it was computed from: the signatures (a sha256 of
their arrays) for :math:`D`, the adapters' weight files (sha256, with a size/mtime shortcut) for
:math:`G`, both for ``tau`` and the neural operator. On load the hashes are checked: a stale
:math:`D`, :math:`G` or ``tau`` is recomputed (logged to the ``metalora`` logger with the reason);
a stale or mismatched neural operator is refused with the command that retrains it, since
training is an explicit step (it needs torch).

The index lives in ``<bank directory>/metalora-index/`` when that can be written, else in the
user's cache (``$METALORA_CACHE_DIR/index/<hash of the bank's path>/``); both are read. Files are
written atomically. A bank held only in memory (:meth:`Bank.from_adapters`) is indexed in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._io import atomic_write, positive_int
from ._progress import Progress
from .bank import Bank
from .signatures import DEFAULT_N, DEFAULT_SEED, EmbeddingJob

__all__ = ["BankIndex", "bank_signatures", "parameter_gram", "distance_block", "row_blocks",
           "signature_digest", "pack_bank", "pack_path", "INDEX_DIR", "BankIndexError",
           "index_bank", "IndexResult", "Executor", "LocalExecutor", "executor_for",
           "ExecutorError", "RayNotInstalledError", "RAY_INSTALL_HINT"]

_log = logging.getLogger("metalora")

INDEX_DIR = "metalora-index"
_FORMAT = 1
_BLOCK_PAIRS = 4096  # pairs per row block of D when none is given (a few seconds of work)


class BankIndexError(ValueError):
    """The bank index cannot serve a request (e.g. a neural operator trained for another
    metric); the message says what to run."""


RAY_INSTALL_HINT = "pip install 'metalora[ray]'"


class ExecutorError(RuntimeError):
    """An executor cannot run the bank index's work (its message says why and what to do)."""


class RayNotInstalledError(ExecutorError, ImportError):
    """The Ray executor was asked for and Ray (with Ray Data) is not installed."""

    def __init__(self, detail: str = ""):
        super().__init__(f"the Ray executor needs Ray with Ray Data, which is not installed"
                         f"{' (' + detail + ')' if detail else ''}: install it with "
                         f"{RAY_INSTALL_HINT}")


# ------------------------------------------------------------------------------------------------
# executors: where the index's work runs


class Executor(ABC):
    """Where :func:`index_bank` computes the bank's embedding signatures and the row blocks of
    its distance matrix. The driver (the calling process) decides what is missing, stores every
    result it receives (signature cache, index files) and assembles :math:`D`; an executor only
    computes. Subclasses implement :meth:`embed` and :meth:`distance_blocks`;
    :class:`LocalExecutor` runs here, :class:`metalora.bank_index_ray.RayExecutor` on a Ray
    cluster. Executors are context managers (:meth:`close` releases what they started)."""

    name = "executor"

    @abstractmethod
    def embed(self, jobs: Sequence[EmbeddingJob], embedder) -> Iterator[Tuple[int, np.ndarray]]:
        """Compute ``embedder.embed(job.texts)`` for every job; yield ``(position in jobs,
        points)`` as each finishes (any order), so the caller can store each one at once."""

    @abstractmethod
    def distance_blocks(self, sigs: Sequence[Any], metric: str, params: dict,
                        blocks: Sequence[Tuple[int, int]], *, threads: int = 0,
                        progress: Optional[bool] = None) -> List[np.ndarray]:
        """:func:`distance_block` of every row block, in the order of ``blocks``."""

    def pairs_per_block(self, K: int, symmetric: bool) -> int:
        """How many pairs of the ``K x K`` matrix one row block should hold here."""
        return _BLOCK_PAIRS

    def close(self) -> None:
        """Release what the executor started (nothing for the local one)."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LocalExecutor(Executor):
    """This process: signatures one dataset after the other with the embedder's own threads,
    row blocks in order with ``threads`` kernel threads (what ``metalora bank index`` does
    without ``--ray``)."""

    name = "local"

    def embed(self, jobs: Sequence[EmbeddingJob], embedder) -> Iterator[Tuple[int, np.ndarray]]:
        for i, job in enumerate(jobs):
            yield i, embedder.embed(list(job.texts))

    def distance_blocks(self, sigs: Sequence[Any], metric: str, params: dict,
                        blocks: Sequence[Tuple[int, int]], *, threads: int = 0,
                        progress: Optional[bool] = None) -> List[np.ndarray]:
        with Progress(len(blocks), f"metalora bank distances ({metric})", "block",
                      (len(sigs) >= 40) if progress is None else progress) as bar:
            parts = []
            for b in blocks:
                parts.append(distance_block(sigs, metric, params, b, threads=threads))
                bar.update()
        return parts


def executor_for(ray: Union[None, bool, str] = None, *, actors: Optional[int] = None,
                 cpus_per_actor: Optional[int] = None) -> Executor:
    """The executor for ``ray``: ``None``/``False`` -> :class:`LocalExecutor`; ``True`` or
    ``""`` -> a :class:`~metalora.bank_index_ray.RayExecutor` on a local Ray instance (started
    on first use); a string -> one connected to the Ray cluster at that address
    (``host:port`` or ``ray://host:port``). ``actors`` / ``cpus_per_actor`` size the pool of
    embedding actors (defaults from the cluster's resources) and apply to Ray only.

    Raises :class:`RayNotInstalledError` (install with ``pip install 'metalora[ray]'``) when
    Ray is asked for and not installed; ray itself is imported by
    :mod:`metalora.bank_index_ray` only.
    """
    if ray is None or ray is False:
        if actors is not None or cpus_per_actor is not None:
            raise ValueError("actors= and cpus_per_actor= size the Ray executor: pass ray=True "
                             "(or a cluster address) with them")
        return LocalExecutor()
    if not isinstance(ray, (bool, str)):
        raise TypeError(f"ray= takes True, False, None or a cluster address, not "
                        f"{type(ray).__name__}")
    try:
        from .bank_index_ray import RayExecutor
    except RayNotInstalledError:
        raise
    except ImportError as exc:  # pragma: no cover - a broken ray install
        raise RayNotInstalledError(str(exc)) from None
    address = None if ray is True or ray == "" else ray
    return RayExecutor(address=address, actors=actors, cpus_per_actor=cpus_per_actor)


# ------------------------------------------------------------------------------------------------
# content hashes


def signature_digest(sig: Any) -> str:
    """sha256 of a signature's content: a point cloud's dtype, shape and bytes, or a token
    signature's ids, offsets and vocabulary size."""
    h = hashlib.sha256()
    if isinstance(sig, np.ndarray):
        a = np.ascontiguousarray(sig)
        h.update(f"cloud {a.dtype.str} {a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    else:
        ids = np.ascontiguousarray(sig.ids)
        offsets = np.ascontiguousarray(sig.offsets)
        h.update(f"tokens {ids.dtype.str} {ids.shape} {offsets.dtype.str} {offsets.shape} "
                 f"{int(sig.vocab_size)}".encode())
        h.update(memoryview(ids).cast("B"))
        h.update(memoryview(offsets).cast("B"))
    return h.hexdigest()


def _digest_of(parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 22)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


# ------------------------------------------------------------------------------------------------
# stateless computations (each also usable alone, e.g. by a distributed executor)


def bank_signatures(bank: Bank, *, kind: str = "embedding", embedder=None, tokenizer=None,
                    cache: Any = True, n: Optional[int] = DEFAULT_N, seed: int = DEFAULT_SEED,
                    progress: bool = True, packs: Optional[Sequence[Any]] = None,
                    executor: Optional[Executor] = None, log: Optional[dict] = None) -> list:
    """Signatures of every bank adapter's dataset: from the bank's shipped signature pack when
    it holds them, else from the signature cache, else computed (and cached).

    ``n``/``seed``: the seeded subsample of every dataset (default
    :data:`metalora.signatures.DEFAULT_N`, what every command uses; ``None``: all examples).
    ``packs``: the :class:`~metalora.signatures.SignaturePack` list to consult (default: the
    bank index's, :meth:`BankIndex.packs`; ``[]`` for none). A pack that does not serve this
    run (another embedder, another ``n``, an edited dataset) is logged with the reason.

    ``executor``: where the missing embedding signatures are computed (default
    :class:`LocalExecutor`); each one is written into the cache as soon as it arrives, so an
    interrupted run keeps what finished and a re-run embeds only the rest. Token signatures
    are always computed here (tokenizing is fast). ``log``: a dict that receives
    ``{"embedded": int, "reused": int}`` (signatures computed / read from a pack or cache).

    Raises a ValueError naming the adapters whose manifest entry has no ``dataset``.
    """
    from .signatures import _resolve_cache, cached_points, embedding_job, signature, store_points

    missing = [k for k in bank.ids if bank.dataset_path(k) is None]
    if missing:
        raise ValueError(f"bank adapters {missing[:5]} have no dataset: add a \"dataset\" path to "
                         f"their line of the bank's bank.jsonl manifest")
    if kind == "embedding" and embedder is None:
        from .embed import default_embedder

        embedder = default_embedder(progress=False)  # one bar for the whole bank below
    if kind != "embedding":
        with Progress(len(bank), "metalora bank signatures", "dataset",
                      None if progress else False) as bar:
            sigs = []
            for k in bank.ids:
                sigs.append(signature(bank.dataset_path(k), kind=kind, tokenizer=tokenizer,
                                      cache=cache, n=n, seed=seed))
                bar.update()
        return sigs
    if packs is None:
        packs = BankIndex(bank).packs()
    jobs = [embedding_job(bank.dataset_path(k), embedder=embedder, n=n, seed=seed, label=k)
            for k in bank.ids]  # exactly the key and texts signature() uses
    if packs:  # which bank datasets the packs cannot serve, and why (said once per run)
        keys = [j.key for j in jobs]
        misses = [k for k, key in zip(bank.ids, keys) if not any(key in p for p in packs)]
        if misses:
            _log.info("bank index: %s", _pack_miss_reason(packs, bank, misses, keys, embedder, n,
                                                          seed))
    store = _resolve_cache(cache)
    sigs: List[Any] = [cached_points(j, store, packs) for j in jobs]
    todo = [i for i, x in enumerate(sigs) if x is None]
    if log is not None:
        log.update(embedded=0, reused=len(jobs) - len(todo))
    if todo:
        executor = executor if executor is not None else LocalExecutor()
        with Progress(len(bank), "metalora bank signatures", "dataset",
                      None if progress else False) as bar:
            bar.update(len(jobs) - len(todo))
            for pos, points in executor.embed([jobs[i] for i in todo], embedder):
                i = todo[pos]
                if sigs[i] is not None:  # a result delivered twice (a retried worker)
                    continue
                sigs[i] = store_points(jobs[i], points, store)
                if log is not None:
                    log["embedded"] += 1
                bar.update()
        left = [bank.ids[i] for i in todo if sigs[i] is None]
        if left:
            raise ExecutorError(f"the {executor.name} executor returned no signature for "
                                f"{len(left)} bank datasets ({', '.join(left[:5])})")
    return sigs


def _pack_miss_reason(packs, bank: Bank, misses: List[str], keys: List[str], embedder,
                      n: Optional[int], seed: int) -> str:
    """Why the shipped signature packs do not serve ``misses`` (for the log)."""
    what = f"{len(misses)} of the bank's {len(bank)} datasets ({', '.join(misses[:3])}" + (
        ", ...)" if len(misses) > 3 else ")")
    same = [p for p in packs if p.embedder == embedder.id]
    if not same:
        made = sorted({str(p.embedder) for p in packs})
        return (f"the shipped signatures were made by embedder {', '.join(made)}, this run uses "
                f"{embedder.id}: embedding {what}")
    if not any(p.meta.get("n") == n and p.meta.get("seed") == seed for p in same):
        made = sorted({f"n={p.meta.get('n')}, seed={p.meta.get('seed')}" for p in same})
        return (f"the shipped signatures were made with {'; '.join(made)}, this run uses "
                f"n={n}, seed={seed}: embedding {what}")
    index = {k: i for i, k in enumerate(bank.ids)}
    packed = {bid: key for p in same for bid, key in p.meta.get("ids", {}).items()}
    edited = [k for k in misses if k in packed and packed[k] != keys[index[k]]]
    if edited:
        return (f"the datasets of {', '.join(edited[:3])} changed since the bank was packed: "
                f"embedding {what}")
    return f"the shipped signatures do not cover {what}: embedding them"


def pack_path(directory: Path, embedder_id: str, n: Optional[int], seed: int) -> Path:
    """File name of the signature pack for one embedder, ``n`` and seed."""
    return Path(directory) / f"signatures-{_digest_of([embedder_id, n, seed])[:16]}.npz"


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


def row_blocks(K: int, symmetric: bool, pairs_per_block: int = _BLOCK_PAIRS) -> List[Tuple[int, int]]:
    """Split the rows of a ``K x K`` distance matrix into ``[start, stop)`` blocks of about
    ``pairs_per_block`` pairs each (for a symmetric metric row i holds the K - i pairs j >= i)."""
    positive_int(pairs_per_block, "pairs_per_block")
    blocks, start, count = [], 0, 0
    for i in range(K):
        count += (K - i) if symmetric else K
        if count >= pairs_per_block or i == K - 1:
            blocks.append((start, i + 1))
            start, count = i + 1, 0
    return blocks


def distance_block(sigs: Sequence[Any], metric: str, params: Optional[dict], rows: Tuple[int, int],
                   *, threads: int = 0, progress: Optional[bool] = False) -> np.ndarray:
    """Rows ``[start, stop)`` of the bank distance matrix: ``out[i - start, j] = d(sig_i, sig_j)``.

    For a symmetric metric the pairs the whole matrix mirrors from earlier rows (``j < start``)
    are NaN (:func:`assemble_blocks` fills them); every other entry is computed exactly as
    :func:`metalora.pairwise_distances` computes it, so blocks assembled from anywhere give the
    same matrix bit for bit.
    """
    from .distances import pairwise_distances

    return pairwise_distances([_as_query(s, metric) for s in sigs], metric=metric,
                              threads=threads, progress=progress, rows=rows,
                              **_metric_params(metric, params))


def assemble_blocks(K: int, blocks: Sequence[Tuple[Tuple[int, int], np.ndarray]],
                    symmetric: bool) -> np.ndarray:
    """The ``K x K`` matrix from the row blocks of :func:`distance_block` (any order): a NaN
    entry of a symmetric metric is filled from its mirror."""
    D = np.full((K, K), np.nan)
    for (start, stop), part in blocks:
        D[start:stop] = part
    if symmetric:  # entries a block left to the row that computed the pair
        D = np.where(np.isnan(D), D.T, D)
    if np.isnan(D).any():
        missing = sorted({int(i) for i in np.argwhere(np.isnan(D))[:, 0]})
        raise ValueError(f"distance blocks do not cover rows {missing[:10]} of the {K} x {K} matrix")
    return D


def _metric(metric: str):
    from .distances import get_metric

    return get_metric(metric)


def _metric_params(metric: str, params: Optional[dict]) -> dict:
    return _metric(metric).generate_options(params)


def _as_query(sig: Any, metric: str) -> Any:
    return _metric(metric).kind.convert(sig)


# ------------------------------------------------------------------------------------------------
# the stored index


class BankIndex:
    """The stored index of one bank (see the module docstring).

    Parameters
    ----------
    bank : Bank
    directory : path, optional
        Where to store it; default ``<bank>/metalora-index`` if writable, else the user cache.
    """

    def __init__(self, bank: Bank, directory: Optional[os.PathLike] = None):
        self.bank = bank
        self._memory: Dict[str, Tuple[dict, Dict[str, np.ndarray]]] = {}
        if directory is not None:
            self.directories = [Path(directory)]
        elif bank.path is None:
            self.directories = []
        else:
            root = Path(bank.path)
            root = (root if root.is_dir() else root.parent).resolve()
            from .signatures import default_cache_dir

            fallback = default_cache_dir().parent / "index" / _digest_of(str(root))[:24]
            self.directories = [root / INDEX_DIR, fallback]
        self._adapter_hashes: Optional[Dict[str, str]] = None
        self._packs: Optional[list] = None

    def __repr__(self) -> str:
        where = self.directories[0] if self.directories else "(in memory)"
        return f"<metalora.BankIndex of {len(self.bank)} adapters at {where}>"

    # -- shipped signatures ------------------------------------------------------------------
    def packs(self) -> list:
        """The bank's shipped signature packs (``signatures-*.npz`` in the index directories,
        :class:`~metalora.signatures.SignaturePack`), each verified against its checksum; one
        that fails is logged with the reason and skipped (its signatures are recomputed)."""
        if self._packs is None:
            from .signatures import SignaturePack, SignaturePackError

            self._packs = []
            for d in self.directories:
                for f in sorted(d.glob("signatures-*.npz")) if d.is_dir() else ():
                    try:
                        self._packs.append(SignaturePack(f))
                    except SignaturePackError as exc:
                        _log.warning("bank index: %s; the bank's signatures are recomputed "
                                     "(re-run `metalora bank index %s --pack` to repair it)",
                                     exc, self.bank.path or "BANK")
        return self._packs

    # -- storage ---------------------------------------------------------------------------
    def _load(self, name: str) -> Optional[Tuple[dict, Dict[str, np.ndarray]]]:
        if name in self._memory:
            return self._memory[name]
        for d in self.directories:
            p = d / f"{name}.npz"
            try:
                with np.load(p, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
                meta = json.loads(bytes(arrays.pop("__meta__")).decode("utf-8"))
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, EOFError) as exc:
                _log.warning("bank index: %s is unreadable (%s); recomputing it", p, exc)
                continue
            if meta.get("format") != _FORMAT:
                continue
            self._memory[name] = (meta, arrays)
            return meta, arrays
        return None

    def _store(self, name: str, meta: dict, arrays: Dict[str, np.ndarray]) -> None:
        meta = dict(meta, format=_FORMAT)
        self._memory[name] = (meta, arrays)
        payload = dict(arrays, __meta__=np.frombuffer(json.dumps(meta, sort_keys=True).encode(),
                                                     np.uint8))
        for d in self.directories:
            try:
                d.mkdir(parents=True, exist_ok=True)
                atomic_write(d / f"{name}.npz", lambda f: np.savez(f, **payload))
                return
            except OSError as exc:  # read-only bank: try the next place
                last = exc
        if self.directories:
            _log.warning("bank index: cannot store %s (%s); it stays in memory", name, last)

    # -- what the entries are computed from ------------------------------------------------
    def adapter_hashes(self) -> Dict[str, str]:
        """sha256 of each adapter's weights file (in-memory adapters: of their factors), reusing
        the recorded hash of a file whose size and mtime are unchanged."""
        if self._adapter_hashes is not None:
            return self._adapter_hashes
        rec = self._load("adapters")
        known = rec[0].get("files", {}) if rec else {}
        files, hashes = {}, {}
        for k in self.bank.ids:
            a = self.bank[k]
            path = a.weights_file
            if path is None:
                h = hashlib.sha256()
                for m in a.names:
                    for x in a.factors(m):
                        h.update(np.ascontiguousarray(x).view(np.uint8).data)
                hashes[k] = h.hexdigest()
                continue
            st = os.stat(path)
            stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
            old = known.get(str(path))
            digest = old["sha256"] if old and old["stamp"] == stamp else _file_sha256(path)
            files[str(path)] = {"stamp": stamp, "sha256": digest}
            hashes[k] = digest
        if files and files != known:
            self._store("adapters", {"files": files}, {})
        self._adapter_hashes = hashes
        return hashes

    def _inputs(self, sigs: Optional[Sequence[Any]]) -> dict:
        out = {"ids": list(self.bank.ids)}
        if sigs is not None:
            if len(sigs) != len(self.bank):
                raise ValueError(f"{len(sigs)} signatures for a bank of {len(self.bank)} adapters")
            out["signatures"] = [signature_digest(s) for s in sigs]
        return out

    def _changed(self, old: dict, new: dict, what: str) -> str:
        """Why a stored entry no longer matches (which adapters, which inputs)."""
        if old.get("ids") != new.get("ids"):
            gone = sorted(set(old.get("ids", [])) - set(new["ids"]))
            added = sorted(set(new["ids"]) - set(old.get("ids", [])))
            return f"the bank's adapters changed (added {added[:5]}, removed {gone[:5]})"
        for key in (what,) if what else ():
            changed = [k for k, a, b in zip(new["ids"], old.get(key, []), new.get(key, [])) if a != b]
            if changed:
                return f"{len(changed)} adapter(s) changed their {key[:-1]} ({changed[:5]})"
        return "its inputs changed"

    # -- D ----------------------------------------------------------------------------------
    @staticmethod
    def _d_name(metric: str, params: dict) -> str:
        return f"D-{metric}-{_digest_of(params)[:16]}"

    def distance_matrix(self, sigs: Sequence[Any], metric: str, params: Optional[dict] = None, *,
                        threads: int = 0, progress: Optional[bool] = None,
                        compute_blocks: Optional[Callable] = None,
                        pairs_per_block: Union[int, Callable[[int, bool], int]] = _BLOCK_PAIRS
                        ) -> np.ndarray:
        """The bank distance matrix for ``metric`` (stored; recomputed when the signatures
        changed). ``compute_blocks(sigs, metric, params, blocks) -> [array]`` computes the row
        blocks elsewhere (default: here, in order); ``pairs_per_block`` sizes them, or
        ``pairs_per_block(K, symmetric)`` does when D must be computed (:func:`row_blocks`:
        any size gives the same matrix bit for bit)."""
        spec = _metric(metric)
        params = _metric_params(metric, params)
        name = self._d_name(metric, params)
        inputs = self._inputs(sigs)
        rec = self._load(name)
        if rec is not None:
            meta, arrays = rec
            if meta.get("inputs") == inputs:
                return arrays["D"]
            _log.info("bank index: recomputing D for %s: %s", metric,
                      self._changed(meta.get("inputs", {}), inputs, "signatures"))
        K = len(sigs)
        if callable(pairs_per_block):
            pairs_per_block = pairs_per_block(K, spec.symmetric)
        blocks = row_blocks(K, spec.symmetric, pairs_per_block)
        if compute_blocks is None:  # here, in order: what the local executor does
            parts = LocalExecutor().distance_blocks(sigs, metric, params, blocks,
                                                    threads=threads, progress=progress)
        else:
            parts = list(compute_blocks(sigs, metric, params, blocks))
        D = assemble_blocks(K, list(zip(blocks, parts)), spec.symmetric)
        self._store(name, {"metric": metric, "params": params, "inputs": inputs}, {"D": D})
        return D

    # -- G ----------------------------------------------------------------------------------
    def gram(self) -> np.ndarray:
        """The parameter Gram matrix (stored; recomputed when an adapter's weights changed)."""
        inputs = dict(self._inputs(None), adapters=[self.adapter_hashes()[k] for k in self.bank.ids])
        rec = self._load("G")
        if rec is not None:
            meta, arrays = rec
            if meta.get("inputs") == inputs:
                return arrays["G"]
            _log.info("bank index: recomputing G: %s",
                      self._changed(meta.get("inputs", {}), inputs, "adapters"))
        G = parameter_gram(self.bank)
        self._store("G", {"inputs": inputs}, {"G": G})
        return G

    def _fit_key(self, sigs, metric: str, params: dict) -> dict:
        return {"metric": metric, "params": params, "D": _digest_of(self._inputs(sigs)),
                "G": _digest_of([self.adapter_hashes()[k] for k in self.bank.ids])}

    # -- tau --------------------------------------------------------------------------------
    def temperature(self, sigs: Sequence[Any], metric: str, params: Optional[dict] = None, *,
                    operator: str = "normalized", top_k: Optional[int] = None, model=None,
                    threads: int = 0) -> float:
        """``tau="auto"``: leave-one-out choice on the bank (stored per metric, operator,
        top_k and neural operator)."""
        from .coefficients import select_temperature

        if len(self.bank) < 3:
            raise ValueError("tau='auto' needs a bank of at least 3 adapters (leave-one-out)")
        params = _metric_params(metric, params)
        key = dict(self._fit_key(sigs, metric, params), operator=operator, top_k=top_k,
                   model=None if model is None else hashlib.sha256(model.onnx_bytes).hexdigest())
        name = f"tau-{_digest_of(key)[:24]}"
        rec = self._load(name)
        if rec is not None and rec[0].get("key") == key:
            return float(rec[0]["tau"])
        D = self.distance_matrix(sigs, metric, params, threads=threads)
        tau = float(select_temperature(D, self.gram(), operator=operator, top_k=top_k, model=model))
        self._store(name, {"key": key, "tau": tau}, {})
        return tau

    # -- the neural operator ----------------------------------------------------------------
    def train_neural(self, sigs: Sequence[Any], metric: str, params: Optional[dict] = None, *,
                     epochs: int = 400, threads: int = 0):
        """Train the neural operator on this bank for ``metric`` and store it."""
        from .coefficients import NeuralOperator

        params = _metric_params(metric, params)
        D = self.distance_matrix(sigs, metric, params, threads=threads)
        op = NeuralOperator.fit(D, self.gram(), epochs=epochs)
        op.meta.update(self._fit_key(sigs, metric, params))
        self._store(f"neural-{metric}", {"meta": op.meta},
                    {"onnx": np.frombuffer(op.onnx_bytes, np.uint8)})
        return op

    def neural_operator(self, sigs: Optional[Sequence[Any]], metric: str,
                        params: Optional[dict] = None):
        """The stored neural operator for ``metric``, refused when it was trained on another
        metric, other options or another state of the bank (``sigs=None``: check the metric and
        options only, e.g. before the signatures are computed)."""
        from .coefficients import NeuralOperator

        params = _metric_params(metric, params)
        where = self.bank.path or "BANK"
        retrain = f"run `metalora bank index {where} --neural --distance {metric}`"
        rec = self._load(f"neural-{metric}")
        if rec is None:
            others = sorted({n[len("neural-"):] for d in self.directories if d.is_dir()
                             for n in (p.stem for p in d.glob("neural-*.npz"))})
            if others:
                raise BankIndexError(f"the bank's neural operator was trained on {', '.join(others)}, "
                                  f"not {metric}: {retrain}")
            raise BankIndexError(f"operator='neural' needs a neural operator trained on the bank: "
                              f"{retrain} first")
        meta = rec[0]["meta"]
        if meta.get("params") != params:
            raise BankIndexError(f"the bank's neural operator for {metric} was trained with "
                                 f"options {meta.get('params')}, not {params}: {retrain}")
        if sigs is None:
            return NeuralOperator(rec[1]["onnx"].tobytes(), meta)
        key = self._fit_key(sigs, metric, params)
        for what, label in (("D", "the bank's datasets or their signatures"),
                            ("G", "the bank's adapters")):
            if meta.get(what) != key[what]:
                raise BankIndexError(f"the bank's neural operator for {metric} is stale: {label} "
                                  f"changed since it was trained; {retrain}")
        return NeuralOperator(rec[1]["onnx"].tobytes(), meta)


# ------------------------------------------------------------------------------------------------
# exporting a bank with its index


def pack_bank(bank: Bank, *, embedder=None, n: Optional[int] = DEFAULT_N,
              seed: int = DEFAULT_SEED, extra: Sequence[os.PathLike] = (),
              distance: str = "sinkhorn", operator: str = "normalized",
              top_k: Optional[int] = 16, threads: int = 0, progress: bool = True) -> dict:
    """Store everything ``generate`` needs from ``bank`` in ``BANK/metalora-index/``, so that
    whoever receives the bank never embeds its datasets: the signature pack (float16 points of
    every bank dataset and of the ``extra`` datasets, checksummed,
    :class:`~metalora.signatures.SignaturePack`), then, computed from the packed points, the
    distance matrix for ``distance``, the parameter Gram matrix and ``tau="auto"`` for
    ``operator`` / ``top_k``.

    Returns ``{"pack": path, "pack_bytes": int, "signatures": int, "index_bytes": int,
    "tau": float or None, "seconds": float}``. Raises OSError when the bank's directory cannot
    be written (a pack ships inside the bank).
    """
    import time

    from .datasets import load_dataset
    from .signatures import SignaturePack, signature, signature_key

    t0 = time.perf_counter()
    if bank.path is None:
        raise ValueError("pack_bank() needs a bank on disk (Bank(DIR)), not one in memory")
    root = Path(bank.path)
    directory = (root if root.is_dir() else root.parent) / INDEX_DIR
    directory.mkdir(exist_ok=True)
    if not os.access(directory, os.W_OK):
        raise PermissionError(f"{directory}: not writable; a signature pack is stored inside the "
                              f"bank: pack a copy of the bank you can write")
    if embedder is None:
        from .embed import default_embedder

        embedder = default_embedder(progress=False)
    sigs = bank_signatures(bank, embedder=embedder, n=n, seed=seed, packs=[], progress=progress)
    entries, ids, records = {}, {}, []
    sources = [(k, bank.dataset_path(k)) for k in bank.ids] + [(None, Path(p)) for p in extra]
    for i, (bid, path) in enumerate(sources):
        ds = load_dataset(path, what="input+output").subsample(n, seed)
        key = signature_key(ds, embedder=embedder)
        entries[key] = sigs[i] if bid is not None else signature(ds, embedder=embedder)
        if bid is not None:
            ids[bid] = key
        records.append({"key": key, "name": ds.name, "rows": len(ds),
                        "source": os.path.relpath(Path(path).resolve(), directory.resolve())})
    target = pack_path(directory, embedder.id, n, seed)
    size = SignaturePack.write(target, entries, {"embedder": embedder.id, "n": n, "seed": seed,
                                                 "ids": ids, "datasets": records})
    packs = [SignaturePack(target)]
    packed = bank_signatures(bank, embedder=embedder, n=n, seed=seed, packs=packs,
                             progress=False)
    index = BankIndex(bank, directory=directory)
    index.distance_matrix(packed, distance, threads=threads, progress=progress)
    index.gram()
    tau = None
    if len(bank) >= 3:
        tau = index.temperature(packed, distance, operator=operator, top_k=top_k, threads=threads)
    total = sum(f.stat().st_size for f in directory.iterdir() if f.suffix == ".npz")
    return {"pack": target, "pack_bytes": size, "signatures": len(entries), "index_bytes": total,
            "tau": tau, "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------
# indexing a bank (the work of `metalora bank index`)


@dataclass
class IndexResult:
    """What :func:`index_bank` did.

    Attributes
    ----------
    index : BankIndex
        The bank's stored index (``D`` and ``G`` written into it).
    signatures : list
        The bank datasets' signatures, in bank order.
    D : ndarray
        The bank distance matrix for ``distance``.
    embedded, reused : int
        Signatures computed in this run / read from the signature cache or a shipped pack.
    executor : str
        Which executor ran the work (``"local"``, ``"ray"``).
    seconds : dict
        Wall time of ``signatures``, ``distances`` (D and G) and ``total``.
    """

    index: BankIndex
    signatures: list
    D: np.ndarray
    embedded: int = 0
    reused: int = 0
    executor: str = "local"
    seconds: Dict[str, float] = field(default_factory=dict)


def index_bank(bank: Bank, *, distance: str = "sinkhorn", tokenizer=None, embedder=None,
               n: Optional[int] = DEFAULT_N, seed: int = DEFAULT_SEED, cache: Any = True,
               threads: int = 0, progress: Optional[bool] = True, gram: bool = True,
               executor: Optional[Executor] = None,
               ray: Union[None, bool, str] = None) -> IndexResult:
    """Index ``bank`` for ``distance``: the signatures of its datasets (signature cache), the
    bank distance matrix :math:`D` and the parameter Gram matrix :math:`G` (in its
    :class:`BankIndex`), what ``metalora bank index BANK`` does.

    Parameters
    ----------
    bank : Bank
    distance : str
        The metric of :math:`D` (its signature kind decides embedding vs token signatures;
        token distances need ``tokenizer``).
    embedder, n, seed, cache : optional
        As for :func:`bank_signatures`.
    threads : int
        Kernel threads of the local distance computations (0: all cores).
    gram : bool
        Also compute and store :math:`G` (here: it reads every adapter's weights).
    executor : Executor, optional
        Where the missing embedding signatures and the row blocks of :math:`D` are computed:
        :class:`LocalExecutor` (default) or a :class:`~metalora.bank_index_ray.RayExecutor`
        (``executor_for(ray=True)``). Every executor gives the same signatures (bit for bit:
        the Ray actors run ONNX Runtime with the local thread count) and the same :math:`D`;
        the index files are the same. An executor passed in is not closed here.
    ray : bool or str, optional
        Shortcut for ``executor=executor_for(ray=ray)`` (closed on return): ``True`` starts a
        local Ray instance, a string is the address of a cluster.

    Returns
    -------
    IndexResult
    """
    from .distances import get_metric

    if executor is not None and ray not in (None, False):
        raise ValueError("pass executor= or ray=, not both")
    spec = get_metric(distance)
    kind = spec.kind.signature
    if kind == "tokens" and tokenizer is None:
        raise ValueError(f"distance {distance!r} compares token ids: pass tokenizer= (the base "
                         f"model's tokenizer.json)")
    own = executor is None
    ex = executor_for(ray) if own else executor
    try:
        t0 = time.perf_counter()
        log: dict = {}
        sigs = bank_signatures(bank, kind=kind, embedder=embedder, tokenizer=tokenizer,
                               cache=cache, n=n, seed=seed, progress=bool(progress),
                               executor=ex, log=log)
        t1 = time.perf_counter()
        index = BankIndex(bank)

        def compute(s, metric, params, blocks):
            return ex.distance_blocks(s, metric, params, blocks, threads=threads,
                                      progress=progress)

        D = index.distance_matrix(sigs, distance, threads=threads, progress=progress,
                                  compute_blocks=compute,
                                  pairs_per_block=ex.pairs_per_block)
        if gram:
            index.gram()
        t2 = time.perf_counter()
    finally:
        if own:
            ex.close()
    return IndexResult(index=index, signatures=sigs, D=D, embedded=log.get("embedded", 0),
                       reused=log.get("reused", len(sigs)), executor=ex.name,
                       seconds={"signatures": t1 - t0, "distances": t2 - t1, "total": t2 - t0})
