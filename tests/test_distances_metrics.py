"""Sliced W (POT), 1-D W (SciPy), MMD / energy / Frechet / cosine of means (float64 numpy),
the paper's token distances, at every dispatch level and thread count. POT and SciPy are
fixtures: only the tests that compare with them skip without them."""

import numpy as np
import pytest

import metalora
from _dist_helpers import LEVELS, cloud, clustered, sqdist64


# ---------------------------------------------------------------------------------------------
# Sliced and 1-D Wasserstein


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("n,m,d", [(31, 47, 3), (64, 50, 384), (17, 17, 1)])
@pytest.mark.parametrize("p", [1, 2])
def test_sliced_matches_pot(ot, level, n, m, d, p):
    X, Y = cloud(n, d, 1), cloud(m, d, 2, shift=0.3)
    P = metalora.random_projections(d, 50, seed=3)
    ref = ot.sliced_wasserstein_distance(X, Y, p=p, projections=P)
    with metalora.use_isa(level):
        v = metalora.sliced_wasserstein(X, Y, p=p, projections=P)
        v32 = metalora.sliced_wasserstein(X.astype(np.float32), Y.astype(np.float32), p=p,
                                          projections=P, threads=1)
        v32b = metalora.sliced_wasserstein(X.astype(np.float32), Y.astype(np.float32), p=p,
                                           projections=P, threads=2)
    assert v == pytest.approx(float(ref), rel=1e-10)
    assert v32 == v32b
    assert v32 == pytest.approx(float(ref), rel=1e-5)  # float32 projections


def test_sliced_weighted_and_seeded(ot):
    X, Y = clustered(40, 5, seed=1), clustered(30, 5, seed=2)
    rng = np.random.default_rng(0)
    a = rng.uniform(0.1, 1, 40)
    a /= a.sum()
    P = metalora.random_projections(5, 64, seed=7)
    ref = ot.sliced_wasserstein_distance(X, Y, a=a, p=2, projections=P)
    assert metalora.sliced_wasserstein(X, Y, a=a, n_projections=64, seed=7) == pytest.approx(
        float(ref), rel=1e-10)
    # order invariance and symmetry
    perm = rng.permutation(40)
    v = metalora.sliced_wasserstein(X, Y, a=a)
    assert metalora.sliced_wasserstein(X[perm], Y, a=a[perm]) == pytest.approx(v, rel=1e-12)
    assert metalora.sliced_wasserstein(Y, X, b=a) == pytest.approx(v, rel=1e-12)
    assert metalora.sliced_wasserstein(X, X) == 0.0


@pytest.mark.parametrize("n,m", [(1, 1), (13, 29), (100, 7)])
def test_wasserstein_1d_matches_scipy(ot, scipy_stats, n, m):
    rng = np.random.default_rng(n + m)
    u = rng.integers(0, 500, n).astype(float)
    v = rng.normal(200, 50, m)
    assert metalora.wasserstein_1d(u, v) == pytest.approx(scipy_stats.wasserstein_distance(u, v), rel=1e-12)
    uw, vw = rng.uniform(0.1, 2, n), rng.uniform(0.1, 2, m)
    assert metalora.wasserstein_1d(u, v, uw, vw) == pytest.approx(
        scipy_stats.wasserstein_distance(u, v, uw, vw), rel=1e-12)
    assert metalora.wasserstein_1d(u, v) == pytest.approx(metalora.wasserstein_1d(v, u), rel=1e-12)
    # p = 2 against POT's 1-D solver
    ref = ot.wasserstein_1d(u, v, p=2)
    assert metalora.wasserstein_1d(u, v, p=2) == pytest.approx(float(ref) ** 0.5, rel=1e-10)


# ---------------------------------------------------------------------------------------------
# Kernel distances


def _mmd_ref(X, Y, kfun, unbiased):
    Kxx, Kyy, Kxy = kfun(sqdist64(X, X)), kfun(sqdist64(Y, Y)), kfun(sqdist64(X, Y))
    n, m = len(X), len(Y)
    if unbiased:
        return ((Kxx.sum() - np.trace(Kxx)) / (n * (n - 1)) + (Kyy.sum() - np.trace(Kyy)) / (m * (m - 1))
                - 2 * Kxy.mean())
    return Kxx.mean() + Kyy.mean() - 2 * Kxy.mean()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,m,d", [(33, 47, 3), (40, 29, 384), (21, 19, 1)])
