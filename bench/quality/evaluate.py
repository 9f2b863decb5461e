"""Leave-one-out quality evaluation of generated adapters on SmolLM2-135M; resumable.

    nohup python bench/quality/evaluate.py [--setting instructed] > bench/.cache/quality/evaluate.log 2>&1 &
    python bench/quality/evaluate.py --extra my_task.jsonl   # a task of your own, not in the bank

For every evaluated task (each bank task with its own adapter left out of the bank, and every
extra task of ``tasks/index.json``) this makes adapters from the setting's bank with metalora's
distances, operators and combination modes, applies each to the base model, and scores the
task's test split: Rouge-L of the greedy continuation (ours, and ``rougeL_paper``: the paper's,
see ``common.rouge_l_paper``), exact match, and the teacher-forced NLL of the target. Baselines in
the same table: ``base`` (no adapter), ``trained`` (the task's own LoRA), ``uniform`` (exact
average of every other adapter's update) and ``meancos_top8`` (the 8 adapters whose training sets
have the closest mean embedding, equal weights: retrieval style). Retrieval references:
``oracle_single`` (the one bank adapter with the best test Rouge-L: an upper bound for any method
that picks one adapter, not a method) and ``val_single`` (the one with the best validation
Rouge-L). Tasks with a validation split also get ``metalora+val:...``, whose top_k and scale that
split chooses (see ``VAL_CANDIDATES``).

Forward-pass search on the task's own labelled examples (16 of the *training* split held out,
never the test split): ``metalora+refine:<budget>`` is the library's refinement
(``metalora.refine``: the distance-based sinkhorn/normalized top-16 prior, then base / top-k x
scale grid, then CMA-ES; written in svd mode) after 24 and 64 model evaluations, and ``lorahub``
is LoraHub's recipe as its paper describes it, as a peer (see :func:`lorahub_search`). Their
search records (objectives, budget used, CPU seconds) go to ``refine.jsonl``.

``--extra FILE.jsonl`` evaluates a task of your own (rows with ``input``, ``output`` and
``split`` = ``train`` | ``validation`` | ``test``, validation optional; an ``instruction`` field,
if any row has one, is the task's instruction in the instructed setting). Only those tasks are
evaluated unless ``--tasks`` names stored ones too; their ``trained`` reference is a LoRA trained
on their train split with the bank's recipe (``train_bank.train_one``), cached under
``bench/.cache/quality/extra_trained/``; results go to ``bench/.cache/quality/results_extra*``
unless ``--out`` says otherwise.

Per output folder (``results/`` for the plain setting, ``results_instructed/`` for the instructed
one): ``results.csv`` gets its rows as soon as they are measured, and a rerun skips (task,
system) pairs already there; ``generations/<task>/<system>.jsonl`` keeps every test prediction (so
new metrics need no re-run) and ``generations/<task>/single_adapters.jsonl`` every single
adapter's, from which the two retrieval references are chosen; coefficients go to
``coefficients.jsonl``, distance matrices to ``distances.json`` (rows of earlier runs are kept).
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CACHE_DIR, MAX_TARGET_TOKENS, MODEL_DIR, SETTINGS, SPLITS,  # noqa: E402
                    TASKS_DIR, Setting, canary, encode, instruction, load_model, load_split,
                    normalise, prefix_cache, references, rouge_l, rouge_l_paper, shared_prefix,
                    target_nll, task_ids, task_seed)

os.environ.setdefault("METALORA_CACHE_DIR", str(CACHE_DIR / "metalora"))

import metalora  # noqa: E402
from metalora import Bank, coefficients, load_adapter  # noqa: E402
from metalora.bank import combine_adapters  # noqa: E402
from metalora.coefficients import NeuralOperator, select_temperature  # noqa: E402
from metalora.datasets import Dataset  # noqa: E402
from metalora.bank_index import parameter_gram  # noqa: E402
from metalora.distances import get_metric  # noqa: E402
from metalora.generate import query_distances  # noqa: E402
from metalora.refine import RefineOptions, holdout_split, search  # noqa: E402
from metalora.refine.scorer import TorchScorer  # noqa: E402
from metalora.signatures import signature  # noqa: E402

N_TEST = 32
TOP_K = 16            # metalora's default for svd / cat
MEANCOS_K = 8
FIELDS = ["task", "system", "rougeL", "rougeL_paper", "exact_match", "nll", "n_test"]

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
SINGLE_SYSTEMS = ("oracle_single", "val_single")

# Refinement (issue 13): one seeded search of the larger budget per task; the smaller budget's
# result is the best of its first evaluations, which are exactly those a search with that budget
# makes (the grid and CMA-ES's seeded sequence do not depend on the budget).
REFINE_BUDGETS = (24, 64)
REFINE_EXAMPLES = 16
REFINE_SYSTEMS = tuple(f"metalora+refine:{b}" for b in REFINE_BUDGETS)
# LoraHub as its paper describes it: 20 random adapters of the bank, weights from 0 searched by
# nevergrad's NGOpt within [-1.5, 1.5] for 40 evaluations of the examples' loss + 0.05 * L1, the
# adapters merged factor-wise (A = sum w A_j, B = sum w B_j: metalora's "linear" mode).
LORAHUB = "lorahub"
LORAHUB_K, LORAHUB_BUDGET, LORAHUB_BOUND, LORAHUB_L1 = 20, 40, 1.5, 0.05


def system_name(distance: str, operator: str, mode: str) -> str:
    return f"metalora:{distance}:{operator}:{mode}"


class RecordingScorer:
    """A refinement scorer that keeps every coefficient vector it scores, in order, with the
    process CPU time spent so far (so a smaller budget's result and cost can be read back)."""

    def __init__(self, inner: TorchScorer):
        self.inner, self.records, self.t0 = inner, [], time.process_time()

    def nll_many(self, coefficients):
        values = self.inner.nll_many(coefficients)
        cpu = time.process_time() - self.t0
        self.records += [(np.array(c, dtype=np.float64), float(v), cpu)
                         for c, v in zip(coefficients, values)]
        return values

    def nll_adapter(self, adapter) -> float:
        return self.inner.nll_adapter(adapter)


def lorahub_search(scorer: TorchScorer, bank, chosen: List[int], seed: int):
    """LoraHub's search over the weights of ``chosen`` adapters (see ``LORAHUB``): nevergrad's
    NGOpt from zeros, each candidate merged in linear mode and scored on the held-out examples.
    Returns the full bank weight vector of NGOpt's recommendation and the evaluations made."""
    import nevergrad as ng

    def full(x):
        w = np.zeros(len(bank))
        w[chosen] = x
        return w

    def objective(x):
        w = full(np.asarray(x, dtype=np.float64))
        if not np.any(w):
            return scorer.nll_base()
        return scorer.nll_adapter(combine_adapters(bank, w, mode="linear")) + \
            LORAHUB_L1 * float(np.abs(w).sum())

    param = ng.p.Array(init=np.zeros(len(chosen)), lower=-LORAHUB_BOUND, upper=LORAHUB_BOUND)
    param.random_state = np.random.RandomState(seed)
    opt = ng.optimizers.NGOpt(parametrization=param, budget=LORAHUB_BUDGET)
    best = opt.minimize(objective)
    return full(np.asarray(best.value, dtype=np.float64)), opt.num_tell


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

    The base weights stay as they are (bfloat16: faster matrix products on this CPU); an adapter
    is applied unmerged, as PEFT does, as the low-rank path ``s * B @ (A @ x)`` beside each
    target module, so that no update is lost to rounding the merged weight to bfloat16.
    """

    def __init__(self, model, tok, module_names: List[str], setting: Setting):
        self.model, self.tok, self.setting = model.to(torch.bfloat16), tok, setting
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

    def generate(self, rows: List[dict], task_instruction: Optional[str]) -> List[str]:
        """Greedy continuations of the rows' prompts, up to the longest reference + 2 tokens.

        A prefix all prompts share (the instruction) runs once (``common.prefix_cache``); the
        rest of each prompt is left-padded after it (the padding masked out, positions from the
        mask, as ``generate`` does for any left padding).
        """
        tok = self.tok
        prompts = [encode(tok, r, self.setting, task_instruction)[0] for r in rows]
        longest = max(len(tok(ref, add_special_tokens=False).input_ids)
                      for r in rows for ref in references(r))
        max_new = min(MAX_TARGET_TOKENS, longest + 2)
        k = shared_prefix(prompts)
        n = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), n), tok.eos_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), n), dtype=torch.long)
        ids[:, :k] = torch.tensor(prompts[0][:k])
        mask[:, :k] = 1
        for i, p in enumerate(prompts):           # left padding for batched generation
            ids[i, n - len(p) + k:] = torch.tensor(p[k:])
            mask[i, n - len(p) + k:] = 1
        with torch.no_grad():
            cache = prefix_cache(self.model, prompts[0][:k], len(prompts)) if k else None
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                      do_sample=False, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.eos_token_id, cache=cache)
        preds = []
        for i in range(len(rows)):
            new = out[i, n:].tolist()
            if tok.eos_token_id in new:
                new = new[:new.index(tok.eos_token_id)]
            preds.append(tok.decode(new, skip_special_tokens=True).strip())
        return preds

    def score(self, rows: List[dict], task_instruction: Optional[str]):
        """Metrics of the current adapter on ``rows`` (see :func:`metrics`), and the predictions."""
        pairs = [encode(self.tok, r, self.setting, task_instruction) for r in rows]
        preds = self.generate(rows, task_instruction)
        return {**metrics(preds, rows), "nll": target_nll(self.model, pairs),
                "n_test": len(rows)}, preds


def metrics(preds: List[str], rows: List[dict]) -> Dict[str, float]:
    """Mean Rouge-L (ours: best over the accepted references), the paper's Rouge-L (first
    reference) and exact match of predictions against the rows' references."""
    refs = [references(r) for r in rows]
    return {"rougeL": float(np.mean([max(rouge_l(p, x) for x in rs) for p, rs in zip(preds, refs)])),
            "rougeL_paper": float(np.mean([rouge_l_paper(p, rs[0]) for p, rs in zip(preds, refs)])),
            "exact_match": float(np.mean([any(normalise(p) == normalise(x) for x in rs)
                                          for p, rs in zip(preds, refs)]))}


