"""Timing hygiene shared by the benchmarks."""

from __future__ import annotations

import ctypes
import ctypes.util

from tnconv.timing import time_round_robin

__all__ = ["pin_allocator", "time_round_robin"]


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
