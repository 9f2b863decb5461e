"""How many examples per signature are enough? (issue 17: one default ``n`` for every command.)

Test bed: the quality benchmark's 52 tasks (``bench/quality/tasks``) against the built-in bank
(``bench/quality/bank``, 48 adapters; a bank task is a query with its own adapter left out, as in
the quality benchmark). Every dataset is embedded in full once (then cached); a signature of
``n`` examples is the seeded subsample :meth:`metalora.Dataset.subsample` draws, for the bank AND
the query. For each ``n`` and seed the default job's distances (Sinkhorn, its defaults) and
coefficients (normalized softmin, tau 1, top-16) are compared with those of the full datasets:

* Spearman correlation of the distance rows,
* top-1 equal, top-16 set overlap,
* L1 distance of the coefficient vectors (0 = identical, 2 = disjoint).

The same script measures the float16 points of a shipped index (``--fp16``): the bank's points
rounded to float16, the query kept in float32.

    PYTHONPATH=python nice python bench/signature_n.py [--n 32 64 128 256] [--seeds 0 1 2] [--fp16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
os.environ.setdefault("METALORA_CACHE_DIR", str(HERE / ".cache" / "metalora-cache"))

import metalora  # noqa: E402
from metalora.coefficients import coefficients  # noqa: E402
from metalora.datasets import load_dataset  # noqa: E402
from metalora.generate import query_distances  # noqa: E402

QUALITY = HERE / "quality"


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def _subsample_rows(n_rows: int, n, seed: int) -> np.ndarray:
    """The positions :meth:`Dataset.subsample` keeps (same generator, same call)."""
    if n is None or n >= n_rows:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=n, replace=False))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[32, 64, 128, 192, 256])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--fp16", action="store_true", help="also: bank points in float16 (full n "
                    "and each --n, seed 0)")
    ap.add_argument("--distance", default="sinkhorn")
    ap.add_argument("--sides", nargs="*", default=[], choices=["query", "bank"],
                    help="also subsample only the query's / only the bank's datasets")
    ap.add_argument("--big-query", action="store_true", help="also: the 1000 bench sentences "
                    "as one query against the bank at each --n, subsampled to each --n")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    a = ap.parse_args()

    bank = metalora.Bank(QUALITY / "bank")
    ids = list(bank.ids)
    tasks = sorted(p.name for p in (QUALITY / "tasks").iterdir() if (p / "train.jsonl").is_file())
    emb = metalora.Embedder(progress=False)
    t = time.perf_counter()
    full = {}  # task -> full point cloud
    for name in tasks:
        full[name] = metalora.signature(QUALITY / "tasks" / name / "train.jsonl", embedder=emb)
    bank_task = {k: Path(bank.dataset_path(k)).parent.name for k in ids}
    print(f"{len(tasks)} tasks embedded in full (or read from the cache) in "
          f"{time.perf_counter() - t:.1f}s; rows {sum(len(v) for v in full.values())}", flush=True)

    def run(n, seed, fp16=False, side="both"):
        sub = {k: v[_subsample_rows(len(v), n, seed)] for k, v in full.items()}
        bank_sigs = [(full if side == "query" else sub)[bank_task[k]] for k in ids]
        qs = full if side == "bank" else sub
        if fp16:
            bank_sigs = [s.astype(np.float16).astype(np.float32) for s in bank_sigs]
        rows = {}
        for q in tasks:
            keep = [j for j, k in enumerate(ids) if bank_task[k] != q]
            d = query_distances(qs[q], [bank_sigs[j] for j in keep], a.distance)
            w = coefficients(d, operator="normalized", tau=1.0, top_k=16)
            rows[q] = (keep, d, w)
        return rows

    t = time.perf_counter()
    ref = run(None, 0)
    print(f"reference (full datasets): {time.perf_counter() - t:.1f}s", flush=True)
    out = []

    def compare(label, n, seed, rows):
        sp, top1, top16, l1, maxdz = [], [], [], [], []
        for q in tasks:
            _, d0, w0 = ref[q]
            _, d1, w1 = rows[q]
            sp.append(_spearman(d0, d1))
            top1.append(int(np.argmax(w0) == np.argmax(w1)))
            s0, s1 = set(np.flatnonzero(w0)), set(np.flatnonzero(w1))
            top16.append(len(s0 & s1) / max(len(s0), 1))
            l1.append(float(np.abs(w0 - w1).sum()))
            maxdz.append(float(np.max(np.abs(d0 - d1))))
        rec = dict(variant=label, n=n, seed=seed, spearman_mean=float(np.mean(sp)),
                   spearman_min=float(np.min(sp)), top1=float(np.mean(top1)),
                   top16_overlap_mean=float(np.mean(top16)), top16_overlap_min=float(np.min(top16)),
                   coef_l1_mean=float(np.mean(l1)), coef_l1_max=float(np.max(l1)),
                   max_abs_d=float(np.max(maxdz)))
        out.append(rec)
        print(f"| {label} | {n} | {seed} | {rec['spearman_mean']:.4f} | {rec['spearman_min']:.4f} "
              f"| {rec['top1']:.3f} | {rec['top16_overlap_mean']:.3f} | "
              f"{rec['top16_overlap_min']:.3f} | {rec['coef_l1_mean']:.4f} | "
              f"{rec['coef_l1_max']:.4f} | {rec['max_abs_d']:.2e} |", flush=True)

    print("\n| variant | n | seed | Spearman mean | min | top-1 same | top-16 overlap mean | min "
          "| coef L1 mean | max | max abs Δd |\n|---|---|---|---|---|---|---|---|---|---|---|")
    if a.fp16:
        compare("float16 bank points", "all", 0, run(None, 0, fp16=True))
    for side in a.sides:
        for n in a.n:
            compare(f"{side} only subsampled", n, 0, run(n, 0, side=side))
    for n in a.n:
        for seed in a.seeds:
            rows = run(n, seed)
            compare("subsample", n, seed, rows)
            if a.fp16 and seed == a.seeds[0]:
                ref_n = rows
                rows16 = run(n, seed, fp16=True)
                # float16 against the same n in float32 (the effect of the dtype alone)
                d16 = [np.max(np.abs(ref_n[q][1] - rows16[q][1])) for q in tasks]
                l16 = [np.abs(ref_n[q][2] - rows16[q][2]).sum() for q in tasks]
                same = np.mean([set(np.flatnonzero(ref_n[q][2])) == set(np.flatnonzero(rows16[q][2]))
                                for q in tasks])
                print(f"|   float16 vs float32 at n={n} | | | max abs Δd {max(d16):.2e} | coef L1 "
                      f"max {max(l16):.2e} | top-16 sets equal on {same:.3f} of queries | "
                      f"||||||", flush=True)
                out.append(dict(variant="fp16_vs_fp32", n=n, max_abs_d=float(max(d16)),
                                coef_l1_max=float(max(l16)), top16_same=float(same)))
    if a.big_query:  # a 1000-example query: how far can it be subsampled?
        sents = [json.loads(line)["text"] for line in
                 (HERE / "data" / "ni_sentences_1000.jsonl").read_text().splitlines()[1:]]
        qfull = metalora.signature(sents, embedder=emb)
        print("\n1000-example query (bench/data/ni_sentences_1000.jsonl) vs the 48-adapter bank "
              "(bank at n=256), query subsampled; reference: all 1000\n\n| query n | seed | "
              "Spearman | top-1 same | top-16 overlap | coef L1 |\n|---|---|---|---|---|---|")
        bank256 = [full[bank_task[k]][_subsample_rows(len(full[bank_task[k]]), 256, 0)]
                   for k in ids]
        d0 = query_distances(qfull, bank256, a.distance)
        w0 = coefficients(d0, operator="normalized", tau=1.0, top_k=16)
        for n in (128, 256, 384, 512):
            for seed in a.seeds:
                q = qfull[_subsample_rows(len(qfull), n, seed)]
                d1 = query_distances(q, bank256, a.distance)
                w1 = coefficients(d1, operator="normalized", tau=1.0, top_k=16)
                ov = len(set(np.flatnonzero(w0)) & set(np.flatnonzero(w1))) / 16
                print(f"| {n} | {seed} | {_spearman(d0, d1):.4f} | "
                      f"{int(np.argmax(w0) == np.argmax(w1))} | {ov:.3f} | "
                      f"{np.abs(w0 - w1).sum():.4f} |", flush=True)
                out.append(dict(variant="big_query", n=n, seed=seed, spearman=_spearman(d0, d1),
                                top16_overlap=ov, coef_l1=float(np.abs(w0 - w1).sum())))
    print(f"\nload average {os.getloadavg()[0]:.1f}")
    if a.out:
        a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    sys.exit(main())
