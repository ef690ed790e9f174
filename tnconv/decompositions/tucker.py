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

import logging
import math
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import RankSpecError
from ..factorization import Factorization, KernelShape
from ..registry import register
from ._linalg import cached, leading_left_vectors, mode_unfold, sym_eig_desc
from .base import Decomposition

log = logging.getLogger(__name__)

# HOOI trials of the eps shrink (a bisection over the cheaper rank tuples)
_SHRINK_TRIALS = 8

TUCKER2 = "abhw,ta,sb->tshw"
FULL = "abcd,ta,sb,hc,wd->tshw"


class TuckerOptions(BaseModel):
    """Options of ``tucker``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_iter: Annotated[int, Field(ge=0, le=10_000)] = 100
    # HOOI stops when a sweep lowers the relative error by less than tol times itself
    # (TensorLy stops at an absolute change of 1e-4: 3x looser at error 0.9, 30x at 0.1)
    tol: Annotated[float, Field(ge=0.0, lt=1.0)] = 3e-5
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

    Starts from ``init`` (orthonormal ``(I_n, R_n)`` matrices) or the HOSVD; stops after
    ``max_iter`` sweeps or when a sweep lowers the relative error by less than ``tol`` times
    itself. Returns ``(core, factors, relative_error)``; ``factors[n]`` is ``(I_n, R_n)``
    orthonormal, and the error is exact for them (``||W||^2 - ||core||^2``, in the weight's
    precision); the result is never worse than the start.

    While the error is above 1e-3 the sweeps run in float32 (half the time; float64 changes
    nothing measurable there), and the final factors are re-orthonormalised and the core and
    error computed in the weight's precision.
    """
    norm_sq = float(torch.sum(weight * weight))
    if init is None:
        factors = {n: leading_left_vectors(mode_unfold(weight, n), r) for n, r in ranks.items()}
    else:
        factors = dict(init)
    core = _project(weight, factors)
    err = _rel_err(norm_sq, float(torch.sum(core * core)))
    if max_iter == 0 or err == 0.0:
        return core, factors, err
    low = torch.float32 if weight.dtype == torch.float64 and err > 1e-3 else weight.dtype
    # subspaces do not depend on the scale: unit max entry keeps float32 from overflowing
    scale = float(weight.abs().max())
    w = (weight / scale).to(low)
    scaled_sq = norm_sq / scale**2
    work = {n: u.to(low) for n, u in factors.items()}
    current = err
    for it in range(max_iter):
        for n, r in ranks.items():
            partial = _project(w, work, skip=n)
            work[n] = leading_left_vectors(mode_unfold(partial, n), r)
        # the last partial already holds every other mode's product
        new_core = _project(partial, {n: work[n]})
        new = _rel_err(scaled_sq, float(torch.sum(new_core.to(torch.float64) ** 2)))
        done = current - new < tol * new
        current = min(current, new)
        if done:
            log.debug("hooi stopped after %d sweeps at error %.6g", it + 1, new)
            break
    # back to the weight's precision: orthonormal to its rounding, exact core and error
    final = {n: torch.linalg.qr(u.to(weight.dtype))[0] for n, u in work.items()}
    final_core = _project(weight, final)
    final_err = _rel_err(norm_sq, float(torch.sum(final_core * final_core)))
    if final_err <= err:
        return final_core, final, final_err
    return core, factors, err


