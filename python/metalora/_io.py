"""Small shared helpers: atomic file writes and the argument checks every stage uses.

Atomic write: the bytes go to a temporary file in the target's directory, are flushed and
fsynced, and the file is renamed over the target (``os.replace``, atomic on POSIX and Windows);
the directory is fsynced afterwards. Readers see the old file or the complete new one, and a
failure leaves neither a partial file nor the temporary behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

__all__ = ["atomic_write", "atomic_write_json", "fsync_dir", "json_default", "positive_int",
           "check_threads", "available_cpus", "pid_alive", "temp_owner", "process_umask", "json_text"]

PathLike = Union[str, "os.PathLike[str]"]


def fsync_dir(path: PathLike) -> None:
    """fsync a directory so that a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def temporary_beside(path: PathLike, *, mode: int = 0o666) -> Iterator[Path]:
    """A fresh temporary file beside ``path`` for the caller to fill and move into place.

    Its name carries the pid, so that a cleaner can tell a live writer's temporary from a dead
    one's; it gets permission bits ``mode`` less the umask, as ``open()`` would give it (not
    mkstemp's 0600, which would hide the output from other users). On an exception inside the
    ``with`` block it is removed.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp",
                                dir=path.parent)
    tmp = Path(name)
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode & ~process_umask())
        finally:
            os.close(fd)
        yield tmp
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write(path: PathLike, data: Union[bytes, str, Callable[[Any], None]], *,
                 mode: int = 0o666) -> Path:
    """Write ``data`` (bytes, str as UTF-8, or a function ``f(file)`` that writes to a binary
    file) to ``path`` atomically; the file gets permission bits ``mode`` less the umask, as
    ``open()`` would give it."""
    path = Path(path)
    with temporary_beside(path, mode=mode) as tmp:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine); True when unsure."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def temp_owner(name: str) -> Optional[int]:
    """The pid recorded in an :func:`atomic_write` temporary's name (``.<target>.<pid>-*.tmp``),
    or None."""
    import re

    m = re.match(r"^\..*\.(\d+)-[^.]*\.tmp$", name)
    return int(m.group(1)) if m else None


def json_default(x: Any) -> Any:
    """``json.dump(default=...)`` for numpy scalars and arrays and paths."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def json_text(obj: Any) -> str:
    """Indented, key-sorted JSON with a final newline (the form every metalora file uses)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=json_default) + "\n"


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    """:func:`atomic_write` of ``obj`` as indented, key-sorted JSON."""
    return atomic_write(path, json_text(obj))


_UMASK: Optional[int] = None


def process_umask() -> int:
    """The process umask, read once (reading it means setting it: done at first use only, so that
    no later call changes the umask of a running multi-threaded process)."""
    global _UMASK
    if _UMASK is None:
        try:  # Linux: read it without changing it
            with open("/proc/self/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("Umask:"):
                        _UMASK = int(line.split()[1], 8)
                        break
        except OSError:
            pass
        if _UMASK is None:  # pragma: no cover - other platforms
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


def positive_int(value: Any, what: str, *, allow_none: bool = False) -> Optional[int]:
    """``value`` as an int when it is a positive integer (not a bool); else a ValueError naming
    ``what``. ``None`` passes when ``allow_none``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def check_threads(threads: Any) -> int:
    """``threads`` as an int: 0 (all cores) or a positive count, **clamped to the CPUs this
    process may use** (:func:`available_cpus`). More threads than cores never makes these
    kernels faster, and thousands of them would only exhaust memory, so
    ``threads=100000`` (or ``2**31``) runs on every core instead. Anything that is not a
    non-negative integer is a ValueError."""
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 0:
        raise ValueError(f"threads must be a non-negative integer (0 = all cores), got {threads!r}")
    return min(int(threads), available_cpus())
