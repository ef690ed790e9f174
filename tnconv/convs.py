"""A model's convolutions: which ones a call chooses, the input shape each one sees, and the
attributes tnconv records on a compressed model.

:mod:`tnconv.compress` and :mod:`tnconv.recommend` both use them, so neither imports the other
for them (recommend needs no compress at all, compress imports recommend's ``auto_spec``);
``tnconv.compress`` re-exports them, where the other modules still import them from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .layers import FactorizedConv2d

__all__ = [
    "DENSE_REASONS",
    "INPUT_SIZE",
    "LayerSelector",
    "conv_input_shapes",
    "default_input_size",
    "select_convs",
]

LayerSelector = Sequence[str] | Callable[[str, nn.Module], bool] | None

# attributes tnconv keeps on a compressed model (they survive deepcopy, pickling and tnconv.save)
DENSE_REASONS = "_tnconv_dense_reasons"
INPUT_SIZE = "_tnconv_input_size"


def select_convs(model: nn.Module, layers: LayerSelector = None) -> list[tuple[str, nn.Conv2d]]:
    """The ``nn.Conv2d`` modules chosen by ``layers`` (names, a predicate, or None for all).

    Raises ``KeyError`` for a name that is not in the model and ``TypeError`` for a named module
    that is not an ``nn.Conv2d``.
    """
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if layers is None:
        return convs
    if callable(layers):
        return [(n, m) for n, m in convs if layers(n, m)]
    if isinstance(layers, str):
        layers = [layers]
    modules = dict(model.named_modules())
    chosen = []
    for name in layers:
        if name not in modules:
            known = ", ".join(n for n, _ in convs[:12]) + (" ..." if len(convs) > 12 else "")
            raise KeyError(f"no module named {name!r} in the model; conv layers: {known}")
        if not isinstance(modules[name], nn.Conv2d):
            raise TypeError(f"module {name!r} is a {type(modules[name]).__name__}, not nn.Conv2d")
        chosen.append((name, modules[name]))
    return chosen


def default_input_size(model: nn.Module) -> tuple[int, int, int, int]:
    """The input size used when none is given: the size recorded by :func:`compress`, or
    ``(1, C, 224, 224)`` with C the input channels of the model's first convolution."""
    recorded = getattr(model, INPUT_SIZE, None)
    if recorded is not None:
        return tuple(recorded)  # type: ignore[return-value]
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, FactorizedConv2d)):
            return (1, module.in_channels, 224, 224)
    raise ValueError("the model has no convolution; give input_size")


def conv_input_shapes(
    model: nn.Module, input_size: Sequence[int]
) -> dict[str, tuple[int, int, int, int]]:
    """Input shape of every conv (dense or factorized) in one forward pass on zeros."""
    shapes: dict[str, tuple[int, int, int, int]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, FactorizedConv2d)):

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
