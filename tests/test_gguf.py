"""The GGUF writer: round trip through the gguf package's reader, the q/k row order of Llama
models against RoPE itself, the scaling rules of llama.cpp, refusals, atomic publishing and the
CLI (``metalora export``, ``generate --format gguf``). Checks inside llama.cpp itself are in
``test_llamacpp.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the GGUF writer needs the gguf package: pip install gguf")

from metalora import Adapter, AdapterError  # noqa: E402
from metalora.cli import main  # noqa: E402
from metalora.writers import WRITERS  # noqa: E402
from metalora.writers.gguf import GGUFError, qk_row_order, read_base, to_gguf_rows  # noqa: E402

# A tiny Llama: 2 blocks, hidden 64, 4 heads of 16, 2 KV heads (GQA), MLP 96.
HID, NH, NKV, HD, FF, NL = 64, 4, 2, 16, 96, 2
OUTS = {"self_attn.q_proj": (NH * HD, HID), "self_attn.k_proj": (NKV * HD, HID),
        "self_attn.v_proj": (NKV * HD, HID), "self_attn.o_proj": (HID, NH * HD),
        "mlp.gate_proj": (FF, HID), "mlp.up_proj": (FF, HID), "mlp.down_proj": (HID, FF)}
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_config(tmp_path: Path, **over) -> Path:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HID,
           "num_hidden_layers": NL, "num_attention_heads": NH, "num_key_value_heads": NKV,
           "intermediate_size": FF, **over}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    return p


def llama_gguf_base(tmp_path: Path, arch: str = "llama", skip: str = "") -> Path:
    """A GGUF "model" with the tiny Llama's tensor names and shapes (zeros)."""
    p = tmp_path / "base.gguf"
    w = gguf.GGUFWriter(p, arch)
    w.add_block_count(NL)
    w.add_head_count(NH)
    w.add_head_count_kv(NKV)
    for layer in range(NL):
        for mod, (n_out, n_in) in OUTS.items():
            name = f"blk.{layer}.{GGUF_NAMES[mod]}.weight"
            if name != skip:
                w.add_tensor(name, np.zeros((n_out, n_in), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p


def tiny_adapter(rng, mods=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), r=4,
                 alpha=8.0, ranks=None, dtype=np.float32) -> Adapter:
    modules, scalings = {}, {}
    for layer in range(NL):
        for mod in mods:
            n_out, n_in = OUTS[mod]
            name = f"model.layers.{layer}.{mod}"
            rr = (ranks or {}).get(name, r)
            a = rng.standard_normal((rr, n_in)).astype(dtype)
            b = rng.standard_normal((n_out, rr)).astype(dtype)
            modules[name] = (a, b)
            scalings[name] = alpha / rr
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(mods),
           "base_model_name_or_path": "tiny-llama"}
    return Adapter(modules, scalings, cfg)


def read(path: Path):
    r = gguf.GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items()}
    return kv, {t.name: t for t in r.tensors}


def as_f64(t) -> np.ndarray:
    """A tensor of the file as float64, numpy shape (rows = ne[1], cols = ne[0])."""
    x = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(x, np.float64).reshape(int(t.shape[1]), int(t.shape[0]))


# --- RoPE, stated independently: the two layouts of one rotation --------------------------


