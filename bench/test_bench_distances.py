"""Distance kernels beside their peers (POT, SciPy, numpy's sgemm), same inputs, same run.

Run:  PYTHONPATH=python nice pytest bench/test_bench_distances.py --benchmark-only -s
The summary table (GFLOP/s, ratios, accuracy) is printed at the end and saved as JSON in
bench/.cache/distances.json. POT's log-domain solver at eps = 0.01 takes about a minute: set
METALORA_BENCH_SLOW=1 to include it.
"""

import json
import os
import pathlib
import time

import numpy as np
import pytest

import metalora

ot = pytest.importorskip("ot")
spatial = pytest.importorskip("scipy.spatial.distance")

N, D = 1000, 384
FLOP_COST = 2.0 * N * N * D
SLOW = os.environ.get("METALORA_BENCH_SLOW") == "1"
RESULTS: dict = {}


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def clouds():
    rng = np.random.default_rng(0)
    X = _unit(rng.standard_normal((N, D)))
    Y = _unit(rng.standard_normal((N, D)) + 0.3)
    return X, Y


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if not RESULTS:
        return
    width = max(len(k) for k in RESULTS)
    print("\n\ndistance benchmarks (best of the rounds)")
    for k, v in RESULTS.items():
        extra = ", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}"
                          for a, b in v.items() if a != "seconds")
        print(f"  {k:<{width}}  {v['seconds'] * 1e3:10.2f} ms  {extra}")
    out = pathlib.Path(__file__).parent / ".cache"
    out.mkdir(exist_ok=True)
    (out / "distances.json").write_text(json.dumps(RESULTS, indent=1, default=float))


@pytest.fixture(autouse=True)
def settle():
    """Let idle worker threads park before each benchmark. OpenBLAS's threads keep spinning for
    a while after numpy's last call (and libgomp's after metalora's); on 2 cores a kernel
    started right after the other library's call competes with them and loses 2-3x."""
    time.sleep(1.0)


def _record(name, benchmark, **extra):
    best = benchmark.stats.stats.min
    RESULTS[name] = {"seconds": best, **extra}
    benchmark.extra_info.update(extra)
    return best


# ---------------------------------------------------------------------------------------------
# Cost matrix: 1000 x 1000 x 384, float32


def test_cost_numpy_sgemm(benchmark, clouds):
    X, Y = clouds
    benchmark.pedantic(lambda: X @ Y.T, rounds=30, warmup_rounds=3)
    t = _record("cost/numpy sgemm X@Y.T (roof)", benchmark)
    RESULTS["cost/numpy sgemm X@Y.T (roof)"]["GFLOP/s"] = FLOP_COST / t / 1e9


def test_cost_numpy_sgemm_one_thread(benchmark, clouds):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    X, Y = clouds
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        benchmark.pedantic(lambda: X @ Y.T, rounds=30, warmup_rounds=3)
    t = _record("cost/numpy sgemm X@Y.T, 1 thread", benchmark)
    RESULTS["cost/numpy sgemm X@Y.T, 1 thread"]["GFLOP/s"] = FLOP_COST / t / 1e9


@pytest.mark.parametrize("threads", [0, 1])
def test_cost_metalora(benchmark, clouds, threads):
    X, Y = clouds
    out = np.empty((N, N), np.float32)
    benchmark.pedantic(lambda: metalora.cost_matrix(X, Y, out=out, threads=threads), rounds=30,
                       warmup_rounds=3)
    t = benchmark.stats.stats.min
    extra = {"GFLOP/s": FLOP_COST / t / 1e9}
    roof = RESULTS.get("cost/numpy sgemm X@Y.T (roof)" if threads == 0 else
                       "cost/numpy sgemm X@Y.T, 1 thread")
    if roof:
        extra["vs sgemm"] = roof["seconds"] / t
    _record(f"cost/metalora threads={threads or 'all'}", benchmark, **extra)


def test_cost_pot_dist(benchmark, clouds):
    X, Y = clouds
    benchmark.pedantic(lambda: ot.dist(X, Y), rounds=20, warmup_rounds=2)
    _record("cost/POT ot.dist", benchmark, **{"GFLOP/s": FLOP_COST / benchmark.stats.stats.min / 1e9})


def test_cost_scipy_cdist(benchmark, clouds):
    X, Y = clouds
    benchmark.pedantic(lambda: spatial.cdist(X, Y, "sqeuclidean"), rounds=3, warmup_rounds=1)
    _record("cost/scipy cdist", benchmark)


# ---------------------------------------------------------------------------------------------
# Sinkhorn divergence


@pytest.fixture(scope="module")
def reference(clouds):
    X, Y = clouds
    t = time.perf_counter()
    v = metalora.sinkhorn_divergence(X.astype(np.float64), Y.astype(np.float64), eps=0.01,
                                     tol=1e-7, max_iter=20000)
    RESULTS["sinkhorn/float64 reference (tol 1e-7)"] = {"seconds": time.perf_counter() - t,
                                                          "value": v}
    return v


