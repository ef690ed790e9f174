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
    # conv weights of steps run channels-last are stored channels-last too: oneDNN otherwise
    # reorders them on every call (measured at batch 1, 2 threads: a 129->129 3x3 conv on 7x7
    # 171 us with an NCHW weight, 118 us with a channels-last one)
    nhwc = plan.layout == "nhwc" or plan.convert
    for k, step in enumerate(plan.steps):
        if isinstance(step, FactorStep):
            ops[slot] = torch.einsum(step.equation, ops[step.left], ops[step.right])
            slot += 1
        else:
            weight = _step_weight(step, ops[step.factor])
            if nhwc and weight.dim() == 4 and not step.matmul:
                weight = weight.contiguous(memory_format=torch.channels_last)
            weights[-1 - k] = weight
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
    return compiled(plan, is_channels_last(x))(x, factors, bias, folded, between)


def compiled(plan: ConvPlan, nhwc: bool) -> Callable[..., torch.Tensor]:
    """``plan`` compiled for inputs in channels-last (``nhwc``) or NCHW layout, cached on the
    plan: called as ``run_plan`` is, without the plan argument (all five arguments given)."""
    runner = plan.runners.get(nhwc)
    if runner is None:
        runner = plan.runners[nhwc] = _Runner(plan, nhwc)
    return runner


