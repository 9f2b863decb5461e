"""Sinkhorn: against POT (same eps and cost), emd2 as eps -> 0, properties, levels, threads,
bad input and non-convergence. POT is a fixture: only the tests that compare with it skip
without it."""

import functools
import warnings

import numpy as np
import pytest

import metalora
from _dist_helpers import LEVELS, cloud, clustered, sqdist64

def _pot_reference(ot, X, Y, a, b, eps):
    M = sqdist64(X, Y)
    plan = ot.sinkhorn(a, b, M, eps, method="sinkhorn_log", numItermax=200000, stopThr=1e-13)
    return M, plan


@pytest.mark.parametrize("n,m,d,kind", [(31, 47, 3, "random"), (40, 25, 384, "random"),
                                         (57, 43, 1, "random"), (45, 52, 3, "clustered")])
def test_matches_pot_float64(ot, n, m, d, kind):
    if kind == "random":
        X, Y = cloud(n, d, 1), cloud(m, d, 2, shift=0.5)
    else:
        X, Y = clustered(n, d, seed=1), clustered(m, d, seed=2)
    rng = np.random.default_rng(3)
    a = rng.uniform(0.5, 1.5, n)
    a /= a.sum()
    b = np.full(m, 1.0 / m)
    M = sqdist64(X, Y)
    eps = 0.05 * float(np.median(M))
    M, ref_plan = _pot_reference(ot, X, Y, a, b, eps)
    ref_cost = float((ref_plan * M).sum())
    value, plan, log = metalora.entropic_ot(X, Y, eps=eps, a=a, b=b, tol=1e-12, max_iter=100000,
                                            return_plan=True, log=True)
    assert log["converged"]
    # float64 throughout: POT's converged value to 1e-6 relative (observed ~1e-10).
    assert log["transport_cost"] == pytest.approx(ref_cost, rel=1e-6)
    np.testing.assert_allclose(plan, ref_plan, rtol=1e-5, atol=1e-12)
    # The full entropic objective <pi, C> + eps KL(pi || a b^T) of POT's plan.
    ab = a[:, None] * b[None, :]
    mask = ref_plan > 0
    kl = float((ref_plan[mask] * np.log(ref_plan[mask] / ab[mask])).sum() - ref_plan.sum() + 1)
    assert value == pytest.approx(ref_cost + eps * kl, rel=1e-6)


