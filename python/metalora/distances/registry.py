"""The metric registry: one :class:`Metric` record per metric, looked up by name.

A record says everything the bank paths (:func:`metalora.distances`,
:func:`metalora.pairwise_distances`, :func:`metalora.generate`) need to know about a metric:
what it reads (its :class:`MetricKind`: an embedding cloud, token ids or a token histogram, and
how that is made from a dataset signature), whether it is symmetric, its single-pair function, the
options it accepts (their defaults are those of the pair function), the ones ``generate`` records
explicitly, and optionally a bank path of its own (per-signature statistics computed once,
vectorised matrices). Each family module of this package registers its records at import.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from .._registry import Registry
from ..tokens import TokenSignature
from ._validate import as_cloud, as_density, as_sample1d

__all__ = ["Metric", "MetricKind", "METRICS", "POINT_CLOUD", "TOKEN_IDS", "TOKEN_HISTOGRAM",
           "get_metric", "register_metric", "unregister_metric"]

#: ``f(x, y, threads) -> float``: one pair with the metric's options bound.
PairFunction = Callable[[Any, Any, int], float]
#: ``bank(rows, cols, options, threads, progress, row_range=None) -> ndarray [len(rows),
#: len(cols)]`` (``cols`` None: the rows against themselves; ``row_range`` ``(a, b)``: only
#: those rows of that matrix, bit-identical to them, NaN where the whole matrix would mirror a
#: pair computed in another row); inputs already checked by the metric's kind.
BankFunction = Callable[..., np.ndarray]


@dataclass(frozen=True)
class MetricKind:
    """What a metric reads.

    Attributes
    ----------
    name : str
        ``"cloud"`` (a point cloud ``[n, d]``), ``"tokens"`` (a 1-D sample of token ids) or
        ``"histogram"`` (a histogram over the vocabulary).
    signature : str
        The kind of dataset signature it is made from (``metalora.signature(kind=...)``):
        ``"embedding"`` or ``"tokens"``.
    convert : callable
        Dataset signature (an embedding array or a :class:`metalora.TokenSignature`) -> what the
        metric reads.
    check : callable
        ``check(x, what)``: one input checked and converted for the kernels (``what`` names it in
        error messages).
    """

    name: str
    signature: str
    convert: Callable[[Any], Any] = field(repr=False)
    check: Callable[[Any, str], np.ndarray] = field(repr=False)


def _token_signature(sig: Any) -> TokenSignature:
    if not isinstance(sig, TokenSignature):
        raise TypeError(f"token metrics read a TokenSignature (metalora.signature(..., "
                        f"kind='tokens')), got {type(sig).__name__}")
    return sig


POINT_CLOUD = MetricKind("cloud", "embedding", lambda sig: sig, as_cloud)
TOKEN_IDS = MetricKind("tokens", "tokens", lambda sig: _token_signature(sig).ids,
                       as_sample1d)
TOKEN_HISTOGRAM = MetricKind("histogram", "tokens",
                             lambda sig: _token_signature(sig).histogram(density=True),
                             as_density)


@dataclass(frozen=True)
class Metric:
    """One distance between datasets, as the bank paths use it.

    Attributes
    ----------
    name : str
        What ``metric=`` / ``distance=`` / ``--distance`` take.
    kind : MetricKind
        What it reads (:data:`POINT_CLOUD`, :data:`TOKEN_IDS`, :data:`TOKEN_HISTOGRAM`).
    pair : callable
        The public single-pair function ``pair(x, y, **options)`` (and ``threads=`` when it takes
        one); the bank paths call it for every pair unless ``bank`` is given.
    symmetric : bool
        ``pair(x, y)`` and ``pair(y, x)`` estimate the same value: a bank against itself is
        computed once per unordered pair and mirrored.
    options : tuple of str
        The options it accepts through the bank paths, each a keyword parameter of ``pair``
        whose default is the option's default (:attr:`defaults`).
    pinned : tuple of str
        Options that :func:`metalora.generate` always passes, with their defaults, so that the
        adapter's provenance records them (e.g. Sinkhorn's ``eps``).
    bank : callable, optional
        ``bank(rows, cols, options, threads, progress, row_range=None)`` returns the matrix ``[len(rows),
        len(cols)]`` (``cols`` None: ``rows`` against themselves) in place of one ``pair`` call per
        pair: for statistics computed once per signature, self terms shared between pairs or
        vectorised formulas. It must agree with ``pair``.
    """

    name: str
    kind: MetricKind
    pair: Callable[..., float] = field(repr=False)
    symmetric: bool
    options: Tuple[str, ...] = ()
    pinned: Tuple[str, ...] = ()
    bank: Optional[BankFunction] = field(default=None, repr=False)
    #: option -> default, read from ``pair``'s signature
    defaults: Mapping[str, Any] = field(init=False, repr=False, compare=False)
    #: whether ``pair`` takes ``threads=``
    threaded: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        params = inspect.signature(self.pair).parameters
        defaults = {}
        for name in self.options:
            p = params.get(name)
            if p is None or p.default is inspect.Parameter.empty or name == "threads":
                raise TypeError(f"metric {self.name!r}: option {name!r} is not a keyword "
                                f"parameter with a default of {self.pair.__name__}()")
            defaults[name] = p.default
        extra = sorted(set(self.pinned) - set(self.options))
        if extra:
            raise TypeError(f"metric {self.name!r}: pinned options {extra} are not among its "
                            f"options {self.options}")
        object.__setattr__(self, "options", tuple(self.options))
        object.__setattr__(self, "pinned", tuple(self.pinned))
        object.__setattr__(self, "defaults", MappingProxyType(defaults))
        object.__setattr__(self, "threaded", "threads" in params)

    def check_options(self, options: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        """``options`` as a dict; an option the metric does not take raises a ``TypeError`` that
        lists the ones it takes."""
        options = dict(options or {})
        unknown = [k for k in options if k not in self.defaults]
        if unknown:
            pair_params = inspect.signature(self.pair).parameters
            parts = []
            for k in unknown:
                close = difflib.get_close_matches(k, self.options, n=1)
                if close:
                    parts.append(f"{k!r} (did you mean {close[0]!r}?)")
                elif k in pair_params:
                    parts.append(f"{k!r} ({self.pair.__name__}() takes it, for a single pair)")
                else:
                    parts.append(repr(k))
            takes = (f"its options (with defaults): "
                     f"{', '.join(f'{k}={v!r}' for k, v in self.defaults.items())}"
                     if self.defaults else "it takes no options")
            raise TypeError(f"metric {self.name!r} does not take option {', '.join(parts)}; "
                            f"{takes}")
        return options

    def generate_options(self, extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """What :func:`metalora.generate` passes: the :attr:`pinned` options with their
        defaults, updated by ``extra`` (checked)."""
        return {**{k: self.defaults[k] for k in self.pinned}, **self.check_options(extra)}

    def bind(self, options: Mapping[str, Any]) -> PairFunction:
        """``f(x, y, threads)``: :attr:`pair` with ``options`` bound."""
        fn, opts = self.pair, dict(options)
        if self.threaded:
            return lambda x, y, threads: fn(x, y, threads=threads, **opts)
        return lambda x, y, threads: fn(x, y, **opts)


#: name -> :class:`Metric`, in registration order (what ``--distance`` lists).
METRICS: Registry[Metric] = Registry("metric", "metric", Metric)


def register_metric(metric: Metric, *, replace: bool = False) -> Metric:
    """Add ``metric`` to :data:`METRICS` (``replace=True`` to redefine a name); returns it."""
    return METRICS.register(metric, replace=replace)


def unregister_metric(name: str) -> Metric:
    """Remove a metric from :data:`METRICS`; returns its record."""
    return METRICS.unregister(name)


def get_metric(name: Any, what: str = "metric") -> Metric:
    """The record of metric ``name``; a ``ValueError`` lists the valid names (``what`` is the
    argument's name in the message)."""
    return METRICS.lookup(name, what)
