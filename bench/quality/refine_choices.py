"""Choosing refinement's optimiser and L1 weight by measurement, on validation splits only.

    nohup python bench/quality/refine_choices.py [--setting plain] [--tasks 12] [--budget 24] \
        > bench/.cache/quality/refine_choices.log 2>&1 &

For bank tasks that have a validation split (leave-one-out: the task's own adapter is out of the
bank), each variant of ``metalora.refine.search`` runs on 16 rows held out of the training split,
exactly as ``evaluate.py``'s ``metalora+refine`` systems do, and the coefficients it returns are
scored by the mean target NLL on the task's validation split (up to 32 rows; no test row is ever
read, so the choice made here does not leak into the quality table). Variants: CMA-ES (``cma``)
and nevergrad's ``NGOpt`` at L1 = 0, and CMA-ES with LoraHub's L1 = 0.05. Records go to
``bench/.cache/quality/refine_choices<suffix>.jsonl`` (resumable); the summary prints the mean
validation NLL per variant, the paired difference to CMA-ES with a bootstrap 95 % interval, wins,
and CPU seconds per search.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import task_dataset  # noqa: E402  (the signatures' view of a split)
from common import (CACHE_DIR, SETTINGS, TASKS_DIR, bootstrap_mean, instruction,  # noqa: E402
                    load_model, load_split, task_ids)

os.environ.setdefault("METALORA_CACHE_DIR", str(CACHE_DIR / "metalora"))

import metalora  # noqa: E402
from metalora import Bank, coefficients  # noqa: E402
from metalora.generate import query_distances  # noqa: E402
from metalora.refine import RefineOptions, holdout_split, search  # noqa: E402
from metalora.refine.scorer import TorchScorer  # noqa: E402
from metalora.signatures import signature  # noqa: E402

VARIANTS = {"cma": {"optimizer": "cma", "l1": 0.0},
            "ngopt": {"optimizer": "ngopt", "l1": 0.0},
            "cma+l1": {"optimizer": "cma", "l1": 0.05}}
TOP_K, EXAMPLES, VAL_ROWS = 16, 16, 32


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="plain")
    ap.add_argument("--tasks", type=int, default=12, help="bank tasks with a validation split")
    ap.add_argument("--budget", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    setting = SETTINGS[args.setting]
    out = CACHE_DIR / f"refine_choices{setting.suffix}.jsonl"
    done = set()
    if out.is_file():
        done = {(r["task"], r["variant"]) for r in map(json.loads, out.read_text().splitlines())}
    bank = Bank(setting.bank_dir / "bank.jsonl")
    ids = list(bank.ids)
    stored = task_ids(TASKS_DIR, "bank")
    tasks = [t for t in stored[::2] + stored[1::2] if t in ids and load_split(t, "validation")]
    tasks = tasks[:args.tasks]
    embedder = metalora.Embedder(progress=False)

    bank_sigs = [signature(task_dataset(load_split(j, "train"), j, setting, instruction(j)),
                           kind="embedding", embedder=embedder) for j in ids]
    pristine, tok = load_model()

    def scorer(cand, rows, ins):
        examples = [(setting.prompt(r["input"], ins), r["output"]) for r in rows]
        return TorchScorer(copy.deepcopy(pristine).to(torch.bfloat16), tok, bank, cand, examples,
                           template="{input}", max_tokens=setting.max_tokens)

    for n, task in enumerate(tasks):
        if all((task, v) in done for v in VARIANTS):
            continue
        ins, rows = instruction(task), load_split(task, "train")
        kept, held = holdout_split(len(rows), EXAMPLES, seed=0)
        q = signature(task_dataset([rows[i] for i in kept], task, setting, ins), kind="embedding",
                      embedder=embedder)
        prior = coefficients(query_distances(q, bank_sigs, "sinkhorn"), operator="normalized",
                             top_k=TOP_K, exclude=[ids.index(task)])
        cand = [int(i) for i in np.argsort(-prior, kind="stable") if prior[i] > 0]
        search_scorer = scorer(cand, [rows[i] for i in held], ins)
        val = scorer(cand, load_split(task, "validation")[:VAL_ROWS], ins)
        val_start, val_base = val.nll_many([prior[cand], np.zeros(len(cand))])
        print(f"[{n + 1}/{len(tasks)}] {task}: validation NLL base {val_base:.3f}, "
              f"start {val_start:.3f}", flush=True)
        for name, variant in VARIANTS.items():
            if (task, name) in done:
                continue
            c0 = time.process_time()
            res = search(search_scorer, prior[cand],
                         RefineOptions(budget=args.budget, examples=EXAMPLES, progress=False,
                                       **variant))
            cpu = time.process_time() - c0
            v = val.nll(res.coefficients)
            rec = {"task": task, "variant": name, "budget": args.budget, "val_nll": v,
                   "val_start": val_start, "val_base": val_base, "objective": res.objective,
                   "start_objective": res.start_objective, "cpu_s": cpu,
                   "l1_norm": float(np.abs(res.coefficients).sum())}
            with open(out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"  {name:8s} validation NLL {v:.3f} (search objective {res.objective:.3f}, "
                  f"{cpu:.0f} CPU s)", flush=True)

    recs = [json.loads(x) for x in out.read_text().splitlines()] if out.is_file() else []
    by = {(r["task"], r["variant"]): r for r in recs}
    common = sorted({r["task"] for r in recs if all((r["task"], v) in by for v in VARIANTS)})
    if not common:
        return 0
    print(f"\n{len(common)} tasks, budget {args.budget}, validation NLL (lower is better)")
    ref = np.array([by[(t, "cma")]["val_nll"] for t in common])
    base = np.array([by[(t, "cma")]["val_base"] for t in common])
    start = np.array([by[(t, "cma")]["val_start"] for t in common])
    print(f"  base {base.mean():.3f}   start (distance prior) {start.mean():.3f}")
    for name in VARIANTS:
        x = np.array([by[(t, name)]["val_nll"] for t in common])
        cpu = np.mean([by[(t, name)]["cpu_s"] for t in common])
        m, lo, hi = bootstrap_mean(x - ref)
        print(f"  {name:8s} {x.mean():.3f}   minus cma {m:+.3f} [{lo:+.3f}, {hi:+.3f}]   "
              f"better than cma on {np.sum(x < ref)}/{len(common)}   better than start on "
              f"{np.sum(x < start)}/{len(common)}   {cpu:.0f} CPU s per search")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
