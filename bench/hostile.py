"""Re-run the hostile tries of issue 16 and print the table: bad inputs tried, faults injected,
crashes, outputs lost, bank files changed.

    PYTHONPATH=python python bench/hostile.py [--kills 30] [--seed 0]

Bad inputs: each is run through the CLI in a subprocess (``python -m metalora ...``); a *crash*
is an exit by a signal, a traceback, or a status other than 0/2. Faults: seeded SIGKILLs of
``metalora generate`` (fresh and ``--overwrite`` outputs) and ``metalora bank add`` (see
tests/_faults.py). Bank files are compared byte for byte before and after everything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "python"))

from _faults import fault_campaign, tree_digest  # noqa: E402


def _cli(args, env) -> tuple:
    r = subprocess.run([sys.executable, "-m", "metalora", *args], capture_output=True, text=True,
                       env=env, timeout=300)
    crashed = r.returncode < 0 or r.returncode not in (0, 2) or "Traceback" in r.stderr
    return r.returncode, crashed, r.stderr.strip().splitlines()[-1:] if r.stderr else []


def bad_inputs(work: Path, bank: Path, data: Path, env: dict) -> list:
    """(label, argv) pairs: each a hostile input through the CLI."""
    from _bank_helpers import base_config, random_factors, write_adapter
    import numpy as np

    rng = np.random.default_rng(0)
    cases = []
    out = work / "bad-out"
    out.mkdir()
    gen = ["generate", "--bank", str(bank), "--data", str(data), "--quiet", "--top-k", "4"]
    for t in ("100000", str(2**31), "-1", "x"):
        cases.append((f"--threads {t}", gen + ["--out", str(out / f"t{t}"), "--threads", t]))
    cases.append(("--out inside the bank", gen + ["--out", str(bank / "x"), "--overwrite"]))
    cases.append(("--out = a bank adapter", gen + ["--out", str(bank / "adapters" / "uppercase"),
                                                    "--overwrite"]))
    link = work / "link"
    link.symlink_to(bank / "adapters")
    cases.append(("--out via a symlink into the bank", gen + ["--out", str(link / "uppercase"),
                                                               "--overwrite"]))
    zero = work / "zero.jsonl"
    zero.symlink_to("/dev/zero")
    cases.append(("--data /dev/zero", ["generate", "--bank", str(bank), "--data", "/dev/zero",
                                       "--out", str(out / "z")]))
    cases.append(("--data -> /dev/zero", ["generate", "--bank", str(bank), "--data", str(zero),
                                          "--out", str(out / "z")]))
    for name, text in [("empty strings", '{"input": "", "output": ""}\n' * 5),
                       ("one row", '{"input": "a", "output": "b"}\n'),
                       ("duplicates", '{"input": "a", "output": "b"}\n' * 50),
                       ("nested 100k", '{"input": ' + "[" * 100000 + "]" * 100000 + "}\n"),
                       ("not utf-8", None), ("bad csv", None)]:
        p = work / f"d-{name.replace(' ', '_')}.jsonl"
        if name == "not utf-8":
            p.write_bytes(b"\xff\xfe\x00 broken")
        elif name == "bad csv":
            p = work / "bad.csv"
            p.write_text('input,output\n"' + "a" * 200000 + '",b\n')
        else:
            p.write_text(text)
        cases.append((f"dataset: {name}", ["generate", "--bank", str(bank), "--data", str(p),
                                           "--out", str(out / name.replace(' ', '_')),
                                           "--quiet"]))
    tok = work / "tokenizer.json"
    tok.write_text('{"no": "tokenizer"}')
    cases.append(("invalid --tokenizer", gen + ["--out", str(out / "tok"), "--distance", "kl",
                                                 "--tokenizer", str(tok)]))
    # broken adapters and banks, through `inspect`
    mk = lambda d, **cfg: write_adapter(work / d, random_factors(rng), base_config(**cfg))  # noqa
    mk("regex", rank_pattern={"(": 8})
    cases.append(("rank_pattern '('", ["inspect", str(work / "regex")]))
    deep = mk("deep")
    hdr = b"[" * 100000 + b"]" * 100000
    (deep / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(hdr)) + hdr)
    cases.append(("safetensors header nested 100k", ["inspect", str(deep)]))
    for k, mutate in [("truncated", lambda b: b[: len(b) // 2]), ("length 2**64-1",
                      lambda b: b"\xff" * 8 + b[8:]), ("dtype list", lambda b: b.replace(
                          b'"F32"', b'["F"]', 1)), ("zero bytes", lambda b: b"")]:
        a = mk(f"st-{k.replace(' ', '_').replace('*', '')}")
        f = a / "adapter_model.safetensors"
        f.write_bytes(mutate(f.read_bytes()))
        cases.append((f"safetensors {k}", ["inspect", str(a)]))
    for v in (5, None, ["x"], ""):
        b = work / f"bank-{type(v).__name__}-{v!r}"[:40].replace(" ", "")
        shutil.copytree(bank, b)
        lines = (b / "bank.jsonl").read_text().splitlines()
        e = json.loads(lines[0])
        e["adapter"] = v
        lines[0] = json.dumps(e)
        (b / "bank.jsonl").write_text("\n".join(lines) + "\n")
        cases.append((f"bank.jsonl adapter {v!r}", ["inspect", str(b)]))
    bad_cfg = mk("other-base", base_model_name_or_path="other/model")
    cases.append(("bank add onto a broken bank.jsonl", ["bank", "add", str(work / "bank-int-5"),
                                                     "--id", "z", "--adapter", str(bad_cfg)]))
    return cases


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from metalora.demo import demo_bank, example_dataset

    work = Path(tempfile.mkdtemp(prefix="metalora-hostile-"))
    try:
        bank = work / "bank"
        shutil.copytree(demo_bank(), bank)
        before = tree_digest(bank)
        env = dict(os.environ, METALORA_CACHE_DIR=str(work / "cache"),
                   PYTHONPATH=str(ROOT / "python"))
        crashes, rows = 0, []
        cases = bad_inputs(work, bank, example_dataset(), env)
        for label, argv in cases:
            rc, crashed, last = _cli(argv, env)
            crashes += crashed
            rows.append((label, rc, "CRASH" if crashed else "ok", (last or [""])[0][:90]))
        for label, rc, verdict, last in rows:
            print(f"  {label:38s} exit {rc:3d} {verdict:5s} {last}")
        faults = fault_campaign(work / "faults" if (work / "faults").mkdir() is None else work,
                                bank, example_dataset(), kills=args.kills, seed=args.seed)
        changed = sum(1 for k, v in tree_digest(bank).items() if before.get(k) != v) + \
            len(set(before) - set(tree_digest(bank)))
        table = [("bad inputs tried (CLI)", len(cases)),
                 ("faults injected (SIGKILL)", faults["faults"]),
                 ("crashes (signal, traceback, odd exit)", crashes + faults["crashes"]),
                 ("outputs lost or invalid", faults["outputs_lost"] + faults["invalid_outputs"]),
                 ("temporaries left after the next run", faults["temporaries_left"]),
                 ("bank files changed", changed + faults["bank_files_changed"])]
        print("\n| hostile run | count |\n|---|---:|")
        for k, v in table:
            print(f"| {k} | {v} |")
        bad = table[2][1] + table[3][1] + table[4][1] + table[5][1]
        return 1 if bad else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
