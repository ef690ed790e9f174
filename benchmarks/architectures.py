"""Real architectures, every layer kind: what ``compress(model, m, budget=0.25)`` replaces.

The blocks of well-known networks, built by hand (``tnconv.models.blocks``: a ResNet-50-style
bottleneck net, ResNeXt with 32-group convs, MobileNetV2, EfficientNet MBConv with
squeeze-excitation, ConvNeXt with its Linear MLPs, a temporal Conv1d net, a 3-D conv net) and
the full ResNet-50 with its 1000-way head, randomly initialised (compression time and the
shares below do not depend on training; the errors would).

For every architecture and base method: the share of weight parameters (outside depthwise
convs, which stay dense) in layers that were replaced, the whole model's parameter and FLOP
ratios (compressed / dense, ``tnconv.summary``: inference FLOPs at the input size), the
compress time, and dense vs compressed CPU latency at batch 1 (eval, no_grad, round-robin in
one loop).

Targets (issue): replaced >= 0.90, total parameters <= 0.30 x dense, ResNet-50 compress time
under 3 minutes for every base method on 2 cores.

Run:  python benchmarks/architectures.py [--methods tucker,tt] [--archs resnext,...]
      [--resnet50] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import tnconv
from tnconv.models.blocks import ARCHITECTURES, resnet50
from tnconv.timing import module_latencies


def measure(name: str, make, size: tuple[int, ...], method: str, latency: bool) -> str:
    model = make().eval()
    dense_params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    small = tnconv.compress(model, method, budget=0.25, input_size=size, progress=False)
    seconds = time.perf_counter() - start
    s = tnconv.summary(small, input_size=size)
    weights = sum(r.dense_params for r in s.rows if "depthwise" not in r.note)
    replaced = sum(r.dense_params for r in s.rows if r.method != "dense")
    x = torch.randn(size)
    with torch.no_grad():
        assert small(x).shape == model(x).shape
    ms = ""
    if latency:
        t = module_latencies({"dense": model, "small": small}, size, repeats=15)
        ms = f"{t['dense']:9.2f} {t['small']:9.2f}"
    return (
        f"{name:20s} {method:9s} {replaced / weights:8.2f} "
        f"{s.model_params / dense_params:8.3f} {s.model_flops / max(s.dense_model_flops, 1):8.3f} "
        f"{seconds:9.1f} {ms}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(tnconv.available(kind="base")))
    parser.add_argument("--archs", default=",".join(ARCHITECTURES))
    parser.add_argument("--resnet50", action="store_true", help="also the full ResNet-50")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-latency", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    methods = args.methods.split(",")
    archs = [(n, *ARCHITECTURES[n]) for n in args.archs.split(",") if n]
    if args.resnet50:
        archs.append(("resnet50", resnet50, (1, 3, 224, 224)))
    print(f"torch {torch.__version__}, {args.threads} threads, budget=0.25")
    print(
        f"{'architecture':20s} {'method':9s} {'replaced':>8s} {'params':>8s} {'FLOPs':>8s} "
        f"{'compress':>9s} {'dense ms':>9s} {'ours ms':>9s}"
    )
    for name, make, size in archs:
        for method in methods:
            try:
                line = measure(name, make, size, method, not args.no_latency)
            except Exception as exc:  # one failing cell is reported, the table goes on
                line = f"{name:20s} {method:9s} failed: {type(exc).__name__}: {exc}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
