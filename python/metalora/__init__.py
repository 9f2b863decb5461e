"""metalora: a new LoRA adapter for a task, on a CPU, without gradient training.

Data flow: dataset -> signature -> distances -> coefficients -> combine -> adapter.
This package holds the native kernels (``metalora._core``) and the Python layer around them.
"""

from __future__ import annotations

from ._dispatch import LEVELS, capabilities, set_isa, use_isa
from .combine import MODES, combine, combine_modules
from .distances import (METRICS, ConvergenceWarning, cost_matrix, distances, energy_distance,
                        entropic_ot, gaussian_w2, js_divergence, kl_divergence, mean_cosine, mmd,
                        pairwise_distances, random_projections, sinkhorn_divergence,
                        sliced_wasserstein, token_histogram, token_mmd, wasserstein_1d)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "LEVELS",
    "MODES",
    "capabilities",
    "combine",
    "combine_modules",
    "set_isa",
    "use_isa",
    # distances
    "METRICS", "ConvergenceWarning", "cost_matrix", "distances", "energy_distance", "entropic_ot",
    "gaussian_w2", "js_divergence", "kl_divergence", "mean_cosine", "mmd", "pairwise_distances",
    "random_projections", "sinkhorn_divergence", "sliced_wasserstein", "token_histogram",
    "token_mmd", "wasserstein_1d",
]
