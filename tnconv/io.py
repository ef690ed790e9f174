"""``tnconv.save`` / ``tnconv.load``: compressed models with their layer specs.

A saved file (``torch.save`` format) holds

* ``"tnconv"``: a header validated by pydantic on load: format version, the tnconv version that
  wrote it, one :class:`LayerSpec` per factorized layer (equation, shapes, ranks, geometry), why
  layers were kept dense, and the input size used for FLOPs;
* ``"state_dict"``: every parameter and buffer;
* ``"architecture"``: the pickled module itself, as bytes.

``load(path, model=dense_model)`` rebuilds the factorized layers from their specs inside a copy of
a freshly constructed dense model and loads the state dict: it never unpickles code
(``torch.load(weights_only=True)``). ``load(path)`` without a model unpickles the architecture
(like ``torch.load`` of a whole model it needs the model's classes importable, and the file must
be trusted).
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from .compress import DENSE_REASONS, INPUT_SIZE
from .errors import TnconvError
from .factorization import Factorization
from .layers import FactorizedConv2d

__all__ = ["FORMAT_VERSION", "LayerSpec", "SavedModelHeader", "load", "save"]

FORMAT_VERSION = 1


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


def save(model: nn.Module, path: str | Path) -> None:
    """Write ``model`` (compressed or not) with its layer specs to ``path``."""
    from . import __version__

    if not isinstance(model, nn.Module):
        raise TypeError(f"save needs a torch.nn.Module; got {type(model).__name__}")
    specs = [
        LayerSpec.of(name, m)
        for name, m in model.named_modules()
        if isinstance(m, FactorizedConv2d)
    ]
    size = getattr(model, INPUT_SIZE, None)
    header = SavedModelHeader(
        tnconv_version=__version__,
        layers=specs,
        dense_reasons=dict(getattr(model, DENSE_REASONS, {})),
        input_size=tuple(size) if size is not None else None,
    )
    buffer = io.BytesIO()
    torch.save(model, buffer)
    torch.save(
        {
            "tnconv": header.model_dump(mode="json"),
            "state_dict": model.state_dict(),
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
    if isinstance(raw, dict) and raw.get("version") != FORMAT_VERSION:
        raise LoadError(
            f"{path}: tnconv format version {raw.get('version')!r}; this tnconv reads "
            f"version {FORMAT_VERSION}"
        )
    try:
        header = SavedModelHeader.model_validate(raw)
    except ValidationError as exc:
        raise LoadError(f"{path}: corrupt tnconv header: {exc}") from exc

    if model is None:
        result = torch.load(
            io.BytesIO(payload["architecture"]), map_location=map_location, weights_only=False
        )
    else:
        result = copy.deepcopy(model)
        for spec in header.layers:
            _install(result, spec)
    for spec in header.layers:
        layer = result.get_submodule(spec.name)
        if not isinstance(layer, FactorizedConv2d) or LayerSpec.of(spec.name, layer).model_dump(
            exclude={"info"}
        ) != spec.model_dump(exclude={"info"}):
            raise LoadError(f"{path}: layer {spec.name!r} does not match its saved spec")
    try:
        result.load_state_dict(payload["state_dict"], strict=True)
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
