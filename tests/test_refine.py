"""generate(refine=...): the search over coefficients scored by forward passes of a tiny random
Llama built here (the demonstration bank's shapes), against PEFT, and its refusals."""

from __future__ import annotations

import importlib.util
import json
import string

import numpy as np
import pytest

import metalora
from metalora.cli import main
from metalora.demo import demo_bank, example_dataset

from conftest import needs_embedder

torch = pytest.importorskip("torch", reason="refinement runs the model with torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("cma", reason="refinement searches with cma")


pytestmark = [needs_embedder, pytest.mark.usefixtures("shared_signature_cache")]


def tiny_model(path, hidden=64, seed=0):
    """A random Llama with the demonstration bank's q/v shapes and a character tokenizer."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = list(string.printable[:95]) + ["\n"]
    vocab = {c: i for i, c in enumerate(dict.fromkeys(chars))}
    vocab["<unk>"], vocab["</s>"] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                eos_token="</s>", pad_token="</s>")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=hidden,
                                   intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4,
                                   eos_token_id=vocab["</s>"], pad_token_id=vocab["</s>"])
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def _examples(n=16, seed=0):
    ds = metalora.load_dataset(example_dataset())
    idx = np.random.default_rng(seed).permutation(len(ds))[:n]
    return [(ds.inputs[i], ds.outputs[i]) for i in idx]


def _peft_nll(model_dir, adapter_dir, examples):
    """Mean target NLL of the examples under PEFT's own LoRA layers (float32, full logits)."""
    import peft

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for inp, out in examples:
            p = tok(inp + "\n", add_special_tokens=False)["input_ids"]
            t = tok(out, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor([p + t])
            logits = model(input_ids=ids).logits[0, :-1].float()
            lab = ids[0, 1:]
            nll = torch.nn.functional.cross_entropy(logits, lab, reduction="none")
            total += float(nll[len(p) - 1:].sum())
            count += len(t)
    return total / count


def test_scorer_nll_equals_peft_with_the_cat_adapter_of_the_same_coefficients(model_dir, tmp_path):
    pytest.importorskip("peft")
    from metalora.refine.scorer import TorchScorer, load_model

    bank = metalora.Bank(demo_bank())
    examples = _examples()
    cand = [0, 3, 5, 7]
    scorer = TorchScorer(*load_model(model_dir), bank, cand, examples, max_tokens=512)
    rng = np.random.default_rng(1)
    for c in (np.array([0.7, 0.2, -0.4, 1.1]), rng.uniform(-1.5, 1.5, 4)):
        got = scorer.nll(c)
        w = np.zeros(len(bank))
        w[cand] = c
        out = metalora.combine_adapters(bank, w, mode="cat").save(tmp_path / f"cat{got:.6f}")
        want = _peft_nll(model_dir, out, examples)
        # float32 throughout; the two engines order the low-rank products and the reductions
        # differently, so the mean NLL (~4.6 here, one float32 ulp ~5e-7) agrees to a few ulps:
        # 8 ulps allowed (seen: 1e-7), far below any difference the search acts on
        assert got == pytest.approx(want, abs=8 * float(np.spacing(np.float32(want))))
    assert scorer.nll(np.zeros(4)) == pytest.approx(scorer.nll_base(), abs=0)
    batched = scorer.nll_many([np.zeros(4), np.array([0.7, 0.2, -0.4, 1.1]), np.ones(4)])
    alone = [scorer.nll(np.zeros(4)), scorer.nll(np.array([0.7, 0.2, -0.4, 1.1])),
             scorer.nll(np.ones(4))]
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)


def test_a_shared_instruction_runs_once_and_gives_the_same_nll(model_dir):
    """Examples behind one long instruction: its cache is computed once per candidate and
    repeated; the NLL equals that of running every full prompt (float32: a few ulps apart, the
    attention over the cached prefix sums in another order)."""
    from metalora.refine.scorer import TorchScorer, load_model

    bank = metalora.Bank(demo_bank())
    instruction = "Definition: answer with the time of day the sentence implies.\n\nInput: "
    examples = [(instruction + i, o) for i, o in _examples(6)]
    cand = [1, 2, 4]
    shared = TorchScorer(*load_model(model_dir), bank, cand, examples, max_tokens=512)
    assert shared.prefix >= len(instruction)  # one token per character here
    whole = TorchScorer(*load_model(model_dir), bank, cand, examples, max_tokens=512)
    whole.prefix = 0
    cs = [np.zeros(3), np.array([0.7, -0.3, 1.2]), np.array([1.5, 0.1, 0.4])]
    got, want = shared.nll_many(cs), whole.nll_many(cs)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=16 * float(np.spacing(np.float32(w))))
    assert TorchScorer(*load_model(model_dir), bank, cand, _examples(6), max_tokens=512).prefix == 0