def test_approaches_emd_as_eps_goes_to_zero(ot):
    X, Y = cloud(30, 3, 4), cloud(37, 3, 5, shift=1.0)
    M = sqdist64(X, Y)
    exact = ot.emd2(np.full(30, 1 / 30), np.full(37, 1 / 37), M)
    errs = []
    for rel_eps in (1e-1, 1e-2, 1e-3):
        _, log = metalora.entropic_ot(X, Y, eps=rel_eps * M.max(), tol=1e-9, max_iter=200000,
                                      log=True)
        errs.append(abs(log["transport_cost"] - exact) / exact)
    assert errs[-1] < 2e-3
    assert errs[0] > errs[-1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_properties(dtype):
    X = cloud(53, 7, 6, dtype=dtype)
    Y = cloud(41, 7, 7, shift=0.4, dtype=dtype)
    eps = 2.0  # about 0.15 of the median cost: converges in tens of iterations
    tol = 1e-5 if dtype == np.float32 else 1e-9
    rel = 1e-5 if dtype == np.float32 else 1e-7
    sxy = metalora.sinkhorn_divergence(X, Y, eps=eps, tol=tol)
    syx = metalora.sinkhorn_divergence(Y, X, eps=eps, tol=tol)
    assert sxy > 0
    assert syx == pytest.approx(sxy, rel=rel)
    # S_eps(P, P) = 0 up to rounding of the cost scale (about 1e1 here).
    assert abs(metalora.sinkhorn_divergence(X, X, eps=eps, tol=tol)) < 20 * rel
    # Symmetric updates keep f = g for identical inputs: 0 to rounding.
    assert abs(metalora.sinkhorn_divergence(X, X, eps=eps, tol=tol, updates="symmetric")) < rel
    assert metalora.sinkhorn_divergence(X, Y, eps=eps, tol=tol, updates="symmetric") == pytest.approx(sxy, rel=rel)
    perm = np.random.default_rng(0).permutation(53)
    assert metalora.sinkhorn_divergence(X[perm], Y, eps=eps, tol=tol) == pytest.approx(sxy, rel=rel)


_X32 = cloud(97, 384, 8, unit=True, dtype=np.float32)
_Y32 = cloud(113, 384, 9, shift=0.2, unit=True, dtype=np.float32)


@functools.lru_cache(maxsize=None)
def _reference_f64():
    with metalora.use_isa("serial"):
        return metalora.sinkhorn_divergence(_X32.astype(np.float64), _Y32.astype(np.float64),
                                            eps=0.01, tol=1e-8, max_iter=20000)


@pytest.mark.parametrize("level", LEVELS)
def test_levels_and_threads(level):
    X, Y = _X32, _Y32
    ref = _reference_f64()
    with metalora.use_isa(level):
        v1 = metalora.sinkhorn_divergence(X, Y, eps=0.01, tol=1e-4, threads=1)
        v2 = metalora.sinkhorn_divergence(X, Y, eps=0.01, tol=1e-4, threads=2)
        w = metalora.sinkhorn_divergence(X.astype(np.float64), Y.astype(np.float64), eps=0.01,
                                         tol=1e-8, max_iter=20000, threads=2)
    assert v1 == v2  # bit-identical across thread counts
    # float32 cost and exp: the value to 1e-4 relative (observed ~1e-6).
    assert v1 == pytest.approx(ref, rel=1e-4)
    # float64 at every level: vectorised exp within 2 ulp of libm, same iterations.
    assert w == pytest.approx(ref, rel=1e-7)


def test_cosine_cost_and_weights_cover_the_cost_option(ot):
    X, Y = cloud(20, 5, 1), cloud(30, 5, 2, shift=1.0)
    M = 1 - (X / np.linalg.norm(X, axis=1, keepdims=True)) @ (Y / np.linalg.norm(Y, axis=1, keepdims=True)).T
    a, b = np.full(20, 1 / 20), np.full(30, 1 / 30)
    ref = ot.sinkhorn2(a, b, M, 0.05, method="sinkhorn_log", numItermax=100000, stopThr=1e-13)
    _, log = metalora.entropic_ot(X, Y, eps=0.05, cost="cosine", tol=1e-12, max_iter=100000, log=True)
    assert log["transport_cost"] == pytest.approx(float(ref), rel=1e-6)


def test_bad_input():
    X, Y = cloud(10, 3, 1), cloud(12, 3, 2)
    for eps in (0, -1, np.nan, np.inf):
        with pytest.raises(ValueError, match="eps"):
            metalora.sinkhorn_divergence(X, Y, eps=eps)
    with pytest.raises(ValueError, match="sum to 1"):
        metalora.sinkhorn_divergence(X, Y, a=np.ones(10))
    w = np.full(10, 0.1)
    w[0], w[1] = -0.1, 0.3
    with pytest.raises(ValueError, match="non-negative"):
        metalora.sinkhorn_divergence(X, Y, a=w)
    with pytest.raises(ValueError, match="10 points"):
        metalora.sinkhorn_divergence(X, Y, a=np.full(9, 1 / 9))
    with pytest.raises(ValueError, match="different dimensions"):
        metalora.sinkhorn_divergence(X, cloud(12, 4, 2))
    Xi = X.copy()
    Xi[3, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        metalora.sinkhorn_divergence(Xi, Y)
    with pytest.raises(ValueError, match="empty"):
        metalora.sinkhorn_divergence(X, np.zeros((0, 3)))
    with pytest.raises(ValueError, match="scaling"):
        metalora.sinkhorn_divergence(X, Y, scaling=1.0)


def test_non_convergence_warns_and_is_flagged():
    X, Y = cloud(40, 3, 1), cloud(40, 3, 2, shift=2.0)
    with pytest.warns(metalora.ConvergenceWarning, match=r"2 iterations.*marginal error"):
        _, log = metalora.sinkhorn_divergence(X, Y, eps=1e-3, tol=1e-12, max_iter=2, log=True)
    assert log["converged"] is False
    assert log["iterations"] == 2 and log["marginal_error"] > 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, log = metalora.sinkhorn_divergence(X, Y, eps=1.0, log=True)
    assert log["converged"] is True


def test_over_relaxation_same_value_fewer_iterations():
    X, Y = clustered(60, 3, seed=1), clustered(50, 3, seed=2)
    v1, l1 = metalora.sinkhorn_divergence(X, Y, eps=0.05, relax=1.0, tol=1e-10, max_iter=100000,
                                          log=True)
    v2, l2 = metalora.sinkhorn_divergence(X, Y, eps=0.05, tol=1e-10, max_iter=100000, log=True)
    assert v2 == pytest.approx(v1, rel=1e-8)
    assert l2["iterations"] < l1["iterations"]
    for bad in (0.5, 2.0):
        with pytest.raises(ValueError, match="relax"):
            metalora.sinkhorn_divergence(X, Y, relax=bad)
