"""The demonstration bank: random adapters for a tiny random model, built on first use.

Twelve small text tasks in five families (letter case, letter order, arithmetic, word lookup,
classification), each with 40 examples made by the generators below, and for each task a rank-4
LoRA adapter for a *tiny random model* (2 layers, hidden size 64, q_proj and v_proj). The
adapters are random, drawn so that tasks of one family have similar adapters: the bank shows the
whole pipeline (signatures, distances, coefficients, combination, a PEFT directory) in seconds,
but the adapters it produces improve no real LLM. Everything that uses it says so.

It serves the tests, and ``metalora generate --example`` falls back to it when the built-in
SmolLM2-135M bank (:mod:`metalora.default_bank`) is not installed. It is built on first use into
the cache (``$METALORA_CACHE_DIR`` or ``~/.cache/metalora``),
deterministically, and never downloaded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

__all__ = ["demo_bank", "example_dataset", "DEMO_NOTICE"]

DEMO_VERSION = 1
DEMO_NOTICE = ("DEMONSTRATION BANK: random rank-4 adapters for a tiny random model, one per toy "
               "task; the result shows the pipeline but improves no real LLM.")
EXAMPLES_PER_TASK = 40

_WORDS = ("river stone garden window lantern pencil meadow rocket violin harbor candle forest "
          "puzzle mirror breeze castle orange silver thunder island").split()
_ADJ_POS = "wonderful delightful excellent charming brilliant pleasant".split()
_ADJ_NEG = "terrible awful dreadful boring disappointing unpleasant".split()
_NOUNS = "movie meal concert book trip hotel".split()
_ANTONYMS = [("hot", "cold"), ("tall", "short"), ("early", "late"), ("happy", "sad"),
             ("open", "closed"), ("fast", "slow"), ("light", "dark"), ("full", "empty"),
             ("strong", "weak"), ("loud", "quiet"), ("rich", "poor"), ("wet", "dry")]
_PLURALS = [("cat", "cats"), ("box", "boxes"), ("child", "children"), ("mouse", "mice"),
            ("city", "cities"), ("leaf", "leaves"), ("foot", "feet"), ("bus", "buses"),
            ("person", "people"), ("knife", "knives"), ("tooth", "teeth"), ("baby", "babies")]
_CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
             ("Norway", "Oslo"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Chile", "Santiago"),
             ("Spain", "Madrid"), ("India", "New Delhi"), ("Ghana", "Accra"), ("Italy", "Rome")]


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 6)))


def _pair_task(table, fmt) -> Callable[[random.Random], Tuple[str, str]]:
    return lambda rng: (lambda p: (fmt.format(p[0]), p[1]))(rng.choice(table))


# task name -> (family, generator of one (input, output) example)
TASKS: Dict[str, Tuple[str, Callable[[random.Random], Tuple[str, str]]]] = {
    "uppercase": ("case", lambda r: (lambda s: (f"Uppercase: {s}", s.upper()))(_sentence(r))),
    "title_case": ("case", lambda r: (lambda s: (f"Title case: {s}", s.title()))(_sentence(r))),
    "reverse_word": ("order", lambda r: (lambda w: (f"Reverse the letters of {w}", w[::-1]))(r.choice(_WORDS))),
    "sort_letters": ("order", lambda r: (lambda w: (f"Sort the letters of {w}", "".join(sorted(w))))(r.choice(_WORDS))),
    "add": ("arithmetic", lambda r: (lambda a, b: (f"What is {a} plus {b}?", str(a + b)))(r.randint(2, 99), r.randint(2, 99))),
    "subtract": ("arithmetic", lambda r: (lambda a, b: (f"What is {a + b} minus {b}?", str(a)))(r.randint(2, 99), r.randint(2, 99))),
    "multiply": ("arithmetic", lambda r: (lambda a, b: (f"What is {a} times {b}?", str(a * b)))(r.randint(2, 12), r.randint(2, 12))),
    "antonym": ("lookup", _pair_task(_ANTONYMS, "Give the opposite of the word '{}'.")),
    "plural": ("lookup", _pair_task(_PLURALS, "Give the plural of '{}'.")),
    "capital": ("lookup", _pair_task(_CAPITALS, "What is the capital of {}?")),
    "even_odd": ("classify", lambda r: (lambda n: (f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd"))(r.randint(1, 999))),
    "sentiment": ("classify", lambda r: (lambda pos: (f"The {r.choice(_NOUNS)} was {r.choice(_ADJ_POS if pos else _ADJ_NEG)}. Sentiment?", "positive" if pos else "negative"))(r.random() < 0.5)),
}
#: The held-out task of `metalora generate --example`: no adapter in the bank was made for it.
EXAMPLE_TASK = ("lowercase", "case",
                lambda r: (lambda s: (f"Lowercase: {s.upper()}", s))(_sentence(r)))

_LAYERS, _HIDDEN, _R, _ALPHA = 2, 64, 4, 8
_MODULES = [f"model.layers.{i}.self_attn.{p}" for i in range(_LAYERS) for p in ("q_proj", "v_proj")]


def _examples(name: str, gen) -> List[dict]:
    rng = random.Random(f"metalora-demo-{name}")
    return [dict(zip(("input", "output"), gen(rng))) for _ in range(EXAMPLES_PER_TASK)]


def _write_jsonl(path: Path, rows: List[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _cache_root() -> Path:
    from .signatures import default_cache_dir

    return default_cache_dir().parent  # the signatures/ folder's parent


def _build(root: Path) -> None:
    from .adapter import Adapter

    rng = np.random.default_rng(DEMO_VERSION)
    families = sorted({fam for fam, _ in TASKS.values()})
    centers = {f: [(rng.standard_normal((_R, _HIDDEN)) / 8, rng.standard_normal((_HIDDEN, _R)) / 8)
                   for _ in _MODULES] for f in families}
    (root / "data").mkdir()
    (root / "adapters").mkdir()
    lines = []
    for name, (family, gen) in TASKS.items():
        _write_jsonl(root / "data" / f"{name}.jsonl", _examples(name, gen))
        modules = {m: ((c[0] + rng.standard_normal(c[0].shape) / 20).astype(np.float32),
                       (c[1] + rng.standard_normal(c[1].shape) / 20).astype(np.float32))
                   for m, c in zip(_MODULES, centers[family])}
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": _R, "lora_alpha": _ALPHA,
                  "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "bias": "none",
                  "base_model_name_or_path": "metalora-demo/tiny-random-llama",
                  "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
                  "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}
        Adapter(modules, {m: _ALPHA / _R for m in _MODULES}, config).save(root / "adapters" / name)
        lines.append({"id": name, "adapter": f"adapters/{name}", "dataset": f"data/{name}.jsonl",
                      "family": family})
    _write_jsonl(root / "bank.jsonl", lines)
    name, _, gen = EXAMPLE_TASK
    _write_jsonl(root / f"example_{name}.jsonl", _examples(name, gen))
    (root / "DEMONSTRATION_BANK").write_text(DEMO_NOTICE + "\n", encoding="utf-8")


def demo_bank() -> Path:
    """Path of the demonstration bank, built into the cache on first use (about a second)."""
    root = _cache_root() / f"demo-bank-v{DEMO_VERSION}"
    if (root / "bank.jsonl").is_file() and (root / "DEMONSTRATION_BANK").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-bank-", dir=root.parent))
    try:
        _build(tmp)
        try:
            os.rename(tmp, root)
        except OSError:  # another process built it first
            if not (root / "bank.jsonl").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def example_dataset() -> Path:
    """The held-out example task (``lowercase``) of the demonstration bank, as JSONL."""
    return demo_bank() / f"example_{EXAMPLE_TASK[0]}.jsonl"