def rope_halves(x: np.ndarray, pos: int, base: float = 10000.0) -> np.ndarray:
    """transformers' RoPE on one head: element j pairs with j + d/2 (``rotate_half``)."""
    d = x.shape[0]
    out = x.copy()
    for j in range(d // 2):
        th = pos * base ** (-2 * j / d)
        c, s = np.cos(th), np.sin(th)
        out[j] = x[j] * c - x[j + d // 2] * s
        out[j + d // 2] = x[j + d // 2] * c + x[j] * s
    return out


def rope_pairs(x: np.ndarray, pos: int, base: float = 10000.0) -> np.ndarray:
    """llama.cpp's RoPE for the llama architecture on one head: elements 2j, 2j+1 pair."""
    d = x.shape[0]
    out = x.copy()
    for j in range(d // 2):
        th = pos * base ** (-2 * j / d)
        c, s = np.cos(th), np.sin(th)
        out[2 * j] = x[2 * j] * c - x[2 * j + 1] * s
        out[2 * j + 1] = x[2 * j + 1] * c + x[2 * j] * s
    return out


@pytest.mark.parametrize("n_head", [1, 3, 4])
def test_qk_row_order_is_the_rope_layout_change(n_head):
    # Reordering the rows of a projection's output must turn transformers' rotation into
    # llama.cpp's: rope_pairs(P y) == P rope_halves(y), head by head, for every position.
    rng = np.random.default_rng(0)
    d = HD
    p = qk_row_order(n_head * d, n_head)
    assert sorted(p) == list(range(n_head * d))  # a permutation
    y = rng.standard_normal(n_head * d)
    for pos in (0, 1, 7, 300):
        hf = np.concatenate([rope_halves(y[h * d:(h + 1) * d], pos) for h in range(n_head)])
        gg = np.concatenate([rope_pairs(y[p][h * d:(h + 1) * d], pos) for h in range(n_head)])
        np.testing.assert_allclose(gg, hf[p], rtol=0, atol=1e-12)
    # and keeping transformers' order (the identity) is not such a change
    assert np.abs(rope_pairs(y[:d], 7) - rope_halves(y[:d], 7)).max() > 1e-2


def test_qk_row_order_refuses_odd_heads():
    with pytest.raises(GGUFError, match="heads"):
        qk_row_order(30, 4)


# --- round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize("base_kind", ["config", "gguf", "folder"])
@pytest.mark.parametrize("out_type,tol", [("f32", 0.0), ("f16", 1e-3), ("bf16", 8e-3)])
def test_round_trip(tmp_path, base_kind, out_type, tol):
    rng = np.random.default_rng(1)
    ad = tiny_adapter(rng, mods=tuple(OUTS))
    base = {"config": lambda: llama_config(tmp_path), "gguf": lambda: llama_gguf_base(tmp_path),
            "folder": lambda: llama_config(tmp_path).parent}[base_kind]()
    out = ad.save(tmp_path / "a.gguf", format="gguf", base=base, out_type=out_type)
    assert out == (tmp_path / "a.gguf").absolute() and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    kv, ts = read(out)
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["general.architecture"] == "llama"
    assert kv["adapter.lora.alpha"] == pytest.approx(8.0)
    assert kv["metalora.base_model"] == "tiny-llama"
    want = {f"blk.{L}.{GGUF_NAMES[m]}.weight.lora_{x}" for L in range(NL) for m in OUTS
            for x in "ab"}
    assert set(ts) == want
    gtype = {"f32": "F32", "f16": "F16", "bf16": "BF16"}[out_type]
    for L in range(NL):
        for m, (n_out, n_in) in OUTS.items():
            a, b = ad.factors(f"model.layers.{L}.{m}")
            name = f"blk.{L}.{GGUF_NAMES[m]}.weight"
            ta, tb = ts[name + ".lora_a"], ts[name + ".lora_b"]
            assert ta.tensor_type.name == gtype and tb.tensor_type.name == gtype
            assert list(ta.shape) == [n_in, 4] and list(tb.shape) == [4, n_out]  # ggml ne
            heads = {"self_attn.q_proj": NH, "self_attn.k_proj": NKV}.get(m)
            b_want = b if heads is None else to_gguf_rows(b, heads)
            for got, ref in ((as_f64(ta), a), (as_f64(tb), b_want)):
                # one rounding to the output type: relative 2^-11 (f16), 2^-8 (bf16)
                ref = np.asarray(ref, np.float64)
                assert (np.abs(got - ref) <= tol * np.abs(ref) + tol * 1e-3).all(), (name, out_type)


def test_q_and_k_rows_are_reordered_with_their_own_head_counts(tmp_path):
    rng = np.random.default_rng(2)
    ad = tiny_adapter(rng)
    out = ad.save(tmp_path / "a.gguf", format="gguf", base=llama_config(tmp_path))
    _, ts = read(out)
    _, bq = ad.factors("model.layers.0.self_attn.q_proj")
    _, bk = ad.factors("model.layers.0.self_attn.k_proj")
    _, bv = ad.factors("model.layers.0.self_attn.v_proj")
    gq = as_f64(ts["blk.0.attn_q.weight.lora_b"])
    gk = as_f64(ts["blk.0.attn_k.weight.lora_b"])
    # row 2j+t of head h in the file is row h*d + t*d/2 + j of transformers' B
    for h in range(NH):
        for j in range(HD // 2):
            for t in range(2):
                np.testing.assert_array_equal(gq[h * HD + 2 * j + t], bq[h * HD + t * HD // 2 + j])
    assert not np.array_equal(gq, bq)
    np.testing.assert_array_equal(gk, to_gguf_rows(bk, NKV))
    assert not np.array_equal(gk, to_gguf_rows(bk, NH))  # k uses n_head_kv, not n_head
    np.testing.assert_array_equal(as_f64(ts["blk.0.attn_v.weight.lora_b"]), bv)


def test_qwen2_keeps_transformers_row_order(tmp_path):
    rng = np.random.default_rng(3)
    ad = tiny_adapter(rng)
    out = ad.save(tmp_path / "a.gguf", format="gguf", base=llama_config(tmp_path, model_type="qwen2"))
    kv, ts = read(out)
    assert kv["general.architecture"] == "qwen2"
    np.testing.assert_array_equal(as_f64(ts["blk.1.attn_q.weight.lora_b"]),
                                  ad.factors("model.layers.1.self_attn.q_proj")[1])


def llama_cpp_delta(kv, ts, name: str, heads: int = 0) -> np.ndarray:
    """The update llama.cpp applies at user scale 1: alpha / r * B A, r = ne[0] of lora_b,
    with the rows put back in transformers' order."""
    a, b = as_f64(ts[name + ".lora_a"]), as_f64(ts[name + ".lora_b"])
    d = kv["adapter.lora.alpha"] / int(ts[name + ".lora_b"].shape[0]) * (b @ a)
    if heads:
        inv = np.argsort(qk_row_order(d.shape[0], heads))
        d = d[inv]
    return d


def test_per_module_ranks_and_scalings_give_the_peft_update(tmp_path):
    # rank_pattern/alpha_pattern (and rsLoRA) scalings: llama.cpp takes r from each tensor and one
    # alpha, so what differs from alpha / r_m is folded into B; the update is PEFT's exactly.
    rng = np.random.default_rng(4)
    ad = tiny_adapter(rng, ranks={"model.layers.1.self_attn.q_proj": 6,
                                  "model.layers.0.self_attn.v_proj": 2})
    ad.scalings["model.layers.0.self_attn.k_proj"] = 0.37  # an alpha_pattern entry
    out = ad.save(tmp_path / "a.gguf", format="gguf", base=llama_config(tmp_path))
    kv, ts = read(out)
    assert kv["adapter.lora.alpha"] == pytest.approx(8.0)  # most modules: alpha 8, r 4
    assert list(ts["blk.1.attn_q.weight.lora_b"].shape) == [6, NH * HD]
    for L in range(NL):
        for m, heads in (("self_attn.q_proj", NH), ("self_attn.k_proj", NKV), ("self_attn.v_proj", 0)):
            name = f"blk.{L}.{GGUF_NAMES[m]}.weight"
            ref = ad.delta(f"model.layers.{L}.{m}")
            got = llama_cpp_delta(kv, ts, name, heads)
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_bfloat16_factors_and_provenance(tmp_path):
    import ml_dtypes

    rng = np.random.default_rng(5)
    ad = tiny_adapter(rng, dtype=ml_dtypes.bfloat16)
    ad.provenance = {"mode": "svd", "bank": ["x", "y"], "coefficients": np.array([0.5, 0.5])}
    out = ad.save(tmp_path / "a.gguf", format="gguf", base=llama_config(tmp_path))
    kv, ts = read(out)
    assert json.loads(kv["metalora.provenance"])["bank"] == ["x", "y"]
    a = ad.factors("model.layers.0.self_attn.v_proj")[0].astype(np.float64)
    np.testing.assert_array_equal(as_f64(ts["blk.0.attn_v.weight.lora_a"]), a)


# --- refusals -----------------------------------------------------------------------------


def nothing_left(tmp_path: Path, keep=("config.json", "base.gguf")):
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in keep) == []


def test_refuses_a_module_the_base_has_no_tensor_for(tmp_path):
    rng = np.random.default_rng(6)
    ad = tiny_adapter(rng)
    a, b = ad.factors("model.layers.1.self_attn.k_proj")
    bad = Adapter({**ad.modules, "model.layers.1.self_attn.rotary_thing": (a, b)},
                  {**ad.scalings, "model.layers.1.self_attn.rotary_thing": 2.0}, ad.config)
    with pytest.raises(GGUFError, match=r"module 'model.layers.1.self_attn.rotary_thing'.*no tensor"):
        bad.save(tmp_path / "a.gguf", format="gguf", base=llama_config(tmp_path))
    assert nothing_left(tmp_path)
    # beyond the base's block count
    with pytest.raises(GGUFError, match=r"model.layers.1.*beyond the base's 1 blocks"):
        ad.save(tmp_path / "a.gguf", format="gguf", base=llama_config(tmp_path, num_hidden_layers=1))
    # a GGUF base without that tensor
    with pytest.raises(GGUFError, match=r"model.layers.1.self_attn.q_proj.*no tensor 'blk.1.attn_q"):
        ad.save(tmp_path / "a.gguf", format="gguf",
                base=llama_gguf_base(tmp_path, skip="blk.1.attn_q.weight"))
    assert nothing_left(tmp_path)


def test_refuses_an_adapter_for_another_model(tmp_path):
    rng = np.random.default_rng(7)
    ad = tiny_adapter(rng)
    base = llama_gguf_base(tmp_path)
    m = "model.layers.0.self_attn.v_proj"
    a, b = ad.factors(m)
    odd = Adapter({**ad.modules, m: (a, np.zeros((b.shape[0] * 2, b.shape[1]), np.float32))},
                  ad.scalings, ad.config)
    with pytest.raises(GGUFError, match=r"module 'model.layers.0.self_attn.v_proj': the adapter "
                                        r"maps 64 -> 64 but the base's blk.0.attn_v.weight maps "
                                        r"64 -> 32"):
        odd.save(tmp_path / "a.gguf", format="gguf", base=base)
    assert nothing_left(tmp_path)


def test_refusals_of_options_and_bases(tmp_path):
    rng = np.random.default_rng(8)
    ad = tiny_adapter(rng)
    cfg = llama_config(tmp_path)
    with pytest.raises(GGUFError, match=r"needs the base model.*--base BASE"):
        ad.save(tmp_path / "a.gguf", format="gguf")
    with pytest.raises(GGUFError, match=r"out_type='f8'.*--out-type"):
        ad.save(tmp_path / "a.gguf", format="gguf", base=cfg, out_type="f8")
    with pytest.raises(TypeError, match=r"takes no option\(s\) \['rank'\]"):
        ad.save(tmp_path / "a.gguf", format="gguf", base=cfg, rank=4)
    with pytest.raises(TypeError, match=r"format='peft' takes no option"):
        ad.save(tmp_path / "p", format="peft", base=cfg)
    with pytest.raises(GGUFError, match="no such base model file"):
        ad.save(tmp_path / "a.gguf", format="gguf", base=tmp_path / "missing.gguf")
    with pytest.raises(GGUFError, match=r"model_type 'gpt2'.*give the base model's .gguf file"):
        ad.save(tmp_path / "a.gguf", format="gguf", base=llama_config(tmp_path, model_type="gpt2"))
    with pytest.raises(GGUFError, match=r"architecture 'falcon'.*q/k rows"):
        ad.save(tmp_path / "a.gguf", format="gguf", base=llama_gguf_base(tmp_path, arch="falcon"))
    fifo = Adapter(ad.modules, ad.scalings, {**ad.config, "fan_in_fan_out": True})
    with pytest.raises(GGUFError, match="fan_in_fan_out"):
        fifo.save(tmp_path / "a.gguf", format="gguf", base=llama_config(tmp_path))
    not_a_model = tmp_path / "adapter-as-base.gguf"
    ad.save(not_a_model, format="gguf", base=llama_config(tmp_path))
    with pytest.raises(GGUFError, match="must be a model file, not an adapter"):
        read_base(not_a_model)
    not_a_model.unlink()
    big = Adapter({m: (a, b * 1e5) for m, (a, b) in ad.modules.items()}, ad.scalings, ad.config)
    with pytest.raises(GGUFError, match=r"overflows float16.*f32 or bf16"):
        big.save(tmp_path / "a.gguf", format="gguf", base=llama_config(tmp_path), out_type="f16")
    assert nothing_left(tmp_path)


def test_publish_file_is_atomic_and_refuses_to_clobber(tmp_path):
    rng = np.random.default_rng(9)
    ad = tiny_adapter(rng)
    cfg = llama_config(tmp_path)
    out = ad.save(tmp_path / "a.gguf", format="gguf", base=cfg)
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ad.save(out, format="gguf", base=cfg)
    ad2 = tiny_adapter(np.random.default_rng(10))
    ad2.save(out, format="gguf", base=cfg, overwrite=True)
    assert out.read_bytes() != before
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    with pytest.raises(AdapterError, match="not a GGUF file; refusing"):
        ad.save(other, format="gguf", base=cfg, overwrite=True)
    assert other.read_text() == "mine"
    (tmp_path / "d").mkdir()
    with pytest.raises(AdapterError, match="not a regular file"):
        ad.save(tmp_path / "d", format="gguf", base=cfg, overwrite=True)
    # a failure half way leaves the old file and no temporary behind
    bad = Adapter({**ad.modules, "model.layers.0.nope": ad.modules["model.layers.0.self_attn.v_proj"]},
                  {**ad.scalings, "model.layers.0.nope": 1.0}, ad.config)
    snapshot = out.read_bytes()
    with pytest.raises(GGUFError):
        bad.save(out, format="gguf", base=cfg, overwrite=True)
    assert out.read_bytes() == snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "config.json", "d", "notes.txt"]


def test_writer_registry_lists_gguf():
    w = WRITERS["gguf"]
    assert w.single_file and w.magic == b"GGUF" and w.options == {"base", "out_type"}
    assert list(WRITERS)[0] == "peft"


# --- the CLI ------------------------------------------------------------------------------


def peft_dir(tmp_path: Path) -> Path:
    ad = tiny_adapter(np.random.default_rng(11))
    return ad.save(tmp_path / "my-adapter")


def test_cli_export(tmp_path, capsys):
    src = peft_dir(tmp_path)
    cfg = llama_config(tmp_path)
    assert main(["export", str(src), "--to", "gguf", "--base", str(cfg), "--out-type", "f16"]) == 0
    out = tmp_path / "my-adapter.gguf"
    assert f"adapter written to {out}" in capsys.readouterr().out
    kv, ts = read(out)
    assert kv["general.type"] == "adapter" and ts["blk.0.attn_q.weight.lora_a"].tensor_type.name == "F16"
    assert main(["export", str(src), "--to", "gguf", "--base", str(cfg)]) == 2
    assert "already exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert main(["export", str(src), "--to", "gguf", "--base", str(cfg), "--overwrite",
                 "--out", str(tmp_path / "b.gguf")]) == 0


@pytest.mark.parametrize("argv,msg", [
    (["--to", "gguf"], "--to gguf needs --base BASE"),
    (["--to", "peft", "--base", "x.gguf"], "--base does not apply to --to peft (only to --to gguf)"),
    (["--to", "peft", "--out-type", "f16"], "--out-type does not apply to --to peft"),
    (["--to", "gguf", "--base", "nope.gguf"], "nope.gguf: no such base model file"),
])
def test_cli_export_errors_name_the_flag(tmp_path, capsys, argv, msg):
    src = peft_dir(tmp_path)
    assert main(["export", str(src), *argv]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-adapter"]


def test_cli_generate_gguf_needs_base(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input": "a", "output": "b"}) + "\n")
    assert main(["generate", "--data", str(data), "--bank", str(tmp_path), "--format", "gguf",
                 "--out", str(tmp_path / "x.gguf")]) == 2
    assert "--format gguf needs --base BASE" in capsys.readouterr().err


def test_generate_checks_format_options_before_work(tmp_path, monkeypatch):
    # a bad base is refused before the bank is read or anything is embedded
    import importlib

    gen_mod = importlib.import_module("metalora.generate")

    def boom(*a, **k):
        raise AssertionError("work started")

    import metalora.demo

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input": "a", "output": "b"}) + "\n")
    monkeypatch.setattr(gen_mod, "BankIndex", boom)
    with pytest.raises(GGUFError, match="no such base model file"):
        metalora.generate(data, metalora.demo.demo_bank(), format="gguf",
                          format_options={"base": tmp_path / "none.gguf"}, out=tmp_path / "x.gguf")
