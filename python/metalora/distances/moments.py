r"""Moment-based distances: the Fréchet (Gaussian W2) distance and the cosine of the means."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .. import _core
from .._dispatch import one_blas_thread
from ._pairs import pair_block
from ._validate import as_cloud_pair, check_threads
from .registry import POINT_CLOUD, Metric, register_metric

__all__ = ["gaussian_w2", "mean_cosine"]

_DOT = 2  # the cost kernel's plain product A @ B.T


def _gaussian_stats(X: np.ndarray, ddof: int) -> tuple:
    """Mean, the transposed factor F = A^T of Sigma = A A^T ([r, d], r = min(n, d), C-contiguous),
    and trace(Sigma)."""
    X = X.astype(np.float64)
    n, d = X.shape
    if n - ddof <= 0:
        raise ValueError(f"gaussian_w2 needs more than ddof={ddof} points, got {n}")
    mu = X.mean(axis=0)
    Xc = X - mu
    if n <= d:
        F = np.ascontiguousarray(Xc / np.sqrt(n - ddof))
    else:
        S = Xc.T @ Xc / (n - ddof)
        w, V = np.linalg.eigh(S)
        F = np.ascontiguousarray((V * np.sqrt(np.clip(w, 0.0, None))).T)
    return mu, F, float((F * F).sum())


def _dot_t(A: np.ndarray, B: np.ndarray, threads: int) -> np.ndarray:
    """A @ B.T in float64 by the GEMM kernel (no BLAS threads: on busy cores OpenBLAS's
    spinning threads made these small products 10x slower than one core)."""
    out = np.empty((A.shape[0], B.shape[0]))
    _core.dist_cost(A, B, _DOT, out, threads)
    return out


def _gaussian_w2_stats(s1: tuple, s2: tuple, threads: int = 0) -> float:
    mu1, F1, t1 = s1
    mu2, F2, t2 = s2
    # ||M||_* with M = A1^T A2 = F1 F2^T: the square roots of the eigenvalues of M M^T (a
    # symmetric eigenproblem of the smaller side: about 3x faster than an SVD).
    M = _dot_t(F1, F2, threads)
    if M.shape[0] > M.shape[1]:
        M = np.ascontiguousarray(M.T)
    G = _dot_t(M, M, threads)
    nuc = np.sqrt(np.clip(np.linalg.eigvalsh(G), 0.0, None)).sum()
    return float(max(((mu1 - mu2) ** 2).sum() + t1 + t2 - 2.0 * nuc, 0.0))


def gaussian_w2(X: Any, Y: Any, *, ddof: int = 1, threads: int = 0) -> float:
    r"""Squared 2-Wasserstein (Fréchet) distance between the Gaussians fitted to two clouds.

    .. math:: W_2^2 = \|\mu_1 - \mu_2\|^2 + \operatorname{tr}\big(\Sigma_1 + \Sigma_2
              - 2(\Sigma_2^{1/2}\Sigma_1\Sigma_2^{1/2})^{1/2}\big)

    (what FID reports). The trace of the matrix square root equals the nuclear norm
    :math:`\|A_1^T A_2\|_*` for any factors :math:`\Sigma_k = A_k A_k^T`; we take
    :math:`A = X_c^T/\sqrt{n - \mathrm{ddof}}` when :math:`n \le d` (the square roots of the
    eigenvalues of :math:`M M^T`, :math:`M = A_1^T A_2` of size :math:`n_1\times n_2`; no
    :math:`d\times d` square root) and an eigen-factor otherwise. float64 throughout.
    ``ddof=1``: sample covariances (as ``np.cov``).
    """
    X, Y = as_cloud_pair(X, Y)
    return _gaussian_w2_stats(_gaussian_stats(X, ddof), _gaussian_stats(Y, ddof),
                              check_threads(threads))


def mean_cosine(X: Any, Y: Any) -> float:
    r"""Cosine distance between the means: :math:`1 - \cos(\bar x, \bar y)` (the retrieval
    baseline). Returns 1 when a mean is the zero vector. float64."""
    X, Y = as_cloud_pair(X, Y)
    mx = X.mean(axis=0, dtype=np.float64)
    my = Y.mean(axis=0, dtype=np.float64)
    den = np.linalg.norm(mx) * np.linalg.norm(my)
    return float(1.0 - (mx @ my) / den) if den > 0 else 1.0



def _gaussian_bank(rows: list, cols: Optional[list], options: dict, threads: int,
                   progress: Optional[bool], row_range: Optional[tuple] = None) -> np.ndarray:
    """The bank path of ``gaussian_w2``: each signature's statistics computed once; the pairs
    call LAPACK from several threads, so one BLAS thread each."""
    row_stats = [_gaussian_stats(s, options["ddof"]) for s in rows]
    col_stats = None if cols is None else [_gaussian_stats(s, options["ddof"]) for s in cols]
    with one_blas_thread():
        return pair_block(_gaussian_w2_stats, row_stats, col_stats, symmetric=True,
                          threads=threads, progress=progress, desc="gaussian_w2",
                          row_range=row_range)


def _mean_cosine_bank(rows: list, cols: Optional[list], options: dict, threads: int,
                      progress: Optional[bool], row_range: Optional[tuple] = None) -> np.ndarray:
    """The bank path of ``mean_cosine``: one product of the matrices of means (a row block is
    sliced from the whole product, which is cheap, so that its bits are the whole matrix's)."""
    if row_range is not None:
        return _mean_cosine_bank(rows, cols, options, threads, progress)[slice(*row_range)]
    mr = np.stack([r.mean(axis=0, dtype=np.float64) for r in rows])
    mc = np.stack([c.mean(axis=0, dtype=np.float64) for c in (rows if cols is None else cols)])
    nr, nc = np.linalg.norm(mr, axis=1), np.linalg.norm(mc, axis=1)
    den = nr[:, None] * nc[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 1.0 - (mr @ mc.T) / np.where(den > 0, den, 1.0), 1.0)


register_metric(Metric(name="gaussian_w2", kind=POINT_CLOUD, pair=gaussian_w2,
                       symmetric=True, options=("ddof",), bank=_gaussian_bank))
register_metric(Metric(name="mean_cosine", kind=POINT_CLOUD, pair=mean_cosine,
                       symmetric=True, bank=_mean_cosine_bank))
