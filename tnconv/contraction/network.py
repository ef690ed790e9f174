"""The conv-einsum of a factorization: its structure relabelled to opt_einsum symbols."""

from __future__ import annotations

from dataclasses import dataclass

import opt_einsum

from ..errors import EquationError
from ..factorization import Factorization, parse_equation

__all__ = ["ConvNetwork", "executor_dims"]


def executor_dims(spatial_dims: int) -> int:
    """Spatial axes the executor runs a kernel with ``spatial_dims`` of them on: a Linear (0)
    or 1-D kernel runs as a 2-D convolution over unit axes (one set of conv2d / matmul kernels,
    one cost table), a 3-D kernel on conv3d."""
    if spatial_dims not in (0, 1, 2, 3):
        raise ValueError(f"kernels have 0 to 3 spatial modes; got {spatial_dims}")
    return max(spatial_dims, 2)


@dataclass(frozen=True)
class ConvNetwork:
    """Structure of a factorized kernel, relabelled to opt_einsum symbols.

    ``terms`` are the factors' index strings, ``in_modes`` the input-channel indices (the group
    index first for a grouped kernel), ``out_modes`` the output-channel indices (group first too),
    ``spatial`` the kernel index coupled to each executor axis (``None``: the kernel has no
    extent there, e.g. a Linear layer or the unit axis of a lifted 1-D conv) and ``sizes`` the
    size of every index. ``batch`` and ``axes`` label the feature map's own axes.
    """

    terms: tuple[str, ...]
    in_modes: str
    out_modes: str
    spatial: tuple[str | None, ...]
    sizes: tuple[tuple[str, int], ...]
    batch: str
    axes: tuple[str, ...]
    spatial_dims: int = 2  # the kernel's own spatial modes (0 for a Linear layer)

    @classmethod
    def from_factorization(cls, f: Factorization) -> ConvNetwork:
        inputs, out = parse_equation(f.equation)
        letters = sorted({c for t in inputs for c in t} | set(out))
        dims = len(f.shape) - 2
        n = executor_dims(dims)
        if len(letters) + 1 + n > 52:
            raise EquationError(
                f"equation {f.equation!r} has {len(letters)} indices; at most "
                f"{51 - n} are supported"
            )
        sym = {c: opt_einsum.get_symbol(i) for i, c in enumerate(letters)}
        sizes = {sym[c]: n for c, n in f.index_sizes().items()}
        extra = [opt_einsum.get_symbol(len(letters) + i) for i in range(1 + n)]
        modes = f.modes
        assert modes is not None
        kernel_axes: list[str | None] = [sym[m] for m in modes[2:]]
        group = sym[f.group] if f.group else ""
        return cls(
            terms=tuple("".join(sym[c] for c in t) for t in inputs),
            in_modes=group + "".join(sym[c] for c in modes[1]),
            out_modes="".join(sym[c] for c in modes[0]),
            spatial=tuple([None] * (n - dims) + kernel_axes),
            sizes=tuple(sorted(sizes.items())),
            batch=extra[0],
            axes=tuple(extra[1:]),
            spatial_dims=dims,
        )

    @property
    def size_of(self) -> dict[str, int]:
        return dict(self.sizes)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        """The kernel's extent on every executor axis (1 where it has none)."""
        s = self.size_of
        return tuple(1 if c is None else s[c] for c in self.spatial)

    @property
    def coupled(self) -> tuple[str, ...]:
        """The kernel's spatial indices (those coupled to a feature-map axis)."""
        return tuple(c for c in self.spatial if c is not None)

    def einsum(self) -> str:
        """The conv-einsum as opt_einsum sees it: feature map first, spatial indices uncoupled."""
        axes = "".join(self.axes)
        data = self.batch + self.in_modes + axes
        return ",".join((data, *self.terms)) + "->" + self.batch + self.out_modes + axes