def test_refined_adapter_is_never_worse_than_the_start_and_is_deterministic(model_dir, tmp_path):
    opts = {"model": model_dir, "budget": 14, "examples": 12, "seed": 3, "progress": False}
    a = metalora.generate(example_dataset(), demo_bank(), refine=opts, out=tmp_path / "a")
    ref = a.provenance["refine"]
    assert ref["objective"] <= ref["start_objective"]
    assert ref["evaluations"] == 14 == len(ref["tried"])
    assert ref["tried"][0]["stage"] == "start" and ref["tried"][1]["scale"] == 0.0
    assert min(t["objective"] for t in ref["tried"]) == ref["objective"]
    assert np.isfinite(ref["written_nll"])
    b = metalora.generate(example_dataset(), demo_bank(), refine=opts, out=tmp_path / "b")
    la, lb = metalora.load_adapter(tmp_path / "a"), metalora.load_adapter(tmp_path / "b")
    for m in la.names:  # same seed, same search, same factors (timings aside)
        for x, y in zip(la.factors(m), lb.factors(m)):
            np.testing.assert_array_equal(x, y)
    assert [t["objective"] for t in ref["tried"]] == \
        [t["objective"] for t in b.provenance["refine"]["tried"]]
    prov = json.loads((tmp_path / "a" / "metalora.json").read_text())
    assert prov["refine"]["budget"] == 14 and prov["dataset"]["examples"] == 40 - 12
    w = {e["id"]: e["weight"] for e in prov["adapters"]}
    best = min(ref["tried"], key=lambda t: t["objective"])
    assert len(w) == sum(1 for x in a.generation.coefficients if x != 0) or best.get("k") == 0


def test_cli_refine_and_inspect(model_dir, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["generate", "--data", str(example_dataset()), "--bank", str(demo_bank()),
                 "--out", str(out), "--refine", "--model", str(model_dir), "--refine-budget", "9",
                 "--refine-examples", "8", "--quiet"]) == 0
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "refined     on 8 held-out examples" in text and "9 of 9 evaluations" in text


def test_refine_refusals_are_one_line_and_write_nothing(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "x"
    args = ["generate", "--data", str(example_dataset()), "--bank", str(demo_bank()),
            "--out", str(out)]
    small = tiny_model(tmp_path / "small", hidden=32)
    capsys.readouterr()
    cases = [
        (["--refine"], "--refine needs --model MODEL"),
        (["--refine", "--model", str(tmp_path / "nope")], "no such model"),
        (["--refine", "--model", str(model_dir), "--refine-budget", "0"],
         "refine budget (--refine-budget) must be a positive integer, got 0"),
        (["--refine", "--model", str(model_dir), "--refine-examples", "40"],
         "holds out 40 examples and needs at least 4 more for the distances, but the dataset has 40"),
        (["--refine", "--model", str(small)],
         "the model does not match the bank"),
        (["--model", str(model_dir)], "apply with --refine only"),
    ]
    for extra, message in cases:
        assert main(args + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0, (extra, err)
        assert not out.exists()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "cma" else real(name, *a))
    assert main(args + ["--refine", "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert "refinement needs cma: pip install 'metalora[refine]'" in err and "\n" not in err
    assert not out.exists()


def test_nothing_but_refine_imports_torch():
    import subprocess
    import sys

    code = ("import sys, metalora, metalora.refine, metalora.cli; metalora.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'cma') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_ngopt_search_is_never_worse_than_the_start_and_is_deterministic(model_dir):
    pytest.importorskip("nevergrad")
    from metalora.refine import RefineOptions, search
    from metalora.refine.scorer import TorchScorer, load_model

    bank = metalora.Bank(demo_bank())
    cand = [0, 3, 5, 7]
    scorer = TorchScorer(*load_model(model_dir), bank, cand, _examples(8), max_tokens=512)
    opts = RefineOptions(budget=16, examples=8, seed=2, optimizer="ngopt", progress=False)
    start = np.array([0.4, 0.3, 0.2, 0.1])
    a, b = search(scorer, start, opts), search(scorer, start, opts)
    assert a.evaluations == 16 and a.objective <= a.start_objective
    assert any(t["stage"] == "ngopt" for t in a.tried)
    assert a.coefficients.tolist() == b.coefficients.tolist()
    assert [t["objective"] for t in a.tried] == [t["objective"] for t in b.tried]
    with pytest.raises(ValueError, match="optimizer must be one of"):
        RefineOptions(optimizer="adam")
