"""Shared data generators and float64 references for the distance tests."""

import numpy as np

import metalora

LEVELS = metalora.capabilities()["available"]


def cloud(n, d, seed=0, shift=0.0, unit=False, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) + shift
    if unit:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(dtype)


def clustered(n, d, k=3, seed=0, spread=0.1, dtype=np.float64):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d))
    lab = rng.integers(0, k, n)
    return (centres[lab] + spread * rng.standard_normal((n, d))).astype(dtype)


def sqdist64(X, Y):
    X = np.asarray(X, np.float64)
    Y = np.asarray(Y, np.float64)
    return ((X[:, None, :] - Y[None, :, :]) ** 2).sum(-1)
