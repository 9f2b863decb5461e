"""Progress of long loops: a tqdm bar when tqdm is installed, else one updating line on stderr."""

from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
    """Counts work done out of ``total`` and shows it.

    ``enabled``: True shows from the start, False never, None only once the work has taken
    longer than ``delay`` seconds (short calls stay silent). The stderr fallback rewrites one
    line at most every half second and ends it with a newline on :meth:`close`.
    """

    def __init__(self, total: int, desc: str, unit: str, enabled: Optional[bool] = None,
                 delay: float = 2.0):
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled, self.delay = enabled, delay
        self.t0 = self.last = time.perf_counter()
        self.done = 0
        self.bar = None
        self.text = False
        self.postfix = ""

    def _start(self) -> None:
        try:
            from tqdm.auto import tqdm  # optional dependency

            self.bar = tqdm(total=self.total, initial=self.done, unit=self.unit, desc=self.desc,
                            leave=False)
        except ImportError:
            self.text = True

    def update(self, k: int = 1) -> None:
        self.done += k
        if self.enabled is False:
            return
        now = time.perf_counter()
        if self.bar is None and not self.text:
            if self.enabled is None and now - self.t0 < self.delay:
                return
            self._start()
            if self.bar is not None:
                return
        if self.bar is not None:
            self.bar.update(k)
        elif now - self.last >= 0.5 or self.done >= self.total:
            self.last = now
            sys.stderr.write(f"\r{self.desc}: {self.done}/{self.total} {self.unit}s, "
                             f"{now - self.t0:.1f} s{', ' + self.postfix if self.postfix else ''}")
            sys.stderr.flush()

    def note(self, text: str) -> None:
        """A short status shown after the count (e.g. the best score so far)."""
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.text:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
