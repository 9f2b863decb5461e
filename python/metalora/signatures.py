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
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np

from ._io import atomic_write, pid_alive, temp_owner
from .datasets import Dataset, load_dataset
from .tokens import TokenSignature, load_tokenizer, token_signature

__all__ = ["SignatureCache", "signature", "default_cache_dir", "SIGNATURE_KINDS"]

SIGNATURE_KINDS = ("embedding", "tokens")
_FORMAT_VERSION = 1
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
              cache: Union[bool, PathLike, SignatureCache, None] = True):
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

    Notes
    -----
    The cache key is ``sha256(kind, sha256(texts), embedder.id | tokenizer hash, options)``:
    editing one example, changing the template, the model, the tokenizer, ``max_length`` or ``n``
    gives a new key. Nothing is written when the computation fails.
    """
    if kind not in SIGNATURE_KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {SIGNATURE_KINDS}")
    ds = _as_dataset(data, what).subsample(n, seed)
    texts_hash = ds.content_hash(what, template)
    store = _resolve_cache(cache)

    if kind == "embedding":
        if embedder is None:
            from .embed import default_embedder

            embedder = default_embedder()
        key_parts = dict(kind=kind, texts=texts_hash, embedder=embedder.id, n=len(ds))
        key = SignatureCache.key(**key_parts)
        if store is not None:
            hit = store.load(key)
            if hit is not None:
                bad = _valid_points(hit.get("points"), len(ds))
                if bad is None:
                    return hit["points"]
                store.discard(key, bad)
        points = embedder.embed(ds.texts(what, template))
        if store is not None:
            store.store(key, {"points": points},
                        meta={**key_parts, "source": ds.source, "name": ds.name})
        return points

    if tokenizer is None:
        raise ValueError("kind='tokens' needs tokenizer= (the base model's tokenizer.json)")
    tok, tid = load_tokenizer(tokenizer)
    key_parts = dict(kind=kind, texts=texts_hash, tokenizer=tid,
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
