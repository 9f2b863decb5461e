"""Speed on a busy machine (issue 17): the time on 2 threads over the time on 1 thread while
another process keeps one core busy. It should stay <= 1: a second thread may not help when its
core is taken, but it must not make the call slower.

The competitor is a child process spinning on the last CPU (pinned there with
sched_setaffinity); this process is not pinned, as a user's would not be. Each case alternates
1-thread and 2-thread calls (so both see the same background) and reports the ratio of the
medians. Cases: the `linear` combine kernel alone (`_core.combine_op`, specs built once) and
`combine_modules(mode="linear")` on 48 Mistral-7B-shaped modules (16 layers x q,k,v, r = 16,
4 bf16 adapters), the Sinkhorn divergence (256 x 256 points, 384-d, eps = 0.05), the cost matrix
(1000 x 1000 x 384, float32) and MMD (RBF, 500 x 500 x 384).

Run: `PYTHONPATH=python pytest bench/test_bench_busy.py -s` (or `python bench/test_bench_busy.py
[--rounds N] [--no-busy]`). Set METALORA_NO_BUSY_CHECK=1 to measure the pool without its cap on
busy cores (dynamic tasks and passive helpers only). Against another build, put its package
first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from contextlib import contextmanager

import metalora
import ml_dtypes
import numpy as np
from metalora import _core

ROUNDS = int(os.environ.get("BUSY_ROUNDS", "41"))


def _spin(cpu: int) -> None:  # pragma: no cover - child process
    try:
        os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError):
        pass
    x = 0
    while True:
        x += 1


@contextmanager
def busy_core():
    """A child process spinning on the last CPU for the duration of the block."""
    cpu = max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_spin, args=(cpu,), daemon=True)
    p.start()
    time.sleep(0.3)  # let it start spinning (and the pool's reading see it)
    try:
        yield cpu
    finally:
        p.kill()
        p.join()


def ratio(fn, rounds: int = ROUNDS) -> dict:
    """Median seconds of fn(1) and fn(2), interleaved, and their ratio."""
    fn(1)
    fn(2)
    t1, t2 = [], []
    for k in range(rounds):  # the order alternates too: no bias for whichever runs second
        for threads, acc in ((1, t1), (2, t2)) if k % 2 == 0 else ((2, t2), (1, t1)):
            t = time.perf_counter()
            fn(threads)
            acc.append(time.perf_counter() - t)
    m1, m2 = statistics.median(t1), statistics.median(t2)
    return {"t1_ms": 1e3 * m1, "t2_ms": 1e3 * m2, "ratio_2t_1t": m2 / m1}


# ------------------------------------------------------------------ the cases


def mistral_modules(layers: int = 16, K: int = 4, r: int = 16, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    mods = {}
    for i in range(layers):
        for p, out in (("q", 4096), ("k", 1024), ("v", 1024)):
            A = [(rng.standard_normal((r, 4096), np.float32) * 0.02).astype(ml_dtypes.bfloat16)
                 for _ in range(K)]
            B = [(rng.standard_normal((out, r), np.float32) * 0.02).astype(ml_dtypes.bfloat16)
                 for _ in range(K)]
            mods[f"layers.{i}.self_attn.{p}_proj"] = (A, B)
    return mods


def cases() -> dict:
    mods = mistral_modules()
    K = 4
    w = np.array([0.4, 0.3, 0.2, 0.1])
    specs = []
    for A, B in mods.values():
        specs.append({"A": [a.view(np.uint16) for a in A], "B": [b.view(np.uint16) for b in B],
                      "in": A[0].shape[1], "out": B[0].shape[0], "cb": list(w), "wa": list(w),
                      "A_out": np.empty(A[0].shape, np.float32),
                      "B_out": np.empty(B[0].shape, np.float32)})
    rng = np.random.default_rng(1)
    Xs = rng.standard_normal((256, 384)).astype(np.float32) / 20
    Ys = rng.standard_normal((256, 384)).astype(np.float32) / 20 + 0.01
    Xc = rng.standard_normal((1000, 384)).astype(np.float32)
    out = np.empty((1000, 1000), np.float32)
    Xm = rng.standard_normal((500, 384)).astype(np.float32)
    Ym = rng.standard_normal((500, 384)).astype(np.float32) + 0.1
    del K
    return {
        "linear kernel (48 modules, 4 bf16 adapters)": lambda t: _core.combine_op("linear", specs, t),
        "combine_modules linear": lambda t: metalora.combine_modules(mods, w, mode="linear",
                                                                     threads=t),
        "sinkhorn 256x256x384": lambda t: metalora.sinkhorn_divergence(Xs, Ys, eps=0.05,
                                                                        threads=t),
        "cost 1000x1000x384": lambda t: metalora.cost_matrix(Xc, Xc, out=out, threads=t),
        "mmd 500x500x384": lambda t: metalora.mmd(Xm, Ym, threads=t),
    }


def measure(busy: bool = True, rounds: int = ROUNDS) -> list:
    rows = []
    fns = cases()
    label = ("pool, cap off" if os.environ.get("METALORA_NO_BUSY_CHECK") == "1" else "pool")
    if not hasattr(_core, "pool_stats"):
        label = "OpenMP (before)"
    with busy_core() if busy else _nullctx():
        for name, fn in fns.items():
            row = {"case": name, "build": label, "busy": busy, **ratio(fn, rounds)}
            if hasattr(_core, "pool_stats"):
                row["cap_seen"] = _core.pool_stats()["cap"]
            rows.append(row)
    return rows


@contextmanager
def _nullctx():
    yield None


def table(rows: list) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k])
                                       for k in keys) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ pytest entry


def test_busy_ratio_2_threads_over_1():
    import pytest

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs")
    from conftest import report

    for row in measure(busy=True):
        report("busy core: 2-thread / 1-thread time", row["case"], row["t2_ms"] / 1e3,
               t1_ms=row["t1_ms"], t2_ms=row["t2_ms"], ratio=row["ratio_2t_1t"],
               build=row["build"])
        print(f"{row['case']}: {row['t1_ms']:.2f} ms on 1 thread, {row['t2_ms']:.2f} ms on 2, "
              f"ratio {row['ratio_2t_1t']:.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--no-busy", action="store_true", help="no competing process")
    args = ap.parse_args()
    with open("/proc/loadavg", encoding="ascii") as f:
        load = f.read().strip()
    print(f"load {load}  ({time.strftime('%H:%M UTC', time.gmtime())})", file=sys.stderr)
    print(table(measure(busy=not args.no_busy, rounds=args.rounds)))
