"""One dataset against a bank, a bank against itself, any block of a bank's distance matrix:
a metric's record (:mod:`.registry`) applied to many pairs."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import numpy as np

from ._pairs import pair_block
from ._validate import check_threads
from .registry import Metric, get_metric

__all__ = ["distances", "pairwise_distances", "distance_matrix"]


def _checked(m: Metric, sigs: Sequence[Any], start: int = 0) -> list:
    """Each signature checked by the metric's kind (numbered from ``start`` in messages)."""
    return [m.kind.check(s, f"signature {start + k}") for k, s in enumerate(sigs)]


def _matrix(m: Metric, rows: list, cols: Optional[list], options: dict, threads: int,
            progress: Optional[bool], row_range: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """The block rows x cols (cols None: the rows against themselves), float64."""
    options = {**m.defaults, **options}
    if m.bank is not None:
        if row_range is None:
            D = m.bank(rows, cols, options, threads, progress)
        else:
            D = m.bank(rows, cols, options, threads, progress, row_range=row_range)
    else:
        D = pair_block(m.bind(options), rows, cols, symmetric=m.symmetric, threads=threads,
                       progress=progress, desc=m.name, row_range=row_range)
    # a distance is never NaN without an error (a row block leaves the rows it skips NaN)
    bad = np.argwhere(np.isnan(D)) if row_range is None else np.empty((0, 2), int)
    if bad.size:
        i, j = (int(v) for v in bad[0])
        raise ValueError(f"{m.name}: {len(bad)} distance(s) are NaN (first: row {i}, "
                                 f"column {j}) with options {options}; check the signatures "
                                 f"for degenerate data, or change the options (e.g. a larger "
                                 f"eps)")
    return D


def distances(query: Any, bank_signatures: Sequence[Any], *, metric: str, threads: int = 0,
              progress: Optional[bool] = None, **params: Any) -> np.ndarray:
    """Distances from one dataset signature to every signature of a bank.

    Parameters
    ----------
    query : signature
        A point cloud ``[n, d]`` for ``sinkhorn``, ``sliced_wasserstein``, ``mmd``, ``energy``,
        ``gaussian_w2``, ``mean_cosine``; a 1-D token-id sample for ``wasserstein_1d`` and
        ``token_mmd``; a vocabulary histogram for ``kl`` and ``js`` (``METRICS[name].kind``).
    bank_signatures : sequence of signatures of the same kind.
    metric : str
        One of ``METRICS``. ``d[j] = metric(query, bank[j])``; for ``kl`` that is
        :math:`\\mathrm{KL}(\\text{query} \\| \\text{bank}_j)`, the paper's row convention.
    threads : int
        Pairs are computed in parallel, one thread each (0 = all cores).
    progress : bool, optional
        Progress bar (tqdm if installed, else stderr); by default shown from 1000 pairs on.
    **params
        Options of the metric (``METRICS[name].defaults``: e.g. ``eps=0.01`` for sinkhorn,
        ``kernel=`` for mmd); any other raises a ``TypeError`` that lists them.

    Returns
    -------
    ndarray [n_bank] (float64)

    Warns
    -----
    ConvergenceWarning
        Once, with the count of Sinkhorn pairs that reached ``max_iter`` and the largest final
        marginal error.
    """
    m = get_metric(metric)
    params = m.check_options(params)
    bank = list(bank_signatures)
    if not bank:
        raise ValueError("bank_signatures is empty")
    sigs = _checked(m, [query] + bank)
    return _matrix(m, sigs[:1], sigs[1:], params, check_threads(threads), progress)[0]


def pairwise_distances(bank_signatures: Sequence[Any], *, metric: str, threads: int = 0,
                       progress: Optional[bool] = None, rows: Optional[Tuple[int, int]] = None,
                       **params: Any) -> np.ndarray:
    """The bank against itself: ``D[i, j] = metric(bank[i], bank[j])``, ``[K, K]`` float64.

    Symmetric metrics (``METRICS[name].symmetric``) are computed once per unordered pair and
    mirrored; the diagonal is computed too (it is not assumed to be 0: e.g. the unbiased MMD of a
    cloud with itself is not exactly 0). Parallel over pairs with a progress bar on long runs;
    options as in :func:`distances`.

    ``rows=(a, b)`` computes only rows ``a <= i < b`` of that matrix, ``[b - a, K]``: each entry
    bit-identical to the whole matrix's, except the entries a symmetric metric mirrors from a
    pair computed in an earlier row (``j < a``), which are NaN. Row blocks can so be computed
    independently (on other machines) and assembled
    (:func:`metalora.bank_index.assemble_blocks`) into exactly the whole matrix.
    """
    m = get_metric(metric)
    params = m.check_options(params)
    sigs = _checked(m, list(bank_signatures))
    if not sigs:
        raise ValueError("bank_signatures is empty")
    if rows is not None:
        a, b = (int(x) for x in rows)
        if not 0 <= a < b <= len(sigs):
            raise ValueError(f"rows={tuple(rows)} is not a row range [a, b) of a bank of "
                             f"{len(sigs)} signatures (0 <= a < b <= {len(sigs)})")
        rows = (a, b)
    return _matrix(m, sigs, None, params, check_threads(threads), progress, rows)


def distance_matrix(rows: Sequence[Any], cols: Optional[Sequence[Any]] = None, *, metric: str,
                    threads: int = 0, progress: Optional[bool] = None,
                    **params: Any) -> np.ndarray:
    """A block of a distance matrix: ``D[i, j] = metric(rows[i], cols[j])``, float64.

    ``cols=None`` is :func:`pairwise_distances` of ``rows``; one row is :func:`distances` (e.g.
    several new datasets against a bank). ``distance_matrix(bank[a:b], bank)`` computes every
    entry as ``metric(bank[i], bank[j])``, where the whole matrix of a symmetric metric mirrors
    ``metric(bank[j], bank[i])`` below the diagonal (equal up to rounding); for row blocks that
    assemble into exactly the whole matrix use ``pairwise_distances(bank, rows=(a, b))``.
    Signatures are numbered rows first, then cols, in error messages; options as in
    :func:`distances`.
    """
    m = get_metric(metric)
    params = m.check_options(params)
    rows = _checked(m, list(rows))
    if not rows:
        raise ValueError("rows is empty")
    if cols is not None:
        cols = _checked(m, list(cols), start=len(rows))
        if not cols:
            raise ValueError("cols is empty")
    return _matrix(m, rows, cols, params, check_threads(threads), progress)
