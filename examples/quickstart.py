"""Factorize a trained conv kernel with every registered method and run the layers.

Prints, per method, the parameters kept, the relative error of the kernel and the error of the
layer's output against the dense convolution, at the same 25% parameter budget.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import tnconv

data = Path(__file__).resolve().parent.parent / "tests" / "data" / "real_kernels.npz"
if data.exists():  # a trained 32->32 5x5 kernel (dlib's face detector)
    weight = torch.tensor(np.load(data)["dlib_mmod/conv02"])
else:
    weight = torch.randn(32, 32, 5, 5)
conv = torch.nn.Conv2d(32, 32, 5, padding=2, bias=False)
with torch.no_grad():
    conv.weight.copy_(weight)

torch.set_grad_enabled(False)  # inference only
x = torch.randn(4, 32, 32, 32)
dense = conv(x)
print(f"dense kernel {tuple(weight.shape)}: {weight.numel()} parameters")
print(f"{'method':8s} {'ranks':>18s} {'params':>8s} {'kernel err':>10s} {'output err':>10s}  plan")
for name in tnconv.available(kind="base"):  # admm-<name> would factorize exactly as <name>
    layer = tnconv.FactorizedConv2d.from_conv(conv, name, ratio=0.25)
    out = layer(x)
    out_err = float(torch.linalg.norm(out - dense) / torch.linalg.norm(dense))
    kernel_err = layer.factorization.relative_error(weight)
    ref = F.conv2d(x, layer.to_tensor(), None, 1, 2)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    steps = " -> ".join(s.split(",")[0].split(" (")[0] for s in layer.plan_for(x.shape).describe())
    print(
        f"{name:8s} {layer.ranks!s:>18s} {layer.num_params:8d} {kernel_err:10.4f} "
        f"{out_err:10.4f}  {steps}"
    )
