r"""The small dense step of the ``svd`` mode, batched over modules (numpy LAPACK, float64).

For one module, ``G_A = A_cat A_cat^T`` and ``G_B = B_cat^T B_cat`` (``R x R``, from the C++
Gram kernel) determine the thin-QR triangles ``R_A``, ``R_B`` (``R^T R = G``); the SVD of the core
``R_B R_A^T = U S V^T`` then gives the best rank-r factors without forming the dense update.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .. import _core
from .._dispatch import one_blas_thread

__all__ = ["gram_root", "core_svd", "small_step"]


def gram_root(G: np.ndarray) -> np.ndarray:
    """R with R^T R = G for a stack of Gram matrices: X = Q R for the X whose Gram G is.

    Cholesky (R = L^T) when every matrix of the stack is positive definite, which is the usual
    case (about 10x cheaper than an eigen-decomposition at R = 128); otherwise, for rank-deficient
    stacks such as twin adapters, the symmetric root diag(sqrt(lambda)) V^T from eigh.
    """
    try:
        return np.swapaxes(np.linalg.cholesky(G), -1, -2)
    except np.linalg.LinAlgError:
        lam, V = np.linalg.eigh(G)
        return np.sqrt(np.clip(lam, 0.0, None))[..., :, None] * np.swapaxes(V, -1, -2)


def core_svd(GA: np.ndarray, GB: np.ndarray, rank: int):
    """Batched small dense step for stacks of R x R Grams.

    Returns PB [.., R, rank] with B_new = B_cat PB, QA [.., rank, R] with A_new = QA A_cat, and
    the singular values of the exact update.
    """
    RB, RA = gram_root(GB), gram_root(GA)
    core = RB @ np.swapaxes(RA, -1, -2)
    # Left singular pairs of the core from the eigen-decomposition of core core^T (about 1.5x
    # cheaper than a full SVD here): S_k = sqrt(lambda_k), accurate to ~eps64 * S_max^2 / S_k
    # relative, far below the float32 outputs for every direction above the noise floor below.
    lam, U = np.linalg.eigh(core @ np.swapaxes(core, -1, -2))
    lam, U = lam[..., ::-1], U[..., ::-1]
    S = np.sqrt(np.clip(lam, 0.0, None))
    Sr = S[..., :rank]
    # Directions below the noise floor get zero factors: relative to the largest singular value
    # (float64 eigen/SVD accuracy) or to sqrt(tr G_A tr G_B) >= ||dW||_F, the scale of the
    # float32 products the update is made of (float32 accuracy). This keeps A_new bounded when
    # the requested rank exceeds the numerical rank, e.g. when weights cancel exactly.
    R = core.shape[-1]
    scale = np.sqrt(np.trace(GA, axis1=-2, axis2=-1) * np.trace(GB, axis1=-2, axis2=-1))
    floor = np.maximum(S[..., :1] * (np.finfo(np.float64).eps * R),
                       scale[..., None] * np.finfo(np.float32).eps)
    tiny = Sr <= floor
    inv = np.where(tiny, 0.0, 1.0 / np.where(tiny, 1.0, Sr))
    Ur = U[..., :, :rank]
    # B_new = Q_B U_r S_r = B_cat R_A^T W_r with W_r = core^T U_r / S_r, i.e. PB = R_A^T core^T U_r / S_r
    # (= R_A^T W_r: the S_r cancels); A_new = W_r^T Q_A^T = U_r^T R_B A_cat / S_r.
    PB = (np.swapaxes(RA, -1, -2) @ (np.swapaxes(core, -1, -2) @ Ur)) * inv[..., None, :]
    QA = inv[..., :, None] * (np.swapaxes(Ur, -1, -2) @ RB)
    return PB, QA, S


def small_step(GA: Sequence[np.ndarray], GB: Sequence[np.ndarray], rank: int, threads: int) -> tuple:
    """:func:`core_svd` over a stack of modules, the stack split across threads: numpy releases
    the GIL in LAPACK, and each part runs single-threaded BLAS (see one_blas_thread)."""
    GA, GB = np.stack(GA), np.stack(GB)
    n = GA.shape[0]
    parts = min(int(_core.resolve_threads(threads)), max(1, n // 8))
    with one_blas_thread():
        if parts <= 1:
            return core_svd(GA, GB, rank)
        from concurrent.futures import ThreadPoolExecutor

        cuts = np.array_split(np.arange(n), parts)
        with ThreadPoolExecutor(max_workers=parts) as pool:
            res = list(pool.map(lambda ix: core_svd(GA[ix], GB[ix], rank), cuts))
    return tuple(np.concatenate([r[k] for r in res]) for k in range(3))
