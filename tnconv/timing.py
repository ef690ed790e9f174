"""Latency measurement shared by studies and benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

__all__ = ["time_round_robin"]


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each function, timed in turn in one loop so that machine
    noise hits them alike (each is warmed up twice first: plans, allocator, oneDNN primitives)."""
    for fn in fns.values():
        fn()
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}
