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
    computed once per unordered pair, the diagonal included, and mirrored.
    """

    sigs: list
    shape: Tuple[int, int]
    pairs: List[Tuple[int, int]]
    offset: int
    mirror: bool

    @classmethod
    def of(cls, rows: list, cols: Optional[list], symmetric: bool) -> "Block":
        R = len(rows)
        if cols is None:
            if symmetric:
                pairs = [(i, j) for i in range(R) for j in range(i, R)]
            else:
                pairs = [(i, j) for i in range(R) for j in range(R)]
            return cls(list(rows), (R, R), pairs, 0, symmetric)
        C = len(cols)
        pairs = [(i, R + j) for i in range(R) for j in range(C)]
        return cls(list(rows) + list(cols), (R, C), pairs, R, False)

    def matrix(self, values: Sequence[float]) -> np.ndarray:
        """The block ``[len(rows), len(cols)]`` (float64) from one value per pair."""
        D = np.empty(self.shape)
        for (i, j), v in zip(self.pairs, values):
            D[i, j - self.offset] = v
            if self.mirror:
                D[j, i] = v
        return D


def pair_block(fn: Callable, rows: list, cols: Optional[list], *, symmetric: bool, threads: int,
               progress: Optional[bool], desc: str) -> np.ndarray:
    """``D[i, j] = fn(rows[i], cols[j], t)`` (``cols`` None: the rows against themselves)."""
    block = Block.of(rows, cols, symmetric)
    return block.matrix(evaluate(block.pairs, block.sigs, fn, threads, progress, desc))
