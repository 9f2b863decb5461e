"""Aggregate each setting's ``results.csv`` into ``results/summary.md`` and PNG plots.

    python bench/quality/report.py

One section per setting that has results (``results/`` for the plain setting,
``results_instructed/`` for the instructed one; see ``common.SETTINGS``), then a side-by-side
table against the paper's numbers in Rouge-L as the paper computes it (``rougeL_paper``).
Per system: mean Rouge-L (ours and the paper's), exact match and target NLL over the evaluated
tasks; the share of tasks where it beats ``base`` on Rouge-L (strictly); and the share of the
base -> trained Rouge-L gap it closes, both as the ratio of the means (mean over tasks of system -
base, over the same for trained) and as the mean of the per-task ratios on tasks whose gap is at
least 0.05 (a smaller gap makes the ratio meaningless noise).
Plots, in each setting's folder: per-task Rouge-L bars of the baselines, the best metalora system
and the one whose top_k and scale the validation split chose; the coefficient heatmap (evaluated
task x bank adapter) of the best metalora system, in the style of the paper's figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, SETTINGS, bootstrap_mean  # noqa: E402

BASELINES = ("base", "trained", "uniform", "meancos_top8", "oracle_single", "val_single")
TOKEN_METRICS = ("wasserstein_1d", "kl", "js", "token_mmd")
MIN_GAP = 0.05
METRICS = ("rougeL", "rougeL_paper", "exact_match", "nll", "n_test")
PAPER_RULE = "metalora:js:normalized:linear"      # the paper's best: JS, normalized, factor-wise
DEFAULTS = "metalora:sinkhorn:normalized:svd"     # `metalora generate`'s defaults
# arXiv:2507.01806 on Mistral-7B-Instruct-v0.2 with 502 adapters, Rouge-L of HF `evaluate`
# (stemmer on) against the first reference (via the design brief, a secondary source).
PAPER = {"base": 0.192, "rule": 0.520, "trained": 0.746}


def load(path: Path) -> Dict[str, Dict[str, dict]]:
    """``{task: {system: {metric: value}}}``; a column an older results.csv lacks reads as NaN."""
    table: Dict[str, Dict[str, dict]] = defaultdict(dict)
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            table[r["task"]][r["system"]] = {k: float(r.get(k) or "nan") for k in METRICS}
    return table


def aggregate(table, tasks: List[str], systems: List[str]) -> List[dict]:
    rows = []
    for s in systems:
        ts = [t for t in tasks if s in table[t] and "base" in table[t]]
        if not ts:
            continue

        def values(system, metric, among=ts):
            return np.array([table[t][system][metric] for t in among])

        with_trained = [t for t in ts if "trained" in table[t]]

        def gap(metric):
            sys_gain = values(s, metric, with_trained) - values("base", metric, with_trained)
            tr_gain = values("trained", metric, with_trained) - values("base", metric, with_trained)
            return sys_gain, tr_gain

        g_sys, g_tr = gap("rougeL")
        p_sys, p_tr = gap("rougeL_paper")
        big = g_tr >= MIN_GAP
        rows.append({
            "system": s, "n_tasks": len(ts),
            **{m: values(s, m).mean() for m in ("rougeL", "rougeL_paper", "exact_match", "nll")},
            "beats_base": float(np.mean(values(s, "rougeL") > values("base", "rougeL"))),
            "gap_closed": float(g_sys.sum() / g_tr.sum()) if g_tr.sum() > 0 else float("nan"),
            "gap_closed_paper": float(p_sys.sum() / p_tr.sum()) if p_tr.sum() > 0 else float("nan"),
            "gap_closed_per_task": float(np.mean(g_sys[big] / g_tr[big])) if big.any()
            else float("nan"),
        })
    return rows


def paired_difference(table, tasks: List[str], a: str, b: str, n_boot: int = 10000,
                      seed: int = 0) -> tuple:
    """Mean over tasks of Rouge-L(a) - Rouge-L(b) and its 95 % paired bootstrap interval."""
    ts = [t for t in tasks if a in table[t] and b in table[t]]
    diff = np.array([table[t][a]["rougeL"] - table[t][b]["rougeL"] for t in ts])
    return bootstrap_mean(diff, n_boot, seed)


def _pct(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{100 * x:.0f} %"


def _num(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{x:.3f}"


def markdown_table(rows: List[dict]) -> str:
    out = ["| system | tasks | Rouge-L | Rouge-L (paper's) | exact match | NLL | beats base "
           "(Rouge-L) | gap closed (ratio of means) | gap closed (paper's Rouge-L) | gap closed "
           "(mean per task, gap ≥ 0.05) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| `{r['system']}` | {r['n_tasks']} | {r['rougeL']:.3f} | "
                   f"{_num(r['rougeL_paper'])} | {r['exact_match']:.3f} | {r['nll']:.3f} | "
                   f"{_pct(r['beats_base'])} | {_pct(r['gap_closed'])} | "
                   f"{_pct(r['gap_closed_paper'])} | {_pct(r['gap_closed_per_task'])} |")
    return "\n".join(out)


def plot_bars(table, tasks: List[str], systems: List[str], path: Path, setting: str) -> None:
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
    ax.set_title(f"SmolLM2-135M, {setting} setting: per-task Rouge-L (bank tasks leave-one-out; "
                 "x_ = not in the bank)")
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


def setting_section(name: str, results: Path, level: str = "##") -> tuple:
    """The markdown of one setting's results, its plots, and its aggregate rows."""
    table = load(results / "results.csv")
    tasks = list(table)
    systems = list(dict.fromkeys(s for t in tasks for s in table[t]))
    ordered = [s for s in BASELINES if s in systems] + sorted(s for s in systems if s not in BASELINES)
    bank = json.loads((results / "distances.json").read_text())["cols"]
    extra = [t for t in tasks if t not in bank]
    bank_tasks = [t for t in bank if t in table]      # bank order: families stay together
    all_rows = aggregate(table, tasks, ordered)
    meta = [r for r in all_rows if r["system"].startswith("metalora:")]
    best = max(meta, key=lambda r: r["rougeL"]) if meta else None
    sub = level + "#"
    lines = [f"{level} Setting `{name}` ({len(tasks)} tasks: {len(bank_tasks)} of the bank's, "
             f"leave-one-out, and {len(extra)} outside it; `{results.name}/`)", "",
             f"{sub} All evaluated tasks ({len(tasks)})", "", markdown_table(all_rows), ""]
    for title, part in ((f"Bank tasks, leave-one-out ({len(bank_tasks)})", bank_tasks),
                        (f"Extra tasks, not in the bank ({len(extra)})", extra)):
        if part:
            lines += [f"{sub} {title}", "", markdown_table(aggregate(table, part, ordered)), ""]
    if best:
        tok = [r for r in meta if r["system"].split(":")[1] in TOKEN_METRICS]
        emb = [r for r in meta if r["system"].split(":")[1] not in TOKEN_METRICS]
        base = next(r for r in all_rows if r["system"] == "base")
        lines += [f"{sub} Headlines", "",
                  f"- Best metalora configuration by mean Rouge-L: `{best['system']}` — "
                  f"{best['rougeL']:.3f} vs base {base['rougeL']:.3f}; beats base on "
                  f"{_pct(best['beats_base'])} of tasks; closes {_pct(best['gap_closed'])} of the "
                  f"base→trained gap (ratio of means), {_pct(best['gap_closed_per_task'])} (mean "
                  "per task)."]
        if tok and emb:
            lines.append(f"- Best token-id (paper) distance: "
                         f"`{max(tok, key=lambda r: r['rougeL'])['system']}` "
                         f"{max(r['rougeL'] for r in tok):.3f}; best embedding distance: "
                         f"`{max(emb, key=lambda r: r['rougeL'])['system']}` "
                         f"{max(r['rougeL'] for r in emb):.3f}.")
        rivals = ["meancos_top8", "val_single", "oracle_single",
                  max(tok, key=lambda r: r["rougeL"])["system"] if tok else None, PAPER_RULE,
                  "base"]
        lines.append(f"- Paired differences of `{best['system']}`'s Rouge-L over the tasks (mean, "
                     f"95 % bootstrap interval over tasks): " + "; ".join(
                         "vs `{}` {:+.3f} [{:+.3f}, {:+.3f}]".format(
                             s, *paired_difference(table, tasks, best["system"], s))
                         for s in dict.fromkeys(rivals)
                         if s in systems and s != best["system"]) + ".")
        for r in all_rows:
            if r["system"].startswith("metalora+val:"):
                lines.append(f"- With the validation split choosing top_k and scale: `{r['system']}`"
                             f" — {r['rougeL']:.3f}; beats base on {_pct(r['beats_base'])} of "
                             f"tasks; closes {_pct(r['gap_closed'])} of the gap (ratio of means), "
                             f"{_pct(r['gap_closed_per_task'])} (mean per task); paired "
                             "difference vs `{}` {:+.3f} [{:+.3f}, {:+.3f}].".format(
                                 best["system"], *paired_difference(table, tasks, r["system"],
                                                                    best["system"])))
        lines += retrieval_lines(table, tasks, best["system"], sub)
        searched = search_lines(table, tasks, results, {r["system"]: r for r in all_rows})
        if searched:
            lines += ["", "Forward-pass searches on 16 rows held out of each task's training split "
                      "(never its test split):", *searched]
        lines.append("")
        shown = (["base", "uniform", "meancos_top8", best["system"]]
                 + [s for s in systems if s.startswith("metalora+val:")] + ["trained"])
        in_order = extra + bank_tasks
        plot_bars(table, in_order, [s for s in shown if s in systems],
                  results / "per_task_rougeL.png", name)
        coefs: Dict[str, Dict[str, float]] = {}
        with open(results / "coefficients.jsonl") as f:
            for line in f:
                r = json.loads(line)
                if r["system"] == best["system"]:
                    coefs[r["task"]] = r["weights"]
        plot_heatmap(coefs, in_order, bank, best["system"], results / "coefficients_heatmap.png")
    return lines, {r["system"]: r for r in all_rows}, best


