"""CIFAR ResNets of He et al. (2016), section 4.2: ResNet-20 / 32 / 56 with option-A shortcuts.

A 3x3 stem conv (16 channels), three stages of ``n`` BasicBlocks with 16, 32 and 64 channels (the
first block of stages 2 and 3 halves the resolution with a stride-2 conv), global average
pooling and one linear classifier: ``6n + 2`` weighted layers. Shortcuts are *option A*: the
identity, subsampled by 2 and zero-padded with the extra channels where a block changes shape,
so they carry no parameters.

Module names follow the widely used CIFAR ResNet code (``conv1``, ``bn1``, ``layer1.0.conv1``,
..., ``linear``), which is also what the RSDTR reference code uses, so state dicts trained with
that code load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "ShortcutA", "resnet20", "resnet32", "resnet56"]


class ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample by ``stride`` and zero-pad channels to ``out_channels``.

    Input (B, C_in, H, W) -> output (B, C_out, ceil(H / stride), ceil(W / stride)). The input's
    channels land in the middle: ``(C_out - C_in) // 2`` zero channels before them and the rest
    after, the layout of the common CIFAR ResNet code (its pretrained weights expect it).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"option-A shortcuts only add channels; got {in_channels} -> {out_channels}"
            )
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        before = extra // 2
        return F.pad(x, (0, 0, 0, 0, before, extra - before))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a ReLU between them, plus the shortcut, then a ReLU.

    Input (B, C_in, H, W) -> output (B, C_out, H / stride, W / stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = (
            ShortcutA(in_channels, out_channels, stride)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: input (B, 3, 32, 32) -> logits (B, num_classes).

    Args:
        blocks_per_stage: n, the number of BasicBlocks in each of the three stages.
        num_classes: classifier outputs.
        widths: channels of the three stages (16, 32, 64 in the paper).
    """

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1; got {blocks_per_stage}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1; got {num_classes}")
        self.blocks_per_stage = blocks_per_stage
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        channels = widths[0]
        stages = []
        for k, width in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if k > 0 and j == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(channels, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)

    def block_convs(self) -> list[str]:
        """Names of the convolutions inside the residual blocks (``layerK.J.conv1/conv2``):
        what the RSDTR paper compresses. The stem ``conv1`` and the classifier are not listed;
        option-A shortcuts have no convolution."""
        return [
            f"{stage}.{j}.{conv}"
            for stage in ("layer1", "layer2", "layer3")
            for j in range(len(getattr(self, stage)))
            for conv in ("conv1", "conv2")
        ]


def _kaiming_init(model: nn.Module) -> None:
    """He-normal weights for convs and linears (fan-in, ReLU gain), BN at (1, 0), zero biases."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 (n = 3): 0.27M parameters for 10 classes."""
    return CifarResNet(3, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 (n = 5): 0.46M parameters for 10 classes."""
    return CifarResNet(5, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 (n = 9): 0.85M parameters for 10 classes."""
    return CifarResNet(9, num_classes)
