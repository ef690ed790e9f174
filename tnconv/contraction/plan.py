"""Planning: a :class:`ConvPlan` of torch ops for one input shape (:func:`plan_conv`).

The path optimizer's contraction order is turned into factor-only ``torch.einsum`` steps and
feature-map x factor ``conv2d`` steps (:mod:`tnconv.contraction.steps`), each data step choosing
how its indices map to the conv's batch, groups and channels and, with a cost table, whether
its fold indices run as groups and whether a 1x1 step runs as a matrix product.
"""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import opt_einsum
import torch

from .cost import (
    EXPAND_SLACK,
    FLOP_SLACK,
    MEMORY_WEIGHT,
    CostTable,
    effective_macs,
    pointwise_seconds,
    step_seconds,
)
from .execute import compiled as _compiled
from .execute import fold_factors as _fold_factors
from .execute import run_plan as _run_plan
from .geometry import ConvGeometry
from .network import ConvNetwork
from .paths import ConvPathOptimizer
from .steps import DataStep, FactorStep

__all__ = ["ConvPlan", "plan_conv"]


@dataclass
class _Operand:
    indices: str
    is_data: bool
    slot: int  # position in the executor's operand list


@dataclass
class ConvPlan:
    """A replayable sequence of einsum / conv2d steps for one input shape."""

    input_shape: tuple[int, ...]  # (B, S, *spatial) on the executor's axes
    output_shape: tuple[int, ...]  # (B, T, *spatial')
    data_shape: tuple[int, ...]  # x reshaped so the S-group indices are separate axes
    steps: list[FactorStep | DataStep] = field(default_factory=list)
    final_perm: tuple[int, ...] | None = None
    path: list[tuple[int, ...]] = field(default_factory=list)
    cost: float = math.nan
    layout: str = "nchw"  # the layout the plan was priced for
    # run an NCHW input in channels-last (converted in, and the output back): the cost table
    # predicted the conversions cost less than they save
    convert: bool = False
    frozen: bool = False  # priced for folded factor-only steps (inference)
    # compiled per input layout (is_channels_last) on first use by execute.run_plan
    runners: dict[bool, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def flops(self) -> int:
        """FLOPs of one forward pass (2 per multiply-add, as torch.utils.flop_counter counts)."""
        return sum(step.flops for step in self.steps)

    @property
    def macs(self) -> int:
        """Multiply(-add)s of one forward pass, broadcast products included (what the
        path optimizer minimises when memory traffic is weighed at 0)."""
        return sum(s.macs if isinstance(s, FactorStep) else s.flops // 2 for s in self.steps)

    @property
    def data_macs(self) -> int:
        """Multiply-adds of the steps that touch the feature map (all a frozen layer runs)."""
        return sum(step.flops // 2 for step in self.steps if isinstance(step, DataStep))

    @property
    def expanded_macs(self) -> int:
        """The multiply-adds expanded steps add (by the zeros of their identity blocks)."""
        return sum(
            s.flops // 2 - s.flops // 2 // s.expand
            for s in self.steps
            if isinstance(s, DataStep) and s.expand > 1
        )

    @property
    def data_flops(self) -> int:
        """FLOPs of the steps that touch the feature map (what a frozen layer still pays)."""
        return sum(step.flops for step in self.steps if isinstance(step, DataStep))

    def describe(self) -> list[str]:
        """One human-readable line per step."""
        lines = []
        for step in self.steps:
            if isinstance(step, FactorStep):
                lines.append(f"einsum {step.equation} (weights only, {step.flops} FLOPs)")
            else:
                o, c, *extent = step.weight_shape
                box = "x".join(str(k) for k in extent)
                kind = f"{box} conv"
                if step.matmul:
                    kind = f"{box} conv as matmul"
                grp = f", groups={step.groups}" if step.groups > 1 else ""
                fold = step.data_shape[0] // self.input_shape[0]
                bat = f", batch x{fold}" if fold > 1 else ""
                if step.repeat > 1:
                    bat = f", weight x{step.repeat} over groups"
                if step.expand > 1:
                    bat = f", expanded x{step.expand} (identity blocks)"
                lines.append(
                    f"{kind} {c * step.groups}->{o}{grp}{bat}, stride={step.stride} "
                    f"({step.flops} FLOPs)"
                )
        return lines

    def fold_factors(self, factors: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        """The conv2d weight of every data step (factor-only steps contracted, reshaped,
        repeated), keyed ``-1 - step index``: what a frozen layer computes once and reuses."""
        return _fold_factors(self, factors)

    def __call__(
        self,
        x: torch.Tensor,
        factors: Sequence[torch.Tensor],
        bias: torch.Tensor | None = None,
        folded: dict[int, torch.Tensor] | None = None,
        between: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the plan on ``x`` (B, S, H, W) with ``factors``; returns (B, T, H', W').
        Arguments as for :func:`tnconv.contraction.execute.run_plan`."""
        return _run_plan(self, x, factors, bias, folded, between)

    def runner(self, nhwc: bool) -> Callable[..., torch.Tensor]:
        """The plan compiled for channels-last (``nhwc``) or NCHW inputs, called as
        ``runner(x, factors, bias, folded, between)`` (:func:`~tnconv.contraction.execute.run_plan`
        without the layout check; what a layer's forward calls)."""
        return _compiled(self, nhwc)

    @property
    def fused_in(self) -> bool:
        """A converting plan's first data step is a matrix product that reads NCHW itself."""
        data = [s for s in self.steps if isinstance(s, DataStep)]
        return self.convert and bool(data) and data[0].matmul

    @property
    def fused_out(self) -> bool:
        """A converting plan's last data step is a matrix product that writes NCHW itself."""
        data = [s for s in self.steps if isinstance(s, DataStep)]
        return self.convert and bool(data) and data[-1].matmul and self.final_perm is None


def plan_conv(
    network: ConvNetwork,
    geometry: ConvGeometry,
    input_shape: tuple[int, ...],
    memory_weight: float = MEMORY_WEIGHT,
    path: Sequence[tuple[int, int]] | None = None,
    flop_slack: float = FLOP_SLACK,
    *,
    layout: str = "nchw",
    tables: Mapping[str, CostTable] | None = None,
    frozen: bool = False,
    fold: str | None = None,
    convert: bool | None = None,
) -> ConvPlan:
    """Plan the factorized convolution of an input of shape (B, S, *spatial) in ``layout``.

    ``input_shape`` has one spatial size per executor axis of ``network`` (two for Linear, 1-D
    and 2-D kernels, whose missing axes have size 1; three for 3-D kernels); ``geometry`` may
    have fewer axes (it is lifted with unit axes in front).

    With ``tables`` (a :class:`~tnconv.contraction.cost.CostTable` per layout, "nchw" / "nhwc") the
    order minimises the predicted seconds of the steps in ``layout``, each data step choosing
    between folding and grouping its fold indices; for an NCHW input the channels-last plan
    plus the two layout conversions is taken when predicted faster (``convert`` forces or
    forbids it). ``frozen`` prices factor-only steps at nothing (they are folded once).
    Without tables the order minimises multiply-adds + ``memory_weight`` x elements moved.

    Either way the order is replaced by the FLOP-optimal one when it would run more than
    ``1 + flop_slack`` times its multiply-adds per forward pass (frozen: those touching the
    feature map): the FLOPs tnconv reports are those it runs and stay near the network's
    minimum. ``path`` forces an order (opt_einsum's linear format,
    operand 0 being the feature map); ``fold`` forces "batch" or "groups" for every data step.
    """
    if layout not in ("nchw", "nhwc"):
        raise ValueError(f"layout must be 'nchw' or 'nhwc'; got {layout!r}")
    if fold not in (None, "batch", "groups", "expand"):
        raise ValueError(f"fold must be None, 'batch', 'groups' or 'expand'; got {fold!r}")
    if tables is None:
        if convert:
            raise ValueError("convert=True needs cost tables")
        return _plan_in(
            network,
            geometry,
            input_shape,
            memory_weight,
            path,
            flop_slack,
            None,
            frozen,
            fold,
            "nchw" if layout == "nchw" else "nhwc",
        )
    plan = _plan_in(
        network,
        geometry,
        input_shape,
        memory_weight,
        path,
        flop_slack,
        tables[layout],
        frozen,
        fold,
        layout,
    )
    if layout == "nchw" and convert is not False:
        other = _plan_in(
            network,
            geometry,
            input_shape,
            memory_weight,
            path,
            flop_slack,
            tables["nhwc"],
            frozen,
            fold,
            "nhwc",
        )
        other.convert = True
        table = tables["nhwc"]
        fused = _fused_conversions(other, table)
        # (the same plan when no end step can take the conversion: priced once)
        candidates = [other] if fused is other else [other, fused]
        for c in candidates:
            if not c.fused_in:
                c.cost += table.to_nhwc.seconds(0, math.prod(c.input_shape))
            if not c.fused_out:
                c.cost += table.to_nchw.seconds(0, math.prod(c.output_shape))
        best = min(candidates, key=lambda c: c.cost)
        if convert or best.cost < plan.cost:
            return best
    return plan


def _fused_conversions(plan: ConvPlan, table: CostTable) -> ConvPlan:
    """``plan`` (channels-last, run on a converted NCHW input) with its first and last data
    steps run as matrix products where they are plain 1x1 steps: a product reads / writes the
    NCHW map itself, so the conversion copy at that end disappears (the per-step choice
    between conv and product cannot see that saving; the caller prices both plans)."""
    data = [k for k, s in enumerate(plan.steps) if isinstance(s, DataStep)]
    if not data:
        return plan
    steps = list(plan.steps)
    ends = {data[0]} | ({data[-1]} if plan.final_perm is None else set())
    for k in ends:
        step = steps[k]
        assert isinstance(step, DataStep)
        if step.matmul or not step.pointwise or step.groups != 1 or step.repeat != 1:
            continue
        elems = math.prod(step.data_shape) + math.prod(step.out_shape)
        seconds = table.matmul.seconds(step.flops / 2, elems)
        steps[k] = dataclasses.replace(step, matmul=True, seconds=seconds)
    if steps == plan.steps:
        return plan
    fused = dataclasses.replace(plan, steps=steps)
    fused.cost = plan.cost + sum(
        s.seconds - o.seconds for s, o in zip(steps, plan.steps, strict=True) if s is not o
    )
    return fused


def _plan_in(
    network: ConvNetwork,
    geometry: ConvGeometry,
    input_shape: tuple[int, ...],
    memory_weight: float,
    path: Sequence[tuple[int, int]] | None,
    flop_slack: float,
    table: CostTable | None,
    frozen: bool,
    fold: str | None,
    layout: str,
) -> ConvPlan:
    args = (network, geometry, input_shape)
    if path is not None:
        return _build_plan(*args, path, memory_weight, table, frozen, fold, layout)
    plan = _build_plan(*args, None, memory_weight, table, frozen, fold, layout)
    if memory_weight > 0 or table is not None:
        lean = _build_plan(*args, None, 0.0, None, frozen, fold, layout)

        def work(p: ConvPlan, expanded: bool = False) -> int:  # what runs per forward pass
            return (p.data_macs if frozen else p.macs) - (0 if expanded else p.expanded_macs)

        if work(plan) > (1.0 + flop_slack) * work(lean):
            # the order itself runs too many multiply-adds: the FLOP-optimal one instead
            plan = _build_plan(*args, lean.path, 0.0, table, frozen, fold, layout)
        if fold != "expand" and work(plan, True) > (1.0 + EXPAND_SLACK) * work(lean, True):
            plan = _build_plan(
                *args, plan.path, 0.0, table, frozen, fold, layout, allow_expand=False
            )
    return plan


def _build_plan(
    network: ConvNetwork,
    geometry: ConvGeometry,
    input_shape: tuple[int, ...],
    path: Sequence[tuple[int, int]] | None,
    memory_weight: float,
    table: CostTable | None = None,
    frozen: bool = False,
    fold: str | None = None,
    layout: str = "nchw",
    allow_expand: bool = True,
) -> ConvPlan:
    n_axes = len(network.spatial)
    if len(input_shape) != 2 + n_axes:
        raise ValueError(
            f"expected an input of shape (B, S, {n_axes} spatial sizes); got {tuple(input_shape)}"
        )
    b, s, *rest_in = input_shape
    sp_in = tuple(int(v) for v in rest_in)
    geometry = geometry.lifted(n_axes)
    sz = network.size_of
    sp_out = geometry.output_size(sp_in, network.kernel_size)
    sizes = dict(sz)
    sizes[network.batch] = b
    sizes.update(zip(network.axes, sp_in, strict=True))
    in_sizes = tuple(sz[c] for c in network.in_modes)
    out_channels = math.prod(sz[c] for c in network.out_modes)
    if math.prod(in_sizes) != s:
        raise ValueError(
            f"input has {s} channels, the factorized kernel expects {math.prod(in_sizes)}"
        )

    optimizer = ConvPathOptimizer(
        network,
        sp_in,
        sp_out,
        memory_weight,
        table if fold is None else None,
        frozen,
    )
    equation = network.einsum()
    shapes = [(b, *in_sizes, *sp_in)] + [tuple(sizes[c] for c in t) for t in network.terms]
    if path is not None:
        path = [tuple(p) for p in path]
        optimizer.cost = math.nan
    elif len(shapes) == 2:
        path = [(0, 1)]
    else:
        found, _ = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=optimizer)
        path = [tuple(p) for p in found]

    plan = ConvPlan(
        input_shape=(b, s, *sp_in),
        output_shape=(b, out_channels, *sp_out),
        data_shape=(b, *in_sizes, *sp_in),
        path=path,
        cost=optimizer.cost,
        layout=layout,
        frozen=frozen,
    )
    operands = [_Operand(network.in_modes, True, 0)] + [
        _Operand(t, False, i + 1) for i, t in enumerate(network.terms)
    ]
    # the spatial indices stay live until the data step that consumes them
    output = set(network.out_modes) | set(network.coupled)
    next_slot = len(operands)
    consumed = [False] * n_axes
    order_hint = _usage_order(operands, path, output)
    for step_no, pair in enumerate(path):
        i, j = sorted(pair)
        right = operands.pop(j)
        left = operands.pop(i)
        rest = set("".join(o.indices for o in operands)) | output
        if not left.is_data and not right.is_data:
            keep = "".join(dict.fromkeys(c for c in left.indices + right.indices if c in rest))
            eq = f"{left.indices},{right.indices}->{keep}"
            involved = set(left.indices + right.indices)
            # a step that sums an index (of size > 1) runs as a matmul (2 FLOPs per multiply-
            # add); a pure outer / elementwise product is a broadcast multiply, which torch's
            # flop counter does not count either (weights only, and tiny)
            sums = any(sizes[c] > 1 for c in involved - set(keep))
            flops = 2 * math.prod(sizes[c] for c in involved) if sums else 0
            macs = math.prod(sizes[c] for c in involved)
            plan.steps.append(FactorStep(left.slot, right.slot, eq, flops, macs))
            operands.append(_Operand(keep, False, next_slot))
            next_slot += 1
            continue
        data, factor = (left, right) if left.is_data else (right, left)
        step, new_indices = _data_step(
            data.indices,
            factor,
            rest,
            sizes,
            network,
            geometry,
            consumed,
            (b, sp_in, sp_out),
            order_hint[step_no],
            table,
            fold,
            layout,
            not operands,
            allow_expand,
        )
        plan.steps.append(step)
        operands.append(_Operand(new_indices, True, 0))
    if table is not None:
        # the cost of what is executed (a forced path or fold is priced here, not by the DP)
        plan.cost = sum(
            st.seconds
            if isinstance(st, DataStep)
            else (0.0 if frozen else table.einsum + table.pointwise.mac * st.macs)
            for st in plan.steps
        )
    (final,) = operands
    if final.indices != network.out_modes:
        perm = [final.indices.index(c) + 1 for c in network.out_modes]
        trail = range(len(final.indices) + 1, len(final.indices) + 1 + n_axes)
        plan.final_perm = (0, *perm, *trail)
    return plan


def _usage_order(
    operands: list[_Operand], path: list[tuple[int, ...]], output: set[str]
) -> list[dict[str, int]]:
    """For each step, the step at which each index is next consumed (output: never)."""
    ops = [o.indices for o in operands]
    events: list[set[str]] = []
    for pair in path:
        i, j = sorted(pair)
        b_, a_ = ops.pop(j), ops.pop(i)
        rest = set("".join(ops)) | output
        events.append(set(a_ + b_) - rest)  # indices that disappear in this step
        ops.append("".join(dict.fromkeys(c for c in a_ + b_ if c in rest)))
    hints = []
    for k in range(len(path)):
        when: dict[str, int] = {}
        for later in range(len(path) - 1, k, -1):
            for c in events[later]:
                when[c] = later
        hints.append(when)
    return hints


def _data_step(
    data: str,
    factor: _Operand,
    rest: set[str],
    sizes: dict[str, int],
    net: ConvNetwork,
    geo: ConvGeometry,
    consumed: list[bool],
    dims: tuple[int, tuple[int, ...], tuple[int, ...]],
    next_use: dict[str, int],
    table: CostTable | None = None,
    fold_mode: str | None = None,
    layout: str = "nchw",
    last: bool = False,
    allow_expand: bool = True,
) -> tuple[DataStep, str]:
    b, sp_in, sp_out = dims
    n_axes = len(sp_in)
    fidx = factor.indices
    coupled = set(net.coupled)
    fold = [c for c in data if c not in fidx]
    grouped = [c for c in data if c in fidx and c in rest]
    contracted = [c for c in data if c in fidx and c not in rest]
    new = [c for c in fidx if c not in data and c not in coupled]
    # the indices used last go first (outermost), so later steps find them in order; the
    # output's own indices go first of all, in the order the output wants them
    never = 1 << 30
    out_pos = {c: i for i, c in enumerate(net.out_modes)}
    new.sort(key=lambda c: (-next_use.get(c, never), out_pos.get(c, 0)))

    has = [c is not None and c in fidx for c in net.spatial]
    cur = tuple(o if done else i for i, o, done in zip(sp_in, sp_out, consumed, strict=True))
    order = fold + grouped + contracted
    trail = [len(data) + 1 + a for a in range(n_axes)]
    perm = tuple([0] + [data.index(c) + 1 for c in order] + trail)
    data_perm = None if perm == tuple(range(len(perm))) else perm
    channels = [data.index(c) + 1 for c in grouped + contracted]
    nhwc_perm = tuple([0] + [data.index(c) + 1 for c in fold] + trail + channels)
    n_fold = math.prod(sizes[c] for c in fold)
    n_group = math.prod(sizes[c] for c in grouped)
    n_con = math.prod(sizes[c] for c in contracted)
    n_new = math.prod(sizes[c] for c in new)

    carried = [c for c, h in zip(net.spatial, has, strict=True) if h]
    f_order = grouped + new + contracted + carried  # type: ignore[operator]
    fperm = tuple(fidx.index(c) for c in f_order)
    factor_perm = None if fperm == tuple(range(len(fperm))) else fperm
    kernel = tuple(sizes[c] if h else 1 for c, h in zip(net.spatial, has, strict=True))  # type: ignore[index]

    sides = [
        (geo.padding[2 * a], geo.padding[2 * a + 1]) if has[a] else (0, 0) for a in range(n_axes)
    ]
    symmetric = all(lo == hi for lo, hi in sides) and geo.padding_mode == "zeros"
    padding = tuple(lo for lo, _ in sides) if symmetric else (0,) * n_axes
    # F.pad lists the last axis first
    pad = None if symmetric else tuple(v for side in reversed(sides) for v in side)
    stride = tuple(geo.stride[a] if has[a] else 1 for a in range(n_axes))
    dilation = tuple(geo.dilation[a] if has[a] else 1 for a in range(n_axes))
    conv_args = {
        "stride": stride,
        "padding": padding,
        "pad": pad,
        "padding_mode": geo.padding_mode,
        "dilation": dilation,
    }
    for a in range(n_axes):
        consumed[a] = consumed[a] or has[a]
    after = tuple(o if done else i for i, o, done in zip(sp_in, sp_out, consumed, strict=True))

    new_indices = "".join(fold + grouped + new)
    out_elems = b * n_fold * n_group * n_new * math.prod(after)
    extent = math.prod(kernel)
    flops = 2 * out_elems * n_con * extent
    seconds, as_groups = math.nan, fold_mode == "groups" and n_fold > 1
    # run as conv groups, the fold indices may go inside the group indices (see _inner_fold)
    inner_order = grouped + fold + contracted
    inner = bool(grouped) and _inner_fold(data, fold, grouped, contracted, sizes)
    in_elems = b * n_fold * n_group * n_con * math.prod(cur)
    n_rep = n_fold * n_group
    # the last step writes the output's channel order itself when it can (no final permute)
    out_order = net.out_modes if last and set(net.out_modes) == set(new_indices) else None
    expand_eq = _expand_equation(data, fidx, fold + grouped, out_order or new_indices, carried, net)
    expand = fold_mode == "expand" and n_rep > 1 and expand_eq is not None
    if table is not None:
        seconds, as_groups = step_seconds(
            table,
            n_fold,
            n_group,
            extent > 1,
            flops // 2,
            in_elems,
            out_elems,
            fold_mode if fold_mode != "expand" else "batch",
            (n_con, n_new),
        )
        read = inner_order if as_groups and inner else order
        # the copies of the feature map this execution implies (a permute made contiguous; a
        # channels-last batch folding is priced by step_seconds itself)
        if (layout == "nchw" or as_groups or n_fold == 1) and _moves(data, read, sizes):
            seconds += table.copy * in_elems
        if last and out_order is not None and _moves(new_indices, out_order, sizes):
            seconds += table.copy * out_elems
        if n_rep > 1 and expand_eq is not None and allow_expand and fold_mode in (None, "expand"):
            # the alternative: fold and group indices as identity blocks of a dense conv
            macs = n_rep * flops // 2
            cin, cout = n_rep * n_con, n_rep * n_new
            elems = in_elems + out_elems
            if extent > 1:
                eff = effective_macs(table, macs, 1, cin, cout)
                dense = table.spatial.seconds(eff, elems)
            else:
                dense = pointwise_seconds(table, macs, elems, cin, cout)[0]
            if fold_mode == "expand" or dense < seconds:
                seconds, expand, as_groups = dense, True, False
    if expand:
        assert expand_eq is not None
        if out_order is not None:
            new_indices = out_order
        out_shape = (b, *(sizes[c] for c in new_indices), *after)
        data_shape = (b, n_rep * n_con, *cur)
        step = DataStep(
            factor=factor.slot,
            data_perm=None,
            data_shape=data_shape,
            nhwc_perm=tuple([0, *trail, *range(1, len(data) + 1)]),
            factor_perm=factor_perm,
            weight_shape=(n_rep * n_new, n_rep * n_con, *kernel),
            groups=1,
            **conv_args,
            out_shape=out_shape,
            flops=n_rep * flops,
            seconds=seconds,
            matmul=_runs_as_matmul(
                table,
                net,
                (stride, padding, pad),
                n_rep * flops / 2,
                in_elems + out_elems,
                (n_rep * n_con, n_rep * n_new) if extent == 1 else None,
            ),
            expand=n_rep,
            expand_equation=expand_eq,
            expand_eyes=tuple(sizes[c] for c in fold + grouped),
        )
        return step, new_indices
    fold_inner = as_groups and inner
    if fold_inner:
        # the conv's groups are (groups, fold): its output channels come out in that order; the
        # map is read as it is (_inner_fold)
        order, data_perm = inner_order, None
        new_indices = "".join(grouped + fold + new)
    out_shape = (b, *(sizes[c] for c in new_indices), *after)
    repeat = n_fold if as_groups else 1
    matmul = (n_fold * n_group if as_groups else n_group) == 1 and _runs_as_matmul(
        table,
        net,
        (stride, padding, pad),
        flops / 2,
        in_elems + out_elems,
        (n_con, n_new) if extent == 1 else None,
    )
    if as_groups:
        # channels (fold, groups, contracted), groups = fold x groups, weight repeated per fold
        data_shape = (b, n_fold * n_group * n_con, *cur)
        nhwc_perm = tuple([0, *trail] + [data.index(c) + 1 for c in order])
        groups = n_fold * n_group
    else:
        data_shape = (b * n_fold, n_group * n_con, *cur)
        groups = n_group
    weight_shape = (repeat * n_group * n_new, n_con, *kernel)
    step = DataStep(
        factor=factor.slot,
        data_perm=data_perm,
        data_shape=data_shape,
        nhwc_perm=nhwc_perm,
        factor_perm=factor_perm,
        weight_shape=weight_shape,
        groups=groups,
        **conv_args,
        out_shape=out_shape,
        flops=flops,
        repeat=repeat,
        fold_inner=fold_inner,
        seconds=seconds,
        matmul=matmul,
    )
    return step, new_indices


def _inner_fold(
    data: str, fold: list[str], grouped: list[str], contracted: list[str], sizes: dict[str, int]
) -> bool:
    """Whether running the fold indices as conv groups *inside* the group indices reads the
    feature map in place where the usual order (fold outside) would permute it."""
    return not _moves(data, grouped + fold + contracted, sizes) and _moves(
        data, fold + grouped + contracted, sizes
    )


def _runs_as_matmul(
    table: CostTable | None,
    net: ConvNetwork,
    geometry: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...] | None],
    macs: float,
    elems: float,
    channels: tuple[int, int] | None,
) -> bool:
    """An ungrouped step runs as one matrix product over the pixels: a 1x1 (``channels`` =
    (in, out); None for a spatial kernel), stride-1, unpadded step the table prices lower as a
    product."""
    stride, padding, pad = geometry
    if table is None or channels is None or any(v != 1 for v in stride):
        return False
    if any(padding) or pad is not None:
        return False
    # a Linear layer's rows are one (1, C, 1, M) map, which oneDNN's 1x1 convs run up to 3x
    # slower than the matrix product the cost table (fitted on image maps) predicts
    return net.spatial_dims == 0 or pointwise_seconds(table, macs, elems, *channels)[1]


def _moves(have: str, want: str, sizes: dict[str, int]) -> bool:
    """Reordering channel indices ``have`` to ``want`` moves memory (size-1 indices aside)."""
    return [c for c in have if sizes[c] > 1] != [c for c in want if sizes[c] > 1]


def _expand_equation(
    data: str, fidx: str, reps: list[str], out: str, carried: list[str], net: ConvNetwork
) -> str | None:
    """The einsum giving an expanded step's weight (out channels ``out``, in channels ``data``,
    then the kernel indices ``carried``) from its factor (indices ``fidx``) and one identity
    per index of ``reps`` (the fold and group indices: their output copy is a fresh letter);
    None when torch.einsum has no letters left."""
    letters = string.ascii_letters
    if any(c not in letters for c in fidx + data):
        return None
    used = set(net.einsum()) | set(fidx) | set(data)
    free = [c for c in letters if c not in used]
    if len(free) < len(reps):
        return None
    star = dict(zip(reps, free, strict=False))
    lhs = ",".join([fidx, *(star[c] + c for c in reps)])
    return f"{lhs}->{''.join(star.get(c, c) for c in out)}{data}{''.join(carried)}"
