"""Issue 16: no crash, no data loss, no silent garbage. Each test reproduces one finding of the
hostile run and fails without its fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

import metalora
from metalora.cli import main
from metalora.writers import publish_directory, recover_directory

from _bank_helpers import base_config, make_bank, random_factors, tree_checksums, write_adapter

OWN = frozenset({"adapter_config.json", "adapter_model.safetensors", "metalora.json"})
ROOT = Path(__file__).resolve().parents[1]
METALORA_PATH = str(Path(metalora.__file__).resolve().parents[1])  # the metalora under test


def _fill(text):
    def fill(d):
        (d / "adapter_config.json").write_text(text)
    return fill


def _run_py(code: str, timeout: float = 120, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=METALORA_PATH + os.pathsep + str(ROOT / "tests"),
             **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=e)


@pytest.fixture
def demo(tmp_path):
    """A private copy of the demonstration bank (so that tests may damage it)."""
    from metalora.demo import demo_bank

    pytest.importorskip("metalora.embed")
    dst = tmp_path / "bank"
    shutil.copytree(demo_bank(), dst)
    return dst


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("METALORA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "rel-cache"))


# -- 1. data loss -------------------------------------------------------------------------------

def test_publish_never_replaces_a_directory_created_during_the_write(tmp_path):
    out = tmp_path / "out"

    def fill(d):  # another process creates --out meanwhile (empty: a plain rename would eat it)
        out.mkdir()
        (d / "adapter_config.json").write_text("new")

    with pytest.raises(FileExistsError, match="appeared while this run was writing"):
        publish_directory(out, fill, overwrite=False, own_files=OWN)
    assert out.is_dir() and not any(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left


def test_publish_overwrite_refuses_what_appeared_during_the_write(tmp_path):
    out = tmp_path / "out"
    publish_directory(out, _fill("old"), overwrite=False, own_files=OWN)

    def fill(d):  # replaced meanwhile by a directory that is not an adapter
        shutil.rmtree(out)
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
        (d / "adapter_config.json").write_text("new")

    with pytest.raises(metalora.AdapterError, match="not adapter files"):
        publish_directory(out, fill, overwrite=True, own_files=OWN)
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    publish_directory(out.with_name("o2"), _fill("x"), overwrite=False, own_files=OWN)
    publish_directory(out.with_name("o2"), _fill("y"), overwrite=True, own_files=OWN)
    assert (tmp_path / "o2" / "adapter_config.json").read_text() == "y"


@pytest.mark.parametrize("exchange", [True, False])
def test_concurrent_publishers_exactly_one_wins(tmp_path, exchange):
    """Two processes publish to one path without overwrite, released together: one succeeds,
    the other gets FileExistsError, and the winner's output is intact."""
    code = """
        import sys, time, metalora.writers as w
        if not {exchange}:
            w._renameat2 = lambda *a: False
        go = float(sys.argv[1])
        def fill(d):
            (d / "adapter_config.json").write_text(sys.argv[2])
            while time.time() < go: pass
        try:
            w.publish_directory(sys.argv[3], fill, overwrite=False,
                                own_files=frozenset({{"adapter_config.json"}}))
            print("won")
        except FileExistsError:
            print("lost")
    """.format(exchange=exchange)
    import time

    for trial in range(3):
        out = tmp_path / f"out{trial}"
        go = time.time() + 1.5
        env = dict(os.environ, PYTHONPATH=METALORA_PATH)
        procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(go), tag,
                                   str(out)], stdout=subprocess.PIPE, text=True, env=env)
                 for tag in ("A", "B")]
        res = [p.communicate(timeout=60)[0].strip() for p in procs]
        if exchange:  # renameat2(RENAME_NOREPLACE): exact
            assert sorted(res) == ["lost", "won"], res
        else:  # the fallback: never both replaced silently (at worst both lose to the check)
            assert res.count("won") <= 1 or (out / "adapter_config.json").exists()
        winner = "AB"[res.index("won")] if "won" in res else None
        if winner:
            assert (out / "adapter_config.json").read_text() == winner
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_kill_between_the_two_renames_of_an_overwrite_is_recoverable(tmp_path, capsys):
    """Fallback path (no RENAME_EXCHANGE): killed after the old adapter was moved aside and
    before the new one was moved in. `metalora inspect PATH` puts the old one back."""
    bank, _ = make_bank(tmp_path / "b", n=1)
    out = tmp_path / "out"
    shutil.copytree(bank / "task000", out)
    before = tree_checksums(out)
    r = _run_py(f"""
        import os, metalora.writers as w
        w._renameat2 = lambda *a: False
        real, n = os.rename, [0]
        def rename(a, b):
            n[0] += 1
            real(a, b)
            if n[0] == 1:
                os._exit(9)  # SIGKILL-like: no cleanup runs
        os.rename = rename
        w.publish_directory({str(out)!r}, lambda d: (d / "adapter_config.json").write_text("{{}}"),
                            overwrite=True, own_files=frozenset({{"adapter_config.json",
                            "adapter_model.safetensors"}}))
    """)
    assert r.returncode == 9, r.stderr
    assert not out.exists()
    assert any(p.name.startswith(".out.old-") for p in tmp_path.iterdir())
    assert main(["inspect", str(out)]) == 0
    assert "restored" in capsys.readouterr().err
    assert {k.replace(str(out), ""): v[0] for k, v in tree_checksums(out).items()} == \
        {k.replace(str(out), ""): v[0] for k, v in before.items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "out"]


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f".out.tmp-{dead}-abc").mkdir()
    (tmp_path / f".out.tmp-{dead}-abc" / "big").write_bytes(b"x" * 1000)
    live = tmp_path / f".out.tmp-{os.getpid()}-def"
    live.mkdir()
    publish_directory(tmp_path / "out", _fill("{}"), overwrite=False, own_files=OWN)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out"]
    assert recover_directory(tmp_path / "out") == []


