"""The built-in default bank: 48 task LoRAs for SmolLM2-135M-Instruct, with their training sets.

Built by ``bench/quality`` (``train_bank.py``: one PEFT LoRA, r = 8 on ``q_proj``/``v_proj``, per
BIG-bench 1.0.0 task) and shipped in the wheel under ``metalora/banks/smollm2-135m``; a source
checkout uses ``bench/quality`` directly. The example dataset is a task that has no adapter in the
bank (MC-TACO answers about absolute time points), so ``metalora generate --example`` shows the
whole job on real data: the adapter it writes loads into PEFT over
``HuggingFaceTB/SmolLM2-135M-Instruct``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

__all__ = ["default_bank", "example_dataset", "EXAMPLE_TASK", "EXAMPLE_N"]

NAME = "smollm2-135m"
#: Task id of the example dataset (kept out of the bank).
EXAMPLE_TASK = "x_ni013_mctaco_answer_timepoint"
#: Examples per dataset used for ``--example`` signatures: 64 keeps the first run (which embeds
#: every bank dataset once; later runs read the signature cache) to about 20 s on 2 cores.
EXAMPLE_N = 64

_PACKAGED = Path(__file__).resolve().parent / "banks" / NAME
_SOURCE = Path(__file__).resolve().parents[2] / "bench" / "quality"


def _root() -> Optional[Path]:
    # installed means both the bank and the example task are there: they ship together, and
    # `generate --example` needs the pair
    for root in (_PACKAGED, _SOURCE):
        if (root / "bank" / "bank.jsonl").is_file() and _example(root).is_file():
            return root
    return None


def _example(root: Path) -> Path:
    return root / "tasks" / EXAMPLE_TASK / "train.jsonl"


def default_bank() -> Optional[Path]:
    """Directory of the default bank (``bank.jsonl`` + adapters), or None if not installed."""
    root = _root()
    return None if root is None else root / "bank"


def example_dataset() -> Optional[Path]:
    """Training split (JSONL) of the example task, which is not in the default bank."""
    root = _root()
    return None if root is None else _example(root)
