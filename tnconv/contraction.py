"""The conv-einsum planner and executor.

A factorized convolution is an einsum whose operands are the feature map ``x[b, s, H, W]`` and
the kernel's factors, where the kernel's spatial indices ``h, w`` are *convolution-coupled* to the
feature map's ``H, W`` rather than summed against them. This module

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
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import opt_einsum
import torch
import torch.nn.functional as F
from opt_einsum.paths import PathOptimizer, ssa_to_linear

from .calibration import CostTable, effective_macs
from .errors import EquationError
from .factorization import Factorization, parse_equation

_FORMATS = {False: torch.contiguous_format, True: torch.channels_last}

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

# Without a cost table (plan_conv(..., tables=None)): moving one element costs about as much
# time as 8 multiply-adds, the thin 1x1 and depthwise steps of a tensor network being memory
# bound on CPUs. FactorizedConv2d always plans with a measured table (tnconv.calibration).
MEMORY_WEIGHT = 8.0
# ...but a plan may not execute more than 10% more FLOPs than the FLOP-optimal order: the FLOPs
# tnconv reports are the ones a layer runs, and they must stay close to the network's minimum.
FLOP_SLACK = 0.10


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    # numbers.Integral covers numpy integers, which torch.nn.Conv2d accepts too
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _pair(value: Any, name: str) -> tuple[int, int]:
    if _is_int(value):
        return (int(value), int(value))
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or a pair of ints; got {value!r}")


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, explicit padding (top, bottom, left, right), dilation and padding mode."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    padding_mode: str = "zeros"

    @classmethod
    def make(
        cls,
        kernel_size: tuple[int, int],
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        padding_mode: str = "zeros",
    ) -> ConvGeometry:
        """Normalise ``torch.nn.Conv2d``-style arguments (padding int, pair, 'same', 'valid')."""
        st, dl = _pair(stride, "stride"), _pair(dilation, "dilation")
        if min(st) < 1 or min(dl) < 1:
            raise ValueError(f"stride and dilation must be >= 1; got stride={st}, dilation={dl}")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(
                f"padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular'; "
                f"got {padding_mode!r}"
            )
        if isinstance(padding, str):
            if padding == "valid":
                pad = (0, 0, 0, 0)
            elif padding == "same":
                if st != (1, 1):
                    raise ValueError("padding='same' requires stride 1 (as in torch.nn.Conv2d)")
                # torch puts the odd extra pixel of an even kernel at the bottom / right
                th, tw = dl[0] * (kernel_size[0] - 1), dl[1] * (kernel_size[1] - 1)
                pad = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
            else:
                raise ValueError(
                    f"padding must be 'same', 'valid', an int or a pair; got {padding!r}"
                )
        else:
            ph, pw = _pair(padding, "padding")
            if min(ph, pw) < 0:
                raise ValueError(f"padding must be >= 0; got {padding!r}")
            pad = (ph, ph, pw, pw)
        return cls(st, pad, dl, padding_mode)

    def output_size(self, size: tuple[int, int], kernel: tuple[int, int]) -> tuple[int, int]:
        """Output (H', W') of an input (H, W) convolved with a (kh, kw) kernel."""
        out = []
        for axis in range(2):
            n = size[axis] + self.padding[2 * axis] + self.padding[2 * axis + 1]
            span = self.dilation[axis] * (kernel[axis] - 1) + 1
            if n < span:
                raise ValueError(
                    f"input of size {tuple(size)} (padded {n} on axis {axis}) is smaller than "
                    f"the dilated kernel extent {span}"
                )
            out.append((n - span) // self.stride[axis] + 1)
        return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# the network: a factorization's structure with canonical single-character labels
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConvNetwork:
    """Structure of a factorized kernel, relabelled to opt_einsum symbols.

    ``terms`` are the factors' index strings, ``in_modes`` the input-channel (S) indices,
    ``out_modes`` the output-channel (T) indices, ``h`` / ``w`` the coupled spatial indices and
    ``sizes`` the size of every index. ``batch``, ``H``, ``W`` label the feature map's own axes.
    """

    terms: tuple[str, ...]
    in_modes: str
    out_modes: str
    h: str
    w: str
    sizes: tuple[tuple[str, int], ...]
    batch: str
    H: str
    W: str

    @classmethod
    def from_factorization(cls, f: Factorization) -> ConvNetwork:
        inputs, out = parse_equation(f.equation)
        letters = sorted({c for t in inputs for c in t} | set(out))
        if len(letters) + 3 > 52:
            raise EquationError(
                f"equation {f.equation!r} has {len(letters)} indices; at most 49 are supported"
            )
        sym = {c: opt_einsum.get_symbol(i) for i, c in enumerate(letters)}
        sizes = {sym[c]: n for c, n in f.index_sizes().items()}
        extra = [opt_einsum.get_symbol(len(letters) + i) for i in range(3)]
        modes = f.modes
        assert modes is not None
        return cls(
            terms=tuple("".join(sym[c] for c in t) for t in inputs),
            in_modes="".join(sym[c] for c in modes[1]),
            out_modes="".join(sym[c] for c in modes[0]),
            h=sym[modes[2]],
            w=sym[modes[3]],
            sizes=tuple(sorted(sizes.items())),
            batch=extra[0],
            H=extra[1],
            W=extra[2],
        )

    @property
    def size_of(self) -> dict[str, int]:
        return dict(self.sizes)

    @property
    def kernel_size(self) -> tuple[int, int]:
        s = self.size_of
        return s[self.h], s[self.w]

    def einsum(self) -> str:
        """The conv-einsum as opt_einsum sees it: feature map first, h / w left uncoupled."""
        data = self.batch + self.in_modes + self.H + self.W
        return ",".join((data, *self.terms)) + "->" + self.batch + self.out_modes + self.H + self.W


# ---------------------------------------------------------------------------------------------
# pricing a step with a machine's cost table
# ---------------------------------------------------------------------------------------------
def step_seconds(
    table: CostTable,
    n_fold: int,
    n_group: int,
    spatial: bool,
    macs: float,
    elems_in: float,
    elems_out: float,
    fold: str | None = None,
    channels: tuple[int, int] = (0, 0),
) -> tuple[float, bool]:
    """Predicted seconds of one data step and whether its fold indices should run as conv
    groups (weight repeated) rather than be folded into the batch. ``channels``: the conv's
    (in, out) channels per group, for :func:`~tnconv.calibration.effective_macs`.

    Folding into the batch is a view in NCHW but, in channels-last, moves the folded axes
    between the channel and batch dimensions (a copy of the step's input and output); a grouped
    conv needs no copy in either layout but runs at the grouped-conv rate. ``fold`` forces
    ``"batch"`` or ``"groups"``.
    """
    elems = elems_in + elems_out
    cin, cout = channels

    def kind(groups: int) -> float:
        eff = effective_macs(table, macs, groups, cin, cout)
        if groups > 1:
            return table.grouped.seconds(eff, elems)
        if spatial:
            return table.spatial.seconds(eff, elems)
        return pointwise_seconds(table, macs, elems, cin, cout)[0]

    batch = kind(n_group)
    if n_fold == 1:
        return batch, False
    if table.layout == "nhwc":
        batch += table.copy * elems
    grouped = kind(n_fold * n_group)
    if fold == "batch":
        return batch, False
    if fold == "groups":
        return grouped, True
    return (grouped, True) if grouped < batch else (batch, False)


def pointwise_seconds(
    table: CostTable, macs: float, elems: float, cin: int, cout: int
) -> tuple[float, bool]:
    """Predicted seconds of an ungrouped 1x1 step and whether it runs as a matrix product
    (:func:`pointwise_matmul`) rather than a conv2d call: whichever the table prices lower."""
    conv = table.pointwise.seconds(effective_macs(table, macs, 1, cin, cout), elems)
    matmul = table.matmul.seconds(macs, elems)
    return (matmul, True) if matmul < conv else (conv, False)


# ---------------------------------------------------------------------------------------------
# the path optimizer
# ---------------------------------------------------------------------------------------------
class ConvPathOptimizer(PathOptimizer):
    """opt_einsum path optimizer for a conv-einsum whose operand 0 is the feature map.

    Exact dynamic programming over subsets (a conv kernel has few factors). A step that touches
    the feature map multiplies ``B * H_out * W_out`` times the channel sizes it multiplies (at
    the resolution before the factor carrying ``h`` / ``w`` and after it, per axis). With a
    :class:`~tnconv.calibration.CostTable` a step is priced in predicted seconds (its kind's
    call overhead, multiply-adds and elements moved, the cheaper of batch-folding and grouping
    its fold indices, see :func:`step_seconds`); factor-only steps cost an einsum call each, or
    nothing when ``frozen`` (folded once and reused). Without a table a step costs its
    multiply-adds plus ``memory_weight`` x the elements it moves.
    """

    def __init__(
        self,
        network: ConvNetwork,
        in_hw: tuple[int, int],
        out_hw: tuple[int, int],
        memory_weight: float = MEMORY_WEIGHT,
        table: CostTable | None = None,
        frozen: bool = False,
    ) -> None:
        self.network = network
        self.in_hw = in_hw
        self.out_hw = out_hw
        self.memory_weight = memory_weight
        self.table = table
        self.frozen = frozen
        self.cost: float = math.nan  # cost of the last path found

    def __call__(
        self,
        inputs: list[frozenset[str]],
        output: frozenset[str],
        size_dict: dict[str, int],
        memory_limit: int | None = None,
    ) -> list[tuple[int, ...]]:
        net = self.network
        n = len(inputs)
        letters = sorted(set().union(*inputs) | set(output))
        bit = {c: 1 << i for i, c in enumerate(letters)}
        sizes = {c: size_dict[c] for c in letters}

        def mask_of(chars: Any) -> int:
            m = 0
            for c in chars:
                m |= bit[c]
            return m

        op_mask = [mask_of(t) for t in inputs]
        out_mask = mask_of(output)
        skip = mask_of((net.batch, net.H, net.W))  # the feature map's own axes
        h_bit, w_bit = bit[net.h], bit[net.w]
        coupled = h_bit | w_bit  # live until the data step that consumes them
        owner_h = next(i for i, m in enumerate(op_mask) if m & h_bit)
        owner_w = next(i for i, m in enumerate(op_mask) if m & w_bit)
        batch = size_dict[net.batch]
        full = (1 << n) - 1

        union: dict[int, int] = {}

        def indices(s: int) -> int:
            if s not in union:
                m, k = 0, 0
                while s >> k:
                    if s >> k & 1:
                        m |= op_mask[k]
                    k += 1
                union[s] = m
            return union[s]

        def open_of(s: int) -> int:
            return indices(s) & (indices(full & ~s) | out_mask | coupled)

        prod_cache: dict[int, int] = {}

        def prod(m: int) -> int:
            if m not in prod_cache:
                p = 1
                for c in letters:
                    if m & bit[c]:
                        p *= sizes[c]
                prod_cache[m] = p
            return prod_cache[m]

        table = self.table

        def factor_step_cost(a: int, b: int) -> float:
            if self.frozen:
                return 0.0  # contracted once, reused by every forward
            macs = prod(open_of(a) | open_of(b))
            if table is None:
                return macs
            return table.einsum + table.pointwise.mac * macs

        # factor-only sub-networks: classic subset DP on contraction counts
        factor_ids = list(range(1, n))
        fcost: dict[int, float] = {}
        fsplit: dict[int, tuple[int, int]] = {}
        for k in factor_ids:
            fcost[1 << k] = 0.0
        subsets = sorted(range(1, 1 << n), key=lambda s: bin(s).count("1"))
        for s in subsets:
            if s & 1 or s in fcost:
                continue
            low = s & -s
            best = math.inf
            sub = (s - 1) & s
            while sub:
                if sub & low:  # each unordered split once
                    rest = s & ~sub
                    c = fcost[sub] + fcost[rest] + factor_step_cost(sub, rest)
                    if c < best:
                        best, fsplit[s] = c, (sub, rest)
                sub = (sub - 1) & s
            fcost[s] = best

        def data_step_cost(t: int, u: int) -> float:
            d = open_of(t) & ~skip & ~coupled
            fi = open_of(u)
            need = open_of(t | u) & ~skip & ~coupled
            contracted = d & fi & ~need
            grouped = d & fi & need
            new = fi & ~d & ~coupled
            fold = d & ~fi
            kh = sizes[net.h] if fi & h_bit else 1
            kw = sizes[net.w] if fi & w_bit else 1
            hb = self.out_hw[0] if t >> owner_h & 1 else self.in_hw[0]
            wb = self.out_hw[1] if t >> owner_w & 1 else self.in_hw[1]
            ha = self.out_hw[0] if (t | u) >> owner_h & 1 else self.in_hw[0]
            wa = self.out_hw[1] if (t | u) >> owner_w & 1 else self.in_hw[1]
            out_elems = batch * prod(fold) * prod(grouped) * prod(new) * ha * wa
            macs = out_elems * prod(contracted) * kh * kw
            in_elems = batch * prod(d) * hb * wb
            if table is not None:
                spatial = kh * kw > 1
                return step_seconds(
                    table,
                    prod(fold),
                    prod(grouped),
                    spatial,
                    macs,
                    in_elems,
                    out_elems,
                    channels=(prod(contracted), prod(new)),
                )[0]
            return macs + self.memory_weight * (in_elems + out_elems)

        dcost: dict[int, float] = {1: 0.0}
        dchoice: dict[int, tuple[int, int]] = {}
        for s in subsets:
            if not s & 1 or s == 1:
                continue
            factors = s & ~1
            best = math.inf
            sub = factors
            while sub:
                prev = s & ~sub
                c = dcost[prev] + fcost[sub] + data_step_cost(prev, sub)
                if c < best:
                    best, dchoice[s] = c, (prev, sub)
                sub = (sub - 1) & factors
            dcost[s] = best
        self.cost = dcost[full]

        # rebuild the order as an SSA path, then as opt_einsum's linear path
        ssa: list[tuple[int, int]] = []
        next_id = [n]

        def emit_factors(s: int) -> int:
            if s & (s - 1) == 0:
                return s.bit_length() - 1
            a, b = fsplit[s]
            ia, ib = emit_factors(a), emit_factors(b)
            ssa.append((ia, ib))
            next_id[0] += 1
            return next_id[0] - 1

        def emit_data(s: int) -> int:
            if s == 1:
                return 0
            prev, sub = dchoice[s]
            i_prev = emit_data(prev)
            i_sub = emit_factors(sub)
            ssa.append((i_prev, i_sub))
            next_id[0] += 1
            return next_id[0] - 1

        emit_data(full)
        return ssa_to_linear(ssa)


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
@dataclass
class _Operand:
    indices: str
    is_data: bool
    slot: int  # position in the executor's operand list


@dataclass(frozen=True)
class FactorStep:
    """Contract two weight operands with ``torch.einsum``.

    ``flops`` follows torch.utils.flop_counter: 2 per multiply-add of a contraction, 0 for a
    broadcast (outer / elementwise) product.
    """

    left: int
    right: int
    equation: str
    flops: int
    macs: int  # multiplies (-adds), whether or not anything is summed


@dataclass(frozen=True)
class DataStep:
    """Contract the feature map with one weight operand as a single ``conv2d``."""

    factor: int
    data_perm: tuple[int, ...] | None  # permutation of the data tensor before reshaping
    data_shape: tuple[int, ...]  # conv input (B * fold, groups * contracted, H, W)
    # channels-last execution: permute to (B, fold, H, W, groups, contracted), reshape to
    # (B * fold, H, W, groups * contracted), and view as NCHW
    nhwc_perm: tuple[int, ...]
    factor_perm: tuple[int, ...] | None
    weight_shape: tuple[int, int, int, int]  # (groups * new, contracted, kh', kw')
    groups: int
    stride: tuple[int, int]
    padding: tuple[int, int]  # symmetric padding handed to conv2d
    pad: tuple[int, int, int, int] | None  # explicit F.pad (left, right, top, bottom) if needed
    padding_mode: str
    dilation: tuple[int, int]
    out_shape: tuple[int, ...]  # (B, *fold, *groups, *new, H', W')
    flops: int
    # > 1: the fold indices run as conv groups with the weight repeated this many times
    # (channels (fold, groups, contracted)) instead of being folded into the batch
    repeat: int = 1
    seconds: float = math.nan  # predicted by the cost table (nan without one)
    # a pointwise step run as one matrix product over the pixels instead of a conv2d call
    matmul: bool = False

    @property
    def pointwise(self) -> bool:
        """A 1x1, stride-1, unpadded step: the spatial axes can be flattened."""
        return (
            self.weight_shape[2:] == (1, 1)
            and self.stride == (1, 1)
            and self.padding == (0, 0)
            and self.pad is None
        )


@dataclass
class ConvPlan:
    """A replayable sequence of einsum / conv2d steps for one input shape."""

    input_shape: tuple[int, int, int, int]
    output_shape: tuple[int, int, int, int]
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
                o, c, kh, kw = step.weight_shape
                kind = f"{kh}x{kw} conv" if (kh, kw) != (1, 1) else "1x1 conv"
                if step.matmul:
                    kind = "1x1 conv as matmul"
                grp = f", groups={step.groups}" if step.groups > 1 else ""
                fold = step.data_shape[0] // self.input_shape[0]
                bat = f", batch x{fold}" if fold > 1 else ""
                if step.repeat > 1:
                    bat = f", weight x{step.repeat} over groups"
                lines.append(
                    f"{kind} {c * step.groups}->{o}{grp}{bat}, stride={step.stride} "
                    f"({step.flops} FLOPs)"
                )
        return lines

    def fold_factors(self, factors: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        """The conv2d weight of every data step (factor-only steps contracted, reshaped,
        repeated), keyed ``-1 - step index``: what a frozen layer computes once and reuses."""
        ops: dict[int, torch.Tensor] = dict(enumerate(factors, start=1))
        slot = len(factors) + 1
        weights: dict[int, torch.Tensor] = {}
        for k, step in enumerate(self.steps):
            if isinstance(step, FactorStep):
                ops[slot] = torch.einsum(step.equation, ops[step.left], ops[step.right])
                slot += 1
            else:
                weights[-1 - k] = _step_weight(step, ops[step.factor])
        return weights

    def __call__(
        self,
        x: torch.Tensor,
        factors: Sequence[torch.Tensor],
        bias: torch.Tensor | None = None,
        folded: dict[int, torch.Tensor] | None = None,
        between: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the plan on ``x`` (B, S, H, W) with ``factors``; returns (B, T, H', W').

        ``folded`` (from :meth:`fold_factors` on the same factors) skips every weights-only
        computation. ``between(j, y)``, if given, replaces the feature map ``y`` produced by the
        j-th data step (j = 0, 1, ...) whenever another data step follows (e.g. to quantize the
        feature maps between a layer's steps); the last step's output is left to the caller.
        """
        # The steps run in the input's memory layout and so does the output, as with
        # torch.nn.Conv2d, unless the plan converts an NCHW input (``convert``).
        nhwc = (
            x.dim() == 4
            and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
        )
        converted = self.convert and not nhwc
        # a conversion next to a 1x1 step runs inside its matrix product (read or written
        # transposed) instead of as a copy of the whole feature map
        fuse_in, fuse_out = converted and self.fused_in, converted and self.fused_out
        if converted and not fuse_in:
            x = x.contiguous(memory_format=torch.channels_last)
        nhwc = nhwc or converted  # the layout the steps run in
        ops: list[torch.Tensor | None] = [x.reshape(self.data_shape), *factors]
        data_steps = sum(isinstance(step, DataStep) for step in self.steps)
        j = 0  # index of the data step
        for k, step in enumerate(self.steps):
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
                n, c, h, w = step.data_shape
                data = data.permute(step.nhwc_perm).reshape(n, h, w, c).permute(0, 3, 1, 2)
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
                out = F.conv2d(
                    data, weight, None, step.stride, step.padding, step.dilation, step.groups
                )
            ops[0] = out.reshape(step.out_shape)
            if between is not None and j + 1 < data_steps:
                ops[0] = between(j, ops[0])
            j += 1
        y = ops[0]
        assert y is not None
        if self.final_perm is not None:
            y = y.permute(self.final_perm)
        y = y.reshape(self.output_shape)
        # the input's layout (a no-op unless regrouped, or converted without a fused last step)
        y = y.contiguous() if converted else y.contiguous(memory_format=_FORMATS[nhwc])
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
        return y

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


def pointwise_conv_input(x: torch.Tensor, nhwc: bool) -> torch.Tensor:
    """The input a 1x1, stride-1 conv2d step is given: an NCHW map (N, C, H, W) as a
    (N, C, 1, H*W) image, which oneDNN's NCHW 1x1 kernels run faster; channels-last unchanged."""
    if nhwc:
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
        x: (N, C, H, W), NCHW or channels-last (``nhwc``; inferred from the strides if None).
        weight: (O, C, 1, 1).
        out_nhwc: the output's layout (default: the input's). A change of layout costs no copy:
            the product reads its operand transposed (measured as fast as the plain product,
            where a separate conversion of a 32x256x14x14 map took 0.9 ms on 2 threads).

    Returns:
        (N, O, H, W), the values of ``F.conv2d(x, weight)``: in channels-last the pixels are the
        rows of an (N*H*W, C) view, in NCHW each image is a (C, H*W) view; ``x`` is not copied.
    """
    n, c, h, w = x.shape
    mat = weight.reshape(weight.shape[0], c)
    if nhwc is None:
        nhwc = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    out_nhwc = nhwc if out_nhwc is None else out_nhwc
    if nhwc:
        pixels = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # a view: rows are pixels
    else:
        pixels = x.reshape(n, c, h * w).transpose(1, 2)  # a view, read transposed
    # explicit mm / bmm: torch.matmul may fold a batch into a matrix product and then copy
    # its transposed result (measured: a 32x128x28x28 copy costing more than the product)
    if out_nhwc:
        if nhwc:
            y = pixels.reshape(n * h * w, c) @ mat.T
        else:
            y = torch.bmm(pixels, mat.T.expand(n, c, -1))
        return y.view(n, h, w, -1).permute(0, 3, 1, 2)
    return torch.bmm(mat.expand(n, -1, c), pixels.transpose(1, 2)).view(n, -1, h, w)


def _step_weight(step: DataStep, factor: torch.Tensor) -> torch.Tensor:
    """The conv2d weight of a data step from its (possibly contracted) factor."""
    weight = factor
    if step.factor_perm is not None:
        weight = weight.permute(step.factor_perm)
    # a weight with channels-last-like strides would switch conv2d's output layout
    weight = weight.reshape(step.weight_shape[0] // step.repeat, *step.weight_shape[1:])
    if step.repeat > 1:
        return weight.repeat(step.repeat, 1, 1, 1)
    return weight.contiguous()


def plan_conv(
    network: ConvNetwork,
    geometry: ConvGeometry,
    input_shape: tuple[int, int, int, int],
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
    """Plan the factorized convolution of an input of shape (B, S, H, W) in ``layout``.

    With ``tables`` (a :class:`~tnconv.calibration.CostTable` per layout, "nchw" / "nhwc") the
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
    if fold not in (None, "batch", "groups"):
        raise ValueError(f"fold must be None, 'batch' or 'groups'; got {fold!r}")
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
        elems = math.prod(other.input_shape) * (not other.fused_in) + math.prod(
            other.output_shape
        ) * (not other.fused_out)
        other.cost += tables["nhwc"].copy * elems
        if convert or other.cost < plan.cost:
            return other
    return plan


