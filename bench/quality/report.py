"""Aggregate ``results/results.csv`` into ``results/summary.md`` and PNG plots.

    python bench/quality/report.py

Per system: mean Rouge-L, exact match and target NLL over the evaluated tasks; the share of tasks
where it beats ``base`` on Rouge-L (strictly); and the share of the base -> trained Rouge-L gap it
closes, both as the ratio of the means (mean over tasks of system - base, over the same for
trained) and as the mean of the per-task ratios on tasks whose gap is at least 0.05 (a smaller
gap makes the ratio meaningless noise).
Plots: per-task Rouge-L bars of the baselines, the best metalora system and the one whose top_k
and scale the validation split chose; the coefficient heatmap (evaluated task x bank adapter) of
the best metalora system, in the style of the paper's figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR  # noqa: E402

BASELINES = ("base", "trained", "uniform", "meancos_top8")
TOKEN_METRICS = ("wasserstein_1d", "kl", "js", "token_mmd")
MIN_GAP = 0.05


def load(path: Path) -> Dict[str, Dict[str, dict]]:
    table: Dict[str, Dict[str, dict]] = defaultdict(dict)
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            table[r["task"]][r["system"]] = {k: float(r[k]) for k in
                                             ("rougeL", "exact_match", "nll", "n_test")}
    return table


def aggregate(table, tasks: List[str], systems: List[str]) -> List[dict]:
    rows = []
    for s in systems:
        ts = [t for t in tasks if s in table[t] and "base" in table[t]]
        if not ts:
            continue
        r = np.array([table[t][s]["rougeL"] for t in ts])
        base = np.array([table[t]["base"]["rougeL"] for t in ts])
        with_trained = [t for t in ts if "trained" in table[t]]
        gap_sys = np.array([table[t][s]["rougeL"] - table[t]["base"]["rougeL"] for t in with_trained])
        gap_tr = np.array([table[t]["trained"]["rougeL"] - table[t]["base"]["rougeL"]
                           for t in with_trained])
        big = gap_tr >= MIN_GAP
        rows.append({
            "system": s, "n_tasks": len(ts), "rougeL": r.mean(),
            "exact_match": np.mean([table[t][s]["exact_match"] for t in ts]),
            "nll": np.mean([table[t][s]["nll"] for t in ts]),
            "beats_base": float(np.mean(r > base)),
            "gap_closed": float(gap_sys.sum() / gap_tr.sum()) if gap_tr.sum() > 0 else float("nan"),
            "gap_closed_per_task": float(np.mean(gap_sys[big] / gap_tr[big])) if big.any()
            else float("nan"),
        })
    return rows


def paired_difference(table, tasks: List[str], a: str, b: str, n_boot: int = 10000,
                      seed: int = 0) -> tuple:
    """Mean over tasks of Rouge-L(a) - Rouge-L(b) and its 95 % paired bootstrap interval."""
    ts = [t for t in tasks if a in table[t] and b in table[t]]
    diff = np.array([table[t][a]["rougeL"] - table[t][b]["rougeL"] for t in ts])
    boot = np.random.default_rng(seed).choice(diff, size=(n_boot, diff.size)).mean(axis=1)
    return float(diff.mean()), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def _pct(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{100 * x:.0f} %"


def markdown_table(rows: List[dict]) -> str:
    out = ["| system | tasks | Rouge-L | exact match | NLL | beats base (Rouge-L) | gap closed "
           "(ratio of means) | gap closed (mean per task, gap ≥ 0.05) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| `{r['system']}` | {r['n_tasks']} | {r['rougeL']:.3f} | "
                   f"{r['exact_match']:.3f} | {r['nll']:.3f} | {_pct(r['beats_base'])} | "
                   f"{_pct(r['gap_closed'])} | {_pct(r['gap_closed_per_task'])} |")
    return "\n".join(out)


def plot_bars(table, tasks: List[str], systems: List[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(12, 0.42 * len(tasks)), 5.5))
    width = 0.8 / len(systems)
    x = np.arange(len(tasks))
    for k, s in enumerate(systems):
        ax.bar(x + (k - (len(systems) - 1) / 2) * width,
               [table[t].get(s, {}).get("rougeL", np.nan) for t in tasks], width, label=s)
    ax.set_xticks(x)
    ax.set_xticklabels(tasks, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("Rouge-L (test split)")
    ax.set_title("SmolLM2-135M: per-task Rouge-L (bank tasks leave-one-out; x_ = not in the bank)")
    ax.legend(fontsize=8, ncol=len(systems))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heatmap(coefs: Dict[str, Dict[str, float]], tasks: List[str], bank: List[str],
                 system: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    M = np.array([[coefs.get(t, {}).get(b, 0.0) for b in bank] for t in tasks])
    fig, ax = plt.subplots(figsize=(0.2 * len(bank) + 4, 0.2 * len(tasks) + 3))
    im = ax.imshow(M, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(bank)))
    ax.set_xticklabels(bank, rotation=90, fontsize=6)
    ax.set_yticks(range(len(tasks)))
    ax.set_yticklabels(tasks, fontsize=6)
    ax.set_xlabel("bank adapter")
    ax.set_ylabel("evaluated task")
    ax.set_title(f"coefficients of {system}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    table = load(args.results / "results.csv")
    tasks = list(table)
    systems = list(dict.fromkeys(s for t in tasks for s in table[t]))
    ordered = [s for s in BASELINES if s in systems] + sorted(s for s in systems if s not in BASELINES)
    bank = json.loads((args.results / "distances.json").read_text())["cols"]
    extra = [t for t in tasks if t not in bank]
    bank_tasks = [t for t in bank if t in table]      # bank order: families stay together
    all_rows = aggregate(table, tasks, ordered)
    meta = [r for r in all_rows if r["system"].startswith("metalora:")]
    best = max(meta, key=lambda r: r["rougeL"]) if meta else None

    lines = ["# Quality benchmark: SmolLM2-135M-Instruct, generated adapters vs baselines", "",
             f"{len(tasks)} tasks evaluated ({len(bank_tasks)} of the bank's, leave-one-out, and "
             f"{len(extra)} outside it); `evaluate.py` is resumable.", "",
             "Produced by `bench/quality/report.py` from `results.csv` (see `bench/quality/README.md`"
             " for the setup). Rouge-L and exact match from greedy decoding, NLL = teacher-forced "
             "per-token negative log-likelihood of the target (lower is better). Bank tasks are "
             "evaluated leave-one-out (their own adapter removed from the bank); `x_` tasks have no "
             "adapter in the bank at all (their `trained` reference is an adapter trained the same "
             "way and kept outside the bank). `metalora+val` systems also use the task's "
             "validation split to choose top_k and scale; the others see only its training split.",
             "",
             f"## All evaluated tasks ({len(tasks)})", "", markdown_table(all_rows), ""]
    for title, sub in ((f"Bank tasks, leave-one-out ({len(bank_tasks)})", bank_tasks),
                       (f"Extra tasks, not in the bank ({len(extra)})", extra)):
        if sub:
            lines += [f"## {title}", "", markdown_table(aggregate(table, sub, ordered)), ""]
    if best:
        tok = [r for r in meta if r["system"].split(":")[1] in TOKEN_METRICS]
        emb = [r for r in meta if r["system"].split(":")[1] not in TOKEN_METRICS]
        base = next(r for r in all_rows if r["system"] == "base")
        lines += ["## Headlines", "",
                  f"- Best metalora configuration by mean Rouge-L: `{best['system']}` — "
                  f"{best['rougeL']:.3f} vs base {base['rougeL']:.3f}; beats base on "
                  f"{100 * best['beats_base']:.0f} % of tasks; closes "
                  f"{100 * best['gap_closed']:.0f} % of the base→trained gap (ratio of means), "
                  f"{100 * best['gap_closed_per_task']:.0f} % (mean per task).",
                  f"- Best token-id (paper) distance: `{max(tok, key=lambda r: r['rougeL'])['system']}`"
                  f" {max(r['rougeL'] for r in tok):.3f}; best embedding distance: "
                  f"`{max(emb, key=lambda r: r['rougeL'])['system']}` "
                  f"{max(r['rougeL'] for r in emb):.3f}." if tok and emb else ""]
        rivals = ["meancos_top8", max(tok, key=lambda r: r["rougeL"])["system"] if tok else None,
                  "metalora:js:normalized:linear", "base"]
        lines.append(f"- Paired differences of `{best['system']}`'s Rouge-L over the tasks (mean, "
                     f"95 % bootstrap interval over tasks): " + "; ".join(
                         "vs `{}` {:+.3f} [{:+.3f}, {:+.3f}]".format(
                             s, *paired_difference(table, tasks, best["system"], s))
                         for s in rivals if s in systems and s != best["system"]) + ".")
        for r in all_rows:
            if r["system"].startswith("metalora+val:"):
                lines.append(f"- With the validation split choosing top_k and scale: `{r['system']}`"
                             f" — {r['rougeL']:.3f}; beats base on {_pct(r['beats_base'])} of "
                             f"tasks; closes {_pct(r['gap_closed'])} of the gap (ratio of means), "
                             f"{_pct(r['gap_closed_per_task'])} (mean per task); paired "
                             "difference vs `{}` {:+.3f} [{:+.3f}, {:+.3f}].".format(
                                 best["system"], *paired_difference(table, tasks, r["system"],
                                                                    best["system"])))
        lines.append("")
    (args.results / "summary.md").write_text("\n".join(lines) + "\n")

    if best:
        shown = (["base", "uniform", "meancos_top8", best["system"]]
                 + [s for s in systems if s.startswith("metalora+val:")] + ["trained"])
        in_order = extra + bank_tasks
        plot_bars(table, in_order, [s for s in shown if s in systems],
                  args.results / "per_task_rougeL.png")
        coefs: Dict[str, Dict[str, float]] = {}
        with open(args.results / "coefficients.jsonl") as f:
            for line in f:
                r = json.loads(line)
                if r["system"] == best["system"]:
                    coefs[r["task"]] = r["weights"]
        plot_heatmap(coefs, in_order, bank, best["system"], args.results / "coefficients_heatmap.png")
    print((args.results / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
