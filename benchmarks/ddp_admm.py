"""One ADMM epoch on the digits: 1 process against 2 DistributedDataParallel processes (gloo).

The demo's DigitsNet is trained once (1 process, seeded); then the same ``tnconv.ADMM(...).fit``
epoch (project first, SGD + OneCycle, a Z / U update after the epoch, ``sync_batchnorm=True``) runs

* in 1 process with 1 torch thread, and with 2 threads;
* in 2 gloo processes of 1 thread each, every rank training on half of each global batch of
  ``--batch-size`` (the same global batches: the loader is seeded identically on both ranks).

Prints the wall time of the epoch (from the first batch to the end of the last Z / U update,
the processes synchronised by a barrier at both ends) and the largest relative difference
``||w2 - w1|| / ||w1||`` over the trained tensors between the 2-process and the 1-process
(1 thread) weights. docs/scale.md has the figures.

    python benchmarks/ddp_admm.py                       # MNIST digits, width 32, tucker
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tnconv
from tnconv.experiments.admm import default_layers, load_digits, train_dense


def _admm_epoch(model: torch.nn.Module, args: argparse.Namespace) -> tuple[float, Any]:
    data = load_digits(args.source, seed=0, limit=args.limit)
    admm = tnconv.ADMM(
        model, args.method, ratio=args.ratio, layers=default_layers, rho=0.5, rho_growth=2.0
    )
    loader = data.loader(args.batch_size, seed=1)
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    admm.fit(loader, args.epochs, lr=0.02, sync_batchnorm=True)
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter() - start, admm


def _worker(rank: int, port: int, folder: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = torch.load(Path(folder) / "dense.pt", weights_only=False)
        seconds, admm = _admm_epoch(model, args)
        if rank == 0:
            torch.save(
                {"seconds": seconds, "state": model.state_dict(), "history": admm.history},
                Path(folder) / "two.pt",
            )
    finally:
        dist.destroy_process_group()


def _max_relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    worst = (0.0, "")
    for key, x in a.items():
        if not x.is_floating_point():
            continue
        x, y = x.double(), b[key].double()
        rel = float((x - y).norm()) / max(float(x.norm()), 1e-12)
        worst = max(worst, (rel, key))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=["mnist", "sklearn"], default="mnist")
    parser.add_argument("--limit", type=int, help="at most this many training digits")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--dense-epochs", type=int, default=2)
    parser.add_argument("--method", default="tucker")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    torch.set_num_threads(1)
    data = load_digits(args.source, seed=0, limit=args.limit)
    dense = train_dense(data, width=args.width, epochs=args.dense_epochs, seed=0)
    print(
        f"digits {args.source}: {len(data.train)} training images {data.image}, DigitsNet width "
        f"{args.width}; ADMM {args.method} ratio {args.ratio}, {args.epochs} epoch(s), global "
        f"batch {args.batch_size}; torch {torch.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    rows = []
    one = copy.deepcopy(dense)
    seconds_1, admm_1 = _admm_epoch(one, args)
    rows.append(("1 process, 1 thread", seconds_1))
    torch.set_num_threads(2)
    seconds_2t, _ = _admm_epoch(copy.deepcopy(dense), args)
    torch.set_num_threads(1)
    rows.append(("1 process, 2 threads", seconds_2t))
    with tempfile.TemporaryDirectory() as folder:
        torch.save(dense, Path(folder) / "dense.pt")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ["OMP_NUM_THREADS"] = "1"
        mp.spawn(_worker, args=(port, folder, args), nprocs=2)
        two = torch.load(Path(folder) / "two.pt", weights_only=False)
    rows.append(("2 processes (gloo), 1 thread each", two["seconds"]))
    print(f"{'run':36s} {'epoch s':>8s} {'x 1 thread':>10s}")
    for label, seconds in rows:
        print(f"{label:36s} {seconds:8.2f} {seconds_1 / seconds:10.2f}")
    rel, key = _max_relative(one.state_dict(), two["state"])
    print(f"largest ||w2 - w1|| / ||w1|| over the tensors: {rel:.2e} ({key})")
    d1 = [round(h["max_distance"], 6) for h in admm_1.history]
    d2 = [round(h["max_distance"], 6) for h in two["history"]]
    print(f"max ||W-Z||/||W|| per ADMM step: 1 process {d1}, 2 processes {d2}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
