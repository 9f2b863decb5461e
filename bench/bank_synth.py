"""Synthetic Mistral-7B-shaped LoRA bank for the bank benchmarks, and the measurements.

Shapes follow the paper's bank (arXiv:2507.01806, Lots-of-LoRAs): Mistral-7B, 32 layers,
q/k/v, r = 16, lora_alpha = 32, A [16, 4096], B [4096, 16] (q) and [1024, 16] (k, v), bf16:
9.44 M parameters, 18.9 MB per adapter; 100 adapters = 1.89 GB. Files are written with the
safetensors library (as PEFT writes them) into a cache directory, once.

Usage::

    python bench/bank_synth.py generate [--n 100] [--dir bench/.cache/mistral_bank]
    python bench/bank_synth.py measure  [--dir ...] [--repeat 3] [--out bench/results_bank.md]
    python bench/bank_synth.py child OP DIR   # one measurement in a fresh process (peak RSS)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DIR = HERE / ".cache" / "mistral_bank"
LAYERS, R, ALPHA, HIDDEN, KV = 32, 16, 32, 4096, 1024
PROJ = (("q_proj", HIDDEN), ("k_proj", KV), ("v_proj", KV))


def module_names():
    return [f"model.layers.{l}.self_attn.{p}" for l in range(LAYERS) for p, _ in PROJ]


def generate(root: Path = DEFAULT_DIR, n: int = 100, seed: int = 0) -> Path:
    """Write n adapters (skipping those already complete) and return the bank directory."""
    import ml_dtypes
    from safetensors.numpy import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(seed)
    # One pool of N(0, 1/64) bf16 values; each adapter takes a random window of it (generating
    # 0.9 G fresh normals would dominate the set-up time and adds nothing to the measurement).
    pool = (rng.standard_normal(HIDDEN * R * 8, dtype=np.float32) / 8).astype(bf16)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": ALPHA,
           "base_model_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
           "target_modules": ["q_proj", "k_proj", "v_proj"], "use_rslora": False,
           "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False, "bias": "none",
           "use_dora": False, "modules_to_save": None, "lora_dropout": 0.05}
    lines = []
    for j in range(n):
        d = root / f"task{j:03d}"
        lines.append(json.dumps({"id": d.name, "adapter": d.name,
                                 "dataset": f"datasets/{d.name}.jsonl"}))
        if (d / "adapter_config.json").exists():
            continue
        d.mkdir(exist_ok=True)
        tensors = {}
        for l in range(LAYERS):
            for p, out in PROJ:
                key = f"base_model.model.model.layers.{l}.self_attn.{p}"
                for nm, shape in (("lora_A", (R, HIDDEN)), ("lora_B", (out, R))):
                    size = shape[0] * shape[1]
                    o = int(rng.integers(0, pool.size - size))
                    tensors[f"{key}.{nm}.weight"] = pool[o:o + size].reshape(shape)
        tmp = d / "adapter_model.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
    (root / "bank.jsonl").write_text("\n".join(lines) + "\n")
    return root


def bank_files(root: Path):
    return sorted(Path(root).glob("task*/adapter_model.safetensors"))


def drop_cache(root: Path) -> None:
    """Evict the bank's files from the page cache (POSIX_FADV_DONTNEED; only these files)."""
    for f in bank_files(root):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_with_safetensors(root: Path) -> int:
    """The peer: read every tensor of every file with safetensors' numpy API (bf16 through
    ml_dtypes), i.e. the bytes land in numpy arrays. Returns the bytes read."""
    import ml_dtypes  # noqa: F401  (lets safetensors' numpy API name bfloat16)
    from safetensors import safe_open

    total = 0
    for f in bank_files(root):
        with safe_open(str(f), framework="numpy") as g:
            for k in g.keys():
                total += g.get_tensor(k).nbytes
    return total


def dense_weights(n: int) -> np.ndarray:
    w = np.random.default_rng(1).random(n) + 0.1
    return w / w.sum()


