"""The geometry of a convolution: stride, explicit padding, dilation and padding mode, on any
number of spatial axes."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

__all__ = ["ConvGeometry"]


def _is_int(value: Any) -> bool:
    # numbers.Integral covers numpy integers, which torch.nn.Conv2d accepts too
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _ntuple(value: Any, name: str, n: int) -> tuple[int, ...]:
    if _is_int(value):
        return (int(value),) * n
    if isinstance(value, (tuple, list)) and len(value) == n and all(_is_int(v) for v in value):
        return tuple(int(v) for v in value)
    what = "an int" if n == 1 else f"an int or {n} ints"
    raise ValueError(f"{name} must be {what}; got {value!r}")


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, explicit padding (before, after per axis: top, bottom, left, right in 2-D),
    dilation and padding mode of a convolution over ``len(stride)`` spatial axes."""

    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0, 0, 0)
    dilation: tuple[int, ...] = (1, 1)
    padding_mode: str = "zeros"

    @property
    def dims(self) -> int:
        return len(self.stride)

    @classmethod
    def make(
        cls,
        kernel_size: tuple[int, ...],
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        padding_mode: str = "zeros",
    ) -> ConvGeometry:
        """Normalise ``torch.nn.ConvNd``-style arguments (padding an int, a tuple, 'same' or
        'valid') for a kernel of ``len(kernel_size)`` spatial axes (0 for a Linear layer)."""
        n = len(kernel_size)
        st, dl = _ntuple(stride, "stride", n), _ntuple(dilation, "dilation", n)
        if n and (min(st) < 1 or min(dl) < 1):
            raise ValueError(f"stride and dilation must be >= 1; got stride={st}, dilation={dl}")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(
                f"padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular'; "
                f"got {padding_mode!r}"
            )
        pad: list[int] = []
        if isinstance(padding, str):
            if padding == "valid":
                pad = [0] * (2 * n)
            elif padding == "same":
                if any(s != 1 for s in st):
                    raise ValueError("padding='same' requires stride 1 (as in torch.nn.Conv2d)")
                # torch puts the odd extra pixel of an even kernel at the end of the axis
                for k, d in zip(kernel_size, dl, strict=True):
                    total = d * (k - 1)
                    pad += [total // 2, total - total // 2]
            else:
                raise ValueError(
                    f"padding must be 'same', 'valid', an int or a tuple; got {padding!r}"
                )
        else:
            per_axis = _ntuple(padding, "padding", n)
            if n and min(per_axis) < 0:
                raise ValueError(f"padding must be >= 0; got {padding!r}")
            for p in per_axis:
                pad += [p, p]
        return cls(st, tuple(pad), dl, padding_mode)

    def lifted(self, n: int) -> ConvGeometry:
        """The same convolution on ``n`` axes: unit axes (stride 1, no padding) in front."""
        extra = n - self.dims
        if extra < 0:
            raise ValueError(f"cannot lift a {self.dims}-D geometry to {n} axes")
        return ConvGeometry(
            (1,) * extra + self.stride,
            (0,) * (2 * extra) + self.padding,
            (1,) * extra + self.dilation,
            self.padding_mode,
        )

    def output_size(self, size: tuple[int, ...], kernel: tuple[int, ...]) -> tuple[int, ...]:
        """Output sizes of an input of ``size`` convolved with a ``kernel`` (one per axis)."""
        out = []
        for axis in range(len(size)):
            n = size[axis] + self.padding[2 * axis] + self.padding[2 * axis + 1]
            span = self.dilation[axis] * (kernel[axis] - 1) + 1
            if n < span:
                raise ValueError(
                    f"input of size {tuple(size)} (padded {n} on axis {axis}) is smaller than "
                    f"the dilated kernel extent {span}"
                )
            out.append((n - span) // self.stride[axis] + 1)
        return tuple(out)
