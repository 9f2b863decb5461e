r"""Meta-operators: from a row of distances to mixing coefficients over the bank.

A row ``d`` holds the distance from the new dataset to the dataset of each bank adapter. Every
operator returns weights :math:`w \ge 0` with :math:`\sum_j w_j = 1`:

``attentional``
    :math:`w = \mathrm{softmin}(d/\tau)`, :math:`w_j = e^{-d_j/\tau} / \sum_k e^{-d_k/\tau}`.
``normalized``
    standardise the row, :math:`z = (d - \bar d)/\sigma_d` (population std), then
    :math:`w = \mathrm{softmin}(z/\tau)`. Insensitive to the scale of the distance.
``neural``
    :math:`w = \mathrm{softmin}(g(z)/\tau)` with :math:`g` a small scalar MLP applied to every
    standardised distance, trained leave-one-out on the bank (see :class:`NeuralOperator`).

Options on all of them: ``top_k`` keeps the k largest weights and renormalises; ``exclude``
removes entries (leave-one-out); ``tau`` is the temperature, or choose it with
:func:`select_temperature`, which minimises the leave-one-out reconstruction error of the bank
in parameter space.

Leave-one-out error in parameter space: with :math:`\theta_i` all of adapter i's LoRA entries
flattened and :math:`G_{ij} = \langle\theta_i, \theta_j\rangle`, predicting
:math:`\hat\theta_i = \sum_{j\ne i} w_{ij}\theta_j` costs
:math:`\|\theta_i - \hat\theta_i\|^2 = G_{ii} - 2 w_i^T G_{:,i} + w_i^T G w_i`, so only the
bank's Gram matrix is needed, never the parameters themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ._io import positive_int

__all__ = [
    "OPERATORS",
    "coefficients",
    "softmin",
    "standardize",
    "loo_weights",
    "loo_errors",
    "select_temperature",
    "NeuralOperator",
]

OPERATORS = ("attentional", "normalized", "neural")


def _row(d: object, what: str = "distances") -> np.ndarray:
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D array, got shape {d.shape}")
    if np.isnan(d).any():
        raise ValueError(f"{what}[{int(np.flatnonzero(np.isnan(d))[0])}] is NaN; recompute the "
                         f"distances (a NaN usually means an empty or non-finite signature)")
    return d


def softmin(d: np.ndarray, tau: float = 1.0) -> np.ndarray:
    r"""Numerically stable :math:`e^{-d_j/\tau}/\sum_k e^{-d_k/\tau}`; ``+inf`` entries get 0."""
    d = np.asarray(d, dtype=np.float64)
    finite = np.isfinite(d)
    if not finite.any():
        raise ValueError("every distance is infinite (all entries excluded?)")
    x = np.where(finite, -(d - d[finite].min()) / tau, -np.inf)
    e = np.exp(x)
    return e / e.sum()


def standardize(d: np.ndarray) -> np.ndarray:
    """``(d - mean) / std`` over the finite entries (population std); a constant row gives 0."""
    d = np.asarray(d, dtype=np.float64)
    finite = np.isfinite(d)
    z = np.full_like(d, np.inf)
    v = d[finite]
    if v.size == 0:
        return z
    sd = v.std()
    z[finite] = (v - v.mean()) / sd if sd > 0 else 0.0
    return z


def _top_k(w: np.ndarray, k: int | None) -> np.ndarray:
    if k is None or k >= np.count_nonzero(w):
        return w
    keep = np.argsort(-w, kind="stable")[:k]
    out = np.zeros_like(w)
    out[keep] = w[keep]
    return out / out.sum()


def coefficients(distances: Sequence[float], *, operator: str = "normalized", tau: float = 1.0,
                 top_k: int | None = None, exclude: Sequence[int] = (),
                 model: "NeuralOperator | None" = None) -> np.ndarray:
    r"""Mixing coefficients over the bank from one row of distances.

    Parameters
    ----------
    distances : array [n_bank]
        Distance from the new dataset to each bank adapter's dataset (smaller = closer).
    operator : {"attentional", "normalized", "neural"}
        See the module docstring for the formulas.
    tau : float
        Temperature :math:`\tau > 0`: small values concentrate on the nearest adapters.
    top_k : int, optional
        Keep only the k largest coefficients and renormalise (ties broken by bank order).
    exclude : sequence of int
        Indices that get weight 0 (leave-one-out: the adapter's own index).
    model : NeuralOperator
        Required for ``operator="neural"``.

    Returns
    -------
    ndarray [n_bank]
        Non-negative weights summing to 1.
    """
    d = _row(distances).copy()
    if operator not in OPERATORS:
        raise ValueError(f"operator={operator!r} is not one of {OPERATORS}")
    if not (isinstance(tau, (int, float, np.floating)) and np.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive finite number, got {tau!r}")
    top_k = positive_int(top_k, "top_k", allow_none=True)
    for i in exclude:
        d[int(i)] = np.inf
    if operator == "attentional":
        w = softmin(d, tau)
    else:
        z = standardize(d)
        if operator == "neural":
            if model is None:
                raise ValueError("operator='neural' needs model=NeuralOperator (train one with "
                                 "NeuralOperator.fit or load one with NeuralOperator.load)")
            finite = np.isfinite(z)
            z[finite] = model(z[finite])
        w = softmin(z, tau)
    return _top_k(w, top_k)


def loo_weights(D: np.ndarray, **options) -> np.ndarray:
    """Leave-one-out coefficients for every bank adapter: row i from D[i] without entry i."""
    D = np.asarray(D, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1] or D.shape[0] < 2:
        raise ValueError(f"D must be a square bank-vs-bank distance matrix with n >= 2, got {D.shape}")
    return np.stack([coefficients(D[i], exclude=[i], **options) for i in range(D.shape[0])])


def loo_errors(W: np.ndarray, G: np.ndarray) -> np.ndarray:
    r"""Relative leave-one-out errors :math:`\|\theta_i-\sum_j W_{ij}\theta_j\|^2/\|\theta_i\|^2`.

    ``G`` is the bank's parameter Gram matrix; ``W`` has zero diagonal.
    """
    W = np.asarray(W, dtype=np.float64)
    G = np.asarray(G, dtype=np.float64)
    if np.any(np.diag(W) != 0):
        raise ValueError("leave-one-out weights must not use the adapter itself (W[i, i] != 0)")
    diag = np.diag(G)
    err = diag - 2 * np.einsum("ij,ji->i", W, G) + np.einsum("ij,jk,ik->i", W, G, W)
    return np.maximum(err, 0.0) / np.where(diag > 0, diag, 1.0)


def select_temperature(D: np.ndarray, G: np.ndarray, *, operator: str = "normalized",
                       top_k: int | None = None, model: "NeuralOperator | None" = None,
                       taus: Sequence[float] | None = None, log: bool = False):
    r"""Choose :math:`\tau` by leave-one-out on the bank.

    For each candidate :math:`\tau` every bank adapter is predicted from the others with the
    operator's coefficients, and the mean relative parameter-space error (:func:`loo_errors`)
    is computed; the :math:`\tau` with the smallest error wins. The grid is log-spaced
    (default 0.01 … 100, 9 points per decade) and then refined by golden-section search
    between the winner's neighbours.

    Returns
    -------
    tau : float
    curve : dict, only with ``log=True``: ``taus`` and ``errors`` evaluated.
    """
    grid = np.geomspace(0.01, 100.0, 37) if taus is None else np.asarray(taus, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0 or np.any(grid <= 0):
        raise ValueError("taus must be a non-empty list of positive temperatures")
    seen: dict = {}

    def err(tau: float) -> float:
        if tau not in seen:
            W = loo_weights(D, operator=operator, tau=tau, top_k=top_k, model=model)
            seen[tau] = float(np.mean(loo_errors(W, G)))
        return seen[tau]

    values = [err(float(t)) for t in grid]
    best = int(np.argmin(values))
    if taus is None and 0 < best < grid.size - 1:
        lo, hi = np.log(grid[best - 1]), np.log(grid[best + 1])
        g = (np.sqrt(5) - 1) / 2
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        for _ in range(20):
            if err(float(np.exp(a))) < err(float(np.exp(b))):
                hi, b = b, a
                a = hi - g * (hi - lo)
            else:
                lo, a = a, b
                b = lo + g * (hi - lo)
    tau = min(seen, key=seen.get)
    if log:
        ts = np.array(sorted(seen))
        return tau, {"taus": ts, "errors": np.array([seen[t] for t in ts])}
    return tau


class NeuralOperator:
    r"""The paper's neural meta-operator: :math:`w_i = \mathrm{softmin}(g(z_i))` with a scalar MLP g.

    ``g: R -> R`` is applied elementwise to the standardised distances of a row (one hidden
    layer of ``hidden`` tanh units plus a linear skip term, :math:`g(z) = a z + c + V
    \tanh(U z + b)`). It is trained leave-one-out on the bank with full-batch Adam on the mean
    relative parameter-space error (:func:`loo_errors`), using torch (the ``torch`` extra),
    and exported to ONNX; running it needs ONNX Runtime only.
    """

    def __init__(self, onnx_bytes: bytes, meta: dict | None = None):
        import onnxruntime as ort

        self.onnx_bytes = onnx_bytes
        self.meta = dict(meta or {})
        #: float32 parameters U, b, V, a, c of g (set by :meth:`fit`; None after :meth:`load`).
        self.weights: dict | None = None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self._session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def __call__(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=np.float32).reshape(-1, 1)
        (g,) = self._session.run(None, {self._input: z})
        return np.asarray(g, dtype=np.float64).reshape(-1)

    @classmethod
    def fit(cls, D: np.ndarray, G: np.ndarray, *, hidden: int = 16, epochs: int = 400,
            lr: float = 0.02, top_k: int | None = None, seed: int = 0,
            progress: Callable[[int, float], None] | None = None) -> "NeuralOperator":
        """Train g leave-one-out on a bank (D: bank x bank distances, G: parameter Gram)."""
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("training the neural operator needs torch: pip install "
                              "'metalora[torch]' (on CPU-only machines: pip install "
                              "torch==2.13.0 first)") from exc
        D = np.asarray(D, dtype=np.float64)
        n = D.shape[0]
        if D.shape != (n, n) or n < 3:
            raise ValueError(f"D must be a square bank-vs-bank matrix with n >= 3, got {D.shape}")
        Z = np.stack([standardize(np.where(np.eye(n, dtype=bool)[i], np.inf, D[i])) for i in range(n)])
        mask = np.isfinite(Z)
        torch.manual_seed(seed)
        Zt = torch.tensor(np.where(mask, Z, 0.0), dtype=torch.float64)
        Mt = torch.tensor(mask)
        Gt = torch.tensor(np.asarray(G, dtype=np.float64))
        diag = torch.clamp(torch.diagonal(Gt), min=1e-30)
        U = torch.nn.Parameter(torch.randn(hidden, dtype=torch.float64) * 0.5)
        b = torch.nn.Parameter(torch.randn(hidden, dtype=torch.float64) * 0.5)
        V = torch.nn.Parameter(torch.zeros(hidden, dtype=torch.float64))
        a = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
        c = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
        params = [U, b, V, a, c]
        opt = torch.optim.Adam(params, lr=lr)

        def loss_fn():
            g = a * Zt + c + torch.tanh(Zt[..., None] * U + b) @ V
            logits = torch.where(Mt, -g, torch.tensor(-torch.inf, dtype=torch.float64))
            W = torch.softmax(logits, dim=1)
            if top_k is not None and top_k < n - 1:
                keep = torch.zeros_like(W, dtype=torch.bool).scatter(1, torch.topk(W, top_k, dim=1).indices, True)
                W = torch.where(keep, W, torch.zeros_like(W))
                W = W / W.sum(dim=1, keepdim=True)
            err = torch.diagonal(Gt) - 2 * (W * Gt.T).sum(1) + ((W @ Gt) * W).sum(1)
            return (err / diag).mean()

        for epoch in range(epochs):
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            opt.step()
            if progress is not None:
                progress(epoch, float(loss.detach()))
        with torch.no_grad():
            final = float(loss_fn())
        weights = {k: p.detach().numpy().astype(np.float32) for k, p in zip("UbVac", params)}
        meta = {"hidden": hidden, "epochs": epochs, "lr": lr, "seed": seed, "top_k": top_k,
                "loo_error": final, "n_bank": n}
        op = cls(_mlp_onnx(weights), meta)
        op.weights = weights
        return op

    def save(self, path: str | Path) -> None:
        """Write ``<path>`` (ONNX) and ``<path>.json`` (training metadata) atomically."""
        from ._io import atomic_write

        path = Path(path)
        atomic_write(path, self.onnx_bytes)
        atomic_write(path.with_suffix(path.suffix + ".json"), json.dumps(self.meta, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "NeuralOperator":
        """Load an operator written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no neural operator here (train one with "
                                    f"NeuralOperator.fit(...).save(path))")
        meta_path = path.with_suffix(path.suffix + ".json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        return cls(path.read_bytes(), meta)


def _mlp_onnx(w: dict) -> bytes:
    """ONNX graph of g(z) = a z + c + tanh(z U + b) V for z of shape [N, 1]."""
    from onnx import TensorProto, helper, numpy_helper

    H = w["U"].size
    inits = [
        numpy_helper.from_array(w["U"].reshape(1, H), "U"),
        numpy_helper.from_array(w["b"].reshape(H), "b"),
        numpy_helper.from_array(w["V"].reshape(H, 1), "V"),
        numpy_helper.from_array(np.asarray(w["a"], np.float32).reshape(1, 1), "a"),
        numpy_helper.from_array(np.asarray(w["c"], np.float32).reshape(1), "c"),
    ]
    nodes = [
        helper.make_node("MatMul", ["z", "U"], ["zu"]),
        helper.make_node("Add", ["zu", "b"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["h"]),
        helper.make_node("MatMul", ["h", "V"], ["hv"]),
        helper.make_node("MatMul", ["z", "a"], ["az"]),
        helper.make_node("Add", ["az", "c"], ["lin"]),
        helper.make_node("Add", ["lin", "hv"], ["g"]),
    ]
    graph = helper.make_graph(
        nodes, "metalora_neural_operator",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("g", TensorProto.FLOAT, ["N", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="metalora")
    model.ir_version = 8
    return model.SerializeToString()
