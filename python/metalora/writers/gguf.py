r"""The GGUF LoRA format: one ``.gguf`` file, read by llama.cpp and the tools built on it.

llama.cpp (``llama_adapter_lora_init``) reads an adapter file with ``general.type = "adapter"``,
``adapter.type = "lora"``, ``general.architecture`` equal to the base model's, and
``adapter.lora.alpha`` (float32). Each adapted weight ``<t>`` of the base (``blk.0.attn_q.weight``)
has two tensors, ``<t>.lora_a`` with ggml shape ``[in, r]`` and ``<t>.lora_b`` with ``[r, out]`` —
numpy ``A (r, in)`` and ``B (out, r)``, as in PEFT — and the run-time update is

.. math:: y = W x + s_\text{user} \frac{\alpha}{r_t} B_t (A_t x), \qquad r_t = \text{rows of } A_t.

Names come from the ``gguf`` package's tensor-name map for the base's architecture. The base is
given as a GGUF model file (architecture, block count, head counts and every tensor's shape are
read with ``GGUFReader``, so each module is checked against the tensor it adapts) or as a
transformers ``config.json`` (or the folder holding it; names and head counts only).

**q/k rows of Llama-family models.** llama.cpp's converter stores the rows of ``attn_q`` and
``attn_k`` of the ``llama`` architecture in a different order than transformers: within each head
of ``d`` rows, transformers keeps the two halves that RoPE rotates together apart (row ``j`` pairs
with row ``j + d/2``), GGUF interleaves them (rows ``2j`` and ``2j + 1``). So the GGUF row
``h d + 2j + t`` (``t`` in {0, 1}) is the transformers row ``h d + t d/2 + j``, with ``n_head``
heads for q and ``n_head_kv`` for k. A LoRA's ``B`` holds the output rows and gets the same
reordering; ``A`` (input columns) does not change. Written without it, a q/k adapter loads
without complaint and computes something else.

**Scalings.** The file has one ``alpha`` and llama.cpp takes ``r`` from each tensor, so per-module
ranks are expressed as they are, and a module whose PEFT scaling ``s_m`` differs from
``alpha / r_m`` (``alpha_pattern``, rsLoRA) gets ``s_m r_m / alpha`` folded into its ``B``: the
update ``llama.cpp`` applies at user scale 1 is exactly the PEFT update ``s_m B_m A_m``.

Refused, naming the module and the fix: modules the base has no tensor for (or whose shape
differs from it), ``fan_in_fan_out`` adapters, architectures whose converter row order metalora
does not know, and values that overflow the requested output type.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Tuple, Union

import numpy as np

from .._io import json_default
from . import Writer, register

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter

__all__ = ["GGUFBase", "read_base", "write_gguf", "qk_row_order", "to_gguf_rows", "OUT_TYPES",
           "PERMUTED_QK", "KEPT_QK", "HF_MODEL_TYPES", "GGUF_MAGIC"]

GGUF_MAGIC = b"GGUF"
#: ``out_type`` values: the ggml type of the written factors.
OUT_TYPES = ("f32", "f16", "bf16")
#: Architectures whose q/k rows llama.cpp's converter reorders (``LlamaModel.permute``).
PERMUTED_QK = frozenset({"llama"})
#: Architectures whose converter keeps transformers' q/k row order.
KEPT_QK = frozenset({"qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"})
#: transformers ``model_type`` -> GGUF architecture (for a ``config.json`` base).
HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                  "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}


class GGUFError(ValueError):
    """The base model or the adapter cannot be written as a GGUF adapter (message says why)."""


@dataclass(frozen=True)
class GGUFBase:
    """What the writer needs from the base model.

    ``tensors`` maps each 2-D tensor name to its ggml shape ``(in, out)`` (``None`` for a
    ``config.json`` base, whose tensors are not known).
    """

    architecture: str
    block_count: int
    n_head: int
    n_head_kv: int
    source: str
    tensors: Optional[Dict[str, Tuple[int, int]]] = field(default=None, repr=False)


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def read_base(base: Union[str, Path, GGUFBase]) -> GGUFBase:
    """Read ``base``: a GGUF model file, a transformers ``config.json``, or the folder holding
    one (a :class:`GGUFBase` passes through)."""
    if isinstance(base, GGUFBase):
        return base
    if not isinstance(base, (str, Path)):
        raise TypeError(f"base must be a path or a GGUFBase, got {type(base).__name__}")
    path = Path(base)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GGUFError(f"{path}: a base model folder needs config.json (or give the .gguf "
                            f"model file)")
        path = path / "config.json"
    if not path.is_file():
        raise GGUFError(f"{path}: no such base model file (give a .gguf model file or a "
                        f"transformers config.json)")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == GGUF_MAGIC:
        return _read_gguf_base(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise GGUFError(f"{path}: neither a GGUF file nor a JSON config.json") from None
    return _read_config_base(cfg, path)


def _read_gguf_base(path: Path) -> GGUFBase:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError and others on corrupt input
        raise GGUFError(f"{path}: cannot read this GGUF file ({exc})") from None
    arch = _field(reader, "general.architecture")
    kind = _field(reader, "general.type")
    if kind not in (None, "model"):
        raise GGUFError(f"{path}: general.type is {kind!r}; the base must be a model file, not "
                        f"an adapter")
    if not isinstance(arch, str):
        raise GGUFError(f"{path}: no general.architecture key; not a llama.cpp model file")
    counts = {}
    for key in ("block_count", "attention.head_count", "attention.head_count_kv"):
        v = _field(reader, f"{arch}.{key}")
        if isinstance(v, list):  # per-layer head counts (some architectures): all equal or refuse
            if len(set(v)) != 1:
                raise GGUFError(f"{path}: {arch}.{key} differs between layers ({v[:4]}...); "
                                f"not supported")
            v = v[0]
        counts[key] = v
    if counts["block_count"] is None:
        raise GGUFError(f"{path}: no {arch}.block_count key; not a llama.cpp model file")
    n_head = counts["attention.head_count"]
    n_kv = counts["attention.head_count_kv"] or n_head
    tensors = {t.name: (int(t.shape[0]), int(t.shape[1])) for t in reader.tensors
               if len(t.shape) == 2}
    return GGUFBase(arch, int(counts["block_count"]), int(n_head or 0), int(n_kv or 0), str(path),
                    tensors)


def _read_config_base(cfg: object, path: Path) -> GGUFBase:
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise GGUFError(f"{path}: not a transformers config.json (no model_type)")
    text = cfg.get("text_config")
    if isinstance(text, dict) and "num_hidden_layers" not in cfg:
        cfg = {**text, "model_type": text.get("model_type", cfg["model_type"])}
    mt = cfg["model_type"]
    arch = HF_MODEL_TYPES.get(mt)
    if arch is None:
        raise GGUFError(f"{path}: model_type {mt!r} is not one metalora can name GGUF tensors "
                        f"for from a config.json ({sorted(HF_MODEL_TYPES)}); give the base "
                        f"model's .gguf file as the base instead")
    try:
        n_layers = int(cfg["num_hidden_layers"])
        n_head = int(cfg["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        raise GGUFError(f"{path}: needs num_hidden_layers and num_attention_heads") from None
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    return GGUFBase(arch, n_layers, n_head, n_kv, str(path), None)


def qk_row_order(n_rows: int, n_head: int) -> np.ndarray:
    """Index array ``p`` with ``gguf_rows = hf_rows[p]`` for a q or k projection of ``n_head``
    heads (see the module docstring)."""
    if n_head <= 0 or n_rows % (2 * n_head):
        raise GGUFError(f"{n_rows} rows cannot be split into {n_head} heads of an even size")
    d = n_rows // n_head
    # rows of the GGUF layout, as (head, pair j, member t) -> transformers row h*d + t*d/2 + j
    h, j, t = np.meshgrid(np.arange(n_head), np.arange(d // 2), np.arange(2), indexing="ij")
    return (h * d + t * (d // 2) + j).reshape(-1)


def to_gguf_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """``B`` (out, r) of a q/k projection with its rows in llama.cpp's order."""
    return b[qk_row_order(b.shape[0], n_head)]


