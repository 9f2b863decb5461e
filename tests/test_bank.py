"""Banks on disk: opening, validation reports, combining from disk, bank never modified."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from metalora import (AdapterError, Bank, BankError, combine, combine_adapters, load_adapter)

from _bank_helpers import (BF16, SHAPES, base_config, listing, make_bank, random_factors,
                           reference_delta, tree_checksums, write_adapter)


def _delta(ad, name):
    a, b = ad.modules[name]
    return ad.scalings[name] * (b.astype(np.float64) @ a.astype(np.float64))


def test_directory_bank(tmp_path):
    root, truth = make_bank(tmp_path / "bank", n=3)
    (root / "notes").mkdir()  # a directory that is not an adapter is ignored
    bank = Bank(root)
    assert len(bank) == 3 and list(bank) == ["task000", "task001", "task002"]
    assert "task001" in bank and bank.index("task002") == 2 and bank.index(-1) == 2
    assert bank.keys() == bank.ids and bank.values()[1] is bank["task001"] is bank[1]
    assert bank["task001"].scalings[next(iter(SHAPES))] == 12 / 4
    assert bank.dataset_path("task000") is None
    s = bank.summary()
    assert s["adapters"] == 3 and s["modules"] == len(SHAPES) and s["ranks"] == {4: 18}
    assert s["dtypes"] == {"float32": 3} and s["base_model"] == "toy/base"
    assert s["bytes"] == 3 * sum(4 * (n_in + n_out) * 4 for n_out, n_in in SHAPES.values())
    assert "3 adapters" in repr(bank)
    with pytest.raises(KeyError, match="no adapter with id 'x'"):
        bank["x"]


def test_manifest_bank(tmp_path):
    root, truth = make_bank(tmp_path, n=3, manifest=True)
    for bank in (Bank(root / "bank.jsonl"), Bank(root)):
        assert bank.ids == ["task000", "task001", "task002"]
        assert bank.dataset_path("task001") == (root / "data/task001.jsonl").resolve()
        assert bank.info("task002")["n_examples"] == 102


def test_manifest_errors(tmp_path):
    make_bank(tmp_path, n=2, manifest=True)
    m = tmp_path / "bank.jsonl"
    lines = m.read_text().splitlines()
    m.write_text(lines[0] + "\n" + lines[0] + "\n")
    with pytest.raises(AdapterError, match=r"bank.jsonl: line 2: id 'task000' already used"):
        Bank(m)
    m.write_text(lines[0] + "\n{oops\n")
    with pytest.raises(AdapterError, match=r"bank.jsonl: line 2: not valid JSON"):
        Bank(m)
    m.write_text(json.dumps({"id": "x"}) + "\n")
    with pytest.raises(AdapterError, match=r"line 1: .*'adapter'"):
        Bank(m)
    m.write_text(json.dumps({"id": "x", "adapter": "adapters/none"}) + "\n")
    with pytest.raises(BankError, match=r"adapter 'x': .*none: no such adapter directory"):
        Bank(m)


def test_bad_bank_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such bank"):
        Bank(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapters found"):
        Bank(tmp_path / "empty")
    root, _ = make_bank(tmp_path / "b", n=2)
    with pytest.raises(AdapterError, match="single adapter, not a bank"):
        Bank(root / "task000")


def test_validation_reports_every_problem_precisely(tmp_path):
    root, _ = make_bank(tmp_path, n=5)
    rng = np.random.default_rng(5)
    # task001: other base model; task002: a module missing; task003: wrong shape in one module
    cfg = json.loads((root / "task001/adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "other/model"
    (root / "task001/adapter_config.json").write_text(json.dumps(cfg))
    f = random_factors(rng)
    gone = "model.layers.1.self_attn.v_proj"
    del f[gone]
    shutil.rmtree(root / "task002")
    write_adapter(root / "task002", f, base_config(lora_alpha=16))
    shapes = dict(SHAPES)
    bad = "model.layers.0.self_attn.k_proj"
    shapes[bad] = (8, 20)
    shutil.rmtree(root / "task003")
    write_adapter(root / "task003", random_factors(rng, shapes), base_config())
    with pytest.raises(BankError) as ei:
        Bank(root)
    msg = str(ei.value)
    assert len(ei.value.problems) == 3, msg
    assert "adapter 'task001'" in msg and "'other/model', expected 'toy/base' (as 4 of 5" in msg
    assert "adapter 'task002'" in msg and "lacks 1 module" in msg and gone in msg
    assert ("adapter 'task003'" in msg and f"module '{bad}'" in msg and "in_features=20" in msg
            and "expected in_features=24, out_features=8" in msg)
    # a broken adapter is reported with the bank's id and the file
    (root / "task004/adapter_model.safetensors").write_bytes(b"\0" * 4)
    with pytest.raises(BankError, match=r"adapter 'task004': .*adapter_model.safetensors: file is 4 "
                                        r"bytes"):
        Bank(root)


def test_intersection(tmp_path):
    root, truth = make_bank(tmp_path, n=3)
    rng = np.random.default_rng(7)
    f = random_factors(rng)
    gone = "model.layers.1.self_attn.v_proj"
    del f[gone]
    shutil.rmtree(root / "task001")
    write_adapter(root / "task001", f, base_config(lora_alpha=12))
    truth["task001"] = (f, 3.0)
    with pytest.raises(BankError, match="lacks 1 module.*that 2 of 3 adapters have") as ei:
        Bank(root)
    assert len(ei.value.problems) == 1 and "task001" in str(ei.value)
    bank = Bank(root, modules="intersection")
    assert gone not in bank.modules and bank.dropped_modules == [gone]
    w = {"task000": 0.5, "task001": -1.0, "task002": 0.25}
    out = combine_adapters(bank, w, mode="cat")
    assert sorted(out.modules) == sorted(set(SHAPES) - {gone})
    # the output names its modules exactly, so PEFT adapts nothing else
    assert sorted(out.config["target_modules"]) == sorted(out.modules)
    ref = reference_delta(truth, w)
    for name in out.modules:
        np.testing.assert_allclose(_delta(out, name), ref[name], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["linear", "cat", "svd"])
@pytest.mark.parametrize("dtype", [np.float32, "bf16"])
def test_combine_adapters_matches_combine(tmp_path, mode, dtype):
    dt = BF16 if dtype == "bf16" else np.dtype(dtype)
    root, truth = make_bank(tmp_path, n=5, dtype=dt, rslora=[0, 1, 0, 0, 0])
    bank = Bank(root)
    w = np.array([0.3, 0.0, -0.5, 0.7, 0.1])
    out, info = combine_adapters(bank, w, mode=mode, log=True, batch_bytes=1)
    assert all(v == 1.0 for v in out.scalings.values())
    r = 4 if mode != "cat" else 16
    assert out.config["r"] == r and out.config["lora_alpha"] == r and not out.config["rank_pattern"]
    assert out.config["target_modules"] == ["q_proj", "k_proj", "v_proj"]
    assert out.config["base_model_name_or_path"] == "toy/base"
    assert out.config["task_type"] == "CAUSAL_LM"
    ids = bank.ids
    for name in SHAPES:
        # same as metalora.combine on the same arrays
        A = [truth[i][0][name][0] for i in ids]
        B = [truth[i][0][name][1] for i in ids]
        s = [truth[i][1] for i in ids]
        a2, b2 = combine(A, B, w, scalings=s, mode=mode)
        a1, b1 = out.modules[name]
        # the same kernels on the same values (bf16 widens exactly): the same bits
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(b1, b2)
        assert info[name]["used"] == ["task000", "task002", "task003", "task004"]
    p = out.provenance
    assert p["mode"] == mode and [a["id"] for a in p["adapters"]] == ["task000", "task002",
                                                                       "task003", "task004"]
    assert p["adapters"][1]["weight"] == -0.5


def test_weights_dict_top_k_and_batches(tmp_path):
    root, truth = make_bank(tmp_path, n=6, ranks=[4, 4, 2, 4, 3, 4])
    bank = Bank(root)
    w = {"task001": 0.1, "task002": -0.9, "task004": 0.5, "task005": 0.3}
    ref = reference_delta(truth, {"task002": -0.9, "task004": 0.5})
    outs = [combine_adapters(bank, w, mode="cat", top_k=2, batch_bytes=b)
            for b in (1, 2000, None)]
    for out in outs:
        assert out.config["r"] == 5
        assert [a["id"] for a in out.provenance["adapters"]] == ["task002", "task004"]
        for name in SHAPES:
            np.testing.assert_allclose(_delta(out, name), ref[name], rtol=1e-5, atol=1e-4)
    # svd at full rank is exact too; a smaller rank keeps the best rank-r part
    out = combine_adapters(bank, w, mode="svd", rank=5, top_k=2, provenance={"distance": "swd"})
    assert out.provenance["distance"] == "swd" and out.provenance["svd_energy"]["min"] > 0.999
    for name in SHAPES:
        np.testing.assert_allclose(_delta(out, name), ref[name], rtol=1e-4, atol=1e-4)
    with pytest.raises(KeyError, match="no adapter with id 'zzz'"):
        combine_adapters(bank, {"zzz": 1.0})
    with pytest.raises(ValueError, match="has 2 values but the bank has 6"):
        combine_adapters(bank, [1.0, 2.0])
    with pytest.raises(ValueError, match="all weights are zero"):
        combine_adapters(bank, {"task000": 0.0})
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        combine_adapters(bank, w, top_k=0)
    with pytest.raises(ValueError, match="mode='linear' needs equal ranks"):
        combine_adapters(bank, w, mode="linear")


def test_mixed_ranks_write_rank_pattern_that_peft_config_reads(tmp_path):
    # cat over adapters whose ranks differ per module gives per-module ranks: rank_pattern.
    rng = np.random.default_rng(3)
    q1 = "model.layers.1.self_attn.q_proj"
    write_adapter(tmp_path / "b/x", random_factors(rng), base_config())
    write_adapter(tmp_path / "b/y", random_factors(rng, rank_of=lambda n: 2 if n == q1 else 4),
                  base_config(rank_pattern={"layers.1.self_attn.q_proj": 2}))
    out = combine_adapters(Bank(tmp_path / "b"), [1.0, 1.0], mode="cat")
    cfg = out.config
    assert cfg["r"] == 8 and cfg["rank_pattern"] == cfg["alpha_pattern"] and \
        list(cfg["rank_pattern"].values()) == [6]
    from metalora.adapter import module_scaling

    for name in SHAPES:
        assert module_scaling(cfg, name) == (out.ranks[name], 1.0)
    back = load_adapter(out.save(tmp_path / "out"))
    assert back.scalings == out.scalings


def test_zero_weight_adapters_are_never_read(tmp_path):
    root, truth = make_bank(tmp_path, n=3)
    # poison an adapter's data (same size, valid header): NaN everywhere
    p = root / "task001/adapter_model.safetensors"
    raw = bytearray(p.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    raw[8 + n:] = np.full((len(raw) - 8 - n) // 4, np.nan, np.float32).tobytes()
    p.write_bytes(bytes(raw))
    bank = Bank(root)
    out = combine_adapters(bank, [1.0, 0.0, 2.0], mode="cat")
    assert out.config["r"] == 8
    with pytest.raises(AdapterError, match=r"task001/adapter_model.safetensors: tensor .* NaN"):
        combine_adapters(bank, [1.0, 0.5, 2.0], mode="cat")


def test_bank_is_never_modified(tmp_path):
    root, truth = make_bank(tmp_path / "bank", n=4, dtype=BF16, manifest=True)
    before = tree_checksums(root)
    names_before = listing(tmp_path)
    bank = Bank(root)
    for mode in ("linear", "cat", "svd"):
        out = combine_adapters(bank, [0.5, -0.2, 0.0, 1.0], mode=mode)
    # every failure path leaves no output and no temporary
    with pytest.raises(FileExistsError):
        out.save(root / "adapters" / "task000")
    with pytest.raises(AdapterError, match="not adapter files"):
        out.save(root, overwrite=True)
    assert listing(tmp_path) == names_before
    out.save(tmp_path / "new")
    assert tree_checksums(root) == before
    for _, a in bank.items():
        for x in a.modules.values():
            assert not x[0].flags.writeable


def test_from_adapters_list(tmp_path):
    root, truth = make_bank(tmp_path, n=3)
    ads = [load_adapter(root / i) for i in sorted(truth)]
    out = combine_adapters(ads, [1.0, 1.0, 1.0], mode="cat")
    ref = reference_delta(truth, dict.fromkeys(truth, 1.0))
    for name in SHAPES:
        np.testing.assert_allclose(_delta(out, name), ref[name], rtol=1e-5, atol=1e-4)
    assert [a["id"] for a in out.provenance["adapters"]] == ["0", "1", "2"]


@pytest.mark.parametrize("max_open", [256, 1])
def test_mappings_are_released(tmp_path, monkeypatch, max_open):
    import metalora.bank as mb

    monkeypatch.setattr(mb, "_MAX_OPEN", max_open)
    root, truth = make_bank(tmp_path, n=3)
    bank = Bank(root)
    held = bank["task002"].modules  # the user holds views of this one: it stays mapped
    w = {"task000": 1.0, "task001": 2.0, "task002": 0.5}
    out = combine_adapters(bank, w, mode="cat", batch_bytes=1)
    assert [bank[i].is_mapped for i in bank] == [False, False, True]
    ref = reference_delta(truth, w)
    for name in SHAPES:
        np.testing.assert_allclose(_delta(out, name), ref[name], rtol=1e-5, atol=1e-4)
    assert held[name][0].shape == (4, 24)


def test_extra_module_reported_on_the_odd_adapter(tmp_path):
    root, _ = make_bank(tmp_path, n=3)
    rng = np.random.default_rng(9)
    shapes = dict(SHAPES)
    shapes["model.layers.0.mlp.up_proj"] = (40, 24)
    shutil.rmtree(root / "task002")
    write_adapter(root / "task002", random_factors(rng, shapes), base_config())
    with pytest.raises(BankError, match=r"task002.*has 1 module\(s\) that 2 of 3 adapters lack, "
                                        r"e.g. \['model.layers.0.mlp.up_proj'\]") as ei:
        Bank(root)
    assert len(ei.value.problems) == 1
    assert Bank(root, modules="intersection").dropped_modules == ["model.layers.0.mlp.up_proj"]


@pytest.mark.parametrize("mode", ["linear", "cat", "svd"])
def test_mixed_dtypes_in_one_bank(tmp_path, mode):
    root, truth = make_bank(tmp_path, n=3, dtype=BF16)
    rng = np.random.default_rng(11)
    for aid, dt in (("task001", np.float32), ("task002", np.float16)):
        f = random_factors(rng)
        shutil.rmtree(root / aid)
        write_adapter(root / aid, f, base_config(lora_alpha=4), dtype=dt)
        truth[aid] = ({k: (a.astype(dt).astype(np.float32), b.astype(dt).astype(np.float32))
                       for k, (a, b) in f.items()}, 1.0)
    bank = Bank(root)
    assert bank.summary()["dtypes"] == {"bfloat16": 1, "float16": 1, "float32": 1}
    w = {"task000": 0.5, "task001": 1.5, "task002": -0.75}
    out = combine_adapters(bank, w, mode=mode, rank=12 if mode == "svd" else None)
    if mode != "linear":  # linear is not the exact sum
        ref = reference_delta(truth, w)
        for name in SHAPES:
            np.testing.assert_allclose(_delta(out, name), ref[name], rtol=1e-4, atol=1e-4)
    else:  # the paper's factor-wise rule: A = sum w_j A_j, B = sum w_j s_j B_j
        for name in SHAPES:
            A_ref = sum(w[k] * f[name][0].astype(np.float64) for k, (f, _) in truth.items())
            B_ref = sum(w[k] * s * f[name][1].astype(np.float64) for k, (f, s) in truth.items())
            a, b = out.factors(name)
            # three float32 products and sums of float32 inputs: <= 4 eps32 of the largest term
            for got, ref in ((a, A_ref), (b, B_ref)):
                scale = max(abs(w[k]) * (s if got is b else 1.0) for k, (_, s) in truth.items())
                tol = 4 * np.finfo(np.float32).eps * scale * max(
                    np.abs(f[name][got is b]).max() for f, _ in truth.values())
                np.testing.assert_allclose(got, ref, rtol=0, atol=tol)
