"""Tucker decomposition (HOSVD initialisation + HOOI refinement).

* Tucker-2 (an int rank, or a 2-tuple ``(R_T, R_S)``): channels only, spatial modes kept.
  Factors ``[core (R_T, R_S, kh, kw), U_T (T, R_T), U_S (S, R_S)]``, equation
  ``"abhw,ta,sb->tshw"``; executed as 1x1 (S -> R_S), kh x kw (R_S -> R_T), 1x1 (R_T -> T).
* Full Tucker (a 4-tuple ``(R_T, R_S, R_h, R_w)``, or ``full=True`` with eps / ratio): factors
  ``[core, U_T, U_S, U_h (kh, R_h), U_w (kw, R_w)]``, equation ``"abcd,ta,sb,hc,wd->tshw"``.

The factor matrices are orthonormal, so ``||W - W_hat||^2 = ||W||^2 - ||core||^2``. For ``eps``,
the HOSVD bound ``||W - W_hat||^2 <= sum_n discarded_n`` picks the cheapest ranks that provably
meet eps; HOOI only lowers the error from there, and the ranks are then shrunk one at a time while
the measured error still meets eps.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import RankSpecError
from ..factorization import Factorization, KernelShape
from ..registry import register
from ._linalg import leading_left_vectors, mode_unfold, svd, tail_energy
from .base import Decomposition

TUCKER2 = "abhw,ta,sb->tshw"
FULL = "abcd,ta,sb,hc,wd->tshw"


class TuckerOptions(BaseModel):
    """Options of ``tucker``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_iter: Annotated[int, Field(ge=0, le=10_000)] = 100
    tol: Annotated[float, Field(ge=0.0, lt=1.0)] = 1e-12
    full: bool = False  # with eps / ratio: decompose the spatial modes too
    shrink: bool = True  # with eps: lower ranks while the measured error still meets eps


def _project(
    weight: torch.Tensor, factors: dict[int, torch.Tensor], skip: int = -1
) -> torch.Tensor:
    """``weight`` multiplied by ``U_n^T`` along every mode n in ``factors`` except ``skip``."""
    out = weight
    for n, u in factors.items():
        if n != skip:
            out = torch.movedim(torch.tensordot(out, u, dims=([n], [0])), -1, n)
    return out


def hooi(
    weight: torch.Tensor,
    ranks: dict[int, int],
    max_iter: int,
    tol: float,
    init: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor], float]:
    """Higher-order orthogonal iteration on the modes in ``ranks`` (mode -> rank).

    Returns ``(core, factors, relative_error)``; ``factors[n]`` is ``(I_n, R_n)`` orthonormal.
    """
    norm_sq = float(torch.sum(weight * weight))
    if init is None:
        factors = {n: leading_left_vectors(mode_unfold(weight, n), r) for n, r in ranks.items()}
    else:
        factors = dict(init)
    core = _project(weight, factors)
    core_sq = float(torch.sum(core * core))
    for _ in range(max_iter):
        for n, r in ranks.items():
            partial = _project(weight, factors, skip=n)
            factors[n] = leading_left_vectors(mode_unfold(partial, n), r)
        core = _project(weight, factors)
        new_sq = float(torch.sum(core * core))
        done = new_sq - core_sq <= tol * norm_sq
        core_sq = max(core_sq, new_sq)
        if done:
            break
    err = math.sqrt(max(norm_sq - float(torch.sum(core * core)), 0.0) / norm_sq)
    return core, factors, err


