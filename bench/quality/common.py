"""Shared paths and helpers of the quality benchmark (``bench/quality``, never run in CI).

Data flow of the benchmark: ``prepare_model.py`` (SmolLM2-135M-Instruct, GGUF -> safetensors) and
``prepare_tasks.py`` (BIG-bench tasks -> ``tasks/<id>/{train,validation,test}.jsonl``) ->
``train_bank.py`` (one PEFT LoRA per task -> ``bank/``) -> ``evaluate.py`` (leave-one-out
generation + scoring -> ``results/results.csv``) -> ``report.py`` (``summary.md`` and plots).

Two settings (:data:`SETTINGS`), each with its own prompt format, token limit, bank and results
folders: ``plain`` (the input alone; ``bank/``, ``extra/``, ``results/``) and ``instructed`` (the
task's instruction before the input, as in the paper's Natural-Instructions prompts;
``bank_instructed/``, ``extra_instructed/``, ``results_instructed/``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
TASKS_DIR = HERE / "tasks"
RESULTS_DIR = HERE / "results"      # the plain setting's results and the summary of both
CACHE_DIR = Path(os.environ.get("METALORA_QUALITY_CACHE", HERE.parent / ".cache" / "quality"))
MODEL_DIR = CACHE_DIR / "smollm2-135m-instruct"
SPLITS = ("train", "validation", "test")

MAX_TARGET_TOKENS = 32   # longer targets are cut (rare after the task selection)


def plain_prompt(text: str, instruction: Optional[str]) -> str:
    """``input\n``: no chat template and no instruction; what the task is must come from the
    adapter."""
    return text + "\n"


def instructed_prompt(text: str, instruction: Optional[str]) -> str:
    """The task's instruction, then the input, in the Natural-Instructions layout (no chat
    template); a task without an instruction gets the same layout without it."""
    head = f"{instruction}\n\n" if instruction else ""
    return f"{head}Input: {text}\nOutput:\n"


@dataclass(frozen=True)
class Setting:
    """A prompt format and the folders of the bank trained and evaluated with it."""

    name: str
    prompt: Callable[[str, Optional[str]], str]   # (input, task instruction) -> prompt text
    max_tokens: int                               # prompt + target; the prompt is cut from the left
    suffix: str = ""

    @property
    def bank_dir(self) -> Path:
        return HERE / f"bank{self.suffix}"

    @property
    def extra_dir(self) -> Path:      # trained LoRAs of the extra tasks (not in the bank)
        return HERE / f"extra{self.suffix}"

    @property
    def results_dir(self) -> Path:
        return HERE / f"results{self.suffix}"


# Output format in both: the target + <|im_end|>. plain: 80 tokens (the committed bank's limit).
# instructed: 768 tokens, above the longest stored example (707 tokens, question typing, whose
# instruction alone is 635); median 144 tokens, 95th percentile 334 (the stored train splits).
SETTINGS: Dict[str, Setting] = {
    "plain": Setting("plain", plain_prompt, 80),
    "instructed": Setting("instructed", instructed_prompt, 768, "_instructed"),
}


def load_split(task: str, split: str, tasks_dir: Path = TASKS_DIR) -> List[Dict]:
    """Rows ``{"input", "output", "references"?}`` of one split of a stored task."""
    path = tasks_dir / task / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `python bench/quality/prepare_tasks.py`")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@lru_cache(maxsize=None)
def _index(tasks_dir: Path) -> dict:
    return json.loads((tasks_dir / "index.json").read_text())


def canary(tasks_dir: Path = TASKS_DIR) -> str:
    """BIG-bench's canary string, for every file that stores (or scores) its examples."""
    return _index(tasks_dir)["canary"]


def task_ids(tasks_dir: Path = TASKS_DIR, role: str = "bank") -> List[str]:
    """Task ids of ``role`` ("bank" or "extra") from ``tasks/index.json``."""
    return [t["id"] for t in _index(tasks_dir)["tasks"] if t["role"] == role]


def instruction(task: str, tasks_dir: Path = TASKS_DIR) -> Optional[str]:
    """The stored task's instruction (``tasks/index.json``; None when its source has none)."""
    return next(t for t in _index(tasks_dir)["tasks"] if t["id"] == task).get("instruction")


def task_seed(task: str) -> int:
    """A training seed from the task id alone, so that one adapter can be rebuilt on its own."""
    return int.from_bytes(hashlib.sha256(f"lora:{task}".encode()).digest()[:4], "little")


def references(row: Dict) -> List[str]:
    return row.get("references") or [row["output"]]


