"""The private binding layer, metalora._core, called directly as a careless caller would.

Every misuse must be a clean TypeError (wrong type or dtype) or ValueError (wrong rank, shape,
layout, enum or option) naming the argument, never a crash and never a silent result: the
bindings convert nothing (a list is refused, not turned into a temporary the kernels would write
into after it is freed), and an exception thrown inside an OpenMP region reaches Python.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from metalora import _core

R, IN, OUT = 3, 5, 4  # one adapter: A [R, IN], B [OUT, R]


def factors(rng=None):
    rng = rng or np.random.default_rng(0)
    return (rng.standard_normal((R, IN)).astype(np.float32),
            rng.standard_normal((OUT, R)).astype(np.float32))


def spec(op: str, **change) -> dict:
    """A valid one-module spec for op, then the given keys replaced (None deletes a key)."""
    A, B = factors()
    s = {"A": [A], "B": [B], "in": IN, "out": OUT, "cb": [0.5]}
    if op == "linear":
        s.update(wa=[2.0], A_out=np.empty((R, IN), np.float32),
                 B_out=np.empty((OUT, R), np.float32))
    elif op == "cat":
        s.update(A_out=np.empty((R, IN), np.float32), B_out=np.empty((OUT, R), np.float32))
    elif op == "gram":
        s.update(GA=np.empty((R, R)), GB=np.empty((R, R)))
    else:
        m = 2
        s.update(m=m, QA=np.ones((m, R), np.float32), PB=np.ones((R, m)),
                 A_out=np.empty((m, IN), np.float32), B_out=np.empty((OUT, m), np.float32))
    for k, v in change.items():
        if v is None:
            del s[k]
        else:
            s[k] = v
    return s


def read_only(x: np.ndarray) -> np.ndarray:
    x.flags.writeable = False
    return x


# ------------------------------------------------------------------------------------------------
# combine_op


def within(x, ref, bound):
    assert np.all(np.abs(np.asarray(x, np.float64) - ref) <= bound)


@pytest.mark.parametrize("op", ["linear", "cat", "gram", "project"])
def test_valid_specs_run_and_compute(op):
    """The checks let a valid call through and it computes the right thing."""
    s = spec(op)
    _core.combine_op(op, [s], 2)
    A, B = s["A"][0].astype(np.float64), s["B"][0].astype(np.float64)
    if op in ("linear", "cat"):  # scaling by 2, 1 or 0.5 is exact
        np.testing.assert_array_equal(s["A_out"], (2.0 if op == "linear" else 1.0) * s["A"][0])
        np.testing.assert_array_equal(s["B_out"], 0.5 * s["B"][0])
    elif op == "gram":
        # float64 sums of exact float32 x float32 products: a few float64 ulps per term
        eps = np.finfo(np.float64).eps
        within(s["GA"], A @ A.T, IN * eps * (abs(A) @ abs(A.T)))
        within(s["GB"], 0.25 * B.T @ B, OUT * eps * 0.25 * (abs(B.T) @ abs(B)))
    else:
        # float32 results of R-term sums (float32 FMA chain for A, float64 then one rounding
        # for B): (R + 1) float32 ulps of the sum of |terms|
        eps = np.finfo(np.float32).eps
        within(s["A_out"], np.ones((2, R)) @ A, (R + 1) * eps * (np.ones((2, R)) @ abs(A)))
        P = np.ones((R, 2))
        within(s["B_out"], 0.5 * B @ P, (R + 1) * eps * 0.5 * (abs(B) @ P))


def test_inputs_may_be_read_only_memmaps_and_numpy_integers(tmp_path):
    A, B = factors()
    path = tmp_path / "a.bin"
    A.tofile(path)
    Am = np.memmap(path, dtype=np.float32, mode="r", shape=A.shape)  # an ndarray subclass
    s = spec("cat", A=[Am], B=[read_only(B.copy())], **{"in": np.int64(IN), "out": np.int32(OUT)})
    _core.combine_op("cat", [s])
    np.testing.assert_array_equal(s["A_out"], A)


def test_same_input_array_in_several_modules_is_fine():
    A, B = factors()
    specs = [spec("cat", A=[A, A], B=[B, B], cb=[1.0, 2.0],
                  A_out=np.empty((2 * R, IN), np.float32), B_out=np.empty((OUT, 2 * R), np.float32))
             for _ in range(3)]
    _core.combine_op("cat", specs)
    for s in specs:
        np.testing.assert_array_equal(s["A_out"], np.vstack([A, A]))


F32 = np.float32


def bad_combine_cases():
    A, B = factors()
    nested = A.tolist()
    buf = np.empty(64, F32)
    return [
        # op, modules, exception, message
        ("sum", [spec("cat")], ValueError, r"op: unknown operation 'sum'; use one of linear, cat"),
        ("cat", (spec("cat"),), TypeError, r"modules: expected a list of dicts, got tuple"),
        ("cat", [[("A", [A])]], TypeError, r"module 0: expected a dict, got list"),
        ("cat", [spec("cat", A_out=None)], ValueError,
         r"module 0: missing key 'A_out' \(op 'cat' takes A, B, in, out, cb, A_out, B_out\)"),
        ("cat", [spec("cat", wa=[1.0])], ValueError, r"module 0: unknown key 'wa' \(op 'cat' takes"),
        ("cat", [{**spec("cat"), 7: 1}], ValueError, r"unknown key 7"),
        ("gram", [spec("gram", A_outt=np.empty(1))], ValueError, r"unknown key 'A_outt'"),
        # the inputs
        ("cat", [spec("cat", A=A)],
          TypeError, r"module 0: A: expected a list of arrays, got ndarray"),
        ("cat", [spec("cat", A=[nested])],
          TypeError, r"A\[0\]: expected a numpy.ndarray, got list"),
        ("cat", [spec("cat", A=[A.astype(np.float64)])],
          TypeError, r"A\[0\]: dtype float64 is not supported"),
        ("cat", [spec("cat", A=[A.astype(">f4")])],
          TypeError, r"A\[0\]: dtype >f4 is not supported"),
        ("cat", [spec("cat", A=[A.astype(">f2")])],
          TypeError, r"A\[0\]: dtype >f2 is not supported"),
        ("cat", [spec("cat", A=[A.astype(np.int16)])], TypeError, r"A\[0\]: dtype int16"),
        ("cat", [spec("cat", A=[A.reshape(-1)])],
          ValueError, r"A\[0\]: expected a 2-D array, got shape \(15,\)"),
        ("cat", [spec("cat", A=[A[None]])],
          ValueError, r"A\[0\]: expected a 2-D array, got shape \(1, 3, 5\)"),
        ("cat", [spec("cat", A=[np.ones((R, IN + 1), F32)])],
          ValueError, r"A\[0\]: expected shape \(any, 5\)"),
        ("cat", [spec("cat", A=[np.ones((0, IN), F32)], B=[np.ones((OUT, 0), F32)])],
          ValueError, r"rank 0"),
        ("cat", [spec("cat", B=[np.ones((OUT, R + 1), F32)])],
          ValueError, r"B\[0\]: expected shape \(4, 3\)"),
        ("cat", [spec("cat", A=[np.ones((R, 2 * IN), F32)[:, ::2]])],
          ValueError, r"A\[0\]: array is not C-contiguous"),
        ("cat", [spec("cat", B=[np.asfortranarray(B)])],
          ValueError, r"B\[0\]: array is not C-contiguous"),
        ("cat", [spec("cat", A=[A, A])],
          ValueError, r"A and B must be non-empty lists of the same length, got 2 and 1"),
        ("cat", [spec("cat", A=[], B=[])], ValueError, r"non-empty"),
        ("cat", [spec("cat", **{"in": -1})], ValueError, r"module 0: in: expected a size .*, got -1"),
        # beyond numpy's extents: would wrap to a negative (= any) extent if not refused
        ("cat", [spec("cat", **{"in": 2**64 - 1})], ValueError, r"in: expected a size"),
        ("cat", [spec("cat", out=2**63)], ValueError, r"out: expected a size"),
        ("cat", [spec("cat", **{"in": 5.0})],
          TypeError, r"module 0: in: expected an integer, got float"),
        ("cat", [spec("cat", out=True)],
          TypeError, r"module 0: out: expected an integer, got bool"),
        ("cat", [spec("cat", cb=[1.0, 2.0])],
          ValueError, r"cb: expected one value per adapter \(1\), got 2"),
        ("cat", [spec("cat", cb=["x"])], TypeError, r"cb: expected a list of 1 numbers"),
        ("cat", [spec("cat", cb=0.5)], TypeError, r"cb: expected a list of 1 numbers, got float"),
        ("linear", [spec("linear", wa=[])], ValueError, r"wa: expected one value per adapter"),
        ("linear", [spec("linear", A=[A, np.ones((R + 1, IN), F32)],
                         B=[B, np.ones((OUT, R + 1), F32)], cb=[1.0, 1.0], wa=[1.0, 1.0])],
         ValueError, r"linear needs equal ranks, got 3 \(A\[0\]\) and 4"),
        ("project", [spec("project", m=0)], ValueError, r"m must be >= 1"),
        ("project", [spec("project", QA=np.ones((2, R)).tolist())],
          TypeError, r"QA: expected a numpy.ndarray, got list"),
        ("project", [spec("project", PB=np.ones((R, 2), F32))],
          TypeError, r"PB: dtype float32 is not supported; pass float64"),
        ("project", [spec("project", QA=np.ones((2, R + 1), F32))],
          ValueError, r"QA: expected shape \(2, 3\)"),
        # the outputs
        ("gram", [spec("gram", GA=np.zeros((R, R)).tolist())],
          TypeError, r"GA: expected a numpy.ndarray, got list"),
        ("gram", [spec("gram", GB=np.zeros((R, R), F32))],
          TypeError, r"GB: dtype float32 is not supported; pass float64"),
        ("gram", [spec("gram", GA=np.zeros((R, R + 1)))],
          ValueError, r"GA: expected shape \(3, 3\)"),
        ("gram", [spec("gram", GA=np.zeros((R, 2 * R))[:, ::2])],
          ValueError, r"GA: array is not C-contiguous"),
        ("cat", [spec("cat", A_out=np.empty((R, IN)))],
          TypeError, r"A_out: dtype float64 is not supported; pass float32"),
        ("cat", [spec("cat", A_out=read_only(np.empty((R, IN), F32)))],
          ValueError, r"A_out: output array is read-only"),
        ("cat", [spec("cat", B_out=np.empty((OUT, R), F32).T.copy())],
          ValueError, r"B_out: expected shape \(4, 3\)"),
        ("linear", [spec("linear", A_out=np.empty(R * IN, F32))],
          ValueError, r"A_out: expected a 2-D array"),
        # outputs sharing memory with another output or an input
        ("cat", [spec("cat", A_out=buf[:15].reshape(R, IN), B_out=buf[14:26].reshape(OUT, R))],
         ValueError, r"module 0: A_out and module 0: B_out share memory"),
        ("cat", [spec("cat", A=[A], A_out=A)],
          ValueError, r"A_out and module 0: A\[0\] share memory"),
        ("cat", [spec("cat", A_out=buf[:15].reshape(R, IN)),
                 spec("cat", A_out=buf[:15].reshape(R, IN))],
         ValueError, r"module 0: A_out and module 1: A_out share memory"),
        ("project", [spec("project", QA=buf[:6].reshape(2, R), A_out=buf[4:14].reshape(2, IN))],
         ValueError, r"A_out and module 0: QA share memory"),
    ]


@pytest.mark.parametrize("op, modules, exc, match", bad_combine_cases(),
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(bad_combine_cases())])
def test_combine_op_refuses_misuse(op, modules, exc, match):
    outputs = [(s[k], s[k].copy()) for s in modules if isinstance(s, dict)
               for k in ("A_out", "B_out", "GA", "GB") if isinstance(s.get(k), np.ndarray)]
    with pytest.raises(exc, match=match):
        _core.combine_op(op, modules, 1)
    for arr, before in outputs:  # refused before anything is written
        np.testing.assert_array_equal(arr, before)


@pytest.mark.parametrize("threads", [-1, 1025, 10**6])
def test_thread_counts_out_of_range_are_refused(threads):
    # threads=100000 used to take the process down while creating the OpenMP team.
    with pytest.raises(ValueError, match=r"threads must be in \[0, 1024\]"):
        _core.combine_op("cat", [spec("cat")], threads)
    with pytest.raises(ValueError, match=r"threads must be in \[0, 1024\]"):
        _core.resolve_threads(threads)
    X = np.ones((3, 2))
    with pytest.raises(ValueError, match=r"threads must be in \[0, 1024\]"):
        _core.dist_cost(X, X, 0, np.empty((3, 3)), threads)


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match="unknown instruction-set level 'sse9'"):
        _core.set_isa("sse9")


# ------------------------------------------------------------------------------------------------
# distances


def clouds(dtype=np.float64):
    rng = np.random.default_rng(1)
    return rng.standard_normal((6, 3)).astype(dtype), rng.standard_normal((5, 3)).astype(dtype)


def w(n):
    return np.full(n, 1.0 / n)


def sink(**change):
    """dist_sinkhorn's arguments, valid, then some replaced."""
    X, Y = clouds()
    args = dict(X=X, Y=Y, a=w(6), b=w(5), eps=0.5, scaling=0.5, tol=1e-6, max_iter=1000,
                debias=True, cost=0, threads=1)
    args.update(change)
    return args


