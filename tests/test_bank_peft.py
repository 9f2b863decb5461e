"""The output is a real PEFT adapter: PEFT loads it and the model computes the exact update.

A tiny random LlamaForCausalLM (built from a config in code; nothing is downloaded) gets K random
PEFT adapters (``init_lora_weights=False`` so B != 0) with different ``lora_alpha``, one with
rsLoRA. metalora combines them from disk; ``PeftModel.from_pretrained`` loads the result; its
logits must equal those of the base model with ``sum_j w_j s_j B_j A_j`` merged by hand in
float64.

Tolerance: the PEFT forward runs in float32 (unit roundoff u = 6e-8) through 2 layers of width
64; the combined factors are float32 (cat: a copy scaled once, svd: float64 Gram/SVD then a
float32 projection, relative error ~ 1e-6 of the update). Errors of a few u * sqrt(width) *
|activations| per op stay near 1e-6 relative to the logit scale (measured: 1.2e-6 for cat, 0.8e-6
for svd); we allow 2e-5 of the largest |logit| and assert that the adapters' effect on the logits
is more than 1e4 times larger than that.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from metalora import Bank, combine_adapters, load_adapter  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
# (r, lora_alpha, use_rslora)
SPECS = [(4, 8, False), (4, 32, True), (8, 4, False)]
WEIGHTS = [0.6, -0.3, 0.9]


def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("peft")
    base = _tiny_llama()
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    bank = root / "bank"
    for j, (r, alpha, rs) in enumerate(SPECS):
        model = _tiny_llama()  # same base weights every time
        torch.manual_seed(100 + j)
        lcfg = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rs, target_modules=TARGETS,
                               init_lora_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM")
        pm = peft.get_peft_model(model, lcfg)
        pm.save_pretrained(bank / f"a{j}")
    return root, base_dir, bank


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double().numpy()


def _reference_logits(base_dir, bank, ids):
    """float64 base model with the exact sum merged by hand from the saved PEFT files."""
    ref = transformers.LlamaForCausalLM.from_pretrained(base_dir).double().eval()
    params = dict(ref.named_parameters())
    from safetensors.torch import load_file

    for j, (r, alpha, rs) in enumerate(SPECS):
        s = alpha / (np.sqrt(r) if rs else r)
        sd = load_file(str(bank / f"a{j}" / "adapter_model.safetensors"))
        for key in sd:
            if not key.endswith("lora_A.weight"):
                continue
            mod = key[len("base_model.model."):-len(".lora_A.weight")]
            A = sd[key].double()
            B = sd[key.replace("lora_A", "lora_B")].double()
            with torch.no_grad():
                params[mod + ".weight"] += WEIGHTS[j] * s * (B @ A)
    return _logits(ref, ids)


@pytest.mark.parametrize("mode", ["cat", "svd"])
def test_peft_loads_combined_adapter_and_computes_the_exact_sum(setup, mode, tmp_path):
    root, base_dir, bank_dir = setup
    bank = Bank(bank_dir)
    assert bank.summary()["modules"] == 2 * len(TARGETS)
    R = sum(r for r, _, _ in SPECS)
    rank = R if mode == "svd" else None  # svd at full rank is exact
    out = combine_adapters(bank, WEIGHTS, mode=mode, rank=rank,
                           provenance={"distance": "test", "operator": "fixed"})
    path = out.save(tmp_path / f"combined-{mode}")
    assert out.config["r"] == R and out.config["lora_alpha"] == R

    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()
    base_logits = _logits(base, ids)
    model = peft.PeftModel.from_pretrained(base, str(path)).eval()
    got = _logits(model, ids)
    want = _reference_logits(base_dir, bank_dir, ids)

    scale = np.abs(want).max()
    effect = np.abs(want - base_logits).max()
    err = np.abs(got - want).max()
    assert effect > 1e4 * 2e-5 * scale, "the adapters must change the logits visibly"
    assert err <= 2e-5 * scale, f"max |error| {err:.3g} vs logit scale {scale:.3g}"

    # PEFT read every tensor we wrote (no missing/unexpected keys): each LoRA layer has rank R
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(lora_layers) == 2 * len(TARGETS)
    assert all(m.lora_A["default"].weight.shape[0] == R and m.scaling["default"] == 1.0
               for m in lora_layers)
    back = load_adapter(path)
    assert back.provenance["distance"] == "test" and len(back.provenance["adapters"]) == 3


def test_peft_reads_per_module_ranks(setup, tmp_path):
    """Adapters with rank_pattern/alpha_pattern: cat gives per-module ranks, written as an
    escaped rank_pattern/alpha_pattern (scaling 1 everywhere) that PEFT applies as intended."""
    root, base_dir, bank_dir = setup
    model = _tiny_llama()
    torch.manual_seed(7)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                           rank_pattern={"layers.1.self_attn.q_proj": 2, "up_proj": 6},
                           alpha_pattern={"v_proj": 3}, task_type="CAUSAL_LM")
    peft.get_peft_model(model, lcfg).save_pretrained(tmp_path / "bank" / "b_pattern")
    import shutil

    shutil.copytree(bank_dir / "a0", tmp_path / "bank" / "a0")
    bank = Bank(tmp_path / "bank")
    w = [0.5, -1.25]
    out = combine_adapters(bank, w, mode="cat")
    assert out.config["rank_pattern"]  # ranks differ per module
    path = out.save(tmp_path / "out")

    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(2))
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()
    base_logits = _logits(base, ids)
    got = _logits(peft.PeftModel.from_pretrained(base, str(path)).eval(), ids)
    ref = transformers.LlamaForCausalLM.from_pretrained(base_dir).double().eval()
    params = dict(ref.named_parameters())
    for j, aid in enumerate(bank):
        ad = bank[aid]
        for m in ad.names:
            with torch.no_grad():
                params[m + ".weight"] += torch.from_numpy(w[j] * ad.delta(m))
    want = _logits(ref, ids)
    scale = np.abs(want).max()
    assert np.abs(want - base_logits).max() > 1e3 * 2e-5 * scale
    assert np.abs(got - want).max() <= 2e-5 * scale
    # the pattern adapter's scalings were read as PEFT defines them
    b = bank["b_pattern"]
    assert b.scalings["model.layers.1.self_attn.q_proj"] == 8 / 2
    assert b.scalings["model.layers.0.mlp.up_proj"] == 8 / 6
    assert b.scalings["model.layers.0.self_attn.v_proj"] == 3 / 4
