"""Randomised properties (hypothesis): 1-D Wasserstein against SciPy on arbitrary weighted
samples, Sinkhorn divergence non-negative and symmetric on arbitrary small clouds."""

import numpy as np
import pytest

import metalora

hyp = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

values = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
weights = st.floats(0.01, 10.0)


@settings(max_examples=60, deadline=None)
@given(u=hnp.arrays(np.float64, st.integers(1, 40), elements=values),
       v=hnp.arrays(np.float64, st.integers(1, 40), elements=values),
       data=st.data())
def test_wasserstein_1d_equals_scipy(u, v, data):
    stats = pytest.importorskip("scipy.stats")
    uw = data.draw(hnp.arrays(np.float64, u.size, elements=weights))
    vw = data.draw(hnp.arrays(np.float64, v.size, elements=weights))
    ref = stats.wasserstein_distance(u, v, uw, vw)
    got = metalora.wasserstein_1d(u, v, uw, vw)
    scale = max(np.abs(u).max(), np.abs(v).max(), 1.0)
    assert got == pytest.approx(ref, rel=1e-9, abs=1e-12 * scale)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), m=st.integers(1, 12), d=st.integers(1, 4),
       seed=st.integers(0, 2**31 - 1), eps=st.floats(0.5, 5.0))
def test_sinkhorn_divergence_nonnegative_and_symmetric(n, m, d, seed, eps):
    rng = np.random.default_rng(seed)
    X, Y = rng.standard_normal((n, d)), rng.standard_normal((m, d)) + 0.5
    s1 = metalora.sinkhorn_divergence(X, Y, eps=eps, tol=1e-10, max_iter=100000)
    s2 = metalora.sinkhorn_divergence(Y, X, eps=eps, tol=1e-10, max_iter=100000)
    assert s1 >= -1e-9
    assert s1 == pytest.approx(s2, rel=1e-6, abs=1e-9)
