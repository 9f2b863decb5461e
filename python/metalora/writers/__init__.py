"""Output formats for adapters: one :class:`Writer` each, picked by name.

``Adapter.save(path, format="peft")`` looks the format up here. Every writer fills a fresh
temporary directory; :func:`publish_directory` then moves it into place atomically, so readers
see the old output or the complete new one, and a failure leaves nothing behind. To add a format,
write its module beside ``peft.py`` and :func:`register` a :class:`Writer` there (and import the
module at the bottom of this file).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, FrozenSet

from .._io import fsync_dir, process_umask
from .._registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter

__all__ = ["Writer", "WRITERS", "register", "get_writer", "save_adapter", "publish_directory"]


@dataclass(frozen=True)
class Writer:
    """An output format.

    Attributes
    ----------
    name : str
        The ``format=`` value (and ``metalora generate --format`` choice).
    summary : str
        One line: what reads this format.
    write : callable ``(adapter, directory, **options) -> None``
        Writes the adapter's files into ``directory`` (fresh, empty); raises ValueError for an
        adapter the format cannot express (naming the module and the fix).
    own_files : frozenset of str
        The file names the format writes: ``overwrite`` replaces a directory holding only these.
    options : frozenset of str
        Keyword options ``write`` accepts (anything else is refused by :func:`save_adapter`).
    """

    name: str
    summary: str
    write: Callable[..., None]
    own_files: FrozenSet[str]
    options: FrozenSet[str] = frozenset()


#: name -> :class:`Writer`, in registration order (what ``--format`` lists).
WRITERS: Registry[Writer] = Registry("output format", "format", Writer)


def register(writer: Writer, *, replace: bool = False) -> Writer:
    """Add ``writer`` to :data:`WRITERS` (``replace=True`` to redefine a name); returns it."""
    return WRITERS.register(writer, replace=replace)


def get_writer(name: object) -> Writer:
    """The registered writer called ``name``, or a ValueError listing the formats."""
    return WRITERS.lookup(name)


def publish_directory(path: os.PathLike, fill: Callable[[Path], None], *, overwrite: bool,
                      own_files: FrozenSet[str]) -> Path:
    """Create directory ``path`` atomically: ``fill(tmp)`` writes into a temporary directory
    beside it, which is fsynced and renamed into place.

    An existing ``path`` raises FileExistsError unless ``overwrite``; even then only a directory
    holding nothing but ``own_files`` is replaced (the old one is moved aside, then removed).
    """
    from ..adapter import AdapterError, AdapterFileNotFoundError

    path = Path(path).absolute()
    parent = path.parent
    if not parent.is_dir():
        raise AdapterFileNotFoundError(parent, "parent directory does not exist")
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(f"{path}: already exists; pass overwrite=True to replace it")
        if not path.is_dir() or path.is_symlink():
            raise AdapterError(path, "exists and is not a directory; refusing to replace it")
        extra = sorted(p.name for p in path.iterdir() if p.name not in own_files)
        if extra:
            raise AdapterError(path, f"exists and holds files that are not adapter files "
                                     f"({extra[:3]}); refusing to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    old = None
    try:
        os.chmod(tmp, 0o777 & ~process_umask())  # mkdtemp's 0700 would hide it from others
        fill(tmp)
        fsync_dir(tmp)
        if os.path.lexists(path):
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=parent))
            os.rename(path, old / "x")
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old / "x", path)
            raise
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not (old / "x").exists():
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def save_adapter(adapter: "Adapter", path: os.PathLike, *, format: str = "peft",
                 overwrite: bool = False, **options) -> Path:
    """Write ``adapter`` to ``path`` in ``format`` (see :meth:`metalora.Adapter.save`)."""
    writer = get_writer(format)
    unknown = sorted(set(options) - writer.options)
    if unknown:
        raise TypeError(f"format={format!r} takes no option(s) {unknown}; it accepts "
                        f"{sorted(writer.options) or 'none'}")
    for m in adapter.names:  # NaN/Inf is never written
        adapter.check_finite([m])
    return publish_directory(path, lambda d: writer.write(adapter, d, **options),
                             overwrite=overwrite, own_files=writer.own_files)


def _load_builtin() -> None:
    from . import peft  # noqa: F401  (registers "peft")


_load_builtin()