REFERENCE_RIVALS = (DEFAULTS, "metalora+val:sinkhorn:normalized:svd", "metalora+refine:64",
                    "lorahub")


def retrieval_lines(table, tasks: List[str], best: str, sub: str) -> List[str]:
    """The retrieval references (``oracle_single``, ``val_single``) against metalora's systems on
    the tasks that have both references (the references may be measured on fewer tasks than the
    rest, so every row here is over the same tasks): what choosing one adapter well reaches, and
    how much composing adapters adds."""
    ts = [t for t in tasks if "oracle_single" in table[t] and "val_single" in table[t]]
    if not ts:
        return []
    systems = ["base", "val_single", "oracle_single",
               *dict.fromkeys(s for s in (best, *REFERENCE_RIVALS)
                              if all(s in table[t] for t in ts)),
               "trained"]
    out = [f"{sub} Retrieval references: one bank adapter chosen on the test or the validation "
           f"split ({len(ts)} tasks that have both)", "",
           markdown_table(aggregate(table, ts, systems)), ""]
    pairs = [(s, ref) for ref in ("oracle_single", "val_single") for s in systems
             if s not in ("base", "trained", "oracle_single", "val_single")]
    pairs.append(("oracle_single", "val_single"))
    out.append("- Paired Rouge-L differences on these tasks (mean, 95 % bootstrap interval): "
               + "; ".join(
        "`{}` − `{}` {:+.3f} [{:+.3f}, {:+.3f}]".format(a, b, *paired_difference(table, ts, a, b))
        for a, b in pairs) + ".")
    return out + [""]