@pytest.mark.parametrize("inside", ["bank", "adapter", "symlink"])
def test_out_inside_the_bank_is_refused_before_any_work(demo, tmp_path, capsys, inside):
    from metalora.demo import example_dataset

    before = tree_checksums(demo)
    if inside == "bank":
        out = demo / "new_adapter"
    elif inside == "adapter":
        out = demo / "adapters" / "uppercase"
    else:
        (tmp_path / "link").symlink_to(demo / "adapters")
        out = tmp_path / "link" / "uppercase"
    rc = main(["generate", "--data", str(example_dataset()), "--bank", str(demo), "--out",
               str(out), "--overwrite", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "which this run reads" in err and "--out" in err, err
    assert tree_checksums(demo) == before


def test_existing_out_is_refused_before_any_work_naming_the_flag(demo, tmp_path, capsys,
                                                                 monkeypatch):
    from metalora.demo import example_dataset
    import metalora.signatures as sig

    (tmp_path / "out").mkdir()
    monkeypatch.setattr(sig, "signature", lambda *a, **k: pytest.fail("did work first"))
    rc = main(["generate", "--data", str(example_dataset()), "--bank", str(demo), "--out",
               str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err and "overwrite=True" not in err


# -- 2. crashes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [100000, 2**31, 2**63 - 1])
def test_huge_thread_counts_are_clamped_everywhere(threads):
    rng = np.random.default_rng(0)
    A = [rng.standard_normal((2, 8)).astype(np.float32) for _ in range(2)]
    B = [rng.standard_normal((4, 2)).astype(np.float32) for _ in range(2)]
    ref = metalora.combine(A, B, [0.5, 0.5], mode="svd")
    for mode in ("linear", "cat", "svd"):
        metalora.combine(A, B, [0.5, 0.5], mode=mode, threads=threads)
    got = metalora.combine_modules({"m": (A, B)}, [0.5, 0.5], mode="svd", threads=threads)["m"]
    np.testing.assert_array_equal(got[0], ref[0])
    X = rng.standard_normal((10, 3)).astype(np.float32)
    metalora.sinkhorn_divergence(X, X + 1, threads=threads)
    metalora.distances(X, [X + 1, X * 2], metric="mmd", threads=threads)
    with pytest.raises(ValueError, match="non-negative integer"):
        metalora.combine(A, B, [0.5, 0.5], threads=-1)
    from metalora._io import available_cpus, check_threads

    assert check_threads(threads) == available_cpus()


def test_cli_generate_with_huge_threads(demo, tmp_path, capsys):
    from metalora.demo import example_dataset

    for t in ("100000", str(2**31)):
        out = tmp_path / f"o{t}"
        assert main(["generate", "--data", str(example_dataset()), "--bank", str(demo), "--out",
                     str(out), "--threads", t, "--quiet"]) == 0
        assert (out / "adapter_model.safetensors").is_file()
    assert main(["generate", "--data", str(example_dataset()), "--bank", str(demo), "--out",
                 str(tmp_path / "neg"), "--threads", "-3"]) == 2
    assert "non-negative integer" in capsys.readouterr().err


def test_bank_file_truncated_while_mapped_is_an_error_not_sigbus(tmp_path):
    bank, _ = make_bank(tmp_path / "b", n=3, manifest=True)
    r = _run_py(f"""
        import os, metalora
        bank = metalora.Bank({str(bank)!r})
        f = bank[1].weights_file
        bank[1].factors(bank.modules[0])  # mapped now
        os.truncate(f, os.path.getsize(f) // 2)
        try:
            metalora.combine_adapters(bank, [0.3, 0.3, 0.4], mode="svd")
        except metalora.AdapterError as e:
            print("ERR", e)
    """)
    assert r.returncode == 0, (r.returncode, r.stderr)  # -7 would be SIGBUS
    assert "ERR" in r.stdout and "task001" in r.stdout and "changed on disk" in r.stdout


def test_svd_memory_is_estimated_and_refused_with_the_fix(monkeypatch):
    rng = np.random.default_rng(0)
    K = 300
    A = [rng.standard_normal((8, 16)).astype(np.float32) for _ in range(K)]
    B = [rng.standard_normal((16, 8)).astype(np.float32) for _ in range(K)]
    monkeypatch.setenv("METALORA_MEMORY_LIMIT", str(2**28))  # 256 MiB
    with pytest.raises(MemoryError, match=r"needs about .* GiB.*top_k"):
        metalora.combine(A, B, np.full(K, 1 / K), mode="svd")
    metalora.combine(A, B, np.full(K, 1 / K), mode="linear")  # small: allowed


def test_loaders_refuse_devices_and_huge_lines_fast(tmp_path, monkeypatch):
    import time

    t = time.perf_counter()
    for fmt in (None, "jsonl", "json", "csv", "parquet"):
        with pytest.raises(metalora.DatasetError):
            metalora.load_dataset("/dev/zero", format=fmt)
    link = tmp_path / "zero.jsonl"
    link.symlink_to("/dev/zero")
    with pytest.raises(metalora.DatasetError, match="not a regular file"):
        metalora.load_dataset(link)
    assert time.perf_counter() - t < 5
    big = tmp_path / "big.jsonl"
    big.write_text('{"input": "a", "output": "b"}\n' * 100)
    monkeypatch.setenv("METALORA_MAX_DATASET_BYTES", "1000")
    with pytest.raises(metalora.DatasetError, match="size limit"):
        metalora.load_dataset(big)
    monkeypatch.delenv("METALORA_MAX_DATASET_BYTES")
    import metalora.datasets as dsm

    monkeypatch.setattr(dsm, "MAX_LINE_CHARS", 50)
    big.write_text('{"input": "%s", "output": "b"}\n' % ("a" * 100))
    with pytest.raises(metalora.DatasetError, match="line 1 holds"):
        metalora.load_dataset(big)
    csvf = tmp_path / "x.csv"
    csvf.write_text('input,output\n"%s",b\n' % ("a" * 100))
    with pytest.raises(metalora.DatasetError, match="CSV"):
        metalora.load_dataset(csvf)


# -- 3. silent garbage --------------------------------------------------------------------------

def _texts():
    return [f"example number {i} about topic {i % 3}" for i in range(12)]


class _Toy:
    """A tiny deterministic embedder (no model needed)."""
    id = "toy-embedder-1"
    dim = 4

    def embed(self, texts):
        out = np.array([[len(t), t.count("e"), t.count("o"), 1.0] for t in texts], np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_cache_entry_checksum_bad_entries_are_removed_and_recomputed(tmp_path):
    cache = metalora.SignatureCache(tmp_path / "c")
    good = metalora.signature(_texts(), embedder=_Toy(), cache=cache)
    (entry,) = list((tmp_path / "c").glob("*.npz"))
    key = entry.stem
    # a crafted entry: random points under the right key, no valid checksum
    np.savez(entry, points=np.random.rand(12, 4).astype(np.float32),
             __key__=np.frombuffer(key.encode(), np.uint8))
    with pytest.warns(RuntimeWarning, match="checksum"):
        again = metalora.signature(_texts(), embedder=_Toy(), cache=cache)
    np.testing.assert_array_equal(again, good)
    # a well-formed entry with the wrong shape / NaN: reported, removed, recomputed
    for bad in (np.full((12, 4), np.nan, np.float32), np.zeros((0, 4), np.float32),
                np.zeros((12, 7), np.float32).reshape(12, 7)[:3]):
        cache.store(key, {"points": bad})
        with pytest.warns(RuntimeWarning, match="signature cache file"):
            again = metalora.signature(_texts(), embedder=_Toy(), cache=cache)
        np.testing.assert_array_equal(again, good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metalora.signature(_texts(), embedder=_Toy(), cache=cache)  # repaired: silent hit
    assert cache.hits >= 1


def test_unwritable_cache_warns_once_and_runs(tmp_path):
    import metalora.signatures as sigmod

    sigmod._UNWRITABLE.clear()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = metalora.SignatureCache(blocker / "sub")
    with pytest.warns(RuntimeWarning, match="not writable") as rec:
        a = metalora.signature(_texts(), embedder=_Toy(), cache=cache)
        b = metalora.signature(_texts()[:10], embedder=_Toy(), cache=cache)
    assert len([w for w in rec if "not writable" in str(w.message)]) == 1
    assert a.shape == (12, 4) and b.shape == (10, 4)


def test_cache_clear_keeps_a_live_writers_temporary(tmp_path):
    cache = metalora.SignatureCache(tmp_path)
    metalora.signature(_texts(), embedder=_Toy(), cache=cache)
    live = tmp_path / f".abc.npz.{os.getpid()}-x1y2.tmp"
    live.write_bytes(b"in progress")
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
    dead = tmp_path / f".abc.npz.{dead_pid}-zz.tmp"
    dead.write_bytes(b"abandoned")
    assert cache.clear() == 2  # the entry and the dead temporary
    assert live.exists() and not dead.exists()


def test_sinkhorn_eps_the_dtype_cannot_carry_is_refused_and_nan_never_returned():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 4)).astype(np.float32)
    Y = rng.standard_normal((25, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="cannot be represented in the float32"):
        metalora.sinkhorn_divergence(X, Y, eps=1e-300)
    with pytest.raises(ValueError, match="cannot be represented"):
        metalora.distances(X, [Y], metric="sinkhorn", eps=1e-300)
    v = metalora.sinkhorn_divergence(X.astype(np.float64), Y.astype(np.float64), eps=1e-3)
    assert np.isfinite(v)
    from metalora.distances import api

    class M:  # any metric whose value is NaN is an error, never a returned NaN
        name, defaults, bank, symmetric = "fake", {}, None, True

        @staticmethod
        def bind(options):
            return lambda x, y, threads: float("nan")
    with pytest.raises(ValueError, match="NaN"):
        api._matrix(M, [X], [Y], {}, 1, False)


def test_degenerate_datasets_warn_or_are_refused_and_the_provenance_says_so(tmp_path):
    from metalora.generate import check_degenerate, MIN_DISTINCT_EXAMPLES

    ds = metalora.Dataset.from_pairs(["same"] * 50, ["x"] * 50)
    with pytest.warns(RuntimeWarning, match="only 1 distinct"):
        info = check_degenerate(ds)
    assert info["distinct"] == 1 and info["warning"]
    with pytest.raises(ValueError, match="every example is empty"):
        check_degenerate(metalora.Dataset.from_pairs([" ", ""], None, what="input"))
    ok = metalora.Dataset.from_pairs([f"t{i}" for i in range(MIN_DISTINCT_EXAMPLES)], None,
                                     what="input")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_degenerate(ok)["warning"] is None


def test_degenerate_dataset_is_recorded_in_the_written_provenance(demo, tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text('{"input": "hello", "output": "HELLO"}\n')
    with pytest.warns(RuntimeWarning, match="distinct"):
        metalora.generate(data, demo, out=tmp_path / "o", top_k=2)
    prov = json.loads((tmp_path / "o" / "metalora.json").read_text())
    assert prov["dataset"]["distinct_examples"] == 1 and "warning" in prov["dataset"]


# -- 4. messages, not tracebacks ----------------------------------------------------------------

def test_rank_pattern_key_that_is_not_a_regex(tmp_path):
    rng = np.random.default_rng(0)
    p = write_adapter(tmp_path / "a", random_factors(rng), base_config(rank_pattern={"(": 8}))
    with pytest.raises(metalora.AdapterError, match=r"adapter_config.json.*not a valid regular"):
        metalora.load_adapter(p)


def test_deeply_nested_safetensors_header_and_config(tmp_path):
    rng = np.random.default_rng(0)
    p = write_adapter(tmp_path / "a", random_factors(rng), base_config())
    hdr = b"[" * 100000 + b"]" * 100000
    (p / "adapter_model.safetensors").write_bytes(len(hdr).to_bytes(8, "little") + hdr)
    with pytest.raises(metalora.AdapterError, match="adapter_model.safetensors.*too deeply"):
        metalora.load_adapter(p)
    (p / "adapter_config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(metalora.AdapterError, match="adapter_config.json.*too deeply"):
        metalora.load_adapter(p)


def test_invalid_tokenizer_file_is_one_line(tmp_path, capsys, demo):
    pytest.importorskip("tokenizers")
    from metalora.demo import example_dataset

    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match="tokenizer.json.*not a valid tokenizer"):
        metalora.load_tokenizer(bad) if hasattr(metalora, "load_tokenizer") else \
            __import__("metalora.tokens").tokens.load_tokenizer(bad)
    bad.write_bytes(b"\xff\xfe garbage")
    rc = main(["generate", "--data", str(example_dataset()), "--bank", str(demo), "--out",
               str(tmp_path / "o"), "--distance", "kl", "--tokenizer", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", [5, None, ["a"], {"x": 1}, ""])
def test_bank_manifest_path_that_is_not_a_string(tmp_path, value, capsys):
    bank, _ = make_bank(tmp_path / "b", n=2, manifest=True)
    lines = (bank / "bank.jsonl").read_text().splitlines()
    e = json.loads(lines[1])
    e["adapter"] = value
    lines[1] = json.dumps(e)
    (bank / "bank.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(metalora.AdapterError, match=r"bank.jsonl.*line 2: 'adapter' must be"):
        metalora.Bank(bank)
    assert main(["inspect", str(bank)]) == 2
    assert "line 2" in capsys.readouterr().err


def test_bank_add_errors_name_the_bank_not_its_temporary(tmp_path, capsys):
    bank, _ = make_bank(tmp_path / "b", n=2, manifest=True)
    rng = np.random.default_rng(1)
    other = write_adapter(tmp_path / "other", random_factors(rng, r=4),
                          base_config(base_model_name_or_path="another/model"))
    rc = main(["bank", "add", str(bank), "--id", "x", "--adapter", str(other)])
    err = capsys.readouterr().err
    assert rc == 2 and ".check.jsonl" not in err and "bank.jsonl" in err, err


def test_inspect_into_a_closed_pipe_exits_quietly(tmp_path):
    bank, _ = make_bank(tmp_path / "b", n=40, manifest=True)
    env = dict(os.environ, PYTHONPATH=METALORA_PATH)
    r = subprocess.run(f"{sys.executable} -m metalora inspect {bank} | head -c 10 >/dev/null; "
                       f"echo ${{PIPESTATUS[0]}}", shell=True, executable="/bin/bash",
                       capture_output=True, text=True, env=env)
    assert r.stdout.strip() == "0", r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "Broken pipe" not in r.stderr
