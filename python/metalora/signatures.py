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

from ._io import atomic_write
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
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            warnings.warn(f"signature cache file {p} is unreadable ({exc}); recomputing",
                          RuntimeWarning, stacklevel=2)
            self.misses += 1
            return None
        meta = arrays.get("__key__")
        if meta is None or bytes(meta).decode("ascii", "replace") != key:
            warnings.warn(f"signature cache file {p} does not hold key {key}; recomputing",
                          RuntimeWarning, stacklevel=2)
            self.misses += 1
            return None
        self.hits += 1
        arrays.pop("__key__", None)
        return arrays

    def store(self, key: str, arrays: Dict[str, np.ndarray],
              meta: Optional[Dict[str, Any]] = None) -> Path:
        """Write ``arrays`` under ``key`` atomically (temporary file in the same folder + rename)."""
        p = self.path(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = {k: np.asarray(v) for k, v in arrays.items()}
        if "__key__" in payload or "__meta__" in payload:
            raise ValueError("array names __key__ and __meta__ are reserved")
        payload["__key__"] = np.frombuffer(key.encode("ascii"), np.uint8)
        payload["__meta__"] = np.frombuffer(
            json.dumps(meta or {}, sort_keys=True, default=str).encode("utf-8"), np.uint8)
        atomic_write(p, lambda f: np.savez(f, **payload))
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
                if f.suffix == ".npz" or f.suffix == ".tmp":
                    f.unlink(missing_ok=True)
                    n += 1
        return n


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
            if hit is not None and "points" in hit:
                return hit["points"]
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
        if hit is not None and {"ids", "offsets", "vocab_size"} <= set(hit):
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
