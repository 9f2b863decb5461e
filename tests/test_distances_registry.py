"""The metric registry: one record per metric is the single source of names, kinds and options;
unknown options are rejected with the accepted ones; a metric added to the registry alone works
through every bank path."""

import importlib
import re

import numpy as np
import pytest

import metalora
from metalora.distances import (POINT_CLOUD, TOKEN_HISTOGRAM, TOKEN_IDS, Metric, get_metric,
                                register_metric, unregister_metric)
from metalora.tokens import TokenSignature
from _dist_helpers import cloud

gen = importlib.import_module("metalora.generate")  # the module, not metalora.generate()

_rng = np.random.default_rng(1)
_IDS = [_rng.integers(0, 40, 60 + 10 * k) for k in range(3)]
#: a query and a bank of two, per kind of signature
INPUTS = {"cloud": [cloud(7, 3, seed=k) for k in range(3)], "tokens": _IDS,
          "histogram": [metalora.token_histogram(x, 40) for x in _IDS]}


def _entry_points(metric):
    """Every public way of passing a metric's options, as callables of **options."""
    q, *bank = INPUTS[metalora.METRICS[metric].kind.name]
    return {
        "distances": lambda **o: metalora.distances(q, bank, metric=metric, **o),
        "pairwise_distances": lambda **o: metalora.pairwise_distances(bank, metric=metric, **o),
        "distance_matrix": lambda **o: metalora.distance_matrix([q], bank, metric=metric, **o),
        "generate_options": lambda **o: metalora.METRICS[metric].generate_options(o),
    }


@pytest.mark.parametrize("metric", list(metalora.METRICS))
def test_unknown_option_is_rejected_with_the_accepted_ones(metric):
    accepted = metalora.METRICS[metric].defaults
    for where, call in _entry_points(metric).items():
        with pytest.raises(TypeError) as exc:
            call(bogus_option=1)
        msg = str(exc.value)
        assert f"metric {metric!r}" in msg and "'bogus_option'" in msg, where
        if accepted:
            for name, default in accepted.items():
                assert f"{name}={default!r}" in msg, (where, name)
        else:
            assert "takes no options" in msg, where


def test_the_issue_example_and_hints():
    q, *bank = INPUTS["cloud"]
    with pytest.raises(TypeError, match=r"'ddoff' \(did you mean 'ddof'\?\), 'eps'; .*ddof=1"):
        metalora.distances(q, bank, metric="gaussian_w2", ddoff=0, eps=123)
    with pytest.raises(TypeError, match=r"'log' \(sinkhorn_divergence\(\) takes it, for a single"):
        metalora.distances(q, bank, metric="sinkhorn", log=True)
    with pytest.raises(TypeError, match="mean_cosine.*takes no options"):
        metalora.pairwise_distances(bank, metric="mean_cosine", threads_=1)


def test_generate_checks_options_before_reading_anything(tmp_path):
    # neither the dataset nor the bank exists: the option error must come first
    with pytest.raises(TypeError, match="ddoff"):
        metalora.generate(tmp_path / "none.jsonl", tmp_path / "nobank", distance="gaussian_w2",
                          distance_params={"ddoff": 0})
    with pytest.raises(ValueError, match=r"distance='nope' is not one of \('sinkhorn'"):
        metalora.generate(tmp_path / "none.jsonl", tmp_path / "nobank", distance="nope")


def test_unknown_metric_lists_the_valid_names():
    with pytest.raises(ValueError) as exc:
        get_metric("nope")
    for name in metalora.METRICS:
        assert repr(name) in str(exc.value)
    with pytest.raises(ValueError, match=r"metric=\['sinkhorn'\] is not one of"):
        get_metric(["sinkhorn"])


def test_the_registry_is_the_single_source():
    from metalora.cli import build_parser
    from metalora.distances import registry

    assert metalora.METRICS is registry.METRICS
    assert list(metalora.METRICS) == ["sinkhorn", "sliced_wasserstein", "mmd", "energy",
                                      "gaussian_w2", "mean_cosine", "wasserstein_1d",
                                      "token_mmd", "kl", "js"]
    for name, rec in metalora.METRICS.items():
        assert rec.name == name
        # the pair function is exported, from metalora and from metalora.distances
        assert getattr(metalora, rec.pair.__name__) is rec.pair
        assert rec.pair.__name__ in metalora.__all__
        assert rec.kind.signature == ("embedding" if rec.kind is POINT_CLOUD else "tokens")
    # the CLI offers exactly the registry's names
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    choices = next(a.choices for a in sub.choices["generate"]._actions if a.dest == "distance")
    assert list(choices) == list(metalora.METRICS)


