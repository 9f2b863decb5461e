r"""The paper's token distances (arXiv:2507.01806) on token-id samples and vocabulary histograms:
1-D Wasserstein ("WD"), KL, Jensen-Shannon and the multiscale-kernel MMD."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _core
from ._validate import as_bandwidths, as_density, as_sample1d, check_positive_int, check_threads
from .kernel import KIND_MULTISCALE, MULTISCALE_SCALES, mmd_from_sums
from .registry import TOKEN_HISTOGRAM, TOKEN_IDS, Metric, register_metric

__all__ = ["wasserstein_1d", "token_histogram", "kl_divergence", "js_divergence", "token_mmd"]


def _w1d_weights(w: Any, n: int, what: str) -> np.ndarray | None:
    if w is None:
        return None
    w = np.ascontiguousarray(np.asarray(w, dtype=np.float64).reshape(-1))
    if w.size != n:
        raise ValueError(f"{what}: {w.size} weights for {n} values")
    if not np.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"{what}: weights must be finite, non-negative, with a positive sum")
    return w


def wasserstein_1d(u: Any, v: Any, u_weights: Any = None, v_weights: Any = None, *,
                   p: float = 1) -> float:
    r"""Wasserstein-p distance between two 1-D samples, like ``scipy.stats.wasserstein_distance``.

    .. math:: W_p = \Big(\int_0^1 |F_u^{-1}(t) - F_v^{-1}(t)|^p\,dt\Big)^{1/p},
              \qquad W_1 = \int |F_u(x) - F_v(x)|\,dx.

    The paper's "WD" on token ids: ``wasserstein_1d(ids_P, ids_Q)`` with ids as real numbers.
    Weights need not be normalised (scipy's convention). Computed in float64 (sort + merge).
    """
    u = as_sample1d(u, "u")
    v = as_sample1d(v, "v")
    uw = _w1d_weights(u_weights, u.size, "u_weights")
    vw = _w1d_weights(v_weights, v.size, "v_weights")
    p = float(p)
    if not p >= 1:
        raise ValueError(f"p must be >= 1, got {p!r}")
    return float(_core.dist_w1d(u, v, uw, vw, p) ** (1.0 / p))


def token_histogram(ids: Any, vocab_size: int) -> np.ndarray:
    """Counts of each token id in ``[0, vocab_size)`` (float64), the paper's histogram."""
    ids = np.asarray(ids).reshape(-1)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"token ids must be integers, got {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}); got [{ids.min()}, {ids.max()}]")
    return np.bincount(ids, minlength=int(vocab_size)).astype(np.float64)


def _hist_pair(p: Any, q: Any, smoothing: float) -> tuple:
    p, q = as_density(p, "p"), as_density(q, "q")
    if p.size != q.size:
        raise ValueError(f"histograms have different lengths ({p.size} and {q.size}); use the same "
                         f"vocabulary size")
    if not smoothing >= 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing!r}")
    return p + smoothing, q + smoothing


def kl_divergence(p: Any, q: Any, *, smoothing: float = 1e-10) -> float:
    r"""KL divergence of two vocabulary histograms, the paper's recipe.

    Each histogram is normalised to a density, ``smoothing`` is added to every bin (no
    renormalisation), and :math:`\mathrm{KL}(p\|q) = \sum_k p_k \log(p_k / q_k)` (natural log).
    Asymmetric: the paper's row i uses :math:`\mathrm{KL}(P_i \| P_j)`. float64.
    """
    p, q = _hist_pair(p, q, smoothing)
    return float(np.sum(p * (np.log(p) - np.log(q))))


def js_divergence(p: Any, q: Any, *, smoothing: float = 1e-10) -> float:
    r"""Jensen-Shannon divergence :math:`\tfrac12\mathrm{KL}(p\|m) + \tfrac12\mathrm{KL}(q\|m)`,
    :math:`m = (p + q)/2`, on smoothed densities as in :func:`kl_divergence` (the divergence,
    not its square root; natural log)."""
    p, q = _hist_pair(p, q, smoothing)
    m = 0.5 * (p + q)
    lm = np.log(m)
    return float(0.5 * np.sum(p * (np.log(p) - lm)) + 0.5 * np.sum(q * (np.log(q) - lm)))


def token_mmd(x_ids: Any, y_ids: Any, *, n_samples: int = 1000, seed: int | None = 0,
              scales: Any = MULTISCALE_SCALES, threads: int = 0) -> float:
    r"""The paper's token MMD: biased MMD² with the multiscale kernel
    :math:`k(x, y) = \sum_{a} a^2/(a^2 + (x - y)^2)`, :math:`a \in \{0.2, 0.5, 0.9, 1.3\}`, on
    ``n_samples`` ids drawn with replacement from each sample (token ids as real numbers).
    Sampling: ``rng = np.random.default_rng(seed)``; ``rng.choice(x_ids, n_samples)`` then
    ``rng.choice(y_ids, n_samples)``. Squared differences are exact (direct 1-D kernel, float64).
    """
    x = as_sample1d(x_ids, "x_ids")
    y = as_sample1d(y_ids, "y_ids")
    n_samples = check_positive_int(n_samples, "n_samples")
    s = as_bandwidths(scales, MULTISCALE_SCALES, "scales")
    rng = np.random.default_rng(seed)
    xs = np.ascontiguousarray(rng.choice(x, n_samples).reshape(-1, 1))
    ys = np.ascontiguousarray(rng.choice(y, n_samples).reshape(-1, 1))
    sxx, syy, sxy = _core.dist_kernel_sums(xs, ys, KIND_MULTISCALE, list(s * s),
                                           check_threads(threads))
    return mmd_from_sums(sxx, syy, sxy, xs.shape[0], ys.shape[0], float(s.size), False)


register_metric(Metric(name="wasserstein_1d", kind=TOKEN_IDS, pair=wasserstein_1d, symmetric=True,
                       options=("p",)))
# token_mmd draws its two samples in argument order: symmetric in distribution, not exactly
# (a bank against itself mirrors the pairs computed above the diagonal)
register_metric(Metric(name="token_mmd", kind=TOKEN_IDS, pair=token_mmd, symmetric=True,
                       options=("n_samples", "seed", "scales"), pinned=("seed",)))
register_metric(Metric(name="kl", kind=TOKEN_HISTOGRAM, pair=kl_divergence, symmetric=False,
                       options=("smoothing",)))
register_metric(Metric(name="js", kind=TOKEN_HISTOGRAM, pair=js_divergence, symmetric=True,
                       options=("smoothing",)))
