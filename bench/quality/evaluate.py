"""Leave-one-out quality evaluation of generated adapters on SmolLM2-135M; resumable.

    nohup python bench/quality/evaluate.py > bench/.cache/quality/evaluate.log 2>&1 &
    python bench/quality/evaluate.py --extra my_task.jsonl   # also a task that is not in the bank

For every evaluated task (each bank task with its own adapter left out of the bank, every extra
task of ``tasks/index.json``, and any ``--extra`` JSONL file with a ``split`` column holding
``train`` and ``test`` rows, optionally ``validation`` rows) this makes adapters from the bank
with metalora's distances, operators and combination modes, applies each to the base model, and
scores the task's test split: Rouge-L of the greedy continuation, exact match, and the
teacher-forced NLL of the target. Baselines in the same table: ``base`` (no adapter),
``trained`` (the task's own LoRA), ``uniform`` (exact average of every other adapter's update)
and ``meancos_top8`` (the 8 adapters whose training sets have the closest mean embedding, equal
weights: retrieval style). Tasks with a validation split also get ``metalora+val:...``, whose
top_k and scale that split chooses (see ``VAL_CANDIDATES``).

Rows go to ``results/results.csv`` as soon as they are measured; a rerun skips (task, system)
pairs already there. Coefficients go to ``results/coefficients.jsonl``, distance matrices to
``results/distances.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BANK_DIR, CACHE_DIR, EXTRA_DIR, MAX_TARGET_TOKENS, MODEL_DIR,  # noqa: E402
                    RESULTS_DIR, SPLITS, TASKS_DIR, encode, load_model, load_split, normalise,
                    references, rouge_l, target_nll, task_ids)

os.environ.setdefault("METALORA_CACHE_DIR", str(CACHE_DIR / "metalora"))

import metalora  # noqa: E402
from metalora import Bank, coefficients, load_adapter  # noqa: E402
from metalora.bank import combine_adapters  # noqa: E402
from metalora.coefficients import NeuralOperator, select_temperature  # noqa: E402
from metalora.datasets import Dataset  # noqa: E402
from metalora.bank_index import parameter_gram  # noqa: E402
from metalora.distances import get_metric  # noqa: E402
from metalora.generate import query_distances  # noqa: E402
from metalora.signatures import signature  # noqa: E402

N_TEST = 32
TOP_K = 16            # metalora's default for svd / cat
MEANCOS_K = 8
FIELDS = ["task", "system", "rougeL", "exact_match", "nll", "n_test"]

# (distance, operator, mode). Operator "normalized" and "attentional" use tau = 1 as in the paper;
# "<operator>-auto" picks tau by leave-one-out on the fold's bank (metalora's tau="auto");
# "neural" is the paper's neural operator, trained on the fold's bank. linear = the paper's
# factor-wise average over all adapters; svd / cat = metalora's exact combination of the top 16.
CONFIGS = [
    # the paper's method: token-id distances, factor-wise average over the whole bank
    ("wasserstein_1d", "normalized", "linear"),
    ("js", "normalized", "linear"),
    ("token_mmd", "normalized", "linear"),
    ("js", "neural", "linear"),
    # metalora: embedding distances, exact combination of the top 16 truncated to rank 8
    ("sinkhorn", "normalized", "svd"),
    ("mmd", "normalized", "svd"),
    ("sliced_wasserstein", "normalized", "svd"),
    ("gaussian_w2", "normalized", "svd"),
    ("mean_cosine", "normalized", "svd"),
    # ablations: combination mode, operator, and the paper's distance with the exact combination
    ("sinkhorn", "normalized", "linear"),
    ("sinkhorn", "normalized", "cat"),
    ("sinkhorn", "normalized-auto", "svd"),
    ("sinkhorn", "neural", "svd"),
    ("js", "normalized", "svd"),
]

# Beyond the paper: the new task's own labelled examples choose how concentrated and how strong the
# mixture is. Each candidate (top_k, scale) is a sinkhorn/normalized/svd adapter with its weights
# multiplied by ``scale``; it is scored on the task's validation split (never the test split) and
# the best validation Rouge-L wins, ties going to the lower validation NLL. The chosen top_k and
# scale can be read back from the saved weights (count and sum).
VAL_SYSTEM = "metalora+val:sinkhorn:normalized:svd"
VAL_CANDIDATES = [(k, scale) for k in (1, 4, TOP_K) for scale in (0.5, 1.0)]
VAL_N = 16


def system_name(distance: str, operator: str, mode: str) -> str:
    return f"metalora:{distance}:{operator}:{mode}"


class LoraSlot(torch.nn.Module):
    """Wraps a base ``nn.Linear``: ``y = W x + B (A x)`` with a swappable low-rank update."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear
        self.A: Optional[torch.Tensor] = None
        self.B: Optional[torch.Tensor] = None

    def forward(self, x):
        y = self.linear(x)
        if self.A is not None:
            y = y + (x @ self.A.T) @ self.B.T
        return y


