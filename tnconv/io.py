"""``tnconv.save`` / ``tnconv.load``: compressed models with their layer specs, in files that are
safe to open.

A file written by :func:`save` (format version 3) is a `safetensors
<https://huggingface.co/docs/safetensors>`_ file: a JSON header followed by raw tensor bytes,
which any safetensors reader can list and read without running code. It holds

* the tensors: every parameter and buffer of the model under its state-dict key, except the
  weights of quantized layers, which are stored as ``__tnconv__.quantized.<key>.codes`` (integer
  codes packed ``8 // bits`` or more to a byte below 8 bits, int8 at 8 bits) and
  ``__tnconv__.quantized.<key>.scale`` (float32 scales);
* in the safetensors metadata, under ``"tnconv"``, this module's header as JSON, validated by
  pydantic on load: format version, the tnconv version that wrote it, one :class:`LayerSpec` per
  factorized layer (equation, shapes, ranks, geometry), one :class:`QuantLayerSpec` per quantized
  layer, why layers were kept dense, the input size used for FLOPs, and -- when the model is one
  of the architectures tnconv ships (``tnconv.models``' CIFAR ResNets / VGG, the demo's
  ``DigitsNet``) -- that architecture's name and constructor arguments (:class:`ArchitectureSpec`);
* optionally (``save(..., pickle_architecture=True)``, the default) the pickled module, its
  weights replaced by empty "meta" tensors, as the uint8 tensor ``__tnconv__.architecture``.
  It is only ever read by ``load(path, trusted=True)``.

:func:`load` never unpickles unless told to. It rebuilds the model from, in this order: a dense
model of the same architecture (``model=``), a factory named in the call (``model_fn=``: a
callable or a ``"module:function"`` string, called without arguments), the shipped architecture
recorded in the header; and only with ``trusted=True`` from the pickled architecture --
unpickling runs whatever code the file carries, so pass it only for files you would run.
Files written by earlier tnconv versions (versions 1 and 2: ``torch.save`` archives) are read with
``torch.load(weights_only=True)`` and still load with ``model=`` / ``model_fn=``, or with
``trusted=True``. Every failure to read a file is a :class:`tnconv.errors.LoadError`
(:class:`tnconv.errors.UntrustedFileError` where only trust would help).
"""

from __future__ import annotations

import copy
import functools
import importlib
import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from torch import nn

from .bn_folding import FOLDED_BN, remove_folded
from .compress import DENSE_REASONS, INPUT_SIZE
from .errors import LoadError, TnconvError, UntrustedFileError
from .factorization import Factorization
from .layers import DENSE_TYPES, FACTORIZED_TYPES, FactorizedConv2d, FactorizedLayer

