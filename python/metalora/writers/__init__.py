"""Output formats for adapters: one :class:`Writer` each, picked by name.

``Adapter.save(path, format="peft")`` looks the format up here. A directory format's writer fills
a fresh temporary directory, which :func:`publish_directory` then moves into place atomically; a
single-file format's (``single_file``, e.g. GGUF) writes a temporary file that
:func:`publish_file` renames into place. Either way readers see the old output or the complete
new one, and a failure leaves nothing behind. To add a format,
write its module beside ``peft.py`` and :func:`register` a :class:`Writer` there (and import the
module at the bottom of this file).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, FrozenSet, Optional

from .._io import fsync_dir, process_umask

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter

__all__ = ["Writer", "WRITERS", "register", "get_writer", "save_adapter", "publish_directory",
           "publish_file", "prepare_options"]


@dataclass(frozen=True)
class Writer:
    """An output format.

    Attributes
    ----------
    name : str
        The ``format=`` value (and ``metalora generate --format`` choice).
    summary : str
        One line: what reads this format.
    write : callable ``(adapter, path, **options) -> None``
        Writes the adapter's files into directory ``path`` (fresh, empty) or, for a
        ``single_file`` format, the file ``path`` (a fresh temporary name); raises ValueError for
        an adapter the format cannot express (naming the module and the fix).
    own_files : frozenset of str
        The file names the format writes: ``overwrite`` replaces a directory holding only these.
    options : frozenset of str
        Keyword options ``write`` accepts (anything else is refused by :func:`save_adapter`).
    single_file : bool
        The output is one file, not a directory (published by :func:`publish_file`).
    magic : bytes
        For a ``single_file`` format: the leading bytes of its files; ``overwrite`` replaces only
        a regular file that starts with them.
    prepare : callable ``(options: dict) -> dict``, optional
        Checks and normalises the options before any slow work (e.g. reads a base model named by
        an option); what it returns is what ``write`` receives. ``generate`` calls it before it
        starts.
    """

    name: str
    summary: str
    write: Callable[..., None]
    own_files: FrozenSet[str]
    options: FrozenSet[str] = frozenset()
    single_file: bool = False
    magic: bytes = b""
    prepare: Optional[Callable[[dict], dict]] = None


WRITERS: Dict[str, Writer] = {}


def register(writer: Writer) -> Writer:
    """Add ``writer`` to :data:`WRITERS` (a name already there is an error)."""
    if writer.name in WRITERS:
        raise ValueError(f"output format {writer.name!r} is already registered")
    WRITERS[writer.name] = writer
    return writer


def get_writer(name: object) -> Writer:
    """The registered writer called ``name``, or a ValueError listing the formats."""
    w = WRITERS.get(name) if isinstance(name, str) else None
    if w is None:
        raise ValueError(f"format={name!r} is not one of {tuple(WRITERS)}")
    return w


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


def publish_file(path: os.PathLike, fill: Callable[[Path], None], *, overwrite: bool,
                 magic: bytes = b"") -> Path:
    """Create file ``path`` atomically: ``fill(tmp)`` writes the file ``tmp``, a fresh name beside
    ``path``, which is fsynced and renamed into place.

    An existing ``path`` raises FileExistsError unless ``overwrite`` (without it the rename is a
    hard link, so a file that appears meanwhile is not replaced either); even then only a regular
    file starting with ``magic`` is replaced. On any error the temporary file is removed.
    """
    from ..adapter import AdapterError, AdapterFileNotFoundError

    path = Path(path).absolute()
    parent = path.parent
    if not parent.is_dir():
        raise AdapterFileNotFoundError(parent, "parent directory does not exist")
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(f"{path}: already exists; pass overwrite=True to replace it")
        if not path.is_file() or path.is_symlink():
            raise AdapterError(path, "exists and is not a regular file; refusing to replace it")
        with open(path, "rb") as f:
            if f.read(len(magic)) != magic:
                raise AdapterError(path, f"exists and is not a {magic.decode('ascii', 'replace')} "
                                         f"file; refusing to replace it")
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    tmp = Path(name)
    try:
        os.close(fd)
        fill(tmp)
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp's 0600 would hide it from others
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path}: already exists; pass overwrite=True to replace "
                                      f"it") from None
            os.unlink(tmp)
        fsync_dir(parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def prepare_options(writer: Writer, options: dict) -> dict:
    """Refuse options ``writer`` does not take, then run its ``prepare`` check."""
    unknown = sorted(set(options) - writer.options)
    if unknown:
        raise TypeError(f"format={writer.name!r} takes no option(s) {unknown}; it accepts "
                        f"{sorted(writer.options) or 'none'}")
    return writer.prepare(dict(options)) if writer.prepare is not None else dict(options)


def save_adapter(adapter: "Adapter", path: os.PathLike, *, format: str = "peft",
                 overwrite: bool = False, **options) -> Path:
    """Write ``adapter`` to ``path`` in ``format`` (see :meth:`metalora.Adapter.save`)."""
    writer = get_writer(format)
    options = prepare_options(writer, options)
    for m in adapter.names:  # NaN/Inf is never written
        adapter.check_finite([m])
    if writer.single_file:
        return publish_file(path, lambda f: writer.write(adapter, f, **options),
                            overwrite=overwrite, magic=writer.magic)
    return publish_directory(path, lambda d: writer.write(adapter, d, **options),
                             overwrite=overwrite, own_files=writer.own_files)


def _load_builtin() -> None:
    from . import peft, gguf  # noqa: F401  (register "peft", "gguf")


_load_builtin()
