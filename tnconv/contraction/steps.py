"""The steps of a plan: weights-only einsums (:class:`FactorStep`) and feature-map x factor
convolutions (:class:`DataStep`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DataStep", "FactorStep"]


@dataclass(frozen=True)
class FactorStep:
    """Contract two weight operands with ``torch.einsum``.

    ``flops`` follows torch.utils.flop_counter: 2 per multiply-add of a contraction, 0 for a
    broadcast (outer / elementwise) product.
    """

    left: int
    right: int
    equation: str
    flops: int
    macs: int  # multiplies (-adds), whether or not anything is summed


@dataclass(frozen=True)
class DataStep:
    """Contract the feature map with one weight operand as a single ``conv2d``."""

    factor: int
    data_perm: tuple[int, ...] | None  # permutation of the data tensor before reshaping
    data_shape: tuple[int, ...]  # conv input (B * fold, groups * contracted, H, W)
    # channels-last execution: permute to (B, fold, H, W, groups, contracted), reshape to
    # (B * fold, H, W, groups * contracted), and view as NCHW
    nhwc_perm: tuple[int, ...]
    factor_perm: tuple[int, ...] | None
    weight_shape: tuple[int, int, int, int]  # (groups * new, contracted, kh', kw')
    groups: int
    stride: tuple[int, int]
    padding: tuple[int, int]  # symmetric padding handed to conv2d
    pad: tuple[int, int, int, int] | None  # explicit F.pad (left, right, top, bottom) if needed
    padding_mode: str
    dilation: tuple[int, int]
    out_shape: tuple[int, ...]  # (B, *fold, *groups, *new, H', W')
    flops: int
    # > 1: the fold indices run as conv groups with the weight repeated this many times
    # (channels (fold, groups, contracted)) instead of being folded into the batch
    repeat: int = 1
    seconds: float = math.nan  # predicted by the cost table (nan without one)
    # a pointwise step run as one matrix product over the pixels instead of a conv2d call
    matmul: bool = False

    @property
    def pointwise(self) -> bool:
        """A 1x1, stride-1, unpadded step: the spatial axes can be flattened."""
        return (
            self.weight_shape[2:] == (1, 1)
            and self.stride == (1, 1)
            and self.padding == (0, 0)
            and self.pad is None
        )
