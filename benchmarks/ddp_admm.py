"""One ADMM epoch on the digits: 1 process against 2 DistributedDataParallel processes (gloo).

The demo's DigitsNet is trained once (1 process, seeded); then the same ``tnconv.ADMM(...).fit``
epoch (project first, SGD + OneCycle, a Z / U update after the epoch, ``sync_batchnorm=True``
unless ``--per-rank-batchnorm``) runs

* in 1 process with 1 torch thread, and with 2 threads;
* in 2 gloo processes of 1 thread each, every rank training on half of each global batch of
  ``--batch-size`` (the same global batches: the loader is seeded identically on both ranks).

Prints the wall time of the epoch (from the first batch to the end of the last Z / U update,
the processes synchronised by a barrier at both ends), the CPU time of all its processes
together, and how far each run's weights end from
the 1-process, 1-thread run's, ``||w - w1|| / ||w1||`` over all trained weights and for the
three farthest tensors; next to a run from weights nudged by a relative 1e-7 (what rounding
alone does to the same epoch). docs/scale.md has the figures.

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
import tnconv.distributed
from tnconv.experiments.admm import default_layers, load_digits, train_dense


def _admm_epoch(model: torch.nn.Module, args: argparse.Namespace) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of every process together, the ADMM trainer)."""
    data = load_digits(args.source, seed=0, limit=args.limit)
    admm = tnconv.ADMM(
        model, args.method, ratio=args.ratio, layers=default_layers, rho=0.5, rho_growth=2.0
    )
    loader = data.loader(args.batch_size, seed=1)
    if dist.is_initialized():
        dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    admm.fit(loader, args.epochs, lr=0.02, sync_batchnorm=not args.per_rank_batchnorm)
    cpu = time.process_time() - cpu
    if dist.is_initialized():
        dist.barrier()
        cpu = tnconv.distributed.all_reduce_sum([cpu])[0]
    return time.perf_counter() - start, cpu, admm


def _worker(rank: int, port: int, folder: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = torch.load(Path(folder) / "dense.pt", weights_only=False)
        seconds, cpu, admm = _admm_epoch(model, args)
        if rank == 0:
            torch.save(
                {
                    "seconds": seconds,
                    "cpu": cpu,
                    "state": model.state_dict(),
                    "history": admm.history,
                },
                Path(folder) / "two.pt",
            )
    finally:
        dist.destroy_process_group()


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[tuple[float, str]]:
    """``||b - a|| / ||a||`` per floating tensor, largest first."""
    out = []
    for key, x in a.items():
        if x.is_floating_point():
            x, y = x.double(), b[key].double()
            out.append((float((x - y).norm()) / max(float(x.norm()), 1e-12), key))
    return sorted(out, reverse=True)


def _whole(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """``||b - a|| / ||a||`` over the trainable weights (no running statistics) as one vector."""
    keys = [k for k, v in a.items() if v.is_floating_point() and "running" not in k]
    x = torch.cat([a[k].double().reshape(-1) for k in keys])
    y = torch.cat([b[k].double().reshape(-1) for k in keys])
    return float((x - y).norm() / x.norm())


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
    parser.add_argument(
        "--per-rank-batchnorm",
        action="store_true",
        help="sync_batchnorm=False: each rank normalises with its half-batch statistics",
    )
    parser.add_argument("--skip-threads", action="store_true", help="no 2-thread 1-process run")
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
    seconds_1, cpu_1, admm_1 = _admm_epoch(one, args)
    rows.append(("1 process, 1 thread", seconds_1, cpu_1))
    threads = None
    if not args.skip_threads:
        threads = copy.deepcopy(dense)
        torch.set_num_threads(2)
        seconds_2t, cpu_2t, _ = _admm_epoch(threads, args)
        torch.set_num_threads(1)
        rows.append(("1 process, 2 threads", seconds_2t, cpu_2t))
    # how far rounding alone carries a run: the same epoch from weights moved by 1 ulp-ish
    nudged = copy.deepcopy(dense)
    with torch.no_grad():
        for p in nudged.parameters():
            p.mul_(1 + 1e-7)
    _admm_epoch(nudged, args)
    with tempfile.TemporaryDirectory() as folder:
        torch.save(dense, Path(folder) / "dense.pt")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ["OMP_NUM_THREADS"] = "1"
        mp.spawn(_worker, args=(port, folder, args), nprocs=2)
        two = torch.load(Path(folder) / "two.pt", weights_only=False)
    rows.append(("2 processes (gloo), 1 thread each", two["seconds"], two["cpu"]))
    print(f"{'run':36s} {'epoch s':>8s} {'x 1 thread':>10s} {'CPU s (all)':>11s}")
    for label, seconds, cpu in rows:
        print(f"{label:36s} {seconds:8.2f} {seconds_1 / seconds:10.2f} {cpu:11.2f}")
    reference = one.state_dict()
    others = [("2 processes", two["state"]), ("weights x (1 + 1e-7)", nudged.state_dict())]
    if threads is not None:
        others.insert(1, ("1 process, 2 threads", threads.state_dict()))
    print("against 1 process, 1 thread: ||w - w1|| / ||w1|| (all weights; largest tensors)")
    for label, state in others:
        worst = ", ".join(f"{key} {rel:.1e}" for rel, key in _relative(reference, state)[:3])
        print(f"  {label:22s} {_whole(reference, state):.2e}   {worst}")
    d1 = [round(h["max_distance"], 6) for h in admm_1.history]
    d2 = [round(h["max_distance"], 6) for h in two["history"]]
    print(f"max ||W-Z||/||W|| per ADMM step: 1 process {d1}, 2 processes {d2}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
