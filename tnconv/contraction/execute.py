"""Running a plan: the torch ops of its steps, in the input's memory layout.

:func:`run_plan` replays a :class:`~tnconv.contraction.plan.ConvPlan` on a feature map
(``ConvPlan.__call__``), :func:`fold_factors` contracts its weights-only steps once for a
frozen layer (``ConvPlan.fold_factors``), and :func:`pointwise_matmul` /
:func:`pointwise_conv_input` are the two executions of a 1x1 step (also timed by
:mod:`tnconv.calibration`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .steps import DataStep, FactorStep

if TYPE_CHECKING:
    from .plan import ConvPlan

__all__ = ["fold_factors", "pointwise_conv_input", "pointwise_matmul", "run_plan"]

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
_CONV = {4: F.conv2d, 5: F.conv3d}


def is_channels_last(x: torch.Tensor) -> bool:
    """``x`` (N, C, *spatial) is laid out channels-last (and not also plain contiguous)."""
    fmt = _CHANNELS_LAST.get(x.dim())
    return fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def _layout(dim: int, nhwc: bool) -> torch.memory_format:
    return _CHANNELS_LAST[dim] if nhwc else torch.contiguous_format


def fold_factors(plan: ConvPlan, factors: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
    """The conv2d weight of every data step of ``plan`` (factor-only steps contracted, reshaped,
    repeated), keyed ``-1 - step index``: what a frozen layer computes once and reuses."""
    ops: dict[int, torch.Tensor] = dict(enumerate(factors, start=1))
    slot = len(factors) + 1
    weights: dict[int, torch.Tensor] = {}
    for k, step in enumerate(plan.steps):
        if isinstance(step, FactorStep):
            ops[slot] = torch.einsum(step.equation, ops[step.left], ops[step.right])
            slot += 1
        else:
            weights[-1 - k] = _step_weight(step, ops[step.factor])
    return weights


def run_plan(
    plan: ConvPlan,
    x: torch.Tensor,
    factors: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    folded: dict[int, torch.Tensor] | None = None,
    between: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run ``plan`` on ``x`` (B, S, *spatial) with ``factors``; returns (B, T, *spatial').

    ``folded`` (from :func:`fold_factors` on the same factors) skips every weights-only
    computation. ``between(j, y)``, if given, replaces the feature map ``y`` produced by the
    j-th data step (j = 0, 1, ...) whenever another data step follows (e.g. to quantize the
    feature maps between a layer's steps); the last step's output is left to the caller.
    """
    # The steps run in the input's memory layout and so does the output, as with
    # torch.nn.Conv2d, unless the plan converts an NCHW input (``convert``).
    nhwc = is_channels_last(x)
    dim = x.dim()
    converted = plan.convert and not nhwc
    # a conversion next to a 1x1 step runs inside its matrix product (read or written
    # transposed) instead of as a copy of the whole feature map
    fuse_in, fuse_out = converted and plan.fused_in, converted and plan.fused_out
    if converted and not fuse_in:
        x = x.contiguous(memory_format=_CHANNELS_LAST[dim])
    nhwc = nhwc or converted  # the layout the steps run in
    ops: list[torch.Tensor | None] = [x.reshape(plan.data_shape), *factors]
    data_steps = sum(isinstance(step, DataStep) for step in plan.steps)
    j = 0  # index of the data step
    for k, step in enumerate(plan.steps):
        if isinstance(step, FactorStep):
            if folded is not None:
                ops.append(None)  # never read: data steps take their weight from folded
                continue
            ops.append(torch.einsum(step.equation, ops[step.left], ops[step.right]))
            continue
        data = ops[0]
        assert data is not None
        in_nhwc = nhwc and not (fuse_in and j == 0)
        if in_nhwc:
            n, c, *spatial = step.data_shape
            data = data.permute(step.nhwc_perm).reshape(n, *spatial, c)
            data = data.permute(0, dim - 1, *range(1, dim - 1))
        else:
            if step.data_perm is not None:
                data = data.permute(step.data_perm)
            data = data.reshape(step.data_shape)
        if folded is not None:
            weight = folded[-1 - k]
        else:
            factor = ops[step.factor]
            assert factor is not None
            weight = _step_weight(step, factor)
        if step.pad is not None:
            mode = "constant" if step.padding_mode == "zeros" else step.padding_mode
            data = F.pad(data, step.pad, mode=mode)
        if step.matmul:
            out_nhwc = nhwc and not (fuse_out and j + 1 == data_steps)
            out = pointwise_matmul(data, weight, in_nhwc, out_nhwc)
        else:
            if step.pointwise:
                data = pointwise_conv_input(data, in_nhwc)
            out = _CONV[dim](
                data, weight, None, step.stride, step.padding, step.dilation, step.groups
            )
        ops[0] = out.reshape(step.out_shape)
        if between is not None and j + 1 < data_steps:
            ops[0] = between(j, ops[0])
        j += 1
    y = ops[0]
    assert y is not None
    if plan.final_perm is not None:
        y = y.permute(plan.final_perm)
    y = y.reshape(plan.output_shape)
    # the input's layout (a no-op unless regrouped, or converted without a fused last step)
    y = y.contiguous() if converted else y.contiguous(memory_format=_layout(dim, nhwc))
    if bias is not None:
        y = y + bias.view(1, -1, *([1] * (dim - 2)))
    return y


