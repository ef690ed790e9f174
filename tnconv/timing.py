"""Latency measurement shared by compress, summary, studies and benchmarks."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["LATENCY_REPEATS", "MAX_REPEATS", "module_latencies", "time_round_robin"]

# round-robin repeats per latency decision: compress times every candidate of a layer with the
# dense layer in one loop, so noise hits them alike; the median of 9 is stable to a few percent
LATENCY_REPEATS = 9
# the most rounds a time budget (``min_seconds``) may ask for: a loop of 10 us calls stops there
MAX_REPEATS = 2000


def time_round_robin(
    fns: dict[str, Callable[[], object]], repeats: int, *, min_seconds: float = 0.0
) -> dict[str, float]:
    """Median milliseconds per call of each function, timed in turn in one loop so that machine
    noise hits them alike (each is warmed up twice first: plans, allocator, oneDNN primitives).

    Each round starts one function further along: whichever function runs right after a big
    one finds the caches cold (measured: up to 2x slower), so no function may always hold that
    place. ``repeats`` rounds at least; with ``min_seconds`` as many more as fill that much wall
    time (at most :data:`MAX_REPEATS`), estimated from the second warm-up round: a fixed count
    of millisecond calls leaves two identical models 2-3% apart (ResNet-20 at batch 1, 20
    rounds), a second of them about 1%."""
    for fn in fns.values():
        fn()
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    round_s = time.perf_counter() - start
    if min_seconds > 0 and round_s > 0:
        repeats = max(repeats, min(MAX_REPEATS, math.ceil(min_seconds / round_s)))
    items = list(fns.items())
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for round_no in range(repeats):
        shift = round_no % len(items)
        for name, fn in items[shift:] + items[:shift]:
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def module_latencies(
    modules: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    *,
    channels_last: bool = False,
    repeats: int = LATENCY_REPEATS,
    min_seconds: float = 0.0,
) -> dict[str, float]:
    """Median milliseconds of one inference forward pass (eval mode, ``torch.no_grad``) of each
    module on the same random input of ``input_shape`` (B, C, H, W), timed round-robin.

    The input is channels-last when ``channels_last`` (torch's convolutions then run and
    answer in that layout); each module's training mode is restored afterwards. ``repeats``
    and ``min_seconds`` as in :func:`time_round_robin`.
    """
    if not modules:
        return {}
    first = next(iter(modules.values()))
    param = next(first.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(tuple(input_shape), generator=gen, dtype=dtype).to(device)
    # channels-last exists for 4-D and 5-D maps; other inputs (Linear, Conv1d) keep their layout
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    x = x.contiguous(memory_format=fmt if channels_last and fmt else torch.contiguous_format)
    modes = {name: m.training for name, m in modules.items()}
    try:
        for m in modules.values():
            m.eval()
        with torch.no_grad():
            return time_round_robin(
                {name: (lambda m=m: m(x)) for name, m in modules.items()},
                repeats,
                min_seconds=min_seconds,
            )
    finally:
        for name, m in modules.items():
            m.train(modes[name])