__all__ = [
    "FORMAT_VERSION",
    "ArchitectureSpec",
    "LayerSpec",
    "LoadError",
    "QuantLayerSpec",
    "SavedModelHeader",
    "UntrustedFileError",
    "load",
    "pack_codes",
    "read_header",
    "save",
    "unpack_codes",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
LEGACY_VERSIONS = (1, 2)  # torch.save archives
PREFIX = "__tnconv__."
ARCHITECTURE_KEY = PREFIX + "architecture"
QUANTIZED_PREFIX = PREFIX + "quantized."

_Count = Annotated[int, Field(ge=1, le=1 << 16)]
_Classes = Annotated[int, Field(ge=1, le=1 << 20)]


class _ResNetArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    blocks_per_stage: Annotated[int, Field(ge=1, le=1000)]
    num_classes: _Classes
    widths: tuple[_Count, _Count, _Count]


class _VGGArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    config: Annotated[list[_Count | Literal["M"]], Field(min_length=1, max_length=256)]
    num_classes: _Classes


class _DigitsArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    num_classes: _Classes
    width: _Count


_ARCHITECTURE_ARGS: dict[str, type[BaseModel]] = {
    "CifarResNet": _ResNetArgs,
    "CifarVGG": _VGGArgs,
    "DigitsNet": _DigitsArgs,
}


def _shipped_classes() -> dict[str, type[nn.Module]]:
    from .demo import DigitsNet
    from .models import CifarResNet, CifarVGG

    return {"CifarResNet": CifarResNet, "CifarVGG": CifarVGG, "DigitsNet": DigitsNet}


class ArchitectureSpec(BaseModel):
    """One of the architectures tnconv ships, by class name and constructor arguments.

    Only these classes can be named, and their arguments are validated (types and bounds) before
    anything is built, so a file cannot make :func:`load` import or call anything else.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["CifarResNet", "CifarVGG", "DigitsNet"]
    kwargs: dict[str, Any]

    @field_validator("kwargs")
    @classmethod
    def _check_kwargs(cls, value: dict[str, Any], info: Any) -> dict[str, Any]:
        name = info.data.get("name")
        if name is None:
            return value
        return _ARCHITECTURE_ARGS[name].model_validate(value).model_dump(mode="json")

    @classmethod
    def of(cls, model: nn.Module) -> ArchitectureSpec | None:
        """The spec of ``model``'s dense architecture if it is a shipped class (compressed or
        not), read off its modules; None for any other model."""
        classes = _shipped_classes()
        name = next((n for n, c in classes.items() if type(model) is c), None)
        if name is None:
            return None
        try:
            kwargs: dict[str, Any]
            if name == "CifarResNet":
                kwargs = {
                    "blocks_per_stage": model.blocks_per_stage,
                    "num_classes": model.linear.weight.shape[0],
                    # read off convs, not BNs: compress may have folded the BNs away
                    "widths": [
                        getattr(model, f"layer{k}")[0].conv2.out_channels for k in (1, 2, 3)
                    ],
                }
            elif name == "CifarVGG":
                config: list[int | str] = []
                for m in model.features:
                    if isinstance(m, (nn.Conv2d, FactorizedConv2d)):
                        config.append(m.out_channels)
                    elif isinstance(m, nn.MaxPool2d):
                        config.append("M")
                kwargs = {"config": config, "num_classes": model.classifier.weight.shape[0]}
            else:
                kwargs = {
                    "num_classes": model.classifier.weight.shape[0],
                    "width": model.features[0].out_channels,
                }
            return cls(name=name, kwargs=kwargs)  # type: ignore[arg-type]
        except (AttributeError, IndexError, TypeError, ValidationError):
            return None

    def build(self, device: Any = None) -> nn.Module:
        """A freshly initialised dense model of this architecture (on ``device``, e.g. "meta")."""
        cls = _shipped_classes()[self.name]
        kwargs = dict(self.kwargs)
        if self.name == "CifarVGG":
            kwargs["config"] = tuple(kwargs["config"])
        elif self.name == "CifarResNet":
            kwargs["widths"] = tuple(kwargs["widths"])
        with torch.device(device or "cpu"):
            return cls(**kwargs)


_KINDS = {"linear": 0, "conv1d": 1, "conv2d": 2, "conv3d": 3}
_LAYER_OF_DIMS = {layer.spatial_dims: layer for layer in FACTORIZED_TYPES.values()}


class LayerSpec(BaseModel):
    """Everything needed to rebuild one factorized layer (its values come from the state
    dict). Files written before Linear / Conv1d / Conv3d / grouped layers have no ``kind`` /
    ``group``: they are ungrouped Conv2d layers, the defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    method: str
    equation: str
    modes: tuple[str, ...]
    shape: tuple[int, ...]  # the dense layer's weight shape (T, S / groups, *k)
    ranks: tuple[int, ...]
    factor_shapes: list[tuple[int, ...]]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | Literal["same", "valid"]
    dilation: tuple[int, ...]
    padding_mode: Literal["zeros", "reflect", "replicate", "circular"]
    bias: bool
    dtype: str
    info: dict[str, Any] = {}
    kind: Literal["linear", "conv1d", "conv2d", "conv3d"] = "conv2d"
    group: str = ""  # the group index of a grouped kernel

    @field_validator("dtype")
    @classmethod
    def _floating(cls, value: str) -> str:
        dtype = getattr(torch, value, None)
        if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype.is_complex):
            raise ValueError(f"not a floating torch dtype: {value!r}")
        return value

    @classmethod
    def of(cls, name: str, layer: FactorizedLayer) -> LayerSpec:
        info = {k: v for k, v in layer.info.items() if isinstance(v, (int, float, str, bool))}
        dims = layer.spatial_dims
        return cls(
            name=name,
            method=layer.method,
            equation=layer.equation,
            modes=layer.modes,
            kind="linear" if dims == 0 else f"conv{dims}d",
            group=layer.group,
            shape=layer.kernel_shape,
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

    def build(self) -> FactorizedLayer:
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
            self.group,
        )
        layer = _LAYER_OF_DIMS[_KINDS[self.kind]]
        if self.kind == "linear":
            return layer(f, bias=self.bias)
        return layer(
            f,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias,
            groups=f.groups,
            padding_mode=self.padding_mode,
        )