def _plan_in(
    network: ConvNetwork,
    geometry: ConvGeometry,
    input_shape: tuple[int, int, int, int],
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

        def work(p: ConvPlan) -> int:  # what runs per forward pass
            return p.data_macs if frozen else p.macs

        if work(plan) > (1.0 + flop_slack) * work(lean):
            if table is not None:  # price the FLOP-optimal order with the table
                return _build_plan(*args, lean.path, 0.0, table, frozen, fold, layout)
            return lean
    return plan


def _build_plan(
    network: ConvNetwork,
    geometry: ConvGeometry,
    input_shape: tuple[int, int, int, int],
    path: Sequence[tuple[int, int]] | None,
    memory_weight: float,
    table: CostTable | None = None,
    frozen: bool = False,
    fold: str | None = None,
    layout: str = "nchw",
) -> ConvPlan:
    b, s, h_in, w_in = input_shape
    sz = network.size_of
    kh, kw = network.kernel_size
    h_out, w_out = geometry.output_size((h_in, w_in), (kh, kw))
    sizes = dict(sz)
    sizes.update({network.batch: b, network.H: h_in, network.W: w_in})
    in_sizes = tuple(sz[c] for c in network.in_modes)
    out_channels = math.prod(sz[c] for c in network.out_modes)
    if math.prod(in_sizes) != s:
        raise ValueError(
            f"input has {s} channels, the factorized kernel expects {math.prod(in_sizes)}"
        )

    optimizer = ConvPathOptimizer(
        network,
        (h_in, w_in),
        (h_out, w_out),
        memory_weight,
        table if fold is None else None,
        frozen,
    )
    equation = network.einsum()
    shapes = [(b, *in_sizes, h_in, w_in)] + [tuple(sizes[c] for c in t) for t in network.terms]
    if path is not None:
        path = [tuple(p) for p in path]
        optimizer.cost = math.nan
    elif len(shapes) == 2:
        path = [(0, 1)]
    else:
        found, _ = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=optimizer)
        path = [tuple(p) for p in found]

    plan = ConvPlan(
        input_shape=(b, s, h_in, w_in),
        output_shape=(b, out_channels, h_out, w_out),
        data_shape=(b, *in_sizes, h_in, w_in),
        path=path,
        cost=optimizer.cost,
        layout=layout,
        frozen=frozen,
    )
    operands = [_Operand(network.in_modes, True, 0)] + [
        _Operand(t, False, i + 1) for i, t in enumerate(network.terms)
    ]
    # h / w stay live until the data step that consumes them
    output = set(network.out_modes) | {network.h, network.w}
    next_slot = len(operands)
    consumed = {"h": False, "w": False}
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
            (b, h_in, w_in, h_out, w_out),
            order_hint[step_no],
            table,
            fold,
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
        plan.final_perm = (0, *perm, len(final.indices) + 1, len(final.indices) + 2)
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
    consumed: dict[str, bool],
    dims: tuple[int, int, int, int, int],
    next_use: dict[str, int],
    table: CostTable | None = None,
    fold_mode: str | None = None,
) -> tuple[DataStep, str]:
    b, h_in, w_in, h_out, w_out = dims
    fidx = factor.indices
    fold = [c for c in data if c not in fidx]
    grouped = [c for c in data if c in fidx and c in rest]
    contracted = [c for c in data if c in fidx and c not in rest]
    new = [c for c in fidx if c not in data and c not in (net.h, net.w)]
    # the indices used last go first (outermost), so later steps find them in order; the
    # output's own indices go first of all, in the order the output wants them
    never = 1 << 30
    out_pos = {c: i for i, c in enumerate(net.out_modes)}
    new.sort(key=lambda c: (-next_use.get(c, never), out_pos.get(c, 0)))

    has_h, has_w = net.h in fidx, net.w in fidx
    cur_h = h_out if consumed["h"] else h_in
    cur_w = w_out if consumed["w"] else w_in
    order = fold + grouped + contracted
    perm = tuple([0] + [data.index(c) + 1 for c in order] + [len(data) + 1, len(data) + 2])
    data_perm = None if perm == tuple(range(len(perm))) else perm
    nhwc_perm = tuple(
        [0]
        + [data.index(c) + 1 for c in fold]
        + [len(data) + 1, len(data) + 2]
        + [data.index(c) + 1 for c in grouped + contracted]
    )
    n_fold = math.prod(sizes[c] for c in fold)
    n_group = math.prod(sizes[c] for c in grouped)
    n_con = math.prod(sizes[c] for c in contracted)
    n_new = math.prod(sizes[c] for c in new)

    f_order = grouped + new + contracted + ([net.h] if has_h else []) + ([net.w] if has_w else [])
    fperm = tuple(fidx.index(c) for c in f_order)
    factor_perm = None if fperm == tuple(range(len(fperm))) else fperm
    kh = sizes[net.h] if has_h else 1
    kw = sizes[net.w] if has_w else 1

    top, bottom, left, right = geo.padding
    ph = (top, bottom) if has_h else (0, 0)
    pw = (left, right) if has_w else (0, 0)
    symmetric = ph[0] == ph[1] and pw[0] == pw[1] and geo.padding_mode == "zeros"
    padding = (ph[0], pw[0]) if symmetric else (0, 0)
    pad = None if symmetric else (pw[0], pw[1], ph[0], ph[1])
    stride = (geo.stride[0] if has_h else 1, geo.stride[1] if has_w else 1)
    dilation = (geo.dilation[0] if has_h else 1, geo.dilation[1] if has_w else 1)
    if has_h:
        consumed["h"] = True
    if has_w:
        consumed["w"] = True
    new_h = h_out if consumed["h"] else h_in
    new_w = w_out if consumed["w"] else w_in

    new_indices = "".join(fold + grouped + new)
    out_shape = (b, *(sizes[c] for c in new_indices), new_h, new_w)
    out_elems = b * n_fold * n_group * n_new * new_h * new_w
    flops = 2 * out_elems * n_con * kh * kw
    seconds, as_groups = math.nan, fold_mode == "groups" and n_fold > 1
    in_elems = b * n_fold * n_group * n_con * cur_h * cur_w
    if table is not None:
        seconds, as_groups = step_seconds(
            table,
            n_fold,
            n_group,
            kh * kw > 1,
            flops // 2,
            in_elems,
            out_elems,
            fold_mode,
            (n_con, n_new),
        )
    repeat = n_fold if as_groups else 1
    matmul = (
        table is not None
        and (n_fold * n_group if as_groups else n_group) == 1
        and kh * kw == 1
        and stride == (1, 1)
        and padding == (0, 0)
        and pad is None
        and pointwise_seconds(table, flops / 2, in_elems + out_elems, n_con, n_new)[1]
    )
    if as_groups:
        # channels (fold, groups, contracted), groups = fold x groups, weight repeated per fold
        data_shape = (b, n_fold * n_group * n_con, cur_h, cur_w)
        hw = [len(data) + 1, len(data) + 2]
        nhwc_perm = tuple([0, *hw] + [data.index(c) + 1 for c in order])
        groups = n_fold * n_group
    else:
        data_shape = (b * n_fold, n_group * n_con, cur_h, cur_w)
        groups = n_group
    weight_shape = (repeat * n_group * n_new, n_con, kh, kw)
    step = DataStep(
        factor=factor.slot,
        data_perm=data_perm,
        data_shape=data_shape,
        nhwc_perm=nhwc_perm,
        factor_perm=factor_perm,
        weight_shape=weight_shape,
        groups=groups,
        stride=stride,
        padding=padding,
        pad=pad,
        padding_mode=geo.padding_mode,
        dilation=dilation,
        out_shape=out_shape,
        flops=flops,
        repeat=repeat,
        seconds=seconds,
        matmul=matmul,
    )
    return step, new_indices
