"""``compress(budget=)`` serially vs with its per-layer candidate fits on a process pool.

ResNet-20 (tnconv.models, seeded random weights: the fits see the same kernel shapes as a
trained model's), one method and budget. Runs: serial at 1 torch thread (the workers' count, so
both do the same arithmetic), serial at torch's default thread count, ``executor="processes"``
with ``--workers`` spawn workers of 1 thread each (start-up included). Checks that the pool's
model has the 1-thread serial run's ranks, parameters and output on a fixed input, and prints
what one task sends and what it returns, in pickled bytes (from a run on a recording thread
pool: the same tasks the process pool receives).

Run:  python benchmarks/compress_executor.py [--method tucker] [--budget 0.25] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

import tnconv
from tnconv.models import create


class Recording(ThreadPoolExecutor):
    """A 1-thread pool that records the pickled size of every task and result."""

    def __init__(self) -> None:
        super().__init__(1)
        self.sent: list[tuple[str, int]] = []
        self.back: list[int] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        task = args[0]
        self.sent.append((f"{task.layer} ({len(task.steps)} step(s))", len(pickle.dumps(task))))

        def recorded(*a: Any) -> Any:
            result = fn(*a)
            self.back.append(len(pickle.dumps(result)))
            return result

        return super().submit(recorded, *args, **kwargs)


def ranks(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        n: m.factorization.ranks
        for n, m in model.named_modules()
        if isinstance(m, tnconv.FactorizedConv2d)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="tucker")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = create("resnet20").eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    run = dict(budget=args.budget, progress=False)
    print(f"uptime at start: {os.popen('uptime').read().strip()}")

    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t = time.perf_counter()
    serial = tnconv.compress(model, args.method, **run)
    serial_s = time.perf_counter() - t
    torch.set_num_threads(default_threads)
    t = time.perf_counter()
    serial_default = tnconv.compress(model, args.method, **run)
    serial_default_s = time.perf_counter() - t
    torch.set_num_threads(1)
    t = time.perf_counter()
    pooled = tnconv.compress(model, args.method, executor="processes", workers=args.workers, **run)
    pooled_s = time.perf_counter() - t
    torch.set_num_threads(default_threads)

    with torch.no_grad():
        same_output = torch.equal(pooled(x), serial(x))
        gap = float((pooled(x) - serial(x)).abs().max())
        default_gap = float((serial_default(x) - serial(x)).abs().max())
    params = [sum(p.numel() for p in m.parameters()) for m in (serial, pooled)]
    print(f"ResNet-20, {args.method}, budget {args.budget}: {len(ranks(serial))} layers factorized")
    print(f"{'run':44s} {'wall s':>7s} {'x serial':>8s}")
    print(f"{'serial (1 thread)':44s} {serial_s:7.2f} {1.0:8.2f}")
    print(
        f"{f'serial ({default_threads} threads)':44s} {serial_default_s:7.2f} "
        f"{serial_s / serial_default_s:8.2f}"
    )
    print(
        f"{f'processes ({args.workers} spawn workers x 1 thread)':44s} {pooled_s:7.2f} "
        f"{serial_s / pooled_s:8.2f}"
    )
    print(
        f"pool vs 1-thread serial: same ranks {ranks(pooled) == ranks(serial)}, params "
        f"{params[0]} / {params[1]}, outputs torch.equal {same_output} (max gap {gap:.3g})"
    )
    print(
        f"{default_threads}-thread serial vs 1-thread serial: same ranks "
        f"{ranks(serial_default) == ranks(serial)}, output max gap {default_gap:.3g}"
    )

    torch.set_num_threads(1)
    with Recording() as pool:
        tnconv.compress(model, args.method, executor=pool, **run)
    sizes = sorted(b for _, b in pool.sent)
    print(
        f"tasks: {len(pool.sent)}; pickled bytes sent per task: min {sizes[0]}, median "
        f"{sizes[len(sizes) // 2]}, max {sizes[-1]} ({max(pool.sent, key=lambda s: s[1])[0]}); "
        f"returned: median {sorted(pool.back)[len(pool.back) // 2]}, max {max(pool.back)}"
    )
    print(f"method sent once per worker: {len(pickle.dumps(tnconv.get(args.method)))} bytes")
    print(f"uptime at end: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
