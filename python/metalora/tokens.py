"""The paper's token-level dataset signature (arXiv:2507.01806, section "dataset signature").

Every example's ``input + output`` is tokenized with the *base LLM's* tokenizer; all token ids of
the dataset together form one 1-D sample (used by WD and MMD as real numbers) and a histogram
over the vocabulary (used by KL and JS). This is the representation the paper's distances use;
metalora's embedding signatures (:mod:`metalora.embed`) are the alternative.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .datasets import as_texts

__all__ = ["TokenSignature", "token_signature", "load_tokenizer"]

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class TokenSignature:
    """All token ids of a dataset under one tokenizer.

    Attributes
    ----------
    ids : ndarray, int32, shape (N,)
        Concatenated token ids of every example, in dataset order.
    offsets : ndarray, int64, shape (n_examples + 1,)
        ``ids[offsets[i]:offsets[i+1]]`` are example i's tokens.
    vocab_size : int
        Size of the tokenizer's vocabulary (added tokens included): the histogram length.
    tokenizer_id : str
        sha256 of the ``tokenizer.json`` text (what a cache key needs).
    """

    ids: np.ndarray
    offsets: np.ndarray
    vocab_size: int
    tokenizer_id: str = ""

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_examples(self) -> int:
        return int(self.offsets.shape[0] - 1)

    def histogram(self, *, density: bool = False, eps: float = 0.0) -> np.ndarray:
        """Counts of every token id, length ``vocab_size``.

        ``density=True`` returns ``(counts + eps) / Σ(counts + eps)`` as float64; the paper's KL/JS
        use ``eps=1e-10`` added to every bin of the density histogram.
        """
        counts = np.bincount(self.ids, minlength=self.vocab_size).astype(np.int64)
        if not density:
            if eps:
                raise ValueError("eps only applies with density=True")
            return counts
        p = counts.astype(np.float64)
        total = p.sum()
        if total <= 0:
            raise ValueError("empty token signature")
        p /= total
        if eps:
            p += eps
            p /= p.sum()
        return p

    def sample(self, size: int, *, seed: int = 0, replace: bool = True) -> np.ndarray:
        """``size`` ids drawn from the sample (the paper's MMD uses 1000 with replacement)."""
        rng = np.random.default_rng(seed)
        return self.ids[rng.choice(self.ids.shape[0], size=size, replace=replace)]


def load_tokenizer(tokenizer, *, max_length: Optional[int] = None):
    """A private ``tokenizers.Tokenizer`` and its id; the one loader of the token signatures and
    of :class:`metalora.Embedder`.

    Parameters
    ----------
    tokenizer : path or tokenizers.Tokenizer
        A ``tokenizer.json``, a directory holding one, or a ``Tokenizer`` (copied: the copy's
        padding and truncation are set here).
    max_length : int, optional
        Truncate every encoding at this many tokens (special tokens included); None: no
        truncation. Never padded.

    Returns
    -------
    (Tokenizer, str)
        The tokenizer and the sha256 (hex) of its definition: the bytes of the file, or
        ``Tokenizer.to_str()`` encoded in UTF-8 (what cache keys hash).
    """
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        data = tokenizer.to_str().encode("utf-8")
    else:
        p = Path(tokenizer)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {p}")
        data = p.read_bytes()
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception; bad UTF-8 a UnicodeError
        where = "the tokenizer given" if isinstance(tokenizer, Tokenizer) else str(p)
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{where}: not a valid tokenizer.json ({first}); give the base "
                         f"model's tokenizer.json (a Hugging Face tokenizers file)") from None
    tok.no_padding()
    if max_length is None:
        tok.no_truncation()
    else:
        tok.enable_truncation(max_length=int(max_length))
    return tok, hashlib.sha256(data).hexdigest()


def token_signature(texts, tokenizer, *, add_special_tokens: bool = False,
                    batch_size: int = 4096) -> TokenSignature:
    """Token ids of every text under ``tokenizer`` (no truncation).

    Parameters
    ----------
    texts : sequence of str, or a :class:`metalora.Dataset`
        For a Dataset, ``dataset.texts()`` (by default ``input`` and ``output`` joined by its
        template — the paper tokenizes ``input + output``).
    tokenizer : path to ``tokenizer.json`` (or its directory), or ``tokenizers.Tokenizer``
        The base LLM's tokenizer.
    add_special_tokens : bool
        Add BOS/EOS etc. per example. Off by default: a constant token per example only adds a
        spike shared by every dataset.

    Returns
    -------
    TokenSignature
    """
    texts = as_texts(texts, "token_signature()")
    if not texts:
        raise ValueError("token_signature() of an empty dataset")
    tok, tid = load_tokenizer(tokenizer)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    chunks = []
    lengths = np.empty(len(texts), np.int64)
    for s in range(0, len(texts), batch_size):
        encs = tok.encode_batch(texts[s:s + batch_size], add_special_tokens=add_special_tokens)
        for j, e in enumerate(encs):
            a = np.asarray(e.ids, dtype=np.int32)
            lengths[s + j] = a.shape[0]
            chunks.append(a)
    ids = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
    offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if ids.size and int(ids.max()) >= vocab:
        vocab = int(ids.max()) + 1
    return TokenSignature(ids=ids, offsets=offsets, vocab_size=int(vocab), tokenizer_id=tid)
