"""cost_matrix against float64 numpy, at every dispatch level and thread count."""

import numpy as np
import pytest

import metalora
from _dist_helpers import LEVELS, cloud, sqdist64

SHAPES = [(1, 1, 1), (7, 13, 3), (37, 29, 384), (50, 61, 5), (100, 33, 17), (13, 45, 9)]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,m,d", SHAPES)
def test_sqeuclidean_matches_numpy(level, dtype, n, m, d):
    X = cloud(n, d, 1, dtype=dtype)
    Y = cloud(m, d, 2, shift=0.3, dtype=dtype)
    with metalora.use_isa(level):
        C = metalora.cost_matrix(X, Y)
    ref = sqdist64(X, Y)
    assert C.dtype == dtype and C.shape == (n, m)
    # Gram-based formula: cancellation error ~ eps_dtype * (|x|^2 + |y|^2) per entry.
    scale = (X.astype(np.float64) ** 2).sum(1)[:, None] + (Y.astype(np.float64) ** 2).sum(1)[None]
    eps = np.finfo(dtype).eps
    assert np.all(np.abs(C - ref) <= 8 * eps * (scale + 1) * np.sqrt(d))
    assert (C >= 0).all()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cosine_matches_numpy(level, dtype):
    X = cloud(23, 19, 3, dtype=dtype)
    Y = cloud(31, 19, 4, dtype=dtype)
    Y[0] = 0  # zero vector: cost 1 to everything
    with metalora.use_isa(level):
        C = metalora.cost_matrix(X, Y, metric="cosine")
    X64, Y64 = X.astype(np.float64), Y.astype(np.float64)
    nx = np.linalg.norm(X64, axis=1)[:, None]
    ny = np.linalg.norm(Y64, axis=1)[None]
    ref = 1 - (X64 @ Y64.T) / np.where(nx * ny > 0, nx * ny, 1)
    ref[:, 0] = 1
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(C, ref, atol=tol)


@pytest.mark.parametrize("level", LEVELS)
def test_levels_agree_with_serial_and_threads_bitwise(level):
    X = cloud(101, 40, 5, dtype=np.float32)
    Y = cloud(77, 40, 6, dtype=np.float32)
    with metalora.use_isa("serial"):
        ref = metalora.cost_matrix(X, Y)
    with metalora.use_isa(level):
        c1 = metalora.cost_matrix(X, Y, threads=1)
        c2 = metalora.cost_matrix(X, Y, threads=2)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_allclose(c1, ref, atol=1e-4)


def test_out_and_self():
    X = cloud(10, 4, 7)
    out = np.empty((10, 10))
    r = metalora.cost_matrix(X, out=out)
    assert r is out
    np.testing.assert_allclose(out, sqdist64(X, X), atol=1e-12)
    with pytest.raises(ValueError, match="out must be"):
        metalora.cost_matrix(X, out=np.empty((10, 9)))


def test_bad_input():
    X = cloud(5, 3, 0)
    with pytest.raises(ValueError, match="different dimensions"):
        metalora.cost_matrix(X, cloud(5, 4, 0))
    Xn = X.copy()
    Xn[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        metalora.cost_matrix(Xn, X)
    with pytest.raises(ValueError, match="empty"):
        metalora.cost_matrix(np.zeros((0, 3)), X)
    with pytest.raises(ValueError, match="metric"):
        metalora.cost_matrix(X, X, metric="l1")
