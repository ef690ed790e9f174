"""FactorizedLinear: a ``torch.nn.Linear`` whose (out, in) weight is a tensor network."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..decompositions.base import Decomposition
from ..errors import InputShapeError
from .base import FactorizedLayer

__all__ = ["FactorizedLinear"]


class FactorizedLinear(FactorizedLayer):
    """A linear layer whose weight (T, S) is a tensor network (a kernel with no spatial mode).

    Shapes: input (..., S) of any rank, output (..., T), as ``nn.Linear``. The M = prod(...)
    rows run through the same executor as convolutions: as one channels-last (1, S, 1, M) map,
    so its 1x1 steps are matrix products over the rows.
    """

    spatial_dims = 0
    dense_type = nn.Linear

    def __init__(
        self, factorization: Any, bias: torch.Tensor | bool | None = None, **geometry: Any
    ) -> None:
        if geometry:
            raise TypeError(f"FactorizedLinear takes no {sorted(geometry)} (it has no kernel axes)")
        super().__init__(factorization, bias=bias)
        self.in_features, self.out_features = self.in_channels, self.out_channels

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        method: str | Decomposition,
        rank: Any = None,
        *,
        eps: Any = None,
        ratio: Any = None,
        **options: Any,
    ) -> FactorizedLayer:
        """:meth:`FactorizedLayer.from_dense` for an ``nn.Linear``."""
        return cls.from_dense(linear, method, rank, eps=eps, ratio=ratio, **options)

    @classmethod
    def from_scratch(  # type: ignore[override]
        cls,
        method: str | Decomposition,
        in_features: int,
        out_features: int,
        rank: Any,
        bias: bool = True,
        **options: Any,
    ) -> FactorizedLayer:
        """A randomly initialised factorized linear layer (``nn.Linear``'s initial scale)."""
        return super().from_scratch(
            method, in_features, out_features, (), rank, bias=bias, **options
        )

    def executor_input(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise InputShapeError(
                f"FactorizedLinear expects input (..., {self.in_features}); got "
                f"{list(x.shape)} (mat1 and mat2 shapes cannot be multiplied)"
            )
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        return rows.reshape(1, 1, rows.shape[0], self.in_features).permute(0, 3, 1, 2), lead

    def executor_output(self, y: torch.Tensor, how: Any) -> torch.Tensor:
        return y.permute(0, 2, 3, 1).reshape(*how, self.out_features)

    def to_linear(self) -> nn.Linear:
        """The dense ``nn.Linear`` (see :meth:`to_dense`)."""
        return self.to_dense()  # type: ignore[return-value]
