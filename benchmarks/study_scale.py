"""A study's cells serially vs on a 2-process pool vs on a 2-worker Dask LocalCluster.

ResNet-20 (tnconv.models, untrained: the one fine-tuning epoch per cell is its only training, so
the accuracies only show that every executor computes the same numbers) on scikit-learn's 8x8
digits, repeated to 3 channels and upsampled to 16x16. Each cell: ``compress(budget=b)``,
``evaluate`` on the test split, one epoch of ``tnconv.training.fit`` (shuffled: the cell's seed
fixes the order), ``evaluate`` again. The serial run uses 1 torch thread, as each worker does,
so the three runs do the same arithmetic; the script checks that their rows are identical up to
the timing columns, and prints what one worker receives and returns per cell, in bytes.

Run:  python benchmarks/study_scale.py [--methods tucker tt tr] [--budgets 0.25 0.5]
          [--train 512] [--workers 2]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import pickle
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import tnconv
from tnconv.datasets import digits
from tnconv.models import create
from tnconv.study import _Cell, _Context, _payload
from tnconv.training import evaluate, fit

TIMING = {"latency_ms", "dense_latency_ms", "fit_seconds"}


def _images(ds: TensorDataset, limit: int | None) -> TensorDataset:
    x, y = ds.tensors
    if limit is not None:
        x, y = x[:limit], y[:limit]
    x = F.interpolate(x.repeat(1, 3, 1, 1), size=(16, 16), mode="bilinear", align_corners=False)
    return TensorDataset(x.contiguous(), y)


def _values(rows: list[Any]) -> list[tuple]:
    return [
        tuple(
            "nan" if isinstance(v, float) and math.isnan(v) else v
            for k, v in vars(r).items()
            if k not in TIMING
        )
        for r in rows
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["tucker", "tt", "tr"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.5])
    p.add_argument("--train", type=int, default=512, help="training images per fine-tune epoch")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()

    torch.set_num_threads(1)
    train, test = digits("sklearn", seed=0)
    train, test = _images(train, args.train), _images(test, None)
    train_loader = DataLoader(train, batch_size=64, shuffle=True)  # the cell's seed orders it
    test_loader = DataLoader(test, batch_size=256)
    model = create("resnet20")
    common: dict[str, Any] = dict(
        input_size=(8, 3, 16, 16),
        evaluate=functools.partial(evaluate, loader=test_loader),
        fine_tune=functools.partial(fit, loader=train_loader, epochs=1, lr=0.05),
        latency_repeats=3,
        progress=False,
    )
    cells = len(args.methods) * len(args.budgets)
    print(
        f"ResNet-20, {len(args.methods)} methods x {len(args.budgets)} budgets = {cells} cells, "
        f"{len(train)} training / {len(test)} test images (16x16); os.cpu_count()="
        f"{os.cpu_count()}, load average at start {os.getloadavg()[0]:.1f}"
    )

    # what travels: measured on the objects the study ships
    payload = _payload(model.eval(), None)
    ctx = _Context(
        None, (8, 3, 16, 16), common["evaluate"], common["fine_tune"], 3, {}, 0, 0, 0.0, 1
    )
    cell = _Cell(1, "tucker", 0.25, 0)

    runs: dict[str, Any] = {}
    timings: dict[str, float] = {}
    start = time.perf_counter()
    runs["serial"] = tnconv.study(model, args.methods, args.budgets, **common)
    timings["serial"] = time.perf_counter() - start

    start = time.perf_counter()
    runs["processes"] = tnconv.study(
        model, args.methods, args.budgets, executor="processes", workers=args.workers, **common
    )
    timings["processes"] = time.perf_counter() - start

    from distributed import Client, LocalCluster

    start = time.perf_counter()
    with (
        LocalCluster(
            n_workers=args.workers, processes=True, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        started = time.perf_counter() - start
        runs["dask"] = tnconv.study(model, args.methods, args.budgets, executor=client, **common)
    timings["dask"] = time.perf_counter() - start

    row = runs["serial"].rows[1]
    print(runs["serial"])
    print()
    print(f"{'executor':40s} {'wall s':>7s}  {'x serial':>8s}  same rows")
    labels = {
        "serial": "serial (1 thread)",
        "processes": f"processes ({args.workers} spawn workers)",
        "dask": f"LocalCluster ({args.workers} workers, start incl.)",
    }
    for name, seconds in timings.items():
        same = _values(runs[name].rows) == _values(runs["serial"].rows)
        print(
            f"{labels[name]:40s} {seconds:7.1f}  {timings['serial'] / seconds:8.2f}  "
            f"{'yes' if same else 'NO'}"
        )
    print(f"(LocalCluster start-up alone: {started:.1f} s)")
    fits = sum(r.fit_seconds for r in runs["serial"].rows[1:])
    print(f"serial compress time (sum of fit_seconds): {fits:.1f} s")
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    print()
    print("bytes per worker / per cell (pickled):")
    print(f"  dense model (once per worker)         {payload.nbytes:>10,d}")
    print(f"  context: callables + loaders (once)   {len(pickle.dumps(ctx)):>10,d}")
    print(f"  one cell (method, budget, seed)       {len(pickle.dumps(cell)):>10,d}")
    print(f"  one returned row                      {len(pickle.dumps(row)):>10,d}")


if __name__ == "__main__":
    main()
