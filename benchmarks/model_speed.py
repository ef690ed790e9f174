"""Whole-model speed: dense vs every method at 0.25 of the conv parameters.

Models: CIFAR ResNet-20 / ResNet-56 and VGG-19-BN at 32x32 (tnconv.models) and a
ResNet-18-shaped ImageNet model at 224x224 (defined here: the torchvision layout, random
weights). Every conv but the stem is factorized at the largest uniform rank whose parameters fit
in 0.25 of that layer's (so the compressed conv parameters are at most 0.25 of the dense ones;
the table gives the exact share). Speed does not depend on the weights' values, so random
weights are used and CP fits with one sweep.

For batch 1 and 32, NCHW and channels-last, the dense model and every compressed one are timed
round-robin in one loop of at least 3 s (inference: eval mode, ``torch.no_grad``); the table
gives the wall-clock speed-up, the FLOP reduction (whole model, ``torch.utils.flop_counter``,
inference pass), the realized share (speed-up / FLOP reduction) and the peak memory of the
tensors the forward pass creates. In channels-last, ``<method>+guard`` is the compressed model
with every factorized layer that is not faster than its dense original (timed at its input, as
``compress(..., must_save="latency")`` decides, without refitting) put back to dense, then the
whole-model guard of compress (:func:`tnconv.compress.latency_guard`) run on it.
``--compile`` adds ``torch.compile`` of the dense and Tucker models.

Run:  python benchmarks/model_speed.py [--quick] [--threads 2] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tnconv
from tnconv.allocation import LatencyProbe
from tnconv.bn_folding import fold_batchnorm
from tnconv.compress import conv_input_shapes, latency_guard
from tnconv.models import create

sys.path.insert(0, str(Path(__file__).parent))
from _memory import PeakMemory
from _models import resnet18_imagenet
from _timing import pin_allocator, time_round_robin

SHARE = 0.25
LOOP_SECONDS = 3.0  # the least wall time of each round-robin loop
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


MODELS = {
    "resnet20": (lambda: create("resnet20"), 32),
    "resnet56": (lambda: create("resnet56"), 32),
    "vgg19_bn": (lambda: create("vgg19_bn"), 32),
    "resnet18-imagenet": (resnet18_imagenet, 224),
}


def stem(model: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


def compress_at_share(model: nn.Module, method: str, share: float) -> nn.Module:
    """Every conv but the stem at the largest uniform rank within ``share`` of its params."""
    dec = tnconv.get(method)
    fields = getattr(dec.Options, "model_fields", {})
    options = {k: v for k, v in (("max_iter", 1), ("n_init", 1), ("als_sweeps", 0)) if k in fields}
    spec = {}
    first = stem(model)
    for name, conv in model.named_modules():
        if not isinstance(conv, nn.Conv2d) or name == first:
            continue
        shape = tuple(conv.weight.shape)
        budget = share * conv.weight.numel()
        top = max(dec.bond_ranks(10**9, shape))
        fits = [
            r
            for r in range(1, min(top, 1024) + 1)
            if dec.num_params_at(shape, dec.bond_ranks(r, shape)) <= budget
        ]
        if fits:
            spec[name] = {"rank": dec.bond_ranks(max(fits), shape), "options": options}
    return tnconv.compress(model, method, spec=spec, progress=False)


@dataclass
class Guarded:
    """A guarded model and what its guard saw: the whole-model guard's own last timing
    (``dense_ms``, ``ms``; None when no layer survived the per-layer guard) and how many
    factorized layers it kept of those it started with."""

    model: nn.Module
    dense_ms: float | None
    ms: float | None
    kept: int
    total: int


def latency_guarded(
    dense: nn.Module, small: nn.Module, size: tuple[int, ...], channels_last: bool
) -> Guarded:
    """``small`` guarded as compress(must_save="latency") guards it: each factorized layer that
    is not faster than the dense original at its input (round-robin) replaced by that original,
    then the whole model timed against ``dense`` and the layers saving least put back until it
    is not slower (:func:`tnconv.compress.latency_guard`)."""
    guarded = copy.deepcopy(small)
    originals = dict(dense.named_modules())
    shapes = conv_input_shapes(small, size)
    probe = LatencyProbe(channels_last=channels_last)  # compress's own, repeats included
    for name, layer in small.named_modules():
        if not isinstance(layer, tnconv.FactorizedConv2d) or name not in shapes:
            continue
        dense_ms, (ms,) = probe.measure(originals[name], [layer], shapes[name])
        if ms >= dense_ms:
            parent, _, child = name.rpartition(".")
            holder = guarded.get_submodule(parent) if parent else guarded
            setattr(holder, child, copy.deepcopy(originals[name]))
    replaced = {
        name: copy.deepcopy(originals[name])
        for name, m in guarded.named_modules()
        if isinstance(m, tnconv.FactorizedLayer)
    }
    own: dict = {}
    if replaced:
        own = latency_guard(guarded, dense, replaced, shapes, size, probe)
    total = sum(isinstance(m, tnconv.FactorizedLayer) for m in small.modules())
    kept = sum(isinstance(m, tnconv.FactorizedLayer) for m in guarded.modules())
    return Guarded(guarded.eval(), own.get("dense_ms"), own.get("ms"), kept, total)


def conv_params(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            total += m.weight.numel()
        elif isinstance(m, tnconv.FactorizedConv2d):
            total += m.num_params
    return total


@dataclass
class Row:
    model: str
    batch: int
    layout: str
    name: str
    param_share: float
    gflops: float
    ms: float
    speedup: float
    flop_reduction: float
    realized: float
    peak_mb: float


@dataclass
class GuardRow:
    model: str
    batch: int
    name: str
    kept: int
    total: int
    own: float | None  # dense / guarded, the whole-model guard's own last timing
    pair: float  # dense / guarded, the two alone in one round-robin loop
    shared: float  # dense / guarded, in the loop of every variant


def flops_and_peak(model: nn.Module, x: torch.Tensor) -> tuple[int, float]:
    with torch.no_grad():
        model(x)  # plans and folded weights exist before measuring
        with FlopCounterMode(display=False) as counter:
            model(x)
        with PeakMemory() as mem:
            model(x)
    return counter.get_total_flops(), mem.peak / 2**20


def run_model(
    name: str,
    batches: list[int],
    repeats: int,
    methods: list[str],
    compiled: bool,
    fold_bn: bool = False,
) -> tuple[list[Row], list[GuardRow]]:
    build, size = MODELS[name]
    torch.manual_seed(0)
    dense = build().eval()
    variants: dict[str, nn.Module] = {"dense": dense}
    for method in methods:
        try:
            variants[method] = compress_at_share(dense, method, SHARE).eval()
        except Exception as exc:
            print(f"  {name}: skipped {method}: {exc}", file=sys.stderr)
    if fold_bn:
        # BatchNorm folded into the convs before factorizing (compress(fold_bn=True)), against
        # the dense model folded the same way: a fair pair, one memory pass less per layer each
        folded = fold_batchnorm(dense)
        variants["dense+foldbn"] = folded.eval()
        for method in ("tucker", "tt"):
            if method in methods:
                variants[f"{method}+foldbn"] = compress_at_share(folded, method, SHARE).eval()
    dense_params = conv_params(dense)
    rows: list[Row] = []
    guard_rows: list[GuardRow] = []
    for batch in batches:
        for layout, fmt in LAYOUTS.items():
            x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
            for m in variants.values():
                m.to(memory_format=fmt)  # before the guards: they time dense in this layout
            setting = dict(variants)
            guards: dict[str, Guarded] = {}
            if layout == "nhwc":
                for method in methods:
                    if method in variants:
                        g = latency_guarded(dense, variants[method], tuple(x.shape), True)
                        guards[f"{method}+guard"] = g
                        setting[f"{method}+guard"] = g.model.to(memory_format=fmt)
            fns = {k: (lambda m=m, x=x: m(x)) for k, m in setting.items()}
            if compiled and layout == "nhwc":
                for k in ("dense", "tucker"):
                    if k in variants:
                        c = torch.compile(variants[k])
                        fns[f"{k}+compile"] = lambda c=c, x=x: c(x)
            with torch.no_grad():
                # at batch 1 a round of every variant takes milliseconds: a fixed count of them
                # leaves two identical models 2-3% apart, so the loop fills ``LOOP_SECONDS``
                times = time_round_robin(fns, repeats, min_seconds=LOOP_SECONDS)
            dense_flops, _ = flops_and_peak(dense, x)
            for k, ms in times.items():
                module = setting[k.removesuffix("+compile")]
                flops, peak = flops_and_peak(module, x)
                speedup = times["dense"] / ms
                reduction = dense_flops / flops
                rows.append(
                    Row(
                        name,
                        batch,
                        layout,
                        k,
                        conv_params(module) / dense_params,
                        flops / 1e9,
                        ms,
                        speedup,
                        reduction,
                        speedup / reduction,
                        peak,
                    )
                )
            for k, g in guards.items():
                # the guard's promise, re-measured as it was made: the pair alone in one loop
                # (in the loop above every model runs after others and finds the caches cold)
                with torch.no_grad():
                    pair = time_round_robin(
                        {"dense": lambda x=x: dense(x), k: lambda m=g.model, x=x: m(x)},
                        2 * repeats,
                        min_seconds=LOOP_SECONDS,
                    )
                guard_rows.append(
                    GuardRow(
                        name,
                        batch,
                        k,
                        g.kept,
                        g.total,
                        g.dense_ms / g.ms if g.ms else None,
                        pair["dense"] / pair[k],
                        times["dense"] / times[k],
                    )
                )
    return rows, guard_rows


def print_rows(rows: list[Row]) -> None:
    print(
        "| model | batch | layout | method | conv params | GFLOP | ms | speed-up | FLOP red. | "
        "realized | peak MB |"
    )
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.model} | {r.batch} | {r.layout} | {r.name} | {r.param_share:.3f} | "
            f"{r.gflops:.3f} | {r.ms:.2f} | {r.speedup:.2f} | {r.flop_reduction:.2f} | "
            f"{r.realized:.2f} | {r.peak_mb:.1f} |"
        )


def print_speedups(rows: list[Row]) -> None:
    """One line per model x method: wall-clock speed-up in each setting."""
    settings = list(dict.fromkeys((r.batch, r.layout) for r in rows))
    print("\nWall-clock speed-up over the dense model (realized share in brackets):\n")
    print("| model | method | " + " | ".join(f"b{b} {lay}" for b, lay in settings) + " |")
    print("|---|---|" + "---:|" * len(settings))
    by = {(r.model, r.name, r.batch, r.layout): r for r in rows}
    for model, name in dict.fromkeys((r.model, r.name) for r in rows if r.name != "dense"):
        cells = []
        for b, lay in settings:
            r = by.get((model, name, b, lay))
            cells.append(f"{r.speedup:.2f} ({r.realized:.2f})" if r else "-")
        print(f"| {model} | {name} | " + " | ".join(cells) + " |")


def print_guards(rows: list[GuardRow]) -> None:
    """The whole-model latency guard: speed-up over dense as the guard measured it, the pair
    re-timed alone, and in the loop of every variant; a guard that put every layer back
    returned the dense model itself (its speed-ups are then timing noise around 1)."""
    print("\nWhole-model latency guard, channels-last (speed-up over dense):\n")
    print("| model | batch | method | factorized layers kept | guard's own | pair | all variants |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        own = f"{r.own:.2f}" if r.own is not None else "-"
        kept = f"{r.kept} / {r.total}" + (" (= dense)" if r.kept == 0 else "")
        print(
            f"| {r.model} | {r.batch} | {r.name} | {kept} | {own} | {r.pair:.2f} | {r.shared:.2f} |"
        )


def print_folded(rows: list[Row]) -> None:
    """The effect of folding BatchNorm: each folded model against the folded dense one, and
    the folded dense model against the plain one."""
    by = {(r.model, r.name, r.batch, r.layout): r for r in rows}
    settings = list(dict.fromkeys((r.batch, r.layout) for r in rows))
    print("\nBatchNorm folded (speed-up over the folded dense model; dense+foldbn over dense):\n")
    print("| model | method | " + " | ".join(f"b{b} {lay}" for b, lay in settings) + " |")
    print("|---|---|" + "---:|" * len(settings))
    names = dict.fromkeys((r.model, r.name) for r in rows if r.name.endswith("+foldbn"))
    for model, name in names:
        cells = []
        for b, lay in settings:
            r = by.get((model, name, b, lay))
            base = by.get((model, "dense" if name == "dense+foldbn" else "dense+foldbn", b, lay))
            cells.append(f"{base.ms / r.ms:.2f}" if r and base else "-")
        print(f"| {model} | {name} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="ResNet-20 only")
    parser.add_argument("--models", default=None, help="comma-separated subset of the models")
    parser.add_argument("--repeats", type=int, default=None, help="default 10 (quick: 8)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument(
        "--fold-bn", action="store_true", help="also BN-folded dense / tucker / tt models"
    )
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pinned = pin_allocator()
    names = ["resnet20"] if args.quick else list(MODELS)
    if args.models:
        names = args.models.split(",")
    methods = tnconv.available("base") if not args.methods else args.methods.split(",")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, methods {methods}, "
        f"allocator pinned: {pinned}; conv params at <= {SHARE} per layer (stem dense)\n"
    )
    start = time.perf_counter()
    rows: list[Row] = []
    guard_rows: list[GuardRow] = []
    for name in names:
        # the 224x224 model at batch 32 takes ~1 s per forward on 2 cores: fewer repeats
        big = MODELS[name][1] > 64
        repeats = args.repeats or (8 if args.quick else (4 if big else 10))
        model_rows, model_guards = run_model(
            name, [1, 32], repeats, methods, args.compile, args.fold_bn
        )
        rows += model_rows
        guard_rows += model_guards
    print_rows(rows)
    print_speedups(rows)
    print_guards(guard_rows)
    if args.fold_bn:
        print_folded(rows)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
