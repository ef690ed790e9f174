"""Kernels of other orders, and grouped kernels, through a family's 4-D algebra.

Every family is written for a conv kernel (T, S, kh, kw). What it does with the other kernels
of a network is stated here once, for all of them (plugins included):

* order 2, a Linear weight (T, S): fitted as (T, S, 1, 1); the unit spatial indices are then
  dropped from the factors carrying them, and a factor left with no kernel index (a bond
  matrix or vector between others, e.g. a Tucker-2 core on a matrix, or CP's unit spatial
  columns) is absorbed into a neighbour when that does not add parameters. Tucker-2 becomes
  a three-matrix low-rank product, TT a chain of two cores, TR / RSDTR a two-core ring, CP a
  rank-R matrix product;
* order 3, a Conv1d kernel (T, S, k): fitted as (T, S, 1, k), the unit index dropped;
* order 5, a Conv3d kernel (T, S, kd, kh, kw): fitted as (T, S, kd, kh * kw) and the index of
  kh * kw split into kh and kw inside the one factor carrying it (exact: it is a reshape);
* a grouped kernel (T, S / G, *k): each group's (T / G, S / G, *k) kernel is fitted, at ranks
  common to all groups, and the factors are stacked along a group index carried by every
  factor (the network of one group, G times, as a batch-like index: one layer, not G).
"""

from __future__ import annotations

import itertools
import math
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidWeightError, OptionError, StructureError
from ..factorization import Factorization, parse_equation

__all__ = ["Lifting", "auto_tensorize", "from_order4", "stack_groups", "to_order4"]

Tensorize = tuple[tuple[int, ...], tuple[int, ...]]


def _split(n: int, parts: int) -> tuple[int, ...] | None:
    """``n`` as ``parts`` factors as equal as possible (largest first), or None when ``n`` has
    fewer than ``parts`` prime factors."""
    primes, m, p = [], n, 2
    while p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    if m > 1:
        primes.append(m)
    if len(primes) < parts:
        return None
    sizes = [1] * parts
    for q in sorted(primes, reverse=True):  # the largest prime to the smallest part
        sizes[sizes.index(min(sizes))] *= q
    return tuple(sorted(sizes, reverse=True))


def auto_tensorize(out_channels: int, in_channels: int) -> Tensorize | None:
    """The channel split ``tensorize="auto"`` uses: three balanced factors of T and of S when
    both are at least 64 and have three prime factors, else two, else None (not tensorized)."""
    for parts in (3, 2) if min(out_channels, in_channels) >= 64 else (2,):
        t, s = _split(out_channels, parts), _split(in_channels, parts)
        if t is not None and s is not None and min(t + s) >= 2:
            return t, s
    return None


