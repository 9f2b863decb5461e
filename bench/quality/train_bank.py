"""Train one PEFT LoRA per task on SmolLM2-135M (CPU torch), resumable; builds a setting's bank.

    nohup python bench/quality/train_bank.py [--setting instructed] > bench/.cache/quality/train.log 2>&1 &

Bank tasks go to ``bench/quality/bank<suffix>/<task>/`` and their manifest ``bank.jsonl`` (adapter
and training-set pointers, read by ``metalora.Bank``); the extra tasks' own LoRAs, used only as the
"trained" reference of tasks that are not in the bank, go to ``bench/quality/extra<suffix>/``
(suffix ``""`` for the plain setting, ``_instructed`` for the instructed one: see
``common.SETTINGS``; the prompt format is the setting's, the recipe is the same). A finished
adapter (its ``train_log.json`` exists) is skipped, so the script can be stopped and restarted.
Each adapter is written to a temporary folder and renamed when complete. Its seed comes from its
task id (``common.task_seed``), so that one adapter can be rebuilt alone; the committed plain
bank predates that rule (its seeds, 1000 + the position in that run's to-do list, are in each
``train_log.json``).

Recipe (chosen so that the 52 adapters build in about 1.5 h on 2 cores; see README.md): LoRA
r=8, alpha=16 on q_proj and v_proj of all 30 layers (0.46 M parameters, 0.9 MB in bf16), AdamW
lr 4e-3 with 4 warm-up steps and linear decay, batch 8, 40-64 steps (about 20 k training tokens
of the plain prompts, whatever the setting, so that both banks train as long; see MAX_STEPS), at
most the setting's ``max_tokens`` per example, bf16 autocast (1.3x faster steps on the CPU that
built the plain bank), loss on the target tokens only (the vocabulary projection runs on those
positions only). Saved in bfloat16, as PEFT's safetensors layout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (SETTINGS, TASKS_DIR, Setting, collate, encode, instruction,  # noqa: E402
                    load_model, load_split, target_loss, target_nll, task_ids, task_seed)

RANK, ALPHA, TARGETS = 8, 16, ["q_proj", "v_proj"]
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"   # what PEFT should load the adapters over
BATCH, LR, WARMUP = 8, 4e-3, 4
# About equal data per adapter: ~20 k training tokens, i.e. 42 steps for a task of 60-token
# examples, more for tasks of short examples. The cap was 120 for the first 26 adapters of the
# committed bank and lowered to 64 for the other 26 to fit the session that built it: steps of
# short examples turned out not to be much cheaper (a fixed ~1 s per step on 2 cores). Each
# adapter's train_log.json records its steps.
TOKEN_BUDGET, MIN_STEPS, MAX_STEPS = 20_000, 40, 64


def train_one(rows: dict, out_dir: Path, base, tok, seed: int, setting: Setting,
              task_instruction=None, record=None) -> dict:
    """Train the LoRA of one task (``rows``: its ``train`` and ``validation`` rows) into
    ``out_dir``; ``record`` adds fields to its ``train_log.json``."""
    import torch
    from peft import LoraConfig, get_peft_model

    t0 = time.time()
    train = [encode(tok, r, setting, task_instruction) for r in rows["train"]]
    val = [encode(tok, r, setting, task_instruction) for r in rows["validation"]]
    plain = [encode(tok, r, SETTINGS["plain"]) for r in rows["train"]]
    mean_len = float(np.mean([len(p) + len(t) for p, t in plain]))
    steps = int(np.clip(round(TOKEN_BUDGET / (BATCH * mean_len)), MIN_STEPS, MAX_STEPS))
    torch.manual_seed(seed)
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    val_before = target_nll(model, val)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / WARMUP) * max(0.0, (steps - s) / steps))
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(train)) for _ in range(steps * BATCH // len(train) + 1)])
    losses = []
    model.train()
    for step in range(steps):
        batch = [train[i] for i in order[step * BATCH:(step + 1) * BATCH]]
        ids, mask, labels = collate(batch, pad_id=tok.eos_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = target_loss(model, ids, mask, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 5))
    model.eval()
    val_after = target_nll(model, val)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for p in params:
        p.data = p.data.to(torch.bfloat16)
    model.save_pretrained(tmp)
    portable_config(tmp)
    base = model.unload()          # remove the LoRA layers; the base weights are untouched
    record = {**(record or {}), "setting": setting.name, "rank": RANK, "alpha": ALPHA,
              "target_modules": TARGETS, "steps": steps, "batch": BATCH, "lr": LR, "seed": seed,
              "n_train": len(train), "mean_tokens": round(float(np.mean([len(p) + len(t) for p, t
                                                                         in train])), 1),
              "train_loss": losses, "validation_nll_base": round(val_before, 5),
              "validation_nll": round(val_after, 5), "seconds": round(time.time() - t0, 1)}
    (tmp / "train_log.json").write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return record


def portable_config(adapter_dir: Path) -> None:
    """Point ``base_model_name_or_path`` at the hub id instead of this machine's cache folder, and
    drop PEFT's empty model-card template (it names that folder too)."""
    (adapter_dir / "README.md").unlink(missing_ok=True)
    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    if cfg.get("base_model_name_or_path") != BASE_MODEL_ID:
        cfg["base_model_name_or_path"] = BASE_MODEL_ID
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)


def write_manifest(bank_dir: Path) -> None:
    lines = []
    for task in task_ids(TASKS_DIR, "bank"):
        if (bank_dir / task / "train_log.json").is_file():
            lines.append(json.dumps({"id": task, "adapter": task,
                                     "dataset": f"../tasks/{task}/train.jsonl"}))
    tmp = bank_dir / ".bank.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(bank_dir / "bank.jsonl")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="plain",
                    help="prompt format and bank folder (default: %(default)s)")
    ap.add_argument("--tasks", nargs="*", help="only these task ids (default: every bank and extra task)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    setting = SETTINGS[args.setting]
    bank_dir = setting.bank_dir
    jobs = [(t, bank_dir) for t in task_ids(TASKS_DIR, "bank")] + \
           [(t, setting.extra_dir) for t in task_ids(TASKS_DIR, "extra")]
    if args.tasks:
        jobs = [j for j in jobs if j[0] in set(args.tasks)]
    todo = [(t, d) for t, d in jobs if not (d / t / "train_log.json").is_file()]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} adapters already trained; {len(todo)} to go",
          flush=True)
    base, tok = load_model()
    for p in base.parameters():
        p.requires_grad_(False)
    t_all = time.time()
    for k, (task, root) in enumerate(todo):
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        rows = {s: load_split(task, s) for s in ("train", "validation")}
        rec = train_one(rows, root / task, base, tok, task_seed(task), setting, instruction(task),
                        record={"task": task, "dataset": f"tasks/{task}/train.jsonl"})
        el = time.time() - t0
        left = (time.time() - t_all) / (k + 1) * (len(todo) - k - 1)
        print(f"[{k + 1}/{len(todo)}] {task}: loss {rec['train_loss'][0]:.3f} -> "
              f"{np.mean(rec['train_loss'][-8:]):.3f}, validation NLL {rec['validation_nll_base']:.3f}"
              f" -> {rec['validation_nll']:.3f}, {el:.0f} s (about {left / 60:.0f} min left)",
              flush=True)
        if root == bank_dir:
            write_manifest(bank_dir)
    bank_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(bank_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
