"""The CIFAR-10 models of the RSDTR paper, and which of their convolutions it compresses.

* :func:`resnet20`, :func:`resnet32`, :func:`resnet56`: He et al. (2016) CIFAR ResNets with
  option-A (parameter-free) shortcuts; 0.27M / 0.46M / 0.85M parameters.
* :func:`vgg19_bn`: CIFAR VGG-19 with batch norm and one linear classifier; 20.04M parameters.
* :func:`block_convs`: the convolutions the paper compresses -- every conv inside a residual
  block, or every VGG conv but the first. The stem, the (conv-free) shortcuts and the classifier
  stay dense::

      small = tnconv.compress(model, "tr", eps=0.3, layers=block_convs(model))

The models are plain ``nn.Module``s and know nothing about tensor networks.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .resnet_cifar import BasicBlock, CifarResNet, ShortcutA, resnet20, resnet32, resnet56
from .vgg_cifar import VGG19_CONFIG, CifarVGG, vgg19_bn

__all__ = [
    "MODELS",
    "VGG19_CONFIG",
    "BasicBlock",
    "CifarResNet",
    "CifarVGG",
    "ShortcutA",
    "block_convs",
    "create",
    "resnet20",
    "resnet32",
    "resnet56",
    "vgg19_bn",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "vgg19_bn": vgg19_bn,
}


def create(name: str, num_classes: int = 10) -> nn.Module:
    """A freshly initialised model by name (one of :data:`MODELS`)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes)


def block_convs(model: nn.Module) -> list[str]:
    """Names of the convolutions the RSDTR paper compresses in ``model``, in forward order.

    ResNets: ``layerK.J.conv1`` and ``layerK.J.conv2`` of every block. VGG: every conv of
    ``features`` but the first. The names are structural: on an already compressed model they
    include the convs that were factorized. Pass them as ``layers=`` to ``tnconv.compress``.

    Raises:
        TypeError: ``model`` is not one of this package's models (choose its layers yourself).
    """
    if isinstance(model, (CifarResNet, CifarVGG)):
        return model.block_convs()
    raise TypeError(
        f"block_convs knows the models of tnconv.models ({', '.join(MODELS)}); got "
        f"{type(model).__name__}: pass compress(layers=...) names or a predicate instead"
    )
