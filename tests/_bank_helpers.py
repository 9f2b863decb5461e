"""Builders for small PEFT-format adapters and banks, written with the safetensors library
(independent of metalora's own writer), for the adapter and bank tests."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

PREFIX = "base_model.model."

# A toy "model": two layers, q/k/v projections; k and v are narrower (grouped-query attention).
SHAPES = {f"model.layers.{l}.self_attn.{p}": (out, 24)
          for l in range(2) for p, out in (("q_proj", 24), ("k_proj", 8), ("v_proj", 8))}


def base_config(**over) -> dict:
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "toy/base",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "k_proj", "v_proj"],
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "fan_in_fan_out": False,
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "lora_dropout": 0.0,
    }
    cfg.update(over)
    return cfg


def random_factors(rng, shapes=SHAPES, r=4, rank_of=None) -> dict:
    out = {}
    for name, (n_out, n_in) in shapes.items():
        rr = rank_of(name) if rank_of else r
        out[name] = (rng.standard_normal((rr, n_in)).astype(np.float32),
                     rng.standard_normal((n_out, rr)).astype(np.float32))
    return out


def write_adapter(path, factors: dict, config: dict, dtype=np.float32, extra_tensors=None,
                  metadata=None) -> Path:
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in factors.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a.astype(dtype))
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b.astype(dtype))
    tensors.update(extra_tensors or {})
    save_file(tensors, str(path / "adapter_model.safetensors"),
              metadata=metadata or {"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return path


def make_bank(root, n=4, seed=0, dtype=np.float32, alphas=None, ranks=None, rslora=None,
              manifest=False) -> tuple:
    """n adapters under root/adapters (or root when no manifest); returns (bank_path, truth)
    where truth[id] = (factors, scalings) in float32 after the dtype round trip."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    base = root / "adapters" if manifest else root
    truth = {}
    lines = []
    for j in range(n):
        r = (ranks or [4] * n)[j]
        alpha = (alphas or [8 + 4 * j for j in range(n)])[j]
        rs = bool((rslora or [False] * n)[j])
        cfg = base_config(r=r, lora_alpha=alpha, use_rslora=rs)
        f = random_factors(rng, r=r)
        aid = f"task{j:03d}"
        write_adapter(base / aid, f, cfg, dtype=dtype)
        s = alpha / (np.sqrt(r) if rs else r)
        truth[aid] = ({k: (a.astype(dtype).astype(np.float32), b.astype(dtype).astype(np.float32))
                       for k, (a, b) in f.items()}, s)
        lines.append(json.dumps({"id": aid, "adapter": f"adapters/{aid}",
                                 "dataset": f"data/{aid}.jsonl", "n_examples": 100 + j}))
    if manifest:
        (root / "bank.jsonl").write_text("\n".join(lines) + "\n")
    return root, truth


def reference_delta(truth: dict, weights: dict) -> dict:
    """sum_j w_j s_j B_j A_j per module, float64."""
    out = {}
    for aid, w in weights.items():
        if w == 0:
            continue
        f, s = truth[aid]
        for name, (a, b) in f.items():
            d = w * s * (b.astype(np.float64) @ a.astype(np.float64))
            out[name] = out.get(name, 0) + d
    return out


def tree_checksums(root) -> dict:
    sums = {}
    for dirpath, _, files in os.walk(root):
        for fn in files:
            p = os.path.join(dirpath, fn)
            st = os.stat(p)
            with open(p, "rb") as f:
                sums[p] = (hashlib.sha256(f.read()).hexdigest(), st.st_mtime_ns, st.st_size)
    return sums


def listing(root) -> set:
    return {os.path.join(d, x) for d, ds, fs in os.walk(root) for x in ds + fs}