class _Runner:
    """A plan compiled for one input layout: every layout decision and every view that is
    the identity for this plan is settled once, so a call runs the plan's convolutions and
    products with only the reshapes / permutes that do something between them (the per-call
    Python is what separates a layer from its kernels' time at batch 1)."""

    def __init__(self, plan: ConvPlan, nhwc_input: bool) -> None:
        # The steps run in the input's memory layout and so does the output, as with
        # torch.nn.Conv2d, unless the plan converts an NCHW input (``convert``).
        dim = len(plan.input_shape)
        self.dim = dim
        self.converted = converted = plan.convert and not nhwc_input
        # a conversion next to a 1x1 step runs inside its matrix product (read or written
        # transposed) instead of as a copy of the whole feature map
        fuse_in, fuse_out = converted and plan.fused_in, converted and plan.fused_out
        self.convert_in = converted and not fuse_in
        self.nhwc = nhwc = nhwc_input or converted  # the layout the steps run in
        self.entry_shape = None if plan.data_shape == plan.input_shape else plan.data_shape
        self.factor_steps = [
            (step.equation, step.left, step.right)
            for step in plan.steps
            if isinstance(step, FactorStep)
        ]
        data_steps = [(k, s) for k, s in enumerate(plan.steps) if isinstance(s, DataStep)]
        self.calls: list[_DataCall] = []
        shape = plan.data_shape  # the shape of the feature map before each data step
        for j, (k, step) in enumerate(data_steps):
            in_nhwc = nhwc and not (fuse_in and j == 0)
            out_nhwc = nhwc and not (fuse_out and j + 1 == len(data_steps))
            self.calls.append(_DataCall(k, step, shape, in_nhwc, out_nhwc, dim))
            shape = step.out_shape
        for before, after in zip(self.calls, self.calls[1:], strict=False):
            after.merge_after(before)
        self.final_perm = plan.final_perm
        self.output_shape = None if shape == plan.output_shape else plan.output_shape
        if plan.final_perm is not None:
            self.output_shape = plan.output_shape
        self.layout = _layout(dim, nhwc)
        last = self.calls[-1] if self.calls else None
        # The ends, as merge_after does between steps: the input split into its S-group axes
        # and merged back in order by the first step's input view, and the last conv's output
        # split into out_shape and merged back into the output, are identities (a grouped
        # layer's group axis: two reshapes and two permutes per call at batch 1)
        self.fast_entry_shape, self.fast_output_shape = self.entry_shape, self.output_shape
        if last is not None and self.entry_shape is not None:
            self.calls[0].merge_after_entry(plan.input_shape, self.entry_shape)
            if self.calls[0].fast_input_view_skipped:
                self.fast_entry_shape = None
        returns_output = (
            last is not None
            and plan.final_perm is None
            and last.produced == tuple(plan.output_shape)
        )
        if returns_output:
            last.fast_out_shape, self.fast_output_shape = None, None
        # the bias is added by the last conv / product when its output channels are the
        # layer's (no regrouping after it): one pass over the output less
        self.bias_in_last = (
            last is not None
            and (returns_output or (last.out_shape is None and self.output_shape is None))
            and last.step.weight_shape[0] == plan.output_shape[1]
        )
        # a plan of plain 1x1 products (a Linear layer's, a 1x1 conv's) runs as a chain of
        # 2-D products on the (pixels, channels) matrix: one view in, one view out
        n, _, *spatial = plan.input_shape
        pixels = math.prod(spatial)
        self.rows: tuple[int, ...] | None = None
        if (
            self.calls
            and all(c.plain_matmul for c in self.calls)
            and self.entry_shape is None
            and self.output_shape is None
            # one pixel: every layout is the same memory
            and (all(c.in_nhwc and c.out_nhwc for c in self.calls) or n * pixels == 1)
        ):
            self.rows = (n * pixels, plan.input_shape[1])
            self.rows_out = (n, *spatial, plan.output_shape[1])
            self.to_last = (0, *range(2, dim), 1)
            self.to_first = (0, dim - 1, *range(1, dim - 1))

    def bind(
        self, bias: torch.Tensor | None, folded: dict[int, torch.Tensor]
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The plan on folded weights as a function of the input alone: ``bind(bias,
        folded)(x) == self(x, (), bias, folded, None)``. A plan of plain steps (convolutions and
        1x1 products on the map as it is, no view, pad or copy between them: most plans) runs as
        a bare loop of those calls, the Python of a frozen layer's call cut to what its kernels
        need. ``bias`` is read at call time (the tensor itself is held, so in-place changes are
        seen)."""
        plain = (
            self.calls
            and not self.convert_in
            and self.fast_entry_shape is None
            and self.rows is None
            and self.final_perm is None
            and self.fast_output_shape is None
            and (bias is None or self.bias_in_last)
            and all(c.plain for c in self.calls)
        )
        if not plain:
            return lambda x: self(x, (), bias, folded, None)
        last = len(self.calls) - 1
        steps = [
            call.bare(folded[-1 - call.k], bias if j == last else None)
            for j, call in enumerate(self.calls)
        ]
        layout = torch.contiguous_format if self.converted else self.layout

        def run(x: torch.Tensor) -> torch.Tensor:
            for step in steps:
                x = step(x)
            return x.contiguous(memory_format=layout)

        return run

    def __call__(
        self,
        x: torch.Tensor,
        factors: Sequence[torch.Tensor],
        bias: torch.Tensor | None,
        folded: dict[int, torch.Tensor] | None,
        between: Callable[[int, torch.Tensor], torch.Tensor] | None,
    ) -> torch.Tensor:
        if self.convert_in:
            x = x.contiguous(memory_format=_CHANNELS_LAST[self.dim])
        entry_shape = self.entry_shape if between is not None else self.fast_entry_shape
        if entry_shape is not None:
            x = x.reshape(entry_shape)
        ops: list[torch.Tensor] = [x, *factors]
        if folded is None:
            for equation, left, right in self.factor_steps:
                ops.append(torch.einsum(equation, ops[left], ops[right]))
        weights = [
            folded[-1 - call.k] if folded is not None else _step_weight(call.step, ops[call.factor])
            for call in self.calls
        ]
        last = len(self.calls) - 1
        fused_bias = bias if self.bias_in_last else None
        if self.rows is not None and between is None:
            # (a rows plan's last product always takes the bias: its channels are the output's)
            x = x.permute(self.to_last).reshape(self.rows)
            for j, weight in enumerate(weights):
                mat = weight.reshape(weight.shape[0], -1).T
                x = x @ mat if j < last or fused_bias is None else torch.addmm(fused_bias, x, mat)
            x = x.view(self.rows_out).permute(self.to_first)
        elif between is None:
            for j, (call, weight) in enumerate(zip(self.calls, weights, strict=True)):
                x = call.fast(x, weight, fused_bias if j == last else None)
        else:
            for j, (call, weight) in enumerate(zip(self.calls, weights, strict=True)):
                x = call(x, weight, fused_bias if j == last else None)
                if j < last:
                    x = between(j, x)
        if self.final_perm is not None:
            x = x.permute(self.final_perm)
        output_shape = self.output_shape if between is not None else self.fast_output_shape
        if output_shape is not None:
            x = x.reshape(output_shape)
        # the input's layout (a no-op unless regrouped, or converted without a fused last step)
        x = x.contiguous() if self.converted else x.contiguous(memory_format=self.layout)
        if bias is not None and not self.bias_in_last:
            x = x + bias.view(1, -1, *([1] * (self.dim - 2)))
        return x


class _DataCall:
    """One data step of a compiled plan: the feature map (of the static shape ``shape``)
    viewed as the step's conv input, the conv or matrix product, the output viewed as the
    step's ``out_shape``; views that are the identity are skipped."""

    def __init__(
        self,
        k: int,
        step: DataStep,
        shape: tuple[int, ...],
        in_nhwc: bool,
        out_nhwc: bool,
        dim: int,
    ) -> None:
        self.k, self.step, self.factor = k, step, step.factor
        self.in_nhwc, self.out_nhwc = in_nhwc, out_nhwc
        self.matmul = step.matmul
        # (channels-last 1x1 convs take the map as it is: see pointwise_conv_input)
        self.pointwise = step.pointwise and not step.matmul and not in_nhwc and dim == 4
        self.conv = _CONV[dim]
        same = shape == step.data_shape
        if in_nhwc:
            n, c, *spatial = step.data_shape
            self.nhwc_view = (step.nhwc_perm, (n, *spatial, c), (0, dim - 1, *range(1, dim - 1)))
            # permuting to channels-last, reshaping nothing and permuting back is the identity
            if same and step.nhwc_perm == (0, *range(2, dim), 1):
                self.nhwc_view = None
            self.data_perm, self.data_shape = None, None
        else:
            self.nhwc_view = None
            self.data_perm = step.data_perm
            self.data_shape = None if same and step.data_perm is None else step.data_shape
        self.pad = step.pad
        self.pad_mode = "constant" if step.padding_mode == "zeros" else step.padding_mode
        self.args = (step.stride, step.padding, step.dilation, step.groups)
        spatial_out = step.out_shape[len(step.out_shape) - (dim - 2) :]
        produced = (step.data_shape[0], step.weight_shape[0], *spatial_out)
        # (an NCHW 1x1 conv runs on an (N, C, 1, H*W) view: its output is always reshaped)
        skip = produced == step.out_shape and not self.pointwise
        self.out_shape = None if skip else step.out_shape
        self.produced = None if self.pointwise else produced
        self.dims = dim
        # without a `between` hook the map between two steps is never seen: where the next
        # step's input view only undoes this step's output view, both are skipped (fast)
        self.fast_out_shape, self.fast_nhwc_view = self.out_shape, self.nhwc_view
        self.fast_data_shape = self.data_shape
        # a product on the map as it is: see _Runner.rows
        self.plain_matmul = (
            self.matmul
            and self.nhwc_view is None
            and self.data_perm is None
            and self.data_shape is None
            and self.out_shape is None
            and self.pad is None
            and step.groups == 1
        )

    @property
    def plain(self) -> bool:
        """In :meth:`fast`, the step is one conv or 1x1 product on the map as it is."""
        return (
            not self.pointwise
            and self.pad is None
            and self.fast_nhwc_view is None
            and self.data_perm is None
            and self.fast_data_shape is None
            and self.fast_out_shape is None
        )

    def bare(
        self, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """A :attr:`plain` step as a function of its input: :meth:`fast` with ``weight`` and
        ``bias`` bound and nothing left to decide per call."""
        if self.matmul:
            nhwc, out_nhwc = self.in_nhwc, self.out_nhwc
            return lambda x: pointwise_matmul(x, weight, nhwc, out_nhwc, bias)
        conv, (stride, padding, dilation, groups) = self.conv, self.args
        return lambda x: conv(x, weight, bias, stride, padding, dilation, groups)

    def merge_after_entry(self, input_shape: tuple[int, ...], entry: tuple[int, ...]) -> None:
        """Skip, in :meth:`fast`, this first step's input view when it only merges back, in
        order, the layer input (N, C, *spatial) split into ``entry`` (N, *C-parts, *spatial):
        the caller then skips the split (``fast_input_view_skipped``)."""
        self.fast_input_view_skipped = False
        step, dim = self.step, self.dims
        spatial = tuple(input_shape[2:])
        parts = len(entry) - 1 - (dim - 2)
        if (
            step.data_shape != tuple(input_shape)
            or self.data_perm is not None
            or entry[0] != input_shape[0]
            or tuple(entry[len(entry) - (dim - 2) :]) != spatial
            or math.prod(entry[1 : 1 + parts]) != input_shape[1]
        ):
            return
        if self.in_nhwc:
            standard = (0, *range(1 + parts, 1 + parts + dim - 2), *range(1, 1 + parts))
            if step.nhwc_perm != standard:
                return
        self.fast_nhwc_view, self.fast_data_shape = None, None
        self.fast_input_view_skipped = True

    def merge_after(self, before: _DataCall) -> None:
        """Skip, in :meth:`fast`, ``before``'s output view and this step's input view when
        together they are the identity: ``before``'s conv output (N, O, *spatial) split into
        (N, *O-parts, *spatial) and merged back in the same order into this step's input."""
        step, dim = self.step, self.dims
        if before.produced is None or step.data_shape != before.produced or self.data_perm:
            return
        if before.fast_out_shape is None:
            return  # nothing to undo (and this step's input view is already skipped)
        parts = len(before.step.out_shape) - 1 - (dim - 2)  # the axes O was split into
        if self.in_nhwc != before.out_nhwc:
            return
        if self.in_nhwc:
            standard = (0, *range(1 + parts, 1 + parts + dim - 2), *range(1, 1 + parts))
            if step.nhwc_perm != standard:
                return
        before.fast_out_shape = None
        self.fast_nhwc_view, self.fast_data_shape = None, None

    def fast(
        self, data: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The step with the views :meth:`merge_after` found redundant skipped."""
        return self._run(
            data, weight, bias, self.fast_nhwc_view, self.fast_data_shape, self.fast_out_shape
        )

    def __call__(
        self, data: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._run(data, weight, bias, self.nhwc_view, self.data_shape, self.out_shape)

    def _run(
        self,
        data: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        nhwc_view: tuple | None,
        data_shape: tuple[int, ...] | None,
        out_shape: tuple[int, ...] | None,
    ) -> torch.Tensor:
        if nhwc_view is not None:
            perm, shape, back = nhwc_view
            data = data.permute(perm).reshape(shape).permute(back)
        else:
            if self.data_perm is not None:
                data = data.permute(self.data_perm)
            if data_shape is not None:
                data = data.reshape(data_shape)
        if self.pad is not None:
            data = F.pad(data, self.pad, mode=self.pad_mode)
        if self.matmul:
            out = pointwise_matmul(data, weight, self.in_nhwc, self.out_nhwc, bias)
        else:
            if self.pointwise:
                data = pointwise_conv_input(data, False)
            out = self.conv(data, weight, bias, *self.args)
        if out_shape is not None:
            out = out.reshape(out_shape)
        return out


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
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """A 1x1, stride-1, ungrouped convolution as one matrix product over the pixels.

    Args:
        x: (N, C, *spatial) (two or three spatial axes), channels-first or channels-last
            (``nhwc``; inferred from the strides if None).
        weight: (O, C, 1, ...).
        out_nhwc: the output's layout (default: the input's). A change of layout costs no copy:
            the product reads its operand transposed (measured as fast as the plain product,
            where a separate conversion of a 32x256x14x14 map took 0.9 ms on 2 threads).
        bias: (O,), added by the product itself (``addmm`` / ``baddbmm``), or None.

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
    o = mat.shape[0]
    if n == 1:
        # one image (a Linear layer's single row too): plain 2-D products, no batch
        rows = x.permute(0, *range(2, dim), 1).reshape(p, c) if nhwc else x.reshape(c, p).T
        if out_nhwc:
            y = rows @ mat.T if bias is None else torch.addmm(bias, rows, mat.T)
            return y.view(1, *spatial, o).permute(0, dim - 1, *range(1, dim - 1))
        y = mat @ rows.T if bias is None else torch.addmm(bias.view(o, 1), mat, rows.T)
        return y.view(1, o, *spatial)
    if out_nhwc:
        if nhwc:
            rows = pixels.reshape(n * p, c)
            y = rows @ mat.T if bias is None else torch.addmm(bias, rows, mat.T)
        elif bias is None:
            y = torch.bmm(pixels, mat.T.expand(n, c, -1))
        else:
            y = torch.baddbmm(bias.view(1, 1, o), pixels, mat.T.expand(n, c, -1))
        return y.view(n, *spatial, -1).permute(0, dim - 1, *range(1, dim - 1))
    if bias is None:
        y = torch.bmm(mat.expand(n, -1, c), pixels.transpose(1, 2))
    else:
        y = torch.baddbmm(bias.view(1, o, 1), mat.expand(n, -1, c), pixels.transpose(1, 2))
    return y.view(n, -1, *spatial)


def _step_weight(step: DataStep, factor: torch.Tensor) -> torch.Tensor:
    """The conv2d weight of a data step from its (possibly contracted) factor."""
    if step.expand_equation is not None:
        eyes = [torch.eye(n, dtype=factor.dtype, device=factor.device) for n in step.expand_eyes]
        return torch.einsum(step.expand_equation, factor, *eyes).reshape(step.weight_shape)
    weight = factor
    if step.factor_perm is not None:
        weight = weight.permute(step.factor_perm)
    # a weight with channels-last-like strides would switch conv2d's output layout
    weight = weight.reshape(step.weight_shape[0] // step.repeat, *step.weight_shape[1:])
    if step.repeat > 1 and step.fold_inner:
        # rows (group, new) -> (group, fold, new): each group's block repeated in place
        n_group = step.groups // step.repeat
        blocks = weight.reshape(n_group, 1, -1, *weight.shape[1:])
        return blocks.expand(-1, step.repeat, *blocks.shape[2:]).reshape(step.weight_shape)
    if step.repeat > 1:
        return weight.repeat(step.repeat, *([1] * (weight.dim() - 1)))
    return weight.contiguous()
