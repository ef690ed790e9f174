"""Tensor train (TT / MPS) over the kernel modes (T, S, kh, kw), by TT-SVD.

Factors ``[G_T (T, r1), G_S (r1, S, r2), G_h (r2, kh, r3), G_w (r3, kw)]``, equation
``"ta,asb,bhc,cw->tshw"``; ranks ``(r1, r2, r3)``. Executed as 1x1 (S -> r1*r2 with T's bond
folded in), kh x 1, 1 x kw and a 1x1 closing to T, in the order the planner finds cheapest.

``eps``: TT-SVD (Oseledets 2011) discards at most ``eps^2 ||W||^2`` in total, because the squared
error is exactly the sum of what the three SVDs discard. Each SVD may spend a third of that budget
plus whatever the earlier SVDs left unused. ALS sweeps at the found ranks then only lower the
error, so ``relative_error <= eps`` holds.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..factorization import Factorization, KernelShape
from ..registry import register
from ._linalg import rank_for_budget, tail_energy
from ._ring import ring_als, ring_params, sequential_svd
from .base import Decomposition

EQUATION = "ta,asb,bhc,cw->tshw"


class TTOptions(BaseModel):
    """Options of ``tt``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # ALS refinement at the found ranks: at most this many sweeps and this much work
    als_sweeps: Annotated[int, Field(ge=0, le=1000)] = 10
    als_max_gflop: Annotated[float, Field(ge=0.0)] = 2.0


def budgeted_chooser(total_sq: float, steps: int):
    """Rank chooser spending ``total_sq`` over ``steps`` SVDs: an even share each, carried over."""
    spent = [0.0]

    def choose(k: int, s: torch.Tensor) -> int:
        allowance = total_sq * (k + 1) / steps - spent[0]
        r = rank_for_budget(s, allowance)
        spent[0] += float(tail_energy(s)[r])
        return r

    return choose


@register("tt")
class TT(Decomposition):
    """Tensor train over (T, S, kh, kw) by TT-SVD (+ ALS). Ranks (r1, r2, r3)."""

    rank_order = "(r1, r2, r3): the bonds T-S, S-kh, kh-kw"
    guarantees_eps = True
    Options = TTOptions

    def bond_ranks(self, rank: int | tuple[int, ...], shape: KernelShape) -> tuple[int, ...]:
        asked = self.expand_ranks(rank, 3)
        t, s, kh, kw = shape
        r1 = min(asked[0], t, s * kh * kw)
        r2 = min(asked[1], r1 * s, kh * kw)
        r3 = min(asked[2], r2 * kh, kw)
        return self.log_capped(asked, (r1, r2, r3))

    def num_params_at(self, shape: KernelShape, ranks: tuple[int, ...]) -> int:
        return ring_params(shape, (1, *ranks))

    def search_options(self, options: TTOptions) -> TTOptions:
        return options.model_copy(update={"als_sweeps": 0})

    def _finish_train(
        self, weight: torch.Tensor, cores: list[torch.Tensor], options: TTOptions
    ) -> Factorization:
        cores, _ = ring_als(
            weight, cores, options.als_sweeps, max_flops=options.als_max_gflop * 1e9
        )
        factors = [cores[0][0], cores[1], cores[2], cores[3][..., 0]]
        ranks = (cores[1].shape[0], cores[2].shape[0], cores[3].shape[0])
        return self.make(factors, EQUATION, tuple(weight.shape), ranks)

    def fit(
        self, weight: torch.Tensor, ranks: tuple[int, ...], options: TTOptions
    ) -> Factorization:
        cores, _ = sequential_svd(weight, lambda k, s: ranks[k], ring=False)
        return self._finish_train(weight, cores, options)

    def fit_eps(self, weight: torch.Tensor, eps: float, options: TTOptions) -> Factorization:
        total = eps * eps * float(torch.sum(weight * weight))
        cores, _ = sequential_svd(weight, budgeted_chooser(total, 3), ring=False)
        return self._finish_train(weight, cores, options)
