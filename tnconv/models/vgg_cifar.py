"""CIFAR VGG-19 with batch norm, as in the RSDTR paper's code (the network-slimming VGG).

Sixteen 3x3 convs (no bias) each followed by BN and ReLU, in the configuration
``[64, 64, M, 128, 128, M, 256 x4, M, 512 x4, M, 512 x4]`` with 2x2 max pools ``M``; the last
stage's 2x2 map is average-pooled to 1x1 and a single ``Linear(512, num_classes)`` classifies
(about 20.04M parameters for 10 classes). Compared with a fifth max pool this differs only in
the final pooling: same parameters and FLOPs.
"""

from __future__ import annotations

import torch
from torch import nn

from .resnet_cifar import _kaiming_init

__all__ = ["VGG19_CONFIG", "CifarVGG", "vgg19_bn"]

VGG19_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
    512, 512, 512, 512,
)  # fmt: skip


class CifarVGG(nn.Module):
    """VGG with BN for 32x32 inputs: input (B, 3, 32, 32) -> logits (B, num_classes).

    ``features`` is one ``nn.Sequential`` of (conv, BN, ReLU) triples and max pools, followed by
    a global average pool and ``classifier`` (one linear layer).
    """

    def __init__(self, config: tuple[int | str, ...] = VGG19_CONFIG, num_classes: int = 10) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}")
        layers: list[nn.Module] = []
        channels = 3
        # positions of the convs in ``features``, recorded here so that block_convs names them
        # even after compression has swapped them for another module type
        self.conv_positions: list[int] = []
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            elif isinstance(item, int) and item > 0:
                self.conv_positions.append(len(layers))
                layers += [
                    nn.Conv2d(channels, item, 3, padding=1, bias=False),
                    nn.BatchNorm2d(item),
                    nn.ReLU(inplace=True),
                ]
                channels = item
            else:
                raise ValueError(f"config entries are positive ints or 'M'; got {item!r}")
        if channels == 3:
            raise ValueError("config has no convolution")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.classifier(out)

    def block_convs(self) -> list[str]:
        """Names of every convolution but the first (``features.K``): what the RSDTR paper
        compresses. The first conv sees only 3 input channels and stays dense, as does the
        classifier."""
        return [f"features.{k}" for k in self.conv_positions[1:]]


def vgg19_bn(num_classes: int = 10) -> CifarVGG:
    """CIFAR VGG-19-BN: 16 convs + one linear layer, 20.04M parameters for 10 classes."""
    return CifarVGG(VGG19_CONFIG, num_classes)
