"""metalora: a new LoRA adapter for a task, on a CPU, without gradient training.

Data flow, one module each::

    datasets / embed / tokens / signatures   dataset -> signature (cached)
    distances                                 signature x bank signatures -> d[j]
    coefficients                              d -> mixing weights w[j]
    combine                                   bank factors x w -> new factors (C++ kernels)
    adapter / bank                            PEFT adapters on disk, read and written
    generate                                  all of the above, end to end

The native kernels live in ``metalora._core`` (SIMD with run-time dispatch, run on a
task pool capped by the idle cores).
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._dispatch import LEVELS, capabilities, set_isa, use_isa

# dataset -> signature (onnxruntime and tokenizers are imported on first use)
from .datasets import Dataset, DatasetError, load_dataset
from .embed import Embedder, ModelNotInstalledError, TruncationWarning, embed
from .tokens import TokenSignature, token_signature
from .signatures import SignatureCache, signature

# signature -> distances: METRICS (the registry), distances / pairwise_distances, the
# single-pair functions (sinkhorn_divergence, mmd, kl_divergence, ...)
from .distances import *  # noqa: F401,F403
from .distances import __all__ as _distance_names

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
    *_distance_names,
    "OPERATORS", "NeuralOperator", "coefficients", "select_temperature",
    "MODES", "combine", "combine_modules", "Adapter", "AdapterError", "load_adapter", "Bank",
    "BankError", "combine_adapters",
    "Generation", "generate",
]