def pointwise_conv_input(x: torch.Tensor, nhwc: bool) -> torch.Tensor:
    """The input a 1x1, stride-1 conv2d step is given: an NCHW map (N, C, H, W) as a
    (N, C, 1, H*W) image, which oneDNN's NCHW 1x1 kernels run faster; channels-last unchanged."""
    if nhwc or x.dim() != 4:
        return x
    n, c, h, w = x.shape
    return x.reshape(n, c, 1, h * w)


def pointwise_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    nhwc: bool | None = None,
    out_nhwc: bool | None = None,
) -> torch.Tensor:
    """A 1x1, stride-1, ungrouped convolution as one matrix product over the pixels.

    Args:
        x: (N, C, *spatial) (two or three spatial axes), channels-first or channels-last
            (``nhwc``; inferred from the strides if None).
        weight: (O, C, 1, ...).
        out_nhwc: the output's layout (default: the input's). A change of layout costs no copy:
            the product reads its operand transposed (measured as fast as the plain product,
            where a separate conversion of a 32x256x14x14 map took 0.9 ms on 2 threads).

    Returns:
        (N, O, *spatial), the values of the convolution: in channels-last the pixels are the rows
        of an (N*P, C) view (P pixels), channels-first each image is a (C, P) view; ``x`` is not
        copied.
    """
    n, c, *spatial = x.shape
    p = math.prod(spatial)
    dim = x.dim()
    mat = weight.reshape(weight.shape[0], c)
    if nhwc is None:
        nhwc = is_channels_last(x)
    out_nhwc = nhwc if out_nhwc is None else out_nhwc
    if nhwc:
        pixels = x.permute(0, *range(2, dim), 1).reshape(n, p, c)  # a view: rows are pixels
    else:
        pixels = x.reshape(n, c, p).transpose(1, 2)  # a view, read transposed
    # explicit mm / bmm: torch.matmul may fold a batch into a matrix product and then copy
    # its transposed result (measured: a 32x128x28x28 copy costing more than the product)
    if out_nhwc:
        y = pixels.reshape(n * p, c) @ mat.T if nhwc else torch.bmm(pixels, mat.T.expand(n, c, -1))
        return y.view(n, *spatial, -1).permute(0, dim - 1, *range(1, dim - 1))
    return torch.bmm(mat.expand(n, -1, c), pixels.transpose(1, 2)).view(n, -1, *spatial)


def _step_weight(step: DataStep, factor: torch.Tensor) -> torch.Tensor:
    """The conv2d weight of a data step from its (possibly contracted) factor."""
    weight = factor
    if step.factor_perm is not None:
        weight = weight.permute(step.factor_perm)
    # a weight with channels-last-like strides would switch conv2d's output layout
    weight = weight.reshape(step.weight_shape[0] // step.repeat, *step.weight_shape[1:])
    if step.repeat > 1:
        return weight.repeat(step.repeat, *([1] * (weight.dim() - 1)))
    return weight.contiguous()
