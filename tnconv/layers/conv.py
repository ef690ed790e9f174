"""Factorized convolutions over 1, 2 and 3 spatial axes: :class:`FactorizedLayer` with the
dimension fixed, and the inputs shaped as ``torch.nn.Conv1d`` / ``Conv2d`` / ``Conv3d`` take them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..decompositions.base import Decomposition
from .base import FactorizedLayer

__all__ = ["FactorizedConv1d", "FactorizedConv2d", "FactorizedConv3d"]


class _FactorizedConv(FactorizedLayer):
    @classmethod
    def from_conv(
        cls,
        conv: nn.Module,
        method: str | Decomposition,
        rank: Any = None,
        *,
        eps: Any = None,
        ratio: Any = None,
        **options: Any,
    ) -> FactorizedLayer:
        """:meth:`FactorizedLayer.from_dense` for a conv of this class's dimension."""
        return cls.from_dense(conv, method, rank, eps=eps, ratio=ratio, **options)

    def executor_input(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        x, unbatched = self._conv_input(x)
        if self.spatial_dims == 1:
            x = x.unsqueeze(2)  # (B, S, L) runs as (B, S, 1, L): one 2-D executor
        return x, unbatched

    def executor_output(self, y: torch.Tensor, how: Any) -> torch.Tensor:
        if self.spatial_dims == 1:
            y = y.squeeze(2)
        return y.squeeze(0) if how else y


class FactorizedConv1d(_FactorizedConv):
    """A 1-D convolution whose kernel (T, S / groups, k) is a tensor network.

    Shapes: input (B, S, L) or (S, L); output (B, T, L') as for ``nn.Conv1d``. It runs as a 2-D
    convolution over a unit axis (same executor, same plans)."""

    spatial_dims = 1
    dense_type = nn.Conv1d

    def to_conv1d(self) -> nn.Conv1d:
        """The dense ``nn.Conv1d`` (see :meth:`to_dense`)."""
        return self.to_dense()  # type: ignore[return-value]


class FactorizedConv2d(_FactorizedConv):
    """A 2-D convolution whose kernel (T, S / groups, kh, kw) is a tensor network.

    Shapes: input (B, S, H, W) or (S, H, W), NCHW or channels-last; output (B, T, H', W') as for
    ``nn.Conv2d``, in the input's layout. The output equals ``F.conv2d(x,
    factorization.to_tensor(), bias, stride, padding, dilation, groups)``; it is computed
    without ever forming the dense kernel."""

    spatial_dims = 2
    dense_type = nn.Conv2d

    def to_conv2d(self) -> nn.Conv2d:
        """The dense ``nn.Conv2d`` (see :meth:`to_dense`)."""
        return self.to_dense()  # type: ignore[return-value]


class FactorizedConv3d(_FactorizedConv):
    """A 3-D convolution whose kernel (T, S / groups, kd, kh, kw) is a tensor network.

    Shapes: input (B, S, D, H, W) or (S, D, H, W), NCDHW or channels-last-3d; output as for
    ``nn.Conv3d``. Its data steps run as ``conv3d`` calls."""

    spatial_dims = 3
    dense_type = nn.Conv3d

    def to_conv3d(self) -> nn.Conv3d:
        """The dense ``nn.Conv3d`` (see :meth:`to_dense`)."""
        return self.to_dense()  # type: ignore[return-value]
