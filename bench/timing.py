"""Timing and memory helpers shared by the benches."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable


def timed_rounds(fns: dict[str, Callable[[], object]], iters: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, the functions interleaved round by round.

    Interleaving spreads the drift of a shared machine evenly over the methods compared.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def rss_bytes() -> int:
    """This process's resident memory (Linux ``/proc/self/statm``; 0 where unreadable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
