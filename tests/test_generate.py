"""generate() and the metalora command, end to end on the demonstration bank and on a bank made
here; the written adapter loads in PEFT and equals the combination it claims."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import metalora
from metalora.cli import main
from metalora.default_bank import default_bank
from metalora.demo import DEMO_NOTICE, demo_bank, example_dataset

from conftest import needs_embedder

pytest.importorskip("metalora.embed")


needs_model = needs_embedder
pytestmark = pytest.mark.usefixtures("shared_signature_cache")


@needs_model
def test_generate_on_the_demo_bank_draws_on_the_related_tasks(tmp_path):
    bank = demo_bank()
    ad = metalora.generate(example_dataset(), bank, out=tmp_path / "a")
    gen = ad.generation
    assert gen.demonstration
    assert np.isclose(gen.coefficients.sum(), 1.0)
    # The held-out task (lowercase) is closest to the other letter-case tasks.
    assert {gen.top(2)[0][0], gen.top(2)[1][0]} == {"uppercase", "title_case"}
    prov = json.loads((tmp_path / "a" / "metalora.json").read_text())
    assert prov["distance"] == "sinkhorn" and prov["operator"] == "normalized"
    assert prov["demonstration_bank"] is True
    assert set(gen.timings) >= {"signatures", "distances", "operator", "combine", "write"}
    # The written factors are the svd combination of the bank with these coefficients.
    want = metalora.combine_adapters(metalora.Bank(bank), gen.coefficients, mode="svd")
    got = metalora.load_adapter(tmp_path / "a")
    for m in want.names:
        a1, b1 = want.factors(m)
        a2, b2 = got.factors(m)
        np.testing.assert_array_equal(a1, a2)
        np.testing.assert_array_equal(b1, b2)


@needs_model
@pytest.mark.parametrize("distance", ["mean_cosine", "mmd", "sliced_wasserstein", "energy", "gaussian_w2"])
def test_every_embedding_distance_runs(distance):
    ad = metalora.generate(example_dataset(), demo_bank(), distance=distance, top_k=3, mode="cat")
    w = ad.generation.coefficients
    assert np.count_nonzero(w) == 3 and np.isclose(w.sum(), 1.0)
    assert ad.generation.top(1)[0][0] in ("uppercase", "title_case")


@needs_model
def test_auto_temperature_and_the_neural_operator(tmp_path):
    pytest.importorskip("torch")
    bank = shutil.copytree(demo_bank(), tmp_path / "bank")
    ad = metalora.generate(example_dataset(), bank, tau="auto")
    assert ad.provenance["tau_auto"] and ad.generation.tau > 0
    assert list((bank / "metalora-index").glob("tau-*.npz")), "auto tau is kept in the index"
    with pytest.raises(ValueError, match=r"run `metalora bank index .*bank --neural --distance "
                                         r"sinkhorn` first"):
        metalora.generate(example_dataset(), bank, operator="neural")
    assert main(["bank", "index", str(bank), "--neural", "--epochs", "60"]) == 0
    assert (bank / "metalora-index" / "neural-sinkhorn.npz").is_file()
    ad = metalora.generate(example_dataset(), bank, operator="neural")
    assert np.isclose(ad.generation.coefficients.sum(), 1.0)
    with pytest.raises(ValueError, match=r"trained on sinkhorn, not mmd: run `metalora bank index "
                                         r".* --neural --distance mmd`"):
        metalora.generate(example_dataset(), bank, operator="neural", distance="mmd")


def test_generate_bad_input(tmp_path):
    bank = demo_bank()
    with pytest.raises(ValueError, match="distance='nope' is not one of"):
        metalora.generate(example_dataset(), bank, distance="nope")
    with pytest.raises(ValueError, match="pass tokenizer="):
        metalora.generate(example_dataset(), bank, distance="kl")
    with pytest.raises(ValueError, match="tau must be a positive number or 'auto'"):
        metalora.generate(example_dataset(), bank, tau=-1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        metalora.generate(empty, bank)
    assert not (tmp_path / "out").exists()


@needs_model
def test_cli_generate_inspect_plot(tmp_path, capsys):
    out = tmp_path / "adapter"
    bank = str(demo_bank())
    assert main(["generate", "--data", str(example_dataset()), "--bank", bank, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert DEMO_NOTICE in text and f"adapter written to {out}" in text
    assert "uppercase" in text
    # existing output is not overwritten without --overwrite
    assert main(["generate", "--data", str(example_dataset()), "--bank", bank, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["inspect", str(out)]) == 0
    assert "DEMONSTRATION" in capsys.readouterr().out
    assert main(["inspect", bank]) == 0
    assert "adapters     12" in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert main(["plot", str(out), "--out", str(tmp_path / "w.png")]) == 0
    assert (tmp_path / "w.png").stat().st_size > 1000


@needs_model
@pytest.mark.skipif(default_bank() is None, reason="the built-in SmolLM2-135M bank is not installed")
def test_cli_example_uses_the_builtin_smollm2_bank(tmp_path, capsys):
    """The README's main job: the example task (MC-TACO answers about absolute time points, no
    adapter of its own in the bank) draws first on the bank's other MC-TACO adapters (same
    passages and question style), and the output is a rank-8 PEFT adapter over SmolLM2-135M's 60
    q/v projections."""
    from metalora.default_bank import EXAMPLE_TASK

    out = tmp_path / "adapter"
    assert main(["generate", "--example", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "built-in: 48 task LoRAs" in text and DEMO_NOTICE not in text
    drew = text.split("drew on:")[1].strip().splitlines()
    assert all("_mctaco_" in line for line in drew[:4]), drew[:4]
    assert EXAMPLE_TASK not in text.split("drew on:")[1]
    ad = metalora.load_adapter(out)
    assert len(ad.names) == 60 and set(ad.ranks.values()) == {8}
    cfg = json.loads((out / "adapter_config.json").read_text())
    targets = cfg["target_modules"]
    assert len(targets) == 60 and all(t.endswith(("self_attn.q_proj", "self_attn.v_proj"))
                                       for t in targets)
    assert "SmolLM2-135M" in cfg["base_model_name_or_path"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no dataset: pass --data FILE" in err
    assert main(["generate", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "no such dataset file" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert main(["bank", "add", str(tmp_path), "--id", "a", "--adapter", str(tmp_path)]) == 2
    assert "metalora bank init" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_prints_every_problem_of_a_broken_bank(tmp_path, capsys):
    """`metalora inspect` on a bank with several problems names all of them (the message used to
    be cut to its first line, ending in "see the lines above" with nothing above)."""
    from _bank_helpers import make_bank

    root, _ = make_bank(tmp_path / "bank", n=30)
    for j in range(25):  # more problems than a BankError message lists
        (root / f"task{j:03d}" / "adapter_config.json").write_text("{not json")
    assert main(["inspect", str(root)]) == 2
    err = capsys.readouterr().err
    assert "25 problem(s) in the bank" in err
    for j in range(25):
        assert f"adapter 'task{j:03d}'" in err
    assert "see the lines above" not in err and "see .problems" not in err


def test_cli_does_not_turn_a_bug_into_a_user_error(monkeypatch):
    """A TypeError from inside metalora is a bug: it propagates (with its traceback) instead of
    becoming an exit-2 'error:' line."""
    import metalora.cli as cli

    def broken(args):
        raise TypeError("unsupported operand type(s)")

    monkeypatch.setattr(cli, "_cmd_info", broken)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["info"])


def test_cli_help_for_every_command():
    for cmd in (["--help"], ["generate", "--help"], ["bank", "index", "--help"], ["inspect", "--help"],
                ["plot", "--help"], ["demo", "--help"]):
        proc = subprocess.run([sys.executable, "-m", "metalora", *cmd], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: metalora" in proc.stdout


@needs_model
def test_cli_bank_init_add_and_generate_loads_in_peft(tmp_path, capsys):
    """A bank built with the CLI from the demo adapters; the generated adapter loads in PEFT on a
    tiny Llama of the same shapes, and its logits equal the base model plus the float64 update."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    src = demo_bank()
    bank = tmp_path / "bank"
    assert main(["bank", "init", str(bank)]) == 0
    for task in ("uppercase", "title_case", "add", "antonym"):
        assert main(["bank", "add", str(bank), "--id", task, "--adapter", str(src / "adapters" / task),
                     "--dataset", str(src / "data" / f"{task}.jsonl")]) == 0
    assert main(["bank", "add", str(bank), "--id", "add", "--adapter", str(src / "adapters" / "add")]) == 2
    assert "already used" in capsys.readouterr().err
    out = tmp_path / "new"
    assert main(["generate", "--data", str(example_dataset()), "--bank", str(bank), "--out", str(out),
                 "--mode", "cat", "--quiet"]) == 0
    prov = json.loads((out / "metalora.json").read_text())
    w = {e["id"]: e["weight"] for e in prov["adapters"]}

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4)
    base = transformers.LlamaForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        merged = transformers.LlamaForCausalLM(cfg).double().eval()
        merged.load_state_dict(base.state_dict())
        for name, mod in merged.named_modules():
            if name.endswith(("q_proj", "v_proj")):
                delta = 0
                for task, wt in w.items():
                    a = metalora.load_adapter(src / "adapters" / task)
                    A, B = (np.asarray(x, np.float64) for x in a.factors(name))
                    delta = delta + wt * a.scalings[name] * (B @ A)
                mod.weight += torch.from_numpy(delta)
        want = merged(ids).logits
        model = peft.PeftModel.from_pretrained(base, str(out)).double().eval()
        got = model(ids).logits
    # float32 factors (rounded once each) against the float64 truth: relative error ~1e-7.
    assert torch.allclose(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
