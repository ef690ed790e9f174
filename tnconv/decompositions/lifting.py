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

import math
import string
from collections import Counter
from collections.abc import Callable

import torch

from ..errors import InvalidWeightError, StructureError
from ..factorization import Factorization, parse_equation

__all__ = ["from_order4", "stack_groups", "to_order4"]


def to_order4(w: torch.Tensor) -> torch.Tensor:
    """``w`` (T, S, *k) with 0 to 3 spatial modes as the 4-D kernel its family fits (a view)."""
    t, s, *k = w.shape
    if len(k) == 0:
        return w.reshape(t, s, 1, 1)
    if len(k) == 1:
        return w.reshape(t, s, 1, k[0])
    if len(k) == 2:
        return w
    return w.reshape(t, s, k[0], k[1] * k[2])


def _fresh(used: set[str]) -> str:
    letter = next(c for c in string.ascii_letters if c not in used)
    used.add(letter)
    return letter


def from_order4(f: Factorization, shape: tuple[int, ...]) -> Factorization:
    """The factorization ``f`` of ``to_order4(w)`` as one of ``w`` (``shape``): unit spatial
    indices dropped (order 2 / 3), or the merged one split (order 5). Exact."""
    shape = tuple(int(n) for n in shape)
    if len(shape) == 4:
        return f
    inputs, _ = parse_equation(f.equation)
    modes = list(f.modes or ())
    factors = list(f.factors)
    if len(shape) == 5:
        merged = modes[3]
        used = {c for t in inputs for c in t}
        extra = _fresh(used)
        k = next(i for i, t in enumerate(inputs) if merged in t)
        axis = inputs[k].index(merged)
        fshape = list(factors[k].shape)
        factors[k] = factors[k].reshape(*fshape[:axis], shape[3], shape[4], *fshape[axis + 1 :])
        inputs[k] = inputs[k].replace(merged, merged + extra)
        modes = [*modes[:3], merged, extra]
    else:
        drop = modes[2:4] if len(shape) == 2 else modes[2:3]
        for c in drop:
            k = next(i for i, t in enumerate(inputs) if c in t)
            factors[k] = factors[k].squeeze(inputs[k].index(c))
            inputs[k] = inputs[k].replace(c, "")
        modes = [m for m in modes if m not in drop]
    inputs, factors = _absorb_bond_factors(inputs, factors, "".join(modes))
    out = Factorization(
        factors,
        ",".join(inputs) + "->" + "".join(modes),
        shape,
        f.ranks,
        f.method,
        tuple(modes),
        dict(f.info),
    )
    out.info["fitted_as"] = list(to_order4(torch.empty(shape, device="meta")).shape)
    return out


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
