"""metalora: a new LoRA adapter for a task, on a CPU, without gradient training.

Data flow: dataset -> signature -> distances -> coefficients -> combine -> adapter.
This package holds the native kernels (``metalora._core``) and the Python layer around them.
"""

from __future__ import annotations

from ._dispatch import LEVELS, capabilities, set_isa, use_isa
from .coefficients import OPERATORS, NeuralOperator, coefficients, select_temperature
from .combine import MODES, combine, combine_modules
from .adapter import Adapter, AdapterError, load_adapter
from .bank import Bank, BankError, combine_adapters
# dataset -> signature (issue 4); onnxruntime/tokenizers are imported on first use
from .datasets import Dataset, DatasetError, load_dataset
from .embed import Embedder, ModelNotInstalledError, TruncationWarning, embed
from .signatures import SignatureCache, signature
from .tokens import TokenSignature, token_signature
from .distances import (METRICS, ConvergenceWarning, cost_matrix, distances, energy_distance,
                        entropic_ot, gaussian_w2, js_divergence, kl_divergence, mean_cosine, mmd,
                        pairwise_distances, random_projections, sinkhorn_divergence,
                        sliced_wasserstein, token_histogram, token_mmd, wasserstein_1d)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "LEVELS",
    "MODES",
    "OPERATORS",
    "NeuralOperator",
    "coefficients",
    "select_temperature",
    "capabilities",
    "combine",
    "combine_modules",
    "set_isa",
    "use_isa",
    "Adapter",
    "AdapterError",
    "load_adapter",
    "Bank",
    "BankError",
    "combine_adapters",
    # signatures (issue 4)
    "Dataset",
    "DatasetError",
    "Embedder",
    "ModelNotInstalledError",
    "SignatureCache",
    "TokenSignature",
    "TruncationWarning",
    "embed",
    "load_dataset",
    "signature",
    "token_signature",
    # distances
    "METRICS", "ConvergenceWarning", "cost_matrix", "distances", "energy_distance", "entropic_ot",
    "gaussian_w2", "js_divergence", "kl_divergence", "mean_cosine", "mmd", "pairwise_distances",
    "random_projections", "sinkhorn_divergence", "sliced_wasserstein", "token_histogram",
    "token_mmd", "wasserstein_1d",
]