def read_done(path: Path) -> set:
    if not path.is_file():
        return set()
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != FIELDS:
            raise SystemExit(f"{path} has the columns {reader.fieldnames}, not {FIELDS}: it was "
                             "written by an older evaluate.py (without stored generations). Move it "
                             "and coefficients.jsonl aside (see README.md) to re-run that setting")
        return {(r["task"], r["system"]) for r in reader}


def append_row(path: Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})


def write_jsonl(path: Path, records: List[dict], mode: str = "w") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode, encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def generation_records(preds: List[str], rows: List[dict], stored: bool) -> List[dict]:
    """One record per test row; the first carries BIG-bench's canary when the task is BIG-bench's."""
    recs = [{"i": i, "prediction": p, "references": references(r)}
            for i, (p, r) in enumerate(zip(preds, rows))]
    if stored and recs:
        recs[0]["canary"] = canary()
    return recs


def task_dataset(rows: List[dict], name: str, setting: Setting, task_instruction) -> Dataset:
    """The training split as the model sees it (instruction included in the instructed setting,
    as in the paper's NI inputs); stripped, the plain prompt is the input itself."""
    return Dataset.from_pairs([setting.prompt(r["input"], task_instruction).strip() for r in rows],
                              [r["output"] for r in rows], name=name)