class Scorer:
    """Runs the bf16 base model with one adapter at a time and scores a task.

    The base weights stay as they are (bfloat16: the model's matrix products run on this CPU's
    AMX units, ~3.7x the float32 speed); an adapter is applied unmerged, as PEFT does, as the
    low-rank path ``s * B @ (A @ x)`` beside each target module, so that no update is lost to
    rounding the merged weight to bfloat16.
    """

    def __init__(self, model, tok, module_names: List[str]):
        self.model, self.tok = model.to(torch.bfloat16), tok
        self.slots = {}
        for name in module_names:
            parent, _, child = name.rpartition(".")
            slot = LoraSlot(model.get_submodule(name))
            setattr(model.get_submodule(parent), child, slot)
            self.slots[name] = slot

    def apply(self, adapter) -> None:
        """Use ``adapter``'s update ``s * B @ A`` on every module (None = the base model)."""
        for slot in self.slots.values():
            slot.A = slot.B = None
        if adapter is None:
            return
        for m, (A, B) in adapter.modules.items():
            if m not in self.slots:
                raise KeyError(f"adapter module {m} is not a base-model module of the bank")
            s = np.float32(adapter.scalings[m])
            self.slots[m].A = torch.from_numpy(np.asarray(A, dtype=np.float32)).to(torch.bfloat16)
            self.slots[m].B = torch.from_numpy(np.asarray(B, dtype=np.float32) * s).to(torch.bfloat16)

    def score(self, rows: List[dict]) -> Dict[str, float]:
        tok = self.tok
        pairs = [encode(tok, r["input"], r["output"]) for r in rows]
        nll = target_nll(self.model, pairs)
        longest = max(len(tok(ref, add_special_tokens=False).input_ids)
                      for r in rows for ref in references(r))
        max_new = min(MAX_TARGET_TOKENS, longest + 2)
        prompts = [p for p, _ in pairs]
        n = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), n), tok.eos_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), n), dtype=torch.long)
        for i, p in enumerate(prompts):           # left padding for batched generation
            ids[i, n - len(p):] = torch.tensor(p)
            mask[i, n - len(p):] = 1
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                      do_sample=False, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.eos_token_id)
        rouge, em = [], []
        for i, r in enumerate(rows):
            new = out[i, n:].tolist()
            if tok.eos_token_id in new:
                new = new[:new.index(tok.eos_token_id)]
            pred = tok.decode(new, skip_special_tokens=True).strip()
            refs = references(r)
            rouge.append(max(rouge_l(pred, ref) for ref in refs))
            em.append(float(any(normalise(pred) == normalise(ref) for ref in refs)))
        return {"rougeL": float(np.mean(rouge)), "exact_match": float(np.mean(em)), "nll": nll,
                "n_test": len(rows)}


def read_done(path: Path) -> set:
    if not path.is_file():
        return set()
    with open(path, newline="") as f:
        return {(r["task"], r["system"]) for r in csv.DictReader(f)}


def append_row(path: Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})


