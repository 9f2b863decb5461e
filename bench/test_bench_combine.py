"""Combination kernels against their peers, same inputs, same process.

1. `linear` over 48 Mistral-7B-shaped adapters (32 layers x q,k,v, r=16, bf16): metalora reads
   the bf16 bank; the peers are numpy's fp32 `w @ theta` over the same bank upcast (twice the
   bytes) and torch's bf16 `w @ theta`. Reported as bank bytes read per second.
2. `svd` on SmolLM2-135M shapes (30 layers x q,k,v,o,gate,up,down, 8 adapters r=8 -> rank 8)
   against PEFT's `add_weighted_adapter(combination_type="svd")` on the same factors, with the
   Frobenius error of both against the float64 dense truth.

Run: `pytest bench/test_bench_combine.py --benchmark-only -s` (needs ~4 GB of RAM; torch and
peft are optional and their rows are skipped with a message when missing).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import metalora
from conftest import median_seconds, report

pytest.importorskip("pytest_benchmark")

# ------------------------------------------------------------------ linear, Mistral-7B shapes

K_LINEAR = 48
MISTRAL = [(f"layers.{i}.self_attn.{p}_proj", 4096 if p == "q" else 1024, 4096)
           for i in range(32) for p in ("q", "k", "v")]  # (name, out, in)
R = 16


@pytest.fixture(scope="module")
def mistral_bank():
    """48 adapters as rows of one [K, P] bf16 matrix; module factors are views into it."""
    sizes = [(R * n_in, n_out * R) for _, n_out, n_in in MISTRAL]
    P = sum(a + b for a, b in sizes)
    rng = np.random.default_rng(0)
    theta = np.empty((K_LINEAR, P), dtype=ml_dtypes.bfloat16)
    for k in range(K_LINEAR):
        theta[k] = (rng.standard_normal(P, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    modules, off = {}, 0
    for (name, n_out, n_in), (na, nb) in zip(MISTRAL, sizes):
        A = [theta[k, off:off + na].reshape(R, n_in) for k in range(K_LINEAR)]
        B = [theta[k, off + na:off + na + nb].reshape(n_out, R) for k in range(K_LINEAR)]
        modules[name] = (A, B)
        off += na + nb
    w = rng.uniform(0.0, 1.0, K_LINEAR)
    return theta, modules, w / w.sum()


def test_linear_metalora_bf16(benchmark, mistral_bank, copy_roof_gbs):
    theta, modules, w = mistral_bank
    benchmark.pedantic(metalora.combine_modules, args=(modules, w), kwargs={"mode": "linear"},
                       rounds=5, warmup_rounds=1)
    t = median_seconds(benchmark)
    report("linear 48x Mistral-7B q,k,v r16", "metalora bf16", t, bytes_read_GB=theta.nbytes / 1e9,
           GBps=theta.nbytes / t / 1e9, roof_copy_GBps=copy_roof_gbs,
           isa=metalora.capabilities()["active"])


def test_linear_numpy_fp32(benchmark, mistral_bank):
    theta, _, w = mistral_bank
    theta32 = theta.astype(np.float32)
    w32 = w.astype(np.float32)
    benchmark.pedantic(lambda: w32 @ theta32, rounds=5, warmup_rounds=1)
    t = median_seconds(benchmark)
    report("linear 48x Mistral-7B q,k,v r16", "numpy fp32 w @ theta", t,
           bytes_read_GB=theta32.nbytes / 1e9, GBps=theta32.nbytes / t / 1e9)


def test_linear_torch_bf16(benchmark, mistral_bank):
    torch = pytest.importorskip("torch", reason="torch not installed: torch row skipped")
    theta, _, w = mistral_bank
    tt = torch.from_numpy(theta.view(np.uint16)).view(torch.bfloat16)
    tw = torch.tensor(w, dtype=torch.bfloat16)[None, :]
    benchmark.pedantic(lambda: tw @ tt, rounds=2, warmup_rounds=0)
    t = median_seconds(benchmark)
    report("linear 48x Mistral-7B q,k,v r16", "torch bf16 w @ theta", t,
           bytes_read_GB=theta.nbytes / 1e9, GBps=theta.nbytes / t / 1e9)


# ------------------------------------------------------------------ svd, SmolLM2-135M shapes

K_SVD, R_SVD = 8, 8
SMOL_MODULES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576),
                "o_proj": (576, 576), "gate_proj": (1536, 576), "up_proj": (1536, 576),
                "down_proj": (576, 1536)}  # (out, in)


def smol_factors(seed=1):
    rng = np.random.default_rng(seed)
    modules = {}
    for layer in range(30):
        for name, (n_out, n_in) in SMOL_MODULES.items():
            A = [(rng.standard_normal((R_SVD, n_in)) / np.sqrt(n_in)).astype(np.float32) for _ in range(K_SVD)]
            B = [(rng.standard_normal((n_out, R_SVD)) * 0.05).astype(np.float32) for _ in range(K_SVD)]
            modules[f"layers.{layer}.{name}"] = (A, B)
    w = rng.uniform(0.05, 1.0, K_SVD)
    alphas = [8.0, 16.0, 8.0, 32.0, 16.0, 8.0, 16.0, 8.0]
    return modules, w / w.sum(), np.array(alphas) / R_SVD


def truth_errors(modules, w, s, results):
    """Per module: (||got - dW||_F - ||best_r - dW||_F) / ||dW||_F, float64 dense truth."""
    worst_excess, worst_rel = 0.0, 0.0
    for name, (A, B) in modules.items():
        dW = sum(w[j] * s[j] * (B[j].astype(np.float64) @ A[j].astype(np.float64)) for j in range(len(A)))
        U, S, Vt = np.linalg.svd(dW, full_matrices=False)
        best = (U[:, :R_SVD] * S[:R_SVD]) @ Vt[:R_SVD]
        got = results[name]
        norm = np.linalg.norm(dW)
        worst_excess = max(worst_excess, (np.linalg.norm(got - dW) - np.linalg.norm(best - dW)) / norm)
        worst_rel = max(worst_rel, np.linalg.norm(got - best) / norm)
    return worst_excess, worst_rel


@pytest.fixture(scope="module")
def smol():
    return smol_factors()


def test_svd_metalora_smollm2(benchmark, smol):
    modules, w, s = smol
    out = benchmark.pedantic(metalora.combine_modules, args=(modules, w),
                             kwargs={"scalings": s, "mode": "svd", "rank": R_SVD},
                             rounds=5, warmup_rounds=1)
    t = median_seconds(benchmark)
    got = {n: b.astype(np.float64) @ a.astype(np.float64) for n, (a, b) in out.items()}
    excess, rel = truth_errors(modules, w, s, got)
    report("svd 8x SmolLM2-135M 210 modules r8", "metalora", t, modules_per_s=len(modules) / t,
           excess_frob_err=excess, rel_frob_err_vs_best=rel)


def test_svd_peft_smollm2(benchmark, smol):
    torch = pytest.importorskip("torch", reason="torch not installed: PEFT row skipped")
    peft = pytest.importorskip("peft", reason="peft not installed: PEFT row skipped")
    transformers = pytest.importorskip("transformers")
    modules, w, s = smol
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3)
    base = transformers.LlamaForCausalLM(cfg)
    names = [f"a{j}" for j in range(K_SVD)]
    targets = list(SMOL_MODULES)
    model = None
    for j, name in enumerate(names):
        lc = peft.LoraConfig(r=R_SVD, lora_alpha=s[j] * R_SVD, target_modules=targets,
                             init_lora_weights=False)
        if model is None:
            model = peft.get_peft_model(base, lc, adapter_name=name)
        else:
            model.add_adapter(name, lc)
    # Load the same factors into PEFT.
    with torch.no_grad():
        for mod_name, mod in model.named_modules():
            if not hasattr(mod, "lora_A") or names[0] not in mod.lora_A:
                continue
            key = "layers." + mod_name.split("layers.")[1].split(".")[0] + "." + mod_name.rsplit(".", 1)[1]
            A, B = modules[key]
            for j, name in enumerate(names):
                mod.lora_A[name].weight.copy_(torch.from_numpy(A[j]))
                mod.lora_B[name].weight.copy_(torch.from_numpy(B[j]))
    counter = iter(range(100))

    def run():
        model.add_weighted_adapter(names, list(map(float, w)), f"svd{next(counter)}",
                                   combination_type="svd", svd_rank=R_SVD)

    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    t = median_seconds(benchmark)
    got = {}
    for mod_name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "svd0" in mod.lora_A:
            key = "layers." + mod_name.split("layers.")[1].split(".")[0] + "." + mod_name.rsplit(".", 1)[1]
            got[key] = mod.get_delta_weight("svd0").double().numpy()
    excess, rel = truth_errors(modules, w, s, got)
    report("svd 8x SmolLM2-135M 210 modules r8", "peft add_weighted_adapter svd", t,
           modules_per_s=len(modules) / t, excess_frob_err=excess, rel_frob_err_vs_best=rel)
