"""The PEFT format: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.

Read by PEFT / transformers (``PeftModel.from_pretrained``) and vLLM. The safetensors metadata is
``{"format": "pt"}`` plus the metalora provenance as JSON; a readable copy of the provenance goes
to ``metalora.json``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Mapping, Optional, Sequence

from .._io import atomic_write, atomic_write_json, json_default
from . import Writer, register

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter

__all__ = ["write_peft", "combined_config"]


def write_peft(adapter: "Adapter", directory: Path) -> None:
    """Write the PEFT files of ``adapter`` into ``directory``."""
    from ..adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, PROVENANCE_FILE, write_safetensors

    meta = {"format": "pt"}
    if adapter.provenance is not None:
        meta["metalora"] = json.dumps(adapter.provenance, sort_keys=True, default=json_default)
    tensors = {}
    for m in adapter.names:
        a, b = adapter.factors(m)
        tensors[f"{PREFIX}{m}.lora_A.weight"] = a
        tensors[f"{PREFIX}{m}.lora_B.weight"] = b
    atomic_write(directory / ADAPTER_WEIGHTS, lambda f: write_safetensors(f, tensors, meta))
    atomic_write_json(directory / ADAPTER_CONFIG, adapter.config)
    if adapter.provenance is not None:
        atomic_write_json(directory / PROVENANCE_FILE, adapter.provenance)


def combined_config(sources: Sequence["Adapter"], modules: Sequence[str], ranks: Mapping[str, int],
                    *, task_type: Optional[str], base_model: Optional[str], fan_in_fan_out: bool,
                    full_set: bool) -> dict:
    """The PEFT config of an adapter combined from ``sources`` with per-module ``ranks``.

    Scalings are folded into the factors, so every module gets ``lora_alpha = r`` (scaling 1);
    modules whose rank differs from the most common one go to ``rank_pattern`` / ``alpha_pattern``.
    ``target_modules`` is the sources' own value when they all share it and every module was kept
    (``full_set``), else the exact list of kept modules.
    """
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern: Dict[str, int] = {re.escape(m): k for m, k in ranks.items() if k != r}
    tm_vals = [a.config.get("target_modules") for a in sources]
    layered = any(a.config.get("layers_to_transform") is not None for a in sources)
    if full_set and not layered and all(json.dumps(t) == json.dumps(tm_vals[0]) for t in tm_vals) \
            and tm_vals[0] is not None:
        target = tm_vals[0]
    else:  # name the kept modules exactly (PEFT matches a list entry as a module-path suffix)
        target = list(modules)
    cfg = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": int(r),
        "lora_alpha": int(r),
        "target_modules": target,
        "fan_in_fan_out": bool(fan_in_fan_out),
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),  # lora_alpha = r per module: scaling 1
        "init_lora_weights": True,
        "inference_mode": True,
    }
    rev = {a.config.get("revision") for a in sources}
    if len(rev) == 1 and None not in rev:
        cfg["revision"] = rev.pop()
    return cfg


register(Writer("peft", "PEFT directory: transformers + PEFT, vLLM", write_peft,
                own_files=frozenset({"adapter_config.json", "adapter_model.safetensors",
                                     "metalora.json", "README.md"})))