def task_dataset(train_rows: List[dict], name: str) -> Dataset:
    return Dataset.from_pairs([r["input"] for r in train_rows], [r["output"] for r in train_rows],
                              name=name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extra", nargs="*", type=Path, default=[],
                    help="JSONL files of extra tasks (rows with input, output, "
                         "split=train|validation|test; validation is optional)")
    ap.add_argument("--tasks", nargs="*", help="only these task ids")
    ap.add_argument("--systems", nargs="*", help="only these systems (names as in results.csv)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--partial-bank", action="store_true",
                    help="allow an incomplete bank (smoke tests; use another --out)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.csv"
    done = read_done(results)

    bank = Bank(BANK_DIR / "bank.jsonl")
    ids = list(bank.ids)
    missing = sorted(set(task_ids(TASKS_DIR, "bank")) - set(ids))
    if missing and not args.partial_bank:
        raise SystemExit(f"the bank lacks {len(missing)} adapters ({missing[:3]} ...): finish "
                         f"train_bank.py first (or pass --partial-bank for a smoke test)")
    nb = len(ids)
    # Tasks to evaluate: the extras first (no adapter of theirs in the bank), then every bank task.
    tasks: Dict[str, dict] = {}
    for t in task_ids(TASKS_DIR, "extra"):
        tasks[t] = {**{s: load_split(t, s) for s in SPLITS}, "trained": EXTRA_DIR / t}
    for path in args.extra:
        rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        split = {s: [r for r in rows if r.get("split") == s] for s in SPLITS}
        if not split["train"] or not split["test"]:
            raise SystemExit(f"{path}: needs rows with split='train' and split='test' "
                             f"(found {len(split['train'])} and {len(split['test'])})")
        tasks[path.stem] = {**split, "trained": None}
    for t in ids[::2] + ids[1::2]:     # interleaved: a cut-short run still spans the families
        tasks[t] = {**{s: load_split(t, s) for s in SPLITS}, "trained": BANK_DIR / t}
    if args.tasks:
        tasks = {k: v for k, v in tasks.items() if k in set(args.tasks)}
    names = list(tasks)

    # Signatures of every task's training split (cached on disk by content) and distances.
    t0 = time.time()
    tokenizer = str(MODEL_DIR / "tokenizer.json")
    embedder = metalora.Embedder(progress=False)
    sigs: Dict[str, Dict[str, object]] = {"embedding": {}, "tokens": {}}
    all_names = list(dict.fromkeys(names + ids))
    for t in all_names:
        rows = tasks[t]["train"] if t in tasks else load_split(t, "train")
        ds = task_dataset(rows, t)
        sigs["embedding"][t] = signature(ds, kind="embedding", embedder=embedder)
        sigs["tokens"][t] = signature(ds, kind="tokens", tokenizer=tokenizer)
    print(f"signatures of {len(all_names)} tasks: {time.time() - t0:.1f} s", flush=True)
    metrics = sorted({c[0] for c in CONFIGS} | {"mean_cosine"})
    D: Dict[str, np.ndarray] = {}
    for metric in metrics:
        kind = get_metric(metric).kind.signature
        bank_sigs = [sigs[kind][j] for j in ids]
        D[metric] = np.stack([query_distances(sigs[kind][t], bank_sigs, metric) for t in all_names])
    print(f"distances ({len(metrics)} metrics): {time.time() - t0:.1f} s", flush=True)
    (args.out / "distances.json").write_text(json.dumps(
        {"rows": all_names, "cols": ids,
         "D": {m: np.round(v, 6).tolist() for m, v in D.items()}}) + "\n")
    row_of = {t: i for i, t in enumerate(all_names)}
    G = parameter_gram(bank)
    Dbank = {m: v[[row_of[j] for j in ids]] for m, v in D.items()}

    model, tok = load_model()
    modules = sorted({m for j in ids for m in bank[j].names})
    scorer = Scorer(model, tok, modules)
    coef_file = open(args.out / "coefficients.jsonl", "a")

    def run(task: str, system: str, make) -> None:
        if (task, system) in done or (args.systems and system not in args.systems):
            return
        t1 = time.time()
        adapter, weights = make()
        t2 = time.time()
        scorer.apply(adapter)
        res = scorer.score(tasks[task]["test"][:N_TEST])
        append_row(results, {"task": task, "system": system, **res})
        done.add((task, system))
        if weights is not None:
            coef_file.write(json.dumps({"task": task, "system": system, "weights": {
                ids[j]: round(float(w), 6) for j, w in enumerate(weights) if w > 0}}) + "\n")
            coef_file.flush()
        print(f"  {system:48s} rougeL {res['rougeL']:.3f}  EM {res['exact_match']:.3f}  "
              f"NLL {res['nll']:.3f}  (make {t2 - t1:.2f} s, score {time.time() - t2:.1f} s)",
              flush=True)

    for n_done, task in enumerate(names):
        t_task = time.time()
        print(f"[{n_done + 1}/{len(names)}] {task}", flush=True)
        held = [ids.index(task)] if task in ids else []
        keep = [j for j in range(nb) if j not in held]
        fold = np.ix_(keep, keep)

        def mix(weights, mode):
            return combine_adapters(bank, weights, mode=mode), weights

        run(task, "base", lambda: (None, None))
        trained = tasks[task]["trained"]
        if trained is not None and (trained / "adapter_config.json").is_file():
            run(task, "trained", lambda: (load_adapter(trained), None))
        elif trained is not None:
            print(f"  trained: {trained} is not trained yet (rerun once train_bank.py is done)")
        uniform = np.zeros(nb)
        uniform[keep] = 1.0 / len(keep)
        run(task, "uniform", lambda: mix(uniform, "cat"))
        d = D["mean_cosine"][row_of[task]].copy()
        d[held] = np.inf
        nearest = [j for j in np.argsort(d, kind="stable") if np.isfinite(d[j])][:MEANCOS_K]
        top = np.zeros(nb)
        top[nearest] = 1.0 / len(nearest)
        run(task, f"meancos_top{MEANCOS_K}", lambda: mix(top, "cat"))
        operators: Dict[tuple, tuple] = {}
        for distance, operator, mode in CONFIGS:
            def make(distance=distance, operator=operator, mode=mode):
                top_k = None if mode == "linear" else TOP_K
                key = (distance, operator, top_k)
                if key not in operators:          # fold-trained operators, once per task
                    Df, Gf = Dbank[distance][fold], G[fold]
                    if operator == "neural":
                        operators[key] = ("neural", 1.0, NeuralOperator.fit(Df, Gf, top_k=top_k))
                    elif operator.endswith("-auto"):
                        op = operator[:-len("-auto")]
                        tau = select_temperature(Df, Gf, operator=op, top_k=top_k)
                        operators[key] = (op, float(tau), None)
                    else:
                        operators[key] = (operator, 1.0, None)
                op, tau, net = operators[key]
                w = coefficients(D[distance][row_of[task]], operator=op, tau=tau, top_k=top_k,
                                 exclude=held, model=net)
                return mix(w, mode)
            run(task, system_name(distance, operator, mode), make)

        def make_validated():
            d, trials = D["sinkhorn"][row_of[task]], []
            for k, scale in VAL_CANDIDATES:
                w = scale * coefficients(d, operator="normalized", top_k=k, exclude=held)
                adapter = combine_adapters(bank, w, mode="svd")
                scorer.apply(adapter)
                val = scorer.score(tasks[task]["validation"][:VAL_N])
                trials.append((-val["rougeL"], val["nll"], len(trials), adapter, w))
            chosen = min(trials, key=lambda x: x[:3])
            k, scale = VAL_CANDIDATES[chosen[2]]
            print(f"  validation choice: top_k {k}, scale {scale} (Rouge-L {-chosen[0]:.3f}, "
                  f"NLL {chosen[1]:.3f})", flush=True)
            return chosen[3], chosen[4]

        if tasks[task].get("validation"):
            run(task, VAL_SYSTEM, make_validated)
        print(f"  ({time.time() - t_task:.0f} s for {task})", flush=True)
    coef_file.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
