"""Latency and FLOPs of factorized convolutions against the dense layer and TensorLy-Torch.

For ResNet-like layers it times the dense ``nn.Conv2d``, tnconv's generic ``FactorizedConv2d``
for every registered method at about the same parameter budget, and TensorLy-Torch's
``FactorizedConv`` (implementation="factorized") at tnconv's ranks where it has the method
(Tucker-2 and CP). All candidates are timed round-robin in one loop, so machine noise hits them
alike; the median of the repeats is reported. FLOPs come from ``torch.utils.flop_counter``.

    realized = (dense latency / factorized latency) / (dense FLOPs / factorized FLOPs)

is the share of the FLOP saving that turns into speed (1.0 = all of it).

Run:  python benchmarks/layer_speed.py [--repeats 30] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tnconv

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from _timing import pin_allocator, time_round_robin

# (in = out channels, spatial size, batch): ResNet stage shapes, 3x3 kernels
SHAPES = [(256, 14, 32), (128, 28, 32), (64, 56, 16)]
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


@dataclass
class Row:
    shape: str
    layout: str
    name: str
    params: int
    flops: int
    ms: float
    speedup: float = math.nan
    flop_reduction: float = math.nan
    realized: float = math.nan


def count_flops(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


def params_of(module: nn.Module) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if not n.endswith("bias"))


def tnconv_layers(conv: nn.Conv2d, ratio: float) -> dict[str, nn.Module]:
    """Every registered method at ``ratio`` of the dense parameters (uniform ranks, so the
    layers are built without fitting: speed does not depend on the kernel's values)."""
    shape = tuple(conv.weight.shape)
    budget = ratio * math.prod(shape)
    layers: dict[str, nn.Module] = {}
    for name in tnconv.available(kind="base"):
        dec = tnconv.get(name)
        fits = [
            r
            for r in range(1, 1025)
            if dec.num_params_at(shape, dec.bond_ranks(r, shape)) <= budget
        ]
        if not fits:
            continue
        ranks = dec.bond_ranks(max(fits), shape)
        options = {"max_iter": 1, "n_init": 1} if name == "cp" else {}
        try:
            layers[name] = tnconv.FactorizedConv2d.from_conv(conv, dec, ranks, **options)
        except Exception as exc:
            print(f"  skipped {name}: {exc}", file=sys.stderr)
    return layers


def tltorch_layers(conv: nn.Conv2d, ours: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """TensorLy-Torch factorized convs at the same ranks as tnconv's Tucker-2 and CP."""
    try:
        import tltorch
    except ImportError:
        return {}
    layers: dict[str, nn.Module] = {}
    kh, kw = conv.kernel_size
    if "tucker" in ours:
        rt, rs = ours["tucker"].ranks
        layers["tltorch-tucker"] = tltorch.FactorizedConv.from_conv(
            conv,
            rank=(rt, rs, kh, kw),
            factorization="tucker",
            implementation="factorized",
            fixed_rank_modes="spatial",
            decompose_weights=False,
        )
    if "cp" in ours:
        layers["tltorch-cp"] = tltorch.FactorizedConv.from_conv(
            conv,
            rank=ours["cp"].ranks[0],
            factorization="cp",
            implementation="factorized",
            decompose_weights=False,
        )
    return layers


def run(repeats: int, ratio: float, shapes: list[tuple[int, int, int]]) -> list[Row]:
    rows: list[Row] = []
    torch.manual_seed(0)
    for channels, size, batch in shapes:
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        ours = tnconv_layers(conv, ratio)
        modules: dict[str, nn.Module] = {"dense": conv, **ours, **tltorch_layers(conv, ours)}
        for module in modules.values():
            module.eval()
        label = f"{channels}->{channels} 3x3 @{size}x{size} b{batch}"
        for layout, fmt in LAYOUTS.items():
            x = torch.randn(batch, channels, size, size).contiguous(memory_format=fmt)
            conv.to(memory_format=fmt)  # the dense baseline in its best form for the layout
            with torch.no_grad():
                times = time_round_robin(
                    {k: (lambda m=m, x=x: m(x)) for k, m in modules.items()}, repeats
                )
            dense_flops = count_flops(conv, x)
            for name, module in modules.items():
                flops = count_flops(module, x)
                row = Row(label, layout, name, params_of(module), flops, times[name])
                row.speedup = times["dense"] / times[name]
                row.flop_reduction = dense_flops / flops
                row.realized = row.speedup / row.flop_reduction
                rows.append(row)
    return rows


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'layer':30s} {'layout':6s} {'method':16s} {'params':>9s} {'GFLOP':>7s} {'ms':>7s} "
        f"{'speed-up':>8s} {'FLOP red.':>9s} {'realized':>8s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.shape:30s} {r.layout:6s} {r.name:16s} {r.params:9d} {r.flops / 1e9:7.3f} "
            f"{r.ms:7.2f} {r.speedup:8.2f} {r.flop_reduction:9.2f} {r.realized:8.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--ratio", type=float, default=0.12, help="parameter share per method")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="only the 256-channel shape")
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pinned = pin_allocator()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, tnconv "
        f"{tnconv.__version__}, methods {tnconv.available()}, allocator pinned: {pinned}"
    )
    shapes = SHAPES[:1] if args.quick else SHAPES
    rows = run(args.repeats, args.ratio, shapes)
    print_table(rows)
    for layout in LAYOUTS:
        by = {r.name: r for r in rows if r.layout == layout and r.shape == rows[0].shape}
        for method in ("tucker", "cp"):
            theirs = by.get(f"tltorch-{method}")
            if method in by and theirs is not None:
                print(
                    f"{layout}: tnconv {method} {by[method].ms:.2f} ms vs TensorLy-Torch "
                    f"{theirs.ms:.2f} ms at equal ranks (ratio {theirs.ms / by[method].ms:.2f})"
                )
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(Row.__dataclass_fields__))
            writer.writeheader()
            writer.writerows(r.__dict__ for r in rows)


if __name__ == "__main__":
    main()
