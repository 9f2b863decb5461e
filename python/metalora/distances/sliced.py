r"""Sliced Wasserstein distance: 1-D Wasserstein distances along random directions."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _core
from ._validate import as_cloud_pair, as_weights, check_positive_int, check_threads
from .registry import POINT_CLOUD, Metric, register_metric

__all__ = ["random_projections", "sliced_wasserstein"]


def random_projections(d: int, n_projections: int, seed: int | None = 0,
                       dtype: Any = np.float64) -> np.ndarray:
    """Unit directions of ``sliced_wasserstein``: ``[d, n_projections]``, column ``l`` is
    ``z / |z|`` for the ``l``-th column ``z`` of ``np.random.default_rng(seed).standard_normal((d,
    n_projections))``. Pass the result as ``projections=`` to POT to use the same ones."""
    rng = np.random.default_rng(seed)
    P = rng.standard_normal((int(d), int(n_projections)))
    P /= np.linalg.norm(P, axis=0, keepdims=True)
    return P.astype(dtype)


def sliced_wasserstein(X: Any, Y: Any, *, n_projections: int = 128, p: float = 2, seed: int | None = 0,
                       projections: Any = None, a: Any = None, b: Any = None, log: bool = False,
                       threads: int = 0):
    r"""Sliced Wasserstein distance (Monte-Carlo over random directions).

    .. math:: SW_p(\alpha, \beta) = \Big(\frac1L \sum_{l=1}^{L}
              W_p^p(\theta_l^\#\alpha, \theta_l^\#\beta)\Big)^{1/p},

    where :math:`\theta_l^\#\alpha` is the 1-D measure of the projections
    :math:`\langle x_i, \theta_l\rangle` with weights :math:`a`, and the 1-D :math:`W_p^p` is
    :math:`\int_0^1 |F^{-1}(t) - G^{-1}(t)|^p dt` (exact, via sorted quantiles). The same
    definition as POT's ``ot.sliced_wasserstein_distance``. Projections are a GEMM kernel;
    the sorts run in parallel over directions.

    Parameters
    ----------
    X, Y : ndarray [n, d], [m, d]   (float32 or float64)
    n_projections : int
    p : float >= 1
    seed : int or None
        Directions are ``random_projections(d, n_projections, seed)``.
    projections : ndarray [d, L], optional
        Explicit directions (columns, POT's layout); overrides ``n_projections`` and ``seed``.
    a, b : ndarray, optional
        Weights (uniform by default).
    log : bool
        Also return ``{"projected": W_p^p per direction, "projections": [d, L]}``.
    """
    X, Y = as_cloud_pair(X, Y)
    d = X.shape[1]
    if projections is None:
        P = random_projections(d, check_positive_int(n_projections, "n_projections"), seed)
    else:
        P = np.asarray(projections, dtype=np.float64)
        if P.ndim != 2 or P.shape[0] != d or P.shape[1] < 1:
            raise ValueError(f"projections must have shape [d={d}, L], got {P.shape}")
        if not np.isfinite(P).all():
            raise ValueError("projections contain NaN or Inf")
    p = float(p)
    if not p >= 1:
        raise ValueError(f"p must be >= 1, got {p!r}")
    aw = None if a is None else as_weights(a, X.shape[0], "a")
    bw = None if b is None else as_weights(b, Y.shape[0], "b")
    Pt = np.ascontiguousarray(P.T, dtype=X.dtype)
    proj = _core.dist_sliced(X, Y, aw, bw, Pt, p, check_threads(threads))
    value = float(np.mean(proj) ** (1.0 / p))
    if log:
        return value, {"projected": proj, "projections": P}
    return value


register_metric(Metric(
    name="sliced_wasserstein", kind=POINT_CLOUD, pair=sliced_wasserstein, symmetric=True,
    options=("n_projections", "p", "seed", "projections"), pinned=("seed",)))