def search_lines(table, tasks: List[str], results: Path, rows: Dict[str, dict]) -> List[str]:
    """Headlines of the forward-pass searches (``metalora+refine:<budget>``, ``lorahub``): each
    against the defaults, LoraHub and base on the tasks both have, with CPU seconds per task
    (``refine.jsonl``: the search, from the setting's held-out training rows, and the written
    adapter's score; the last record of a task and system counts)."""
    cpu: Dict[str, Dict[str, float]] = defaultdict(dict)
    path = results / "refine.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            cpu[r["system"]][r["task"]] = r["cpu_s"]
    out = []
    for s in sorted(cpu, key=lambda x: (x == "lorahub", x)):
        if s not in rows:
            continue
        r = rows[s]
        c = np.array([cpu[s][t] for t in tasks if t in cpu[s] and s in table[t]])
        rivals = "; ".join("vs `{}` {:+.3f} [{:+.3f}, {:+.3f}]".format(
            o, *paired_difference(table, tasks, s, o))
            for o in (DEFAULTS, "lorahub", "metalora+val:sinkhorn:normalized:svd", "base")
            if o != s and o in rows)
        out.append(f"- `{s}`: Rouge-L {r['rougeL']:.3f} on {r['n_tasks']} tasks; beats base on "
                   f"{_pct(r['beats_base'])}; closes {_pct(r['gap_closed'])} of the gap (ratio of "
                   f"means), {_pct(r['gap_closed_per_task'])} (mean per task); search CPU seconds "
                   f"per task median {np.median(c):.0f}, max {c.max():.0f} (2 cores: wall time "
                   f"about half); paired Rouge-L differences {rivals}.")
    return out


