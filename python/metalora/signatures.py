"""Dataset signatures and their on-disk cache.

``dataset -> signature``: an embedding signature is the point cloud ``Embedder.embed(texts)``
([n, 384] float32, the uniform measure on its rows); a token signature is the paper's 1-D sample of
token ids (:class:`metalora.TokenSignature`). Bank datasets are embedded once: signatures are
stored under a key that hashes (the embedded texts, the embedder's id, the options), so changing
any of them computes a new signature, and an unchanged one is read back in milliseconds.

Files are written to a temporary name in the cache directory and renamed into place
(``os.replace`` is atomic on POSIX and Windows), so readers never see half a file and concurrent
writers of the same key leave one complete file. A file that cannot be read back is treated as a
miss and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from ._io import atomic_write, pid_alive, temp_owner
from .datasets import Dataset, load_dataset
from .tokens import TokenSignature, load_tokenizer, token_signature

__all__ = ["SignatureCache", "SignaturePack", "SignaturePackError", "signature",
           "signature_key", "EmbeddingJob", "embedding_job", "cached_points", "store_points", "default_cache_dir", "SIGNATURE_KINDS", "DEFAULT_N", "DEFAULT_SEED"]

SIGNATURE_KINDS = ("embedding", "tokens")
_FORMAT_VERSION = 1

#: Examples per dataset signature used by every command and by :func:`metalora.generate` /
#: :func:`metalora.bank_index.bank_signatures` (bank AND query): a seeded subsample
#: (:meth:`Dataset.subsample`, ``DEFAULT_SEED``) of larger datasets, all examples of smaller
#: ones. On the quality benchmark's 52 tasks, 256 examples rank the built-in bank almost as the
#: full datasets do (Spearman 0.996, top-16 sets 97 % the same; a 1000-example query cut to 256
#: keeps its top-16 set: ``bench/results_first_run.md``) and cap the query's embedding and
#: Sinkhorn cost. ``n=None`` uses every example.
DEFAULT_N = 256
DEFAULT_SEED = 0
PathLike = Union[str, os.PathLike]


def default_cache_dir() -> Path:
    """``$METALORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/metalora``, else ``~/.cache/metalora``;
    signatures go in its ``signatures/`` folder."""
    env = os.environ.get("METALORA_CACHE_DIR")
    if env:
        return Path(env).expanduser() / "signatures"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "metalora" / "signatures"


class SignatureCache:
    """A directory of signatures, one ``<key>.npz`` file each.

    Parameters
    ----------
    directory : path, optional
        Created on first write. Defaults to :func:`default_cache_dir`.

    Attributes
    ----------
    hits, misses : int
        Lookups answered from disk / not found (or unreadable) since creation.
    """

    def __init__(self, directory: Optional[PathLike] = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"SignatureCache({str(self.directory)!r}, hits={self.hits}, misses={self.misses})"

    @staticmethod
    def key(**parts: Any) -> str:
        """sha256 (hex) of the canonical JSON of ``parts`` (sorted keys)."""
        blob = json.dumps({"format": _FORMAT_VERSION, **parts}, sort_keys=True,
                          separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(blob.encode("ascii")).hexdigest()

    def path(self, key: str) -> Path:
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"cache keys are lowercase hex digests, got {key!r}")
        return self.directory / f"{key}.npz"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> Optional[Dict[str, np.ndarray]]:
        """The arrays stored under ``key``, or None (a miss). Unreadable files count as misses."""
        p = self.path(key)
        try:
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (FileNotFoundError, NotADirectoryError):
            self.misses += 1
            return None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            warnings.warn(f"signature cache file {p} is unreadable ({exc}); recomputing",
                          RuntimeWarning, stacklevel=2)
            self.misses += 1
            return None
        meta = arrays.get("__key__")
        problem = None
        if meta is None or bytes(meta).decode("ascii", "replace") != key:
            problem = f"does not hold key {key}"
        elif "__sum__" not in arrays:
            problem = "has no checksum (written by an older metalora, or not by metalora)"
        else:
            stored = bytes(arrays.pop("__sum__")).decode("ascii", "replace")
            arrays.pop("__key__", None)
            if stored != _checksum(key, {k: v for k, v in arrays.items() if k != "__meta__"}):
                problem = "fails its checksum (corrupt or modified)"
        if problem is not None:
            self.discard(key, problem)
            return None
        self.hits += 1
        return arrays

    def discard(self, key: str, problem: str) -> None:
        """Report a bad entry (a RuntimeWarning naming the file and ``problem``), remove it and
        count a miss: the caller recomputes it."""
        p = self.path(key)
        warnings.warn(f"signature cache file {p} {problem}; removed, recomputing",
                      RuntimeWarning, stacklevel=3)
        try:
            p.unlink()
        except OSError:
            pass
        self.misses += 1

    def store(self, key: str, arrays: Dict[str, np.ndarray],
              meta: Optional[Dict[str, Any]] = None) -> Path:
        """Write ``arrays`` under ``key`` atomically (temporary file in the same folder + rename)."""
        p = self.path(key)
        payload = {k: np.asarray(v) for k, v in arrays.items()}
        if {"__key__", "__meta__", "__sum__"} & set(payload):
            raise ValueError("array names __key__, __meta__ and __sum__ are reserved")
        payload["__sum__"] = np.frombuffer(_checksum(key, payload).encode("ascii"), np.uint8)
        payload["__key__"] = np.frombuffer(key.encode("ascii"), np.uint8)
        payload["__meta__"] = np.frombuffer(
            json.dumps(meta or {}, sort_keys=True, default=str).encode("utf-8"), np.uint8)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write(p, lambda f: np.savez(f, **payload))
        except OSError as exc:  # unwritable: the job goes on without caching, said once
            d = str(self.directory.absolute())
            if d not in _UNWRITABLE:
                _UNWRITABLE.add(d)
                why = exc.strerror or exc
                warnings.warn(f"signature cache directory {d} is not writable ({why}); running "
                              f"without caching (set METALORA_CACHE_DIR to a writable "
                              f"directory)", RuntimeWarning, stacklevel=2)
            return None
        return p

    def meta(self, key: str) -> Dict[str, Any]:
        """The metadata dictionary stored with ``key`` (what was hashed, for inspection)."""
        with np.load(self.path(key), allow_pickle=False) as z:
            return json.loads(bytes(z["__meta__"]).decode("utf-8"))

    def clear(self) -> int:
        """Delete every cached signature (and stray temporary files); returns how many."""
        n = 0
        if self.directory.is_dir():
            for f in self.directory.iterdir():
                if f.suffix == ".tmp":  # another process's file being written: leave it
                    owner = temp_owner(f.name)
                    if owner is not None and pid_alive(owner):
                        continue
                if f.suffix == ".npz" or f.suffix == ".tmp":
                    f.unlink(missing_ok=True)
                    n += 1
        return n


_UNWRITABLE: set = set()  # cache directories already reported as unwritable


def _checksum(key: str, arrays: Dict[str, np.ndarray]) -> str:
    """sha256 of the key and of every array's name, dtype, shape and bytes (sorted by name)."""
    h = hashlib.sha256(key.encode("ascii"))
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode("utf-8"))
        h.update(a.tobytes())
    return h.hexdigest()


