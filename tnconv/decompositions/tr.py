"""Tensor ring over the kernel modes (T, S, kh, kw), by TR-SVD (Zhao et al. 2016).

Factors ``[G_T (r0, T, r1), G_S (r1, S, r2), G_h (r2, kh, r3), G_w (r3, kw, r0)]``, equation
``"atb,bsc,chd,dwa->tshw"``; ranks ``(r0, r1, r2, r3)`` where r0 is the closing bond kw-T. This is
the layout RSDTR uses as well.

``eps``: the first SVD of the (T, S*kh*kw) unfolding may discard ``eps^2 ||W||^2 / 2`` and its rank
is split as ``r0 * r1`` (as balanced as possible); the two later SVDs may discard a quarter each,
plus what earlier steps left unused. The squared error is exactly the sum discarded, so
``relative_error <= eps`` holds, and the ALS sweeps at the found ranks only lower it.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..factorization import Factorization, KernelShape
from ..registry import register
from ._linalg import rank_for_budget, tail_energy
from ._ring import balanced_split, ring_als, ring_params, sequential_svd
from .base import Decomposition

EQUATION = "atb,bsc,chd,dwa->tshw"


class TROptions(BaseModel):
    """Options of ``tr``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # ALS refinement at the found ranks: at most this many sweeps and this much work
    als_sweeps: Annotated[int, Field(ge=0, le=1000)] = 10
    als_max_gflop: Annotated[float, Field(ge=0.0)] = 2.0


def cap_ring_ranks(asked: tuple[int, ...], shape: KernelShape) -> tuple[int, int, int, int]:
    """Largest ranks <= ``asked`` that a TR-SVD of a (T, S, kh, kw) kernel can produce."""
    t, s, kh, kw = shape
    r0, r1, r2, r3 = asked
    limit = min(t, s * kh * kw)  # r0 * r1 is the rank of the (T, rest) unfolding
    if r0 * r1 > limit:
        # the largest product within both the request and the limit, as balanced as possible
        pairs = ((a, min(r1, limit // a)) for a in range(1, min(r0, limit) + 1))
        r0, r1 = max(pairs, key=lambda p: (p[0] * p[1], -abs(p[0] - p[1])))
    r2 = min(r2, r1 * s, kh * kw * r0)
    r3 = min(r3, r2 * kh, kw * r0)
    return r0, r1, r2, r3


@register("tr")
class TR(Decomposition):
    """Tensor ring over (T, S, kh, kw) by TR-SVD (+ ALS). Ranks (r0, r1, r2, r3)."""

    rank_order = "(r0, r1, r2, r3): the bonds kw-T (closing), T-S, S-kh, kh-kw"
    guarantees_eps = True
    Options = TROptions

    def bond_ranks(self, rank: int | tuple[int, ...], shape: KernelShape) -> tuple[int, ...]:
        asked = self.expand_ranks(rank, 4)
        return self.log_capped(asked, cap_ring_ranks(asked, shape))

    def num_params_at(self, shape: KernelShape, ranks: tuple[int, ...]) -> int:
        return ring_params(shape, ranks)

    def search_options(self, options: TROptions) -> TROptions:
        return options.model_copy(update={"als_sweeps": 0})

    def _finish_ring(
        self, weight: torch.Tensor, cores: list[torch.Tensor], options: TROptions
    ) -> Factorization:
        cores, _ = ring_als(
            weight, cores, options.als_sweeps, max_flops=options.als_max_gflop * 1e9
        )
        ranks = tuple(int(c.shape[0]) for c in cores)
        return self.make(cores, EQUATION, tuple(weight.shape), ranks)

    def fit(
        self, weight: torch.Tensor, ranks: tuple[int, ...], options: TROptions
    ) -> Factorization:
        r0, r1, r2, r3 = ranks
        cores, _ = sequential_svd(
            weight, lambda k, s: (r0 * r1, r2, r3)[k], ring=True, split=lambda _: (r0, r1)
        )
        return self._finish_ring(weight, cores, options)

    def fit_eps(self, weight: torch.Tensor, eps: float, options: TROptions) -> Factorization:
        total = eps * eps * float(torch.sum(weight * weight))
        cumulative = (total / 2, 3 * total / 4, total)
        spent = [0.0]

        def choose(k: int, s: torch.Tensor) -> int:
            r = rank_for_budget(s, cumulative[k] - spent[0])
            spent[0] += float(tail_energy(s)[r])
            return r

        cores, _ = sequential_svd(weight, choose, ring=True, split=balanced_split)
        return self._finish_ring(weight, cores, options)
