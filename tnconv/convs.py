"""A model's factorizable layers (``nn.Linear``, ``nn.Conv1d/2d/3d``): which ones a call
chooses, the input shape each one sees, and the attributes tnconv records on a compressed model.

:mod:`tnconv.compress` and :mod:`tnconv.recommend` both use them, so neither imports the other
for them (recommend needs no compress at all, compress imports recommend's ``auto_spec``);
``tnconv.compress`` re-exports them, where the other modules still import them from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .layers import DENSE_TYPES, FactorizedLayer

__all__ = [
    "DENSE_REASONS",
    "INPUT_SIZE",
    "LATENCY_GUARD",
    "LayerSelector",
    "conv_input_shapes",
    "default_input_size",
    "depthwise_reason",
    "is_depthwise",
    "select_convs",
]

LayerSelector = Sequence[str] | Callable[[str, nn.Module], bool] | type | tuple[type, ...] | None

# attributes tnconv keeps on a compressed model (they survive deepcopy, pickling and tnconv.save)
DENSE_REASONS = "_tnconv_dense_reasons"
INPUT_SIZE = "_tnconv_input_size"
# compress(must_save="latency"): the whole-model timing its guard ended with
LATENCY_GUARD = "_tnconv_latency_guard"


def select_convs(model: nn.Module, layers: LayerSelector = None) -> list[tuple[str, nn.Module]]:
    """The factorizable layers (``nn.Linear``, ``nn.Conv1d/2d/3d``) chosen by ``layers``: names,
    a layer type or tuple of types (e.g. ``nn.Conv2d``), a predicate ``(name, module) ->
    bool``, or None for all of them.

    Raises ``KeyError`` for a name that is not in the model and ``TypeError`` for a named module
    that tnconv does not factorize.
    """
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, DENSE_TYPES)]
    if layers is None:
        return convs
    if isinstance(layers, type) or (
        isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers)
    ):
        return [(n, m) for n, m in convs if isinstance(m, layers)]
    if callable(layers):
        return [(n, m) for n, m in convs if layers(n, m)]
    if isinstance(layers, str):
        layers = [layers]
    modules = dict(model.named_modules())
    chosen = []
    for name in layers:
        if name not in modules:
            known = ", ".join(n for n, _ in convs[:12]) + (" ..." if len(convs) > 12 else "")
            raise KeyError(f"no module named {name!r} in the model; its layers: {known}")
        if not isinstance(modules[name], DENSE_TYPES):
            raise TypeError(
                f"module {name!r} is a {type(modules[name]).__name__}, not an nn.Linear / "
                "nn.Conv1d / nn.Conv2d / nn.Conv3d"
            )
        chosen.append((name, modules[name]))
    return chosen


def is_depthwise(module: nn.Module) -> bool:
    """A conv with one input channel per group (and several groups): kept dense by compress."""
    groups = getattr(module, "groups", 1)
    return groups > 1 and module.weight.shape[1] == 1


def depthwise_reason(module: nn.Module) -> str:
    """Why compress keeps a depthwise conv dense (its ``dense_reasons`` entry)."""
    return (
        f"depthwise convolution (groups={module.groups}, one input channel per group): "
        "kept dense, a per-channel kernel has no channel modes to factorize"
    )


# the input size assumed for a model whose first layer has this many spatial modes
_DEFAULT_SPATIAL = {0: (), 1: (1024,), 2: (224, 224), 3: (16, 112, 112)}


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """The input size used when none is given: the size recorded by :func:`compress`, or
    ``(1, C, 224, 224)`` with C the input channels of the model's first layer (a Conv2d;
    ``(1, C, 1024)`` for a Conv1d, ``(1, C, 16, 112, 112)`` for a Conv3d, ``(1, C)`` for a
    Linear)."""
    recorded = getattr(model, INPUT_SIZE, None)
    if recorded is not None:
        return tuple(recorded)
    for module in model.modules():
        if isinstance(module, FactorizedLayer):
            return (1, module.in_channels, *_DEFAULT_SPATIAL[module.spatial_dims])
        if isinstance(module, DENSE_TYPES):
            dims = 0 if isinstance(module, nn.Linear) else len(module.kernel_size)
            channels = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            return (1, channels, *_DEFAULT_SPATIAL[dims])
    raise ValueError("the model has no convolution or linear layer; give input_size")


def conv_input_shapes(model: nn.Module, input_size: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Input shape of every factorizable layer (dense or factorized) in one forward pass on
    zeros (the last one, for a layer called several times)."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (*DENSE_TYPES, FactorizedLayer)):

            def record(mod: nn.Module, args: tuple, name: str = name) -> None:
                shapes[name] = tuple(args[0].shape)  # type: ignore[assignment]

            hooks.append(module.register_forward_pre_hook(record))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(tuple(input_size), device=device, dtype=dtype))
    except Exception as exc:
        raise ValueError(
            f"could not run the model on an input of size {tuple(input_size)} to measure "
            f"FLOPs ({type(exc).__name__}: {exc}); pass the right input_size"
        ) from exc
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Install ``module`` in ``model`` under the dotted ``name``, replacing what is there."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