class SignaturePackError(ValueError):
    """A signature pack cannot be used (unreadable, wrong format, or fails its checksum)."""


_PACK_FORMAT = 1


class SignaturePack:
    r"""Embedding signatures shipped with a bank: read-only, verified, float16.

    A pack is one ``.npz`` file in the bank index (``BANK/metalora-index/signatures-*.npz``,
    written by ``metalora bank index BANK --pack``) holding the point clouds of the bank's
    datasets (and of any extra dataset packed with them) under their signature-cache keys
    (:func:`signature_key`: a hash of the embedded texts, the embedder's id and ``n``). A
    lookup is therefore by content: a dataset edited since, another embedder or another ``n``
    simply misses, and the caller embeds as without a pack.

    The points are stored in float16 and widened to float32 on read. All-MiniLM points have
    unit norm and components below 1, so each stored component carries a relative rounding
    error of at most :math:`u = 2^{-11}` and the squared-Euclidean cost
    :math:`c(x, y) = \|x - y\|^2 = 2 - 2 x\cdot y` of the Sinkhorn metric moves by at most
    :math:`2 u \sum_i |x_i y_i| \le 2u \approx 9.8\cdot 10^{-4}` (Cauchy-Schwarz) per pair
    when one side is rounded. Entropic OT is 1-Lipschitz in the cost's sup norm, so each of the
    three terms of the debiased divergence moves by at most that much (the bank self term by
    at most twice it): :math:`|\Delta S| \le 4u \approx 2\cdot 10^{-3}`. Measured on the
    built-in bank (``bench/signature_n.py --fp16``) the distances move by far less, and the
    top-16 coefficients do not change (``bench/results_first_run.md``).

    Parameters
    ----------
    path : path
        The pack file. Raises :class:`SignaturePackError` (with the reason) when it cannot be
        read, is not a pack, or fails its sha256 checksum (corrupt or modified).

    Attributes
    ----------
    meta : dict
        ``embedder`` (its id), ``n``, ``seed``, ``ids`` (bank id -> key of its dataset),
        ``datasets`` (one record per packed dataset: key, name, rows).
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        try:
            with np.load(self.path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise SignaturePackError(f"signature pack {self.path} is unreadable ({exc})") from None
        need = {"points", "offsets", "keys", "__meta__", "__sum__"}
        if not need <= set(arrays):
            raise SignaturePackError(f"signature pack {self.path} is not a metalora signature "
                                     f"pack (arrays {sorted(arrays)})")
        stored = bytes(arrays.pop("__sum__")).decode("ascii", "replace")
        if stored != _checksum("pack", arrays):
            raise SignaturePackError(f"signature pack {self.path} fails its checksum (corrupt or "
                                     f"modified)")
        try:
            self.meta = json.loads(bytes(arrays["__meta__"]).decode("utf-8"))
        except ValueError as exc:
            raise SignaturePackError(f"signature pack {self.path}: bad metadata ({exc})") from None
        if self.meta.get("format") != _PACK_FORMAT:
            raise SignaturePackError(f"signature pack {self.path} has format "
                                     f"{self.meta.get('format')!r}, this metalora reads "
                                     f"{_PACK_FORMAT}: re-run `metalora bank index BANK --pack`")
        points, offsets = arrays["points"], arrays["offsets"]
        keys = bytes(arrays["keys"]).decode("ascii", "replace")
        m = offsets.shape[0] - 1
        if (points.dtype != np.float16 or points.ndim != 2 or offsets.ndim != 1 or m < 0
                or len(keys) != 64 * m or offsets[0] != 0 or offsets[-1] != points.shape[0]
                or np.any(np.diff(offsets) <= 0)):
            raise SignaturePackError(f"signature pack {self.path} holds inconsistent arrays")
        self._points = points
        self._rows = {keys[64 * i:64 * (i + 1)]: (int(offsets[i]), int(offsets[i + 1]))
                      for i in range(m)}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __repr__(self) -> str:
        return (f"SignaturePack({str(self.path)!r}, {len(self)} signatures, "
                f"embedder={self.meta.get('embedder')!r}, n={self.meta.get('n')})")

    @property
    def embedder(self) -> Optional[str]:
        """Id of the embedder the pack was made with."""
        return self.meta.get("embedder")

    def get(self, key: str) -> Optional[np.ndarray]:
        """The float32 points stored under ``key`` (widened from float16), or None."""
        rows = self._rows.get(key)
        if rows is None:
            return None
        return self._points[rows[0]:rows[1]].astype(np.float32)

    @staticmethod
    def write(path: PathLike, entries: Dict[str, np.ndarray], meta: Dict[str, Any]) -> int:
        """Write ``entries`` (key -> float32 points) as a pack at ``path`` atomically; returns
        its size in bytes. ``meta`` is stored with it (JSON)."""
        keys = list(entries)
        if not keys:
            raise ValueError("a signature pack needs at least one signature")
        for k in keys:
            if len(k) != 64 or any(c not in "0123456789abcdef" for c in k):
                raise ValueError(f"pack keys are sha256 hex digests, got {k!r}")
        clouds = [np.asarray(entries[k], np.float32) for k in keys]
        if any(c.ndim != 2 or c.shape[0] == 0 or c.shape[1] != clouds[0].shape[1] for c in clouds):
            raise ValueError("pack entries must be non-empty [n, dim] point clouds of one dim")
        offsets = np.zeros(len(keys) + 1, np.int64)
        offsets[1:] = np.cumsum([c.shape[0] for c in clouds])
        arrays = {
            "points": np.concatenate(clouds).astype(np.float16),
            "offsets": offsets,
            "keys": np.frombuffer("".join(keys).encode("ascii"), np.uint8),
            "__meta__": np.frombuffer(json.dumps(dict(meta, format=_PACK_FORMAT), sort_keys=True,
                                                 default=str).encode("utf-8"), np.uint8),
        }
        arrays["__sum__"] = np.frombuffer(_checksum("pack", arrays).encode("ascii"), np.uint8)
        path = Path(path)
        atomic_write(path, lambda f: np.savez(f, **arrays))
        return path.stat().st_size


def signature_key(ds: Dataset, *, embedder, what: Optional[str] = None,
                  template: Optional[str] = None) -> str:
    """The cache (and pack) key of the embedding signature of ``ds`` (already subsampled)."""
    return SignatureCache.key(**_embedding_key_parts(ds, embedder, what, template))


def _embedding_key_parts(ds: Dataset, embedder, what: Optional[str],
                         template: Optional[str]) -> Dict[str, Any]:
    return dict(kind="embedding", texts=ds.content_hash(what, template), embedder=embedder.id,
                n=len(ds))


@dataclass(frozen=True)
class EmbeddingJob:
    """One embedding signature to compute, described completely and picklable, so that any
    executor (this process, a Ray actor on another machine) computes it and the driver stores
    it under the same content-addressed key as :func:`signature` does.

    Attributes
    ----------
    key : str
        The signature-cache key (:func:`signature_key`).
    texts : tuple of str
        The texts to embed, in order (the dataset already subsampled): the signature is
        ``embedder.embed(texts)``.
    embedder_id : str
        :attr:`Embedder.id` the key was made with; a worker whose embedder differs refuses the
        job rather than store points under a wrong key.
    meta : dict
        What the cache stores beside the points (the key's parts, the dataset's source, name).
    label : str
        A name for messages (the bank id).
    """

    key: str
    texts: Tuple[str, ...]
    embedder_id: str
    meta: Dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def n(self) -> int:
        """Rows of the signature (one per text)."""
        return len(self.texts)


def embedding_job(data, *, embedder, what: Optional[str] = None,
                  template: Optional[str] = None, n: Optional[int] = None, seed: int = 0,
                  label: str = "") -> EmbeddingJob:
    """The :class:`EmbeddingJob` of ``data`` (a Dataset, a path or a list of texts, as for
    :func:`signature`) subsampled to ``n`` with ``seed``: the same key and texts
    :func:`signature` uses."""
    ds = _as_dataset(data, what).subsample(n, seed)
    parts = _embedding_key_parts(ds, embedder, what, template)
    return EmbeddingJob(key=SignatureCache.key(**parts), texts=tuple(ds.texts(what, template)),
                        embedder_id=embedder.id,
                        meta={**parts, "source": ds.source, "name": ds.name},
                        label=label or str(ds.name or ""))


def cached_points(job: EmbeddingJob, cache: Optional["SignatureCache"],
                  packs: Sequence["SignaturePack"] = ()) -> Optional[np.ndarray]:
    """The job's points from a shipped pack or the cache when present and valid, else None
    (an invalid cache entry is reported and removed)."""
    for pack in packs:
        hit = pack.get(job.key)
        if hit is not None and _valid_points(hit, job.n) is None:
            return hit
    if cache is not None:
        hit = cache.load(job.key)
        if hit is not None:
            bad = _valid_points(hit.get("points"), job.n)
            if bad is None:
                return hit["points"]
            cache.discard(job.key, bad)
    return None


def store_points(job: EmbeddingJob, points: np.ndarray,
                 cache: Optional["SignatureCache"]) -> np.ndarray:
    """Check ``points`` computed for ``job`` and store them in ``cache`` (when given) under the
    job's key; returns them. A ValueError says what is wrong with points that do not fit the
    job (they are not stored)."""
    bad = _valid_points(points, job.n)
    if bad is not None:
        raise ValueError(f"the signature computed for {job.label or job.key[:12]} {bad}")
    if cache is not None:
        cache.store(job.key, {"points": points}, meta=job.meta)
    return points


def _valid_points(x: Any, n: int) -> Optional[str]:
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype != np.float32:
        return "does not hold a 2-D float32 point cloud"
    if x.shape[0] != n or x.shape[1] == 0:
        return f"holds {x.shape[0]} x {x.shape[1]} points, expected {n} rows"
    if not np.isfinite(x).all():
        return "holds NaN or Inf points"
    return None


def _valid_tokens(hit: dict, n: int) -> Optional[str]:
    ids, off, v = hit["ids"], hit["offsets"], hit["vocab_size"]
    if (ids.ndim != 1 or off.ndim != 1 or not np.issubdtype(ids.dtype, np.integer)
            or not np.issubdtype(off.dtype, np.integer) or v.shape != () or off.shape[0] != n + 1):
        return "does not hold a token signature of this dataset"
    if off[0] != 0 or off[-1] != ids.shape[0] or np.any(np.diff(off) < 0) or int(v) <= 0 or (
            ids.size and (ids.min() < 0 or ids.max() >= int(v))):
        return "holds inconsistent token ids or offsets"
    return None


def _resolve_cache(cache) -> Optional[SignatureCache]:
    if cache is None or cache is False:
        return None
    if cache is True:
        return SignatureCache()
    if isinstance(cache, SignatureCache):
        return cache
    return SignatureCache(cache)


def _as_dataset(data, what: Optional[str]) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_dataset(data, what=what or "input+output")
    if isinstance(data, Sequence) and not isinstance(data, (bytes, bytearray)):
        return Dataset.from_pairs(list(data), what="input")
    raise TypeError(
        f"signature() takes a Dataset, a dataset path or a list of texts, "
        f"not {type(data).__name__}"
    )


def signature(data, *, kind: str = "embedding", embedder=None, tokenizer=None,
              what: Optional[str] = None, template: Optional[str] = None,
              n: Optional[int] = None, seed: int = 0, add_special_tokens: bool = False,
              cache: Union[bool, PathLike, SignatureCache, None] = True,
              packs: Sequence["SignaturePack"] = ()):
    """Signature of a dataset, read from the cache when its key is already there.

    Parameters
    ----------
    data : Dataset, path, or list of str
        A path is read with :func:`metalora.load_dataset` defaults; a list of strings is taken
        as the texts themselves.
    kind : {"embedding", "tokens"}
        ``"embedding"``: ``ndarray [n, dim] float32`` of L2-normalised embeddings (metalora's
        signature). ``"tokens"``: :class:`TokenSignature` under ``tokenizer`` (the paper's).
    embedder : Embedder, optional
        For ``kind="embedding"``; defaults to all-MiniLM-L6-v2 (shared between calls).
    tokenizer : path to tokenizer.json or tokenizers.Tokenizer
        Required for ``kind="tokens"``: the base LLM's tokenizer.
    what, template : str, optional
        Override the dataset's choice of text (see :meth:`Dataset.texts`).
    n, seed : int, optional
        Subsample ``n`` examples with ``seed`` before computing (see :meth:`Dataset.subsample`).
    cache : bool, path or SignatureCache
        ``True`` uses :func:`default_cache_dir`; ``False`` computes without storing.
    packs : sequence of SignaturePack
        Shipped signatures consulted (by key) before the cache: a hit is returned as is and not
        copied into the cache (``kind="embedding"`` only).

    Notes
    -----
    The cache key is ``sha256(kind, sha256(texts), embedder.id | tokenizer hash, options)``:
    editing one example, changing the template, the model, the tokenizer, ``max_length`` or ``n``
    gives a new key. Nothing is written when the computation fails.
    """
    if kind not in SIGNATURE_KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {SIGNATURE_KINDS}")
    ds = _as_dataset(data, what).subsample(n, seed)
    store = _resolve_cache(cache)

    if kind == "embedding":
        if embedder is None:
            from .embed import default_embedder

            embedder = default_embedder()
        job = embedding_job(ds, embedder=embedder, what=what, template=template)
        hit = cached_points(job, store, packs)
        if hit is not None:
            return hit
        points = embedder.embed(list(job.texts))
        if store is not None:
            store.store(job.key, {"points": points}, meta=job.meta)
        return points

    if tokenizer is None:
        raise ValueError("kind='tokens' needs tokenizer= (the base model's tokenizer.json)")
    tok, tid = load_tokenizer(tokenizer)
    key_parts = dict(kind=kind, texts=ds.content_hash(what, template), tokenizer=tid,
                     add_special_tokens=bool(add_special_tokens), n=len(ds))
    key = SignatureCache.key(**key_parts)
    if store is not None:
        hit = store.load(key)
        bad = None
        if hit is not None:
            bad = ("does not hold a token signature" if not {"ids", "offsets", "vocab_size"}
                   <= set(hit) else _valid_tokens(hit, len(ds)))
            if bad is not None:
                store.discard(key, bad)
        if hit is not None and bad is None:
            return TokenSignature(ids=hit["ids"], offsets=hit["offsets"],
                                  vocab_size=int(hit["vocab_size"]), tokenizer_id=tid)
    sig = token_signature(ds.texts(what, template), tok, add_special_tokens=add_special_tokens)
    sig = TokenSignature(ids=sig.ids, offsets=sig.offsets, vocab_size=sig.vocab_size,
                         tokenizer_id=tid)
    if store is not None:
        store.store(key, {"ids": sig.ids, "offsets": sig.offsets,
                          "vocab_size": np.int64(sig.vocab_size)},
                    meta={**key_parts, "source": ds.source, "name": ds.name})
    return sig
