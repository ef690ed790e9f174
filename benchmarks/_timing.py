"""Timing hygiene shared by the benchmarks."""

from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import time
from collections.abc import Callable


def pin_allocator() -> bool:
    """Keep freed memory in the process (glibc only), as jemalloc / tcmalloc setups do.

    By default glibc returns large freed blocks to the OS, so every forward pass page-faults its
    activations back in; which layer pays depends on allocation history, not on the layer, and
    swings latencies by 2x. Returns whether the setting took effect.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(
            libc.mallopt(m_trim_threshold, (1 << 31) - 1)
        )
    except (OSError, AttributeError):
        return False


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each function, timed in turn in one loop so that machine
    noise hits them alike."""
    for fn in fns.values():  # warm up (plans, allocator, oneDNN primitives)
        fn()
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}