def test_generate_records_the_same_options_as_before():
    # what the adapter's provenance records as distance_params (unchanged since 0.1.0)
    pinned = {"sinkhorn": {"eps": 0.05}, "sliced_wasserstein": {"seed": 0}, "token_mmd": {"seed": 0}}
    for name in metalora.METRICS:
        assert metalora.METRICS[name].generate_options() == pinned.get(name, {})
    assert metalora.METRICS["sinkhorn"].generate_options({"eps": 0.01, "tol": 1e-4}) == \
        {"eps": 0.01, "tol": 1e-4}


def test_kinds_convert_signatures():
    ids = np.array([3, 1, 3, 0], np.int32)
    sig = TokenSignature(ids=ids, offsets=np.array([0, 4]), vocab_size=5)
    np.testing.assert_array_equal(TOKEN_IDS.convert(sig), ids)
    np.testing.assert_array_equal(TOKEN_HISTOGRAM.convert(sig), [0.25, 0.25, 0, 0.5, 0])
    x = cloud(4, 2)
    assert POINT_CLOUD.convert(x) is x
    with pytest.raises(TypeError, match="TokenSignature"):
        TOKEN_IDS.convert(ids)
    # what generate computes from signatures: the same as from the converted forms
    hists = [TOKEN_HISTOGRAM.convert(TokenSignature(ids=x.astype(np.int32),
                                                    offsets=np.array([0, x.size]), vocab_size=40))
             for x in _IDS]
    np.testing.assert_array_equal(
        gen.query_distances(TokenSignature(ids=_IDS[0].astype(np.int32),
                                           offsets=np.array([0, _IDS[0].size]), vocab_size=40),
                            [TokenSignature(ids=x.astype(np.int32), offsets=np.array([0, x.size]),
                                            vocab_size=40) for x in _IDS[1:]], "js"),
        metalora.distances(hists[0], hists[1:], metric="js"))


def _mean_l1(X, Y, *, scale=1.0):
    """A toy metric: scale * |mean(X) - mean(Y)|_1."""
    return float(scale * np.abs(np.mean(X, axis=0) - np.mean(Y, axis=0)).sum())


def test_a_metric_added_to_the_registry_alone_works_everywhere():
    rec = register_metric(Metric(name="toy_mean_l1", kind=POINT_CLOUD, pair=_mean_l1,
                                 symmetric=True, options=("scale",)))
    try:
        assert metalora.METRICS["toy_mean_l1"] is rec and dict(rec.defaults) == {"scale": 1.0}
        assert not rec.threaded
        q, *bank = INPUTS["cloud"]
        d = metalora.distances(q, bank, metric="toy_mean_l1", scale=2.0)
        np.testing.assert_array_equal(d, [2.0 * np.abs(q.mean(0) - b.mean(0)).sum() for b in bank])
        D = metalora.pairwise_distances(INPUTS["cloud"], metric="toy_mean_l1", threads=2)
        ref = [[np.abs(a.mean(0) - b.mean(0)).sum() for b in INPUTS["cloud"]]
               for a in INPUTS["cloud"]]
        np.testing.assert_allclose(D, ref, rtol=1e-15, atol=0)
        with pytest.raises(TypeError, match=r"'scal' \(did you mean 'scale'\?\); .*scale=1.0"):
            metalora.distances(q, bank, metric="toy_mean_l1", scal=2.0)
        assert rec.generate_options({"scale": 3.0}) == {"scale": 3.0}
        assert rec.kind.signature == "embedding"
    finally:
        assert unregister_metric("toy_mean_l1") is rec
    assert "toy_mean_l1" not in metalora.METRICS
    with pytest.raises(ValueError, match="toy_mean_l1"):
        metalora.distances(q, bank, metric="toy_mean_l1")


def test_register_refuses_duplicates_and_inconsistent_records():
    with pytest.raises(ValueError, match="already registered"):
        register_metric(Metric(name="mmd", kind=POINT_CLOUD, pair=_mean_l1, symmetric=True))
    assert metalora.METRICS["mmd"].pair is metalora.mmd
    with pytest.raises(TypeError, match="'shift' is not a keyword parameter"):
        Metric(name="toy", kind=POINT_CLOUD, pair=_mean_l1, symmetric=True, options=("shift",))
    with pytest.raises(TypeError, match=re.escape("pinned options ['seed']")):
        Metric(name="toy", kind=POINT_CLOUD, pair=_mean_l1, symmetric=True, options=("scale",),
               pinned=("seed",))
    with pytest.raises(TypeError, match="a metric must be a Metric"):
        register_metric("toy")