class SavedModelHeader(BaseModel):
    """The validated, versioned description stored as JSON in a saved file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["tnconv"] = "tnconv"
    version: int = FORMAT_VERSION
    tnconv_version: str
    layers: list[LayerSpec]
    dense_reasons: dict[str, str] = {}
    input_size: tuple[int, ...] | None = None
    quantized: list[QuantLayerSpec] = []
    architecture: ArchitectureSpec | None = None  # version 3: a shipped architecture
    folded_bn: dict[str, str] = {}  # BN name -> the conv it was folded into (compress fold_bn)


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
        from .quantization import QuantizedConv2d, quantized_factorized_type

        c = layer.config  # type: ignore[attr-defined]
        kind = (
            "factorized"
            if isinstance(layer, FactorizedLayer) and quantized_factorized_type(layer) is not None
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
            QuantizedLinear,
            quantized_factorized_type,
        )

        config = QuantConfig(
            weight_bits=self.weight_bits,
            activation_bits=self.activation_bits,
            per_channel=self.per_channel,
            reduce_range=self.reduce_range,
        )
        kind = quantized_factorized_type(layer)
        if self.kind == "factorized" and kind is not None:
            # any factorized kind (Linear, Conv1d / 2d / 3d): its LayerSpec installed it
            return kind.from_layer(layer, config, self.path, self.axes)  # type: ignore[arg-type]
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


def _tensors_for_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no memory (what safetensors requires)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state.items():
        t = value.detach()
        if t.is_meta:
            raise ValueError(f"cannot save {key!r}: it is on the meta device (no values)")
        t = t.to("cpu")
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if not t.is_contiguous() or (ptr in seen and ptr != -1):
            t = t.contiguous().clone()
        elif ptr != -1:
            seen.add(ptr)
        out[key] = t
    return out


def save(model: nn.Module, path: str | Path, *, pickle_architecture: bool = True) -> None:
    """Write ``model`` (compressed or not) with its layer specs to ``path`` (safetensors).

    Args:
        model: any module; its factorized and quantized layers are described in the header.
        path: the file to write.
        pickle_architecture: also store the pickled module (without its weights) so that
            ``load(path, trusted=True)`` can rebuild an architecture tnconv does not ship.
            It is never read without ``trusted=True``; pass False to leave it out.
    """
    from safetensors.torch import save_file

    from . import __version__
    from .quantization import quantize_weight

    if not isinstance(model, nn.Module):
        raise TypeError(f"save needs a torch.nn.Module; got {type(model).__name__}")
    header = _header_of(model, __version__)
    state = dict(model.state_dict())
    clash = [k for k in state if k.startswith(PREFIX)]
    if clash:
        raise ValueError(f"state-dict keys starting with {PREFIX!r} are reserved: {clash[:3]}")
    tensors: dict[str, torch.Tensor] = {}
    for q in header.quantized:
        for key, axis in zip(q.weight_keys(), q.axes, strict=True):
            full = f"{q.name}.{key}" if q.name else key
            codes, scale = quantize_weight(state.pop(full), q.weight_bits, axis)
            tensors[f"{QUANTIZED_PREFIX}{full}.codes"] = pack_codes(codes, q.weight_bits)
            tensors[f"{QUANTIZED_PREFIX}{full}.scale"] = scale
    tensors.update(state)
    if pickle_architecture:
        buffer = io.BytesIO()
        torch.save(_weightless(model), buffer)
        tensors[ARCHITECTURE_KEY] = torch.frombuffer(
            bytearray(buffer.getvalue()), dtype=torch.uint8
        )
    metadata = {"format": "pt", "tnconv": json.dumps(header.model_dump(mode="json"))}
    save_file(_tensors_for_file(tensors), str(path), metadata=metadata)


def _header_of(model: nn.Module, version: str) -> SavedModelHeader:
    from .quantization import quantized_layers

    specs = [
        LayerSpec.of(name, m) for name, m in model.named_modules() if isinstance(m, FactorizedLayer)
    ]
    qspecs = [QuantLayerSpec.of(name, m) for name, m in quantized_layers(model)]
    size = getattr(model, INPUT_SIZE, None)
    header = SavedModelHeader(
        tnconv_version=version,
        layers=specs,
        dense_reasons=dict(getattr(model, DENSE_REASONS, {})),
        input_size=tuple(size) if size is not None else None,
        quantized=qspecs,
        folded_bn=dict(getattr(model, FOLDED_BN, {})),
    )
    arch = ArchitectureSpec.of(model)
    if arch is not None and _rebuilds(model, arch, header):
        header = header.model_copy(update={"architecture": arch})
    return header


def _rebuilds(model: nn.Module, arch: ArchitectureSpec, header: SavedModelHeader) -> bool:
    """Whether ``arch`` with ``header``'s layers installed has ``model``'s modules and
    state-dict shapes and dtypes (checked on the meta device: nothing is allocated)."""

    def signature(m: nn.Module) -> tuple[list[Any], list[Any]]:
        return (
            [(n, type(s)) for n, s in m.named_modules()],
            [(k, tuple(v.shape), v.dtype) for k, v in m.state_dict().items()],
        )

    try:
        rebuilt = arch.build("meta")
        _install_all(rebuilt, header)
    except Exception as exc:  # anything odd: do not record it; load then needs model= etc.
        log.debug("not recording %s: %s", arch, exc)
        return False
    return signature(rebuilt) == signature(model)


@dataclass
class _Contents:
    """What a file holds, whatever its version."""

    header: SavedModelHeader
    state: dict[str, torch.Tensor]
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    architecture: bytes | None = None


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        start = f.read(9)
    if len(start) < 9:
        return False
    n = int.from_bytes(start[:8], "little")
    return start[8:9] == b"{" and 0 < n <= path.stat().st_size - 8


def _validate(path: Path, raw: Any, versions: tuple[int, ...]) -> SavedModelHeader:
    if not isinstance(raw, dict):
        raise LoadError(f"{path}: corrupt tnconv header (not a JSON object)")
    if raw.get("version") not in versions:
        raise LoadError(
            f"{path}: tnconv format version {raw.get('version')!r} in this kind of file; this "
            f"tnconv reads versions {', '.join(map(str, READABLE_VERSIONS))} (1 and 2: torch "
            "archives, 3: safetensors)"
        )
    try:
        return SavedModelHeader.model_validate(raw)
    except ValidationError as exc:
        raise LoadError(f"{path}: corrupt tnconv header: {exc}") from exc


def _read_safetensors(path: Path, header_only: bool = False) -> _Contents:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if "tnconv" not in meta:
                raise LoadError(
                    f"{path}: not a tnconv save (a safetensors file without a tnconv header: "
                    "weights only; load them into a model with safetensors.torch.load_file)"
                )
            try:
                raw = json.loads(meta["tnconv"])
            except json.JSONDecodeError as exc:
                raise LoadError(f"{path}: corrupt tnconv header (bad JSON: {exc})") from exc
            header = _validate(path, raw, (FORMAT_VERSION,))
            if header_only:
                return _Contents(header, {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except LoadError:
        raise
    except Exception as exc:  # SafetensorError: truncated, bad offsets, bad header JSON
        raise LoadError(
            f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})"
        ) from exc
    contents = _Contents(header, {})
    arch = tensors.pop(ARCHITECTURE_KEY, None)
    if arch is not None:
        contents.architecture = arch.numpy().tobytes()
    for key, value in tensors.items():
        if key.startswith(QUANTIZED_PREFIX):
            full, _, part = key[len(QUANTIZED_PREFIX) :].rpartition(".")
            codes, scale = contents.quantized.get(full, (None, None))
            if part == "codes":
                codes = value
            elif part == "scale":
                scale = value
            else:
                raise LoadError(f"{path}: unknown tnconv tensor {key!r}")
            contents.quantized[full] = (codes, scale)  # type: ignore[assignment]
        elif key.startswith(PREFIX):
            raise LoadError(f"{path}: unknown tnconv tensor {key!r}")
        else:
            contents.state[key] = value
    for full, (codes, scale) in contents.quantized.items():
        if codes is None or scale is None:
            raise LoadError(f"{path}: quantized weight {full!r} lacks its codes or its scale")
    return contents


def _read_legacy(path: Path, header_only: bool = False) -> _Contents:
    """A version 1 / 2 file (a ``torch.save`` archive), read with ``weights_only=True``: only
    tensors and plain containers are unpickled; anything else is refused unexecuted."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LoadError(
            f"{path}: not a tnconv save, or corrupt: neither safetensors nor a torch archive of "
            f"tensors (torch.load(weights_only=True) said {type(exc).__name__}: {exc}). A "
            "whole pickled model is not a tnconv save; tnconv does not unpickle it"
        ) from exc
    if not isinstance(payload, dict) or "tnconv" not in payload:
        raise LoadError(f"{path}: not a tnconv save (no 'tnconv' header); use torch.load")
    header = _validate(path, payload["tnconv"], LEGACY_VERSIONS)
    if header_only:
        return _Contents(header, {})
    state = payload.get("state_dict")
    packed = payload.get("quantized_weights", {})
    arch = payload.get("architecture")
    if (
        not isinstance(state, dict)
        or not isinstance(packed, dict)
        or not (arch is None or isinstance(arch, bytes))
    ):
        raise LoadError(f"{path}: corrupt tnconv save (state_dict / architecture of wrong type)")
    contents = _Contents(header, dict(state), architecture=arch)
    for full, entry in packed.items():
        if not isinstance(entry, dict) or "codes" not in entry or "scale" not in entry:
            raise LoadError(f"{path}: corrupt quantized weight {full!r}")
        contents.quantized[full] = (entry["codes"], entry["scale"])
    return contents


