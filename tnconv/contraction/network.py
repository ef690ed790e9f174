"""The conv-einsum of a factorization: its structure relabelled to opt_einsum symbols."""

from __future__ import annotations

from dataclasses import dataclass

import opt_einsum

from ..errors import EquationError
from ..factorization import Factorization, parse_equation

__all__ = ["ConvNetwork"]


@dataclass(frozen=True)
class ConvNetwork:
    """Structure of a factorized kernel, relabelled to opt_einsum symbols.

    ``terms`` are the factors' index strings, ``in_modes`` the input-channel (S) indices,
    ``out_modes`` the output-channel (T) indices, ``h`` / ``w`` the coupled spatial indices and
    ``sizes`` the size of every index. ``batch``, ``H``, ``W`` label the feature map's own axes.
    """

    terms: tuple[str, ...]
    in_modes: str
    out_modes: str
    h: str
    w: str
    sizes: tuple[tuple[str, int], ...]
    batch: str
    H: str
    W: str

    @classmethod
    def from_factorization(cls, f: Factorization) -> ConvNetwork:
        inputs, out = parse_equation(f.equation)
        letters = sorted({c for t in inputs for c in t} | set(out))
        if len(letters) + 3 > 52:
            raise EquationError(
                f"equation {f.equation!r} has {len(letters)} indices; at most 49 are supported"
            )
        sym = {c: opt_einsum.get_symbol(i) for i, c in enumerate(letters)}
        sizes = {sym[c]: n for c, n in f.index_sizes().items()}
        extra = [opt_einsum.get_symbol(len(letters) + i) for i in range(3)]
        modes = f.modes
        assert modes is not None
        return cls(
            terms=tuple("".join(sym[c] for c in t) for t in inputs),
            in_modes="".join(sym[c] for c in modes[1]),
            out_modes="".join(sym[c] for c in modes[0]),
            h=sym[modes[2]],
            w=sym[modes[3]],
            sizes=tuple(sorted(sizes.items())),
            batch=extra[0],
            H=extra[1],
            W=extra[2],
        )

    @property
    def size_of(self) -> dict[str, int]:
        return dict(self.sizes)

    @property
    def kernel_size(self) -> tuple[int, int]:
        s = self.size_of
        return s[self.h], s[self.w]

    def einsum(self) -> str:
        """The conv-einsum as opt_einsum sees it: feature map first, h / w left uncoupled."""
        data = self.batch + self.in_modes + self.H + self.W
        return ",".join((data, *self.terms)) + "->" + self.batch + self.out_modes + self.H + self.W
