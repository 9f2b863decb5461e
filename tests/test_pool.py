"""The kernels' task pool (cpp/src/common/pool.hpp): every kernel that runs on it gives the same
bits on 1 and N threads, every task runs exactly once, exceptions reach Python, zero tasks and
huge thread counts are handled, the busy-core cap is applied when enabled, and repeated calls
neither leak threads nor grow the pool. No timing is asserted (speed is in bench/)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import metalora
import numpy as np
import pytest
from conftest import make
from metalora import _core

CPUS = _core.pool_stats()["cpus"]
N = max(2, CPUS)  # the "N threads" of the 1-vs-N comparisons


@pytest.fixture
def busy_check(monkeypatch, tmp_path):
    """Turn the busy cap on, reading the given /proc/loadavg-style line from a file."""
    path = tmp_path / "loadavg"

    def set_line(running: int | None, text: str | None = None) -> None:
        path.write_text(text if text is not None else f"1.00 0.50 0.25 {running}/321 4242\n")
        monkeypatch.delenv("METALORA_NO_BUSY_CHECK", raising=False)
        monkeypatch.setenv("METALORA_LOADAVG_PATH", str(path))
        _core.pool_reset()

    yield set_line
    monkeypatch.undo()
    _core.pool_reset()


# ------------------------------------------------------------------------------------------------
# The pool itself, through its test hook


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000])
@pytest.mark.parametrize("threads", [1, 2, 0])
def test_every_task_runs_exactly_once(n, threads):
    r = _core._pool_probe(n, threads)
    assert r["ran"] == [1] * n
    assert 1 <= r["threads_seen"] <= min(n, CPUS)


def test_zero_tasks_is_a_no_op():
    _core.pool_reset()
    r = _core._pool_probe(0, 2)
    assert r == {"threads_seen": 0, "ran": []}
    assert _core.pool_stats()["calls"] == 0


@pytest.mark.parametrize("fail_at", [0, 1, 17, 99])
@pytest.mark.parametrize("threads", [1, 2])
def test_an_exception_in_a_task_reaches_python(fail_at, threads):
    with pytest.raises(RuntimeError, match=f"task {fail_at} failed"):
        _core._pool_probe(100, threads, 0.0, fail_at)
    # the pool is intact afterwards
    assert _core._pool_probe(50, threads)["ran"] == [1] * 50


@pytest.mark.parametrize("threads", [3, 64, 1024])
def test_huge_thread_counts_are_clamped_to_the_cpus(threads):
    _core.pool_reset()
    r = _core._pool_probe(200, threads)
    s = _core.pool_stats()
    assert r["ran"] == [1] * 200
    assert s["last_requested"] == min(threads, CPUS) == _core.resolve_threads(threads)
    assert s["last_threads"] <= CPUS
    assert s["workers"] <= CPUS - 1
    assert r["threads_seen"] <= CPUS


def test_threads_never_exceed_the_tasks():
    _core.pool_reset()
    _core._pool_probe(1, 0)
    assert _core.pool_stats()["last_threads"] == 1
    assert _core.pool_stats()["helper_tasks"] == 0


@pytest.mark.skipif(CPUS < 2, reason="needs 2 CPUs")
def test_with_the_check_off_helpers_take_part():
    # tasks that sleep leave the caller no chance to run them all before a helper wakes
    _core.pool_reset()
    r = _core._pool_probe(40, 2, 0.002)
    s = _core.pool_stats()
    assert s["busy_check"] is False and s["cap"] == CPUS
    assert s["last_threads"] == 2
    assert r["threads_seen"] == 2 and s["helper_tasks"] > 0


def test_repeated_calls_do_not_leak_threads():
    _core._pool_probe(100, 0)
    workers = _core.pool_stats()["workers"]
    tasks_before = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None
    for _ in range(300):
        _core._pool_probe(8, 0)
    assert _core.pool_stats()["workers"] == workers <= CPUS - 1
    if tasks_before is not None:
        assert len(os.listdir("/proc/self/task")) == tasks_before


def test_concurrent_callers_share_the_pool():
    results, errors = [], []

    def worker(k: int) -> None:
        try:
            for _ in range(20):
                results.append(_core._pool_probe(37 + k, 0)["ran"] == [1] * (37 + k))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors and len(results) == 80 and all(results)
    assert _core.pool_stats()["workers"] <= CPUS - 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_can_use_the_pool():
    code = ("import os, sys\n"
            "from metalora import _core\n"
            "_core._pool_probe(100, 0, 0.0001)\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    ok = _core._pool_probe(100, 0, 0.0001)['ran'] == [1] * 100\n"
            "    os._exit(0 if ok else 3)\n"
            "_, st = os.waitpid(pid, 0)\n"
            "sys.exit(os.waitstatus_to_exitcode(st))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=120,
                          capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]


# ------------------------------------------------------------------------------------------------
# The busy cap


def test_the_suite_runs_with_the_check_off():
    assert os.environ.get("METALORA_NO_BUSY_CHECK") == "1"
    assert _core.pool_stats()["busy_check"] is False


@pytest.mark.parametrize("others", [1, 2, 5, 100])
def test_busy_cores_cap_the_threads(busy_check, others):
    busy_check(1 + others)  # the reading thread itself is runnable too
    cap = max(1, CPUS - others)
    r = _core._pool_probe(64, 0, 0.0005)
    s = _core.pool_stats()
    assert s["busy_check"] is True
    assert s["cap"] == cap and s["others_running"] == others
    assert s["last_threads"] == min(cap, CPUS)
    assert r["ran"] == [1] * 64
    if cap == 1:
        assert r["threads_seen"] == 1 and s["helper_tasks"] == 0


def test_idle_cores_are_used(busy_check):
    busy_check(1)
    _core._pool_probe(64, 0)
    s = _core.pool_stats()
    assert s["cap"] == CPUS and s["others_running"] == 0 and s["last_threads"] == CPUS


@pytest.mark.parametrize("text", ["", "garbage\n", "1.0 2.0 3.0\n"])
def test_an_unreadable_reading_means_no_cap(busy_check, text):
    busy_check(None, text)
    _core._pool_probe(16, 0)
    assert _core.pool_stats()["cap"] == CPUS


def test_a_missing_file_means_no_cap(busy_check, monkeypatch, tmp_path):
    busy_check(1)
    monkeypatch.setenv("METALORA_LOADAVG_PATH", str(tmp_path / "absent"))
    _core.pool_reset()
    assert _core.pool_stats()["cap"] == CPUS


def test_reset_reads_the_cores_again(busy_check):
    busy_check(1 + CPUS)  # every core busy
    _core._pool_probe(8, 0)
    assert _core.pool_stats()["cap"] == 1
    busy_check(1)  # writes the file and resets: read again
    assert _core.pool_stats()["cap"] == CPUS


def test_the_cap_leaves_results_unchanged(busy_check):
    rng = np.random.default_rng(5)
    X, Y = rng.standard_normal((301, 37)), rng.standard_normal((203, 37))
    free = metalora.cost_matrix(X, Y, threads=N)
    busy_check(1 + CPUS)
    np.testing.assert_array_equal(metalora.cost_matrix(X, Y, threads=N), free)
    assert _core.pool_stats()["last_threads"] == 1


# ------------------------------------------------------------------------------------------------
# 1 vs N threads: the same bits from every kernel that runs on the pool


def modules_of(rng, dtype: str, K: int = 5, r: int = 3):
    shapes = {"q": (67, 131), "k": (29, 131), "v": (29, 131), "o": (131, 67)}
    mods = {}
    for name, (out, n_in) in shapes.items():
        A = [make(rng, (r, n_in), dtype)[0] for _ in range(K)]
        B = [make(rng, (out, r), dtype)[0] for _ in range(K)]
        mods[name] = (A, B)
    return mods


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["linear", "cat", "svd"])
def test_combine_modules_same_bits_on_1_and_n_threads(isa, dtype, mode):
    rng = np.random.default_rng(11)
    mods = modules_of(rng, dtype)
    w = [0.4, -0.2, 0.0, 0.7, 0.1]
    one = metalora.combine_modules(mods, w, mode=mode, threads=1)
    many = metalora.combine_modules(mods, w, mode=mode, threads=N)
    for name in mods:
        np.testing.assert_array_equal(one[name][0], many[name][0])
        np.testing.assert_array_equal(one[name][1], many[name][1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind, d", [(0, 1), (0, 5), (0, 45), (1, 45), (2, 45)],
                         ids=["sqeuclidean-1d", "sqeuclidean-5d", "sqeuclidean", "cosine", "dot"])
def test_cost_matrix_same_bits_on_1_and_n_threads(isa, dtype, kind, d):
    rng = np.random.default_rng(3)
    X, Y = rng.standard_normal((257, d)).astype(dtype), rng.standard_normal((131, d)).astype(dtype)
    one, many = np.empty((257, 131), dtype), np.empty((257, 131), dtype)
    _core.dist_cost(X, Y, kind, one, 1)
    _core.dist_cost(X, Y, kind, many, N)
    np.testing.assert_array_equal(one, many)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sinkhorn_same_bits_on_1_and_n_threads(isa, dtype):
    rng = np.random.default_rng(4)
    X = rng.standard_normal((203, 19)).astype(dtype)
    Y = rng.standard_normal((157, 19)).astype(dtype) + 0.3
    one = metalora.sinkhorn_divergence(X, Y, eps=0.1, threads=1)
    many = metalora.sinkhorn_divergence(X, Y, eps=0.1, threads=N)
    assert one == many


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel", ["rbf", "multiscale"])
@pytest.mark.parametrize("d", [1, 33])
def test_mmd_same_bits_on_1_and_n_threads(isa, dtype, kernel, d):
    rng = np.random.default_rng(6)
    X = rng.standard_normal((301, d)).astype(dtype)
    Y = rng.standard_normal((149, d)).astype(dtype) + 0.2
    assert (metalora.mmd(X, Y, kernel=kernel, threads=1)
            == metalora.mmd(X, Y, kernel=kernel, threads=N))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sliced_and_energy_same_bits_on_1_and_n_threads(isa, dtype):
    rng = np.random.default_rng(8)
    X = rng.standard_normal((211, 23)).astype(dtype)
    Y = rng.standard_normal((97, 23)).astype(dtype)
    assert (metalora.sliced_wasserstein(X, Y, n_projections=61, threads=1)
            == metalora.sliced_wasserstein(X, Y, n_projections=61, threads=N))
    assert (metalora.energy_distance(X, Y, threads=1)
            == metalora.energy_distance(X, Y, threads=N))


def test_n_threads_really_ran_on_n_threads():
    rng = np.random.default_rng(9)
    X = rng.standard_normal((2000, 64)).astype(np.float32)
    _core.pool_reset()
    metalora.cost_matrix(X, X, threads=N)
    s = _core.pool_stats()
    assert s["calls"] >= 1 and s["last_threads"] == min(N, CPUS)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_while_another_thread_uses_the_pool():
    # the child must not inherit a pool (or busy-check) lock held by a thread that is gone
    code = ("import os, sys, threading\n"
            "from metalora import _core\n"
            "stop = False\n"
            "def spin():\n"
            "    while not stop:\n"
            "        _core._pool_probe(64, 0)\n"
            "t = threading.Thread(target=spin); t.start()\n"
            "bad = 0\n"
            "for _ in range(20):\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        ok = _core._pool_probe(64, 0)['ran'] == [1] * 64\n"
            "        os._exit(0 if ok else 3)\n"
            "    _, st = os.waitpid(pid, 0)\n"
            "    bad += os.waitstatus_to_exitcode(st) != 0\n"
            "stop = True; t.join()\n"
            "sys.exit(bad)\n")
    for check in ("1", "0"):  # with and without the busy check (its own lock)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
               "METALORA_NO_BUSY_CHECK": check}
        proc = subprocess.run([sys.executable, "-c", code], env=env, timeout=120,
                              capture_output=True, check=False)
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
