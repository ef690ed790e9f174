"""FactorizedLayer: one ``nn.Module`` that runs any factorized kernel from its equation.

The layer never knows which decomposition produced its factors: it holds them as parameters,
hands the equation to :mod:`tnconv.contraction` for a plan per input shape, and replays the plan.
The number of spatial modes is data (``spatial_dims``): :class:`FactorizedLinear` (0),
``FactorizedConv1d`` / ``2d`` / ``3d`` (:mod:`tnconv.layers.conv`) only fix it and the shape of
their inputs; the executor is the same for all of them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.modules.utils import _ntuple

from .._modes import plain_tensors, tensor_version
from ..calibration import cost_table
from ..contraction import ConvGeometry, ConvNetwork, ConvPlan, plan_conv
from ..contraction.autotune import autotune_enabled, candidate_plans, fastest_plan
from ..contraction.execute import is_channels_last
from ..decompositions.base import Decomposition
from ..errors import InputShapeError, InvalidWeightError
from ..factorization import Factorization

__all__ = ["FactorizedLayer"]

_MAX_PLANS = 16


class _KeptCall(NamedTuple):
    """The last frozen call of a layer (:meth:`FactorizedLayer._inference_call`)."""

    key: tuple[Any, ...]  # what the call depends on besides the input's values (_call_key)
    call: Callable[[torch.Tensor], torch.Tensor]  # the plan bound to its folded weights
    held: list[torch.Tensor]  # the factors' storages, so no address in the key is reused
    direct: bool  # the input ran as it came: a repeat may skip executor_input / _output


@torch.compiler.disable
def _make_plan(
    network: ConvNetwork,
    geometry: ConvGeometry,
    shape: tuple[Any, ...],
    layout: str,
    frozen: bool,
    threads: int,
    factors: list[torch.Tensor] | None = None,
) -> ConvPlan:
    """The plan for ``shape`` in ``layout``: the cost tables' choice, or for a frozen
    (inference) plan with measured tables and CPU ``factors`` the fastest of the candidate plans
    timed here (:mod:`tnconv.contraction.autotune`; ``TNCONV_AUTOTUNE=0`` switches it off)."""
    # planning (and a first calibration, which times ops) runs eagerly, never traced
    tables = {lay: cost_table(lay, threads) for lay in ("nchw", "nhwc")}
    if (
        frozen
        and factors
        and all(f.device.type == "cpu" for f in factors)
        and autotune_enabled(tables)
    ):
        candidates = candidate_plans(network, geometry, shape, layout, tables)
        return fastest_plan(candidates, factors, layout)
    return plan_conv(network, geometry, shape, layout=layout, tables=tables, frozen=frozen)


def _decomposition(method: str | Decomposition) -> Decomposition:
    if isinstance(method, Decomposition):
        return method
    from ..registry import get  # the layer itself never needs the registry

    return get(method)


class FactorizedLayer(nn.Module):
    """A layer whose kernel is a tensor network of trainable factors (any number of spatial
    modes; use the subclasses, which fix it).

    Args:
        factorization: the kernel's factors and equation (from ``Decomposition.factorize``),
            of a kernel (T, S / groups, *k) with ``spatial_dims`` spatial modes.
        stride, padding, dilation, padding_mode: as in ``torch.nn.ConvNd`` (padding may be an
            int, a tuple, ``"same"`` or ``"valid"``).
        bias: a tensor of shape (T,) (copied into a parameter), ``True`` for a zero bias, or
            ``None`` / ``False`` for none.
        groups: must equal the factorization's number of groups (its group index's size).

    The output equals the dense layer's on ``factorization.to_tensor()``; it is computed without
    ever forming the dense kernel.
    """

    spatial_dims: int = 2
    dense_type: type[nn.Module] = nn.Conv2d

    def __init__(
        self,
        factorization: Factorization,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        bias: torch.Tensor | bool | None = None,
        groups: int | None = None,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(factorization, Factorization):
            raise TypeError(
                f"{name} needs a tnconv.Factorization; got {type(factorization).__name__}"
            )
        if factorization.spatial_dims != self.spatial_dims:
            raise InvalidWeightError(
                f"{name} takes a kernel with {self.spatial_dims} spatial mode(s); the "
                f"factorization's kernel {factorization.shape} has {factorization.spatial_dims}"
            )
        g = factorization.groups
        if groups is not None and int(groups) != g:
            raise ValueError(
                f"groups={groups} but the factorization has {g} group(s) (its group index "
                f"{factorization.group!r}); factorize with groups={groups}"
            )
        t, s, *k = factorization.shape
        self.in_channels, self.out_channels = s * g, t
        self.kernel_size = tuple(k)
        self.groups = g
        self.geometry = ConvGeometry.make(self.kernel_size, stride, padding, dilation, padding_mode)
        self.stride = self.geometry.stride
        self.dilation = self.geometry.dilation
        self.padding = padding if isinstance(padding, str) else self.geometry.padding[::2]
        self.padding_mode = padding_mode
        self.equation = factorization.equation
        self.modes = factorization.modes
        self.group = factorization.group
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
        # inference: the last call's key and bound plan (see _inference_call)
        self._memo: _KeptCall | None = None

    def __getstate__(self) -> dict[str, Any]:
        # plans are priced for this machine and folded weights are derived data: neither is
        # copied or pickled (a loaded or copied layer plans and folds afresh)
        state = dict(self.__dict__)
        state["_plans"] = OrderedDict()
        state["_folded"] = None
        state["_memo"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_folded", None)
        self.__dict__["_memo"] = None
        self._plans = OrderedDict()

    # -- construction from a dense layer ------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        method: str | Decomposition,
        rank: Any = None,
        *,
        eps: Any = None,
        ratio: Any = None,
        **options: Any,
    ) -> FactorizedLayer:
        """Factorize ``module``'s kernel (an ``nn.Linear`` / ``nn.ConvNd`` of this class's
        dimension, grouped or not) with ``method`` and return the equivalent layer.

        ``rank`` / ``eps`` / ``ratio`` / ``options`` are those of ``Decomposition.factorize``
        (a grouped conv is factorized per group, the group a shared index). The new layer copies
        the stride, padding, dilation, padding mode and bias; ``module`` is left untouched.
        """
        if not isinstance(module, cls.dense_type):
            raise TypeError(
                f"{cls.__name__}.from_dense needs a torch.nn.{cls.dense_type.__name__}; got "
                f"{type(module).__name__}"
            )
        groups = int(getattr(module, "groups", 1))
        factorization = _decomposition(method).factorize(
            module.weight.detach(), rank, eps=eps, ratio=ratio, groups=groups, **options
        )
        return cls.like(module, factorization)

    @classmethod
    def like(cls, module: nn.Module, factorization: Factorization) -> FactorizedLayer:
        """The layer running ``factorization`` with ``module``'s geometry and bias (copied)."""
        bias = getattr(module, "bias", None)
        bias = None if bias is None else bias.detach()
        return cls._with_geometry(factorization, bias, module)

    @classmethod
    def from_scratch(
        cls,
        method: str | Decomposition,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        rank: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        bias: bool = True,
        *,
        groups: int = 1,
        padding_mode: str = "zeros",
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
        **options: Any,
    ) -> FactorizedLayer:
        """A randomly initialised factorized layer, to train from scratch.

        The factors come from ``Decomposition.random`` at ``rank`` (and ``options``, e.g.
        ``t=2``), scaled so that the reconstructed kernel has the standard deviation of
        ``nn.ConvNd``'s default initialisation, uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
        fan_in = in_channels / groups * prod(kernel_size); the bias is drawn from that uniform
        distribution, as ``nn.ConvNd`` does.
        """
        k = _ntuple(cls.spatial_dims)(kernel_size) if cls.spatial_dims else ()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels={in_channels} and out_channels={out_channels} must be divisible "
                f"by groups={groups}"
            )
        shape = (int(out_channels), int(in_channels) // groups, *(int(n) for n in k))
        fan_in = shape[1] * (math.prod(shape[2:]))
        bound = 1.0 / fan_in**0.5
        factorization = _decomposition(method).random(
            shape,
            rank,
            std=bound / 3**0.5,
            generator=generator,
            dtype=dtype,
            device=device,
            groups=groups,
            **options,
        )
        bias_tensor = None
        if bias:
            draw = torch.rand(shape[0], generator=generator, dtype=torch.float64)
            bias_tensor = ((2 * draw - 1) * bound).to(device=device, dtype=dtype)
        geometry = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
        return cls._with_geometry(
            factorization, bias_tensor, {**geometry, "padding_mode": padding_mode}
        )

    @classmethod
    def _with_geometry(
        cls, factorization: Factorization, bias: torch.Tensor | None, source: Any
    ) -> FactorizedLayer:
        """The layer with the conv geometry of ``source`` (a dense ``nn.ConvNd`` or a dict of
        its arguments); a Linear layer has none to take."""
        if cls.spatial_dims == 0:
            return cls(factorization, bias=bias)
        keys = ("stride", "padding", "dilation", "groups", "padding_mode")
        get = source.get if isinstance(source, dict) else lambda k: getattr(source, k)
        return cls(factorization, bias=bias, **{k: get(k) for k in keys})

    # -- execution ----------------------------------------------------------------------------
    def plan_for(
        self,
        input_shape: tuple[int, ...],
        layout: str = "nchw",
        frozen: bool = False,
    ) -> ConvPlan:
        """The (cached) execution plan for executor inputs of shape (B, S, *spatial) (two
        spatial sizes, three for a 3-D kernel: :meth:`executor_input` makes them) in
        ``layout`` ("nchw" or "nhwc" = channels-last), priced with this machine's cost tables
        at the current thread count (:mod:`tnconv.calibration`); ``frozen`` plans for folded
        factor-only steps (inference)."""
        threads = torch.get_num_threads()
        key = (*(int(n) for n in input_shape), layout, frozen, threads)
        plan = self._plans.get(key)
        if plan is None:
            shape = key[:-3]
            axes = len(self.network.spatial)
            if len(shape) != 2 + axes:
                raise ValueError(
                    f"expected an executor input of shape (B, S, {axes} spatial sizes); got {shape}"
                )
            plan = _make_plan(
                self.network, self.geometry, shape, layout, frozen, threads, self._factor_list()
            )
            self._plans[key] = plan
            if len(self._plans) > _MAX_PLANS:
                self._plans.popitem(last=False)
        return plan

    def _frozen(self, factors: list[torch.Tensor] | None = None) -> bool:
        """Fold factor-only steps when no gradient can reach the factors through this call:
        under ``torch.no_grad`` / ``torch.inference_mode``, or in ``eval()`` with frozen
        factors. Never while being traced by ``torch.compile`` (it folds constants itself)."""
        if torch.compiler.is_compiling():
            return False
        if not torch.is_grad_enabled():
            return True
        if factors is None:
            factors = self._factor_list()
        return not self.training and not any(p.requires_grad for p in factors)

    def _factor_list(self) -> list[torch.Tensor]:
        """The factors in order. Read from the ParameterList's registry directly: iterating the
        ParameterList costs ~2 us per factor, several times per forward pass."""
        return list(self._modules["factors"]._parameters.values())  # type: ignore[union-attr,arg-type]

    def _folded_weights(
        self, plan: ConvPlan, factors: list[torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        try:
            key = (
                id(plan),
                torch.is_inference_mode_enabled(),
                *[(p.data_ptr(), p._version) for p in factors],
            )
        except RuntimeError:
            if all(tensor_version(p) is not None for p in factors):
                raise
            # an inference-tensor factor (assigned by hand) has no version counter: an in-place
            # change could not be seen, so fold afresh every call and keep nothing
            with torch.no_grad():
                return plan.fold_factors(factors)
        if self._folded is None or self._folded[0] != key:
            with torch.no_grad():
                self._folded = (key, plan.fold_factors(factors))
        return self._folded[1]

    def executor_input(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """``x`` in the layer's input shape as the executor's (B, S, *spatial) map, and what
        :meth:`executor_output` needs to shape the result back (subclasses override both)."""
        return x, None

    def executor_output(self, y: torch.Tensor, how: Any) -> torch.Tensor:
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):  # as nn.Conv2d: a TypeError, not an AttributeError
            raise TypeError(
                f"{type(self).__name__}.forward expects a torch.Tensor input; got "
                f"{type(x).__module__}.{type(x).__name__}"
            )
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            memo = self._memo
            if memo is not None and memo.direct:
                # the last call ran its input as it came (no reshape in or out), so a repeat
                # needs only the key: its shape passed the input checks when it was kept
                key = self._call_key(x)
                if key is not None and key == memo.key:
                    return memo.call(x)
            inner, how = self.executor_input(x)
            direct = inner is x and not how
            return self.executor_output(self._inference_call(inner, direct), how)
        x, how = self.executor_input(x)
        nhwc = is_channels_last(x)
        factors = self._factor_list()
        frozen = self._frozen(factors)
        plan = self.plan_for(tuple(x.shape), "nhwc" if nhwc else "nchw", frozen)
        folded = self._folded_weights(plan, factors) if frozen else None
        y = plan.runner(nhwc)(x, factors, self.bias, folded, None)
        return self.executor_output(y, how)

    def _call_key(self, x: torch.Tensor) -> tuple[Any, ...] | None:
        """What a frozen call on ``x`` depends on besides its values: the input's shape and
        strides, the thread count, inference mode, the bias tensor, the factors' storages and
        in-place versions (None when a factor is an inference tensor: it has no version)."""
        try:
            return (
                x.shape,
                x.stride(),
                torch.get_num_threads(),
                torch.is_inference_mode_enabled(),
                id(self._parameters.get("bias")),
                *[(p.data_ptr(), p._version) for p in self._factor_list()],
            )
        except RuntimeError:
            return None

    def _inference_call(self, x: torch.Tensor, direct: bool = False) -> torch.Tensor:
        """The frozen plan on ``x`` (an executor input) without autograd. The plan, its folded
        weights and the bound call (:meth:`~tnconv.contraction.execute._Runner.bind`) are kept
        for the last input shape, layout and factor state, so a repeated call (inference at
        batch 1, where per-call Python is a large share of the time) only compares that key
        (:meth:`_call_key`), as the plan cache and the folded weights themselves are keyed.
        ``direct``: ``x`` is the layer's own input, unreshaped (forward may then skip
        :meth:`executor_input` on a repeat)."""
        factors = self._factor_list()
        bias = self._parameters.get("bias")
        key = self._call_key(x)
        memo = self._memo
        if key is not None and memo is not None and memo.key == key:
            return memo.call(x)
        nhwc = is_channels_last(x)
        plan = self.plan_for(tuple(x.shape), "nhwc" if nhwc else "nchw", True)
        folded = self._folded_weights(plan, factors)
        run = plan.runner(nhwc)
        if key is None:
            self._memo = None
            return run(x, factors, bias, folded, None)
        bound = run.bind(bias, folded)  # type: ignore[attr-defined]
        # the factors' storages are held with the key, so no address in it can be reused by
        # another tensor while it is kept (the bias tensor is held by the bound call)
        held = [p.detach() for p in factors]
        self._memo = _KeptCall(key, bound, held, direct)
        return bound(x)

    def _conv_input(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Check a conv input (B, S, *spatial) or unbatched (S, *spatial); return it batched
        and whether it was unbatched."""
        d = self.spatial_dims
        unbatched = x.ndim == d + 1
        if unbatched:
            x = x.unsqueeze(0)
        if x.ndim != d + 2:
            sp = ", ".join("DHW"[3 - d :]) if d else ""
            raise InputShapeError(
                f"Expected {d + 1}D (unbatched) or {d + 2}D (batched) input to "
                f"{type(self).__name__}, but got input of size: {list(x.shape)}; expected "
                f"(B, {self.in_channels}, {sp}) or ({self.in_channels}, {sp})"
            )
        if x.shape[1] != self.in_channels:
            # the wording of nn.Conv2d's message, so users recognise it
            raise InputShapeError(
                f"{type(self).__name__} with kernel of size "
                f"{[self.out_channels, self.in_channels // self.groups, *self.kernel_size]}, "
                f"expected input{list(x.shape)} to have {self.in_channels} channels, but got "
                f"{x.shape[1]} channels instead"
            )
        return x, unbatched

    # -- inspection -----------------------------------------------------------------------------
    def _network(self, factors: list[torch.Tensor]) -> Factorization:
        return Factorization(
            factors,
            self.equation,
            self.kernel_shape,
            self.ranks,
            method=self.method,
            modes=self.modes,
            info=dict(self.info),
            group=self.group,
        )

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The dense kernel's shape (T, S / groups, *kernel_size), as the dense layer's weight."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def factorization(self) -> Factorization:
        """The current factors (detached copies) as a :class:`Factorization`."""
        return self._network([p.detach().clone() for p in self.factors])

    def to_tensor(self) -> torch.Tensor:
        """The dense kernel (T, S / groups, *k) the factors represent (differentiable)."""
        return self._network(list(self.factors)).to_tensor()

    @property
    def num_params(self) -> int:
        """Parameters of the factors (the bias excluded)."""
        return sum(int(p.numel()) for p in self.factors)

    @property
    def dense_params(self) -> int:
        """Parameters of the dense kernel this layer replaces (the bias excluded)."""
        return math.prod(self.kernel_shape)

    def flops(
        self, input_shape: tuple[int, ...], layout: str = "nchw", inference: bool = False
    ) -> int:
        """FLOPs of one forward pass on an input of ``input_shape`` (the layer's own input
        shape: (B, S, *spatial), or (..., S) for a Linear) in ``layout``, bias excluded: those
        the executed plan runs. ``inference``: a pass without gradients (``torch.no_grad`` /
        ``inference_mode``), whose factor-only steps are folded once and reused, so only the
        steps touching the feature map count."""
        input_shape = self.executor_shape(tuple(int(n) for n in input_shape))
        if inference:
            return self.plan_for(input_shape, layout, frozen=True).data_flops
        return self.plan_for(input_shape, layout).flops

    def executor_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The executor's (B, S, *spatial) shape for an input of the layer's ``input_shape``."""
        return tuple(self.executor_input(torch.empty(input_shape, device="meta"))[0].shape)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the output for an input of ``input_shape`` (as the dense layer's)."""
        shell = self.dense_shell(device="meta")
        return tuple(shell(torch.empty(input_shape, device="meta")).shape)

    def dense_shell(self, **factory: Any) -> nn.Module:
        """An uninitialised dense layer of the same kind and geometry (``factory``: device /
        dtype, e.g. ``device="meta"`` for a shape-only shell)."""
        if self.spatial_dims == 0:
            return self.dense_type(
                self.in_channels, self.out_channels, bias=self.bias is not None, **factory
            )
        return self.dense_type(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            **factory,
        )

    def to_dense(self) -> nn.Module:
        """The dense layer (``nn.Linear`` / ``nn.ConvNd``) with the reconstructed kernel (e.g.
        to undo compression)."""
        w = self.to_tensor().detach()
        dense = self.dense_shell(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            dense.weight.copy_(w)
            if self.bias is not None:
                dense.bias.copy_(self.bias.detach())
        return dense

    def extra_repr(self) -> str:
        geometry = (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, "
            if self.spatial_dims
            else ""
        )
        groups = f"groups={self.groups}, " if self.groups > 1 else ""
        return (
            f"{self.in_channels}, {self.out_channels}, {geometry}{groups}"
            f"method={self.method!r}, ranks={self.ranks}, params={self.num_params}/"
            f"{self.dense_params}, bias={self.bias is not None}"
        )
