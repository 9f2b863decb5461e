"""Meta-operators against their formulas, leave-one-out, top_k, temperature selection, and the
neural operator (torch training -> ONNX -> ONNX Runtime)."""

from __future__ import annotations

import numpy as np
import pytest

from metalora.coefficients import (NeuralOperator, coefficients, loo_errors, loo_weights,
                                   select_temperature, softmin, standardize)


def test_attentional_is_softmin_of_scaled_distances():
    d = np.array([0.3, 1.7, 0.9, 4.0])
    for tau in (0.1, 1.0, 7.5):
        want = np.exp(-d / tau) / np.exp(-d / tau).sum()
        np.testing.assert_allclose(coefficients(d, operator="attentional", tau=tau), want, rtol=1e-12)


def test_normalized_standardizes_first():
    d = np.array([10.0, 12.0, 11.0, 30.0, 10.5])
    z = (d - d.mean()) / d.std()
    want = np.exp(-z / 0.5) / np.exp(-z / 0.5).sum()
    np.testing.assert_allclose(coefficients(d, operator="normalized", tau=0.5), want, rtol=1e-12)
    # invariant to an affine change of the distance's units
    np.testing.assert_allclose(coefficients(3 * d + 7, operator="normalized", tau=0.5), want, rtol=1e-12)


def test_softmin_is_stable_for_huge_distances():
    w = softmin(np.array([1e6, 1e6 + 1, np.inf]))
    np.testing.assert_allclose(w, [1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1)), 0.0])


def test_constant_row_gives_uniform_weights():
    np.testing.assert_allclose(coefficients(np.full(4, 2.0)), np.full(4, 0.25))
    np.testing.assert_array_equal(standardize(np.full(3, 5.0)), np.zeros(3))


def test_top_k_keeps_nearest_and_renormalizes():
    d = np.array([0.5, 0.1, 0.9, 0.2, 0.3])
    w = coefficients(d, operator="attentional", top_k=2)
    assert np.count_nonzero(w) == 2 and set(np.flatnonzero(w)) == {1, 3}
    full = coefficients(d, operator="attentional")
    np.testing.assert_allclose(w[[1, 3]], full[[1, 3]] / full[[1, 3]].sum())
    assert w.sum() == pytest.approx(1.0)


def test_exclude_removes_the_adapter():
    d = np.array([0.0, 1.0, 2.0])
    w = coefficients(d, operator="normalized", exclude=[0])
    assert w[0] == 0.0 and w.sum() == pytest.approx(1.0)


def test_loo_never_uses_the_adapter_itself():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((6, 3))
    D = np.linalg.norm(X[:, None] - X[None], axis=-1)  # zero diagonal: self would win
    for op in ("attentional", "normalized"):
        W = loo_weights(D, operator=op, tau=0.1)
        np.testing.assert_array_equal(np.diag(W), 0.0)
        np.testing.assert_allclose(W.sum(1), 1.0)


def test_loo_errors_match_explicit_parameters():
    rng = np.random.default_rng(1)
    theta = rng.standard_normal((5, 40))
    G = theta @ theta.T
    D = rng.uniform(0, 2, (5, 5))
    W = loo_weights(D, operator="attentional")
    want = [np.sum((theta[i] - W[i] @ theta) ** 2) / np.sum(theta[i] ** 2) for i in range(5)]
    np.testing.assert_allclose(loo_errors(W, G), want, rtol=1e-10)
    with pytest.raises(ValueError, match="must not use the adapter itself"):
        loo_errors(np.eye(5), G)


def _clustered_bank(seed=2, noise=0.3):
    """Adapters in 3 clusters; distances = true parameter distances + noise. The best tau is
    interior: too small trusts the noisy nearest neighbour, too large averages clusters."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((3, 50)) * 3
    theta = np.concatenate([c + rng.standard_normal((6, 50)) for c in centers])
    D = np.linalg.norm(theta[:, None] - theta[None], axis=-1)
    D = D + rng.uniform(0, noise * D.mean(), D.shape)
    return D, theta @ theta.T


def test_select_temperature_picks_the_minimizer():
    D, G = _clustered_bank()
    tau, curve = select_temperature(D, G, operator="normalized", log=True)
    dense = np.geomspace(0.01, 100, 400)
    errs = [np.mean(loo_errors(loo_weights(D, operator="normalized", tau=t), G)) for t in dense]
    best = dense[int(np.argmin(errs))]
    assert 0.01 < best < 100, "constructed case must have an interior optimum"
    assert np.mean(loo_errors(loo_weights(D, operator="normalized", tau=tau), G)) <= min(errs) + 1e-9
    assert abs(np.log(tau) - np.log(best)) < 0.1  # one step of the 400-point check grid is 0.023
    assert len(curve["taus"]) > 37, "the grid is refined around the winner"


def test_bad_input_messages():
    with pytest.raises(ValueError, match=r"distances\[1\] is NaN"):
        coefficients([0.1, np.nan])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        coefficients([])
    with pytest.raises(ValueError, match="tau must be a positive"):
        coefficients([1.0, 2.0], tau=0)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        coefficients([1.0, 2.0], top_k=0)
    with pytest.raises(ValueError, match="operator='magic' is not one of"):
        coefficients([1.0, 2.0], operator="magic")
    with pytest.raises(ValueError, match="needs model=NeuralOperator"):
        coefficients([1.0, 2.0], operator="neural")
    with pytest.raises(ValueError, match="every distance is infinite"):
        coefficients([1.0], exclude=[0])


def test_neural_operator_trains_exports_and_matches_torch(tmp_path):
    torch = pytest.importorskip("torch", reason="the neural operator trains with torch")
    pytest.importorskip("onnx", reason="exporting the neural operator needs onnx")
    D, G = _clustered_bank(seed=3)
    losses = []
    op = NeuralOperator.fit(D, G, hidden=8, epochs=150, seed=0,
                            progress=lambda e, loss: losses.append(loss))
    assert losses[-1] < losses[0], "training must reduce the leave-one-out error"
    # ONNX Runtime vs the same g evaluated in torch from the trained float32 parameters.
    z = torch.linspace(-3, 3, 101, dtype=torch.float32)
    w = {k: torch.from_numpy(v) for k, v in op.weights.items()}
    g_torch = (w["a"] * z + w["c"] + torch.tanh(z[:, None] * w["U"] + w["b"]) @ w["V"]).numpy()
    np.testing.assert_allclose(op(z.numpy()), g_torch, rtol=1e-5, atol=1e-5)  # float32 graph
    # Saved and reloaded: same coefficients, no torch needed to run it.
    op.save(tmp_path / "op.onnx")
    again = NeuralOperator.load(tmp_path / "op.onnx")
    assert again.meta["epochs"] == 150
    row = D[0]
    np.testing.assert_allclose(coefficients(row, operator="neural", model=again, exclude=[0]),
                               coefficients(row, operator="neural", model=op, exclude=[0]))
    W = loo_weights(D, operator="neural", model=again)
    assert np.mean(loo_errors(W, G)) == pytest.approx(op.meta["loo_error"], rel=1e-3)
    with pytest.raises(FileNotFoundError, match="no neural operator here"):
        NeuralOperator.load(tmp_path / "missing.onnx")
