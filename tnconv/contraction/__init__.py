"""The conv-einsum planner and executor.

A factorized convolution is an einsum whose operands are the feature map ``x[b, s, H, W]`` and
the kernel's factors, where the kernel's spatial indices ``h, w`` are *convolution-coupled* to the
feature map's ``H, W`` rather than summed against them. This package

1. builds that einsum from a factorization's structure (:class:`ConvNetwork`),
2. finds a contraction order with a conv-aware opt_einsum path optimizer
   (:class:`ConvPathOptimizer`, passed to ``opt_einsum.contract_path``) that prices every step
   touching the feature map at its true resolution, and
3. turns that order into a :class:`ConvPlan` of torch ops, replayed on every forward pass:

   * factor x factor: ``torch.einsum`` (weights only, no per-sample cost);
   * feature map x factor: one ``conv2d`` where the factor's indices shared with the feature map
     and still needed later become groups, those it consumes become input channels, its new
     indices output channels, feature-map indices it does not touch fold into the batch, and
     ``h`` / ``w`` (if the factor carries them) set the kernel extent and receive the layer's
     stride, padding and dilation on exactly those axes.

Planning is separate from execution, as in opt_einsum's ``contract_expression``: a plan is made
once per input shape and cached by its owner.

The package is split by responsibility:

* :mod:`~tnconv.contraction.cost`: cost tables (:class:`CostTable`, :class:`KindCost`) and the
  pricing of a step (:func:`step_seconds`, :func:`pointwise_seconds`);
* :mod:`~tnconv.contraction.geometry`: :class:`ConvGeometry` (stride, padding, dilation);
* :mod:`~tnconv.contraction.network`: :class:`ConvNetwork`, a factorization's conv-einsum;
* :mod:`~tnconv.contraction.paths`: :class:`ConvPathOptimizer`;
* :mod:`~tnconv.contraction.steps`: :class:`FactorStep` and :class:`DataStep`;
* :mod:`~tnconv.contraction.plan`: :class:`ConvPlan` and :func:`plan_conv`;
* :mod:`~tnconv.contraction.execute`: running a plan, folding its factors, the 1x1 executions
  (:func:`pointwise_matmul`, :func:`pointwise_conv_input`).

None of them imports :mod:`tnconv.calibration` (which imports the cost classes from here).
"""

from __future__ import annotations

from .cost import FLOP_SLACK as FLOP_SLACK
from .cost import MEMORY_WEIGHT as MEMORY_WEIGHT
from .cost import CostTable as CostTable
from .cost import effective_macs as effective_macs
from .cost import pointwise_seconds, step_seconds
from .execute import pointwise_conv_input, pointwise_matmul
from .geometry import ConvGeometry
from .network import ConvNetwork
from .paths import ConvPathOptimizer
from .plan import ConvPlan, plan_conv
from .steps import DataStep, FactorStep

__all__ = [
    "ConvGeometry",
    "ConvNetwork",
    "ConvPathOptimizer",
    "ConvPlan",
    "DataStep",
    "FactorStep",
    "plan_conv",
    "pointwise_conv_input",
    "pointwise_matmul",
    "pointwise_seconds",
    "step_seconds",
]
