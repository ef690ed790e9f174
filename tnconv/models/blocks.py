"""The building blocks of well-known architectures, built by hand (no torchvision, no weights),
and small networks made of them: the layer kinds real models keep their weights in.

* :class:`Bottleneck`: ResNet-50's 1x1 -> 3x3 -> 1x1 block (``groups`` > 1: ResNeXt's);
* :class:`InvertedResidual`: MobileNetV2's expand 1x1 -> depthwise 3x3 -> project 1x1;
* :class:`MBConv`: EfficientNet's inverted residual with squeeze-excitation (two 1x1 convs);
* :class:`ConvNeXtBlock`: depthwise 7x7 -> LayerNorm -> Linear 4x -> GELU -> Linear;
* :class:`TemporalBlock`: a dilated causal 1-D conv block (temporal conv nets, audio);
* :class:`Conv3dBlock`: a 3x3x3 conv block (video).

:data:`ARCHITECTURES` maps a name to a factory of a small network (stem, blocks, head) and its
input size; :func:`resnet50` is the full ResNet-50 (25.6M parameters) with its 1000-way head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "Bottleneck",
    "Conv3dBlock",
    "ConvNeXtBlock",
    "InvertedResidual",
    "MBConv",
    "TemporalBlock",
    "resnet50",
]


def _conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck (``groups=1``, ``width = planes``) or ResNeXt's (``groups`` > 1)."""

    def __init__(
        self, cin: int, planes: int, stride: int = 1, groups: int = 1, width: int | None = None
    ) -> None:
        super().__init__()
        width = width or planes
        cout = planes * 4
        self.conv1 = _conv_bn(cin, width)
        self.conv2 = _conv_bn(width, width, 3, stride, groups)
        self.conv3 = _conv_bn(width, cout)
        self.shortcut = (
            _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        y = torch.relu(self.conv2(y))
        return torch.relu(self.conv3(y) + self.shortcut(x))


class InvertedResidual(nn.Module):
    """MobileNetV2: 1x1 expand (x ``expand``), depthwise 3x3, 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 6) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = _conv_bn(cin, hidden)
        self.depthwise = _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = _conv_bn(hidden, cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(nn.functional.relu6(self.depthwise(nn.functional.relu6(self.expand(x)))))
        return x + y if self.residual else y


class MBConv(nn.Module):
    """EfficientNet: 1x1 expand, depthwise 3x3, squeeze-excitation (1x1 reduce / expand convs
    on the pooled map), 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 6) -> None:
        super().__init__()
        hidden = cin * expand
        squeezed = max(1, cin // 4)
        self.expand = _conv_bn(cin, hidden)
        self.depthwise = _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.se_reduce = nn.Conv2d(hidden, squeezed, 1)
        self.se_expand = nn.Conv2d(squeezed, hidden, 1)
        self.project = _conv_bn(hidden, cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.silu(self.depthwise(nn.functional.silu(self.expand(x))))
        scale = torch.sigmoid(
            self.se_expand(nn.functional.silu(self.se_reduce(y.mean((2, 3), True))))
        )
        y = self.project(y * scale)
        return x + y if self.residual else y


class ConvNeXtBlock(nn.Module):
    """ConvNeXt: depthwise 7x7, LayerNorm over channels, Linear 4x expansion, GELU, Linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.depthwise(x).permute(0, 2, 3, 1)  # (B, H, W, C): the Linears act on channels
        y = self.fc2(nn.functional.gelu(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class TemporalBlock(nn.Module):
    """A temporal conv net block: two dilated causal Conv1d (k=3) and a 1x1 residual."""

    def __init__(self, cin: int, cout: int, dilation: int) -> None:
        super().__init__()
        self.pad = 2 * dilation
        self.conv1 = nn.Conv1d(cin, cout, 3, dilation=dilation)
        self.conv2 = nn.Conv1d(cout, cout, 3, dilation=dilation)
        self.residual = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(nn.functional.pad(x, (self.pad, 0))))
        y = torch.relu(self.conv2(nn.functional.pad(y, (self.pad, 0))))
        return torch.relu(y + self.residual(x))


class Conv3dBlock(nn.Module):
    """Two 3x3x3 convolutions with BatchNorm and a residual (a small video network's block)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.shortcut = (
            nn.Conv3d(cin, cout, 1, stride, bias=False)
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class _Net(nn.Module):
    """stem -> blocks -> global average pool -> Linear head."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], width: int, classes: int) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blocks(self.stem(x))
        return self.head(y.flatten(2).mean(-1))


def resnet_bottleneck_net(classes: int = 10, width: int = 32) -> nn.Module:
    """A small ResNet-50-style network: three bottleneck stages (``width``: stem channels)."""
    w = width
    blocks = [Bottleneck(w, w // 2), Bottleneck(2 * w, w, 2), Bottleneck(4 * w, w)]
    return _Net(_conv_bn(3, w, 3), blocks, 4 * w, classes)


def resnext_net(classes: int = 10, width: int = 64) -> nn.Module:
    """A small ResNeXt: grouped (32x4d-style) bottlenecks."""
    w = width
    groups = max(1, w // 2)
    blocks = [
        Bottleneck(w, w // 2, groups=groups, width=2 * w),
        Bottleneck(2 * w, w // 2, 2, groups, 2 * w),
    ]
    return _Net(_conv_bn(3, w, 3), blocks, 2 * w, classes)


def mobilenet_v2_net(classes: int = 10, width: int = 32) -> nn.Module:
    w = width
    blocks = [InvertedResidual(w, w), InvertedResidual(w, 2 * w, 2), InvertedResidual(2 * w, 2 * w)]
    return _Net(_conv_bn(3, w, 3), blocks, 2 * w, classes)


def efficientnet_net(classes: int = 10, width: int = 32) -> nn.Module:
    w = width
    blocks = [MBConv(w, w), MBConv(w, 2 * w, 2), MBConv(2 * w, 2 * w)]
    return _Net(_conv_bn(3, w, 3), blocks, 2 * w, classes)


def convnext_net(classes: int = 10, width: int = 64) -> nn.Module:
    stem = nn.Conv2d(3, width, 4, stride=4)
    return _Net(stem, [ConvNeXtBlock(width), ConvNeXtBlock(width)], width, classes)


def temporal_net(classes: int = 10, width: int = 32) -> nn.Module:
    w = width
    blocks = [
        TemporalBlock(w, 2 * w, 1),
        TemporalBlock(2 * w, 2 * w, 2),
        TemporalBlock(2 * w, 2 * w, 4),
    ]
    return _Net(nn.Conv1d(8, w, 1), blocks, 2 * w, classes)


def video_net(classes: int = 10, width: int = 16) -> nn.Module:
    w = width
    blocks = [Conv3dBlock(w, 2 * w, 2), Conv3dBlock(2 * w, 2 * w)]
    return _Net(nn.Conv3d(3, w, 3, padding=1), blocks, 2 * w, classes)


def resnet50(classes: int = 1000) -> nn.Module:
    """ResNet-50 (He et al. 2016): 7x7 stem, [3, 4, 6, 3] bottlenecks, 1000-way head;
    25,557,032 parameters. Randomly initialised."""
    stem = nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    )
    blocks: list[nn.Module] = []
    cin = 64
    for planes, count, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for k in range(count):
            blocks.append(Bottleneck(cin, planes, stride if k == 0 else 1))
            cin = planes * 4
    return _Net(stem, blocks, cin, classes)


# name -> (factory(classes=10, width=...), input size); the widths are the factories' defaults
ARCHITECTURES: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {
    "resnet-bottleneck": (resnet_bottleneck_net, (1, 3, 32, 32)),
    "resnext": (resnext_net, (1, 3, 32, 32)),
    "mobilenet-v2": (mobilenet_v2_net, (1, 3, 32, 32)),
    "efficientnet-mbconv": (efficientnet_net, (1, 3, 32, 32)),
    "convnext": (convnext_net, (1, 3, 32, 32)),
    "temporal-1d": (temporal_net, (1, 8, 64)),
    "video-3d": (video_net, (1, 3, 8, 16, 16)),
}
