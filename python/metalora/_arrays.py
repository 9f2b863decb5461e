"""Array checks shared by the Python layer: dtypes the kernels read, and finiteness."""

from __future__ import annotations

import numpy as np

try:  # ml_dtypes is a core dependency, but keep the import failure readable.
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - exercised only on broken installs
    ml_dtypes = None
    BFLOAT16 = None

OUT_DTYPES = ("float32", "float16", "bfloat16")
_F32, _F16, _U16 = np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint16)


def kernel_view(x: object, what: str) -> np.ndarray:
    """Return ``x`` as a 2-D array the kernels can read without a copy.

    float32 and float16 pass as they are; bfloat16 (``ml_dtypes.bfloat16``) is viewed as its
    uint16 bits, and uint16 input is taken to be bfloat16 bits already. Anything else, or a
    non-contiguous array, raises with a message that says what to pass.
    """
    if type(x) is np.ndarray and x.ndim == 2 and x.flags.c_contiguous:
        dt = x.dtype  # fast path by identity: builtin dtypes are singletons
        if dt is _F32 or dt is _F16 or dt is _U16:
            return x
        if dt is BFLOAT16:
            return x.view(np.uint16)
    if not isinstance(x, np.ndarray):
        kind = type(x).__module__.split(".")[0]
        hint = " (for a torch tensor use t.detach().cpu().numpy())" if kind == "torch" else ""
        raise TypeError(f"{what}: expected a numpy array, got {type(x).__name__}{hint}")
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array, got shape {x.shape}")
    if BFLOAT16 is not None and x.dtype == BFLOAT16:
        x = x.view(np.uint16)
    elif x.dtype not in (np.float32, np.float16, np.uint16):
        raise TypeError(
            f"{what}: dtype {x.dtype} is not supported; pass float32, float16 or bfloat16 "
            f"(ml_dtypes.bfloat16 or its raw uint16 bits), e.g. x.astype(np.float32)"
        )
    if not x.flags.c_contiguous:
        raise ValueError(
            f"{what}: array is not C-contiguous (a transposed or sliced view?); pass "
            f"np.ascontiguousarray(x), which copies it once"
        )
    return x


def all_finite(x: np.ndarray) -> bool:
    """True when a kernel-view array (float32, float16 or uint16 bfloat16 bits) has no NaN/Inf."""
    if x.dtype == np.uint16:
        return not bool(np.any((x & 0x7F80) == 0x7F80))
    return bool(np.isfinite(x).all())


def to_out_dtype(x: np.ndarray, out_dtype: str, what: str) -> np.ndarray:
    """Convert a float32 result to the requested output dtype (round to nearest even)."""
    if out_dtype == "float32":
        return x
    if out_dtype == "float16":
        with np.errstate(over="ignore"):
            y = x.astype(np.float16)
    else:
        y = x.astype(BFLOAT16)
    if not np.isfinite(y.astype(np.float32)).all():
        raise OverflowError(f"{what}: values exceed the range of {out_dtype}; use out_dtype='float32'")
    return y