@dataclass(frozen=True)
class Lifting:
    """How a kernel (T, S, *k) of any order, its channels optionally tensorized, is fitted by a
    family's 4-D algebra: its *atoms* (``t0..``: the factors of T, ``s0..``: of S, ``k0..``:
    the spatial modes) are laid out in four *slots*, the modes of the 4-D kernel the family
    fits (an empty slot has size 1). After the fit, the index of each slot is split back into
    its atoms inside the factor carrying it (a reshape: exact) and empty slots are dropped.

    Untensorized: (T, S) -> [t0][s0][][], (T, S, k) -> [t0][s0][][k0], (T, S, kh, kw) ->
    [t0][s0][k0][k1], (T, S, kd, kh, kw) -> [t0][s0][k0][k1 k2]. Tensorized into d pairs
    (Novikov et al. 2015's TT-matrix layout): the pairs (t_i, s_i) in order, then the spatial
    modes, merged until four slots remain: a train over the slots is a TT-matrix, a ring a
    TR-matrix, Tucker-2 a Tucker over the first two pairs.
    """

    shape: tuple[int, ...]
    out_sizes: tuple[int, ...]
    in_sizes: tuple[int, ...]
    slots: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, shape: tuple[int, ...], tensorize: Any = None) -> Lifting:
        """The layout for a kernel of ``shape`` and a ``tensorize`` request: None, "auto" or
        ``((t_1, ..., t_d), (s_1, ..., s_d))`` with products T and S."""
        shape = tuple(int(n) for n in shape)
        t, s, *k = shape
        spatial = tuple(f"k{i}" for i in range(len(k)))
        split = auto_tensorize(t, s) if isinstance(tensorize, str) else tensorize
        if isinstance(tensorize, str) and tensorize != "auto":
            raise OptionError(
                f'tensorize must be None, "auto" or (out sizes, in sizes); got {tensorize!r}'
            )
        if split is None:
            empty: tuple[tuple[str, ...], ...] = ((),) * (2 - len(k)) if len(k) < 2 else ()
            tail = (*empty, *((a,) for a in spatial))
            if len(k) == 3:
                tail = (("k0",), ("k1", "k2"))
            return cls(shape, (t,), (s,), (("t0",), ("s0",), *tail))
        out_sizes, in_sizes = cls._check(split, t, s)
        items: list[tuple[str, ...]] = [(f"t{i}", f"s{i}") for i in range(len(out_sizes))]
        if spatial:
            items.append(spatial if len(items) + len(spatial) > 4 else spatial[:1])
            if len(items) + len(spatial) - 1 <= 4:
                items += [(a,) for a in spatial[1:]]
        sizes = dict(zip([f"t{i}" for i in range(len(out_sizes))], out_sizes, strict=True))
        sizes |= dict(zip([f"s{i}" for i in range(len(in_sizes))], in_sizes, strict=True))
        sizes |= dict(zip(spatial, k, strict=True))
        while len(items) > 4:  # merge the adjacent pair of smallest size
            j = min(
                range(len(items) - 1),
                key=lambda i: math.prod(sizes[a] for a in items[i] + items[i + 1]),
            )
            items[j : j + 2] = [items[j] + items[j + 1]]
        items += [()] * (4 - len(items))
        return cls(shape, out_sizes, in_sizes, tuple(items))

    @staticmethod
    def _check(split: Any, t: int, s: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        try:
            out_sizes, in_sizes = (tuple(int(n) for n in part) for part in split)
        except (TypeError, ValueError) as exc:
            raise OptionError(
                "tensorize must be (out sizes, in sizes), e.g. ((8, 8, 8), (4, 4, 4)); got "
                f"{split!r}"
            ) from exc
        if len(out_sizes) != len(in_sizes) or len(out_sizes) < 2 or min(out_sizes + in_sizes) < 1:
            raise OptionError(
                f"tensorize={split!r}: give as many (>= 2) positive output as input sizes"
            )
        if math.prod(out_sizes) != t or math.prod(in_sizes) != s:
            raise OptionError(
                f"tensorize={split!r}: the sizes multiply to {math.prod(out_sizes)} x "
                f"{math.prod(in_sizes)}, the kernel has {t} x {s} channels"
            )
        return out_sizes, in_sizes

    @property
    def tensorized(self) -> bool:
        return len(self.out_sizes) > 1

    @property
    def atom_sizes(self) -> dict[str, int]:
        k = self.shape[2:]
        sizes = {f"t{i}": n for i, n in enumerate(self.out_sizes)}
        sizes |= {f"s{i}": n for i, n in enumerate(self.in_sizes)}
        return sizes | {f"k{i}": n for i, n in enumerate(k)}

    @property
    def fit_shape(self) -> tuple[int, int, int, int]:
        """The 4-D kernel the family fits."""
        sizes = self.atom_sizes
        return tuple(math.prod(sizes[a] for a in slot) for slot in self.slots)  # type: ignore[return-value]

    def to_fit(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` (of :attr:`shape`) as the 4-D kernel the family fits (a view when nothing is
        permuted)."""
        sizes = self.atom_sizes
        order = [*(f"t{i}" for i in range(len(self.out_sizes)))]
        order += [f"s{i}" for i in range(len(self.in_sizes))]
        order += [f"k{i}" for i in range(len(self.shape) - 2)]
        atoms = w.reshape([sizes[a] for a in order])
        wanted = [a for slot in self.slots for a in slot]
        perm = [order.index(a) for a in wanted]
        if perm != sorted(perm):
            atoms = atoms.permute(perm)
        return atoms.reshape(self.fit_shape)

    def from_fit(self, f: Factorization) -> Factorization:
        """The factorization ``f`` of :meth:`to_fit` ``(w)`` as one of ``w``. Exact."""
        if self.slots == (("t0",), ("s0",), ("k0",), ("k1",)):
            return f
        inputs, _ = parse_equation(f.equation)
        factors = list(f.factors)
        used = {c for term in inputs for c in term}
        sizes = self.atom_sizes
        letters: dict[str, str] = {}  # atom -> its index letter(s)
        for slot, mode in zip(self.slots, f.modes or (), strict=True):
            if not slot:  # an empty slot: drop its unit indices
                for c in mode:
                    k = next(i for i, term in enumerate(inputs) if c in term)
                    factors[k] = factors[k].squeeze(inputs[k].index(c))
                    inputs[k] = inputs[k].replace(c, "")
                continue
            if len(slot) == 1:
                letters[slot[0]] = mode
                continue
            if len(mode) != 1:
                # the network already splits the slot (a semi-tensor channel mode (i, a)):
                # split both row-major splits down to their common refinement
                letters.update(_refine(slot, mode, sizes, inputs, factors, used, f.method))
                continue
            names = [mode] + [_fresh(used) for _ in slot[1:]]
            k = next(i for i, term in enumerate(inputs) if mode in term)
            axis = inputs[k].index(mode)
            fshape = list(factors[k].shape)
            atoms = [sizes[a] for a in slot]
            factors[k] = factors[k].reshape(*fshape[:axis], *atoms, *fshape[axis + 1 :])
            inputs[k] = inputs[k].replace(mode, "".join(names))
            letters.update(zip(slot, names, strict=True))
        modes = [
            "".join(letters[f"t{i}"] for i in range(len(self.out_sizes))),
            "".join(letters[f"s{i}"] for i in range(len(self.in_sizes))),
            *(letters[f"k{i}"] for i in range(len(self.shape) - 2)),
        ]
        inputs, factors = _absorb_bond_factors(inputs, factors, "".join(modes))
        out = Factorization(
            factors,
            ",".join(inputs) + "->" + "".join(modes),
            self.shape,
            f.ranks,
            f.method,
            tuple(modes),
            dict(f.info),
        )
        out.info["fitted_as"] = list(self.fit_shape)
        if self.tensorized:
            out.info["tensorize"] = [list(self.out_sizes), list(self.in_sizes)]
        return out


def to_order4(w: torch.Tensor) -> torch.Tensor:
    """``w`` (T, S, *k) with 0 to 3 spatial modes as the 4-D kernel its family fits (a view)."""
    return Lifting.of(tuple(w.shape)).to_fit(w)


def _fresh(used: set[str]) -> str:
    letter = next(c for c in string.ascii_letters if c not in used)
    used.add(letter)
    return letter


def _suffixes(sizes: list[int]) -> list[int]:
    """The strides of a row-major split: [prod(sizes[1:]), prod(sizes[2:]), ..., 1]."""
    return [math.prod(sizes[i + 1 :]) for i in range(len(sizes))]


def _refine(
    slot: tuple[str, ...],
    mode: str,
    sizes: dict[str, int],
    inputs: list[str],
    factors: list[torch.Tensor],
    used: set[str],
    method: str,
) -> dict[str, str]:
    """Letters for the atoms of ``slot`` when the network's own index of that slot is the
    several letters of ``mode`` (a row-major split too): every letter is cut at the atoms'
    boundaries (its factors reshaped, ``inputs`` / ``factors`` updated in place), each atom
    gets the run of pieces it spans. Needs the two splits to nest (each boundary stride
    dividing the next); otherwise :class:`StructureError` names both."""
    dims = {c: factors[k].shape[inputs[k].index(c)] for k, t in enumerate(inputs) for c in t}
    atom_sizes = [sizes[a] for a in slot]
    letter_sizes = [int(dims[c]) for c in mode]
    total = math.prod(atom_sizes)
    # the strides where either split starts a new part, descending: total, ..., 1
    bounds = sorted({total, *_suffixes(atom_sizes), *_suffixes(letter_sizes)}, reverse=True)
    if 1 in atom_sizes or any(a % b for a, b in itertools.pairwise(bounds)):
        raise StructureError(
            f"{method}: its network splits the slot {slot} (sizes {tuple(atom_sizes)}) as "
            f"{mode!r} (sizes {tuple(letter_sizes)}); the two splits do not nest, so it cannot "
            "be tensorized this way (choose sizes that the network's split divides)"
        )

    def pieces(span_sizes: list[int]) -> list[list[int]]:
        """For each part of a row-major split, the indices of the pieces it spans."""
        out, hi = [], total
        for stride in _suffixes(span_sizes):
            out.append(
                [i for i in range(len(bounds) - 1) if bounds[i] <= hi and bounds[i + 1] >= stride]
            )
            hi = stride
        return out

    names: list[str] = [""] * (len(bounds) - 1)
    for c, span in zip(mode, pieces(letter_sizes), strict=True):
        parts = [c] + [_fresh(used) for _ in span[1:]]
        for i, name in zip(span, parts, strict=True):
            names[i] = name
        if len(span) == 1:
            continue
        piece_sizes = [bounds[i] // bounds[i + 1] for i in span]
        for k, term in enumerate(inputs):
            if c in term:
                axis = term.index(c)
                shape = list(factors[k].shape)
                factors[k] = factors[k].reshape(*shape[:axis], *piece_sizes, *shape[axis + 1 :])
                inputs[k] = term.replace(c, "".join(parts))
    return {
        a: "".join(names[i] for i in span) for a, span in zip(slot, pieces(atom_sizes), strict=True)
    }


def from_order4(f: Factorization, shape: tuple[int, ...]) -> Factorization:
    """The factorization ``f`` of ``to_order4(w)`` as one of ``w`` (``shape``): unit spatial
    indices dropped (order 2 / 3), or the merged one split (order 5). Exact."""
    return Lifting.of(tuple(shape)).from_fit(f)


def _absorb_bond_factors(
    inputs: list[str], factors: list[torch.Tensor], out: str
) -> tuple[list[str], list[torch.Tensor]]:
    """Contract every factor that carries no kernel index into the neighbour that gives the
    smallest result, when the result is no larger than the two factors were."""
    inputs, factors = list(inputs), list(factors)
    changed = True
    while changed:
        changed = False
        for i, term in enumerate(inputs):
            if set(term) & set(out):
                continue
            best: tuple[int, str, int] | None = None
            for j, other in enumerate(inputs):
                if j == i or (term and not set(term) & set(other)):
                    continue
                counts = Counter(c for k, t in enumerate(inputs) if k not in (i, j) for c in t)
                keep = "".join(dict.fromkeys(c for c in other + term if c in out or counts[c] > 0))
                sizes = dict(zip(term, factors[i].shape, strict=True)) | dict(
                    zip(other, factors[j].shape, strict=True)
                )
                size = math.prod(sizes[c] for c in keep)
                if size <= factors[i].numel() + factors[j].numel() and (
                    best is None or size < best[2]
                ):
                    best = (j, keep, size)
            if best is None:
                continue
            j, keep, _ = best
            merged = torch.einsum(f"{inputs[j]},{term}->{keep}", factors[j], factors[i])
            inputs[j], factors[j] = keep, merged
            del inputs[i], factors[i]
            changed = True
            break
    return inputs, factors


def _same_network(fits: list[Factorization]) -> bool:
    first = fits[0]
    return all(
        f.equation == first.equation
        and [tuple(x.shape) for x in f.factors] == [tuple(x.shape) for x in first.factors]
        for f in fits[1:]
    )


def stack_groups(
    weight: torch.Tensor,
    groups: int,
    fit_group: Callable[[torch.Tensor, tuple[int, ...] | None], Factorization],
    method: str,
) -> Factorization:
    """Factorize a grouped kernel ``weight`` (T, S / G, *k) as one network with a group index.

    ``fit_group(w_g, ranks)`` fits one group's kernel (T / G, S / G, *k): with the caller's
    rank spec when ``ranks`` is None, else at exactly those ranks. When the groups' own fits
    differ in structure, every group is refitted at the ranks of the largest one (so a ratio or
    eps met per group is met with room to spare by the smaller ones).
    """
    t = int(weight.shape[0])
    if groups < 1 or t % groups:
        raise InvalidWeightError(
            f"groups={groups} must be a positive divisor of the {t} output channels of the "
            f"kernel {tuple(weight.shape)}"
        )
    parts = weight.reshape(groups, t // groups, *weight.shape[1:]).unbind(0)
    fits = [fit_group(w_g, None) for w_g in parts]
    if not _same_network(fits):
        largest = max(fits, key=lambda f: f.num_params)
        fits = [fit_group(w_g, largest.ranks) for w_g in parts]
        if not _same_network(fits):
            raise StructureError(
                f"{method}: the {groups} groups of a {tuple(weight.shape)} kernel give networks "
                f"of different structure even at common ranks {largest.ranks}; factorize the "
                "groups separately or keep the layer dense"
            )
    first = fits[0]
    inputs, out = parse_equation(first.equation)
    g = _fresh({c for term in inputs for c in term})
    modes = list(first.modes or ())
    factors = [torch.stack([f.factors[k] for f in fits]) for k in range(len(first.factors))]
    result = Factorization(
        factors,
        ",".join(g + term for term in inputs) + "->" + g + out,
        tuple(int(n) for n in weight.shape),
        first.ranks,
        first.method,
        (g + modes[0], *modes[1:]),
        dict(first.info),
        group=g,
    )
    errors = [float(f.info.get("relative_error", math.nan)) for f in fits]
    norms = [float(torch.linalg.vector_norm(p.detach().double())) for p in parts]
    total = math.sqrt(sum(n * n for n in norms))
    result.info["group_errors"] = errors
    result.info["relative_error"] = (
        math.sqrt(sum((e * n) ** 2 for e, n in zip(errors, norms, strict=True))) / total
        if total > 0
        else 0.0
    )
    result.info.pop("kernel_error", None)
    return result