def test_mmd_matches_numpy(level, dtype, n, m, d):
    X = cloud(n, d, 1, unit=d > 1).astype(dtype)
    Y = cloud(m, d, 2, shift=0.2, unit=d > 1).astype(dtype)
    sig = np.array([0.3, 1.0, 2.5])
    rbf = lambda D: sum(np.exp(-D / (2 * s * s)) for s in sig)  # noqa: E731
    ms = lambda D: sum(a * a / (a * a + D) for a in (0.2, 0.5, 0.9, 1.3))  # noqa: E731
    # float32: distances and kernel sums in float32 rows, reduced in float64: MMD^2 is a
    # difference of O(1) means, so compare absolutely at ~1e-5 of their scale.
    atol = 2e-5 if dtype == np.float32 else 1e-12
    with metalora.use_isa(level):
        for unb in (True, False):
            v = metalora.mmd(X, Y, bandwidths=sig, unbiased=unb)
            assert v == pytest.approx(_mmd_ref(X, Y, rbf, unb), abs=atol * len(sig))
            w = metalora.mmd(X, Y, kernel="multiscale", unbiased=unb)
            assert w == pytest.approx(_mmd_ref(X, Y, ms, unb), abs=atol * 4)
        t1 = metalora.mmd(X, Y, threads=1)
        t2 = metalora.mmd(X, Y, threads=2)
    assert t1 == t2


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_energy_matches_numpy_and_scipy(scipy_stats, level, dtype):
    X, Y = cloud(37, 9, 1).astype(dtype), cloud(52, 9, 2, shift=0.5).astype(dtype)
    D = lambda A, B: np.sqrt(sqdist64(A, B))  # noqa: E731
    ref = np.sqrt(2 * D(X, Y).mean() - D(X, X).mean() - D(Y, Y).mean())
    rel = 1e-5 if dtype == np.float32 else 1e-10
    u, v = cloud(41, 1, 3).astype(dtype), cloud(33, 1, 4, shift=1.0).astype(dtype)
    with metalora.use_isa(level):
        assert metalora.energy_distance(X, Y) == pytest.approx(ref, rel=rel)
        assert metalora.energy_distance(u, v) == pytest.approx(
            scipy_stats.energy_distance(u.ravel(), v.ravel()), rel=rel)
        assert metalora.energy_distance(X, Y, threads=1) == metalora.energy_distance(X, Y, threads=2)
    # The same array twice: self pairs are exactly 0 on both sides.
    assert metalora.energy_distance(X, X) == 0.0
    # A copy: the square root amplifies rounding near 0 (|x - x'| from the Gram formula is
    # ~sqrt(eps_dtype * |x|^2) for coincident points).
    assert metalora.energy_distance(X, X.copy()) == pytest.approx(
        0.0, abs=2e-2 if dtype == np.float32 else 1e-4)


# ---------------------------------------------------------------------------------------------
# Moment-based distances


def _frechet_ref(linalg, X, Y):
    m1, m2 = X.mean(0), Y.mean(0)
    S1, S2 = np.cov(X, rowvar=False), np.cov(Y, rowvar=False)
    s2 = linalg.sqrtm(S2)
    cross = linalg.sqrtm(s2 @ S1 @ s2)
    return float(((m1 - m2) ** 2).sum() + np.trace(S1 + S2 - 2 * np.real(cross)))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("n,m,d", [(50, 60, 3), (30, 45, 20), (200, 150, 8)])
def test_gaussian_w2_matches_sqrtm(scipy_linalg, level, n, m, d):
    X, Y = cloud(n, d, 1), cloud(m, d, 2, shift=0.4) * 1.3
    ref = _frechet_ref(scipy_linalg, X, Y)
    with metalora.use_isa(level):
        assert metalora.gaussian_w2(X, Y) == pytest.approx(ref, rel=1e-6, abs=1e-8)
        assert metalora.gaussian_w2(X, Y, threads=1) == metalora.gaussian_w2(X, Y, threads=2)
    assert metalora.gaussian_w2(Y, X) == pytest.approx(ref, rel=1e-6, abs=1e-8)
    assert metalora.gaussian_w2(X, X) == pytest.approx(0.0, abs=1e-8)


