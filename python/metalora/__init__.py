"""metalora: a new LoRA adapter for a task, on a CPU, without gradient training.

Data flow, one module each::

    datasets / embed / tokens / signatures   dataset -> signature (cached)
    distances                                 signature x bank signatures -> d[j]
    coefficients                              d -> mixing weights w[j]
    combine                                   bank factors x w -> new factors (C++ kernels)
    adapter / bank                            PEFT adapters on disk, read and written
    generate                                  all of the above, end to end

The native kernels live in ``metalora._core`` (SIMD with run-time dispatch, OpenMP).
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._dispatch import LEVELS, capabilities, set_isa, use_isa

# dataset -> signature (onnxruntime and tokenizers are imported on first use)
from .datasets import Dataset, DatasetError, load_dataset
from .embed import Embedder, ModelNotInstalledError, TruncationWarning, embed
from .tokens import TokenSignature, token_signature
from .signatures import SignatureCache, signature

# signature -> distances
from .distances import (METRICS, ConvergenceWarning, cost_matrix, distances, energy_distance,
                        entropic_ot, gaussian_w2, js_divergence, kl_divergence, mean_cosine, mmd,
                        pairwise_distances, random_projections, sinkhorn_divergence,
                        sliced_wasserstein, token_histogram, token_mmd, wasserstein_1d)

# distances -> coefficients
from .coefficients import OPERATORS, NeuralOperator, coefficients, select_temperature

# coefficients x bank -> combined factors -> adapter
from .combine import MODES, combine, combine_modules
from .adapter import Adapter, AdapterError, load_adapter
from .bank import Bank, BankError, combine_adapters

# end to end
from .generate import Generation, generate

__all__ = [
    "__version__", "LEVELS", "capabilities", "set_isa", "use_isa",
    "Dataset", "DatasetError", "load_dataset", "Embedder", "ModelNotInstalledError",
    "TruncationWarning", "embed", "TokenSignature", "token_signature", "SignatureCache",
    "signature",
    "METRICS", "ConvergenceWarning", "cost_matrix", "distances", "energy_distance", "entropic_ot",
    "gaussian_w2", "js_divergence", "kl_divergence", "mean_cosine", "mmd", "pairwise_distances",
    "random_projections", "sinkhorn_divergence", "sliced_wasserstein", "token_histogram",
    "token_mmd", "wasserstein_1d",
    "OPERATORS", "NeuralOperator", "coefficients", "select_temperature",
    "MODES", "combine", "combine_modules", "Adapter", "AdapterError", "load_adapter", "Bank",
    "BankError", "combine_adapters",
    "Generation", "generate",
]
