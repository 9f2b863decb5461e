"""Issue 17, a user's first run: a bank ships its index (signature pack, verified on load), one
default n for every signature, and every option checked before the slow part."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil

import numpy as np
import pytest

import metalora
from metalora import bank_index as bi
from metalora.cli import main
from metalora.default_bank import EXAMPLE_TASK, default_bank, example_dataset as builtin_example
from metalora.demo import demo_bank, example_dataset
from metalora.signatures import DEFAULT_N, SignaturePack

from conftest import needs_embedder

embed_module = importlib.import_module("metalora.embed")  # (metalora.embed is the function)


class FakeEmbedder:
    """A deterministic stand-in for the sentence embedder: each text maps to a unit vector drawn
    from the hash of its bytes. Counts the texts it embeds."""

    def __init__(self, ident: str = "fake:1", dim: int = 16):
        self.id = ident
        self.dim = dim
        self.embedded = 0

    def embed(self, texts):
        texts = list(texts.texts() if hasattr(texts, "texts") else texts)
        self.embedded += len(texts)
        rows = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            x = np.random.default_rng(seed).standard_normal(self.dim)
            rows.append(x / np.linalg.norm(x))
        return np.asarray(rows, np.float32)


@pytest.fixture()
def bank(tmp_path, monkeypatch):
    """A copy of the demonstration bank (12 adapters, 40-example datasets), an empty cache."""
    monkeypatch.setenv("METALORA_CACHE_DIR", str(tmp_path / "cache"))
    root = shutil.copytree(demo_bank(), tmp_path / "bank")
    return metalora.Bank(root)


@pytest.fixture()
def no_real_embedding(monkeypatch):
    """Any use of the real embedder fails the test (what 'never embeds' means)."""
    def refuse(self, texts):
        raise AssertionError("the embedder was called")

    monkeypatch.setattr(embed_module.Embedder, "embed", refuse)


def _fresh_cache(tmp_path, monkeypatch, name: str) -> None:
    monkeypatch.setenv("METALORA_CACHE_DIR", str(tmp_path / name))


# ------------------------------------------------------------------------------------------------
# the signature pack


def test_a_packed_bank_is_never_embedded_again(bank, tmp_path, monkeypatch):
    packer = FakeEmbedder()
    info = bi.pack_bank(bank, embedder=packer, extra=[example_dataset()], progress=False)
    assert info["signatures"] == len(bank) + 1 and info["pack_bytes"] > 0
    assert info["pack"].parent == bank.path / bi.INDEX_DIR
    assert info["tau"] is not None and info["tau"] > 0
    _fresh_cache(tmp_path, monkeypatch, "empty-cache")
    user = FakeEmbedder()
    ad = metalora.generate(example_dataset(), bank, embedder=user, tau="auto")
    assert user.embedded == 0  # bank AND query (packed as an extra) come from the pack
    assert ad.generation.tau == pytest.approx(info["tau"])
    assert not (tmp_path / "empty-cache" / "signatures").exists()  # nothing written to the cache


def test_packed_float16_points_move_distances_within_their_bound(bank, tmp_path, monkeypatch):
    """float16 keeps 11 significant bits: each unit-norm point's components are rounded by a
    relative u = 2**-11, the cost 2 - 2 x.y of a pair by at most 2u, and each of the three terms
    of the debiased Sinkhorn divergence (1-Lipschitz in the cost) by at most 2u: |dS| <= 4u."""
    fp32 = metalora.generate(example_dataset(), bank, embedder=FakeEmbedder(), cache=False)
    bi.pack_bank(bank, embedder=FakeEmbedder(), progress=False)
    packed = metalora.generate(example_dataset(), bank, embedder=FakeEmbedder(), cache=False)
    diff = np.abs(packed.generation.distances - fp32.generation.distances)
    assert diff.max() <= 4 * 2.0 ** -11
    assert diff.max() > 0  # the pack did serve the bank


def test_a_tampered_pack_is_detected_and_the_bank_recomputed(bank, tmp_path, monkeypatch, caplog):
    info = bi.pack_bank(bank, embedder=FakeEmbedder(), progress=False)
    path = info["pack"]
    with np.load(path) as z:
        arrays = {k: z[k].copy() for k in z.files}
    arrays["points"][3, 2] = np.float16(0.5)  # one changed number; the checksum is kept
    np.savez(path, **arrays)
    _fresh_cache(tmp_path, monkeypatch, "empty-cache")
    user = FakeEmbedder()
    with caplog.at_level(logging.INFO, logger="metalora"):
        metalora.generate(example_dataset(), bank, embedder=user)
    assert "fails its checksum" in caplog.text and str(path) in caplog.text
    assert user.embedded == 40 * (len(bank) + 1)  # every bank dataset and the query


def test_a_truncated_pack_is_reported(bank, caplog):
    info = bi.pack_bank(bank, embedder=FakeEmbedder(), progress=False)
    data = info["pack"].read_bytes()
    info["pack"].write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="metalora"):
        assert bi.BankIndex(metalora.Bank(bank.path)).packs() == []
    assert "unreadable" in caplog.text


def test_a_pack_of_another_embedder_is_ignored_with_the_reason(bank, tmp_path, monkeypatch,
                                                              caplog):
    bi.pack_bank(bank, embedder=FakeEmbedder("fake:old"), progress=False)
    user = FakeEmbedder("fake:new")
    with caplog.at_level(logging.INFO, logger="metalora"):
        metalora.generate(example_dataset(), bank, embedder=user)
    assert "made by embedder fake:old" in caplog.text and "fake:new" in caplog.text
    assert user.embedded == 40 * (len(bank) + 1)


def test_an_edited_bank_dataset_alone_is_recomputed(bank, caplog):
    bi.pack_bank(bank, embedder=FakeEmbedder(), progress=False)
    k = bank.ids[2]
    path = bank.dataset_path(k)
    rows = path.read_text().splitlines()
    rows[0] = json.dumps({"input": "an edited example", "output": "x"})
    path.write_text("\n".join(rows) + "\n")
    user = FakeEmbedder()
    with caplog.at_level(logging.INFO, logger="metalora"):
        metalora.generate(example_dataset(), metalora.Bank(bank.path), embedder=user)
    assert f"datasets of {k} changed since the bank was packed" in caplog.text
    assert user.embedded == 40 + 40  # that dataset and the query


def test_a_pack_made_at_another_n_says_so(bank, caplog):
    bi.pack_bank(bank, embedder=FakeEmbedder(), n=8, progress=False)
    user = FakeEmbedder()
    with caplog.at_level(logging.INFO, logger="metalora"):
        metalora.generate(example_dataset(), bank, embedder=user)
    assert f"made with n=8, seed=0, this run uses n={DEFAULT_N}" in caplog.text


def test_signature_pack_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    entries = {hashlib.sha256(bytes([i])).hexdigest(): rng.standard_normal((5 + i, 4))
               .astype(np.float32) for i in range(3)}
    SignaturePack.write(tmp_path / "p.npz", entries, {"embedder": "e", "n": 4, "seed": 0})
    pack = SignaturePack(tmp_path / "p.npz")
    assert len(pack) == 3 and pack.embedder == "e"
    for k, x in entries.items():
        got = pack.get(k)
        assert got.dtype == np.float32 and got.shape == x.shape
        np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
    assert pack.get("0" * 64) is None


def test_cli_bank_index_pack(bank, monkeypatch, capsys):
    fake = FakeEmbedder()
    monkeypatch.setattr(embed_module, "default_embedder", lambda **kw: fake)
    assert main(["bank", "index", str(bank.path), "--pack", "--pack-extra",
                 str(example_dataset())]) == 0
    out = capsys.readouterr().out
    assert "bank packed: 13 signatures" in out and "never embeds" in out
    assert main(["bank", "index", str(bank.path), "--pack-extra",
                 str(example_dataset())]) == 2
    assert "--pack-extra applies with --pack only" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# one default n


def test_one_default_n_for_the_query_and_the_bank(tmp_path, monkeypatch):
    """A dataset larger than DEFAULT_N is embedded as its seeded subsample of DEFAULT_N, the
    same whether it is the query or a bank dataset."""
    monkeypatch.setenv("METALORA_CACHE_DIR", str(tmp_path / "cache"))
    rows = [{"input": f"example number {i}", "output": str(i)} for i in range(DEFAULT_N + 50)]
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = shutil.copytree(demo_bank(), tmp_path / "bank")
    bank = metalora.Bank(root)
    user = FakeEmbedder()
    metalora.generate(data, bank, embedder=user)
    assert user.embedded == DEFAULT_N + 40 * len(bank)
    again = FakeEmbedder()
    metalora.generate(data, bank, embedder=again, n=None)  # every example: a new signature
    assert again.embedded == DEFAULT_N + 50
    assert f"(default {DEFAULT_N}" in " ".join(_help(["generate", "--help"]).split())
    assert f"(default {DEFAULT_N}" in " ".join(_help(["bank", "index", "--help"]).split())


def _help(argv) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main(argv)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# options refused before any embedding


@pytest.mark.parametrize("argv, message", [
    (["--mode", "cat", "--rank", "4"], "--rank 4 applies to --mode 'svd' only"),
    (["--mode", "svd", "--rank", "1000"], "exceeds the largest rank --mode 'svd' can give here, 48"),
    (["--mode", "svd", "--rank", "9", "--top-k", "2"], "of the --top-k 2 adapters used"),
    (["--distance", "kl"], "pass --tokenizer"),
    (["--distance", "kl", "--tokenizer", "/nonexistent/tokenizer.json"], "tokenizer.json not found"),
    (["--n", "0"], "expected a positive number of examples or 'all'"),
    (["--top-k", "0"], "top_k must be a positive integer"),
])
def test_cli_refuses_incompatible_options_before_embedding(bank, tmp_path, capsys, argv, message,
                                                           no_real_embedding):
    code = None
    try:
        code = main(["generate", "--data", str(example_dataset()), "--bank", str(bank.path),
                     "--out", str(tmp_path / "out")] + argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()), err
    assert not (tmp_path / "out").exists()


def test_an_output_that_cannot_be_written_is_refused_before_embedding(bank, tmp_path, capsys):
    user = FakeEmbedder()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        metalora.generate(example_dataset(), bank, embedder=user,
                          out=tmp_path / "missing" / "dir" / "adapter")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        metalora.generate(example_dataset(), bank, embedder=user, out=tmp_path / "a-file" / "x")
    assert user.embedded == 0
    assert main(["generate", "--data", str(example_dataset()), "--bank", str(bank.path),
                 "--out", str(tmp_path / "missing" / "adapter")]) == 2
    assert "choose another --out" in capsys.readouterr().err


def test_auto_tau_on_a_tiny_bank_is_refused_before_embedding(bank, tmp_path):
    manifest = bank.path / "bank.jsonl"
    manifest.write_text("".join(manifest.read_text().splitlines(True)[:2]))
    user = FakeEmbedder()
    with pytest.raises(ValueError, match="needs at least 3 adapters"):
        metalora.generate(example_dataset(), metalora.Bank(bank.path), embedder=user, tau="auto")
    assert user.embedded == 0


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root may write anywhere")
def test_a_read_only_output_directory_is_refused_before_embedding(bank, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    user = FakeEmbedder()
    try:
        with pytest.raises(PermissionError, match="cannot write in"):
            metalora.generate(example_dataset(), bank, embedder=user, out=ro / "adapter")
    finally:
        ro.chmod(0o755)
    assert user.embedded == 0


# ------------------------------------------------------------------------------------------------
# the built-in bank


builtin = pytest.mark.skipif(default_bank() is None,
                             reason="the built-in SmolLM2-135M bank is not installed")


@needs_embedder
@builtin
def test_the_builtin_bank_ships_a_verified_index(tmp_path, monkeypatch, capsys, caplog,
                                                  no_real_embedding):
    """`generate --example` on a first run (empty cache) embeds nothing: the bank's datasets and
    the example task come from the shipped pack; `--tau auto` reads the shipped D, G and tau.
    The bank is copied first: the check of G records the adapters' file stamps in the index."""
    src = default_bank().parent
    root = tmp_path / "builtin"
    shutil.copytree(src / "bank", root / "bank")
    shutil.copytree(src / "tasks", root / "tasks")
    _fresh_cache(tmp_path, monkeypatch, "empty-cache")
    packs = bi.BankIndex(metalora.Bank(root / "bank")).packs()
    assert len(packs) == 1 and packs[0].meta["n"] == DEFAULT_N
    assert packs[0].path.stat().st_size < 12 * 2 ** 20  # shipped data stays small
    with caplog.at_level(logging.INFO, logger="metalora"):
        assert main(["generate", "--data", str(root / "tasks" / EXAMPLE_TASK / "train.jsonl"),
                     "--bank", str(root / "bank"), "--tau", "auto",
                     "--out", str(tmp_path / "adapter")]) == 0
    assert "recomputing" not in caplog.text and "embedding" not in caplog.text, (
        f"{caplog.text}\nthe shipped index no longer matches (embedder or bank changed): re-run "
        f"`metalora bank index bench/quality/bank --pack --pack-extra "
        f"bench/quality/tasks/{EXAMPLE_TASK}/train.jsonl` and commit bank/metalora-index")
    text = capsys.readouterr().out
    assert all("_mctaco_" in line for line in text.split("drew on:")[1].strip().splitlines()[:4])
    assert main(["generate", "--example", "--out", str(tmp_path / "example")]) == 0
    assert (tmp_path / "example" / "adapter_model.safetensors").is_file()
    assert builtin_example().is_file()
