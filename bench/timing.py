"""Timing and memory helpers shared by the benches."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable


def timed_samples(fns: dict[str, Callable[[], object]], iters: int,
                  warmup: int = 1) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process-CPU seconds of every call of each function, the functions interleaved round by round.

    Interleaving spreads the drift of a shared machine evenly over the methods compared;
    ``warmup`` rounds first (codec init, allocator, caches) are not recorded. On a shared
    machine CPU time is the steadier of the two for single-threaded work.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def timed_rounds(fns: dict[str, Callable[[], object]], iters: int, warmup: int = 1) -> dict[str, float]:
    """Median wall-clock seconds per call of each function (:func:`timed_samples`)."""
    wall, _ = timed_samples(fns, iters, warmup)
    return {k: statistics.median(v) for k, v in wall.items()}


def rss_bytes() -> int:
    """This process's resident memory (Linux ``/proc/self/statm``; 0 where unreadable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
