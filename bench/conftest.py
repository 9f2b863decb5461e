"""Benchmark helpers: the machine's measured roofs and a summary table at the end of the run.

Each benchmark records rows with `report(...)`; the table printed at the end (and written to
bench/.cache/last_run.md) is what bench/README.md quotes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

ROWS: list[dict] = []
CACHE = Path(__file__).parent / ".cache"


def report(group: str, name: str, seconds: float, **metrics) -> None:
    """Record one measured row: group, name, median seconds and derived metrics."""
    ROWS.append({"group": group, "name": name, "seconds": seconds, **metrics})


def median_seconds(benchmark) -> float:
    return float(benchmark.stats.stats.median)


@pytest.fixture(scope="session")
def copy_roof_gbs() -> float:
    """Memory roof measured in this run: numpy copy of 512 MiB, bytes read + written per second."""
    src = np.ones(128 * 1024 * 1024, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    keys = []
    for row in ROWS:
        for k in row:
            if k not in keys:
                keys.append(k)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in ROWS:
        cells = []
        for k in keys:
            v = row.get(k, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    terminalreporter.write_sep("=", "metalora benchmark summary")
    terminalreporter.write_line(text)
    CACHE.mkdir(exist_ok=True)
    (CACHE / "last_run.md").write_text(
        f"<!-- {time.strftime('%Y-%m-%d %H:%M')} nproc={os.cpu_count()} -->\n{text}\n")