def bad_distance_cases():
    X, Y = clouds()
    X32, _ = clouds(np.float32)
    out = np.zeros((6, 5))
    buf = np.zeros(64)
    return [
        # function, kwargs, exception, message
        ("dist_cost", dict(X=X.tolist(), Y=Y, kind=0, out=out),
          TypeError, r"X: expected a numpy.ndarray, got list"),
        ("dist_cost", dict(X=X, Y=Y, kind=0, out=out.tolist()),
          TypeError, r"out: expected a numpy.ndarray, got list"),
        ("dist_cost", dict(X=X.astype(np.int64), Y=Y, kind=0, out=out),
          TypeError, r"X: dtype int64 is not supported"),
        ("dist_cost", dict(X=X.astype(">f8"), Y=Y, kind=0, out=out),
          TypeError, r"X: dtype >f8 is not supported"),
        ("dist_cost", dict(X=X32, Y=Y, kind=0, out=out),
          TypeError, r"X and Y must have the same dtype, got float32 and float64"),
        ("dist_cost", dict(X=X[:, :2].copy(), Y=Y, kind=0, out=out),
          ValueError, r"X and Y have different dimensions"),
        ("dist_cost", dict(X=X.reshape(-1), Y=Y, kind=0, out=out),
          ValueError, r"X: expected a 2-D array, got shape \(18,\)"),
        ("dist_cost", dict(X=X[None], Y=Y, kind=0, out=out),
          ValueError, r"X: expected a 2-D array"),
        ("dist_cost", dict(X=X, Y=np.asfortranarray(Y), kind=0, out=out),
          ValueError, r"Y: array is not C-contiguous"),
        ("dist_cost", dict(X=X[:0], Y=Y, kind=0, out=out[:0]), ValueError, r"X: empty point cloud"),
        ("dist_cost", dict(X=X, Y=Y, kind=3, out=out),
          ValueError, r"kind: unknown value 3; use one of 0 sqeuclidean, 1 cosine, 2 dot"),
        ("dist_cost", dict(X=X, Y=Y, kind=-1, out=out), ValueError, r"kind: unknown value -1"),
        ("dist_cost", dict(X=X, Y=Y, kind=0, out=out.astype(np.float32)),
          TypeError, r"out: dtype float32 differs"),
        ("dist_cost", dict(X=X, Y=Y, kind=0, out=out.T.copy()),
          ValueError, r"out: expected shape \(6, 5\), got \(5, 6\)"),
        ("dist_cost", dict(X=X, Y=Y, kind=0, out=np.empty((6, 10))[:, ::2]),
          ValueError, r"out: array is not C-contiguous"),
        ("dist_cost", dict(X=X, Y=Y, kind=0, out=read_only(out.copy())),
          ValueError, r"out: output array is read-only"),
        ("dist_cost", dict(X=buf[:18].reshape(6, 3), Y=Y, kind=0, out=buf[30:60].reshape(6, 5)),
          None, None),
        ("dist_cost", dict(X=buf[:18].reshape(6, 3), Y=Y, kind=0, out=buf[10:40].reshape(6, 5)),
         ValueError, r"out and X share memory"),
        ("dist_sinkhorn", sink(a=None), TypeError, r"a: weights are required"),
        ("dist_sinkhorn", sink(b=w(5).tolist()),
          TypeError, r"b: expected a numpy.ndarray, got list"),
        ("dist_sinkhorn", sink(a=w(6).astype(np.float32)),
          TypeError, r"a: dtype float32 is not supported; pass float64"),
        ("dist_sinkhorn", sink(a=w(5)), ValueError, r"a: expected shape \(6,\), got \(5,\)"),
        ("dist_sinkhorn", sink(a=w(6)[None]), ValueError, r"a: expected a 1-D array"),
        ("dist_sinkhorn", sink(cost=2),
          ValueError, r"cost: unknown value 2; use one of 0 sqeuclidean, 1 cosine"),
        ("dist_sinkhorn", sink(eps=0.0), ValueError, r"eps must be a finite number > 0"),
        ("dist_sinkhorn", sink(eps=float("inf")), ValueError, r"eps must be a finite number > 0"),
        ("dist_sinkhorn", sink(scaling=1.0), ValueError, r"scaling must be in \(0, 1\)"),
        ("dist_sinkhorn", sink(tol=float("nan")), ValueError, r"tol must be > 0"),
        ("dist_sinkhorn", sink(max_iter=0), ValueError, r"max_iter must be >= 1"),
        ("dist_sinkhorn", sink(relax=2.0), ValueError, r"relax must be in \[1, 2\)"),
        ("dist_sinkhorn", sink(X=X[:0]), ValueError, r"X: empty point cloud"),
        ("dist_sliced", dict(X=X, Y=Y, a=[1 / 6] * 6, b=None, P=X, p=2.0),
          TypeError, r"a: expected a numpy.ndarray, got list"),
        ("dist_sliced", dict(X=X, Y=Y, a=None, b=w(4), P=X, p=2.0),
          ValueError, r"b: expected shape \(5,\)"),
        ("dist_sliced", dict(X=X, Y=Y, a=None, b=None, P=X32, p=2.0),
          TypeError, r"P: dtype float32 differs"),
        ("dist_sliced", dict(X=X, Y=Y, a=None, b=None, P=X[:, :2].copy(), p=2.0),
          ValueError, r"P: expected shape \(any, 3\)"),
        ("dist_sliced", dict(X=X, Y=Y, a=None, b=None, P=X.tolist(), p=2.0),
          TypeError, r"P: expected a numpy.ndarray"),
        ("dist_sliced", dict(X=X, Y=Y, a=None, b=None, P=X, p=0.5),
          ValueError, r"p must be a finite number >= 1"),
        # an empty cloud used to crash dist_sliced
        ("dist_sliced", dict(X=X[:0], Y=Y, a=None, b=None, P=X, p=2.0),
          ValueError, r"X: empty point cloud"),
        ("dist_w1d", dict(u=[1.0, 2.0], v=np.ones(2), u_weights=None, v_weights=None),
          TypeError, r"u: expected a numpy.ndarray, got list"),
        ("dist_w1d", dict(u=np.ones((2, 1)), v=np.ones(2), u_weights=None, v_weights=None),
          ValueError, r"u: expected a 1-D array"),
        ("dist_w1d", dict(u=np.ones(2, np.float32), v=np.ones(2), u_weights=None, v_weights=None),
          TypeError, r"u: dtype float32"),
        ("dist_w1d", dict(u=np.ones(0), v=np.ones(2), u_weights=None, v_weights=None),
          ValueError, r"u and v must be non-empty"),
        ("dist_w1d", dict(u=np.ones(4)[::2], v=np.ones(2), u_weights=None, v_weights=None),
          ValueError, r"u: array is not C-contiguous"),
        ("dist_w1d", dict(u=np.ones(2), v=np.ones(2), u_weights=[1.0, 1.0], v_weights=None),
          TypeError, r"u_weights: expected a numpy.ndarray"),
        ("dist_w1d", dict(u=np.ones(2), v=np.ones(2), u_weights=None, v_weights=np.ones(3)),
          ValueError, r"v_weights: expected shape \(2,\)"),
        ("dist_w1d", dict(u=np.ones(2), v=np.ones(2), u_weights=None, v_weights=None,
                          p=float("nan")),
          ValueError, r"p must be"),
        ("dist_kernel_sums", dict(X=X, Y=Y, kind=3, params=[1.0]),
          ValueError, r"kind: unknown value 3; use one of 0 rbf, 1 multiscale, 2 sqrt"),
        ("dist_kernel_sums", dict(X=X, Y=Y, kind=2, params=[1.0]),
          ValueError, r"params: the sqrt kernel takes none"),
        ("dist_kernel_sums", dict(X=X, Y=Y, kind=0, params=[]),
          ValueError, r"params: the rbf and multiscale kernels need at least one"),
        ("dist_kernel_sums", dict(X=X.tolist(), Y=Y, kind=0, params=[1.0]),
          TypeError, r"X: expected a numpy.ndarray"),
        ("dist_kernel_sums", dict(X=X, Y=Y, kind=0, params=["a"]),
          TypeError, r"incompatible function arguments"),
    ]


