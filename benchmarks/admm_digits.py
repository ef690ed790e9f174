"""ADMM training then compression against direct compression, every method, on real digits.

The demo's DigitsNet is trained once on the shipped digits; then, for each method, at the same
global parameter budget of its 3x3 convs (all but the one-channel stem):

* direct: ``tnconv.compress`` -> accuracy -> ``admm_epochs + tune_epochs`` epochs of fine-tuning
  -> accuracy;
* admm: ``admm_epochs`` epochs of ADMM training (``tnconv.ADMM``, the ranks allocated on the
  dense weights by the same budget, so both arms have the same ranks) -> ``ADMM.compress()`` ->
  accuracy -> ``tune_epochs`` epochs of fine-tuning -> accuracy.

Both arms spend the same number of training epochs after the dense training. Prints the table
(docs/admm.md) and, with ``--json``, writes every figure and the configuration.

    python benchmarks/admm_digits.py                       # MNIST digits, budget 0.1
    python benchmarks/admm_digits.py --methods tt,stt      # e.g. a semi-tensor method
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import tnconv
from tnconv.experiments.admm import ADMMRun, compare_arms, format_rows, load_digits, train_dense
from tnconv.training import evaluate

DEFAULT_METHODS = ("tt", "tr", "tucker", "cp", "rsdtr", "stt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods",
        help="comma-separated (default: tt,tr,tucker,cp,rsdtr and stt when it is registered)",
    )
    parser.add_argument("--budget", type=float, default=0.1, help="share of the convs' params")
    parser.add_argument("--source", choices=["mnist", "sklearn"], default="mnist")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--dense-epochs", type=int, default=6)
    parser.add_argument("--admm-epochs", type=int, default=3)
    parser.add_argument("--tune-epochs", type=int, default=1)
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--rho-growth", type=float, default=2.0)
    parser.add_argument("--rho-max", type=float, default=8.0)
    parser.add_argument("--admm-lr", type=float, default=0.02)
    parser.add_argument("--tune-lr", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the rows and configuration here")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    known = tnconv.available(kind="base")
    if args.methods:
        methods = args.methods.split(",")
        for m in methods:
            tnconv.get(m)  # unknown names fail before any training
    else:
        methods = [m for m in DEFAULT_METHODS if m in known]
    started = time.perf_counter()
    data = load_digits(args.source, seed=args.seed)
    model = train_dense(
        data, width=args.width, epochs=args.dense_epochs, seed=args.seed, progress=args.progress
    )
    dense = evaluate(model, data.test_loader())
    print(
        f"dense DigitsNet(width={args.width}) on {args.source}: {100 * dense:.1f}% "
        f"({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    run = ADMMRun(
        admm_epochs=args.admm_epochs,
        tune_epochs=args.tune_epochs,
        rho=args.rho,
        rho_growth=args.rho_growth,
        rho_max=args.rho_max,
        admm_lr=args.admm_lr,
        tune_lr=args.tune_lr,
        seed=args.seed,
        progress=args.progress,
    )
    rows = []
    for method in methods:
        rows.append(compare_arms(model, method, data, run, budget=args.budget))
        print(format_rows(rows[-1:], dense).splitlines()[-1], flush=True)
    print()
    print(format_rows(rows, dense))
    print(
        f"\n{args.source} digits, {len(data.train)} train / {len(data.test)} test; budget "
        f"{args.budget} of the 3x3 convs' params (ranks allocated once on the dense weights, "
        f"the same in both arms); direct: {run.admm_epochs + run.tune_epochs} fine-tuning "
        f"epochs; admm: {run.admm_epochs} ADMM epochs (rho {run.rho} x{run.rho_growth} per "
        f"epoch up to {run.rho_max}, lr {run.admm_lr}) + {run.tune_epochs} fine-tuning; "
        f"fine-tuning lr {run.tune_lr}. {args.threads} thread(s), torch {torch.__version__}, "
        f"{platform.machine()}; {time.perf_counter() - started:.0f} s in all."
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "config": vars(args) | {"json": str(args.json)},
                    "dense_accuracy": dense,
                    "rows": [r.to_dict() for r in rows],
                },
                indent=2,
                default=str,
            )
        )


if __name__ == "__main__":
    main()