@pytest.mark.parametrize("tol", [1e-3, 1e-2])
@pytest.mark.parametrize("threads", [0, 1])
def test_sinkhorn_metalora_eps001(benchmark, clouds, reference, tol, threads):
    X, Y = clouds
    val = benchmark.pedantic(
        lambda: metalora.sinkhorn_divergence(X, Y, eps=0.01, tol=tol, threads=threads),
        rounds=10, warmup_rounds=1)
    rel = abs(val - reference) / abs(reference)
    _, log = metalora.sinkhorn_divergence(X, Y, eps=0.01, tol=tol, threads=threads, log=True)
    _record(f"sinkhorn/metalora eps=0.01 tol={tol:g} threads={threads or 'all'}", benchmark,
            rel_err=rel, iterations=log["iterations"], anneal=log["anneal_steps"],
            phases_ms="/".join(f"{s * 1e3:.0f}" for s in log["seconds"]))
    assert rel < 1e-4


def test_sinkhorn_metalora_eps005(benchmark, clouds):
    X, Y = clouds
    benchmark.pedantic(lambda: metalora.sinkhorn_divergence(X, Y, eps=0.05), rounds=10,
                       warmup_rounds=1)
    _record("sinkhorn/metalora eps=0.05 (debiased: 3 problems)", benchmark)
    benchmark_plain = time.perf_counter()
    for _ in range(3):
        metalora.entropic_ot(X, Y, eps=0.05, tol=1e-6)
    RESULTS["sinkhorn/metalora eps=0.05 plain OT, tol 1e-6 (mean of 3)"] = {
        "seconds": (time.perf_counter() - benchmark_plain) / 3}


@pytest.mark.parametrize("eps", [0.05] + ([0.01] if SLOW else []))
def test_sinkhorn_pot_log(benchmark, clouds, eps):
    X, Y = clouds
    a = np.full(N, 1.0 / N)
    M = ot.dist(X.astype(np.float64), Y.astype(np.float64))
    benchmark.pedantic(lambda: ot.sinkhorn2(a, a, M, eps, method="sinkhorn_log", numItermax=10000),
                       rounds=1, warmup_rounds=0)
    _record(f"sinkhorn/POT sinkhorn2 log eps={eps:g} (1 problem)", benchmark)


# ---------------------------------------------------------------------------------------------
# Sliced Wasserstein, 128 projections


def test_sliced_metalora(benchmark, clouds):
    X, Y = clouds
    P = metalora.random_projections(D, 128, seed=0)
    val = benchmark.pedantic(lambda: metalora.sliced_wasserstein(X, Y, projections=P), rounds=20,
                             warmup_rounds=2)
    ref = ot.sliced_wasserstein_distance(X, Y, projections=P.astype(np.float32))
    _record("sliced/metalora 128 proj", benchmark, rel_vs_pot=float(abs(val - ref) / ref))


def test_sliced_pot(benchmark, clouds):
    X, Y = clouds
    P = metalora.random_projections(D, 128, seed=0).astype(np.float32)
    benchmark.pedantic(lambda: ot.sliced_wasserstein_distance(X, Y, projections=P), rounds=10,
                       warmup_rounds=1)
    t = _record("sliced/POT 128 proj", benchmark)
    mine = RESULTS.get("sliced/metalora 128 proj")
    if mine:
        mine["speedup vs POT"] = t / mine["seconds"]


# ---------------------------------------------------------------------------------------------
# One query against a bank of 500 datasets (256 points each, 384-d; token signatures: 4000 ids)


@pytest.fixture(scope="module")
def bank():
    rng = np.random.default_rng(1)
    centres = _unit(rng.standard_normal((40, D)))
    def ds(k):
        c = centres[rng.integers(0, 40, 3)]
        return _unit(c[rng.integers(0, 3, 256)] + 0.5 * rng.standard_normal((256, D)) / np.sqrt(D) * 8)
    clouds = [ds(k) for k in range(501)]
    ids = [rng.integers(0, 4000 + 50 * k, 4000) for k in range(501)]
    hists = [metalora.token_histogram(x, 32000) for x in ids]
    return clouds, ids, hists


BANK_METRICS = [("sinkhorn", {"eps": 0.01}), ("sliced_wasserstein", {}), ("mmd", {}),
                ("energy", {}), ("gaussian_w2", {}), ("mean_cosine", {}), ("wasserstein_1d", {}),
                ("kl", {}), ("js", {}), ("token_mmd", {})]


@pytest.mark.parametrize("metric,params", BANK_METRICS, ids=[m for m, _ in BANK_METRICS])
def test_bank_query(benchmark, bank, metric, params):
    clouds, ids, hists = bank
    kind = metalora.METRICS[metric].kind.name
    sigs = clouds if kind == "cloud" else ids if kind == "tokens" else hists
    d = benchmark.pedantic(lambda: metalora.distances(sigs[0], sigs[1:], metric=metric,
                                                      progress=False, **params),
                           rounds=1, warmup_rounds=0)
    assert d.shape == (500,) and np.isfinite(d).all()
    _record(f"bank/1 query x 500, {metric}", benchmark)
