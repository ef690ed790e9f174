"""``tnconv.save`` / ``tnconv.load``: compressed models with their layer specs.

A saved file (``torch.save`` format) holds

* ``"tnconv"``: a header validated by pydantic on load: format version, the tnconv version that
  wrote it, one :class:`LayerSpec` per factorized layer (equation, shapes, ranks, geometry), why
  layers were kept dense, and the input size used for FLOPs;
* ``"state_dict"``: every parameter and buffer, except the weights of quantized layers;
* ``"quantized_weights"`` (version 2): those weights as integer codes, packed ``8 // bits`` or
  more to a byte for fewer than 8 bits (int8 at 8 bits), with their float32 scales;
* ``"architecture"``: the pickled module itself, as bytes, its parameters and persistent
  buffers replaced by empty "meta" tensors (version 2; version 1 pickled the values again).

``load(path, model=dense_model)`` rebuilds the factorized layers from their specs inside a copy of
a freshly constructed dense model and loads the state dict: it never unpickles code
(``torch.load(weights_only=True)``). ``load(path)`` without a model unpickles the architecture
(like ``torch.load`` of a whole model it needs the model's classes importable, and the file must
be trusted).
"""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from .compress import DENSE_REASONS, INPUT_SIZE
from .errors import TnconvError
from .factorization import Factorization
from .layers import FactorizedConv2d

__all__ = [
    "FORMAT_VERSION",
    "LayerSpec",
    "QuantLayerSpec",
    "SavedModelHeader",
    "load",
    "pack_codes",
    "save",
    "unpack_codes",
]

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


class LoadError(TnconvError, ValueError):
    """A file is not a tnconv save, or does not fit the model it is loaded into."""


class LayerSpec(BaseModel):
    """Everything needed to rebuild one ``FactorizedConv2d`` (its values come from the state
    dict)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    method: str
    equation: str
    modes: tuple[str, str, str, str]
    shape: tuple[int, int, int, int]
    ranks: tuple[int, ...]
    factor_shapes: list[tuple[int, ...]]
    stride: tuple[int, int]
    padding: tuple[int, int] | Literal["same", "valid"]
    dilation: tuple[int, int]
    padding_mode: Literal["zeros", "reflect", "replicate", "circular"]
    bias: bool
    dtype: str
    info: dict[str, Any] = {}

    @classmethod
    def of(cls, name: str, layer: FactorizedConv2d) -> LayerSpec:
        info = {k: v for k, v in layer.info.items() if isinstance(v, (int, float, str, bool))}
        return cls(
            name=name,
            method=layer.method,
            equation=layer.equation,
            modes=layer.modes,
            shape=(layer.out_channels, layer.in_channels, *layer.kernel_size),
            ranks=tuple(layer.ranks),
            factor_shapes=[tuple(p.shape) for p in layer.factors],
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            padding_mode=layer.padding_mode,
            bias=layer.bias is not None,
            dtype=str(layer.factors[0].dtype).removeprefix("torch."),
            info=info,
        )

    def build(self) -> FactorizedConv2d:
        """An empty-valued layer with this structure (load a state dict into it)."""
        dtype = getattr(torch, self.dtype)
        factors = [torch.zeros(s, dtype=dtype) for s in self.factor_shapes]
        f = Factorization(
            factors,
            self.equation,
            self.shape,
            self.ranks,
            self.method,
            self.modes,
            dict(self.info),
        )
        return FactorizedConv2d(
            f,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias,
            padding_mode=self.padding_mode,
        )


class SavedModelHeader(BaseModel):
    """The validated, versioned description stored under ``"tnconv"`` in a saved file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["tnconv"] = "tnconv"
    version: int = FORMAT_VERSION
    tnconv_version: str
    layers: list[LayerSpec]
    dense_reasons: dict[str, str] = {}
    input_size: tuple[int, ...] | None = None
    quantized: list[QuantLayerSpec] = []