def _rel_err(norm_sq: float, core_sq: float) -> float:
    """``sqrt(||W||^2 - ||core||^2) / ||W||``, defined as 0 for a zero kernel."""
    if norm_sq <= 0.0:
        return 0.0
    return math.sqrt(max(norm_sq - core_sq, 0.0) / norm_sq)


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

    def search_options(self, options: TuckerOptions) -> TuckerOptions:
        # HOSVD truncations of one cached set of bases: their errors are exact and free
        return options.model_copy(update={"max_iter": 0, "shrink": False})

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

    def _bases(self, weight: torch.Tensor, mode: int) -> torch.Tensor:
        """Full orthonormal basis ``(I_n, I_n)`` of mode ``mode``'s unfolding, leading vectors
        first (eigenvectors of its Gram matrix), cached for the weight's lifetime."""

        def compute() -> torch.Tensor:
            unfolded = mode_unfold(weight, mode)
            return sym_eig_desc(unfolded @ unfolded.T)[1]

        return cached(weight, ("tucker-basis", mode), compute)

    def _fit(
        self,
        weight: torch.Tensor,
        ranks: tuple[int, ...],
        options: TuckerOptions,
        init: dict[int, torch.Tensor] | None = None,
    ) -> tuple[Factorization, dict[int, torch.Tensor]]:
        shape: KernelShape = tuple(weight.shape)  # type: ignore[assignment]
        if init is None and options.max_iter == 0:
            # a plain HOSVD truncation: a sub-block of the cached full-basis core, no product
            factors = {n: self._bases(weight, n)[:, :r] for n, r in enumerate(ranks)}
            core = self._full_core(weight, len(ranks))[tuple(slice(0, r) for r in ranks)]
            core = core.contiguous()
            norm_sq = float(torch.sum(weight * weight))
            err = _rel_err(norm_sq, float(torch.sum(core * core)))
        else:
            if init is None:  # the HOSVD, from the shared bases
                init = {n: self._bases(weight, n)[:, :r] for n, r in enumerate(ranks)}
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

    def _full_core(self, weight: torch.Tensor, n_modes: int) -> torch.Tensor:
        """``W x_n U_n^T`` over the first ``n_modes`` modes with the full bases (cached): every
        HOSVD truncation's core is a leading sub-block of it."""

        def compute() -> torch.Tensor:
            return _project(weight, {n: self._bases(weight, n) for n in range(n_modes)})

        return cached(weight, ("tucker-core", n_modes), compute)

    def _rank_table(
        self, weight: torch.Tensor, n_modes: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every rank tuple with its parameter count and exact HOSVD-truncation error (cached)."""
        return cached(weight, ("tucker-table", n_modes), lambda: self._make_table(weight, n_modes))

    def _make_table(
        self, weight: torch.Tensor, n_modes: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every rank tuple with its parameter count and exact HOSVD-truncation error.

        The HOSVD core ``C = W x_n U_n^T`` (full bases) has ``||W - W_hat(r)||^2 = ||W||^2 -
        sum(C[:r_0, :r_1, ...]^2)`` for the truncation at ranks r, so cumulative sums of ``C^2``
        give the error of every rank tuple at once. Returns ``(ranks, params, missing)`` with
        ``ranks`` of shape (N, n_modes), restricted to valid multilinear ranks.
        """
        shape = tuple(weight.shape)
        dev = weight.device
        energy = self._full_core(weight, n_modes) ** 2
        if n_modes == 2:
            energy = energy.sum(dim=(2, 3))
        captured = energy
        for axis in range(n_modes):
            captured = torch.cumsum(captured, dim=axis)
        # ranks past an unfolding's rank capture nothing more: pad by repeating the last slice
        for axis in range(n_modes):
            pad = shape[axis] - captured.shape[axis]
            if pad > 0:
                last = captured.narrow(axis, captured.shape[axis] - 1, 1)
                captured = torch.cat([captured, *([last] * pad)], dim=axis)
        grids = torch.meshgrid(
            *(
                torch.arange(1, shape[n] + 1, dtype=torch.float64, device=dev)
                for n in range(n_modes)
            ),
            indexing="ij",
        )
        ranks = torch.stack([g.flatten() for g in grids], dim=1).to(torch.int64)
        kept = math.prod(shape[n_modes:])  # spatial modes left whole act as full ranks
        valid = torch.ones(ranks.shape[0], dtype=torch.bool, device=dev)
        for n in range(n_modes):
            others = torch.prod(torch.cat([ranks[:, :n], ranks[:, n + 1 :]], 1), 1) * kept
            valid &= ranks[:, n] <= others
        ranks = ranks[valid]
        rf = ranks.to(torch.float64)
        if n_modes == 2:
            params = rf[:, 0] * rf[:, 1] * kept + shape[0] * rf[:, 0] + shape[1] * rf[:, 1]
        else:
            params = rf.prod(1) + sum(shape[n] * rf[:, n] for n in range(4))
        total = float(torch.sum(weight * weight))
        missing = (total - captured.flatten()[valid]).clamp_min(0.0)
        return ranks, params, missing

    def fit_eps(self, weight: torch.Tensor, eps: float, options: TuckerOptions) -> Factorization:
        ranks, params, missing = self._rank_table(weight, 4 if options.full else 2)
        allowed = eps * eps * float(torch.sum(weight * weight))
        ok = missing <= allowed
        if not bool(ok.any()):
            # an eps below the rounding of the captured energies (e.g. 1e-9): the tuple that
            # misses least (full ranks), rather than an empty choice
            ok = missing <= missing.min()
        # the cheapest tuple whose HOSVD truncation already meets eps (ties: lower error)
        order = torch.argsort(missing[ok])
        pick = order[torch.argmin(params[ok][order])]
        chosen = tuple(int(r) for r in ranks[ok][pick])
        result, factors = self._fit(weight, chosen, options)  # HOOI only lowers the error
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
        """Cheaper ranks than the HOSVD bound allows, where HOOI still meets eps.

        The candidates are the rank tuples with fewer parameters whose HOSVD truncation misses
        eps by at most twice what HOOI recovered at the current ranks; a bisection over them
        (cheapest first) runs a few HOOI sweeps from the HOSVD per trial. The error of any
        orthonormal factors is exact (``||W||^2 - ||core||^2``), so an unconverged trial that
        meets eps is a valid result; the survivor is then converged with the full options.
        """
        n_modes = len(result.ranks)
        ranks, params, missing = self._rank_table(weight, n_modes)
        norm_sq = float(torch.sum(weight * weight))
        allowed = eps * eps * norm_sq
        current = torch.tensor(result.ranks, device=ranks.device)
        at = torch.nonzero((ranks == current).all(dim=1)).flatten()
        hosvd_missing = float(missing[at[0]]) if at.numel() else allowed
        gain = max(hosvd_missing - result.info["fit_error"] ** 2 * norm_sq, 0.0)
        ok = (params < result.num_params) & (missing <= allowed + 2.0 * gain)
        if not bool(ok.any()) or result.num_params >= math.prod(result.shape):
            return result  # (a factorization larger than the kernel is not worth polishing)
        order = torch.argsort(params[ok])
        pool = ranks[ok][order]
        quick = options.model_copy(update={"max_iter": min(options.max_iter, 6)})
        lo, hi, best = 0, pool.shape[0] - 1, None
        for _ in range(_SHRINK_TRIALS):
            if lo > hi:
                break
            mid = (lo + hi) // 2
            trial_ranks = tuple(int(r) for r in pool[mid])
            trial, trial_factors = self._fit(weight, trial_ranks, quick)
            log.debug(
                "tucker eps shrink: ranks %s error %.4g", trial_ranks, trial.info["fit_error"]
            )
            if trial.info["fit_error"] <= eps:
                best, hi = (trial, trial_factors), mid - 1
            else:
                lo = mid + 1
        if best is None:
            return result
        # converge the survivor: HOOI only lowers the error further
        return self._fit(weight, best[0].ranks, options, init=best[1])[0]

    def fit_ratio(self, weight: torch.Tensor, budget: int, options: TuckerOptions) -> Factorization:
        ranks, params, missing = self._rank_table(weight, 4 if options.full else 2)
        fits = params <= budget
        order = torch.argsort(missing[fits])[:3]
        # the HOSVD truncation error ranks the candidates; HOOI decides between the best few
        trials = [self.fit(weight, tuple(int(r) for r in ranks[fits][i]), options) for i in order]
        return min(trials, key=lambda f: f.info["fit_error"])