def test_mean_cosine():
    X, Y = cloud(20, 6, 1, shift=1.0), cloud(25, 6, 2, shift=0.5)
    mx, my = X.mean(0), Y.mean(0)
    assert metalora.mean_cosine(X, Y) == pytest.approx(
        1 - mx @ my / np.linalg.norm(mx) / np.linalg.norm(my), rel=1e-12)
    assert metalora.mean_cosine(X, X) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# The paper's token distances


def test_kl_js_paper_recipe(scipy_stats):
    rng = np.random.default_rng(0)
    V = 300
    a = metalora.token_histogram(rng.integers(0, 100, 500), V)
    b = metalora.token_histogram(rng.integers(50, 250, 800), V)
    p, q = a / a.sum() + 1e-10, b / b.sum() + 1e-10
    assert metalora.kl_divergence(a, b) == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-12)
    m = (p + q) / 2
    js = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    assert metalora.js_divergence(a, b) == pytest.approx(float(js), rel=1e-12)
    assert metalora.js_divergence(a, b) == pytest.approx(metalora.js_divergence(b, a), rel=1e-12)
    assert metalora.kl_divergence(a, a) == 0.0
    # scipy's entropy renormalises after smoothing; without smoothing both agree on common support
    assert metalora.kl_divergence(a + 1, b + 1, smoothing=0) == pytest.approx(
        scipy_stats.entropy(a + 1, b + 1), rel=1e-12)
    with pytest.raises(ValueError, match="different lengths"):
        metalora.kl_divergence(a, b[:-1])
    with pytest.raises(ValueError, match="non-negative"):
        metalora.kl_divergence(-a, b)


def test_token_mmd_paper_recipe():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 32000, 5000)
    y = rng.integers(100, 20000, 3000)
    r = np.random.default_rng(5)
    xs, ys = r.choice(x.astype(float), 1000), r.choice(y.astype(float), 1000)
    k = lambda D: sum(a * a / (a * a + D) for a in (0.2, 0.5, 0.9, 1.3))  # noqa: E731
    d = lambda A, B: (A[:, None] - B[None, :]) ** 2  # noqa: E731
    ref = k(d(xs, xs)).mean() + k(d(ys, ys)).mean() - 2 * k(d(xs, ys)).mean()
    for level in LEVELS:
        with metalora.use_isa(level):
            assert metalora.token_mmd(x, y, seed=5) == pytest.approx(ref, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Bad input shared by the point-cloud metrics


@pytest.mark.parametrize("fn", [metalora.sliced_wasserstein, metalora.mmd, metalora.energy_distance,
                                metalora.gaussian_w2, metalora.mean_cosine])
def test_bad_clouds(fn):
    X = cloud(10, 3, 0)
    with pytest.raises(ValueError, match="different dimensions"):
        fn(X, cloud(10, 4, 1))
    Xb = X.copy()
    Xb[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(Xb, X)
    with pytest.raises(ValueError, match="empty"):
        fn(X, np.zeros((0, 3)))


# ---------------------------------------------------------------------------------------------
# Properties shared by the symmetric point-cloud metrics


@pytest.mark.parametrize("name,fn", [
    ("sliced", lambda x, y: metalora.sliced_wasserstein(x, y, n_projections=32)),
    ("mmd", lambda x, y: metalora.mmd(x, y)),
    ("mmd_biased", lambda x, y: metalora.mmd(x, y, unbiased=False, kernel="multiscale")),
    ("energy", lambda x, y: metalora.energy_distance(x, y)),
    ("gaussian_w2", lambda x, y: metalora.gaussian_w2(x, y)),
    ("mean_cosine", lambda x, y: metalora.mean_cosine(x, y)),
    ("sinkhorn", lambda x, y: metalora.sinkhorn_divergence(x, y, eps=1.0, tol=1e-9)),
])
def test_symmetry_and_order_invariance(name, fn):
    X, Y = clustered(41, 5, seed=3), clustered(57, 5, seed=4)
    v = fn(X, Y)
    assert fn(Y, X) == pytest.approx(v, rel=1e-7, abs=1e-10)
    rng = np.random.default_rng(0)
    assert fn(X[rng.permutation(41)], Y[rng.permutation(57)]) == pytest.approx(v, rel=1e-7, abs=1e-10)
    assert v > 0
