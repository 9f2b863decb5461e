"""Helpers for the Ray executor tests (tests/test_bank_index_ray.py).

Imported by the Ray worker processes too (the test cluster puts this folder on their
PYTHONPATH): :class:`CountingEmbedder` is pickled to the embedding actors, and each of its
``embed`` calls appends one line to a log file, so the test process counts what the actors
embedded (across processes, and across an actor's restart) and learns their pids.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from metalora.embed import Embedder


def texts_digest(texts: Sequence[str]) -> str:
    """What the log records of one embed call: a short hash of its texts."""
    return hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest()[:16]


class CountingEmbedder(Embedder):
    """The default embedder (same :attr:`id`, same points) that logs every ``embed`` call as
    ``<pid> <texts digest>`` to ``log`` before embedding, then sleeps ``delay`` seconds (so a
    test can act while the bank is being embedded)."""

    def __init__(self, *args, log: str = "", delay: float = 0.0, **kw):
        super().__init__(*args, **kw)
        self.log = str(log)
        self.delay = float(delay)

    def _pickle_extra(self) -> dict:
        return {"log": self.log, "delay": self.delay}

    def embed(self, texts):
        texts = list(texts)
        fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{os.getpid()} {texts_digest(texts)}\n".encode())
        finally:
            os.close(fd)
        if self.delay:
            time.sleep(self.delay)
        return super().embed(texts)


def read_log(path) -> list[tuple[int, str]]:
    """The ``(pid, texts digest)`` lines of a :class:`CountingEmbedder` log (none if absent)."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        pid, digest = line.split()
        out.append((int(pid), digest))
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process
        return True
    return True


class ActorKiller(threading.Thread):
    """Watches a :class:`CountingEmbedder` log and SIGKILLs the process of the actor that
    logged the ``after``-th embed call (while it embeds: the log line precedes the work)."""

    def __init__(self, log, after: int = 2, timeout: float = 120.0):
        super().__init__(daemon=True)
        self.log, self.after, self.timeout = log, after, timeout
        self.killed: int | None = None
        self.lines_at_kill = 0

    def run(self) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.timeout:
            lines = read_log(self.log)
            if len(lines) >= self.after:
                pid = lines[self.after - 1][0]
                if pid != os.getpid():
                    os.kill(pid, signal.SIGKILL)
                    self.killed, self.lines_at_kill = pid, len(lines)
                return
            time.sleep(0.02)
