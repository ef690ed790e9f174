"""FactorizedConv2d: one ``nn.Module`` that runs any factorized kernel from its equation.

The layer never knows which decomposition produced its factors: it holds them as parameters,
hands the equation to :mod:`tnconv.contraction` for a plan per input shape, and replays the plan.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .._modes import plain_tensors, tensor_version
from ..calibration import cost_table
from ..contraction import ConvGeometry, ConvNetwork, ConvPlan, plan_conv
from ..decompositions.base import Decomposition
from ..errors import InputShapeError
from ..factorization import Factorization

__all__ = ["FactorizedConv2d"]

_MAX_PLANS = 16


@torch.compiler.disable
def _make_plan(
    network: ConvNetwork,
    geometry: ConvGeometry,
    shape: tuple[Any, ...],
    layout: str,
    frozen: bool,
    threads: int,
) -> ConvPlan:
    # planning (and a first calibration, which times ops) runs eagerly, never traced
    tables = {lay: cost_table(lay, threads) for lay in ("nchw", "nhwc")}
    return plan_conv(network, geometry, shape, layout=layout, tables=tables, frozen=frozen)


class FactorizedConv2d(nn.Module):
    """A 2-D convolution whose kernel is a tensor network of trainable factors.

    Args:
        factorization: the kernel's factors and equation (from ``Decomposition.factorize``).
        stride, padding, dilation, padding_mode: as in ``torch.nn.Conv2d`` (padding may be an
            int, a pair, ``"same"`` or ``"valid"``).
        bias: a tensor of shape (T,) (copied into a parameter), ``True`` for a zero bias, or
            ``None`` / ``False`` for none.
        groups: only 1; grouped kernels raise ``NotImplementedError``.

    Shapes: input (B, S, H, W) or (S, H, W); output (B, T, H', W') with H', W' as for
    ``nn.Conv2d``. The output equals ``F.conv2d(x, factorization.to_tensor(), bias, stride,
    padding, dilation)``; it is computed without ever forming the dense kernel.
    """

    def __init__(
        self,
        factorization: Factorization,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        bias: torch.Tensor | bool | None = None,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if not isinstance(factorization, Factorization):
            raise TypeError(
                f"FactorizedConv2d needs a tnconv.Factorization; got {type(factorization).__name__}"
            )
        if groups != 1:
            raise NotImplementedError(
                f"grouped convolution (groups={groups}) is not supported: a factorized kernel "
                "spans all input channels; keep grouped / depthwise convs dense"
            )
        t, s, kh, kw = factorization.shape
        self.in_channels, self.out_channels = s, t
        self.kernel_size = (kh, kw)
        self.groups = 1
        self.geometry = ConvGeometry.make((kh, kw), stride, padding, dilation, padding_mode)
        self.stride = self.geometry.stride
        self.dilation = self.geometry.dilation
        self.padding = (
            padding
            if isinstance(padding, str)
            else (self.geometry.padding[0], self.geometry.padding[2])
        )
        self.padding_mode = padding_mode
        self.equation = factorization.equation
        self.modes = factorization.modes
        self.method = factorization.method
        self.ranks = factorization.ranks
        self.info = dict(factorization.info)
        self.network = ConvNetwork.from_factorization(factorization)
        if isinstance(bias, torch.Tensor) and tuple(bias.shape) != (t,):
            raise ValueError(f"bias must have shape ({t},); got {tuple(bias.shape)}")
        if not (bias is None or isinstance(bias, (bool, torch.Tensor))):
            raise TypeError(f"bias must be a tensor, a bool or None; got {type(bias).__name__}")
        # parameters are ordinary tensors even when the layer is built under inference_mode or
        # from inference tensors: the layer can be trained afterwards, as a fresh nn.Conv2d can
        with plain_tensors():
            self.factors = nn.ParameterList(
                nn.Parameter(f.detach().clone(memory_format=torch.contiguous_format))
                for f in factorization.factors
            )
            if isinstance(bias, torch.Tensor):
                self.bias = nn.Parameter(bias.detach().clone())
            elif bias is True:
                self.bias = nn.Parameter(factorization.factors[0].new_zeros(t))
            else:
                self.register_parameter("bias", None)
        self._plans: OrderedDict[tuple[Any, ...], ConvPlan] = OrderedDict()
        # frozen inference: the folded weights of one plan, valid while the factors are
        # unchanged (their storage and in-place version counters are the key)
        self._folded: tuple[tuple[Any, ...], dict[int, torch.Tensor]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # plans are priced for this machine and folded weights are derived data: neither is
        # copied or pickled (a loaded or copied layer plans and folds afresh)
        state = dict(self.__dict__)
        state["_plans"] = OrderedDict()
        state["_folded"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_folded", None)
        self._plans = OrderedDict()

    # -- construction from a dense layer ------------------------------------------------------
    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        method: str | Decomposition,
        rank: Any = None,
        *,
        eps: Any = None,
        ratio: Any = None,
        **options: Any,
    ) -> FactorizedConv2d:
        """Factorize ``conv``'s kernel with ``method`` and return the equivalent layer.

        ``rank`` / ``eps`` / ``ratio`` / ``options`` are those of ``Decomposition.factorize``.
        The new layer copies the stride, padding, dilation, padding mode and bias; ``conv`` is
        left untouched.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv needs a torch.nn.Conv2d; got {type(conv).__name__}")
        if conv.groups != 1:
            raise NotImplementedError(
                f"grouped convolution (groups={conv.groups}) is not supported; keep it dense"
            )
        if isinstance(method, Decomposition):
            decomposition = method
        else:
            from ..registry import get  # the layer itself never needs the registry

            decomposition = get(method)
        factorization = decomposition.factorize(
            conv.weight.detach(), rank, eps=eps, ratio=ratio, **options
        )
        return cls(
            factorization,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=None if conv.bias is None else conv.bias.detach(),
            padding_mode=conv.padding_mode,
        )

    @classmethod
    def from_scratch(
        cls,
        method: str | Decomposition,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        bias: bool = True,
        *,
        padding_mode: str = "zeros",
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
        **options: Any,
    ) -> FactorizedConv2d:
        """A randomly initialised factorized conv layer, to train from scratch.

        The factors come from ``Decomposition.random`` at ``rank`` (and ``options``, e.g.
        ``t=2``), scaled so that the reconstructed kernel has the standard deviation of
        ``nn.Conv2d``'s default initialisation, uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
        fan_in = in_channels * kh * kw; the bias is drawn from that uniform distribution, as
        ``nn.Conv2d`` does.
        """
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        shape = (int(out_channels), int(in_channels), int(kh), int(kw))
        if isinstance(method, Decomposition):
            decomposition = method
        else:
            from ..registry import get  # the layer itself never needs the registry

            decomposition = get(method)
        fan_in = shape[1] * shape[2] * shape[3]
        bound = 1.0 / fan_in**0.5
        factorization = decomposition.random(
            shape,
            rank,
            std=bound / 3**0.5,
            generator=generator,
            dtype=dtype,
            device=device,
            **options,
        )
        bias_tensor = None
        if bias:
            draw = torch.rand(shape[0], generator=generator, dtype=torch.float64)
            bias_tensor = ((2 * draw - 1) * bound).to(device=device, dtype=dtype)
        return cls(
            factorization,
            stride=stride,
            padding=padding,
            dilation=dilation,
            bias=bias_tensor,
            padding_mode=padding_mode,
        )

    # -- execution ----------------------------------------------------------------------------
    def plan_for(
        self,
        input_shape: tuple[int, ...],
        layout: str = "nchw",
        frozen: bool = False,
    ) -> ConvPlan:
        """The (cached) execution plan for inputs of shape (B, S, H, W) in ``layout``
        ("nchw" or "nhwc" = channels-last), priced with this machine's cost tables at the
        current thread count (:mod:`tnconv.calibration`); ``frozen`` plans for folded
        factor-only steps (inference)."""
        threads = torch.get_num_threads()
        key = (*(int(n) for n in input_shape), layout, frozen, threads)
        plan = self._plans.get(key)
        if plan is None:
            shape = key[:-3]
            if len(shape) != 4:
                raise ValueError(f"expected input of shape (B, S, H, W); got {shape}")
            plan = _make_plan(self.network, self.geometry, shape, layout, frozen, threads)
            self._plans[key] = plan
            if len(self._plans) > _MAX_PLANS:
                self._plans.popitem(last=False)
        return plan

    def _frozen(self) -> bool:
        """Fold factor-only steps when no gradient can reach the factors through this call:
        under ``torch.no_grad`` / ``torch.inference_mode``, or in ``eval()`` with frozen
        factors. Never while being traced by ``torch.compile`` (it folds constants itself)."""
        if torch.compiler.is_compiling():
            return False
        if not torch.is_grad_enabled():
            return True
        return not self.training and not any(p.requires_grad for p in self._factor_list())

    def _factor_list(self) -> list[torch.Tensor]:
        """The factors in order. Read from the ParameterList's registry directly: iterating the
        ParameterList costs ~2 us per factor, several times per forward pass."""
        return list(self.factors._parameters.values())  # type: ignore[arg-type]

    def _folded_weights(
        self, plan: ConvPlan, factors: list[torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        versions = [tensor_version(p) for p in factors]
        if None in versions:
            # an inference-tensor factor (assigned by hand) has no version counter: an in-place
            # change could not be seen, so fold afresh every call and keep nothing
            with torch.no_grad():
                return plan.fold_factors(factors)
        key = (
            id(plan),
            torch.is_inference_mode_enabled(),
            *((p.data_ptr(), v) for p, v in zip(factors, versions, strict=True)),
        )
        if self._folded is None or self._folded[0] != key:
            with torch.no_grad():
                self._folded = (key, plan.fold_factors(factors))
        return self._folded[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):  # as nn.Conv2d: a TypeError, not an AttributeError
            raise TypeError(
                f"{type(self).__name__}.forward expects a torch.Tensor input; got "
                f"{type(x).__module__}.{type(x).__name__}"
            )
        unbatched = x.ndim == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise InputShapeError(
                f"Expected 3D (unbatched) or 4D (batched) input to {type(self).__name__}, but got "
                f"input of size: {list(x.shape)}; expected (B, {self.in_channels}, H, W) or "
                f"({self.in_channels}, H, W)"
            )
        if x.shape[1] != self.in_channels:
            # the wording of nn.Conv2d's message, so users recognise it
            raise InputShapeError(
                f"{type(self).__name__} with kernel of size [{self.out_channels}, "
                f"{self.in_channels}, {self.kernel_size[0]}, {self.kernel_size[1]}], expected "
                f"input{list(x.shape)} to have {self.in_channels} channels, but got "
                f"{x.shape[1]} channels instead"
            )
        nhwc = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        frozen = self._frozen()
        plan = self.plan_for(tuple(x.shape), "nhwc" if nhwc else "nchw", frozen)
        factors = self._factor_list()
        folded = self._folded_weights(plan, factors) if frozen else None
        y = plan(x, factors, self.bias, folded)
        return y.squeeze(0) if unbatched else y

    # -- inspection -----------------------------------------------------------------------------
    def _network(self, factors: list[torch.Tensor]) -> Factorization:
        return Factorization(
            factors,
            self.equation,
            (self.out_channels, self.in_channels, *self.kernel_size),
            self.ranks,
            method=self.method,
            modes=self.modes,
            info=dict(self.info),
        )

    @property
    def factorization(self) -> Factorization:
        """The current factors (detached copies) as a :class:`Factorization`."""
        return self._network([p.detach().clone() for p in self.factors])

    def to_tensor(self) -> torch.Tensor:
        """The dense kernel (T, S, kh, kw) the factors represent (differentiable)."""
        return self._network(list(self.factors)).to_tensor()

    @property
    def num_params(self) -> int:
        """Parameters of the factors (the bias excluded)."""
        return sum(int(p.numel()) for p in self.factors)

    @property
    def dense_params(self) -> int:
        """Parameters of the dense kernel this layer replaces (the bias excluded)."""
        return self.out_channels * self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def flops(
        self, input_shape: tuple[int, ...], layout: str = "nchw", inference: bool = False
    ) -> int:
        """FLOPs of one forward pass on ``input_shape`` (B, S, H, W) in ``layout``, bias
        excluded: those the executed plan runs. ``inference``: a pass without gradients
        (``torch.no_grad`` / ``inference_mode``), whose factor-only steps are folded once and
        reused, so only the steps touching the feature map count."""
        if inference:
            return self.plan_for(input_shape, layout, frozen=True).data_flops
        return self.plan_for(input_shape, layout).flops

    def to_conv2d(self) -> nn.Conv2d:
        """A dense ``nn.Conv2d`` with the reconstructed kernel (e.g. to undo compression)."""
        w = self.to_tensor().detach()
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(w)
            if self.bias is not None:
                conv.bias.copy_(self.bias.detach())
        return conv

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"method={self.method!r}, ranks={self.ranks}, params={self.num_params}/"
            f"{self.dense_params}, bias={self.bias is not None}"
        )
