"""The shape every extension point shares: records looked up by name, in registration order.

Metrics (:data:`metalora.distances.METRICS`), combine modes (:data:`metalora.combine.MODES`) and
output formats (:data:`metalora.writers.WRITERS`) are each a :class:`Registry` of frozen records
with a ``name``; what a record holds is the extension point's own business.
"""

from __future__ import annotations

from typing import Any, Dict, TypeVar

R = TypeVar("R")

__all__ = ["Registry"]


class Registry(Dict[str, R]):
    """A ``dict`` name -> record with checked registration and a lookup that lists the names.

    Parameters
    ----------
    kind : str
        What a record is, for messages ("metric", "combine mode", "output format").
    arg : str
        The argument that names one (``metric``, ``mode``, ``format``), for messages.
    record_type : type
        Records must be instances of it.
    """

    def __init__(self, kind: str, arg: str, record_type: type):
        super().__init__()
        self.kind, self.arg, self.record_type = kind, arg, record_type

    def register(self, record: R, *, replace: bool = False) -> R:
        """Add ``record`` under its name (``replace=True`` to redefine a name); returns it."""
        if not isinstance(record, self.record_type):
            raise TypeError(f"a {self.kind} must be a {self.record_type.__name__}, got "
                            f"{type(record).__name__}")
        name = record.name  # type: ignore[attr-defined]
        if name in self and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered; pass replace=True to "
                             f"redefine it")
        self[name] = record
        return record

    def lookup(self, name: Any, what: str = "") -> R:
        """The record called ``name``; a ValueError lists the names (``what``: the argument's
        name in the message, default ``arg``)."""
        try:
            return self[name]
        except (KeyError, TypeError):
            raise ValueError(f"{what or self.arg}={name!r} is not one of {tuple(self)}") from None

    def unregister(self, name: str) -> R:
        """Remove a record; returns it."""
        return self.pop(self.lookup(name).name)  # type: ignore[attr-defined]
