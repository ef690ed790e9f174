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
    """Contract the feature map with one weight operand as a single convolution (conv2d, or
    conv3d on a plan with three spatial axes)."""

    factor: int
    data_perm: tuple[int, ...] | None  # permutation of the data tensor before reshaping
    data_shape: tuple[int, ...]  # conv input (B * fold, groups * contracted, *spatial)
    # channels-last execution: permute to (B, fold, *spatial, groups, contracted), reshape to
    # (B * fold, *spatial, groups * contracted), and view as channels-first
    nhwc_perm: tuple[int, ...]
    factor_perm: tuple[int, ...] | None
    weight_shape: tuple[int, ...]  # (groups * new, contracted, *kernel)
    groups: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]  # symmetric padding handed to the conv
    pad: tuple[int, ...] | None  # explicit F.pad (last axis first) if needed
    padding_mode: str
    dilation: tuple[int, ...]
    out_shape: tuple[int, ...]  # (B, *fold, *groups, *new, *spatial')
    flops: int
    # > 1: the fold indices run as conv groups with the weight repeated this many times
    # (channels (fold, groups, contracted)) instead of being folded into the batch
    repeat: int = 1
    # with repeat > 1: the fold indices sit inside the group indices (channels (groups, fold,
    # contracted), the weight repeated per group rather than per fold), where the feature map
    # already holds them in that order: no permuting copy before the step or after it
    fold_inner: bool = False
    seconds: float = math.nan  # predicted by the cost table (nan without one)
    # a pointwise step run as one matrix product over the pixels instead of a conv call
    matmul: bool = False
    # > 1: the fold and group indices (this many values together) run through the weight as
    # identity blocks (the weight of ``expand_equation``: factor x identities), so the conv
    # reads the feature map's channels in the order they are in and writes them in the order
    # the next step (or the output) wants: no permuting copy, ``expand`` times the multiply-adds
    expand: int = 1
    expand_equation: str | None = None
    expand_eyes: tuple[int, ...] = ()  # the identities' sizes, in the equation's order

    @property
    def pointwise(self) -> bool:
        """A 1x1, stride-1, unpadded step: the spatial axes can be flattened."""
        return (
            all(k == 1 for k in self.weight_shape[2:])
            and all(s == 1 for s in self.stride)
            and not any(self.padding)
            and self.pad is None
        )
