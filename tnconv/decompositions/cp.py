"""CP (canonical polyadic) decomposition by ALS with SVD initialisation.

Kernel ``W[t, s, h, w] = sum_r A[t, r] B[s, r] C[h, r] D[w, r]``; rank R is the number of
rank-one terms; factors ``[A (T, R), B (S, R), C (kh, R), D (kw, R)]``, equation
``"tr,sr,hr,wr->tshw"``. Executed as 1x1 (S -> R), depthwise kh x 1, depthwise 1 x kw, 1x1 (R -> T).

CP has no error-bounded algorithm; ``eps`` searches R by bisection. CP-ALS can degenerate
(rank-one terms that grow and cancel); the fit reports the ratio
``sum(lambda_r**2) / ||W_hat||**2`` as ``info["degeneracy"]`` and warns when it is large, and the
optional ridge ``l2_reg`` tames it.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Annotated, Literal

import opt_einsum
import torch
from pydantic import BaseModel, ConfigDict, Field

from ..factorization import Factorization, KernelShape
from ..registry import register
from ._linalg import cached, mode_unfold, svd
from .base import Decomposition

log = logging.getLogger(__name__)

EQUATION = "tr,sr,hr,wr->tshw"
DEGENERACY_WARNING = 1e3


class CPOptions(BaseModel):
    """Options of ``cp``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_iter: Annotated[int, Field(ge=1, le=100_000)] = 250
    # stop when a sweep changes the relative error by less than tol times itself
    tol: Annotated[float, Field(ge=0.0, lt=1.0)] = 1e-8
    # ALS work cap per fit, in 1e9 multiply-adds (high ranks of big kernels cost ~1 per sweep)
    max_gflop: Annotated[float, Field(gt=0.0)] = 200.0
    # "svd": SVD starts (two fills) then random ones; "random": random starts only
    init: Literal["svd", "random"] = "svd"
    n_init: Annotated[int, Field(ge=1, le=100)] = 3
    l2_reg: Annotated[float, Field(ge=0.0)] = 0.0
    seed: int = 0


def exact_rank(shape: KernelShape) -> int:
    """A CP rank that always represents the kernel exactly: product of all sizes but the largest."""
    return math.prod(shape) // max(shape)


def _exact_factors(weight: torch.Tensor) -> list[torch.Tensor]:
    """Exact CP: one rank-one term per multi-index of the modes other than the largest one."""
    shape = tuple(weight.shape)
    keep = max(range(4), key=lambda n: shape[n])
    rest = [n for n in range(4) if n != keep]
    r = exact_rank(shape)  # type: ignore[arg-type]
    factors: list[torch.Tensor] = [weight.new_zeros(0)] * 4
    factors[keep] = mode_unfold(weight, keep).clone()
    # term j = multi-index (i_a, i_b, i_c) of the other modes: indicator vectors there
    idx = torch.arange(r, device=weight.device)
    sizes = [shape[n] for n in rest]
    coords = []
    for size in reversed(sizes):
        coords.append(idx % size)
        idx = idx // size
    coords.reverse()
    for n, c in zip(rest, coords, strict=True):
        onehot = weight.new_zeros(shape[n], r)
        onehot[c, torch.arange(r, device=weight.device)] = 1.0
        factors[n] = onehot
    return factors


# the starts tried in turn: SVD with Gaussian fill, SVD with non-negative uniform fill (the
# columns a mode lacks are random either way), then random starts
_STARTS = ("svd", "svd-uniform", "random")


