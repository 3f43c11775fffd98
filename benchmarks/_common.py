"""Shared bits of the benchmarks: the machine line, medians, the final ratio line."""

from __future__ import annotations

import atexit
import os
import platform
import shutil
import statistics
import tempfile
import time


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )


def scratch(prefix: str) -> str:
    """A temporary directory for one benchmark run, removed when the run exits (the demo data, shards
    and checkpoints of a run come to hundreds of MiB)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def final_line(name: str, ratio: float, target: str) -> str:
    return f"{name}: {ratio:.2f}x (target {target})"
