"""Quantized factors and feature maps: ``tnconv.quantize``.

:func:`quantize` returns a copy of a model whose factorized layers (``FactorizedLinear``,
``FactorizedConv1d`` / ``2d`` / ``3d``) run with quantized factors and, when asked, quantized
feature maps at the layer's input, between its steps and at its output; dense ``nn.Conv2d`` and
``nn.Linear`` layers are quantized the same way, so a dense and a compressed model can be
compared at equal bit widths. The four quantized factorized classes share one implementation
(``_QuantizedFactorized``): the contraction order is fixed on the executor's input (a Linear's
rows as a (1, S, 1, M) map, a Conv1d's (B, S, L) as (B, S, 1, L), a Conv3d's on conv3d steps).

* Weights (every factor, every dense kernel): symmetric, ``2**(bits-1) - 1`` levels each side of
  zero, one scale per output channel (or one per tensor). A factor's output channel is the axis
  that becomes the output channels of the conv step consuming it (found from the layer's
  contraction plan), so that step could run as a per-channel int8 convolution.
* Feature maps: affine (scale and zero point), ``2**bits`` levels over a range calibrated on the
  batches given (running min / max, widened to contain 0).
* Training: quantization is simulated in floating point ("fake quantization") and its gradient is
  the straight-through estimator, 1 inside the representable range and 0 outside, so a quantized
  model fine-tunes like any other. Weight scales follow the weights at every forward pass.

Scales are rounded up to 16 significant bits. That costs at most 2**-16 of the step, and makes the
quantizer idempotent in exact arithmetic (``code * scale`` is exact in float32), so a model
reloaded from its int8 codes and scales (:func:`tnconv.save`) gives bit-identical outputs.

Real integer kernels: :func:`to_int8` (see docs/quantization.md for what runs in int8).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from ._modes import check_not_meta, plain_copy
from .compress import conv_input_shapes, default_input_size, set_module
from .contraction import ConvPlan, DataStep, plan_conv
from .errors import TnconvError
from .layers import (
    FactorizedConv1d,
    FactorizedConv2d,
    FactorizedConv3d,
    FactorizedLayer,
    FactorizedLinear,
)

# what summary notes for a factorized layer quantize() leaves in floating point
FLOAT_NOTE = (
    "float: quantize covers FactorizedLinear / Conv1d / Conv2d / Conv3d (and their subclasses), "
    "not other FactorizedLayer subclasses"
)

__all__ = [
    "ActivationQuantizer",
    "CalibrationError",
    "QuantConfig",
    "QuantizationError",
    "QuantizedConv2d",
    "QuantizedFactorizedConv1d",
    "QuantizedFactorizedConv2d",
    "QuantizedFactorizedConv3d",
    "QuantizedFactorizedLinear",
    "QuantizedLinear",
    "default_reduce_range",
    "dequantize_weight",
    "fake_quantize",
    "int8_saturates",
    "quantization_note",
    "quantize",
    "quantize_weight",
    "quantized_factorized_type",
    "quantized_layers",
    "weight_scale",
]

log = logging.getLogger(__name__)

_SCALE_BITS = 16  # significant bits kept in a weight scale (see the module docstring)


class QuantizationError(TnconvError, ValueError):
    """A bad quantization setting (bit width, axis) or a model that cannot be quantized."""


class CalibrationError(QuantizationError):
    """No calibration data, or a feature-map quantizer that never saw any."""


class QuantConfig(BaseModel):
    """Bit widths of a quantized layer: weights always, feature maps optionally (None: fp32)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    weight_bits: int = Field(ge=2, le=8, strict=True)
    activation_bits: int | None = Field(default=None, ge=2, le=8, strict=True)
    per_channel: bool = True
    # feature maps on half the levels (codes 0 .. 2**(bits-1) - 1): what int8 kernels that add
    # pairs of u8 x s8 products in int16 need to be exact (see :func:`int8_saturates`)
    reduce_range: bool = False