@pytest.mark.parametrize("fn, kwargs, exc, match", bad_distance_cases(),
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(bad_distance_cases())])
def test_distance_bindings_refuse_misuse(fn, kwargs, exc, match):
    if exc is None:  # the control case: disjoint views of one buffer are fine
        getattr(_core, fn)(**kwargs)
        return
    with pytest.raises(exc, match=match):
        getattr(_core, fn)(**kwargs)


def test_distance_bindings_compute_with_valid_arguments():
    X, Y = clouds()
    out = np.empty((6, 5))
    _core.dist_cost(X, Y, 0, out, 2)
    np.testing.assert_allclose(out, ((X[:, None] - Y[None]) ** 2).sum(-1), rtol=1e-12, atol=1e-12)
    r = _core.dist_sinkhorn(**sink())
    assert r["converged"] and r["f"].shape == (6,) and r["g"].shape == (5,)
    assert _core.dist_sliced(X, Y, None, None, np.eye(3), 2.0, 1).shape == (3,)
    assert _core.dist_w1d(np.array([0.0, 1.0]), np.array([1.0, 2.0]), None, None, 1.0) == 1.0
    sxx, syy, sxy = _core.dist_kernel_sums(X, Y, 2, [], 1)
    ref = np.sqrt(((X[:, None] - Y[None]) ** 2).sum(-1)).sum()
    np.testing.assert_allclose(sxy, ref, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# An exception inside an OpenMP region


EXCEPTION_IN_REGION = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from metalora import _core

    def address_space():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))

    case = sys.argv[1]
    if case == "distances":
        # Each task of the Y x Y block allocates its 48 x m block of distances (1.5 GB).
        X = np.zeros((96, 1), np.float32)
        Y = np.zeros((1 << 23, 1), np.float32)
        warm = lambda: _core.dist_kernel_sums(X, X, 2, [], 2)
        call = lambda: _core.dist_kernel_sums(X, Y, 2, [], 2)
    else:
        # One adapter listed 1024 times: R = 2^20, and each task over 128 rows of B gathers them
        # into a 128 x R float64 block (1 GB).
        K, r, out = 1024, 1024, 256
        A, B = np.ones((r, 1), np.float32), np.ones((out, r), np.float32)
        def spec(R):
            return {"A": [A] * (R // r), "B": [B] * (R // r), "in": 1, "out": out,
                    "cb": [1.0] * (R // r), "m": 1, "QA": np.ones((1, R), np.float32),
                    "PB": np.ones((R, 1)), "A_out": np.empty((1, 1), np.float32),
                    "B_out": np.empty((out, 1), np.float32)}
        big = spec(K * r)
        warm = lambda: _core.combine_op("project", [spec(8 * r)], 2)
        call = lambda: _core.combine_op("project", [big], 2)
    warm()  # the OpenMP threads exist before the limit
    resource.setrlimit(resource.RLIMIT_AS, (address_space() + (512 << 20), resource.RLIM_INFINITY))
    try:
        call()
    except MemoryError:
        print("MemoryError")
    else:
        print("no error")
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is enforced on Linux")
@pytest.mark.parametrize("family", ["distances", "combine"])
def test_exception_inside_a_parallel_region_becomes_a_python_exception(family):
    """A task that cannot allocate its buffer throws std::bad_alloc on an OpenMP thread; it used
    to end the process (std::terminate), it must reach Python as MemoryError."""
    proc = subprocess.run([sys.executable, "-c", EXCEPTION_IN_REGION, family],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.strip() == "MemoryError", proc.stdout + proc.stderr
