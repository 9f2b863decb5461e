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

import errno
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, FrozenSet, Optional

from .._io import fsync_dir, pid_alive, process_umask, temporary_beside
from .._registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from ..adapter import Adapter

__all__ = ["Writer", "WRITERS", "register", "get_writer", "save_adapter", "publish_directory",
           "recover_directory", "publish_file", "prepare_options"]


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


#: name -> :class:`Writer`, in registration order (what ``--format`` lists).
WRITERS: Registry[Writer] = Registry("output format", "format", Writer)


def register(writer: Writer, *, replace: bool = False) -> Writer:
    """Add ``writer`` to :data:`WRITERS` (``replace=True`` to redefine a name); returns it."""
    return WRITERS.register(writer, replace=replace)


def get_writer(name: object) -> Writer:
    """The registered writer called ``name``, or a ValueError listing the formats."""
    return WRITERS.lookup(name)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_renameat2_fn = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2(src, dst, flags)``: True when done, False when this system or file
    system does not offer it (the caller falls back); OSError for a real failure (EEXIST: ``dst``
    exists under RENAME_NOREPLACE)."""
    global _renameat2_fn
    if _renameat2_fn is None:
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2_fn = fn
        except (OSError, AttributeError):  # not glibc >= 2.28 / not Linux
            _renameat2_fn = False
    if _renameat2_fn is False:
        return False
    import ctypes

    at_fdcwd = -100
    if _renameat2_fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # kernel or file system lacks it
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _temp_pattern(name: str) -> "re.Pattern[str]":
    return re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(\d+)-")


def recover_directory(path: os.PathLike) -> list:
    """Finish what a killed :func:`publish_directory` left beside ``path``; returns what it did
    (lines). Only temporaries whose process (its pid is in their name) is gone are touched: when
    ``path`` is missing and an overwrite had moved the old directory aside
    (``.<name>.old-<pid>-*``), the old directory is put back; every other stale
    ``.<name>.tmp-<pid>-*`` / ``.old-`` temporary is removed."""
    path = Path(path).absolute()
    parent, done = path.parent, []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return done
    pat = _temp_pattern(path.name)
    stale = []
    for e in entries:
        m = pat.match(e.name)
        if m and not pid_alive(int(m.group(2))):
            stale.append((m.group(1), Path(e.path)))
    olds = sorted((p for kind, p in stale if kind == "old" and (p / "x").exists()),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    if olds and not os.path.lexists(path):
        try:
            os.rename(olds[0] / "x", path)
            fsync_dir(parent)
            done.append(f"restored {path} from an interrupted overwrite")
        except OSError:
            pass
    for _, p in stale:
        shutil.rmtree(p, ignore_errors=True)
        if not os.path.lexists(p):
            done.append(f"removed the stale temporary {p.name}")
    return done


def _check_replaceable(path: Path, own_files: FrozenSet[str]) -> None:
    from ..adapter import AdapterError

    if not path.is_dir() or path.is_symlink():
        raise AdapterError(path, "exists and is not a directory; refusing to replace it")
    extra = sorted(p.name for p in path.iterdir() if p.name not in own_files)
    if extra:
        raise AdapterError(path, f"exists and holds files that are not adapter files "
                                 f"({extra[:3]}); refusing to replace it")


def _exists_error(path: Path, during: bool) -> FileExistsError:
    when = " (it appeared while this run was writing)" if during else ""
    return FileExistsError(f"{path}: already exists{when}; pass overwrite=True to replace it, or "
                           f"choose another path")


def publish_directory(path: os.PathLike, fill: Callable[[Path], None], *, overwrite: bool,
                      own_files: FrozenSet[str]) -> Path:
    """Create directory ``path`` atomically: ``fill(tmp)`` writes into a temporary directory
    beside it (``.<name>.tmp-<pid>-*``), which is fsynced and then published.

    The final step never replaces anything it was not allowed to. Without ``overwrite`` the
    temporary is renamed into ``path`` only if ``path`` is still absent (Linux
    ``renameat2(RENAME_NOREPLACE)``; elsewhere a check just before a plain rename): a directory
    created at ``path`` during the write survives and this call raises FileExistsError. With
    ``overwrite`` only a directory holding nothing but ``own_files`` is replaced, by an atomic
    exchange (``RENAME_EXCHANGE``: ``path`` is never missing; the old directory is checked again
    after the swap and swapped back if it changed) or, where that is missing, by two renames
    through ``.<name>.old-<pid>-*``. A process killed at any point leaves ``path`` old or new;
    :func:`recover_directory` (called here first, and by ``metalora inspect``) puts back an old
    directory that a kill between the two renames left aside and removes dead processes'
    temporaries.
    """
    from ..adapter import AdapterFileNotFoundError

    path = Path(path).absolute()
    parent = path.parent
    if not parent.is_dir():
        raise AdapterFileNotFoundError(parent, "parent directory does not exist")
    recover_directory(path)
    if os.path.lexists(path):
        if not overwrite:
            raise _exists_error(path, False)
        _check_replaceable(path, own_files)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=parent))
    old = None
    try:
        os.chmod(tmp, 0o777 & ~process_umask())  # mkdtemp's 0700 would hide it from others
        fill(tmp)
        fsync_dir(tmp)
        if not os.path.lexists(path):
            try:
                done = _renameat2(tmp, path, _RENAME_NOREPLACE)
            except FileExistsError:
                raise _exists_error(path, True) from None
            if not done:  # no renameat2: the narrowest check we have, then a plain rename
                if os.path.lexists(path):
                    raise _exists_error(path, True)
                os.rename(tmp, path)
        elif not overwrite:
            raise _exists_error(path, True)
        else:
            _check_replaceable(path, own_files)
            if _renameat2(tmp, path, _RENAME_EXCHANGE):
                old = tmp  # now holds what was at path
                try:
                    _check_replaceable(old, own_files)
                except BaseException:  # changed between the check and the swap: undo
                    _renameat2(tmp, path, _RENAME_EXCHANGE)
                    raise
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-",
                                            dir=parent))
                os.rename(path, old / "x")
                try:
                    if os.path.lexists(path):
                        raise _exists_error(path, True)
                    os.rename(tmp, path)
                except BaseException:
                    os.rename(old / "x", path)
                    raise
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old != tmp and not (old / "x").exists():
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
    with temporary_beside(path) as tmp:
        fill(tmp)
        os.chmod(tmp, 0o666 & ~process_umask())  # in case fill() made the file anew
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
