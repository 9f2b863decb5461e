"""Array checks shared by the Python layer: dtypes the kernels read, and finiteness."""

from __future__ import annotations

from typing import Optional

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
    v = _zero_copy(x)
    if v is not None:
        return v
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{what}: expected a numpy array, got {type(x).__name__}{_torch_hint(x)}")
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array, got shape {x.shape}")
    if x.dtype not in (np.float32, np.float16, np.uint16, BFLOAT16):
        raise TypeError(
            f"{what}: dtype {x.dtype} is not supported; pass float32, float16 or bfloat16 "
            f"(ml_dtypes.bfloat16 or its raw uint16 bits), e.g. x.astype(np.float32)"
        )
    raise ValueError(
        f"{what}: array is not C-contiguous (a transposed or sliced view?); pass "
        f"np.ascontiguousarray(x), which copies it once"
    )


def as_kernel_array(x: object, what: str) -> np.ndarray:
    """``x`` as a 2-D kernel array: in place when :func:`kernel_view` can take it, else one copy.

    A strided view keeps its dtype (copied contiguous); other real or integer dtypes and
    array-likes (nested lists) become float32. Complex, boolean, object and non-2-D input
    raise with a message naming ``what``.
    """
    v = _zero_copy(x)
    if v is not None:
        return v
    if not isinstance(x, np.ndarray):
        if type(x).__module__.split(".")[0] == "torch":
            raise TypeError(f"{what}: expected a numpy array, got a torch tensor"
                            f"{_torch_hint(x)}")
        try:
            x = np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{what}: cannot be read as a 2-D array of numbers ({exc})") from None
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array, got shape {x.shape}")
    if x.dtype in (np.float32, np.float16, np.uint16) or (BFLOAT16 is not None and x.dtype == BFLOAT16):
        return kernel_view(np.ascontiguousarray(x), what)
    if x.dtype.kind not in "fiu":
        raise TypeError(f"{what}: dtype {x.dtype} is not a real number type; pass float32, "
                        f"float16 or bfloat16 factors")
    return np.ascontiguousarray(x, dtype=np.float32)


def _zero_copy(x: object) -> Optional[np.ndarray]:
    if type(x) is np.ndarray and x.ndim == 2 and x.flags.c_contiguous:
        dt = x.dtype  # fast path by identity: builtin dtypes are singletons
        if dt is _F32 or dt is _F16 or dt is _U16:
            return x
        if dt is BFLOAT16:
            return x.view(np.uint16)
        if BFLOAT16 is not None and dt == BFLOAT16:
            return x.view(np.uint16)
    return None


def _torch_hint(x: object) -> str:
    return (" (for a torch tensor use t.detach().cpu().numpy())"
            if type(x).__module__.split(".")[0] == "torch" else "")


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
