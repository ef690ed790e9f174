"""Tensor chain (TC): a looped chain of three cores, i.e. a block-term decomposition (BTD) whose
Tucker-2 blocks share one core (Phan et al. 2022, "How to Train Unstable Looped Tensor Network").

The kernel (T, S, kh, kw) is a 3-way tensor (T, kh*kw, S) written as a loop of three cores

    W[t, s, h, w] = trace(A_t G_hw B_s) = sum_{a,b,c} A[a, t, b] G[b, h, w, c] B[c, s, a]

with factors ``[A (R_a, T, R_b), G (R_b, kh, kw, R_c), B (R_c, S, R_a)]`` and equation
``"atb,bhwc,csa->tshw"``. Fixing the loop index a shows the BTD: ``W = sum_a G x_T A[a] x_S B[a]``,
R_a Tucker-2 blocks of multilinear rank (R_b, R_c) on the channels that all share the spatial
core G. Equivalently a Tucker-2 model of ranks (R_a R_b, R_a R_c) whose core is block diagonal
with R_a identical blocks, which is why it is more compact than Tucker-2 or an unshared BTD; with
R_a = 1 it *is* Tucker-2. The planner executes it as a 1x1 conv S -> R_c R_a, a kh x kw conv
R_c -> R_b applied to each of the R_a blocks (the loop index rides in the batch), and a 1x1 conv
R_a R_b -> T: ``R_a R_c S + R_a R_b R_c kh kw + R_a R_b T`` multiply-adds per output pixel.

Ranks: ``(R_a, R_b, R_c)`` = (blocks, i.e. the closing S-T bond; T-core bond; core-S bond); an
int R means all three. Capped at what the modes carry: ``R_a R_b <= min(T, kh kw S)`` and
``R_c <= min(R_b kh kw, S R_a)``.

Fit: TR-SVD of the 3-way tensor (exact at the capped full rank; for ``eps`` the squared error is
the sum discarded, half the budget to each SVD plus what the first left unused, so ``relative_error
<= eps`` holds), then ALS sweeps. Looped networks are unstable (their factors can grow and cancel);
``stabilize=True`` (the default, see docs/stability.md) then minimises the sensitivity ``sum_n
||dW/dG_n||^2`` (:meth:`Factorization.sensitivity`) one core at a time, keeping the error within
``(1 + stabilize_slack)`` times the ALS error (with ``eps``: within eps), by the constrained update
of ``_stable.py``, and finally multiplies the kernel by its least-squares scalar (the constrained
updates shrink it, like a ridge; this lowers the error). The paper's own algorithm was not
available here; this is the same sensitivity-constrained scheme derived from the definitions. Both
the ALS and the stabilisation stop at ``*_max_gflop`` of estimated work (large ranks make a core's
update a dense solve in ``R_k R_{k+1}`` unknowns); ``info["stabilize_sweeps"]`` says how many were
allowed.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..factorization import Factorization, KernelShape
from ..registry import register
from ._linalg import balance_scales, cached, rank_for_budget, tail_energy
from ._ring import (
    _others,
    _roll,
    balanced_split,
    ring_als,
    ring_error,
    ring_to_tensor,
    sequential_svd,
)
from ._stable import constrained_update, least_squares_scale
from .base import Decomposition

__all__ = ["EQUATION", "TC", "TCOptions", "ring_sensitivity", "stabilize_ring"]

EQUATION = "atb,bhwc,csa->tshw"


class TCOptions(BaseModel):
    """Options of ``tc``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # ALS refinement after TR-SVD: at most this many sweeps and this much work
    als_sweeps: Annotated[int, Field(ge=0, le=1000)] = 20
    als_max_gflop: Annotated[float, Field(ge=0.0)] = 2.0
    stabilize: bool = True
    stabilize_slack: Annotated[float, Field(ge=0.0, le=1.0)] = 0.02  # error <= (1+slack) * ALS's
    # sweeps of the constrained update (most of the drop comes in the first 10-30), and a work cap
    stabilize_iter: Annotated[int, Field(ge=1, le=10_000)] = 30
    stabilize_max_gflop: Annotated[float, Field(ge=0.0)] = 2.0


