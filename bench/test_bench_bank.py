"""Bank benchmarks: combining a Mistral-7B-shaped bank from disk vs just reading its bytes.

Run (the bank, 100 adapters / 1.89 GB bf16, is generated once into bench/.cache/)::

    PYTHONPATH=python nice pytest bench/test_bench_bank.py --benchmark-columns=min,median,max

Set METALORA_BENCH_BANK to use another directory. Runs are warm-cache (the first round reads
the files into the page cache); `python bench/bank_synth.py measure` also times cold-cache runs
and peak RSS per operation in fresh processes (the table in bench/results_bank.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")
import metalora  # noqa: E402

import bank_synth  # noqa: E402

ROUNDS = dict(rounds=3, iterations=1, warmup_rounds=1)


@pytest.fixture(scope="module")
def bank_dir():
    root = Path(os.environ.get("METALORA_BENCH_BANK", bank_synth.DEFAULT_DIR))
    return bank_synth.generate(root, n=100)


@pytest.fixture(scope="module")
def bank(bank_dir):
    return metalora.Bank(bank_dir)


def _gbs(benchmark, nbytes):
    benchmark.extra_info["bytes"] = nbytes
    benchmark.extra_info["GB/s (min)"] = nbytes / benchmark.stats.stats.min / 1e9


def test_read_bank_bytes_safetensors_numpy(benchmark, bank_dir):
    """The peer: every tensor of every file into numpy arrays through safetensors."""
    n = benchmark.pedantic(bank_synth.read_with_safetensors, args=(bank_dir,), **ROUNDS)
    _gbs(benchmark, n)


def test_open_bank(benchmark, bank_dir):
    """Parse and cross-validate 100 configs and safetensors headers (no tensor data)."""
    b = benchmark.pedantic(metalora.Bank, args=(bank_dir,), **ROUNDS)
    assert len(b) == 100


def test_linear_dense(benchmark, bank):
    w = bank_synth.dense_weights(len(bank))
    out = benchmark.pedantic(metalora.combine_adapters, args=(bank, w),
                             kwargs=dict(mode="linear"), **ROUNDS)
    assert out.config["r"] == 16
    _gbs(benchmark, bank.nbytes())


def test_svd_top8_rank16(benchmark, bank):
    w = bank_synth.dense_weights(len(bank))
    out = benchmark.pedantic(metalora.combine_adapters, args=(bank, w),
                             kwargs=dict(mode="svd", rank=16, top_k=8), **ROUNDS)
    assert out.config["r"] == 16 and len(out.provenance["adapters"]) == 8
    _gbs(benchmark, bank.nbytes([a["id"] for a in out.provenance["adapters"]]))


@pytest.mark.parametrize("op", ["linear", "svd8"])
def test_peak_rss_fresh_process(bank_dir, op):
    """Peak RSS of open + combine in a fresh process (ru_maxrss, warm cache)."""
    res = bank_synth.in_child(op, bank_dir, cold=False)
    print(f"{op}: {res}")
    if op == "svd8":
        assert res["peak_rss_mb"] < 1024