# ---------------------------------------------------------------------------------------------
# the quantizer
# ---------------------------------------------------------------------------------------------
class _FakeQuant(torch.autograd.Function):
    """Quantize-dequantize with the clipped straight-through gradient."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: int, hi: int
    ) -> torch.Tensor:
        t = x / scale + zero
        codes = torch.clamp(torch.round(t), lo, hi)
        ctx.save_for_backward((t >= lo - 0.5) & (t <= hi + 0.5))
        return (codes - zero) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float, lo: int, hi: int
) -> torch.Tensor:
    """``(clamp(round(x / scale + zero), lo, hi) - zero) * scale``, with gradient 1 where ``x``
    lies in the representable range and 0 outside (straight-through estimator). ``scale`` and
    ``zero`` broadcast against ``x`` and receive no gradient."""
    zero_t = torch.as_tensor(zero, dtype=x.dtype, device=x.device)
    return _FakeQuant.apply(x, scale.detach().to(x.dtype), zero_t, lo, hi)


def _round_scale_up(s: torch.Tensor) -> torch.Tensor:
    """Round positive ``s`` up to ``_SCALE_BITS`` significant bits (exact in float32)."""
    mantissa, exponent = torch.frexp(s)
    step = float(2**_SCALE_BITS)
    return torch.ldexp(torch.ceil(mantissa * step) / step, exponent)


def _check_bits(bits: Any, name: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise QuantizationError(f"{name} must be an int from 2 to 8; got {bits!r}")
    return bits


def weight_scale(w: torch.Tensor, bits: int, axis: int | None) -> torch.Tensor:
    """Symmetric scale of ``w`` at ``bits``: max |w| / (2**(bits-1) - 1) over the whole tensor
    (``axis=None``) or per slice along ``axis``; shaped to broadcast against ``w``. Rounded up to
    16 significant bits; an all-zero slice gets scale 1."""
    _check_bits(bits, "weight_bits")
    levels = 2 ** (bits - 1) - 1
    w = w.detach()
    if axis is None:
        peak = w.abs().amax().reshape([1] * w.ndim)
    else:
        if not -w.ndim <= axis < w.ndim:
            raise QuantizationError(f"axis {axis} out of range for a {w.ndim}-D weight")
        axis %= w.ndim
        dims = [d for d in range(w.ndim) if d != axis]
        peak = w.abs().amax(dim=dims, keepdim=True) if dims else w.abs()
    scale = torch.where(peak > 0, peak / levels, torch.ones_like(peak))
    return _round_scale_up(scale)


def quantize_weight(
    w: torch.Tensor, bits: int, axis: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (int8, in [-(2**(bits-1) - 1), 2**(bits-1) - 1]) and the scale of ``w``;
    ``codes * scale`` is the quantized weight."""
    scale = weight_scale(w, bits, axis)
    levels = 2 ** (bits - 1) - 1
    codes = torch.clamp(torch.round(w.detach() / scale), -levels, levels).to(torch.int8)
    return codes, scale


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes * scale`` in ``dtype`` (exact: a scale has 16 significant bits)."""
    return codes.to(dtype) * scale.to(dtype)


def _fake_quantize_weight(w: torch.Tensor, bits: int, axis: int | None) -> torch.Tensor:
    levels = 2 ** (bits - 1) - 1
    return fake_quantize(w, weight_scale(w, bits, axis), 0.0, -levels, levels)


class ActivationQuantizer(nn.Module):
    """Affine fake quantization of a feature map over a calibrated range.

    While ``calibrating`` it records the running min / max of what passes through (and returns
    its input unchanged); afterwards it maps ``x`` onto ``2**bits`` levels spanning
    ``[min(lo, 0), max(hi, 0)]`` with the straight-through gradient. In training mode (fine-
    tuning) the range follows the batches' min / max as an exponential moving average with
    weight ``momentum`` (as torch's QAT observers do); in eval mode it is fixed. With
    ``synchronize`` (set by the training helpers under a ``torch.distributed`` process group)
    that min / max is taken over every rank's batch (one all-reduce), so the range follows the
    global batch as in a 1-process run.
    """

    lo: torch.Tensor
    hi: torch.Tensor
    synchronize: bool = False  # class default: layers pickled before it existed read False

    def __init__(self, bits: int, momentum: float = 0.1, reduce_range: bool = False) -> None:
        super().__init__()
        self.bits = _check_bits(bits, "activation_bits")
        self.reduce_range = bool(reduce_range)
        self.momentum = momentum
        self.calibrating = False
        self.register_buffer("lo", torch.tensor(math.inf))
        self.register_buffer("hi", torch.tensor(-math.inf))

    @property
    def calibrated(self) -> bool:
        return bool(self.lo <= self.hi)

    @property
    def top(self) -> int:
        """The largest code: ``2**bits - 1``, or ``2**(bits-1) - 1`` with ``reduce_range``."""
        return 2 ** (self.bits - self.reduce_range) - 1

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) of the calibrated range; the zero point is an integer value."""
        if not self.calibrated:
            raise CalibrationError(
                "a feature-map quantizer was never calibrated: the calibration batches did not "
                "reach this layer (or it runs a contraction step it was not calibrated for)"
            )
        lo = torch.clamp(self.lo, max=0.0)
        hi = torch.clamp(self.hi, min=0.0)
        top = self.top
        span = hi - lo
        scale = torch.where(span > 0, span / top, torch.ones_like(span))
        zero = torch.clamp(torch.round(-lo / scale), 0, top)
        return scale, zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            with torch.no_grad():
                self.lo.copy_(torch.minimum(self.lo, x.detach().amin().to(self.lo)))
                self.hi.copy_(torch.maximum(self.hi, x.detach().amax().to(self.hi)))
            return x
        if self.training and self.momentum > 0 and self.calibrated:
            # fine-tuning moves the feature maps: follow them as torch's QAT observers do
            with torch.no_grad():
                m = self.momentum
                low, high = x.detach().amin().to(self.lo), x.detach().amax().to(self.hi)
                if self.synchronize and torch.distributed.is_initialized():
                    both = torch.stack([-low, high])
                    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
                    low, high = -both[0], both[1]
                self.lo.mul_(1 - m).add_(m * low)
                self.hi.mul_(1 - m).add_(m * high)
        scale, zero = self.qparams()
        return fake_quantize(x, scale, zero, 0, self.top)

    def extra_repr(self) -> str:
        rng = f"[{float(self.lo):.4g}, {float(self.hi):.4g}]" if self.calibrated else "uncalibrated"
        reduced = ", reduce_range=True" if self.reduce_range else ""
        return f"bits={self.bits}{reduced}, range={rng}"


# ---------------------------------------------------------------------------------------------
# quantized layers
# ---------------------------------------------------------------------------------------------
class _Quantized:
    """What the three quantized layer types share: their config and feature-map quantizers."""

    config: QuantConfig
    input_quant: ActivationQuantizer | None
    output_quant: ActivationQuantizer | None

    def _set_activation_quantizers(self, between: int = 0) -> None:
        bits, reduce = self.config.activation_bits, self.config.reduce_range

        def make() -> ActivationQuantizer | None:
            return None if bits is None else ActivationQuantizer(bits, reduce_range=reduce)

        self.input_quant = make()  # type: ignore[assignment]
        self.output_quant = make()  # type: ignore[assignment]
        if isinstance(self, _QuantizedFactorized):
            self.between_quant = nn.ModuleList(
                [make() for _ in range(between)] if bits is not None else []  # type: ignore[misc]
            )

    def _quant_in(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quant is None else self.input_quant(x)

    def _quant_out(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.output_quant is None else self.output_quant(y)

    def extra_repr(self) -> str:
        # the layer's own description (the next class in the MRO), then the quantization
        c = self.config
        reduced = ", reduce_range=True" if c.reduce_range else ""
        return (
            f"{super().extra_repr()}, weight_bits={c.weight_bits}, "
            f"activation_bits={c.activation_bits}{reduced}, per_channel={c.per_channel}"
        )


# the layer-input size planned for when the calibration data does not reach a factorized layer
# (its contraction order is fixed for it): one per number of spatial modes
_PROBE_SPATIAL = {0: (), 1: (1024,), 2: (32, 32), 3: (8, 32, 32)}


class _QuantizedFactorized(_Quantized):
    """A factorized layer (any kind: Linear, Conv1d / 2d / 3d) whose factors and feature maps
    are fake-quantized; the concrete classes only add the layer class to it.

    It runs one fixed contraction order (``path``, chosen at quantization time for the
    calibration input), so the feature maps between its steps are the same tensors whatever
    the input size, and each has its own calibrated range. ``axes[k]`` is the per-channel axis
    of factor k (None: one scale for the factor). Plans are for the executor's (B, S, *spatial)
    input (:meth:`FactorizedLayer.executor_input`): a Linear's (..., S) rows run as a
    (1, S, 1, M) map, a Conv1d's (B, S, L) as (B, S, 1, L), a Conv3d on conv3d steps.
    """

    between_quant: nn.ModuleList
    path: tuple[tuple[int, ...], ...]
    axes: tuple[int | None, ...]
    # the factorized layer class this quantized class runs (set by each concrete class)
    layer_type: type[FactorizedLayer]

    @classmethod
    def from_layer(
        cls,
        layer: FactorizedLayer,
        config: QuantConfig,
        path: Sequence[Sequence[int]],
        axes: Sequence[int | None],
    ) -> FactorizedLayer:
        """A quantized copy of ``layer`` (an instance of :attr:`layer_type`; ``layer`` is left
        untouched) running the contraction order ``path`` with per-channel ``axes``."""
        if not isinstance(layer, cls.layer_type):
            raise QuantizationError(
                f"{cls.__name__} quantizes a {cls.layer_type.__name__}; got {type(layer).__name__}"
            )
        bias = None if layer.bias is None else layer.bias.detach()
        q: Any = cls._with_geometry(layer.factorization, bias, layer)  # type: ignore[attr-defined]
        q.info = dict(layer.info)
        device = layer.factors[0].device
        q = q.to(device)
        q.config = config
        q.path = tuple(tuple(int(i) for i in p) for p in path)
        if len(axes) != len(q.factors):
            raise QuantizationError(f"{len(axes)} axes for {len(q.factors)} factors")
        q.axes = tuple(axes)
        n_between = sum(isinstance(s, DataStep) for s in q._plan_with_path(None).steps) - 1
        q._set_activation_quantizers(max(n_between, 0))
        return q.to(device)  # type: ignore[no-any-return]

    def probe_input_shape(self) -> tuple[int, ...]:
        """A layer-input shape (the layer's own: (B, S, *spatial) or (M, S) for a Linear) for
        planning when no calibration batch reaches the layer: 32 x 32 pixels' worth of
        positions (1024 for a Conv1d, 8 x 32 x 32 for a Conv3d, one row for a Linear)."""
        layer: Any = self
        return (1, layer.in_channels, *_PROBE_SPATIAL[layer.spatial_dims])

    def _plan_with_path(self, shape: tuple[int, ...] | None) -> ConvPlan:
        """The plan of the stored order at the executor input ``shape`` (None: a shape on which
        every kernel axis fits; the step structure does not depend on it)."""
        layer: Any = self
        if shape is None:
            ks, ds = layer.kernel_size, layer.dilation
            size = (1, layer.in_channels, *(2 * d * k + 8 for k, d in zip(ks, ds, strict=True)))
            if layer.spatial_dims == 0:
                size = (8, layer.in_channels)
            shape = layer.executor_shape(size)
        return plan_conv(layer.network, layer.geometry, shape, path=self.path)  # type: ignore[arg-type]

    def plan_for(
        self, input_shape: tuple[int, ...], layout: str = "nchw", frozen: bool = False
    ) -> ConvPlan:
        """The plan of the fixed contraction order at the executor input ``input_shape``
        (B, S, *spatial); ``layout`` and ``frozen`` are accepted for the base class's callers
        and change nothing: the quantized layer always runs its stored order on the quantized
        factors."""
        del layout, frozen
        layer: Any = self
        key = tuple(int(n) for n in input_shape)
        plan = layer._plans.get(key)
        if plan is None:
            axes = len(layer.network.spatial)
            if len(key) != 2 + axes:
                raise ValueError(
                    f"expected an executor input of shape (B, S, {axes} spatial sizes); got {key}"
                )
            plan = self._plan_with_path(key)
            layer._plans[key] = plan
            if len(layer._plans) > 16:
                layer._plans.popitem(last=False)
        return plan  # type: ignore[no-any-return]

    def quantized_factors(self) -> list[torch.Tensor]:
        """The factors as the layer uses them: quantized, differentiable (straight-through)."""
        bits = self.config.weight_bits
        factors = self.factors  # type: ignore[attr-defined]
        return [_fake_quantize_weight(f, bits, a) for f, a in zip(factors, self.axes, strict=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output on ``x`` (its own input shape, as the float layer takes it) with
        quantized input, factors, between-step maps and output."""
        layer: Any = self
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{type(self).__name__}.forward expects a torch.Tensor input; got "
                f"{type(x).__module__}.{type(x).__name__}"
            )
        x, how = layer.executor_input(x)  # InputShapeError (a ValueError) on a bad shape
        x = self._quant_in(x)
        between = None
        if len(self.between_quant):

            def between(k: int, y: torch.Tensor) -> torch.Tensor:
                return self.between_quant[k](y)  # type: ignore[no-any-return]

        plan = self.plan_for(tuple(x.shape))
        y = plan(x, self.quantized_factors(), layer.bias, between=between)
        return layer.executor_output(self._quant_out(y), how)  # type: ignore[no-any-return]

    def to_tensor(self) -> torch.Tensor:
        """The dense kernel of the *quantized* factors."""
        return self._network(self.quantized_factors()).to_tensor()  # type: ignore[attr-defined,no-any-return]


class QuantizedFactorizedLinear(_QuantizedFactorized, FactorizedLinear):
    """A ``FactorizedLinear`` with fake-quantized factors and feature maps (see
    :class:`QuantizedFactorizedConv2d`)."""

    layer_type = FactorizedLinear


class QuantizedFactorizedConv1d(_QuantizedFactorized, FactorizedConv1d):
    """A ``FactorizedConv1d`` with fake-quantized factors and feature maps."""

    layer_type = FactorizedConv1d


class QuantizedFactorizedConv2d(_QuantizedFactorized, FactorizedConv2d):
    """A ``FactorizedConv2d`` whose factors and feature maps are fake-quantized.

    It runs one fixed contraction order (``path``, chosen at quantization time for the
    calibration input), so the feature maps between its steps are the same tensors whatever
    the input size, and each has its own calibrated range. ``axes[k]`` is the per-channel axis
    of factor k (None: one scale for the factor).
    """

    layer_type = FactorizedConv2d


class QuantizedFactorizedConv3d(_QuantizedFactorized, FactorizedConv3d):
    """A ``FactorizedConv3d`` with fake-quantized factors and feature maps (conv3d steps)."""

    layer_type = FactorizedConv3d


# the quantized class of each factorized layer kind (a subclass of a kind gets that kind's)
QUANTIZED_FACTORIZED_TYPES: dict[type[FactorizedLayer], type[_QuantizedFactorized]] = {
    FactorizedLinear: QuantizedFactorizedLinear,
    FactorizedConv1d: QuantizedFactorizedConv1d,
    FactorizedConv2d: QuantizedFactorizedConv2d,
    FactorizedConv3d: QuantizedFactorizedConv3d,
}


def quantized_factorized_type(layer: nn.Module) -> type[_QuantizedFactorized] | None:
    """The quantized class for the factorized ``layer`` (None: not one of the four kinds)."""
    for kind, quantized in QUANTIZED_FACTORIZED_TYPES.items():
        if isinstance(layer, kind):
            return quantized
    return None


class QuantizedConv2d(_Quantized, nn.Conv2d):
    """An ``nn.Conv2d`` with a fake-quantized kernel (per output channel) and feature maps."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, config: QuantConfig) -> QuantizedConv2d:
        q = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        q.load_state_dict(conv.state_dict())
        q.config = config
        q.axes = (0 if config.per_channel else None,)
        q._set_activation_quantizers()
        return q.to(conv.weight.device)

    def quantized_weight(self) -> torch.Tensor:
        return _fake_quantize_weight(self.weight, self.config.weight_bits, self.axes[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._conv_forward(self._quant_in(x), self.quantized_weight(), self.bias)
        return self._quant_out(y)


class QuantizedLinear(_Quantized, nn.Linear):
    """An ``nn.Linear`` with a fake-quantized weight (per output feature) and feature maps."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> QuantizedLinear:
        q = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        q.load_state_dict(linear.state_dict())
        q.config = config
        q.axes = (0 if config.per_channel else None,)
        q._set_activation_quantizers()
        return q

    def quantized_weight(self) -> torch.Tensor:
        return _fake_quantize_weight(self.weight, self.config.weight_bits, self.axes[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self._quant_in(x), self.quantized_weight(), self.bias)
        return self._quant_out(y)


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The quantized layers of ``model`` (name, module)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _Quantized)]


def data_first_path(layer: FactorizedLayer, input_shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """The contraction order, among those that take the factors into the feature map one at a
    time (every step a conv, no factor x factor product), with the fewest multiply-adds at the
    executor input ``input_shape`` (B, S, *spatial: :meth:`FactorizedLayer.executor_shape`).
    opt_einsum's linear format: the feature map is operand 0, then moves to
    the end of the list after each step."""
    n = len(layer.factors)
    best: tuple[int, list[tuple[int, int]]] | None = None
    for order in itertools.permutations(range(1, n + 1)):
        remaining = list(range(n + 1))  # operand ids in list order; 0 is the feature map
        path: list[tuple[int, int]] = []
        for f in order:
            i, j = sorted((remaining.index(0), remaining.index(f)))
            path.append((i, j))
            remaining = [r for r in remaining if r not in (0, f)] + [0]
        plan = plan_conv(layer.network, layer.geometry, input_shape, path=path)
        if best is None or plan.macs < best[0]:
            best = (plan.macs, path)
    assert best is not None
    return best[1]


def factor_axes(plan: ConvPlan, n_factors: int, per_channel: bool) -> list[int | None]:
    """Per-channel axis of each factor: the (outermost) factor index that the conv step
    consuming the factor turns into output channels; 0 for factors that are first contracted
    with other factors; None everywhere without ``per_channel``."""
    if not per_channel:
        return [None] * n_factors
    axes: list[int | None] = [0] * n_factors
    for step in plan.steps:
        if isinstance(step, DataStep) and 1 <= step.factor <= n_factors:
            perm = step.factor_perm
            # no output channel at all (the step only sums): one scale for the factor
            one_row = step.weight_shape[0] == 1
            axes[step.factor - 1] = None if one_row else (perm[0] if perm is not None else 0)
    return axes


# ---------------------------------------------------------------------------------------------
# model level
# ---------------------------------------------------------------------------------------------
def _first_input(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise CalibrationError(
        "calibration batches must be tensors or (inputs, ...) tuples (e.g. a DataLoader); got "
        f"{type(batch).__name__}"
    )


def quantize(
    model: nn.Module,
    weight_bits: int = 8,
    activation_bits: int | None = 8,
    calibration: Iterable[Any] | None = None,
    per_channel: bool = True,
    *,
    dense: bool = True,
    input_size: Sequence[int] | None = None,
    steps: Literal["conv", "planned"] = "conv",
    reduce_range: bool | None = None,
) -> nn.Module:
    """A copy of ``model`` whose layers run with quantized weights and feature maps.

    Args:
        model: any module; it is deep-copied, never modified.
        weight_bits: 2 to 8; every factor of a factorized layer (Linear, Conv1d / 2d / 3d)
            and (with ``dense``) every ``nn.Conv2d`` kernel and ``nn.Linear`` weight.
        activation_bits: 2 to 8, or None to keep feature maps in floating point. Quantized feature
            maps: each quantized layer's input and output, and the maps between a factorized
            layer's steps.
        calibration: batches (tensors, or ``(inputs, labels)`` pairs such as a ``DataLoader``)
            run through the model, in eval mode, to fix the feature-map ranges; required when
            ``activation_bits`` is set. Its first batch also fixes each factorized layer's
            contraction order.
        per_channel: one weight scale per output channel (else one per tensor).
        dense: also quantize ``nn.Conv2d`` and ``nn.Linear`` layers.
        input_size: the model's input size ((B, C, H, W) for an image model) fixing the
            contraction orders when there is no calibration data (default:
            :func:`tnconv.compress.default_input_size`); a factorized layer the forward pass does
            not reach is planned for ``probe_input_shape()`` (32 x 32 positions).
        steps: ``"conv"`` (default): every factor meets the feature map in its own conv step,
            in the cheapest such order (a Tucker-2 layer runs 1x1, kxk, 1x1 as in the paper),
            so every step has int8 weights and can run on int8 kernels (:func:`to_int8`);
            ``"planned"``: the planner's order, which may first multiply factors together
            (fewer FLOPs for some shapes, but those products are not int8 tensors).
        reduce_range: feature maps on ``2**(activation_bits-1)`` levels instead of
            ``2**activation_bits``, so x86 int8 kernels cannot saturate on CPUs without VNNI
            (:func:`int8_saturates`). Default (None): :func:`default_reduce_range` of the
            current quantized engine (True for x86 / fbgemm / onednn, False for qnnpack).

    Returns:
        The quantized model (train / eval mode as ``model``'s).

    Raises:
        QuantizationError: a bit width outside 2..8, or a model already quantized.
        CalibrationError: ``activation_bits`` without calibration batches, or an empty set.
        InvalidWeightError: ``activation_bits`` with a model on the meta device (calibration
            runs it; weight-only quantization of such a skeleton works).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize needs a torch.nn.Module; got {type(model).__name__}")
    _check_bits(weight_bits, "weight_bits")
    if activation_bits is not None:
        _check_bits(activation_bits, "activation_bits")
    if not isinstance(per_channel, bool):
        raise TypeError(f"per_channel must be a bool; got {per_channel!r}")
    if steps not in ("conv", "planned"):
        raise ValueError(f"steps must be 'conv' or 'planned'; got {steps!r}")
    if reduce_range is None:
        reduce_range = activation_bits is not None and default_reduce_range()
    if not isinstance(reduce_range, bool):
        raise TypeError(f"reduce_range must be a bool or None; got {reduce_range!r}")
    try:
        config = QuantConfig(
            weight_bits=weight_bits,
            activation_bits=activation_bits,
            per_channel=per_channel,
            reduce_range=reduce_range,
        )
    except ValidationError as exc:  # unreachable after the checks above; kept for safety
        raise QuantizationError(str(exc)) from exc
    if quantized_layers(model):
        raise QuantizationError("the model is already quantized; quantize the original instead")
    batches: list[torch.Tensor] = []
    if calibration is not None:
        if isinstance(calibration, torch.Tensor):
            calibration = [calibration]
        batches = [_first_input(b) for b in calibration]
        if not batches:
            raise CalibrationError("the calibration set is empty: give at least one batch")
    elif activation_bits is not None:
        raise CalibrationError(
            "quantizing feature maps needs calibration batches (calibration=loader); or pass "
            "activation_bits=None to quantize the weights only"
        )

    if activation_bits is not None:
        # calibration runs the model: a skeleton on the meta device has no values to run
        # (weight-only quantization of a skeleton works: the weights are quantized on the fly)
        for name, p in model.named_parameters():
            check_not_meta(p, f"parameter {name!r} (calibrating feature maps runs the model)")
    target = plain_copy(model)
    param = next(target.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    # the input shape of every factorized layer fixes its contraction order
    factorized = [
        (n, m) for n, m in target.named_modules() if quantized_factorized_type(m) is not None
    ]
    shapes: dict[str, tuple[int, ...]] = {}
    if factorized:
        if batches:
            size: Sequence[int] = tuple(batches[0].shape)
        else:
            size = input_size if input_size is not None else default_input_size(target)
        shapes = conv_input_shapes(target, size)
    for name, module in list(target.named_modules()):
        new: nn.Module | None = None
        kind = quantized_factorized_type(module)
        if kind is not None:
            assert isinstance(module, FactorizedLayer)
            probe = kind.probe_input_shape(module)  # type: ignore[arg-type]
            shape = module.executor_shape(shapes.get(name) or probe)
            if steps == "conv":
                path = data_first_path(module, shape)
                plan = plan_conv(module.network, module.geometry, shape, path=path)
            else:
                plan = module.plan_for(shape)
            axes = factor_axes(plan, len(module.factors), per_channel)
            new = kind.from_layer(module, config, plan.path, axes)
        elif isinstance(module, FactorizedLayer):
            # a factorized layer of none of the four kinds stays float and summary says so
            module._tnconv_quant_note = FLOAT_NOTE
        elif dense and type(module) is nn.Conv2d:
            new = QuantizedConv2d.from_conv(module, config)
        elif dense and type(module) is nn.Linear:
            new = QuantizedLinear.from_linear(module, config)
        if new is not None:
            set_module(target, name, new.train(module.training))
    if activation_bits is not None:
        calibrate(target, batches, device)
    return target


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], device: Any = None) -> None:
    """Reset and re-measure the feature-map ranges of every quantized layer of ``model`` on
    ``batches`` (run in eval mode; the model's mode is restored)."""
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
    if not quantizers:
        return
    for q in quantizers:
        q.lo.fill_(math.inf)
        q.hi.fill_(-math.inf)
        q.calibrating = True
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            x = _first_input(batch)
            model(x if device is None else x.to(device))
            seen += 1
    finally:
        for q in quantizers:
            q.calibrating = False
        model.train(was_training)
    if not seen:
        raise CalibrationError("the calibration set is empty: give at least one batch")
    missing = sum(not q.calibrated for q in quantizers)
    if missing:
        raise CalibrationError(
            f"{missing} feature-map quantizer(s) saw no data: the calibration batches do not "
            "reach every quantized layer"
        )


# ---------------------------------------------------------------------------------------------
# real int8 execution (PyTorch's quantized CPU kernels)
# ---------------------------------------------------------------------------------------------
# x86 int8 kernels (FBGEMM, oneDNN) without VNNI multiply u8 x s8 with ``vpmaddubsw``, which adds
# each pair of products in int16 with saturation: 255 * 127 * 2 > 32767, so full-range 8-bit
# feature maps can give wrong results (measured: 8 output steps off on a 3x3 conv). 7-bit
# feature maps (codes <= 127: 127 * 127 * 2 = 32258) cannot saturate. VNNI's ``vpdpbusd`` and
# QNNPACK's int16 x int16 products accumulate in int32 and never saturate.
_SATURATING_ENGINES = ("x86", "fbgemm", "onednn")


def _cpu_has_avx512_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512_vnni" in line.split()
    except OSError:
        pass
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(probe()) if probe is not None else False


def _isa_capped_below_vnni(engine: str) -> bool:
    """Whether the environment caps ``engine``'s instruction set below VNNI (the variables
    FBGEMM and oneDNN themselves read; tests use them to force the no-VNNI kernels)."""
    fbgemm = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper()
    onednn = (
        os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA", "")
    ).upper()
    fbgemm_capped = fbgemm in ("AVX2", "AVX512", "AVX512_256")
    onednn_capped = bool(onednn) and not any(
        t in onednn for t in ("VNNI", "BF16", "FP16", "AMX", "AVX10", "ALL")
    )
    if engine == "fbgemm":
        return fbgemm_capped
    if engine == "onednn":
        return onednn_capped
    return fbgemm_capped or onednn_capped  # x86 dispatches to either


def int8_saturates(engine: str | None = None) -> bool:
    """Whether ``engine``'s int8 conv / linear kernels can saturate on this CPU when feature
    maps use all 256 levels (default: ``torch.backends.quantized.engine``).

    True for the x86 engines (``x86``, ``fbgemm``, ``onednn``) on CPUs without AVX-512 VNNI
    (or with the instruction set capped below it by ``FBGEMM_ENABLE_INSTRUCTIONS`` /
    ``ONEDNN_MAX_CPU_ISA``); False for ``qnnpack``.
    """
    engine = engine or torch.backends.quantized.engine
    if engine not in _SATURATING_ENGINES:
        return False
    return not _cpu_has_avx512_vnni() or _isa_capped_below_vnni(engine)


def default_reduce_range(engine: str | None = None) -> bool:
    """``quantize``'s default ``reduce_range``: True for the x86 engines, whose int8 kernels
    saturate on some x86 CPUs with full-range feature maps, so a quantized model gives the same
    (exact) int8 results on every x86 CPU; False for ``qnnpack`` (ARM), which never saturates."""
    return (engine or torch.backends.quantized.engine) in _SATURATING_ENGINES


@contextlib.contextmanager
def _quantized_engine(engine: str) -> Iterator[None]:
    """Prepack under ``engine`` (the packed weights then run on that engine's kernels)."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def int8_engine(layer: nn.Module, engine: str | None = None) -> tuple[str, str]:
    """The engine ``layer`` runs on in int8 and why: ``engine`` (default: the current one)
    unless its kernels could saturate with the layer's feature-map range on this CPU, then
    ``qnnpack`` where available; ``("", reason)`` when no engine computes it exactly."""
    engine = engine or torch.backends.quantized.engine
    if engine not in torch.backends.quantized.supported_engines:
        raise QuantizationError(
            f"quantized engine {engine!r} is not available here; this build supports "
            f"{torch.backends.quantized.supported_engines}"
        )
    config: QuantConfig = layer.config  # type: ignore[attr-defined]
    if config.reduce_range or not int8_saturates(engine):
        chosen, why = engine, ""
    elif "qnnpack" in torch.backends.quantized.supported_engines:
        chosen, why = (
            "qnnpack",
            (
                f"{engine} int8 kernels saturate on this CPU (no AVX-512 VNNI) with full-range "
                "feature maps; runs on qnnpack (quantize with reduce_range=True to use "
                f"{engine})"
            ),
        )
    else:
        return "", (
            f"{engine} int8 kernels saturate on this CPU (no AVX-512 VNNI) with full-range "
            "feature maps and qnnpack is not available: quantize with reduce_range=True"
        )
    if isinstance(layer, _QuantizedFactorized) and layer.spatial_dims == 3:  # type: ignore[attr-defined]
        missing = _int8_conv_runs(5, chosen)
        if missing:
            return "", missing
    return chosen, why


def quantization_note(layer: nn.Module) -> str:
    """A short description of a quantized layer for :func:`tnconv.summary`: bit widths, the
    feature-map range, and the int8 engine :func:`to_int8` would use here ("" otherwise)."""
    if not isinstance(layer, _Quantized):
        return getattr(layer, "_tnconv_quant_note", "")
    c = layer.config
    text = f"w{c.weight_bits}"
    if c.activation_bits is not None:
        levels = 2 ** (c.activation_bits - c.reduce_range)
        text += (
            f"/a{c.activation_bits} ({levels} levels{', reduce_range' if c.reduce_range else ''})"
        )
    if int8_support(layer):
        return text + ", int8: no"
    engine, why = int8_engine(layer)
    if not engine:  # no engine computes it here (to_int8 gives the reason)
        return text + ", int8: no"
    return text + f", int8: {engine}" + (" (fallback)" if why else "")


def int8_support(layer: nn.Module) -> str:
    """Why ``layer`` cannot run on PyTorch's int8 kernels ("" when it can)."""
    if not isinstance(layer, _Quantized):
        return f"{type(layer).__name__} is not a quantized layer"
    if layer.config.activation_bits != 8:
        return (
            "int8 kernels requantize every output onto 256 levels: feature maps must be 8-bit "
            f"(activation_bits={layer.config.activation_bits})"
        )
    if isinstance(layer, _QuantizedFactorized):
        plan = layer._plan_with_path(None)
        if any(not isinstance(s, DataStep) for s in plan.steps):
            return (
                "its contraction order multiplies factors together before they meet the feature "
                "map; the product of two int8 factors is not an int8 tensor"
            )
        if any(s.pad is not None for s in plan.steps):
            return "asymmetric or non-zero padding has no int8 kernel"
        last = plan.steps[-1]
        assert isinstance(last, DataStep)
        if getattr(layer, "bias", None) is not None and (
            plan.final_perm is not None
            or last.weight_shape[0] != plan.output_shape[1]
            or last.data_shape[0] != plan.input_shape[0]
        ):
            return (
                "its last step's output channels are not the layer's (regrouped afterwards): "
                "the bias has no int8 conv to go into"
            )
    elif isinstance(layer, QuantizedConv2d) and layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r} has no int8 kernel"
    return ""


def _int8_weight(
    codes: torch.Tensor, scale: torch.Tensor, perm: tuple[int, ...] | None, shape: Sequence[int]
) -> torch.Tensor:
    """Codes and scales laid out as a conv / linear weight with one scale per output row."""
    scales = scale.expand(codes.shape)
    if perm is not None:
        codes, scales = codes.permute(perm), scales.permute(perm)
    codes = codes.reshape(shape).contiguous()
    scales = scales.reshape(shape[0], -1)
    if not bool((scales == scales[:, :1]).all()):
        raise QuantizationError("the weight scales do not run along the output channels")
    return torch._make_per_channel_quantized_tensor(
        codes,
        scales[:, 0].double(),
        torch.zeros(shape[0], dtype=torch.long),
        0,
    )


def _resolved_engine(layer: nn.Module, engine: str | None) -> str:
    chosen, why = int8_engine(layer, engine)
    if not chosen:
        raise QuantizationError(f"cannot run in int8: {why}")
    return chosen


def _quint8(x: torch.Tensor, q: ActivationQuantizer) -> torch.Tensor:
    scale, zero = q.qparams()
    s, z = float(scale), int(zero)
    if q.reduce_range:  # quint8 would clamp at 255; the reduced range ends at q.top
        x = x.clamp(-z * s, (q.top - z) * s)
    return torch.quantize_per_tensor(x, s, z, torch.quint8)


def _clamp_codes(q: torch.Tensor, top: int) -> torch.Tensor:
    """A quint8 tensor with its codes clamped to ``top`` (a requantized output's reduced range)."""
    if top >= 255:
        return q
    s, z = q.q_scale(), q.q_zero_point()
    if torch.backends.quantized.engine == "qnnpack":
        # torch 2.13's qnnpack quantized clamp is wrong on channels-last tensors (1.28 off on a
        # 0.02 step in a 2x3x4x5 check) and right on contiguous ones
        q = q.contiguous()
    return torch.clamp(q, -z * s, (top - z) * s)  # qnnpack's clamp needs both ends


# the int8 kernels of a plan's data steps, by the executor's tensor rank (4: conv2d, 5: conv3d)
_INT8_OPS = {4: ("conv2d_prepack", "conv2d"), 5: ("conv3d_prepack", "conv3d")}


@functools.cache
def _int8_conv_runs(rank: int, engine: str) -> str:
    """Why ``engine`` cannot run the int8 conv of executor rank ``rank`` here ("" when a tiny
    per-channel grouped conv runs): some PyTorch builds lack ``quantized::conv3d``."""
    prepack, op = _INT8_OPS[rank]
    spatial = rank - 2
    try:
        with _quantized_engine(engine):
            weight = torch._make_per_channel_quantized_tensor(
                torch.ones(2, 1, *[1] * spatial, dtype=torch.int8),
                torch.ones(2, dtype=torch.double),
                torch.zeros(2, dtype=torch.long),
                0,
            )
            packed = getattr(torch.ops.quantized, prepack)(
                weight, None, [1] * spatial, [0] * spatial, [1] * spatial, 2
            )
            x = torch.quantize_per_tensor(torch.ones(1, 2, *[2] * spatial), 1.0, 0, torch.quint8)
            getattr(torch.ops.quantized, op)(x, packed, 1.0, 0)
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        return f"quantized::{op} does not run on {engine} in this PyTorch build ({exc})"[:300]
    return ""


class Int8FactorizedLayer(nn.Module):
    """A quantized factorized layer run on PyTorch's int8 conv kernels: the input is quantized
    to uint8, every step is one ``quantized::conv2d`` (``conv3d`` for a Conv3d layer; int8
    weights, int32 accumulation, requantized to the next feature map's calibrated range), and
    the output is dequantized. Inputs and outputs have the layer's own shapes: a Linear's
    (..., S) rows run as the (1, S, 1, M) map of the float executor, a Conv1d's (B, S, L) as
    (B, S, 1, L). The concrete classes (``Int8FactorizedLinear`` / ``Conv1d`` / ``Conv2d`` /
    ``Conv3d``) only name the kind."""

    def __init__(self, layer: _QuantizedFactorized, engine: str | None = None) -> None:
        super().__init__()
        reason = int8_support(layer)
        if reason:
            raise QuantizationError(f"cannot run in int8: {reason}")
        self.engine = _resolved_engine(layer, engine)
        self.source = layer  # float reference (plans, ranges); not called in forward
        plan = layer._plan_with_path(None)
        prepack, op = _INT8_OPS[len(plan.input_shape)]
        self._op = getattr(torch.ops.quantized, op)
        bits = layer.config.weight_bits
        factors: Any = layer.factors  # type: ignore[attr-defined]
        quantized = [quantize_weight(f, bits, a) for f, a in zip(factors, layer.axes, strict=True)]
        steps = [s for s in plan.steps if isinstance(s, DataStep)]
        self._packed = []
        self._out_q: list[tuple[float, int]] = []
        quantizers = [*layer.between_quant, layer.output_quant]
        layer_bias: torch.Tensor | None = layer.bias  # type: ignore[attr-defined]
        for k, step in enumerate(steps):
            codes, scale = quantized[step.factor - 1]
            weight = _int8_weight(codes, scale, step.factor_perm, step.weight_shape)
            last = k == len(steps) - 1
            bias = layer_bias.detach().float() if last and layer_bias is not None else None
            with _quantized_engine(self.engine):
                self._packed.append(
                    getattr(torch.ops.quantized, prepack)(
                        weight,
                        bias,
                        list(step.stride),
                        list(step.padding),
                        list(step.dilation),
                        step.groups,
                    )
                )
            s, z = quantizers[k].qparams()  # type: ignore[union-attr]
            self._out_q.append((float(s), int(z)))
        self._top = quantizers[-1].top  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer: Any = self.source
        x, how = layer.executor_input(x)
        plan = layer.plan_for(tuple(x.shape))
        q = _quint8(x, layer.input_quant).reshape(plan.data_shape)
        for k, step in enumerate(plan.steps):
            assert isinstance(step, DataStep)
            if step.data_perm is not None:
                q = q.permute(step.data_perm)
            q = q.reshape(step.data_shape)
            scale, zero = self._out_q[k]
            q = self._op(q, self._packed[k], scale, zero)
            q = _clamp_codes(q, self._top).reshape(step.out_shape)
        if plan.final_perm is not None:
            q = q.permute(plan.final_perm)
        return layer.executor_output(q.reshape(plan.output_shape).dequantize(), how)  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return f"engine={self.engine}, steps={len(self._packed)}"


class Int8FactorizedLinear(Int8FactorizedLayer):
    """A :class:`QuantizedFactorizedLinear` on int8 kernels (1x1 ``quantized::conv2d`` steps
    over the (1, S, 1, M) map of the rows)."""


class Int8FactorizedConv1d(Int8FactorizedLayer):
    """A :class:`QuantizedFactorizedConv1d` on ``quantized::conv2d`` (over a unit axis)."""


class Int8FactorizedConv2d(Int8FactorizedLayer):
    """A :class:`QuantizedFactorizedConv2d` on ``quantized::conv2d``."""


class Int8FactorizedConv3d(Int8FactorizedLayer):
    """A :class:`QuantizedFactorizedConv3d` on ``quantized::conv3d``."""


_INT8_FACTORIZED_TYPES: dict[type[_QuantizedFactorized], type[Int8FactorizedLayer]] = {
    QuantizedFactorizedLinear: Int8FactorizedLinear,
    QuantizedFactorizedConv1d: Int8FactorizedConv1d,
    QuantizedFactorizedConv2d: Int8FactorizedConv2d,
    QuantizedFactorizedConv3d: Int8FactorizedConv3d,
}


class Int8Conv2d(nn.Module):
    """A quantized dense conv run on ``quantized::conv2d`` (uint8 in, int8 weights)."""

    def __init__(self, layer: QuantizedConv2d, engine: str | None = None) -> None:
        super().__init__()
        reason = int8_support(layer)
        if reason:
            raise QuantizationError(f"cannot run in int8: {reason}")
        self.engine = _resolved_engine(layer, engine)
        codes, scale = quantize_weight(layer.weight, layer.config.weight_bits, layer.axes[0])
        weight = _int8_weight(codes, scale, None, tuple(codes.shape))
        bias = None if layer.bias is None else layer.bias.detach().float()
        with _quantized_engine(self.engine):
            self._packed = torch.ops.quantized.conv2d_prepack(
                weight,
                bias,
                list(layer.stride),
                list(layer.padding),
                list(layer.dilation),
                layer.groups,
            )
        self.input_quant = layer.input_quant
        s, z = layer.output_quant.qparams()  # type: ignore[union-attr]
        self._out = (float(s), int(z))
        self._top = layer.output_quant.top  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = _quint8(x, self.input_quant)  # type: ignore[arg-type]
        q = torch.ops.quantized.conv2d(q, self._packed, *self._out)
        return _clamp_codes(q, self._top).dequantize()

    def extra_repr(self) -> str:
        return f"engine={self.engine}"


class Int8Linear(nn.Module):
    """A quantized linear layer run on ``quantized::linear``."""

    def __init__(self, layer: QuantizedLinear, engine: str | None = None) -> None:
        super().__init__()
        reason = int8_support(layer)
        if reason:
            raise QuantizationError(f"cannot run in int8: {reason}")
        self.engine = _resolved_engine(layer, engine)
        codes, scale = quantize_weight(layer.weight, layer.config.weight_bits, layer.axes[0])
        weight = _int8_weight(codes, scale, None, tuple(codes.shape))
        bias = None if layer.bias is None else layer.bias.detach().float()
        with _quantized_engine(self.engine):
            self._packed = torch.ops.quantized.linear_prepack(weight, bias)
        self.input_quant = layer.input_quant
        s, z = layer.output_quant.qparams()  # type: ignore[union-attr]
        self._out = (float(s), int(z))
        self._top = layer.output_quant.top  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = _quint8(x, self.input_quant)  # type: ignore[arg-type]
        q = torch.ops.quantized.linear(q, self._packed, *self._out)
        return _clamp_codes(q, self._top).dequantize()

    def extra_repr(self) -> str:
        return f"engine={self.engine}"


def to_int8(model: nn.Module, engine: str | None = None) -> tuple[nn.Module, dict[str, str]]:
    """A copy of a :func:`quantize`-d model whose quantized layers run on PyTorch's int8 CPU
    kernels for inference.

    Each layer runs on ``engine`` (default: ``torch.backends.quantized.engine``) unless that
    engine's kernels could saturate on this CPU with the layer's feature-map range
    (:func:`int8_saturates`: x86 engines without AVX-512 VNNI and ``reduce_range=False``); such
    a layer runs on ``qnnpack``, which never saturates (:func:`int8_engine`). Each int8 module's
    ``engine`` attribute (and its repr) says which engine it uses. Layers that cannot run in
    int8 (:func:`int8_support` says why) keep running fake-quantized in floating point.

    Returns the model (eval mode, inference only: int8 kernels have no gradient) and
    ``{layer name: reason}`` for the layers left in floating point.
    """
    target = plain_copy(model).eval()
    left: dict[str, str] = {}
    for name, layer in quantized_layers(target):
        reason = int8_support(layer)
        chosen = ""
        if not reason:
            chosen, why = int8_engine(layer, engine)
            reason = "" if chosen else why
            if chosen and why:
                log.info("%s: %s", name or "model", why)
        if reason:
            left[name] = reason
            log.info("%s stays in floating point: %s", name, reason)
            continue
        if isinstance(layer, _QuantizedFactorized):
            new: nn.Module = _INT8_FACTORIZED_TYPES[type(layer)](layer, chosen)
        elif isinstance(layer, QuantizedConv2d):
            new = Int8Conv2d(layer, chosen)
        else:
            new = Int8Linear(layer, chosen)  # type: ignore[arg-type]
        if name:
            set_module(target, name, new)
        else:
            target = new
    return target, left