@register("tucker")
class Tucker(Decomposition):
    """Tucker-2 (int rank / 2-tuple) or full Tucker (4-tuple) by HOSVD + HOOI."""

    rank_order = "(R_T, R_S) for Tucker-2, (R_T, R_S, R_h, R_w) for full Tucker"
    guarantees_eps = True
    Options = TuckerOptions

    # -- ranks ---------------------------------------------------------------------------------
    def bond_ranks(self, rank: int | tuple[int, ...], shape: KernelShape) -> tuple[int, ...]:
        if isinstance(rank, int):
            asked: tuple[int, ...] = (rank, rank)
        elif len(rank) in (2, 4):
            asked = tuple(rank)
        else:
            raise RankSpecError(
                f"tucker takes 2 ranks (R_T, R_S) or 4 ranks (R_T, R_S, R_h, R_w); got {rank}"
            )
        dims = shape[: len(asked)]
        fixed = math.prod(shape[len(asked) :])  # kept spatial modes act as full-rank modes
        caps = list(min(r, n) for r, n in zip(asked, dims, strict=True))
        # a multilinear rank never exceeds the product of the others
        for _ in range(len(caps)):
            for n in range(len(caps)):
                others = math.prod(c for m, c in enumerate(caps) if m != n) * fixed
                caps[n] = min(caps[n], others)
        return self.log_capped(asked, tuple(caps))

    def num_params_at(self, shape: KernelShape, ranks: tuple[int, ...]) -> int:
        if len(ranks) == 2:
            return (
                ranks[0] * ranks[1] * shape[2] * shape[3]
                + shape[0] * ranks[0]
                + shape[1] * ranks[1]
            )
        return math.prod(ranks) + sum(n * r for n, r in zip(shape, ranks, strict=True))

    # -- fitting -------------------------------------------------------------------------------
    def fit(
        self, weight: torch.Tensor, ranks: tuple[int, ...], options: TuckerOptions
    ) -> Factorization:
        return self._fit(weight, ranks, options)[0]

    def _fit(
        self,
        weight: torch.Tensor,
        ranks: tuple[int, ...],
        options: TuckerOptions,
        init: dict[int, torch.Tensor] | None = None,
    ) -> tuple[Factorization, dict[int, torch.Tensor]]:
        shape: KernelShape = tuple(weight.shape)  # type: ignore[assignment]
        core, factors, err = hooi(
            weight, dict(enumerate(ranks)), options.max_iter, options.tol, init=init
        )
        if len(ranks) == 2:
            out = self.make([core, factors[0], factors[1]], TUCKER2, shape, ranks, fit_error=err)
        else:
            out = self.make(
                [core, *(factors[n] for n in range(4))], FULL, shape, ranks, fit_error=err
            )
        return out, factors

    def _spectra(self, weight: torch.Tensor, n_modes: int) -> list[torch.Tensor]:
        return [tail_energy(svd(mode_unfold(weight, n))[1]) for n in range(n_modes)]

    def _rank_grid(self, shape: KernelShape, n_modes: int) -> list[tuple[int, ...]]:
        """Every (R_T, R_h, R_w) head of a rank tuple; R_S is chosen per head by the caller."""
        heads = [(rt,) for rt in range(1, shape[0] + 1)]
        if n_modes == 4:
            heads = [
                (rt, rh, rw)
                for (rt,) in heads
                for rh in range(1, shape[2] + 1)
                for rw in range(1, shape[3] + 1)
            ]
        return heads

    @staticmethod
    def _assemble(head: tuple[int, ...], rs: int) -> tuple[int, ...]:
        return (head[0], rs) if len(head) == 1 else (head[0], rs, head[1], head[2])

    def fit_eps(self, weight: torch.Tensor, eps: float, options: TuckerOptions) -> Factorization:
        shape: KernelShape = tuple(weight.shape)  # type: ignore[assignment]
        n_modes = 4 if options.full else 2
        tails = self._spectra(weight, n_modes)
        budget = eps * eps * float(torch.sum(weight * weight))
        best: tuple[int, tuple[int, ...]] | None = None
        for head in self._rank_grid(shape, n_modes):
            spent = float(tails[0][head[0]]) + sum(
                float(tails[n][r]) for n, r in zip((2, 3), head[1:], strict=False)
            )
            left = budget - spent
            if left < 0:
                continue
            # smallest R_S whose discarded energy fits what is left of the budget
            ok = torch.nonzero(tails[1] <= left).flatten()
            rs = max(1, int(ok[0]))
            ranks = self.bond_ranks(self._assemble(head, rs), shape)
            cost = self.num_params_at(shape, ranks)
            if best is None or cost < best[0]:
                best = (cost, ranks)
        assert best is not None  # full ranks always fit: nothing is discarded
        result, factors = self._fit(weight, best[1], options)
        if options.shrink:
            result = self._shrink(weight, result, factors, eps, options)
        return result

    def _shrink(
        self,
        weight: torch.Tensor,
        result: Factorization,
        factors: dict[int, torch.Tensor],
        eps: float,
        options: TuckerOptions,
    ) -> Factorization:
        """Lower one rank at a time (the most saving first) while the HOOI error meets eps."""
        shape: KernelShape = tuple(weight.shape)  # type: ignore[assignment]
        while True:
            trials = []
            for n, r in enumerate(result.ranks):
                if r > 1:
                    ranks = list(result.ranks)
                    ranks[n] -= 1
                    ranks_t = self.bond_ranks(tuple(ranks), shape)
                    trials.append((self.num_params_at(shape, ranks_t), n, ranks_t))
            accepted = False
            for _, _n, ranks_t in sorted(trials):
                init = {m: f[:, : ranks_t[m]] for m, f in factors.items()}
                trial, trial_factors = self._fit(weight, ranks_t, options, init=init)
                if trial.info["fit_error"] <= eps:
                    result, factors, accepted = trial, trial_factors, True
                    break
            if not accepted:
                return result

    def fit_ratio(self, weight: torch.Tensor, budget: int, options: TuckerOptions) -> Factorization:
        shape: KernelShape = tuple(weight.shape)  # type: ignore[assignment]
        n_modes = 4 if options.full else 2
        tails = self._spectra(weight, n_modes)
        scored: list[tuple[float, tuple[int, ...]]] = []
        for head in self._rank_grid(shape, n_modes):
            # largest R_S that fits the budget for this head (params grow with R_S)
            lo, hi, rs = 1, shape[1], 0
            while lo <= hi:
                mid = (lo + hi) // 2
                if self.num_params_at(shape, self._assemble(head, mid)) <= budget:
                    rs, lo = mid, mid + 1
                else:
                    hi = mid - 1
            if rs == 0:
                continue
            ranks = self.bond_ranks(self._assemble(head, rs), shape)
            bound = (
                float(tails[0][ranks[0]])
                + float(tails[1][ranks[1]])
                + sum(float(tails[n][ranks[n]]) for n in range(2, len(ranks)))
            )
            scored.append((bound, ranks))
        scored.sort()
        # the HOSVD bound ranks candidates; HOOI decides between the best few
        fits = [self.fit(weight, ranks, options) for _, ranks in scored[:3]]
        return min(fits, key=lambda f: f.info["fit_error"])
