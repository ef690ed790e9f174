"""The geometry of a convolution: stride, explicit padding, dilation and padding mode."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

__all__ = ["ConvGeometry"]


def _is_int(value: Any) -> bool:
    # numbers.Integral covers numpy integers, which torch.nn.Conv2d accepts too
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _pair(value: Any, name: str) -> tuple[int, int]:
    if _is_int(value):
        return (int(value), int(value))
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or a pair of ints; got {value!r}")


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, explicit padding (top, bottom, left, right), dilation and padding mode."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    padding_mode: str = "zeros"

    @classmethod
    def make(
        cls,
        kernel_size: tuple[int, int],
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        padding_mode: str = "zeros",
    ) -> ConvGeometry:
        """Normalise ``torch.nn.Conv2d``-style arguments (padding int, pair, 'same', 'valid')."""
        st, dl = _pair(stride, "stride"), _pair(dilation, "dilation")
        if min(st) < 1 or min(dl) < 1:
            raise ValueError(f"stride and dilation must be >= 1; got stride={st}, dilation={dl}")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(
                f"padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular'; "
                f"got {padding_mode!r}"
            )
        if isinstance(padding, str):
            if padding == "valid":
                pad = (0, 0, 0, 0)
            elif padding == "same":
                if st != (1, 1):
                    raise ValueError("padding='same' requires stride 1 (as in torch.nn.Conv2d)")
                # torch puts the odd extra pixel of an even kernel at the bottom / right
                th, tw = dl[0] * (kernel_size[0] - 1), dl[1] * (kernel_size[1] - 1)
                pad = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
            else:
                raise ValueError(
                    f"padding must be 'same', 'valid', an int or a pair; got {padding!r}"
                )
        else:
            ph, pw = _pair(padding, "padding")
            if min(ph, pw) < 0:
                raise ValueError(f"padding must be >= 0; got {padding!r}")
            pad = (ph, ph, pw, pw)
        return cls(st, pad, dl, padding_mode)

    def output_size(self, size: tuple[int, int], kernel: tuple[int, int]) -> tuple[int, int]:
        """Output (H', W') of an input (H, W) convolved with a (kh, kw) kernel."""
        out = []
        for axis in range(2):
            n = size[axis] + self.padding[2 * axis] + self.padding[2 * axis + 1]
            span = self.dilation[axis] * (kernel[axis] - 1) + 1
            if n < span:
                raise ValueError(
                    f"input of size {tuple(size)} (padded {n} on axis {axis}) is smaller than "
                    f"the dilated kernel extent {span}"
                )
            out.append((n - span) // self.stride[axis] + 1)
        return out[0], out[1]
