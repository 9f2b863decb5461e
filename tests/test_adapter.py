"""Reading and writing PEFT adapters: formats, scalings, refusals, corrupt input, atomic save."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import metalora
from metalora import Adapter, AdapterError, load_adapter
from metalora.adapter import module_scaling, read_safetensors_header

from _bank_helpers import (BF16, PREFIX, SHAPES, base_config, listing, random_factors,
                           write_adapter)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, "bf16"])
def test_load_dtypes_zero_copy(tmp_path, rng, dtype):
    dt = BF16 if dtype == "bf16" else np.dtype(dtype)
    f = random_factors(rng)
    write_adapter(tmp_path / "a", f, base_config())
    write_adapter(tmp_path / "a", f, base_config(), dtype=dt)
    ad = load_adapter(tmp_path / "a")
    assert ad.names == sorted(SHAPES)  # file order = sorted keys
    assert ad.dtypes == {str(dt)}
    for name, (a, b) in f.items():
        A, B = ad.modules[name]
        assert A.dtype == dt and B.dtype == dt
        assert not A.flags.writeable and not A.flags.owndata  # a view of the read-only mapping
        np.testing.assert_array_equal(A.astype(np.float32), a.astype(dt).astype(np.float32))
        np.testing.assert_array_equal(B.astype(np.float32), b.astype(dt).astype(np.float32))
        assert ad.scalings[name] == 2.0
    assert ad.nbytes == sum((a.size + b.size) * dt.itemsize for a, b in f.values())


def test_header_agrees_with_safetensors_library(tmp_path, rng):
    from safetensors import safe_open

    write_adapter(tmp_path / "a", random_factors(rng), base_config(), metadata={"format": "pt",
                                                                                "x": "y"})
    p = tmp_path / "a" / "adapter_model.safetensors"
    tensors, meta, _ = read_safetensors_header(p)
    ad = load_adapter(tmp_path / "a")
    with safe_open(str(p), framework="numpy") as f:
        assert f.metadata() == meta
        assert sorted(f.keys()) == sorted(tensors)
        for m in ad.names:
            A, B = ad.factors(m)
            np.testing.assert_array_equal(A, f.get_tensor(f"{PREFIX}{m}.lora_A.weight"))
            np.testing.assert_array_equal(B, f.get_tensor(f"{PREFIX}{m}.lora_B.weight"))


def test_scalings_patterns_and_rslora(tmp_path, rng):
    # q_proj of layer 1 gets rank 2 and alpha 3 by pattern, all k_proj alpha 5.
    def rank_of(n):
        return 2 if n == "model.layers.1.self_attn.q_proj" else 4

    cfg = base_config(r=4, lora_alpha=8, rank_pattern={"layers.1.self_attn.q_proj": 2},
                      alpha_pattern={"layers.1.self_attn.q_proj": 3, "k_proj": 5})
    write_adapter(tmp_path / "a", random_factors(rng, rank_of=rank_of), cfg)
    ad = load_adapter(tmp_path / "a")
    assert ad.scalings["model.layers.1.self_attn.q_proj"] == 1.5
    assert ad.scalings["model.layers.0.self_attn.q_proj"] == 2.0
    assert ad.scalings["model.layers.0.self_attn.k_proj"] == 1.25
    assert ad.ranks["model.layers.1.self_attn.q_proj"] == 2
    # rsLoRA: alpha / sqrt(r)
    assert module_scaling(base_config(r=16, lora_alpha=8, use_rslora=True), "x.q_proj") == (16, 2.0)
    # a pattern must match a whole path component suffix, as in PEFT ("q_proj" != "xq_proj")
    assert module_scaling(base_config(alpha_pattern={"q_proj": 1}), "a.xq_proj")[1] == 2.0


def test_rank_disagreeing_with_config(tmp_path, rng):
    write_adapter(tmp_path / "a", random_factors(rng, r=4), base_config(r=8))
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: module .* rank 4 .* r = 8"):
        load_adapter(tmp_path / "a")


@pytest.mark.parametrize("key,value,why", [
    ("use_dora", True, "DoRA"),
    ("lora_bias", True, "LoRA bias"),
    ("bias", "all", "biases"),
    ("bias", "lora_only", "biases"),
    ("modules_to_save", ["lm_head"], "full trained copies"),
    ("peft_type", "IA3", "only LoRA"),
    ("use_qalora", True, "QA-LoRA"),
    ("alora_invocation_tokens", [5, 6], "activated LoRA"),
    ("kasa_config", {"x": 1}, "KaSA"),
])
def test_refused_configs(tmp_path, rng, key, value, why):
    write_adapter(tmp_path / "a", random_factors(rng), base_config(**{key: value}))
    with pytest.raises(AdapterError, match=why) as ei:
        load_adapter(tmp_path / "a")
    assert "adapter_config.json" in str(ei.value)


@pytest.mark.parametrize("key,why", [
    ("base_model.model.model.embed_tokens.lora_embedding_A", "embedding LoRA"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", "DoRA"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", "LoRA biases"),
    ("base_model.model.model.layers.0.self_attn.q_proj.bias", "trained biases"),
    ("base_model.model.lm_head.modules_to_save.default.weight", "modules_to_save"),
    ("something.else", "unexpected tensor"),
])
def test_refused_tensors(tmp_path, rng, key, why):
    # config looks plain: the tensors alone give the adapter kind away
    extra = {key: np.zeros((4, 3), np.float32)}
    write_adapter(tmp_path / "a", random_factors(rng), base_config(), extra_tensors=extra)
    with pytest.raises(AdapterError, match=why) as ei:
        load_adapter(tmp_path / "a")
    assert "adapter_model.safetensors" in str(ei.value) and key in str(ei.value)


def test_conv_and_int_tensors_refused(tmp_path, rng):
    f = random_factors(rng)
    write_adapter(tmp_path / "a", f, base_config(),
                  extra_tensors={f"{PREFIX}conv.lora_A.weight": np.zeros((4, 3, 1, 1), np.float32),
                                 f"{PREFIX}conv.lora_B.weight": np.zeros((5, 4, 1, 1), np.float32)})
    with pytest.raises(AdapterError, match="not 2-D"):
        load_adapter(tmp_path / "a")
    write_adapter(tmp_path / "b", f, base_config(), dtype=np.float64)
    with pytest.raises(AdapterError, match="F64 is not supported"):
        load_adapter(tmp_path / "b")


def test_bf16_without_ml_dtypes_says_what_to_install(tmp_path, rng, monkeypatch):
    # A broken install where ml_dtypes cannot be imported: bfloat16 is supported, so the message
    # must name the missing package instead of calling BF16 unsupported.
    import metalora.adapter as adapter_mod

    write_adapter(tmp_path / "a", random_factors(rng), base_config(), dtype=BF16)
    monkeypatch.setattr(adapter_mod, "_DTYPES",
                        {k: v for k, v in adapter_mod._DTYPES.items() if k != "BF16"})
    with pytest.raises(AdapterError, match="bfloat16 needs the ml_dtypes package.*pip install "
                                           "ml_dtypes"):
        load_adapter(tmp_path / "a")


def test_mismatched_factor_shapes(tmp_path, rng):
    f = random_factors(rng)
    name = "model.layers.0.self_attn.q_proj"
    f[name] = (f[name][0], f[name][1][:, :3].copy())  # B has rank 3, A rank 4
    write_adapter(tmp_path / "a", f, base_config())
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: module "
                                           r"'model.layers.0.self_attn.q_proj': lora_A is \[4, 24\] "
                                           r"and lora_B is \[24, 3\]"):
        load_adapter(tmp_path / "a")


def test_missing_half_of_a_pair(tmp_path, rng):
    f = random_factors(rng)
    write_adapter(tmp_path / "a", f, base_config(),
                  extra_tensors={f"{PREFIX}model.extra.lora_A.weight": np.zeros((4, 3), np.float32)})
    with pytest.raises(AdapterError, match="'model.extra': has lora_A but no lora_B"):
        load_adapter(tmp_path / "a")


# ---- bad input: every error names the file ----------------------------------------------


def _good(tmp_path, rng):
    return write_adapter(tmp_path / "a", random_factors(rng), base_config())


def test_missing_paths(tmp_path, rng):
    with pytest.raises(FileNotFoundError, match="nope: no such adapter directory"):
        load_adapter(tmp_path / "nope")
    d = _good(tmp_path, rng)
    with pytest.raises(AdapterError, match="is a file, not an adapter directory"):
        load_adapter(d / "adapter_config.json")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors: missing"):
        load_adapter(d)
    (d / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="only adapter_model.bin"):
        load_adapter(d)
    (d / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json: missing"):
        load_adapter(d)


def test_bad_configs(tmp_path, rng):
    d = _good(tmp_path, rng)
    cfgp = d / "adapter_config.json"
    cfgp.write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json: not valid JSON"):
        load_adapter(d)
    for key in ("r", "lora_alpha", "peft_type"):
        cfg = base_config()
        del cfg[key]
        cfgp.write_text(json.dumps(cfg))
        with pytest.raises(AdapterError, match=f"adapter_config.json: missing key.*'{key}'"):
            load_adapter(d)
    for key, val in (("r", 0), ("r", 2.5), ("lora_alpha", "8"), ("rank_pattern", [1]),
                     ("alpha_pattern", {"q": float("nan")})):
        cfgp.write_text(json.dumps(base_config(**{key: val})))
        with pytest.raises(AdapterError, match=f"adapter_config.json: {key}"):
            load_adapter(d)


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    if how == "truncated":
        data = data[: len(data) - 10]
    elif how == "truncated-header":
        data = data[: 8 + n // 2]
    elif how == "empty":
        data = b""
    elif how == "garbage-length":
        data[:8] = (2**40).to_bytes(8, "little")
    elif how == "garbage-json":
        data[8:12] = b"\xff\xfe{["
    elif how == "trailing":
        data += b"\0" * 16
    elif how == "bad-offsets":
        hdr = json.loads(bytes(data[8:8 + n]))
        k = sorted(x for x in hdr if x != "__metadata__")[0]
        hdr[k]["data_offsets"][1] += 4
        hb = json.dumps(hdr).encode()
        hb += b" " * (n - len(hb)) if len(hb) <= n else b""
        data = bytearray(len(hb).to_bytes(8, "little")) + hb + data[8 + n:]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,msg", [
    ("truncated", "truncated"), ("truncated-header", "truncated"), ("empty", "too short"),
    ("garbage-length", "truncated, or not a safetensors"), ("garbage-json", "not valid JSON"),
    ("trailing", "trailing bytes"), ("bad-offsets", "needs .* bytes but data_offsets span"),
])
def test_corrupt_safetensors(tmp_path, rng, how, msg):
    d = _good(tmp_path, rng)
    _corrupt(d / "adapter_model.safetensors", how)
    with pytest.raises(AdapterError, match=msg) as ei:
        load_adapter(d)
    assert str(d / "adapter_model.safetensors") in str(ei.value)


def test_nan_is_found_and_named(tmp_path, rng):
    f = random_factors(rng)
    name = "model.layers.1.self_attn.v_proj"
    f[name][1][3, 1] = np.inf
    d = write_adapter(tmp_path / "a", f, base_config(), dtype=BF16)
    ad = load_adapter(d)  # opening reads no data
    with pytest.raises(AdapterError, match=f"{name}.lora_B.weight' contains NaN or Inf"):
        load_adapter(d, check_finite=True)
    before = listing(tmp_path)
    with pytest.raises(AdapterError, match="NaN or Inf"):
        ad.save(tmp_path / "out")
    assert listing(tmp_path) == before


# ---- writing ----------------------------------------------------------------------------


def _adapter(rng, dtype=np.float32, provenance=None):
    f = {k: (a.astype(dtype), b.astype(dtype)) for k, (a, b) in random_factors(rng).items()}
    cfg = base_config(r=4, lora_alpha=4)
    return Adapter(f, {k: 1.0 for k in f}, cfg, provenance=provenance), f


@pytest.mark.parametrize("dtype", [np.float32, np.float16, "bf16"])
def test_save_roundtrip(tmp_path, rng, dtype):
    from safetensors import safe_open

    dt = BF16 if dtype == "bf16" else np.dtype(dtype)
    prov = {"adapters": [{"id": "a", "weight": 0.5}], "mode": "svd"}
    ad, f = _adapter(rng, dt, prov)
    out = ad.save(tmp_path / "new")
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors",
                                       "metalora.json"]
    back = load_adapter(out)
    assert back.provenance == prov
    assert json.loads((out / "metalora.json").read_text()) == prov
    assert back.config == ad.config
    for k, (a, b) in f.items():
        np.testing.assert_array_equal(back.modules[k][0].view(np.uint8), a.view(np.uint8))
        np.testing.assert_array_equal(back.modules[k][1].view(np.uint8), b.view(np.uint8))
    # the library reads what we wrote, metadata included
    with safe_open(str(out / "adapter_model.safetensors"), framework="numpy") as g:
        assert g.metadata()["format"] == "pt"
        assert json.loads(g.metadata()["metalora"]) == prov
        k = next(iter(f))
        np.testing.assert_array_equal(g.get_tensor(f"{PREFIX}{k}.lora_A.weight"), f[k][0])
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_save_refuses_existing_and_overwrites_atomically(tmp_path, rng):
    ad, _ = _adapter(rng)
    out = ad.save(tmp_path / "new")
    with pytest.raises(FileExistsError, match="already exists"):
        ad.save(out)
    ad2, f2 = _adapter(rng)
    ad2.save(out, overwrite=True)
    k = next(iter(f2))
    np.testing.assert_array_equal(load_adapter(out).modules[k][0], f2[k][0])
    assert sorted(os.listdir(tmp_path)) == ["new"]  # no temporary left
    # never replace something that is not an adapter directory
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(AdapterError, match="not adapter files"):
        ad.save(tmp_path / "home", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterError, match="not a directory"):
        ad.save(tmp_path / "file", overwrite=True)
    with pytest.raises(FileNotFoundError, match="parent directory does not exist"):
        ad.save(tmp_path / "no" / "such")


def test_save_failure_leaves_nothing(tmp_path, rng, monkeypatch):
    import metalora.adapter as mod

    ad, _ = _adapter(rng)
    old = ad.save(tmp_path / "keep")
    before = {p: p.read_bytes() for p in old.iterdir()}
    real = mod.write_safetensors

    def half_then_fail(f, tensors, meta):
        real(f, dict(list(tensors.items())[:1]), meta)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(mod, "write_safetensors", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        ad.save(tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        ad.save(old, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["keep"]
    assert {p: p.read_bytes() for p in old.iterdir()} == before


def test_loaded_adapter_saves_itself_unchanged(tmp_path, rng):
    d = write_adapter(tmp_path / "a", random_factors(rng), base_config(), dtype=BF16)
    ad = load_adapter(d)
    out = ad.save(tmp_path / "copy")
    back = load_adapter(out)
    assert back.scalings == ad.scalings
    for k in ad.names:
        np.testing.assert_array_equal(back.modules[k][0].view(np.uint16),
                                      ad.modules[k][0].view(np.uint16))


def test_in_memory_adapter_with_raw_bf16_bits(tmp_path, rng):
    f = random_factors(rng)
    bits = {k: (a.astype(BF16).view(np.uint16), b.astype(BF16).view(np.uint16))
            for k, (a, b) in f.items()}
    ad = Adapter(bits, {k: 0.5 for k in f}, base_config(r=4, lora_alpha=2))
    back = load_adapter(ad.save(tmp_path / "o"))
    assert back.dtypes == {"bfloat16"} and back.scalings == ad.scalings
    k = next(iter(f))
    np.testing.assert_array_equal(back.modules[k][1].view(np.uint16), bits[k][1])
    # combining in-memory adapters works the same as from disk
    out = metalora.combine_adapters([ad, back], [1.0, -1.0], mode="cat")
    for k in f:
        np.testing.assert_allclose(out.delta(k), 0.0, atol=1e-6)  # twins cancel


def test_public_api():
    for name in ("Adapter", "AdapterError", "load_adapter", "Bank", "BankError",
                 "combine_adapters"):
        assert name in metalora.__all__ and hasattr(metalora, name)


def test_unknown_format_and_options_are_refused_and_write_nothing(tmp_path, rng):
    ad, _ = _adapter(rng)
    with pytest.raises(ValueError, match=r"format='onnx' is not one of \('peft'"):
        ad.save(tmp_path / "x", format="onnx")
    with pytest.raises(TypeError, match=r"format='peft' takes no option\(s\) \['base'\]"):
        ad.save(tmp_path / "x", base="model.gguf")
    assert os.listdir(tmp_path) == []


def test_a_registered_writer_is_used_by_save(tmp_path, rng):
    """Adding an output format is one Writer record: save() finds it, passes its options and
    publishes its directory atomically; overwrite replaces only the format's own files."""
    from metalora import writers

    def write_npz(adapter, directory, *, compressed=False):
        save = np.savez_compressed if compressed else np.savez
        save(directory / "factors.npz", **{f"{m}.{w}": x for m in adapter.names
                                           for w, x in zip("AB", adapter.factors(m))})

    writers.register(writers.Writer("npz", "numpy archive", write_npz,
                                    own_files=frozenset({"factors.npz"}),
                                    options=frozenset({"compressed"})))
    try:
        ad, f = _adapter(rng)
        out = ad.save(tmp_path / "n", format="npz", compressed=True)
        with np.load(out / "factors.npz") as z:
            name = next(iter(f))
            np.testing.assert_array_equal(z[f"{name}.B"], f[name][1])
        assert sorted(os.listdir(out)) == ["factors.npz"]
        ad.save(out, format="npz", overwrite=True)
        (out / "notes.txt").write_text("mine")
        with pytest.raises(AdapterError, match="not adapter files"):
            ad.save(out, format="npz", overwrite=True)
        with pytest.raises(ValueError, match="already registered"):
            writers.register(writers.Writer("npz", "again", write_npz, own_files=frozenset()))
    finally:
        del writers.WRITERS["npz"]
