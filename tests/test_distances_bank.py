"""distances() and pairwise_distances(): same values as the single-pair functions for every
metric, thread-count agreement, progress output, bad input."""

import sys

import numpy as np
import pytest

import metalora
from _dist_helpers import cloud

BANK = [cloud(n, 6, seed=k, shift=0.2 * k) for k, n in enumerate([11, 17, 9, 23, 14])]
QUERY = cloud(13, 6, seed=99, shift=0.3)
_rng = np.random.default_rng(0)
_IDS = [_rng.integers(0, 50 + 20 * k, 200 + 30 * k) for k in range(6)]
_HISTS = [metalora.token_histogram(x, 200) for x in _IDS]
#: (query, bank) per kind of signature
INPUTS = {"cloud": (QUERY, BANK), "tokens": (_IDS[0], _IDS[1:]),
          "histogram": (_HISTS[0], _HISTS[1:])}
#: every metric through its public single-pair function, with the options of PARAMS
SINGLE = {
    "sinkhorn": lambda x, y: metalora.sinkhorn_divergence(x, y, eps=2.0, tol=1e-9),
    "sliced_wasserstein": lambda x, y: metalora.sliced_wasserstein(x, y, n_projections=16),
    "mmd": lambda x, y: metalora.mmd(x, y),
    "energy": lambda x, y: metalora.energy_distance(x, y),
    "gaussian_w2": lambda x, y: metalora.gaussian_w2(x, y),
    "mean_cosine": lambda x, y: metalora.mean_cosine(x, y),
    "wasserstein_1d": lambda x, y: metalora.wasserstein_1d(x, y),
    "token_mmd": lambda x, y: metalora.token_mmd(x, y, n_samples=100, seed=3),
    "kl": lambda x, y: metalora.kl_divergence(x, y),
    "js": lambda x, y: metalora.js_divergence(x, y),
}
PARAMS = {"sinkhorn": {"eps": 2.0, "tol": 1e-9}, "sliced_wasserstein": {"n_projections": 16},
          "token_mmd": {"n_samples": 100, "seed": 3}}


def test_every_metric_is_covered_here():
    assert sorted(SINGLE) == sorted(metalora.METRICS)


@pytest.mark.parametrize("metric", sorted(SINGLE))
def test_query_against_bank(metric):
    rec = metalora.METRICS[metric]
    query, bank = INPUTS[rec.kind.name]
    params = PARAMS.get(metric, {})
    ref = [SINGLE[metric](query, b) for b in bank]
    # the record's pair function is the metric's public function
    assert [rec.pair(query, b, **params) for b in bank] == ref
    d = metalora.distances(query, bank, metric=metric, **params)
    assert d.shape == (len(bank),) and d.dtype == np.float64
    np.testing.assert_allclose(d, ref, rtol=1e-9, atol=1e-12)
    d1 = metalora.distances(query, bank, metric=metric, threads=1, **params)
    np.testing.assert_array_equal(d, d1)


@pytest.mark.parametrize("metric", sorted(SINGLE))
def test_bank_against_itself(metric):
    _, bank = INPUTS[metalora.METRICS[metric].kind.name]
    params = PARAMS.get(metric, {})
    D = metalora.pairwise_distances(bank, metric=metric, threads=2, **params)
    K = len(bank)
    assert D.shape == (K, K)
    # every entry against a single-pair value computed here: f(bank_i, bank_j), of the unordered
    # pair for a symmetric metric (computed once and mirrored; token_mmd, whose two samples are
    # drawn in argument order, is symmetric only in distribution)
    symmetric = metalora.METRICS[metric].symmetric
    ref = np.array([[SINGLE[metric](*((bank[min(i, j)], bank[max(i, j)]) if symmetric
                                      else (bank[i], bank[j]))) for j in range(K)]
                    for i in range(K)])
    np.testing.assert_allclose(D, ref, rtol=1e-9, atol=1e-9)
    D1 = metalora.pairwise_distances(bank, metric=metric, threads=1, **params)
    np.testing.assert_array_equal(D, D1)


def test_kl_is_asymmetric_and_follows_the_row_convention():
    K = metalora.pairwise_distances(_HISTS, metric="kl")
    assert K[1, 2] == pytest.approx(metalora.kl_divergence(_HISTS[1], _HISTS[2]), rel=1e-12)
    assert K[2, 1] == pytest.approx(metalora.kl_divergence(_HISTS[2], _HISTS[1]), rel=1e-12)
    assert K[1, 2] != pytest.approx(K[2, 1])


def test_row_blocks_stack_to_the_bank_matrix():
    for metric in ("energy", "kl"):
        _, bank = INPUTS[metalora.METRICS[metric].kind.name]
        D = metalora.pairwise_distances(bank, metric=metric)
        blocks = np.vstack([metalora.distance_matrix(bank[:2], bank, metric=metric),
                            metalora.distance_matrix(bank[2:], bank, metric=metric)])
        upper = np.triu_indices(len(bank))
        np.testing.assert_array_equal(blocks[upper], D[upper])  # the same pairs, computed alike
        np.testing.assert_allclose(blocks, D, rtol=1e-12, atol=1e-15)
    d = metalora.distances(QUERY, BANK, metric="mmd")
    np.testing.assert_array_equal(metalora.distance_matrix([QUERY], BANK, metric="mmd")[0], d)
    np.testing.assert_array_equal(metalora.distance_matrix(BANK, metric="mmd"),
                                  metalora.pairwise_distances(BANK, metric="mmd"))


def test_progress_counts_the_pairs(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # the stderr fallback: exact text
    metalora.pairwise_distances(BANK, metric="energy", progress=True)
    assert "energy: 15/15 pairs" in capsys.readouterr().err  # 5 * 6 / 2, diagonal included
    metalora.distances(QUERY, BANK, metric="mmd", progress=True)
    assert "mmd: 5/5 pairs" in capsys.readouterr().err
    metalora.pairwise_distances(BANK, metric="energy", progress=False)
    assert capsys.readouterr().err == ""


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
    assert rec[0].filename == __file__  # the warning points at the caller of distances()
