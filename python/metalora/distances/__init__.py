r"""Distances between datasets: point clouds (embeddings) and token-id signatures.

A dataset is a discrete measure: a point cloud :math:`X = \{x_i\}_{i<n} \subset \mathbb{R}^d`
with weights :math:`a` (uniform unless given), or for the paper's token distances
(arXiv:2507.01806) a 1-D sample of token ids and its histogram over the vocabulary.

Conventions
-----------
* Arrays are positional, options keyword-only; ``threads=0`` uses every core; ``log=True``
  returns a dict of diagnostics as the last element of a tuple.
* Point clouds are ``[n, d]`` arrays (a 1-D array is read as ``[n, 1]``). float32 and float64
  are computed in their own precision (float32 is the fast path: cost matrices and Sinkhorn
  iterations in float32, every reduction accumulated in float64); other real dtypes are
  converted to float64, and a non-contiguous array is copied once.
* The ground cost is :math:`C_{ij} = \|x_i - y_j\|^2` (squared Euclidean, *not* halved) unless
  ``cost="cosine"`` (:math:`1 - \cos(x_i, y_j)`).
* NaN/Inf values, empty clouds, mismatched dimensions, non-positive ``eps`` and invalid weights
  raise ``ValueError`` with a message that says which argument is wrong.

POT and SciPy are not needed at run time; the tests compare against them.

Layout
------
One module per family of metrics, each with its single-pair functions and the :class:`Metric`
records it registers (:mod:`.registry`): ``ot`` (cost matrix, Sinkhorn), ``sliced``,
``kernel`` (MMD, energy), ``moments`` (Gaussian W2, cosine of means), ``tokens`` (the paper's
token metrics). ``api`` applies a record to a bank (:func:`distances`,
:func:`pairwise_distances`, :func:`distance_matrix`); ``_validate`` holds the argument checks.

Adding a metric
---------------
Write its single-pair function ``f(x, y, *, option=default, ..., threads=0)`` in its family's
module (or a new module imported below), add it to that module's ``__all__``, and register its
record there::

    register_metric(Metric(name="my_metric", kind=POINT_CLOUD, pair=f, symmetric=True,
                           options=("option",)))

``metric="my_metric"`` then works in :func:`distances`, :func:`pairwise_distances`,
:func:`distance_matrix` and ``metalora.generate(distance="my_metric")`` (and, for a metric of
these modules, ``metalora generate --distance``); ``f`` is exported here and from
:mod:`metalora`. A test registers a toy metric this way (``tests/test_distances_registry.py``).
"""

# The families register their metrics on import, in this order (the order of METRICS).
from .ot import *  # noqa: F401,F403
from .sliced import *  # noqa: F401,F403
from .kernel import *  # noqa: F401,F403
from .moments import *  # noqa: F401,F403
from .tokens import *  # noqa: F401,F403
from .api import *  # noqa: F401,F403
from .registry import *  # noqa: F401,F403
from . import api, kernel, moments, ot, registry, sliced, tokens
from .kernel import MULTISCALE_SCALES, RBF_BANDWIDTHS  # noqa: F401

__all__ = [*ot.__all__, *sliced.__all__, *kernel.__all__, *moments.__all__, *tokens.__all__,
           *api.__all__, *registry.__all__]
