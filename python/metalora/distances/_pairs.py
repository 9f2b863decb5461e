"""Evaluating a metric over the pairs of a block of a distance matrix (package-internal)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from .. import _core
from .._progress import Progress


def evaluate(pairs: Sequence[Tuple[int, int]], sigs: Sequence[Any], fn: Callable, threads: int,
             progress: Optional[bool], desc: str) -> list:
    """``[fn(sigs[i], sigs[j], t) for i, j in pairs]``, parallel over pairs (each call
    single-threaded, ``t = 1``; the kernels release the GIL). With one pair, or one thread, the
    calls run in order with ``t`` = all the threads. A progress bar is shown from 1000 pairs on
    unless ``progress`` says otherwise."""
    nt = int(_core.resolve_threads(threads))
    show = (len(pairs) >= 1000) if progress is None else bool(progress)
    bar = Progress(len(pairs), desc, "pair", show)
    out: list = [0.0] * len(pairs)
    try:
        if nt <= 1 or len(pairs) <= 1:
            for k, (i, j) in enumerate(pairs):
                out[k] = fn(sigs[i], sigs[j], nt)
                bar.update()
        else:
            def task(k: int) -> None:
                i, j = pairs[k]
                out[k] = fn(sigs[i], sigs[j], 1)

            with ThreadPoolExecutor(max_workers=nt) as pool:
                for _ in pool.map(task, range(len(pairs))):
                    bar.update()
    finally:
        bar.close()
    return out


@dataclass(frozen=True)
class Block:
    """The pairs that make the block ``rows x cols`` of a distance matrix.

    ``sigs`` is ``rows + cols`` (``rows`` alone when ``cols`` is None, the rows against
    themselves) and ``pairs`` index it. A symmetric metric of the rows against themselves is
    computed once per unordered pair, the diagonal included, and mirrored. ``row_range``
    ``(a, b)`` (rows against themselves only) keeps the rows ``a <= i < b`` of that matrix: the
    same pairs as the whole matrix computes for them, entries it would mirror from rows outside
    the range left NaN (see :func:`metalora.bank_index.assemble_blocks`).
    """

    sigs: list
    shape: Tuple[int, int]
    pairs: List[Tuple[int, int]]
    offset: int
    mirror: bool
    row0: int = 0

    @classmethod
    def of(cls, rows: list, cols: Optional[list], symmetric: bool,
           row_range: Optional[Tuple[int, int]] = None) -> "Block":
        R = len(rows)
        if cols is None:
            a, b = (0, R) if row_range is None else row_range
            if symmetric:
                pairs = [(i, j) for i in range(a, b) for j in range(i, R)]
            else:
                pairs = [(i, j) for i in range(a, b) for j in range(R)]
            return cls(list(rows), (b - a, R), pairs, 0, symmetric, a)
        if row_range is not None:
            raise ValueError("row_range applies to a bank against itself (cols=None)")
        C = len(cols)
        pairs = [(i, R + j) for i in range(R) for j in range(C)]
        return cls(list(rows) + list(cols), (R, C), pairs, R, False)

    def matrix(self, values: Sequence[float]) -> np.ndarray:
        """The block ``[rows, cols]`` (float64) from one value per pair."""
        D = np.full(self.shape, np.nan)
        a, b = self.row0, self.row0 + self.shape[0]
        for (i, j), v in zip(self.pairs, values):
            D[i - a, j - self.offset] = v
            if self.mirror and a <= j < b:
                D[j - a, i] = v
        return D


def pair_block(fn: Callable, rows: list, cols: Optional[list], *, symmetric: bool, threads: int,
               progress: Optional[bool], desc: str,
               row_range: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """``D[i, j] = fn(rows[i], cols[j], t)`` (``cols`` None: the rows against themselves;
    ``row_range``: only those rows of it, see :class:`Block`)."""
    block = Block.of(rows, cols, symmetric, row_range)
    return block.matrix(evaluate(block.pairs, block.sigs, fn, threads, progress, desc))
