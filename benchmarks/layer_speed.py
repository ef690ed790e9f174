"""Latency and FLOPs of factorized convolutions against the dense layer and TensorLy-Torch.

For ResNet-like 3x3 layers it times the dense ``nn.Conv2d``, tnconv's generic
``FactorizedConv2d`` for every registered method at about the same parameter share, and
TensorLy-Torch's ``FactorizedConv`` (implementation="factorized") at tnconv's ranks where it
has the same network (Tucker-2 and CP). All candidates of one shape and layout are timed
round-robin in one loop (inference: ``torch.no_grad``), so machine noise hits them alike; the
median of the repeats is reported. FLOPs are those executed, counted by
``torch.utils.flop_counter`` on the same inference pass.

    realized = (dense latency / factorized latency) / (dense FLOPs / factorized FLOPs)

is the share of the FLOP saving that turns into speed (1.0 = all of it). No execution of a
plan's steps can beat its steps' kernels run back to back (``+kernels`` rows: the plan's
convolutions and matrix products on inputs made beforehand, no glue), so the targets (issue 25,
2 threads) are stated against that bound (the share read from the layer and its kernels timed
alone in one loop of at least 0.6 s, beside the share in the loop of every candidate): every
method's layer reaches >= 95% of its own kernels-alone speed at batch 32 and >= 90% at batch 1
(the semi-tensor family, whose channel modes need copies between steps, >= 85%), both layouts,
every shape; Tucker-2 is at least 0.95x as fast as a plain ``nn.Sequential`` of its three
convolutions at the same ranks (``tucker-seq``, what a user would write by hand); never slower
than TensorLy-Torch at equal ranks.

Run:  python benchmarks/layer_speed.py [--quick] [--threads 2] [--repeats 30] [--compile]
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tnconv
from tnconv import calibration
from tnconv.contraction import DataStep, pointwise_conv_input, pointwise_matmul
from tnconv.contraction.execute import is_channels_last
from tnconv.errors import StructureError

sys.path.insert(0, str(Path(__file__).parent))
from _timing import pin_allocator, time_round_robin

# (in = out channels, spatial size, batch): ResNet stage shapes, 3x3 kernels
SHAPES = [(c, s, b) for c, s in ((256, 14), (128, 28), (64, 56), (512, 7)) for b in (32, 1)]
QUICK_SHAPES = [(256, 14, 32), (256, 14, 1)]
LAYOUTS = {"nhwc": torch.channels_last, "nchw": torch.contiguous_format}
# share of the kernels-alone speed (kernels ms / layer ms) each layer must reach
BOUND_TARGETS = {32: 0.95, 1: 0.90}
SEMI_TENSOR = ("str", "stt", "sttucker")
SEMI_TENSOR_TARGET = 0.85
SEQUENTIAL_TARGET = 0.95  # Tucker-2 speed / its nn.Sequential's speed
# the least wall time of each layer's loop with its own bound (the share the targets read)
PAIR_SECONDS = 0.6


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
    """Every registered method at ``ratio`` of the dense parameters (the largest uniform rank
    that fits; speed does not depend on the kernel's values, so CP fits with one sweep)."""
    shape = tuple(conv.weight.shape)
    budget = ratio * math.prod(shape)
    layers: dict[str, nn.Module] = {}
    for name in tnconv.available(kind="base"):
        dec = tnconv.get(name)

        def within(r: int, dec: tnconv.Decomposition = dec) -> bool:
            try:  # a semi-tensor network takes only ranks its factor t divides
                return dec.num_params_at(shape, dec.bond_ranks(r, shape)) <= budget
            except StructureError:
                return False

        try:
            fits = [r for r in range(1, 1025) if within(r)]
            if not fits:
                continue
            ranks = dec.bond_ranks(max(fits), shape)
            fields = getattr(dec.Options, "model_fields", {})
            options = {
                k: v for k, v in (("max_iter", 1), ("n_init", 1), ("als_sweeps", 0)) if k in fields
            }
            layers[name] = tnconv.FactorizedConv2d.from_conv(conv, dec, ranks, **options)
        except Exception as exc:  # a plugin method that cannot take this shape
            print(f"  skipped {name}: {exc}", file=sys.stderr)
    return layers


def tltorch_layers(conv: nn.Conv2d, ours: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """TensorLy-Torch factorized convs with the same network and ranks as tnconv's Tucker-2
    and CP (its TT orders the modes differently, so it is not the same network)."""
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


def tucker_sequential(conv: nn.Conv2d, layer: nn.Module) -> nn.Sequential:
    """Tucker-2 at ``layer``'s ranks written by hand: 1x1 (S -> r_s), the conv's own kernel
    (r_s -> r_t), 1x1 (r_t -> T), as three ``nn.Conv2d`` (what a user gets for free)."""
    r_t, r_s = layer.ranks
    return nn.Sequential(
        nn.Conv2d(conv.in_channels, r_s, 1, bias=False),
        nn.Conv2d(r_s, r_t, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=False),
        nn.Conv2d(r_t, conv.out_channels, 1, bias=False),
    )


def kernels_only(layer: tnconv.FactorizedLayer, x: torch.Tensor) -> Callable[[], object]:
    """The convolutions and matrix products of ``layer``'s frozen plan for ``x`` (the layer's
    own input: a Linear's (..., S) too), run back to back on inputs made beforehand, each in
    the memory layout the layer runs it in: no reshapes, permutes, copies or Python between
    them; a converting plan's layout conversions (when not fused into its end products) run as
    the copies they are. Its time is what PyTorch's own kernels need for the plan, a floor for
    the layer's time."""
    with torch.no_grad():
        layer(x)  # builds and caches the plan and the folded weights
        x = layer.executor_input(x)[0]
        nhwc = is_channels_last(x)
        plan = layer.plan_for(tuple(x.shape), "nhwc" if nhwc else "nchw", frozen=True)
        folded = plan.fold_factors(list(layer.factors))
    conv = F.conv3d if x.dim() == 5 else F.conv2d
    layout = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    # each step in the layouts the layer runs it in: a converting plan's first / last 1x1
    # product reads / writes the NCHW map itself (a transposed operand, not the same GEMM as
    # on a channels-last map), its other steps run channels-last
    runner = plan.runner(nhwc)
    layouts = {c.k: (c.in_nhwc, c.out_nhwc) for c in runner.calls}
    calls = []
    # a converting plan (chosen over the native NCHW one because the conversions and the
    # channels-last kernels together were faster) runs its conversions as copy kernels: they
    # are part of its kernels-alone time (the bound left them out before 2026-12-08)
    if runner.convert_in:
        nchw_input = torch.randn(x.shape)
        calls.append(lambda t=nchw_input: t.contiguous(memory_format=layout))
    last_out_nhwc = runner.calls[-1].out_nhwc if runner.calls else False
    if runner.converted and last_out_nhwc:
        nhwc_output = torch.randn(plan.output_shape).contiguous(memory_format=layout)
        converting_out = [lambda t=nhwc_output: t.contiguous()]
    else:
        converting_out = []
    for k, step in enumerate(plan.steps):
        if not isinstance(step, DataStep):
            continue
        in_nhwc, out_nhwc = layouts[k]
        data = torch.randn(step.data_shape)
        if in_nhwc:
            data = data.contiguous(memory_format=layout)
        if step.pad is not None:
            data = F.pad(data, step.pad)
        weight = folded[-1 - k]
        if step.matmul:
            calls.append(
                lambda d=data, w=weight, i=in_nhwc, o=out_nhwc: pointwise_matmul(d, w, i, o)
            )
            continue
        if step.pointwise:  # as the executor runs 1x1 conv2d steps
            data = pointwise_conv_input(data, in_nhwc)
        calls.append(
            lambda d=data, w=weight, st=step: conv(
                d, w, None, st.stride, st.padding, st.dilation, st.groups
            )
        )

    calls += converting_out

    def run_all() -> None:
        for call in calls:
            call()

    return run_all


def run(
    repeats: int,
    ratio: float,
    shapes: list[tuple[int, int, int]],
    compiled: bool,
    pairs: dict[tuple[str, str, str], float],
) -> list[Row]:
    """The rows of every candidate timed in one loop per shape and layout; ``pairs`` receives
    (method, shape, layout) -> kernels-alone ms / layer ms, the two timed alone in one loop."""
    rows: list[Row] = []
    torch.manual_seed(0)
    for channels, size, batch in shapes:
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        ours = tnconv_layers(conv, ratio)
        modules: dict[str, nn.Module] = {"dense": conv, **ours, **tltorch_layers(conv, ours)}
        if "tucker" in ours:
            modules["tucker-seq"] = tucker_sequential(conv, ours["tucker"])
        for module in modules.values():
            module.eval()
        label = f"{channels}@{size} b{batch}"
        for layout, fmt in LAYOUTS.items():
            x = torch.randn(batch, channels, size, size).contiguous(memory_format=fmt)
            conv.to(memory_format=fmt)  # the dense baseline in its best form for the layout
            if "tucker-seq" in modules:
                modules["tucker-seq"].to(memory_format=fmt)
            fns = {k: (lambda m=m, x=x: m(x)) for k, m in modules.items()}
            for k, layer in ours.items():
                fns[f"{k}+kernels"] = kernels_only(layer, x)
            if compiled and layout == "nhwc":
                for k in ("tucker", "tt"):
                    if k in ours:
                        c = torch.compile(ours[k])
                        fns[f"{k}+compile"] = lambda c=c, x=x: c(x)
            with torch.no_grad():
                times = time_round_robin(fns, repeats)
                # the share of the bound from the layer and its kernels alone in one loop: in
                # the loop of every candidate each runs after a different neighbour, whose
                # cache footprint moves a batch-1 share by up to +-0.1 between runs
                for k in ours:
                    pair = time_round_robin(
                        {"layer": fns[k], "kernels": fns[f"{k}+kernels"]},
                        repeats,
                        min_seconds=PAIR_SECONDS,
                    )
                    pairs[(k, label, layout)] = pair["kernels"] / pair["layer"]
            dense_flops = count_flops(conv, x)
            for name, ms in times.items():
                module = modules[name.split("+")[0]]
                flops = count_flops(module, x)  # (a "+kernels" row runs the same FLOPs)
                row = Row(label, layout, name, params_of(module), flops, ms)
                row.speedup = times["dense"] / ms
                row.flop_reduction = dense_flops / flops
                row.realized = row.speedup / row.flop_reduction
                rows.append(row)
    return rows


def round_to_effect(repeats: int, ratio: float, multiple: int = 8) -> None:
    """Each method at its ranks and at the ranks rounded to the nearest multiple of
    ``multiple`` (what ``compress(..., round_to=8)`` tries), 256@14 batch 32 channels-last, timed
    in one loop: does rounding pay on this machine?"""
    torch.manual_seed(0)
    conv = nn.Conv2d(256, 256, 3, padding=1, bias=False)
    x = torch.randn(32, 256, 14, 14).contiguous(memory_format=torch.channels_last)
    modules: dict[str, nn.Module] = {}
    for name, layer in tnconv_layers(conv, ratio).items():
        dec = tnconv.get(name)
        shape = tuple(conv.weight.shape)
        target = tuple(
            max(multiple, multiple * math.floor(r / multiple + 0.5)) for r in layer.ranks
        )
        rounded = dec.bond_ranks(target, shape)
        if tuple(rounded) == tuple(layer.ranks):
            continue
        fields = getattr(dec.Options, "model_fields", {})
        options = {
            k: v for k, v in (("max_iter", 1), ("n_init", 1), ("als_sweeps", 0)) if k in fields
        }
        modules[name] = layer.eval()
        modules[f"{name}@{multiple}"] = tnconv.FactorizedConv2d.from_conv(
            conv, dec, rounded, **options
        ).eval()
    if not modules:
        return
    with torch.no_grad():
        times = time_round_robin({k: (lambda m=m: m(x)) for k, m in modules.items()}, repeats)
    print(f"\nround_to={multiple} (256@14 b32 nhwc; ranks rounded to the nearest multiple):\n")
    print(
        "| method | ranks | ms | rounded ranks | ms | FLOP ratio | time ratio | "
        "time per FLOP ratio |"
    )
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for name in [k for k in modules if "@" not in k]:
        a, b = modules[name], modules[f"{name}@{multiple}"]
        fa, fb = count_flops(a, x), count_flops(b, x)
        ta, tb = times[name], times[f"{name}@{multiple}"]
        print(
            f"| {name} | {a.ranks} | {ta:.3f} | {b.ranks} | {tb:.3f} | {fb / fa:.2f} | "
            f"{tb / ta:.2f} | {(tb / ta) / (fb / fa):.2f} |"
        )


def print_tables(rows: list[Row], pairs: dict[tuple[str, str, str], float]) -> None:
    print("| layer | layout | method | params | GFLOP | ms | speed-up | FLOP red. | realized |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.shape} | {r.layout} | {r.name} | {r.params} | {r.flops / 1e9:.3f} | "
            f"{r.ms:.3f} | {r.speedup:.2f} | {r.flop_reduction:.2f} | {r.realized:.2f} |"
        )
    names = [m for m in dict.fromkeys(r.name for r in rows) if m != "dense"]
    methods = [m for m in names if not m.endswith("+kernels")]
    shapes = list(dict.fromkeys(r.shape for r in rows))
    for layout in LAYOUTS:
        print(f"\nRealized share of the FLOP saving, {layout}:\n")
        print("| method | " + " | ".join(shapes) + " |")
        print("|---|" + "---:|" * len(shapes))
        by = {(r.name, r.shape): r for r in rows if r.layout == layout}
        for m in methods:
            cells = [f"{by[(m, s)].realized:.2f}" if (m, s) in by else "-" for s in shapes]
            print(f"| {m} | " + " | ".join(cells) + " |")
        print(
            f"\nRealized share if only the plan's convolutions / matrix products ran "
            f"(PyTorch's kernels alone, no glue between them), {layout}:\n"
        )
        print("| method | " + " | ".join(shapes) + " |")
        print("|---|" + "---:|" * len(shapes))
        for m in [m for m in names if m.endswith("+kernels")]:
            cells = [f"{by[(m, s)].realized:.2f}" if (m, s) in by else "-" for s in shapes]
            print(f"| {m.removesuffix('+kernels')} | " + " | ".join(cells) + " |")
        for title, shares in (
            ("the two alone in one loop: the targets' figure", pairs),
            ("in the loop of every candidate", bound_share(rows)),
        ):
            print(
                f"\nShare of its kernels-alone speed (kernels ms / layer ms), {layout}, {title}:\n"
            )
            print("| method | " + " | ".join(shapes) + " |")
            print("|---|" + "---:|" * len(shapes))
            for m in [m.removesuffix("+kernels") for m in names if m.endswith("+kernels")]:
                cells = [
                    f"{shares[(m, s, layout)]:.2f}" if (m, s, layout) in shares else "-"
                    for s in shapes
                ]
                print(f"| {m} | " + " | ".join(cells) + " |")


def bound_share(rows: list[Row]) -> dict[tuple[str, str, str], float]:
    """(method, shape, layout) -> kernels-alone ms / layer ms: the share of its own plan's
    kernels-alone speed the layer reaches (1.0 = no glue at all)."""
    by = {(r.name, r.shape, r.layout): r for r in rows}
    return {
        (name, shape, layout): by[(f"{name}+kernels", shape, layout)].ms / r.ms
        for (name, shape, layout), r in by.items()
        if (f"{name}+kernels", shape, layout) in by
    }


def batch_of(shape: str) -> int:
    return int(shape.rsplit("b", 1)[1])


def check_targets(
    rows: list[Row], shares: dict[tuple[str, str, str], float]
) -> list[tuple[str, bool, str]]:
    """(target, passed, detail) for each of issue 25's item-1 targets (``shares``: the
    share of the bound per (method, shape, layout))."""
    results = []
    for method in dict.fromkeys(name for name, _, _ in shares):
        for batch, goal in BOUND_TARGETS.items():
            goal = min(goal, SEMI_TENSOR_TARGET) if method in SEMI_TENSOR else goal
            mine = {k: v for k, v in shares.items() if k[0] == method and batch_of(k[1]) == batch}
            if not mine:
                continue
            (_, shape, layout), worst = min(mine.items(), key=lambda kv: kv[1])
            results.append(
                (
                    f"{method} >= {goal:.2f} of its kernels-alone speed, batch {batch}",
                    worst >= goal,
                    f"worst {worst:.2f} at {shape} {layout}",
                )
            )
    by = {(r.name, r.shape, r.layout): r for r in rows}
    for (name, shape, layout), seq in by.items():
        mine = by.get(("tucker", shape, layout))
        if name != "tucker-seq" or mine is None:
            continue
        ratio = seq.ms / mine.ms
        results.append(
            (
                f"tucker >= {SEQUENTIAL_TARGET}x its nn.Sequential ({shape}, {layout})",
                ratio >= SEQUENTIAL_TARGET,
                f"{mine.ms:.3f} ms vs {seq.ms:.3f} ms (x{ratio:.2f})",
            )
        )
    for (name, shape, layout), theirs in by.items():
        if not name.startswith("tltorch-"):
            continue
        mine = by.get((name.removeprefix("tltorch-"), shape, layout))
        if mine is not None:
            results.append(
                (
                    f"{mine.name} not slower than TensorLy-Torch ({shape}, {layout})",
                    mine.ms <= theirs.ms,
                    f"{mine.ms:.3f} ms vs {theirs.ms:.3f} ms (x{theirs.ms / mine.ms:.2f})",
                )
            )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=None, help="default 30 (quick: 12)")
    parser.add_argument("--ratio", type=float, default=0.12, help="parameter share per method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="only 256@14, batch 32 and 1")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pinned = pin_allocator()
    start = time.perf_counter()
    tables = {lay: calibration.cost_table(lay) for lay in ("nchw", "nhwc")}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, tnconv "
        f"{tnconv.__version__}, methods {tnconv.available('base')}, allocator pinned: {pinned}, "
        f"cost tables: {tables['nhwc'].source} ({calibration.cache_file()})\n"
    )
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = args.repeats or (12 if args.quick else 30)
    pairs: dict[tuple[str, str, str], float] = {}
    rows = run(repeats, args.ratio, shapes, args.compile, pairs)
    print_tables(rows, pairs)
    print("\nTargets (issue 25, item 1):\n")
    print("| target | result | detail |")
    print("|---|---|---|")
    for target, ok, detail in check_targets(rows, pairs):
        print(f"| {target} | {'PASS' if ok else 'FAIL'} | {detail} |")
    round_to_effect(repeats, args.ratio)
    print(f"\n({time.perf_counter() - start:.0f} s, {repeats} round-robin repeats)")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(Row.__dataclass_fields__))
            writer.writeheader()
            writer.writerows(r.__dict__ for r in rows)


if __name__ == "__main__":
    main()