def _read(path: Path, header_only: bool = False) -> _Contents:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if _is_safetensors(path):
        return _read_safetensors(path, header_only)
    return _read_legacy(path, header_only)


def read_header(path: str | Path) -> SavedModelHeader:
    """The validated header of a tnconv file (any version) without reading its weights.

    Raises:
        LoadError: not a tnconv save, corrupt, or an unknown format version.
    """
    return _read(Path(path), header_only=True).header


def _factory(model_fn: Callable[[], nn.Module] | str) -> Callable[[], nn.Module]:
    """``model_fn`` itself, or the callable a ``"package.module:function"`` string names
    (importing the module runs its code: name only modules you trust)."""
    if callable(model_fn):
        return model_fn
    if not isinstance(model_fn, str):
        raise LoadError(f"model_fn must be a callable or 'module:function'; got {model_fn!r}")
    module_name, sep, attr = model_fn.partition(":")
    if not sep or not module_name or not attr:
        raise LoadError(f"model_fn {model_fn!r} is not of the form 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LoadError(f"model_fn {model_fn!r}: cannot import {module_name!r}: {exc}") from exc
    try:
        fn = functools.reduce(getattr, attr.split("."), module)
    except AttributeError as exc:
        raise LoadError(f"model_fn {model_fn!r}: {module_name} has no {attr!r}") from exc
    if not callable(fn):
        raise LoadError(f"model_fn {model_fn!r} is a {type(fn).__name__}, not a callable")
    return fn


def _device(map_location: Any) -> torch.device:
    """The device a model built here goes to (``torch.load``-style mappings: the CPU)."""
    if isinstance(map_location, (str, torch.device)):
        return torch.device(map_location)
    return torch.device("cpu")


def _check_sizes(path: Path, contents: _Contents, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every tensor ``shapes`` names is in the file, in that shape (quantized ones: with at least
    one bit per value), so what is built from the header is no bigger than what the file holds."""
    for key, shape in shapes.items():
        if key in contents.state:
            have = tuple(contents.state[key].shape)
            if have != shape:
                raise LoadError(f"{path}: tensor {key!r} has shape {have}; the layout says {shape}")
        elif key in contents.quantized:
            if contents.quantized[key][0].numel() * 8 < math.prod(shape):
                raise LoadError(f"{path}: quantized weight {key!r} is too short for {shape}")
        else:
            raise LoadError(f"{path}: no tensor {key!r} for the saved layout")


def _check_layer_specs(path: Path, contents: _Contents) -> None:
    """The factor shapes in the header are those of the file's tensors (before any layer is
    built from them)."""
    shapes = {
        f"{spec.name}.factors.{k}" if spec.name else f"factors.{k}": tuple(s)
        for spec in contents.header.layers
        for k, s in enumerate(spec.factor_shapes)
    }
    _check_sizes(path, contents, shapes)


def _architecture(
    path: Path,
    contents: _Contents,
    model: nn.Module | None,
    model_fn: Callable[[], nn.Module] | str | None,
    trusted: bool,
    map_location: Any,
) -> nn.Module:
    """The module the weights go into, with the header's layers installed."""
    header = contents.header
    if model is not None or model_fn is not None:
        if model is not None and model_fn is not None:
            raise LoadError("give model= or model_fn=, not both")
        if model is not None:
            result = copy.deepcopy(model)
        else:
            fn = _factory(model_fn)  # type: ignore[arg-type]
            result = fn()
            if not isinstance(result, nn.Module):
                raise LoadError(f"model_fn returned a {type(result).__name__}, not an nn.Module")
        _install_all(result, header)
        return result
    if header.architecture is not None:
        skeleton = header.architecture.build("meta")  # allocates nothing
        _install_all(skeleton, header)
        _check_sizes(path, contents, {k: tuple(v.shape) for k, v in skeleton.state_dict().items()})
        result = header.architecture.build()
        _install_all(result, header)
        return result.to(_device(map_location))
    if contents.architecture is None:
        raise LoadError(
            f"{path} stores no architecture tnconv can rebuild: pass model= (a dense model of "
            "the same architecture) or model_fn= (a callable or 'module:function' returning one)"
        )
    if not trusted:
        raise UntrustedFileError(
            f"{path}: rebuilding this model means unpickling the architecture stored in the "
            "file, which can run arbitrary code. Pass model= (a dense model of the same "
            "architecture) or model_fn= (CLI --model module:function) to load it safely, or "
            "trusted=True (CLI --trust-file) if you trust the file as you would a program"
        )
    result = torch.load(
        io.BytesIO(contents.architecture), map_location=map_location, weights_only=False
    )
    if not isinstance(result, nn.Module):
        raise LoadError(f"{path}: the pickled architecture is a {type(result).__name__}")
    _materialize(result, _device(map_location))
    return result


def load(
    path: str | Path,
    model: nn.Module | None = None,
    map_location: Any = "cpu",
    *,
    model_fn: Callable[[], nn.Module] | str | None = None,
    trusted: bool = False,
) -> nn.Module:
    """Read a model written by :func:`save` (or by earlier tnconv versions).

    No code is unpickled unless ``trusted=True``. The architecture the weights go into comes
    from, in this order: ``model``, ``model_fn``, the shipped architecture recorded in the file
    (``tnconv.models``' CIFAR ResNets / VGG, the demo's ``DigitsNet``), and only with
    ``trusted=True`` the pickled architecture the file carries.

    Args:
        path: the file.
        model: a freshly built *dense* model of the same architecture; a copy of it receives
            the factorized / quantized layers and the weights. ``model`` itself is not modified.
        map_location: device of the rebuilt model when it is built here (shipped or pickled
            architecture); with ``model`` / ``model_fn`` the weights go where that model is.
        model_fn: instead of ``model``, a callable returning one, or a
            ``"package.module:function"`` string naming it (imported and called without
            arguments; importing runs that module's code, as any import does).
        trusted: allow unpickling the architecture the file carries when none of the above
            applies and the file does not record a shipped architecture. **Unpickling executes
            arbitrary code from the file**: pass True only for files you would run as programs.

    Raises:
        LoadError: not a tnconv file, truncated / corrupt, an unsupported version, or a model
            that does not match; :class:`UntrustedFileError` (a LoadError) when only
            ``trusted=True`` could rebuild the model.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    contents = _read(path)
    header = contents.header
    _check_layer_specs(path, contents)
    try:
        result = _architecture(path, contents, model, model_fn, trusted, map_location)
    except LoadError:
        raise
    except TnconvError as exc:  # e.g. an equation the layer rejects
        raise LoadError(f"{path}: cannot rebuild the saved layers: {exc}") from exc
    state = dict(contents.state)
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
            entry = contents.quantized.get(full)
            if entry is None:
                raise LoadError(f"{path}: no quantized weight {full!r}")
            codes, scale = entry
            like = layer.get_parameter(key)
            try:
                values = unpack_codes(codes, qspec.weight_bits, tuple(like.shape))
                state[full] = values.to(like.dtype) * scale.to(like.dtype)
            except RuntimeError as exc:
                raise LoadError(f"{path}: corrupt quantized weight {full!r}: {exc}") from exc
    for spec in header.layers:
        layer = result.get_submodule(spec.name)
        if not isinstance(layer, FactorizedLayer) or LayerSpec.of(spec.name, layer).model_dump(
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


def _install_all(model: nn.Module, header: SavedModelHeader) -> None:
    """Install the header's folded BNs, factorized, then quantized, layers into a dense
    ``model``."""
    try:
        remove_folded(model, header.folded_bn)
    except AttributeError as exc:
        raise LoadError(f"the model has no module to fold: {exc}") from exc
    for spec in header.layers:
        _install(model, spec)
    for qspec in header.quantized:
        parent_name, _, child = qspec.name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            current = model.get_submodule(qspec.name)
        except AttributeError as exc:
            raise LoadError(f"the model has no module {qspec.name!r} to quantize") from exc
        setattr(parent, child, qspec.wrap(current).train(current.training))


def _install(model: nn.Module, spec: LayerSpec) -> None:
    try:
        current = model.get_submodule(spec.name)
    except AttributeError as exc:
        raise LoadError(f"the model has no module {spec.name!r} to factorize") from exc
    if isinstance(current, DENSE_TYPES):
        wanted = _LAYER_OF_DIMS[_KINDS[spec.kind]].dense_type
        if not isinstance(current, wanted):
            raise LoadError(
                f"module {spec.name!r} is a {type(current).__name__}; the saved layer replaces "
                f"an nn.{wanted.__name__}"
            )
        if tuple(current.weight.shape) != spec.shape:
            raise LoadError(
                f"module {spec.name!r} has kernel {tuple(current.weight.shape)}, the saved layer "
                f"{spec.shape}"
            )
    elif not isinstance(current, FactorizedLayer):
        raise LoadError(
            f"module {spec.name!r} is a {type(current).__name__}, not a Linear or convolution"
        )
    parent_name, _, child = spec.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = spec.build()
    param = next(current.parameters(), None)
    if param is not None:
        layer = layer.to(param.device)
    setattr(parent, child, layer)