def _init(weight: torch.Tensor, rank: int, init: str, seed: int) -> list[torch.Tensor]:
    """Leading singular vectors of each unfolding (random columns where a mode has too few),
    or all random for ``init="random"``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    factors = []
    for n in range(4):
        size = weight.shape[n]
        if init == "svd-uniform":
            a = torch.rand(size, rank, generator=gen, dtype=torch.float64)
        else:
            a = torch.randn(size, rank, generator=gen, dtype=torch.float64) / math.sqrt(size)
        a = a.to(weight.device)
        if init.startswith("svd"):
            # the same leading vectors for every start and rank on this kernel
            u = cached(weight, ("cp-init", n), lambda n=n: svd(mode_unfold(weight, n))[0])
            k = min(rank, u.shape[1])
            a[:, :k] = u[:, :k]
        factors.append(a)
    return factors


class _CPProblem:
    """The ALS sub-problems of one kernel at one rank.

    The MTTKRPs of a sweep share two products with the kernel (a dimension tree): ``Y[t, s, r]
    = sum_hw W[t, s, hw] C[h, r] D[w, r]`` serves the T and S updates (C and D do not change
    between them) and ``Z[hw, r] = sum_ts W[t, s, hw] A[t, r] B[s, r]`` the kh and kw updates,
    so a sweep costs two passes over the kernel instead of four.
    """

    def __init__(self, weight: torch.Tensor, rank: int, l2_reg: float) -> None:
        self.weight = weight
        self.shape = tuple(weight.shape)
        t, s, kh, kw = self.shape
        self.w3 = weight.reshape(t, s, kh * kw)
        self.flat = weight.reshape(t * s, kh * kw)
        self.rank = rank
        self.l2_reg = l2_reg
        self.norm_sq = float(torch.sum(weight.to(torch.float64) ** 2))
        self.eye = torch.eye(rank, dtype=weight.dtype, device=weight.device)

    def sweep_flops(self) -> float:
        """Multiply-adds of one sweep: two passes over the kernel and four R x R solves (which
        dominate at high ranks of small kernels), plus the line search's error pass."""
        return 3.0 * math.prod(self.shape) * self.rank + 8.0 * self.rank**3

    def _spatial(self, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Khatri-Rao product ``(kh * kw, R)`` of the spatial factors."""
        return (c[:, None, :] * d[None, :, :]).reshape(-1, self.rank)

    def _y(self, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``Y[t, s, r] = sum_hw W[t, s, hw] C[h, r] D[w, r]`` as one matrix product."""
        t, s = self.shape[:2]
        return (self.flat @ self._spatial(c, d)).reshape(t, s, self.rank)

    def _rel_err(self, inner: float, approx_sq: float) -> float:
        if self.norm_sq <= 0.0:
            return 0.0
        return math.sqrt(max(self.norm_sq - 2 * inner + approx_sq, 0.0) / self.norm_sq)

    def error(self, factors: list[torch.Tensor]) -> float:
        """Relative error from ``||W||^2 - 2 <W, W_hat> + ||W_hat||^2`` (no reconstruction)."""
        a, b, c, d = factors
        y = self._y(c, d)
        inner = float(torch.sum((y * b).sum(1) * a))
        approx_sq = float(torch.sum(math.prod(f.T @ f for f in factors)))
        return self._rel_err(inner, approx_sq)

    def _solve(self, grams: list[torch.Tensor], n: int, mttkrp: torch.Tensor) -> torch.Tensor:
        v = math.prod(g for m, g in enumerate(grams) if m != n)
        reg = self.l2_reg * float(torch.trace(v)) / self.rank + 1e-14 * float(v.abs().max())
        # A_n = mttkrp @ pinv(V), as a least-squares solve (V may be singular)
        sol = torch.linalg.lstsq(v + reg * self.eye, mttkrp.T).solution.T
        if n < 3:  # the scale lives on the last factor while iterating, for conditioning
            sol = sol / torch.linalg.vector_norm(sol, dim=0).clamp_min(1e-300)
        return sol

    def sweep(self, factors: list[torch.Tensor]) -> float:
        """One ALS sweep over the four modes, in place; returns the new relative error."""
        t, s, kh, kw = self.shape
        grams = [f.T @ f for f in factors]
        # (broadcast products and sums: torch.einsum was measured 8x slower on these shapes)
        y = self._y(factors[2], factors[3])  # (T, S, R): C, D stay fixed for the A, B updates
        factors[0] = self._solve(grams, 0, (y * factors[1]).sum(1))
        grams[0] = factors[0].T @ factors[0]
        factors[1] = self._solve(grams, 1, (y * factors[0][:, None, :]).sum(0))
        grams[1] = factors[1].T @ factors[1]
        # (S * K, R) = W^T A, then B summed out: Z (kh, kw, R) for the spatial updates
        v = (self.w3.reshape(t, -1).T @ factors[0]).reshape(s, kh * kw, self.rank)
        z = (v * factors[1][:, None, :]).sum(0).reshape(kh, kw, self.rank)
        factors[2] = self._solve(grams, 2, (z * factors[3][None, :, :]).sum(1))
        grams[2] = factors[2].T @ factors[2]
        mttkrp = (z * factors[2][:, None, :]).sum(0)
        factors[3] = self._solve(grams, 3, mttkrp)
        grams[3] = factors[3].T @ factors[3]
        inner = float(torch.sum(mttkrp * factors[3]))
        approx_sq = float(torch.sum(math.prod(grams)))
        return self._rel_err(inner, approx_sq)

    def solve(
        self, factors: list[torch.Tensor], max_iter: int, tol: float
    ) -> tuple[list[torch.Tensor], float]:
        """ALS with extrapolation (Bro's line search) until the relative change of the error
        falls below ``tol`` or ``max_iter`` sweeps."""
        err, prev_err, last = math.inf, math.inf, None
        exponent = 3.0
        it = 0
        for it in range(1, max_iter + 1):
            before = [f.clone() for f in factors]
            err = self.sweep(factors)
            if last is not None and it > 2:
                # jump further along the last sweep's direction; keep it only if it helps
                jump = it ** (1.0 / exponent)
                trial = [b + (f - b) * jump for b, f in zip(before, factors, strict=True)]
                trial_err = self.error(trial)
                if trial_err < err:
                    factors[:], err = trial, trial_err
                else:
                    exponent += 1.0
            last = before
            if abs(prev_err - err) <= tol * max(err, 1e-300) or err < 1e-13:
                break
            prev_err = err
        log.debug("cp-als: %d sweeps, error %.4e", it, err)
        return factors, err


# ALS sweeps every start gets before only the best one is continued
_PROBE_SWEEPS = 20


def cp_als(
    weight: torch.Tensor, rank: int, opts: CPOptions
) -> tuple[list[torch.Tensor], float, float]:
    """Fit a rank-``rank`` CP model by ALS from ``opts.n_init`` starts; keep the best.

    Every start runs ``_PROBE_SWEEPS`` sweeps, then only the best is continued, to convergence
    (``opts.tol``), ``opts.max_iter`` sweeps or the work cap ``opts.max_gflop``. The sweeps stay
    in the weight's precision (float64 inside ``factorize``): the normal equations of CP are
    often near-singular, and float32 sweeps were measured to drift to different solutions from
    run to run (1e-4 apart in error), which float64 does not. Returns ``(factors,
    relative_error, degeneracy)`` with the column scales spread evenly over the four factors.
    """
    problem = _CPProblem(weight, rank, opts.l2_reg)
    sweeps = opts.max_iter
    if math.isfinite(opts.max_gflop):
        sweeps = max(1, min(sweeps, int(opts.max_gflop * 1e9 // problem.sweep_flops())))
    probe = min(_PROBE_SWEEPS, sweeps) if opts.n_init > 1 else sweeps
    starts = _STARTS if opts.init == "svd" else ("random",)
    best: tuple[list[torch.Tensor], float] | None = None
    for start in range(opts.n_init):
        init = starts[min(start, len(starts) - 1)]
        factors, err = problem.solve(_init(weight, rank, init, opts.seed + start), probe, opts.tol)
        if best is None or err < best[1]:
            best = (factors, err)
    assert best is not None
    factors, err = best
    if sweeps > probe and err > 1e-13:
        factors, err = problem.solve(factors, sweeps - probe, opts.tol)
    return _balance(factors, weight)


def _balance(
    factors: list[torch.Tensor], weight: torch.Tensor
) -> tuple[list[torch.Tensor], float, float]:
    """Spread each term's scale evenly over the four factors; report error and degeneracy."""
    norms = [torch.linalg.vector_norm(f, dim=0) for f in factors]
    lam = math.prod(norms)
    unit = [f / n.clamp_min(1e-300) for f, n in zip(factors, norms, strict=True)]
    scale = lam.clamp_min(0).pow(0.25)
    balanced = [f * scale for f in unit]
    approx = opt_einsum.contract(EQUATION, *balanced, backend="torch")
    approx_sq = float(torch.sum(approx * approx))
    err = float(torch.linalg.vector_norm(weight - approx) / torch.linalg.vector_norm(weight))
    degeneracy = float(torch.sum(lam * lam)) / max(approx_sq, 1e-300)
    return balanced, err, degeneracy


@register("cp")
class CP(Decomposition):
    """CP / CANDECOMP-PARAFAC by ALS (SVD init). Rank: R, the number of rank-one terms."""

    rank_order = "(R,): the number of rank-one terms"
    guarantees_eps = False
    Options = CPOptions

    def bond_ranks(self, rank: int | tuple[int, ...], shape: KernelShape) -> tuple[int, ...]:
        (r,) = self.expand_ranks(rank, 1)
        return self.log_capped((r,), (min(r, exact_rank(shape)),))

    def num_params_at(self, shape: KernelShape, ranks: tuple[int, ...]) -> int:
        return ranks[0] * sum(shape)

    def search_options(self, options: CPOptions) -> CPOptions:
        return options.model_copy(
            update={
                "max_iter": min(options.max_iter, 100),
                "n_init": 1,
                "max_gflop": min(options.max_gflop, 2.0),
            }
        )

    def fit(
        self, weight: torch.Tensor, ranks: tuple[int, ...], options: CPOptions
    ) -> Factorization:
        shape: KernelShape = tuple(weight.shape)  # type: ignore[assignment]
        (r,) = ranks
        if r >= exact_rank(shape):
            factors, err, degeneracy = _exact_factors(weight), 0.0, 1.0
        else:
            factors, err, degeneracy = cp_als(weight, r, options)
        if degeneracy > DEGENERACY_WARNING:
            warnings.warn(
                f"cp rank {r} on {shape}: degenerate solution (sum of squared term norms is "
                f"{degeneracy:.3g}x the approximation's energy); try a lower rank or l2_reg>0",
                RuntimeWarning,
                stacklevel=4,
            )
        return self.make(factors, EQUATION, shape, (r,), fit_error=err, degeneracy=degeneracy)
