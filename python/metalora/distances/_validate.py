"""Argument checks shared by the distance functions (package-internal).

Each check returns the argument in the form the kernels take (contiguous float64 or float32
arrays, Python numbers) or raises a ``TypeError``/``ValueError`` that names the argument and says
how to fix it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .._io import check_threads, positive_int  # noqa: F401  (check_threads: re-exported)


def as_cloud(x: Any, what: str) -> np.ndarray:
    """A point cloud ``[n, d]``: float32/float64 kept, other real dtypes to float64, C-contiguous,
    finite, non-empty (a 1-D array is read as ``[n, 1]``)."""
    if not isinstance(x, np.ndarray):
        kind = type(x).__module__.split(".")[0]
        if kind == "torch":
            raise TypeError(f"{what}: expected a numpy array, got a torch tensor; use "
                            f"t.detach().cpu().numpy()")
        x = np.asarray(x)
    if x.dtype.kind not in "fiub":
        raise TypeError(f"{what}: dtype {x.dtype} is not numeric")
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a point cloud of shape [n, d], got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: the point cloud is empty (0 points)")
    if x.shape[1] == 0:
        raise ValueError(f"{what}: points have dimension 0")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    x = np.ascontiguousarray(x)
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(f"{what}: {bad.size} point(s) contain NaN or Inf (first: row {bad[0]}); "
                         f"remove or fix them")
    return x


def as_cloud_pair(X: Any, Y: Any) -> tuple:
    """Two clouds of the same dimension and dtype (float64 when their dtypes differ)."""
    X = as_cloud(X, "X")
    Y = as_cloud(Y, "Y")
    if X.shape[1] != Y.shape[1]:
        raise ValueError(f"X and Y have different dimensions: X is {X.shape}, Y is {Y.shape}")
    if X.dtype != Y.dtype:
        X, Y = X.astype(np.float64), Y.astype(np.float64)
    return X, Y


def as_weights(w: Any, n: int, what: str) -> np.ndarray:
    """Point weights: uniform when None, else ``n`` finite non-negative numbers summing to 1."""
    if w is None:
        return np.full(n, 1.0 / n)
    w = np.ascontiguousarray(np.asarray(w, dtype=np.float64).reshape(-1))
    if w.size != n:
        raise ValueError(f"{what}: {w.size} weights for {n} points")
    if not np.isfinite(w).all():
        raise ValueError(f"{what}: weights contain NaN or Inf")
    if (w < 0).any():
        raise ValueError(f"{what}: weights must be non-negative (min {w.min():g})")
    s = w.sum()
    if abs(s - 1.0) > 1e-6:
        raise ValueError(f"{what}: weights must sum to 1 (they sum to {s:.9g}); pass w / w.sum()")
    return w


def as_sample1d(x: Any, what: str) -> np.ndarray:
    """A non-empty, finite 1-D sample as contiguous float64 (token ids as real numbers)."""
    x = np.asarray(x)
    if x.dtype.kind not in "fiub":
        raise TypeError(f"{what}: dtype {x.dtype} is not numeric")
    x = np.ascontiguousarray(x.reshape(-1), dtype=np.float64)
    if x.size == 0:
        raise ValueError(f"{what}: empty sample")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: contains NaN or Inf")
    return x


def as_density(h: Any, what: str) -> np.ndarray:
    """A histogram normalised to sum 1 (float64); entries finite, non-negative, not all zero."""
    h = np.asarray(h, dtype=np.float64).reshape(-1)
    if h.size == 0:
        raise ValueError(f"{what}: empty histogram")
    if not np.isfinite(h).all() or (h < 0).any():
        raise ValueError(f"{what}: histogram entries must be finite and non-negative")
    s = h.sum()
    if not s > 0:
        raise ValueError(f"{what}: histogram is all zeros")
    return h / s


def as_bandwidths(values: Any, default: Sequence[float], what: str) -> np.ndarray:
    """Kernel bandwidths or scales: ``default`` when None, else positive finite numbers."""
    v = np.asarray(default if values is None else values, dtype=np.float64).reshape(-1)
    if v.size == 0 or not np.isfinite(v).all() or (v <= 0).any():
        raise ValueError(f"{what} must be positive finite numbers, got {values!r}")
    return v


def check_positive_int(x: Any, what: str) -> int:
    """``x`` as an int >= 1 (bools refused)."""
    return positive_int(x, what)


def check_positive(x: Any, what: str) -> float:
    """``x`` as a finite float > 0."""
    try:
        v = float(x)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be a number, got {x!r}") from exc
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {x!r}")
    return v