def load_extra(path: Path) -> dict:
    """A task of the user's own: ``{split: rows}``, its instruction and its source path."""
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    split = {s: [r for r in rows if r.get("split") == s] for s in SPLITS}
    if not split["train"] or not split["test"]:
        raise SystemExit(f"{path}: needs rows with split='train' and split='test' "
                         f"(found {len(split['train'])} and {len(split['test'])})")
    task_instruction = next((r["instruction"] for r in rows if r.get("instruction")), None)
    return {**split, "instruction": task_instruction, "source": path}


def train_extra_references(tasks: Dict[str, dict], setting: Setting) -> None:
    """The ``trained`` reference of each ``--extra`` task: its own LoRA, trained with the bank's
    recipe on its train split and cached by file content (a rerun reuses it)."""
    from train_bank import train_one

    todo = []
    for name, t in tasks.items():
        if t.get("source") is None:
            continue
        digest = hashlib.sha256(t["source"].read_bytes()).hexdigest()[:12]
        t["trained"] = CACHE_DIR / "extra_trained" / setting.name / f"{name}-{digest}"
        if not (t["trained"] / "train_log.json").is_file():
            todo.append(name)
    if not todo:
        return
    base, tok = load_model()
    for p in base.parameters():
        p.requires_grad_(False)
    for name in todo:
        t0 = time.time()
        t = tasks[name]
        t["trained"].parent.mkdir(parents=True, exist_ok=True)
        train_one(t, t["trained"], base, tok, task_seed(name), setting, t["instruction"],
                  record={"task": name, "dataset": str(t["source"])})
        print(f"trained the LoRA of {name} ({time.time() - t0:.0f} s): {t['trained']}", flush=True)