def cap_tc_ranks(asked: tuple[int, ...], shape: KernelShape) -> tuple[int, int, int]:
    """Largest ranks <= ``asked`` that a TR-SVD of the (T, kh*kw, S) tensor can produce."""
    t, s, kh, kw = shape
    d = kh * kw
    ra, rb, rc = asked
    limit = min(t, d * s)  # ra * rb is the rank of the (T, rest) unfolding
    if ra * rb > limit:
        pairs = ((a, min(rb, limit // a)) for a in range(1, min(ra, limit) + 1))
        ra, rb = max(pairs, key=lambda p: (p[0] * p[1], -abs(p[0] - p[1])))
    rc = min(rc, rb * d, s * ra)
    return ra, rb, rc


def _chain_tensor(weight: torch.Tensor) -> torch.Tensor:
    """(T, S, kh, kw) -> (T, kh*kw, S): the loop's mode order T, space, S."""
    t, s, kh, kw = weight.shape
    return weight.permute(0, 2, 3, 1).reshape(t, kh * kw, s)


def _chain_of(weight: torch.Tensor) -> torch.Tensor:
    """:func:`_chain_tensor`, one per kernel: the ring's first split (cached on the tensor it is
    given) is then shared by every candidate of a search instead of recomputed per fit."""
    return cached(weight, "tc-chain", lambda: _chain_tensor(weight))


def ring_sensitivity(cores: list[torch.Tensor]) -> float:
    """``sum_k I_k ||env_k||^2`` of a ring of 3-way cores (its :meth:`sensitivity`).

    For three cores the environment of core k is the product of the other two, and its squared
    norm is ``sum(P * Q)`` with P the Gram of core k+1 over its right bond and Q that of core
    k+2 over its left bond: never the (r, I_{k+1} I_{k+2}, r) environment itself (gigabytes for
    a 512-channel kernel at large ranks)."""
    d = len(cores)
    total = 0.0
    for k, core in enumerate(cores):
        if d == 3:
            p = _bond_gram(cores[(k + 1) % d], 2)
            q = _bond_gram(cores[(k + 2) % d], 0)
            total += core.shape[1] * float(torch.sum(p * q))
        else:
            z = _others(cores, k)
            total += core.shape[1] * float(torch.sum(z * z))
    return total


def _bond_gram(core: torch.Tensor, side: int) -> torch.Tensor:
    """Gram matrix of a core (r, I, r') over its left (side 0) or right (side 2) bond."""
    mat = core.movedim(side, 0).reshape(core.shape[side], -1)
    return mat @ mat.T


def stabilize_sweep_flops(shape: tuple[int, ...], ranks: tuple[int, ...]) -> float:
    """Approximate multiply-adds of one :func:`stabilize_ring` sweep (3-way tensor, 3 bonds)."""
    total = math.prod(shape)
    flops = 0.0
    for k in range(3):
        n = ranks[k] * ranks[(k + 1) % 3]  # unknowns per row of core k
        m = total // shape[k]
        flops += 10 * n**3 + m * n * n + shape[k] * m * n
    return flops


def stabilize_ring(
    tensor: torch.Tensor,
    cores: list[torch.Tensor],
    max_error: float,
    max_iter: int,
    tol: float = 1e-3,
) -> list[torch.Tensor]:
    """Minimise the sensitivity of a 3-core ring with relative error <= ``max_error``.

    For core k, the sensitivity is ``I_k ||env_k||^2`` (free of G_k) plus two quadratic forms in
    G_k: the environments of its neighbours contain it. With unknowns ordered (r_k, r_{k+1}):
    ``D = I_{k+1} (M_L kron I) + I_{k-1} (I kron M_R)``, M_L the Gram of the left neighbour over
    its bond with G_k, M_R likewise for the right neighbour.
    """
    d = len(cores)
    if d != 3:
        raise ValueError(f"stabilize_ring handles 3-core rings; got {d} cores")
    cores = [c.clone() for c in cores]
    norm_sq = float(torch.sum(tensor * tensor))
    max_err_sq = max_error * max_error * norm_sq
    sizes = [c.shape[1] for c in cores]
    ss = ring_sensitivity(cores)
    best = (ss, cores)
    for _ in range(max_iter):
        before = ss
        for k in range(d):
            z = _others(cores, k)  # (r_{k+1}, M, r_k)
            rk1, m, rk = z.shape
            zmat = z.permute(1, 2, 0).reshape(m, rk * rk1)
            wz = _roll(tensor, k) @ zmat
            left, right = cores[(k - 1) % d], cores[(k + 1) % d]
            m_left = _bond_gram(left, 2)  # (r_k, r_k)
            m_right = _bond_gram(right, 0)  # (r_{k+1}, r_{k+1})
            eye_l = torch.eye(rk, dtype=tensor.dtype, device=tensor.device)
            eye_r = torch.eye(rk1, dtype=tensor.dtype, device=tensor.device)
            penalty = sizes[(k + 1) % d] * torch.kron(m_left, eye_r) + sizes[
                (k - 1) % d
            ] * torch.kron(eye_l, m_right)
            sol = constrained_update(wz, zmat.T @ zmat, penalty, norm_sq, max_err_sq)
            cores[k] = sol.reshape(sizes[k], rk, rk1).permute(1, 0, 2).contiguous()
        ss = ring_sensitivity(cores)
        if ss < best[0]:
            best = (ss, cores)
        if before - ss <= tol * before:
            break
    # a sweep can make things worse (near-infeasible bounds: one core pushed toward zero and
    # the others grown to match); keep the least sensitive cores seen, the start included
    cores = [c.clone() for c in best[1]]
    # undo the shrinkage of the constrained updates (lowers the error, see least_squares_scale)
    c = least_squares_scale(tensor, ring_to_tensor(cores))
    if c > 0:
        cores = [core * c ** (1.0 / d) for core in cores]
    return balance_scales(cores)


@register("tc")
class TC(Decomposition):
    """Tensor chain / shared-core BTD, ``tr(A_t G_hw B_s)``. Ranks (R_a, R_b, R_c)."""

    rank_order = "(R_a, R_b, R_c): blocks (the closing S-T bond), the T-core bond, the core-S bond"
    guarantees_eps = True
    Options = TCOptions

    def bond_ranks(self, rank: int | tuple[int, ...], shape: KernelShape) -> tuple[int, ...]:
        asked = self.expand_ranks(rank, 3)
        return self.log_capped(asked, cap_tc_ranks(asked, shape))

    def num_params_at(self, shape: KernelShape, ranks: tuple[int, ...]) -> int:
        t, s, kh, kw = shape
        ra, rb, rc = ranks
        return ra * t * rb + rb * kh * kw * rc + rc * s * ra

    def search_options(self, options: TCOptions) -> TCOptions:
        return options.model_copy(update={"als_sweeps": 0, "stabilize": False})

    def _finish_chain(
        self,
        weight: torch.Tensor,
        cores: list[torch.Tensor],
        options: TCOptions,
        eps: float | None,
    ) -> Factorization:
        x = _chain_tensor(weight)
        if options.als_sweeps:
            cores, _ = ring_als(x, cores, options.als_sweeps, max_flops=options.als_max_gflop * 1e9)
        err = ring_error(x, cores)
        info: dict = {}
        ranks3 = tuple(int(c.shape[0]) for c in cores)
        per_sweep = stabilize_sweep_flops(tuple(x.shape), ranks3)
        sweeps = min(options.stabilize_iter, int(options.stabilize_max_gflop * 1e9 // per_sweep))
        if options.stabilize and err > 1e-12 and sweeps > 0:
            info = {
                "unstabilized_error": err,
                "unstabilized_sensitivity": ring_sensitivity(cores),
                "stabilize_sweeps": sweeps,
            }
            bound = err * (1.0 + options.stabilize_slack)
            if eps is not None:  # never give up the eps guarantee
                bound = max(err, min(bound, eps * (1.0 - 1e-9)))
            stable = stabilize_ring(x, cores, bound, sweeps)
            # kept only within the bound (rounding can break it) and when less sensitive
            if ring_error(x, stable) <= max(bound, err) and ring_sensitivity(
                stable
            ) <= ring_sensitivity(cores):
                cores = stable
        t, s, kh, kw = weight.shape
        a, g, b = cores
        g = g.reshape(g.shape[0], kh, kw, g.shape[2])
        ranks = (int(a.shape[0]), int(a.shape[2]), int(b.shape[0]))
        f = self.make([a, g, b], EQUATION, (t, s, kh, kw), ranks, **info)
        f.info["sensitivity"] = ring_sensitivity(cores)
        return f

    def fit(
        self, weight: torch.Tensor, ranks: tuple[int, ...], options: TCOptions
    ) -> Factorization:
        ra, rb, rc = ranks
        cores, _ = sequential_svd(
            _chain_of(weight),
            lambda k, s: (ra * rb, rc)[k],
            ring=True,
            split=lambda _: (ra, rb),
        )
        return self._finish_chain(weight, cores, options, None)

    def fit_eps(self, weight: torch.Tensor, eps: float, options: TCOptions) -> Factorization:
        total = eps * eps * float(torch.sum(weight * weight))
        cumulative = (total / 2, total)
        spent = [0.0]

        def choose(k: int, s: torch.Tensor) -> int:
            r = rank_for_budget(s, cumulative[k] - spent[0])
            spent[0] += float(tail_energy(s)[r])
            return r

        cores, _ = sequential_svd(_chain_of(weight), choose, ring=True, split=balanced_split)
        return self._finish_chain(weight, cores, options, eps)


def tc_params(shape: KernelShape, rank: int) -> int:
    """Parameters of a uniform-rank TC (handy for equal-budget comparisons)."""
    return TC().num_params_at(shape, cap_tc_ranks((rank,) * 3, shape))
