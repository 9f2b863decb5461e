"""End-to-end `metalora.generate` on a Mistral-7B-shaped synthetic bank (issue 6's benchmark).

The bank: N adapters written by ``bank_synth.generate`` (bf16, q/k/v, r = 16, 18.9 MB each),
each pointing to a small dataset of real sentences (BIG-bench Natural-Instructions inputs from
``bench/data/ni_sentences_1000.jsonl``, 32 per adapter, drawn with the adapter's seed), whose
signatures are embedded once and cached. The query: all 1000 sentences, made unique per run so
its signature is never in the cache (the embed stage is always measured).

Usage (long: run it in the background, it is resumable)::

    nohup python bench/generate_synth.py prepare --n 500 > bench/.cache/generate_prepare.log &
    python bench/generate_synth.py measure --n 500 [--repeat 3] [--distance sinkhorn]

``measure`` runs each generate in a fresh process and prints per-stage times and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bank_synth  # noqa: E402

CACHE = HERE / ".cache"
SENTENCES = HERE / "data" / "ni_sentences_1000.jsonl"
PER_DATASET = 32


def bank_dir(n: int) -> Path:
    return CACHE / f"mistral_bank_{n}"


def _sentences() -> list:
    rows = [json.loads(line) for line in SENTENCES.read_text(encoding="utf-8").splitlines()[1:]]
    return [r["text"] for r in rows]


def prepare(n: int) -> None:
    root = bank_dir(n)
    t = time.perf_counter()
    bank_synth.generate(root, n)
    print(f"bank of {n} adapters at {root} ({time.perf_counter() - t:.0f}s)", flush=True)
    texts = _sentences()
    (root / "datasets").mkdir(exist_ok=True)
    for j in range(n):
        path = root / "datasets" / f"task{j:03d}.jsonl"
        if path.exists():
            continue
        rng = np.random.default_rng(1000 + j)
        rows = [{"input": texts[i], "output": ""} for i in rng.choice(len(texts), PER_DATASET, replace=False)]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, path)
    os.environ.setdefault("METALORA_CACHE_DIR", str(CACHE / "metalora-cache"))
    import metalora
    from metalora.datasets import load_dataset
    from metalora.signatures import DEFAULT_N, DEFAULT_SEED, SignatureCache, signature_key

    # The 500 datasets draw from the same 1000 sentences: embed those once and store each
    # dataset's rows in the signature cache under the key generate() looks up (an embedding
    # does not depend on the batch it is computed in, beyond float rounding ~1e-7), instead of
    # embedding 16,000 texts one dataset at a time (~16 minutes on 2 loaded cores).
    t = time.perf_counter()
    emb = metalora.Embedder(progress=False)
    cache = SignatureCache()
    bank = metalora.Bank(root)
    sets = [load_dataset(bank.dataset_path(k), what="input+output").subsample(DEFAULT_N,
                                                                            DEFAULT_SEED)
            for k in bank.ids]
    unique = sorted({x for ds in sets for x in ds.texts()})
    points = dict(zip(unique, emb.embed(unique)))
    for k, ds in zip(bank.ids, sets):
        key = signature_key(ds, embedder=emb)
        if key not in cache:
            cache.store(key, {"points": np.stack([points[x] for x in ds.texts()])},
                        meta={"source": str(bank.dataset_path(k))})
    print(f"bank signatures cached ({time.perf_counter() - t:.0f}s)", flush=True)


def _child(n: int, distance: str, mode: str, top_k: int, tag: str) -> None:
    import tempfile

    import metalora

    texts = _sentences()
    texts[0] = f"{texts[0]} [{tag}]"  # a new dataset for the cache: its signature is computed
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "query.jsonl"
        data.write_text("".join(json.dumps({"input": t, "output": ""}) + "\n" for t in texts))
        t = time.perf_counter()
        bank = metalora.Bank(bank_dir(n))
        t_open = time.perf_counter() - t
        t = time.perf_counter()
        ad = metalora.generate(data, bank, distance=distance, mode=mode, top_k=top_k,
                               out=Path(tmp) / "adapter")
        total = time.perf_counter() - t
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"total_s": total, "bank_open_s": t_open, "peak_rss_mib": hwm,
                      **{f"{k}_s": v for k, v in ad.generation.timings.items()}}))


def measure(n: int, repeat: int, distance: str, mode: str, top_k: int,
            code: str | None = None) -> None:
    env = dict(os.environ)
    env.setdefault("METALORA_CACHE_DIR", str(CACHE / "metalora-cache"))
    if code:  # another checkout's python/ (a before/after comparison in the same session)
        env["PYTHONPATH"] = code
    rows = []
    for r in range(repeat):
        out = subprocess.run([sys.executable, __file__, "child", str(n), distance, mode, str(top_k),
                              f"run{time.time_ns()}"], env=env, capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    keys = list(rows[0])
    med = {k: float(np.median([row[k] for row in rows])) for k in keys}
    load = os.getloadavg()[0]
    print("\n| bank | distance | mode | top_k | " + " | ".join(keys) + " | load |")
    print("|---" * (len(keys) + 5) + "|")
    print(f"| {n} | {distance} | {mode} | {top_k} | " + " | ".join(f"{med[k]:.2f}" for k in keys)
          + f" | {load:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--n", type=int, default=500)
    p = sub.add_parser("measure")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--distance", default="sinkhorn")
    p.add_argument("--mode", default="svd")
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--code", help="run another checkout's python/ directory")
    p = sub.add_parser("child")
    p.add_argument("n", type=int)
    p.add_argument("distance")
    p.add_argument("mode")
    p.add_argument("top_k", type=int)
    p.add_argument("tag")
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.n)
    elif a.cmd == "measure":
        measure(a.n, a.repeat, a.distance, a.mode, a.top_k, a.code)
    else:
        _child(a.n, a.distance, a.mode, a.top_k, a.tag)


if __name__ == "__main__":
    main()
