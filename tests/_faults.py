"""Fault injection for issue 16, shared by tests/test_faults.py (a small seeded run in CI) and
bench/hostile.py (the full run behind the README's table).

``kill_generate`` starts ``metalora generate`` (or ``bank add``) in a subprocess, SIGKILLs it
after a seeded random delay, and checks the invariants: the output is absent or a complete,
valid adapter; the bank's files are byte-identical; after the next run no temporary is left.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the folder holding the metalora the tests import (the installed wheel in CI, python/ in a
#: development build): subprocesses must run that one, not the source tree without its _core
METALORA_PATH = str(Path(__import__("metalora").__file__).resolve().parents[1])


def tree_digest(root: Path) -> dict:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = Path(d) / f
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _env(cache: Path) -> dict:
    py = METALORA_PATH
    return dict(os.environ, METALORA_CACHE_DIR=str(cache),
                PYTHONPATH=py + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _valid_or_absent(out: Path) -> bool:
    if not os.path.lexists(out):
        return True
    import metalora

    try:
        metalora.load_adapter(out, check_finite=True)
        return True
    except Exception:
        return False


def _temporaries(parent: Path, name: str) -> list:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def kill_run(cmd: list, delay: float, env: dict) -> int:
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    time.sleep(delay)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    return p.wait()


def fault_campaign(work: Path, bank: Path, data: Path, kills: int, seed: int = 0,
                   max_delay: float = 6.0) -> dict:
    """SIGKILL ``metalora generate`` (half of them with --overwrite over an earlier output) and
    ``metalora bank add`` at seeded random times; returns the counts of the table."""
    rng = random.Random(seed)
    env = _env(work / "cache")
    bank_before = tree_digest(bank)
    res = {"faults": 0, "killed": 0, "outputs_lost": 0, "invalid_outputs": 0,
           "temporaries_left": 0, "bank_files_changed": 0, "crashes": 0}
    gen = [sys.executable, "-m", "metalora", "generate", "--data", str(data), "--bank",
           str(bank), "--quiet", "--top-k", "4"]
    # a complete earlier output, to be overwritten (it must never be lost)
    base = work / "out-overwrite"
    subprocess.run(gen + ["--out", str(base)], env=env, check=True, capture_output=True)
    for i in range(kills):
        delay = rng.uniform(0.05, max_delay)
        if i % 3 == 2:  # bank add on a scratch copy of the bank (never the one compared)
            scratch = work / f"scratch-bank{i}"
            if not scratch.exists():
                shutil.copytree(bank, scratch)
            man = (scratch / "bank.jsonl").read_text()
            first = json.loads(man.splitlines()[0])
            cmd = [sys.executable, "-m", "metalora", "bank", "add", str(scratch), "--id",
                   f"dup{i}", "--adapter", str(scratch / first["adapter"])]
            rc = kill_run(cmd, delay / 4, env)
            res["faults"] += 1
            res["killed"] += rc == -signal.SIGKILL
            res["crashes"] += rc not in (0, 2, -signal.SIGKILL)
            from metalora import Bank

            try:
                Bank(scratch)  # the manifest is old or new, never half written
            except Exception:
                res["invalid_outputs"] += 1
            continue
        over = i % 2 == 1
        out = base if over else work / f"out{i}"
        rc = kill_run(gen + ["--out", str(out)] + (["--overwrite"] if over else []), delay, env)
        res["faults"] += 1
        res["killed"] += rc == -signal.SIGKILL
        res["crashes"] += rc not in (0, 2, -signal.SIGKILL)
        if not _valid_or_absent(out):
            res["invalid_outputs"] += 1
        if over:
            # the overwritten adapter: old or new, restorable at once by `metalora inspect`
            subprocess.run([sys.executable, "-m", "metalora", "inspect", str(out)], env=env,
                           capture_output=True)
            if not (out / "adapter_model.safetensors").is_file():
                res["outputs_lost"] += 1
    # the next run cleans every dead process's temporaries
    for o in [base] + [work / f"out{i}" for i in range(kills)]:
        r = subprocess.run(gen + ["--out", str(o), "--overwrite"], env=env, capture_output=True)
        res["crashes"] += r.returncode not in (0, 2)
        res["temporaries_left"] += len(_temporaries(o.parent, o.name))
        if not _valid_or_absent(o) or not o.is_dir():
            res["invalid_outputs"] += 1
    res["bank_files_changed"] = sum(1 for k, v in tree_digest(bank).items()
                                    if bank_before.get(k) != v) + \
        len(set(bank_before) - set(tree_digest(bank)))
    return res
