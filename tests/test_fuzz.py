"""Fuzzing in CI (issue 16) with Hypothesis: the safetensors reader, the PEFT config checker,
the dataset loaders and the signature-cache reader get structured, mutated inputs; any exception
other than the library's own (AdapterError / DatasetError / ValueError with a message naming the
file) fails, as would a crash.

Why Hypothesis rather than Atheris: the inputs that matter here are *structured* (a valid
safetensors header with one field changed, a config with one key of the wrong type, a JSONL row
with a nested value) and Hypothesis generates and shrinks those directly from strategies; it is
already a test dependency, runs inside pytest on any Python, and its ``derandomize`` setting makes
a CI run reproducible. Atheris needs a libFuzzer-instrumented CPython build to be useful on
Python code, works on raw bytes, and would be a new dependency. Each target has a fixed budget
(``max_examples``, ``deadline``): about 10 s in all per CI run. The committed corpus is the
``@example`` list of each test (replayed every run, before the generated cases).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

hyp = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings, strategies as st  # noqa: E402

import metalora  # noqa: E402
from metalora.adapter import AdapterError, _check_config, read_safetensors_header  # noqa: E402
from metalora.datasets import DatasetError  # noqa: E402

from _bank_helpers import base_config, random_factors, write_adapter  # noqa: E402

FUZZ = settings(max_examples=int(os.environ.get("METALORA_FUZZ_EXAMPLES", "150")),
                deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c,
                                                                        max_size=4),
                    max_leaves=12)


def _valid_file(tmp: Path) -> bytes:
    rng = np.random.default_rng(0)
    p = write_adapter(tmp / "seed", random_factors(rng, shapes={"m.q": (3, 4)}, r=2),
                      base_config(r=2))
    return (p / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory):
    return _valid_file(tmp_path_factory.mktemp("fuzz"))


@FUZZ
@given(data=st.data())
@example(data=None)  # the unmodified file
def test_fuzz_safetensors_reader(tmp_path, seed_file, data):
    blob = bytearray(seed_file)
    n = int.from_bytes(blob[:8], "little")
    if data is not None:
        header = json.loads(blob[8:8 + n])
        how = data.draw(st.sampled_from(["byte", "truncate", "header", "length"]))
        if how == "byte":
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
        elif how == "truncate":
            blob = blob[:data.draw(st.integers(0, len(blob)))]
        elif how == "length":
            blob[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
        else:
            name = data.draw(st.sampled_from(sorted(header)))
            field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "__all__"]))
            value = data.draw(JSON)
            if field == "__all__" or not isinstance(header[name], dict):
                header[name] = value
            else:
                header[name][field] = value
            raw = json.dumps(header).encode()
            blob = bytearray(struct.pack("<Q", len(raw)) + raw + blob[8 + n:])
    p = tmp_path / "f.safetensors"
    p.write_bytes(bytes(blob))
    try:
        tensors, meta, size = read_safetensors_header(p)
    except AdapterError as exc:
        assert str(p) in str(exc)
        return
    end = max((t.end for t in tensors.values()), default=8)
    assert end == size == len(blob)  # accepted: every byte accounted for


@FUZZ
@given(key=st.sampled_from(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "peft_type",
                            "use_dora", "bias", "use_rslora", "modules_to_save"]),
       value=JSON | st.dictionaries(st.text(max_size=5), JSON, max_size=3))
@example(key="rank_pattern", value={"(": 8})
@example(key="alpha_pattern", value={"[": 1.0})
def test_fuzz_config_checker(tmp_path, key, value):
    cfg = base_config()
    cfg[key] = value
    where = tmp_path / "adapter_config.json"
    try:
        out = _check_config(json.loads(json.dumps(cfg)), where)
    except AdapterError as exc:
        assert str(where) in str(exc)
        return
    for k in ("r", "lora_alpha"):
        assert isinstance(out[k], (int, float)) and not isinstance(out[k], bool)


ROWS = st.lists(st.dictionaries(st.sampled_from(["input", "output", "x"]), JSON, max_size=3),
                max_size=5)


@FUZZ
@given(fmt=st.sampled_from(["jsonl", "json", "csv", "tsv"]), rows=ROWS,
       noise=st.binary(max_size=40), where=st.integers(0, 200))
@example(fmt="jsonl", rows=[{"input": "a", "output": "b"}], noise=b"\xff", where=3)
@example(fmt="json", rows=[], noise=b"[" * 5000, where=0)
def test_fuzz_dataset_loaders(tmp_path, fmt, rows, noise, where):
    if fmt == "jsonl":
        text = "\n".join(json.dumps(r) for r in rows).encode()
    elif fmt == "json":
        text = json.dumps(rows).encode()
    else:
        sep = "," if fmt == "csv" else "\t"
        text = ("input" + sep + "output\n" + "\n".join(
            sep.join(str(r.get(k, "")) for k in ("input", "output")) for r in rows)).encode()
    w = min(where, len(text))
    blob = text[:w] + noise + text[w:]
    p = tmp_path / f"d.{fmt}"
    p.write_bytes(blob)
    try:
        ds = metalora.load_dataset(p)
    except DatasetError as exc:
        assert str(p) in str(exc)
        return
    assert len(ds) > 0 and all(isinstance(t, str) for t in ds.inputs)


class _Toy:
    id = "toy-fuzz"

    def embed(self, texts):
        return np.ones((len(texts), 3), np.float32) / np.sqrt(3)


@FUZZ
@given(arrays=st.dictionaries(st.sampled_from(["points", "__key__", "__sum__", "other"]),
                              st.sampled_from(["f32", "nan", "u8", "empty", "wrong"]),
                              max_size=4),
       flip=st.integers(-1, 4000))
@example(arrays={"points": "f32"}, flip=-1)
def test_fuzz_signature_cache_reader(tmp_path, arrays, flip):
    import warnings

    cache = metalora.SignatureCache(tmp_path)
    texts = ["a", "b", "c"]
    good = metalora.signature(texts, embedder=_Toy(), cache=False)
    with warnings.catch_warnings():  # tmp_path is shared by the examples: repairs the last one
        warnings.simplefilter("ignore", RuntimeWarning)
        metalora.signature(texts, embedder=_Toy(), cache=cache)
    (entry,) = list(tmp_path.glob("*.npz"))
    key = entry.stem
    make = {"f32": np.zeros((3, 3), np.float32), "nan": np.full((3, 3), np.nan, np.float32),
            "u8": np.frombuffer(key.encode(), np.uint8), "empty": np.zeros((0,), np.float32),
            "wrong": np.zeros((2, 9), np.float64)}
    if arrays:
        np.savez(entry, **{k: make[v] for k, v in arrays.items()})
    if flip >= 0:
        blob = bytearray(entry.read_bytes())
        blob[flip % len(blob)] ^= 0x5A
        entry.write_bytes(bytes(blob))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = metalora.signature(texts, embedder=_Toy(), cache=cache)
    np.testing.assert_array_equal(got, good)  # never garbage: the real signature or recomputed