def paper_table(by_setting: Dict[str, tuple]) -> List[str]:
    """Side by side with the paper, in the paper's Rouge-L (first reference, stemmer on)."""
    names = list(by_setting)
    head = ("| | paper (Mistral-7B-Instruct, 502 adapters) | "
            + " | ".join(f"SmolLM2-135M, `{n}` (48 adapters)" for n in names) + " |")
    out = [head, "|---|---:|" + "---:|" * len(names)]

    def cell(setting: str, system: Optional[str], key: str = "rougeL_paper") -> str:
        rows, _ = by_setting[setting]
        r = rows.get(system) if system else None
        if r is None or np.isnan(r[key]):
            return "–" if r is None else "n/a"
        text = _pct(r[key]) if key.startswith("gap") else _num(r[key])
        return text if system in ("base", "trained", PAPER_RULE) else f"{text} (`{system}`)"

    def best_of(setting: str) -> Optional[str]:
        rows, _ = by_setting[setting]
        meta = [r for s, r in rows.items()
                if s.startswith("metalora:") and not np.isnan(r["rougeL_paper"])]
        return max(meta, key=lambda r: r["rougeL_paper"])["system"] if meta else None

    gap = (PAPER["rule"] - PAPER["base"]) / (PAPER["trained"] - PAPER["base"])
    lines = [("base model", f"{PAPER['base']:.3f}", lambda n: cell(n, "base")),
             ("the paper's rule (JS, normalized, factor-wise average)", f"{PAPER['rule']:.3f}",
              lambda n: cell(n, PAPER_RULE)),
             ("best generated (best metalora configuration by this column)",
              f"{PAPER['rule']:.3f} (the rule above)", lambda n: cell(n, best_of(n))),
             ("metalora's defaults (sinkhorn, normalized, svd of the top 16)", "–",
              lambda n: cell(n, DEFAULTS)),
             ("metalora+val (validation split picks top_k and scale)", "–",
              lambda n: cell(n, next((s for s in by_setting[n][0]
                                      if s.startswith("metalora+val:")), None))),
             ("metalora+refine:64 (forward-pass search on 16 training rows)", "–",
              lambda n: cell(n, "metalora+refine:64")),
             ("LoraHub's recipe (20 random adapters, NGOpt, 40 evaluations)", "–",
              lambda n: cell(n, "lorahub")),
             ("trained LoRA of the task", f"{PAPER['trained']:.3f}",
              lambda n: cell(n, "trained")),
             ("gap closed by the paper's rule (ratio of means)", _pct(gap),
              lambda n: cell(n, PAPER_RULE, "gap_closed_paper")),
             ("gap closed by the best generated", _pct(gap),
              lambda n: cell(n, best_of(n), "gap_closed_paper")),
             ("gap closed by metalora's defaults", "–",
              lambda n: cell(n, DEFAULTS, "gap_closed_paper"))]
    for label, paper, fn in lines:
        out.append(f"| {label} | {paper} | " + " | ".join(fn(n) for n in names) + " |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "summary.md")
    args = ap.parse_args(argv)
    sections, by_setting = [], {}
    for name, setting in SETTINGS.items():
        if (setting.results_dir / "results.csv").is_file():
            lines, rows, best = setting_section(name, setting.results_dir)
            sections += lines
            by_setting[name] = (rows, best)
    if not by_setting:
        raise SystemExit("no results.csv in any setting's folder: run evaluate.py first")
    lines = ["# Quality benchmark: SmolLM2-135M-Instruct, generated adapters vs baselines", "",
             "Produced by `bench/quality/report.py` from each setting's `results.csv` (see "
             "`bench/quality/README.md` for the setup and which setting reproduces the paper). "
             "Rouge-L and exact match from greedy decoding; Rouge-L is ours (best over the "
             "accepted references, no stemming), Rouge-L (paper's) is `rouge-score` with the "
             "stemmer against the first reference, as the paper scores; NLL = teacher-forced "
             "per-token negative log-likelihood of the target (lower is better). Bank tasks are "
             "evaluated leave-one-out (their own adapter removed from the bank); `x_` tasks have no "
             "adapter in the bank at all (their `trained` reference is an adapter trained the same "
             "way and kept outside the bank). `oracle_single` is the one bank adapter with the best "
             "test Rouge-L (an upper bound for any one-adapter choice, not a method); `val_single` "
             "and `metalora+val` also use the task's validation split (to pick one adapter, or "
             "top_k and scale); the others see only its training split. `n/a`: not measured in "
             "that run (a results.csv from before the column existed).", "",
             "## Side by side with the paper (Rouge-L as the paper computes it)", "",
             *paper_table(by_setting), "", *sections]
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
