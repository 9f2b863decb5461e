"""The bank index (metalora.bank_index): computed once, stored beside the bank, checked by
content hashes on load, rebuilt or refused with the reason when stale."""

from __future__ import annotations

import importlib
import logging
import os
import shutil

import numpy as np
import pytest

import metalora
from metalora import bank_index as bi
from metalora.bank_index import BankIndex, BankIndexError
from metalora.distances import get_metric
from metalora.demo import demo_bank


@pytest.fixture()
def bank(tmp_path, monkeypatch):
    monkeypatch.setenv("METALORA_CACHE_DIR", str(tmp_path / "cache"))
    return metalora.Bank(shutil.copytree(demo_bank(), tmp_path / "bank"))


def clouds(K: int, seed: int = 0) -> list:
    """Signatures as the embedder makes them: unit-norm float32 points, odd sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(K):
        x = rng.standard_normal((7 + 3 * k, 5)).astype(np.float32) + 0.3 * k
        out.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return out


def count_blocks(monkeypatch) -> list:
    calls = []
    real = bi.distance_block

    def counting(*args, **kw):
        calls.append(args[3])
        return real(*args, **kw)

    monkeypatch.setattr(bi, "distance_block", counting)
    return calls


@pytest.mark.parametrize("metric", ["sinkhorn", "energy", "mean_cosine", "gaussian_w2"])
def test_distance_matrix_equals_pairwise_distances_bit_for_bit(bank, metric):
    sigs = clouds(len(bank))
    D = BankIndex(bank).distance_matrix(sigs, metric)
    params = get_metric(metric).generate_options(None)
    np.testing.assert_array_equal(D, metalora.pairwise_distances(sigs, metric=metric, **params))


@pytest.mark.parametrize("metric", ["sinkhorn", "kl", "mmd"])
@pytest.mark.parametrize("pairs", [1, 5, 13, 1000])
def test_row_blocks_in_any_order_assemble_the_whole_matrix(metric, pairs):
    K = 7
    if metric == "kl":
        rng = np.random.default_rng(1)
        sigs = [rng.dirichlet(np.ones(11)) for _ in range(K)]
    else:
        sigs = clouds(K, seed=2)
    spec = get_metric(metric)
    params = spec.generate_options(None)
    full = metalora.pairwise_distances(sigs, metric=metric, **params)
    blocks = bi.row_blocks(K, spec.symmetric, pairs)
    assert blocks[0][0] == 0 and blocks[-1][1] == K
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    parts = [(b, np.asarray(metalora.pairwise_distances(sigs, metric=metric, rows=b, **params)))
             for b in blocks]
    D = bi.assemble_blocks(K, parts[::-1], spec.symmetric)
    np.testing.assert_array_equal(D, full)
    with pytest.raises(ValueError, match="do not cover rows"):
        bi.assemble_blocks(K, parts[1:], spec.symmetric)


def test_distance_matrix_is_stored_and_reused_and_recomputed_when_a_signature_changes(
        bank, monkeypatch, caplog):
    sigs = clouds(len(bank))
    calls = count_blocks(monkeypatch)
    D1 = BankIndex(bank).distance_matrix(sigs, "energy")
    assert calls, "computed the first time"
    stored = sorted(p.name for p in (bank.path / bi.INDEX_DIR).iterdir())
    assert any(n.startswith("D-energy-") for n in stored)
    assert not [n for n in stored if n.endswith(".tmp")]
    calls.clear()
    D2 = BankIndex(bank).distance_matrix(sigs, "energy")  # a new process reads it back
    assert calls == [] and np.array_equal(D1, D2)
    changed = list(sigs)
    changed[3] = changed[3][:-1]  # one dataset lost an example
    with caplog.at_level(logging.INFO, logger="metalora"):
        D3 = BankIndex(bank).distance_matrix(changed, "energy")
    assert calls
    assert f"1 adapter(s) changed their signature (['{bank.ids[3]}'])" in caplog.text
    assert not np.array_equal(D1[3], D3[3]) and np.array_equal(D1[0, 1], D3[0, 1])
    # other options are another entry, not a stale one
    calls.clear()
    BankIndex(bank).distance_matrix(sigs, "sinkhorn", {"eps": 0.1})
    BankIndex(bank).distance_matrix(sigs, "sinkhorn", {"eps": 0.2})
    assert len([n for n in os.listdir(bank.path / bi.INDEX_DIR) if n.startswith("D-sinkhorn")]) == 2


def test_unknown_metric_options_are_refused(bank):
    with pytest.raises((TypeError, ValueError), match="ddoff"):
        BankIndex(bank).distance_matrix(clouds(len(bank)), "gaussian_w2", {"ddoff": 0})


def test_gram_follows_the_adapter_bytes_not_their_mtime(bank, monkeypatch):
    calls = []
    real = bi.parameter_gram
    monkeypatch.setattr(bi, "parameter_gram", lambda b: calls.append(1) or real(b))
    G = BankIndex(bank).gram()
    assert len(calls) == 1
    # the Gram of the flattened factors, in float64
    theta = [np.concatenate([np.asarray(x, np.float64).ravel() for m in bank.modules
                             for x in bank[k].factors(m)]) for k in bank.ids]
    np.testing.assert_allclose(G, np.array([[a @ b for b in theta] for a in theta]), rtol=1e-12)
    weights = bank[1].weights_file
    os.utime(weights, ns=(1, 1))  # touched, same bytes: the hash is recomputed and matches
    assert np.array_equal(BankIndex(metalora.Bank(bank.path)).gram(), G) and len(calls) == 1
    data = bytearray(weights.read_bytes())
    data[-4:] = np.float32(0.5).tobytes()  # the last value of the last tensor changes
    weights.write_bytes(bytes(data))
    G2 = BankIndex(metalora.Bank(bank.path)).gram()
    assert len(calls) == 2 and not np.array_equal(G2[1], G[1]) and G2[0, 0] == G[0, 0]


def test_auto_temperature_is_stored(bank, monkeypatch):
    coef = importlib.import_module("metalora.coefficients")  # the module, not the function

    sigs = clouds(len(bank))
    calls = []
    real = coef.select_temperature
    monkeypatch.setattr(coef, "select_temperature", lambda *a, **k: calls.append(1) or real(*a, **k))
    t1 = BankIndex(bank).temperature(sigs, "energy", top_k=4)
    t2 = BankIndex(bank).temperature(sigs, "energy", top_k=4)
    assert t1 == t2 and len(calls) == 1
    BankIndex(bank).temperature(sigs, "energy", top_k=None)  # another operator setting
    assert len(calls) == 2
    D = BankIndex(bank).distance_matrix(sigs, "energy")
    assert t1 == real(D, BankIndex(bank).gram(), operator="normalized", top_k=4)


def test_neural_operator_is_checked_against_the_metric_and_the_bank(bank):
    pytest.importorskip("torch", reason="the neural operator trains with torch")
    sigs = clouds(len(bank))
    index = BankIndex(bank)
    with pytest.raises(BankIndexError, match=r"needs a neural operator trained on the bank: run "
                                             r"`metalora bank index .* --neural --distance energy`"):
        index.neural_operator(sigs, "energy")
    op = index.train_neural(sigs, "energy", epochs=20)
    again = BankIndex(bank).neural_operator(sigs, "energy")
    assert again.onnx_bytes == op.onnx_bytes and again.meta["metric"] == "energy"
    with pytest.raises(BankIndexError, match=r"trained on energy, not mmd: run `metalora bank "
                                             r"index .* --neural --distance mmd`"):
        BankIndex(bank).neural_operator(sigs, "mmd")
    changed = list(sigs)
    changed[0] = changed[0][:-1]
    with pytest.raises(BankIndexError, match="stale: the bank's datasets or their signatures "
                                             "changed since it was trained"):
        BankIndex(bank).neural_operator(changed, "energy")


def test_unwritable_bank_stores_its_index_in_the_user_cache(bank):
    """A bank whose index folder cannot be made (read-only install; here a file in its way,
    which stops root too) keeps its index in the user cache and reads it back from there."""
    sigs = clouds(len(bank))
    (bank.path / bi.INDEX_DIR).write_text("not a directory")
    index = BankIndex(bank)
    D = index.distance_matrix(sigs, "energy")
    stored = list(index.directories[1].glob("D-energy-*.npz"))
    assert len(stored) == 1 and str(index.directories[1]).startswith(os.environ["METALORA_CACHE_DIR"])
    assert np.array_equal(BankIndex(bank).distance_matrix(sigs, "energy"), D)
    assert (bank.path / bi.INDEX_DIR).read_text() == "not a directory"


def test_in_memory_bank_is_indexed_in_memory(bank):
    full = bank
    bank = metalora.Bank.from_adapters([full[i] for i in range(3)])
    index = BankIndex(bank)
    assert index.directories == []
    G = index.gram()
    np.testing.assert_array_equal(G, BankIndex(full).gram()[:3, :3])
    assert index.gram() is G  # kept for the index's lifetime


def test_a_row_range_outside_the_bank_is_refused():
    sigs = clouds(4)
    for rows in ((0, 5), (2, 2), (-1, 3)):
        with pytest.raises(ValueError, match=r"is not a row range \[a, b\) of a bank of 4"):
            metalora.pairwise_distances(sigs, metric="energy", rows=rows)