def _tensor_map(arch: str, n_blocks: int):
    import gguf

    archs = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in archs:
        raise GGUFError(f"architecture {arch!r} is unknown to the installed gguf package "
                        f"({gguf.__name__}); upgrade gguf")
    return gguf.get_tensor_name_map(archs[arch], n_blocks)


def _plan(adapter: "Adapter", base: GGUFBase):
    """``[(module, gguf tensor name, heads for the q/k reordering or 0)]``; refuses what the
    file cannot express."""
    import gguf

    if adapter.config.get("fan_in_fan_out"):
        raise GGUFError("the adapter has fan_in_fan_out = true (GPT-2 style Conv1D weights); "
                        "the GGUF writer supports nn.Linear adapters only")
    arch = base.architecture
    if arch not in PERMUTED_QK | KEPT_QK:
        raise GGUFError(f"base architecture {arch!r}: metalora does not know whether llama.cpp's "
                        f"converter reorders its q/k rows, so it cannot write a correct adapter "
                        f"(supported: {sorted(PERMUTED_QK | KEPT_QK)})")
    tmap = _tensor_map(arch, base.block_count)
    plan = []
    for m in adapter.names:
        hit = tmap.get_type_and_name(m + ".weight", try_suffixes=(".weight",))
        if hit is None:
            raise GGUFError(f"module {m!r}: llama.cpp's {arch!r} model has no tensor for it "
                            f"(or it lies beyond the base's {base.block_count} blocks); "
                            f"leave it out of the adapter or use the PEFT format")
        kind, name = hit
        (r, n_in), (n_out, _) = adapter.shapes(m)
        if base.tensors is not None:
            shape = base.tensors.get(name)
            if shape is None:
                raise GGUFError(f"module {m!r}: the base model {base.source} has no tensor "
                                f"{name!r}; the adapter is for another model")
            if shape != (n_in, n_out):
                raise GGUFError(f"module {m!r}: the adapter maps {n_in} -> {n_out} but the base's "
                                f"{name} maps {shape[0]} -> {shape[1]}; the adapter is for "
                                f"another model")
        heads = 0
        if arch in PERMUTED_QK and kind == gguf.MODEL_TENSOR.ATTN_Q:
            heads = base.n_head
        elif arch in PERMUTED_QK and kind == gguf.MODEL_TENSOR.ATTN_K:
            heads = base.n_head_kv
        if kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K) and arch in PERMUTED_QK \
                and heads <= 0:
            raise GGUFError(f"module {m!r}: the base {base.source} gives no attention head "
                            f"count, which the q/k row order needs")
        if heads and n_out % (2 * heads):
            raise GGUFError(f"module {m!r}: {n_out} output rows do not split into {heads} heads "
                            f"of an even size; the base config's head counts do not fit it")
        plan.append((m, name, heads))
    return plan