def load_model(dtype: str = "float32"):
    """The base model and tokenizer from the converted cache folder (``prepare_model.py``)."""
    if not (MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"{MODEL_DIR} has no model: run `python bench/quality/prepare_model.py`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, torch_dtype=getattr(torch, dtype))
    model.eval()
    return model, tok


_WORD = re.compile(r"[a-z0-9]+")


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F1 on lower-cased alphanumeric tokens (the tokenisation of ``rouge_score``)."""
    p, r = _WORD.findall(prediction.lower()), _WORD.findall(reference.lower())
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


@lru_cache(maxsize=1)
def _paper_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_paper(prediction: str, reference: str) -> float:
    """Rouge-L F1 as the paper scores it: ``rouge-score`` with the Porter stemmer on (what HF
    ``evaluate``'s ``rouge`` runs), against the task's first reference only."""
    return _paper_scorer().score(reference, prediction)["rougeL"].fmeasure


def normalise(text: str) -> str:
    """Exact-match normal form: lower case, alphanumeric tokens joined by single spaces."""
    return " ".join(_WORD.findall(text.lower()))


def encode(tok, row: Dict, setting: Setting, instruction: Optional[str] = None):
    """Token ids of the prompt and of the target (+ eos) of ``row`` in ``setting``, cut to its limits.

    The prompt is tokenized on its own so that generation starts exactly where training's
    targets start; it is cut from the left when prompt + target exceed ``setting.max_tokens``.
    """
    target = tok(row["output"], add_special_tokens=False).input_ids[:MAX_TARGET_TOKENS - 1]
    target = target + [tok.eos_token_id]
    prompt = tok(setting.prompt(row["input"], instruction), add_special_tokens=False).input_ids
    prompt = prompt[-(setting.max_tokens - len(target)):]
    return prompt, target


def collate(pairs, pad_id: int):
    """Right-padded batch: ``input_ids``, ``attention_mask`` and ``labels`` (-100 off target)."""
    import torch

    n = max(len(p) + len(t) for p, t in pairs)
    ids = torch.full((len(pairs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), n), dtype=torch.long)
    labels = torch.full((len(pairs), n), -100, dtype=torch.long)
    for i, (p, t) in enumerate(pairs):
        seq = p + t
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, len(p):len(seq)] = torch.tensor(t)
    return ids, mask, labels


def shared_prefix(prompts) -> int:
    """Length of the token prefix that all ``prompts`` share (the instruction of an instructed
    task), each keeping one token of its own: the library's rule
    (:func:`metalora.refine.scorer.shared_prefix`, 0 below its ``MIN_SHARED_PREFIX`` tokens or for
    a single prompt), so that the harness and ``generate --refine`` cache the same prefixes."""
    from metalora.refine.scorer import shared_prefix as library_rule

    return library_rule(prompts)


def bootstrap_mean(x, n_boot: int = 10000, seed: int = 0) -> tuple:
    """Mean of the per-task values ``x`` and its 95 % bootstrap interval (tasks resampled)."""
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    boot = np.random.default_rng(seed).choice(x, size=(n_boot, x.size)).mean(axis=1)
    return float(x.mean()), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def prefix_cache(inner, prefix, batch: int):
    """The key/value cache of ``prefix``, computed once and repeated for ``batch`` rows.

    Causal attention makes a shared prefix's states independent of what follows, so this is the
    same computation as running it in every row (gradients flow through the repeat), at 1/batch
    of its cost; in the instructed setting the instruction is most of every prompt.
    """
    import torch

    cache = inner.model(input_ids=torch.tensor([prefix]), use_cache=True).cache
    cache.batch_repeat_interleave(batch)
    return cache


def target_loss(model, ids, mask, labels, reduction: str = "mean"):
    """Cross-entropy of the target tokens; the vocabulary projection runs on target positions only.

    Targets are a few tokens of each sequence, and the tied 49 k-word head is a fifth of the
    model's FLOPs per position, so this saves that much of every step. A prompt prefix shared by
    every row (the instruction) runs once (:func:`prefix_cache`).
    """
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    first_target = (labels != -100).int().argmax(1)
    k = shared_prefix([ids[i, :int(first_target[i])].tolist() for i in range(len(ids))])
    if k:
        n = ids.shape[1]
        hidden = inner.model(input_ids=ids[:, k:], attention_mask=mask,
                             cache=prefix_cache(inner, ids[0, :k].tolist(), len(ids)),
                             position_ids=torch.arange(k, n).expand(len(ids), n - k),
                             use_cache=True).last_hidden_state
    else:
        hidden = inner.model(input_ids=ids, attention_mask=mask).last_hidden_state
    lab = labels[:, k + 1:]
    keep = lab != -100
    # float32 head: bf16 logits of size ~20 would be off by up to 0.06 per token
    logits = torch.nn.functional.linear(hidden[:, :-1][keep].float(), inner.lm_head.weight.float())
    return torch.nn.functional.cross_entropy(logits, lab[keep], reduction=reduction), int(keep.sum())


def target_nll(model, pairs, batch_size: int = 32) -> float:
    """Mean per-token negative log-likelihood of the targets, teacher-forced (float32)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(pairs), batch_size):
            ids, mask, labels = collate(pairs[s:s + batch_size], pad_id=0)
            loss, n = target_loss(model, ids, mask, labels, reduction="sum")
            total += float(loss)
            count += n
    return total / max(count, 1)