def save_distances(path: Path, names: List[str], ids: List[str], D: Dict[str, np.ndarray]) -> None:
    """Write the distance rows of ``names``, keeping the other rows of an earlier run's file."""
    rows: Dict[str, Dict[str, list]] = {}
    if path.is_file():
        old = json.loads(path.read_text())
        if old["cols"] == ids and set(old["D"]) == set(D):
            rows = {t: {m: old["D"][m][i] for m in D} for i, t in enumerate(old["rows"])}
    for i, t in enumerate(names):
        rows[t] = {m: np.round(v[i], 6).tolist() for m, v in D.items()}
    path.write_text(json.dumps({"rows": list(rows), "cols": ids,
                                "D": {m: [rows[t][m] for t in rows] for m in D}}) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="plain",
                    help="prompt format, bank and default output folder (default: %(default)s)")
    ap.add_argument("--extra", nargs="*", type=Path, default=[],
                    help="JSONL files of tasks of your own (rows with input, output, "
                         "split=train|validation|test; validation is optional)")
    ap.add_argument("--tasks", nargs="*", help="only these task ids (with --extra: these stored "
                    "tasks as well; by default none)")
    ap.add_argument("--systems", nargs="*", help="only these systems (names as in results.csv)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, help="output folder (default: the setting's results "
                    "folder; with --extra, bench/.cache/quality/results_extra<suffix>)")
    ap.add_argument("--partial-bank", action="store_true",
                    help="allow an incomplete bank (smoke tests; use another --out)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    setting = SETTINGS[args.setting]
    out = args.out or (CACHE_DIR / f"results_extra{setting.suffix}" if args.extra
                       else setting.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"setting {setting.name}; bank {setting.bank_dir}; results to {out}", flush=True)
    results = out / "results.csv"
    done = read_done(results)

    bank = Bank(setting.bank_dir / "bank.jsonl")
    ids = list(bank.ids)
    missing = sorted(set(task_ids(TASKS_DIR, "bank")) - set(ids))
    if missing and not args.partial_bank:
        raise SystemExit(f"the bank lacks {len(missing)} adapters ({missing[:3]} ...): finish "
                         f"train_bank.py --setting {setting.name} first (or pass --partial-bank "
                         "for a smoke test)")
    nb = len(ids)
    # Tasks to evaluate: the user's --extra files; the stored extras (no adapter of theirs in the
    # bank) and every bank task, unless --extra is given without --tasks naming them.
    tasks: Dict[str, dict] = {path.stem: load_extra(path) for path in args.extra}
    stored = [(t, setting.extra_dir) for t in task_ids(TASKS_DIR, "extra")]
    stored += [(t, setting.bank_dir) for t in ids[::2] + ids[1::2]]   # interleaved: a cut-short
    for t, root in stored:                                             # run spans the families
        if (args.tasks is None and not args.extra) or t in (args.tasks or ()):
            tasks[t] = {**{s: load_split(t, s) for s in SPLITS}, "instruction": instruction(t),
                        "trained": root / t}
    unknown = sorted(set(args.tasks or ()) - set(tasks))
    if unknown:
        raise SystemExit(f"unknown task ids {unknown} (stored tasks: see tasks/index.json)")
    names = list(tasks)
    train_extra_references(tasks, setting)

    # Signatures of every task's training split (cached on disk by content) and distances.
    t0 = time.time()
    tokenizer = str(MODEL_DIR / "tokenizer.json")
    embedder = metalora.Embedder(progress=False)
    sigs: Dict[str, Dict[str, object]] = {"embedding": {}, "tokens": {}}
    all_names = list(dict.fromkeys(names + ids))
    for t in all_names:
        rows, ins = (tasks[t]["train"], tasks[t]["instruction"]) if t in tasks else \
            (load_split(t, "train"), instruction(t))
        ds = task_dataset(rows, t, setting, ins)
        sigs["embedding"][t] = signature(ds, kind="embedding", embedder=embedder)
        sigs["tokens"][t] = signature(ds, kind="tokens", tokenizer=tokenizer)
    print(f"signatures of {len(all_names)} tasks: {time.time() - t0:.1f} s", flush=True)
    distance_names = sorted({c[0] for c in CONFIGS} | {"mean_cosine"})
    D: Dict[str, np.ndarray] = {}
    for metric in distance_names:
        kind = get_metric(metric).kind.signature
        bank_sigs = [sigs[kind][j] for j in ids]
        D[metric] = np.stack([query_distances(sigs[kind][t], bank_sigs, metric) for t in all_names])
    print(f"distances ({len(distance_names)} metrics): {time.time() - t0:.1f} s", flush=True)
    save_distances(out / "distances.json", all_names, ids, D)
    row_of = {t: i for i, t in enumerate(all_names)}
    G = parameter_gram(bank)
    Dbank = {m: v[[row_of[j] for j in ids]] for m, v in D.items()}

    model, tok = load_model()
    searches = [s for s in REFINE_SYSTEMS + (LORAHUB,) if not args.systems or s in args.systems]
    pristine = load_model()[0] if searches else None   # copied for each search's own scorer
    modules = sorted({m for j in ids for m in bank[j].names})
    scorer = Scorer(model, tok, modules, setting)
    coef_file = open(out / "coefficients.jsonl", "a")

    def run(task: str, system: str, make) -> None:
        if (task, system) in done or (args.systems and system not in args.systems):
            return
        t1 = time.time()
        adapter, weights = make()
        t2 = time.time()
        scorer.apply(adapter)
        rows = tasks[task]["test"][:N_TEST]
        res, preds = scorer.score(rows, tasks[task]["instruction"])
        write_jsonl(out / "generations" / task / f"{system.replace(':', '__')}.jsonl",
                    generation_records(preds, rows, stored="source" not in tasks[task]))
        append_row(results, {"task": task, "system": system, **res})
        done.add((task, system))
        if weights is not None:
            coef_file.write(json.dumps({"task": task, "system": system, "weights": {
                ids[j]: round(float(w), 6) for j, w in enumerate(weights) if w != 0}}) + "\n")
            coef_file.flush()
        print(f"  {system:48s} rougeL {res['rougeL']:.3f} (paper's {res['rougeL_paper']:.3f})  "
              f"EM {res['exact_match']:.3f}  NLL {res['nll']:.3f}  (make {t2 - t1:.2f} s, "
              f"score {time.time() - t2:.1f} s)", flush=True)

    def single_adapter_scores(task: str, keep: List[int]) -> Dict[tuple, dict]:
        """Rouge-L of every bank adapter alone on the test split and on VAL_N validation rows
        (generation only), stored in generations/<task>/single_adapters.jsonl (resumable)."""
        path = out / "generations" / task / "single_adapters.jsonl"
        found = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                r = json.loads(line)
                found[(r["adapter"], r["split"])] = r
        splits = {"test": tasks[task]["test"][:N_TEST],
                  "validation": tasks[task]["validation"][:VAL_N]}
        t1, new = time.time(), 0
        for j in keep:
            for split, rows in splits.items():
                if not rows or (ids[j], split) in found:
                    continue
                scorer.apply(bank[ids[j]])
                preds = scorer.generate(rows, tasks[task]["instruction"])
                rec = {"adapter": ids[j], "split": split, **metrics(preds, rows),
                       "predictions": preds}
                if not found and "source" not in tasks[task]:
                    rec["canary"] = canary()
                write_jsonl(path, [rec], mode="a")
                found[(ids[j], split)] = rec
                new += 1
        if new:
            print(f"  single adapters: {new} evaluations, {time.time() - t1:.0f} s", flush=True)
        return found

    def search_scorer(candidates: List[int], examples) -> TorchScorer:
        """The library's scorer on a fresh bf16 copy of the base model (it installs its own
        layers), the examples already in the setting's prompt format."""
        return TorchScorer(copy.deepcopy(pristine).to(torch.bfloat16), tok, bank, candidates,
                           examples, template="{input}", max_tokens=setting.max_tokens)

    def searched_adapters(task: str, held: List[int], keep: List[int]) -> Dict[str, tuple]:
        """``metalora+refine:<budget>`` and ``lorahub`` adapters of ``task`` (with their weights),
        searched on REFINE_EXAMPLES rows held out of its training split (as ``generate`` holds
        them out: the distances use the rest); records to refine.jsonl."""
        rows, ins = tasks[task]["train"], tasks[task]["instruction"]
        kept, heldout = holdout_split(len(rows), REFINE_EXAMPLES, seed=0)
        examples = [(setting.prompt(rows[i]["input"], ins), rows[i]["output"]) for i in heldout]
        found: Dict[str, tuple] = {}
        c0, w0 = time.process_time(), time.time()
        query = signature(task_dataset([rows[i] for i in kept], task, setting, ins),
                          kind="embedding", embedder=embedder)
        d = query_distances(query, [sigs["embedding"][j] for j in ids], "sinkhorn")
        prior = coefficients(d, operator="normalized", top_k=TOP_K, exclude=held)
        cand = [int(i) for i in np.argsort(-prior, kind="stable") if prior[i] > 0]
        rec = RecordingScorer(search_scorer(cand, examples))
        setup = time.process_time() - c0
        res = search(rec, prior[cand], RefineOptions(budget=max(REFINE_BUDGETS),
                                                     examples=REFINE_EXAMPLES, progress=False))
        for budget, system in zip(REFINE_BUDGETS, REFINE_SYSTEMS):
            first = rec.records[:budget]
            i_best = min(range(len(first)), key=lambda i: first[i][1])  # first of equal minima
            c, objective, cpu = first[i_best]
            w = np.zeros(nb)
            w[cand] = c
            adapter = combine_adapters(bank, w, mode="svd") if np.any(w) else None
            c1 = time.process_time()
            written = rec.nll_adapter(adapter) if adapter is not None else objective
            found[system] = (adapter, w)
            write_jsonl(out / "refine.jsonl", [{
                "task": task, "system": system, "budget": budget, "evaluations": len(first),
                "start_objective": first[0][1], "base_objective": res.base_objective,
                "objective": objective, "written_nll": written, "best_stage": res.tried[i_best],
                "cpu_s": setup + cpu + time.process_time() - c1}], mode="a")
        assert found[REFINE_SYSTEMS[-1]][1][cand].tolist() == res.coefficients.tolist()
        if (task, LORAHUB) not in done and (not args.systems or LORAHUB in args.systems):
            c0 = time.process_time()
            chosen = sorted(int(j) for j in np.random.default_rng(task_seed(task)).choice(
                keep, size=min(LORAHUB_K, len(keep)), replace=False))
            scorer = search_scorer(chosen, examples)
            w, evaluations = lorahub_search(scorer, bank, chosen, seed=task_seed(task))
            adapter = combine_adapters(bank, w, mode="linear") if np.any(w) else None
            written = scorer.nll_adapter(adapter) if adapter is not None else scorer.nll_base()
            found[LORAHUB] = (adapter, w)
            write_jsonl(out / "refine.jsonl", [{
                "task": task, "system": LORAHUB, "budget": LORAHUB_BUDGET,
                "evaluations": evaluations, "objective": written + LORAHUB_L1 * float(
                    np.abs(w).sum()), "written_nll": written,
                "cpu_s": time.process_time() - c0}], mode="a")
        print(f"  searches: {time.time() - w0:.0f} s", flush=True)
        return found

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
        if (trained / "adapter_config.json").is_file():
            run(task, "trained", lambda: (load_adapter(trained), None))
        else:
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
                val, _ = scorer.score(tasks[task]["validation"][:VAL_N], tasks[task]["instruction"])
                trials.append((-val["rougeL"], val["nll"], len(trials), adapter, w))
            chosen = min(trials, key=lambda x: x[:3])
            k, scale = VAL_CANDIDATES[chosen[2]]
            print(f"  validation choice: top_k {k}, scale {scale} (Rouge-L {-chosen[0]:.3f}, "
                  f"NLL {chosen[1]:.3f})", flush=True)
            return chosen[3], chosen[4]

        has_val = bool(tasks[task].get("validation"))
        if has_val:
            run(task, VAL_SYSTEM, make_validated)

        todo = [s for s in searches if (task, s) not in done]
        if todo:
            found_adapters = searched_adapters(task, held, keep)
            for system in todo:
                run(task, system, lambda system=system: found_adapters[system])

        # Retrieval references: the single adapter best on the test split (an upper bound for
        # any one-adapter choice) and the one best on the validation split; ties go to the
        # paper's Rouge-L, then to bank order.
        singles = [s for s in SINGLE_SYSTEMS if has_val or s != "val_single"]
        if any((task, s) not in done and (not args.systems or s in args.systems) for s in singles):
            found = single_adapter_scores(task, keep)
            for system, split in (("oracle_single", "test"), ("val_single", "validation")):
                if system in singles:
                    best = max(keep, key=lambda j: (found[(ids[j], split)]["rougeL"],
                                                    found[(ids[j], split)]["rougeL_paper"], -j))
                    onehot = np.zeros(nb)
                    onehot[best] = 1.0
                    run(task, system, lambda: (bank[ids[best]], onehot))
        print(f"  ({time.time() - t_task:.0f} s for {task})", flush=True)
    coef_file.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
