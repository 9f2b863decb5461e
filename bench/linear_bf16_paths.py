"""The `linear` combination's bf16 read against numpy's fp32 `w @ theta`, in GB/s, beside a
read roof measured in the same run (issue 17, "the remaining kernel target").

The bank: 48 Mistral-7B-shaped adapters (32 layers x q,k,v, r = 16), bf16, 0.906 GB; numpy
reads the same bank upcast to fp32 (1.81 GB). Half the bytes would make the ideal ratio of
times 0.5x; the target was <= 0.6x. Rows, each on 1 and 2 threads (the pool's busy cap is
turned off here: this measures the kernel's scaling, not the machine's load):

  * read roof: numpy float32 sum over the fp32 bank (split across Python threads for 2; numpy
    releases the GIL in the reduction) - a pure streaming read, no writes;
  * numpy fp32 `w @ theta` (OpenBLAS sgemv; its threads set with threadpoolctl);
  * metalora's linear kernel alone on the bf16 bank (`_core.combine_op`, specs built once), and
    on the fp32 bank (same kernel, no widening: what the bf16 -> fp32 widening costs);
  * `combine_modules(mode="linear")` on the bf16 bank (the public call, checks included).

Run: `PYTHONPATH=python python bench/linear_bf16_paths.py [--rounds 7]` (needs ~3 GB of RAM).
Prints a markdown table; bench/README.md quotes it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import metalora
import ml_dtypes
import numpy as np
from metalora import _core

K, R = 48, 16
MISTRAL = [(4096 if p == "q" else 1024, 4096) for _ in range(32) for p in ("q", "k", "v")]


def bank(dtype):
    sizes = [(R * n_in, n_out * R) for n_out, n_in in MISTRAL]
    P = sum(a + b for a, b in sizes)
    rng = np.random.default_rng(0)
    theta = np.empty((K, P), dtype=ml_dtypes.bfloat16)
    for k in range(K):
        theta[k] = (rng.standard_normal(P, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    return theta, sizes


def modules_of(theta, sizes):
    mods, off = {}, 0
    for i, ((n_out, n_in), (na, nb)) in enumerate(zip(MISTRAL, sizes)):
        A = [theta[k, off:off + na].reshape(R, n_in) for k in range(K)]
        B = [theta[k, off + na:off + na + nb].reshape(n_out, R) for k in range(K)]
        mods[f"m{i}"] = (A, B)
        off += na + nb
    return mods


def specs_of(mods, w):
    out = []
    for A, B in mods.values():
        view = (lambda x: x.view(np.uint16)) if A[0].dtype == ml_dtypes.bfloat16 else (lambda x: x)
        out.append({"A": [view(a) for a in A], "B": [view(b) for b in B], "in": A[0].shape[1],
                    "out": B[0].shape[0], "cb": list(w), "wa": list(w),
                    "A_out": np.empty(A[0].shape, np.float32),
                    "B_out": np.empty(B[0].shape, np.float32)})
    return out


def best_and_median(fn, rounds):
    fn()
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts), statistics.median(ts)


def threaded_sum(x, threads):
    parts = np.array_split(x.reshape(-1), threads)
    if threads == 1:
        return lambda: parts[0].sum()

    def run():
        ts = [threading.Thread(target=p.sum) for p in parts]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    os.environ.setdefault("METALORA_NO_BUSY_CHECK", "1")  # read by the pool at every call
    from threadpoolctl import threadpool_limits

    with open("/proc/loadavg", encoding="ascii") as f:
        load = f.read().strip()
    print(f"start {time.strftime('%H:%M UTC', time.gmtime())}, load {load}, "
          f"isa {metalora.capabilities()['active']}", file=sys.stderr)
    theta, sizes = bank(ml_dtypes.bfloat16)
    theta32 = theta.astype(np.float32)
    w = np.random.default_rng(1).uniform(0.0, 1.0, K)
    w /= w.sum()
    w32 = w.astype(np.float32)
    mods16 = modules_of(theta, sizes)
    mods32 = modules_of(theta32, sizes)
    specs16, specs32 = specs_of(mods16, w), specs_of(mods32, w)
    rows = []
    for threads in (1, 2):
        def add(name, fn, nbytes, threads=threads):
            best, med = best_and_median(fn, args.rounds)
            rows.append({"threads": threads, "path": name, "best_ms": 1e3 * best,
                         "median_ms": 1e3 * med, "GBps_best": nbytes / best / 1e9,
                         "GBps_median": nbytes / med / 1e9})

        add("read roof: numpy fp32 sum", threaded_sum(theta32, threads), theta32.nbytes)
        with threadpool_limits(limits=threads):
            add("numpy fp32 w @ theta", lambda: w32 @ theta32, theta32.nbytes)
        add("metalora kernel, bf16 bank", lambda t=threads: _core.combine_op("linear", specs16, t),
            theta.nbytes)
        add("metalora kernel, fp32 bank", lambda t=threads: _core.combine_op("linear", specs32, t),
            theta32.nbytes)
        add("metalora combine_modules, bf16",
            lambda t=threads: metalora.combine_modules(mods16, w, mode="linear", threads=t),
            theta.nbytes)
    # time ratios against numpy fp32 at the same thread count
    ref = {r["threads"]: r["median_ms"] for r in rows if r["path"] == "numpy fp32 w @ theta"}
    for r in rows:
        r["x_numpy_time"] = r["median_ms"] / ref[r["threads"]]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k])
                                for k in keys) + " |")
    scale = {p: next(r["median_ms"] for r in rows if r["path"] == p and r["threads"] == 1)
             / next(r["median_ms"] for r in rows if r["path"] == p and r["threads"] == 2)
             for p in dict.fromkeys(r["path"] for r in rows)}
    print("\n2-thread speed-up (median): " + ", ".join(f"{p}: {s:.2f}x" for p, s in scale.items()))
    with open("/proc/loadavg", encoding="ascii") as f:
        print(f"end {time.strftime('%H:%M UTC', time.gmtime())}, load {f.read().strip()}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