class QuantLayerSpec(BaseModel):
    """A quantized layer (:mod:`tnconv.quantization`): its kind, bit widths, the contraction
    order and per-channel axes of a factorized one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    kind: Literal["factorized", "conv", "linear"]
    weight_bits: int
    activation_bits: int | None
    per_channel: bool
    axes: list[int | None]
    path: list[tuple[int, ...]] = []
    reduce_range: bool = False  # files before it was recorded used full-range feature maps

    @classmethod
    def of(cls, name: str, layer: nn.Module) -> QuantLayerSpec:
        from .quantization import QuantizedConv2d, QuantizedFactorizedConv2d

        c = layer.config  # type: ignore[attr-defined]
        kind = (
            "factorized"
            if isinstance(layer, QuantizedFactorizedConv2d)
            else "conv"
            if isinstance(layer, QuantizedConv2d)
            else "linear"
        )
        return cls(
            name=name,
            kind=kind,
            weight_bits=c.weight_bits,
            activation_bits=c.activation_bits,
            per_channel=c.per_channel,
            reduce_range=c.reduce_range,
            axes=list(layer.axes),  # type: ignore[attr-defined]
            path=[tuple(p) for p in getattr(layer, "path", ())],
        )

    def weight_keys(self) -> list[str]:
        """State-dict keys (relative to the layer) of the quantized weights, in axes order."""
        if self.kind == "factorized":
            return [f"factors.{k}" for k in range(len(self.axes))]
        return ["weight"]

    def wrap(self, layer: nn.Module) -> nn.Module:
        """The quantized layer around a plain one of the same structure."""
        from .quantization import (
            QuantConfig,
            QuantizedConv2d,
            QuantizedFactorizedConv2d,
            QuantizedLinear,
        )

        config = QuantConfig(
            weight_bits=self.weight_bits,
            activation_bits=self.activation_bits,
            per_channel=self.per_channel,
            reduce_range=self.reduce_range,
        )
        if self.kind == "factorized" and isinstance(layer, FactorizedConv2d):
            return QuantizedFactorizedConv2d.from_layer(layer, config, self.path, self.axes)
        if self.kind == "conv" and type(layer) is nn.Conv2d:
            return QuantizedConv2d.from_conv(layer, config)
        if self.kind == "linear" and type(layer) is nn.Linear:
            return QuantizedLinear.from_linear(layer, config)
        raise LoadError(
            f"module {self.name!r} is a {type(layer).__name__}; the saved quantized layer is a "
            f"{self.kind} layer"
        )


SavedModelHeader.model_rebuild()


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [-(2**(bits-1) - 1), 2**(bits-1) - 1] as a flat uint8 tensor of
    ``ceil(numel * bits / 8)`` bytes (offset to unsigned, little-endian bit order); 8-bit codes
    stay int8, one per byte."""
    flat = codes.reshape(-1).to(torch.int16)
    if bits == 8:
        return flat.to(torch.int8)
    unsigned = (flat + (2 ** (bits - 1) - 1)).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8)
    stream = ((unsigned.unsqueeze(1) >> shifts) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros((-len(stream)) % 8)])
    weights = (torch.ones(8, dtype=torch.int16) << torch.arange(8, dtype=torch.int16)).to(
        torch.int16
    )
    return (stream.reshape(-1, 8).to(torch.int16) * weights).sum(1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int8 codes of ``shape``."""
    n = math.prod(shape)
    if bits == 8:
        return packed.to(torch.int8).reshape(shape)
    stream = ((packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
    stream = stream[: n * bits].reshape(n, bits).to(torch.int16)
    unsigned = (stream << torch.arange(bits, dtype=torch.int16)).sum(1)
    return (unsigned - (2 ** (bits - 1) - 1)).to(torch.int8).reshape(shape)


def _weightless(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and persistent buffers are empty meta tensors."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                memo[id(p)] = nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device="meta"),
                    requires_grad=p.requires_grad,
                )
        for key, b in module._buffers.items():
            if b is not None and key not in module._non_persistent_buffers_set:
                memo[id(b)] = torch.empty(b.shape, dtype=b.dtype, device="meta")
    return copy.deepcopy(model, memo)


def _materialize(model: nn.Module, device: Any) -> None:
    """Give the meta parameters / buffers of an unpickled version-2 architecture real (empty)
    storage; the state dict fills them."""
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                module._parameters[key] = nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device=device),
                    requires_grad=p.requires_grad,
                )
        for key, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[key] = torch.empty(b.shape, dtype=b.dtype, device=device)


def save(model: nn.Module, path: str | Path) -> None:
    """Write ``model`` (compressed or not) with its layer specs to ``path``."""
    from . import __version__

    if not isinstance(model, nn.Module):
        raise TypeError(f"save needs a torch.nn.Module; got {type(model).__name__}")
    from .quantization import quantize_weight, quantized_layers

    specs = [
        LayerSpec.of(name, m)
        for name, m in model.named_modules()
        if isinstance(m, FactorizedConv2d)
    ]
    qspecs = [QuantLayerSpec.of(name, m) for name, m in quantized_layers(model)]
    size = getattr(model, INPUT_SIZE, None)
    header = SavedModelHeader(
        tnconv_version=__version__,
        layers=specs,
        dense_reasons=dict(getattr(model, DENSE_REASONS, {})),
        input_size=tuple(size) if size is not None else None,
        quantized=qspecs,
    )
    state = model.state_dict()
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for q in qspecs:
        for key, axis in zip(q.weight_keys(), q.axes, strict=True):
            full = f"{q.name}.{key}" if q.name else key
            codes, scale = quantize_weight(state.pop(full), q.weight_bits, axis)
            packed[full] = {"codes": pack_codes(codes, q.weight_bits), "scale": scale}
    buffer = io.BytesIO()
    torch.save(_weightless(model), buffer)
    torch.save(
        {
            "tnconv": header.model_dump(mode="json"),
            "state_dict": state,
            "quantized_weights": packed,
            "architecture": buffer.getvalue(),
        },
        path,
    )


def load(path: str | Path, model: nn.Module | None = None, map_location: Any = "cpu") -> nn.Module:
    """Read a model written by :func:`save`.

    Args:
        path: the file.
        model: optionally, a freshly built *dense* model of the same architecture; a copy of it
            receives the factorized layers and the weights, and no code is unpickled. ``model``
            itself is not modified.
        map_location: as for ``torch.load``.

    Raises:
        LoadError: not a tnconv file, an unsupported version, or a model that does not match.
    """
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise LoadError(f"{path}: not a readable torch file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or "tnconv" not in payload:
        raise LoadError(f"{path}: not a tnconv save (no 'tnconv' header); use torch.load")
    raw = payload["tnconv"]
    if isinstance(raw, dict) and raw.get("version") not in READABLE_VERSIONS:
        raise LoadError(
            f"{path}: tnconv format version {raw.get('version')!r}; this tnconv reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    try:
        header = SavedModelHeader.model_validate(raw)
    except ValidationError as exc:
        raise LoadError(f"{path}: corrupt tnconv header: {exc}") from exc

    if model is None:
        result = torch.load(
            io.BytesIO(payload["architecture"]), map_location=map_location, weights_only=False
        )
        device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
        _materialize(result, device)
    else:
        result = copy.deepcopy(model)
        for spec in header.layers:
            _install(result, spec)
        for qspec in header.quantized:
            parent_name, _, child = qspec.name.rpartition(".")
            parent = result.get_submodule(parent_name) if parent_name else result
            try:
                current = result.get_submodule(qspec.name)
            except AttributeError as exc:
                raise LoadError(f"the model has no module {qspec.name!r} to quantize") from exc
            setattr(parent, child, qspec.wrap(current).train(current.training))
    state = dict(payload["state_dict"])
    for qspec in header.quantized:
        try:
            layer = result.get_submodule(qspec.name)
        except AttributeError as exc:
            raise LoadError(f"{path}: the model has no quantized layer {qspec.name!r}") from exc
        from .quantization import quantized_layers

        if layer not in dict(quantized_layers(layer)).values() or (
            QuantLayerSpec.of(qspec.name, layer) != qspec
        ):
            raise LoadError(f"{path}: layer {qspec.name!r} does not match its saved spec")
        for key in qspec.weight_keys():
            full = f"{qspec.name}.{key}" if qspec.name else key
            entry = payload.get("quantized_weights", {}).get(full)
            if entry is None:
                raise LoadError(f"{path}: no quantized weight {full!r}")
            like = layer.get_parameter(key)
            codes = unpack_codes(entry["codes"], qspec.weight_bits, tuple(like.shape))
            state[full] = codes.to(like.dtype) * entry["scale"].to(like.dtype)
    for spec in header.layers:
        layer = result.get_submodule(spec.name)
        if not isinstance(layer, FactorizedConv2d) or LayerSpec.of(spec.name, layer).model_dump(
            exclude={"info"}
        ) != spec.model_dump(exclude={"info"}):
            raise LoadError(f"{path}: layer {spec.name!r} does not match its saved spec")
    try:
        result.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise LoadError(f"{path}: the weights do not fit the model: {exc}") from exc
    setattr(result, DENSE_REASONS, dict(header.dense_reasons))
    if header.input_size is not None:
        setattr(result, INPUT_SIZE, tuple(header.input_size))
    return result


def _install(model: nn.Module, spec: LayerSpec) -> None:
    try:
        current = model.get_submodule(spec.name)
    except AttributeError as exc:
        raise LoadError(f"the model has no module {spec.name!r} to factorize") from exc
    if isinstance(current, nn.Conv2d):
        if tuple(current.weight.shape) != spec.shape:
            raise LoadError(
                f"module {spec.name!r} has kernel {tuple(current.weight.shape)}, the saved layer "
                f"{spec.shape}"
            )
    elif not isinstance(current, FactorizedConv2d):
        raise LoadError(f"module {spec.name!r} is a {type(current).__name__}, not a convolution")
    parent_name, _, child = spec.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = spec.build()
    param = next(current.parameters(), None)
    if param is not None:
        layer = layer.to(param.device)
    setattr(parent, child, layer)