def run_op(op: str, root: Path, threads: int = 0):
    import metalora

    if "-t" in op:  # e.g. "linear-t1": one OpenMP thread
        op, threads = op.split("-t")[0], int(op.split("-t")[1])

    t0 = time.perf_counter()
    if op == "read":
        nbytes = read_with_safetensors(root)
        return {"seconds": time.perf_counter() - t0, "bytes": nbytes}
    bank = metalora.Bank(root)
    t1 = time.perf_counter()
    n = len(bank)
    if op == "linear":
        out = metalora.combine_adapters(bank, dense_weights(n), mode="linear", threads=threads)
        nbytes = bank.nbytes()
    elif op == "svd8":
        out = metalora.combine_adapters(bank, dense_weights(n), mode="svd", rank=16, top_k=8,
                                        threads=threads)
        used = [a["id"] for a in out.provenance["adapters"]]
        nbytes = bank.nbytes(used)
    else:
        raise ValueError(op)
    t2 = time.perf_counter()
    return {"seconds": t2 - t1, "open_seconds": t1 - t0, "bytes": nbytes,
            "out_rank": out.config["r"]}


def _rss_mb() -> float:
    """Peak RSS of this process in MiB. Linux: VmHWM (ru_maxrss survives exec, so a child of a
    big process would report its parent's peak); elsewhere ru_maxrss (bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (2**20 if sys.platform == "darwin" else 2**10)


def child(op: str, root: str) -> None:
    import metalora  # noqa: F401  (count the imports in the baseline)
    import ml_dtypes  # noqa: F401
    import safetensors  # noqa: F401

    base = _rss_mb()
    res = run_op(op, Path(root))
    res["peak_rss_mb"] = _rss_mb()
    res["rss_before_mb"] = base
    print(json.dumps(res))


def in_child(op: str, root: Path, cold: bool) -> dict:
    if cold:
        drop_cache(root)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(HERE.parent / "python") + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, __file__, "child", op, str(root)], env=env,
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


OPS = ("read", "linear", "svd8")
NAMES = {"read": "read the bank's bytes (safetensors numpy API, every tensor)",
         "linear": "`linear`, dense weights (all 100 adapters)",
         "svd8": "`svd` rank 16, top-8 weights"}


def measure(root: Path, repeat: int, out: Path) -> str:
    """Each round runs every operation once, interleaved, each in a fresh process, so that the
    operations see the same background load; warm rounds first, then cold (page cache of the
    bank's files dropped before every run)."""
    runs = {(c, op): [] for c in ("warm", "cold") for op in OPS}
    for cache in ("warm", "cold"):
        if cache == "warm":
            read_with_safetensors(root)
        for _ in range(repeat):
            for op in OPS:
                r = in_child(op, root, cache == "cold")
                r["load1"] = os.getloadavg()[0]
                runs[cache, op].append(r)
    lines = ["| cache | operation | min (s) | median (s) | GB/s at min | x read (median) | "
             "bank open (s, median) | peak RSS (MiB) | load avg (1 min) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (cache, op), rs in runs.items():
        t = sorted(r["seconds"] for r in rs)
        med = float(np.median(t))
        base = float(np.median([r["seconds"] for r in runs[cache, "read"]]))
        opens = [r.get("open_seconds", 0.0) for r in rs]
        loads = [r["load1"] for r in rs]
        lines.append(f"| {cache} | {NAMES[op]} | {t[0]:.3f} | {med:.3f} | "
                     f"{rs[0]['bytes'] / t[0] / 1e9:.2f} | {med / base:.2f} | "
                     f"{float(np.median(opens)):.3f} | {max(r['peak_rss_mb'] for r in rs):.0f} | "
                     f"{min(loads):.1f}-{max(loads):.1f} |")
    lines.append("")
    lines.append(f"Rounds: {repeat}; peak RSS is VmHWM of a fresh process (imports: "
                 f"{max(r['rss_before_mb'] for rs in runs.values() for r in rs):.0f} MiB before "
                 f"the operation); the bank's files total {sum(f.stat().st_size for f in bank_files(root)) / 1e9:.2f} GB.")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["generate", "measure", "child"])
    ap.add_argument("args", nargs="*")
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.cmd == "generate":
        t = time.perf_counter()
        generate(a.dir, a.n)
        size = sum(f.stat().st_size for f in bank_files(a.dir))
        print(f"{a.dir}: {len(bank_files(a.dir))} adapters, {size / 1e9:.2f} GB "
              f"({time.perf_counter() - t:.1f} s)")
    elif a.cmd == "child":
        child(a.args[0], a.args[1])
    else:
        table = measure(a.dir, a.repeat, a.out)
        print(table)
        if a.out:
            a.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