def _alpha(adapter: "Adapter") -> float:
    """One alpha for the file: the most common module's ``s_m r_m`` (those modules are written
    unchanged; the others get their ratio folded into B)."""
    prods = Counter(float(np.float32(adapter.scalings[m] * adapter.ranks[m])) for m in adapter.names)
    alpha = prods.most_common(1)[0][0]
    if alpha == 0.0 or not np.isfinite(alpha):  # alpha 0 means "no alpha" to llama.cpp
        alpha = float(Counter(adapter.ranks.values()).most_common(1)[0][0])
    return alpha


def prepare(options: dict) -> dict:
    """Check the options (before any slow work) and read the base once."""
    base = options.get("base")
    if base is None:
        raise GGUFError("the GGUF format needs the base model: base= a .gguf model file or a "
                        "transformers config.json (CLI: --base BASE)")
    out_type = options.get("out_type", "f32")
    if out_type not in OUT_TYPES:
        raise GGUFError(f"out_type={out_type!r} is not one of {OUT_TYPES} (CLI: --out-type)")
    return {**options, "base": read_base(base), "out_type": out_type}


def write_gguf(adapter: "Adapter", path: Path, *, base: Union[str, Path, GGUFBase],
               out_type: str = "f32") -> None:
    """Write ``adapter`` as a llama.cpp LoRA file at ``path`` (a plain write: use
    :meth:`metalora.Adapter.save` for the atomic one)."""
    import gguf

    opts = prepare({"base": base, "out_type": out_type})
    base = opts["base"]
    plan = _plan(adapter, base)
    alpha = _alpha(adapter)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16}[out_type]
    tensors = []
    for m, name, heads in plan:
        a, b = adapter.factors(m)
        a = np.asarray(a, dtype=np.float32)
        b = np.asarray(b, dtype=np.float32)
        fold = adapter.scalings[m] * adapter.ranks[m] / alpha
        if float(np.float32(fold)) != 1.0:
            b = (b.astype(np.float64) * fold).astype(np.float32)
        if heads:
            b = to_gguf_rows(b, heads)
        for suffix, x in ((".lora_a", a), (".lora_b", b)):
            x = np.ascontiguousarray(x)
            if out_type == "f16":
                with np.errstate(over="ignore"):  # overflow is refused just below
                    y = x.astype(np.float16)
                if not np.isfinite(y).all():
                    raise GGUFError(f"module {m!r}: {suffix[1:]} overflows float16 (|x| up to "
                                    f"{float(np.abs(x).max()):.3g}); use out_type f32 or bf16 "
                                    f"(CLI: --out-type)")
                tensors.append((name + suffix, y, None))
            elif out_type == "bf16":
                tensors.append((name + suffix, gguf.quants.quantize(x, qtype), qtype))
            else:
                tensors.append((name + suffix, x, None))
    w = gguf.GGUFWriter(path, base.architecture)
    try:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        if adapter.base_model:
            w.add_string("metalora.base_model", str(adapter.base_model))
        if adapter.provenance is not None:
            w.add_string("metalora.provenance", json.dumps(adapter.provenance, sort_keys=True,
                                                           default=json_default))
        for name, x, raw in tensors:
            w.add_tensor(name, x, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


register(Writer("gguf", "one GGUF LoRA file for llama.cpp and the tools built on it (needs "
                "the base model)", write_gguf, own_files=frozenset(),
                options=frozenset({"base", "out_type"}), single_file=True, magic=GGUF_MAGIC,
                prepare=prepare))
