"""distances() and pairwise_distances(): same values as the single-pair functions, symmetry,
thread-count agreement, progress output, bad input."""

import numpy as np
import pytest

import metalora
from _dist_helpers import cloud

BANK = [cloud(n, 6, seed=k, shift=0.2 * k) for k, n in enumerate([11, 17, 9, 23, 14])]
QUERY = cloud(13, 6, seed=99, shift=0.3)
SINGLE = {
    "sinkhorn": lambda x, y: metalora.sinkhorn_divergence(x, y, eps=2.0, tol=1e-9),
    "sliced_wasserstein": lambda x, y: metalora.sliced_wasserstein(x, y, n_projections=16),
    "mmd": lambda x, y: metalora.mmd(x, y),
    "energy": lambda x, y: metalora.energy_distance(x, y),
    "gaussian_w2": lambda x, y: metalora.gaussian_w2(x, y),
    "mean_cosine": lambda x, y: metalora.mean_cosine(x, y),
}
PARAMS = {"sinkhorn": {"eps": 2.0, "tol": 1e-9}, "sliced_wasserstein": {"n_projections": 16}}


@pytest.mark.parametrize("metric", sorted(SINGLE))
def test_query_against_bank(metric):
    d = metalora.distances(QUERY, BANK, metric=metric, **PARAMS.get(metric, {}))
    ref = [SINGLE[metric](QUERY, b) for b in BANK]
    assert d.shape == (len(BANK),) and d.dtype == np.float64
    np.testing.assert_allclose(d, ref, rtol=1e-9, atol=1e-12)
    d1 = metalora.distances(QUERY, BANK, metric=metric, threads=1, **PARAMS.get(metric, {}))
    np.testing.assert_array_equal(d, d1)


@pytest.mark.parametrize("metric", sorted(SINGLE))
def test_bank_against_itself(metric):
    D = metalora.pairwise_distances(BANK, metric=metric, threads=2, **PARAMS.get(metric, {}))
    assert D.shape == (5, 5)
    np.testing.assert_array_equal(D, D.T)
    for i, j in [(0, 3), (4, 1), (2, 2)]:
        assert D[i, j] == pytest.approx(SINGLE[metric](BANK[i], BANK[j]), rel=1e-9, abs=1e-9)
    D1 = metalora.pairwise_distances(BANK, metric=metric, threads=1, **PARAMS.get(metric, {}))
    np.testing.assert_array_equal(D, D1)


def test_token_metrics_and_asymmetric_kl():
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 50 + 20 * k, 200 + 30 * k) for k in range(4)]
    hists = [metalora.token_histogram(x, 200) for x in ids]
    K = metalora.pairwise_distances(hists, metric="kl")
    assert K[1, 2] == pytest.approx(metalora.kl_divergence(hists[1], hists[2]), rel=1e-12)
    assert K[2, 1] == pytest.approx(metalora.kl_divergence(hists[2], hists[1]), rel=1e-12)
    assert K[1, 2] != pytest.approx(K[2, 1])
    J = metalora.pairwise_distances(hists, metric="js")
    np.testing.assert_array_equal(J, J.T)
    W = metalora.distances(ids[0], ids[1:], metric="wasserstein_1d")
    assert W[1] == pytest.approx(metalora.wasserstein_1d(ids[0], ids[2]), rel=1e-12)
    M = metalora.distances(ids[0], ids[1:], metric="token_mmd", n_samples=100, seed=3)
    assert M[0] == pytest.approx(metalora.token_mmd(ids[0], ids[1], n_samples=100, seed=3), rel=1e-12)


def test_progress_fallback_or_tqdm(capsys):
    metalora.pairwise_distances(BANK, metric="energy", progress=True)
    err = capsys.readouterr().err
    assert "15" in err  # 15 unordered pairs (tqdm or the stderr fallback)


def test_bad_input():
    with pytest.raises(ValueError, match="metric"):
        metalora.distances(QUERY, BANK, metric="nope")
    with pytest.raises(ValueError, match="empty"):
        metalora.distances(QUERY, [], metric="mmd")
    with pytest.raises(ValueError, match="different dimensions"):
        metalora.distances(QUERY, [cloud(5, 4, 0)], metric="mmd")
    bad = BANK[1].copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="signature 2"):
        metalora.distances(QUERY, [BANK[0], bad], metric="sinkhorn")
    with pytest.raises(ValueError, match="threads"):
        metalora.distances(QUERY, BANK, metric="mmd", threads=-1)


def test_unconverged_pairs_give_one_summary_warning():
    with pytest.warns(metalora.ConvergenceWarning, match=r"did not converge in 11 of the 11 problems solved for 5 pairs") as rec:
        metalora.distances(QUERY, BANK, metric="sinkhorn", eps=0.05, max_iter=1, tol=1e-12)
    assert len([w for w in rec if issubclass(w.category, metalora.ConvergenceWarning)]) == 1
