"""Speed of the new layer kinds: factorized Linear, grouped and 1x1 convs against their dense
layers, PyTorch's kernels alone, and TensorLy-Torch.

Layers (inference, ``torch.no_grad``, 2 threads, timed round-robin in one loop per case):

* Linear 1024 -> 1024 (a ConvNeXt / ViT MLP size) on (batch, 1024) rows, factorized at the
  largest rank within 1/4 of its parameters: tucker, tt, tr, rsdtr, cp, plain and tensorized
  (``tensorize="auto"``: (16, 8, 8) x (16, 8, 8)); TensorLy-Torch's ``FactorizedLinear``
  (tucker / blocktt = its TT-matrix, "factorized" implementation) at about the same parameters;
* a ResNeXt grouped 3x3 conv, 256 -> 256, 32 groups, at 14x14, factorized per group (tucker,
  tt) at 1/4 of its parameters, and ``tucker-seq``: its Tucker-2 written by hand as an
  ``nn.Sequential`` of three grouped convs at the same per-group ranks (the plan's own convs,
  no tnconv);
* a ResNet-50 1x1 conv, 1024 -> 256 at 14x14, at 1/4 of its parameters (tucker, tt, cp).

Columns: milliseconds, speed-up over dense, FLOP reduction, realized share (speed-up / FLOP
reduction) and, for tnconv's layers, the share of the plan's kernels-alone time the layer
reaches (``kernels ms / layer ms``; 1.0 = no overhead beyond PyTorch's own calls).

Targets (issue): a factorized Linear at 1/4 of the parameters faster than the dense one at
batch 32 and 1; grouped and 1x1 layers at >= 0.90 of their kernels-alone bound.

Run:  python benchmarks/layer_kinds_speed.py [--threads 2] [--repeats 30]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

import tnconv

sys.path.insert(0, str(Path(__file__).parent))
from _timing import pin_allocator, time_round_robin
from layer_speed import count_flops, kernels_only, params_of

SHARE = 0.25


def factorized(dense: nn.Module, method: str, **options: object) -> nn.Module:
    """The layer at the largest uniform rank within SHARE of the dense parameters."""
    cls = tnconv.layers.factorized_type(dense)
    return cls.from_dense(dense, method, ratio=SHARE, **options)


def tltorch_linear(dense: nn.Linear, factorization: str, target: int) -> nn.Module | None:
    try:
        import tltorch
    except ImportError:
        return None
    # TensorLy-Torch's rank as a share of the parameters; tensorized as its auto_tensorize does
    layer = tltorch.FactorizedLinear.from_linear(
        dense,
        rank=target / dense.weight.numel(),
        factorization=factorization,
        implementation="factorized",
        n_tensorized_modes=3,
    )
    return layer.eval()


def grouped_tucker_sequential(conv: nn.Conv2d, ranks: tuple[int, ...]) -> nn.Module:
    """Tucker-2 of a grouped conv written by hand: three grouped convs (1x1, kh x kw, 1x1) at
    the factorized layer's per-group ranks (R_T, R_S): what the layer's plan runs, without
    tnconv. (Weights random: speed does not depend on their values.)"""
    g, (r_t, r_s) = conv.groups, ranks
    return nn.Sequential(
        nn.Conv2d(conv.in_channels, g * r_s, 1, groups=g, bias=False),
        nn.Conv2d(g * r_s, g * r_t, conv.kernel_size, conv.stride, conv.padding, groups=g),
        nn.Conv2d(g * r_t, conv.out_channels, 1, groups=g),
    ).eval()


def cases(batch: int) -> list[tuple[str, nn.Module, torch.Tensor, dict[str, nn.Module]]]:
    torch.manual_seed(0)
    out = []
    lin = nn.Linear(1024, 1024).eval()
    layers: dict[str, nn.Module] = {}
    for m in ("tucker", "tt", "tr", "rsdtr", "cp"):
        layers[m] = factorized(lin, m, **({"n_init": 1, "max_iter": 5} if m == "cp" else {}))
    for m in ("tt", "tr", "tucker"):
        layers[f"{m}+tensorized"] = factorized(lin, m, tensorize="auto")
    budget = int(SHARE * lin.weight.numel())
    # blocktt is TensorLy-Torch's TT-matrix; its CP at 1/4 of the parameters (rank ~4000) runs
    # minutes of ALS and was left out
    for f in ("tucker", "blocktt"):
        layer = tltorch_linear(lin, f, budget)
        if layer is not None:
            layers[f"tltorch-{f}"] = layer
    out.append((f"linear 1024->1024 b{batch}", lin, torch.randn(batch, 1024), layers))

    grouped = nn.Conv2d(256, 256, 3, padding=1, groups=32).eval()
    x = torch.randn(batch, 256, 14, 14).contiguous(memory_format=torch.channels_last)
    layers = {m: factorized(grouped, m) for m in ("tucker", "tt")}
    layers["tucker-seq"] = grouped_tucker_sequential(grouped, layers["tucker"].ranks)
    out.append((f"grouped 256 g32 @14 b{batch}", grouped, x, layers))

    pointwise = nn.Conv2d(1024, 256, 1).eval()
    x = torch.randn(batch, 1024, 14, 14).contiguous(memory_format=torch.channels_last)
    layers = {
        m: factorized(pointwise, m, **({"n_init": 1} if m == "cp" else {}))
        for m in ("tucker", "tt", "cp")
    }
    out.append((f"1x1 1024->256 @14 b{batch}", pointwise, x, layers))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pin_allocator()
    print(f"torch {torch.__version__}, {args.threads} threads, inference, factorized at {SHARE}")
    print(
        f"{'case':28s} {'layer':18s} {'params':>8s} {'ms':>8s} {'speedup':>8s} "
        f"{'FLOPs/':>7s} {'realized':>8s} {'kernels':>8s}"
    )
    for batch in (32, 1):
        for name, dense, x, layers in cases(batch):
            fns = {"dense": lambda d=dense, x=x: d(x)}
            for key, layer in layers.items():
                fns[key] = lambda m=layer, x=x: m(x)
                if isinstance(layer, tnconv.FactorizedLayer):
                    fns[f"{key}#kernels"] = kernels_only(layer, x)
            with torch.no_grad():
                ms = time_round_robin(fns, args.repeats)
            dense_flops = count_flops(dense, x)
            print(f"{name:28s} {'dense':18s} {params_of(dense):8d} {ms['dense']:8.3f}")
            for key, layer in layers.items():
                flops = count_flops(layer, x)
                speedup = ms["dense"] / ms[key]
                reduction = dense_flops / max(flops, 1)
                bound = ms.get(f"{key}#kernels")
                share = f"{bound / ms[key]:8.2f}" if bound is not None else f"{'-':>8s}"
                print(
                    f"{'':28s} {key:18s} {params_of(layer):8d} {ms[key]:8.3f} {speedup:8.2f} "
                    f"{reduction:7.2f} {speedup / reduction:8.2f} {share}"
                )


if __name__ == "__main__":
    main()
