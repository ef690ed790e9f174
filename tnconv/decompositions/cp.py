"""CP (canonical polyadic) decomposition by ALS with SVD initialisation.

Kernel ``W[t, s, h, w] = sum_r A[t, r] B[s, r] C[h, r] D[w, r]``; rank R is the number of
rank-one terms; factors ``[A (T, R), B (S, R), C (kh, R), D (kw, R)]``, equation
``"tr,sr,hr,wr->tshw"``. Executed as 1x1 (S -> R), depthwise kh x 1, depthwise 1 x kw, 1x1 (R -> T).

CP has no error-bounded algorithm; ``eps`` searches R by bisection. CP-ALS can degenerate
(rank-one terms that grow and cancel); the fit reports the ratio
``sum(lambda_r**2) / ||W_hat||**2`` as ``info["degeneracy"]`` and warns when it is large, and the
optional ridge ``l2_reg`` tames it.

``stabilize=True`` runs the sensitivity-constrained CPD of Phan et al. (ECCV 2020) after ALS: it
minimises the sensitivity ``ss = sum_n I_n ||KhatriRao_{m != n} A_m||_F^2`` (the first-order gain
of factor noise, :meth:`Factorization.sensitivity`) subject to the relative error staying within
``(1 + stabilize_slack)`` times the ALS fit's, one factor at a time (see ``_stable.py``), then
scales every term so its factor norms minimise ``ss`` at the same product, and finally multiplies
the kernel by its least-squares scalar (the constrained updates shrink it, like a ridge). ``info``
reports ``sensitivity``, and ``unstabilized_error`` / ``unstabilized_sensitivity`` of the ALS fit.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from .._modes import plain_tensors
from ..factorization import (
    MODE_NAMES,
    Factorization,
    KernelShape,
    contract_contiguous,
    validate_weight,
)
from ..rank import FixedRank, parse_rank_spec
from ..registry import register
from ._linalg import cached, leading_left_vectors, mode_unfold, svd
from ._stable import constrained_update, least_squares_scale
from .base import Decomposition, _float64

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
    # sensitivity-constrained refinement (Phan et al., ECCV 2020) after ALS
    stabilize: bool = False
    stabilize_slack: Annotated[float, Field(ge=0.0, le=1.0)] = 0.02  # error <= (1+slack) * ALS's
    stabilize_iter: Annotated[int, Field(ge=1, le=100_000)] = 100
    # stop when a sweep lowers the sensitivity by less than this fraction: the first sweeps take
    # most of it (random 512x512x3x3, R = 300: x0.255 after 5 sweeps, x0.236 after 100), the
    # tail ~0.1% a sweep
    stabilize_tol: Annotated[float, Field(ge=0.0, lt=1.0)] = 1e-3
    # factorize_many fits a rank ladder from each previous fit (True) or each rank from its own
    # start (False, what budget allocation uses: on a ResNet-18-shaped model at budget 0.25 the
    # warm ladder chose higher ranks for the 512-channel layers, whose refits with the user's
    # options made cp 95 s vs 83 s and cp-stable 111 s vs 84 s (target 120 s), for a summed
    # loss of 7.31 vs 8.14 on its random kernels and identical plans on trained ones)
    warm_ladder: bool = True


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


def _init(
    weight: torch.Tensor, rank: int, init: str, seed: int, once: bool = False
) -> list[torch.Tensor]:
    """Leading singular vectors of each unfolding (random columns where a mode has too few),
    or all random for ``init="random"``. ``once``: a tensor seen only once (a residual): its
    leading vectors come from Gram matrices and are not cached."""
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
            if once:
                unfolded = mode_unfold(weight, n)
                u = leading_left_vectors(unfolded, min(rank, *unfolded.shape))
            else:
                u = cached(weight, ("cp-init", n), lambda n=n: svd(mode_unfold(weight, n))[0])
            k = min(rank, u.shape[1])
            a[:, :k] = u[:, :k]
        factors.append(a)
    return factors


# factor n from the Grams of the four factors and its MTTKRP: ALS's solve or a constrained one
_Update = Callable[[list[torch.Tensor], int, torch.Tensor], torch.Tensor]


class _CPProblem:
    """The ALS sub-problems of one kernel at one rank.

    A sweep makes three passes over the kernel, all of them matrix products: the T and S updates
    multiply the unfoldings ``(T, S kh kw)`` and ``(S, T kh kw)`` by Khatri-Rao products, and
    ``Z[hw, r] = sum_ts W[t, s, hw] A[t, r] B[s, r]`` (from ``W^T A``) serves both spatial
    updates. A dimension tree through ``Y[t, s, r] = sum_hw W[t, s, hw] C[h, r] D[w, r]`` has
    fewer multiply-adds, but its product has an inner dimension of kh * kw and writes T * S * R
    entries: it measured 1.1-7x slower per sweep from 16 to 512 channels (one and two threads),
    never faster, and was dropped.
    """

    def __init__(self, weight: torch.Tensor, rank: int, l2_reg: float) -> None:
        self.weight = weight
        self.shape = tuple(weight.shape)
        t, s, kh, kw = self.shape
        self.by_t = weight.reshape(t, s * kh * kw)
        self.by_s = weight.transpose(0, 1).reshape(s, t * kh * kw)
        self.rank = rank
        self.l2_reg = l2_reg
        self.norm_sq = float(torch.sum(weight.to(torch.float64) ** 2))
        self.eye = torch.eye(rank, dtype=weight.dtype, device=weight.device)

    def sweep_flops(self) -> float:
        """Multiply-adds of one sweep: three passes over the kernel and four R x R solves (which
        dominate at high ranks of small kernels)."""
        return 3.0 * math.prod(self.shape) * self.rank + 8.0 * self.rank**3

    def _spatial(self, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Khatri-Rao product ``(kh * kw, R)`` of the spatial factors."""
        return (c[:, None, :] * d[None, :, :]).reshape(-1, self.rank)

    def _kr_mttkrp(
        self, unfolding: torch.Tensor, other: torch.Tensor, spatial: torch.Tensor
    ) -> torch.Tensor:
        """``unfolding (I, J kh kw) @ KhatriRao(other (J, R), spatial (kh kw, R))``."""
        kr = (other[:, None, :] * spatial[None, :, :]).reshape(-1, self.rank)
        return unfolding @ kr

    def _rel_err(self, inner: float, approx_sq: float) -> float:
        if self.norm_sq <= 0.0:
            return 0.0
        return math.sqrt(max(self.norm_sq - 2 * inner + approx_sq, 0.0) / self.norm_sq)

    def mode0(self, factors: list[torch.Tensor]) -> torch.Tensor:
        """The T update's MTTKRP ``W_(T) KhatriRao(B, C, D)``, shape (T, R)."""
        b, c, d = factors[1:]
        return self._kr_mttkrp(self.by_t, b, self._spatial(c, d))

    def checked(self, factors: list[torch.Tensor]) -> tuple[float, torch.Tensor]:
        """Relative error from ``||W||^2 - 2 <W, W_hat> + ||W_hat||^2`` (no reconstruction), and
        the T update's MTTKRP it computed on the way: a sweep that starts from these factors
        reuses it (the line search's check then costs no pass of its own)."""
        first = self.mode0(factors)
        inner = float(torch.sum(first * factors[0]))
        approx_sq = float(torch.sum(math.prod(f.T @ f for f in factors)))
        return self._rel_err(inner, approx_sq), first

    def _solve(self, grams: list[torch.Tensor], n: int, mttkrp: torch.Tensor) -> torch.Tensor:
        v = math.prod(g for m, g in enumerate(grams) if m != n)
        reg = self.l2_reg * float(torch.trace(v)) / self.rank + 1e-14 * float(v.abs().max())
        # A_n = mttkrp @ inv(V): V is a Gram (Hadamard product of Grams), so Cholesky when it
        # is positive definite (3-6x cheaper than a least-squares solve at high ranks), else a
        # least-squares solve (V may be singular)
        gram = v + reg * self.eye
        chol, info = torch.linalg.cholesky_ex(gram)
        if int(info) == 0:
            sol = torch.cholesky_solve(mttkrp.T, chol).T
        else:
            sol = torch.linalg.lstsq(gram, mttkrp.T).solution.T
        if n < 3:  # the scale lives on the last factor while iterating, for conditioning
            sol = sol / torch.linalg.vector_norm(sol, dim=0).clamp_min(1e-300)
        return sol

    def sweep(
        self,
        factors: list[torch.Tensor],
        update: _Update | None = None,
        first: torch.Tensor | None = None,
    ) -> float:
        """One sweep over the four modes, in place; returns the new relative error.

        ``update(grams, n, mttkrp)`` gives factor n from the Grams of all four factors and its
        MTTKRP (default: the ALS least-squares solve); ``first``: the T update's MTTKRP of these
        very factors, from :meth:`checked`.
        """
        _, s, kh, kw = self.shape
        update = update or self._solve
        grams = [f.T @ f for f in factors]
        factors[0] = update(grams, 0, self.mode0(factors) if first is None else first)
        grams[0] = factors[0].T @ factors[0]
        cd = self._spatial(factors[2], factors[3])
        factors[1] = update(grams, 1, self._kr_mttkrp(self.by_s, factors[0], cd))
        grams[1] = factors[1].T @ factors[1]
        # (S * K, R) = W^T A, then B summed out: Z (kh, kw, R) for the spatial updates
        # (broadcast products and sums: torch.einsum was measured 8x slower on these shapes)
        v = (self.by_t.T @ factors[0]).reshape(s, kh * kw, self.rank)
        z = (v * factors[1][:, None, :]).sum(0).reshape(kh, kw, self.rank)
        factors[2] = update(grams, 2, (z * factors[3][None, :, :]).sum(1))
        grams[2] = factors[2].T @ factors[2]
        mttkrp = (z * factors[2][:, None, :]).sum(0)
        factors[3] = update(grams, 3, mttkrp)
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
        first: torch.Tensor | None = None
        for it in range(1, max_iter + 1):
            before = [f.clone() for f in factors]
            err = self.sweep(factors, first=first)
            first = None
            if last is not None and it > 2:
                # jump further along the last sweep's direction; keep it only if it helps (it
                # nearly always does: 98% of the jumps on random 64-512-channel kernels, so the
                # next sweep starts from the check's MTTKRP)
                jump = it ** (1.0 / exponent)
                trial = [b + (f - b) * jump for b, f in zip(before, factors, strict=True)]
                trial_err, trial_first = self.checked(trial)
                if trial_err < err:
                    factors[:], err, first = trial, trial_err, trial_first
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
    weight: torch.Tensor, rank: int, opts: CPOptions, start: list[torch.Tensor] | None = None
) -> tuple[list[torch.Tensor], float, float]:
    """Fit a rank-``rank`` CP model by ALS from ``opts.n_init`` starts (or from ``start``, the
    one start given, factors ``[(T, R), (S, R), (kh, R), (kw, R)]``); keep the best.

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
    if start is not None:
        factors, err = problem.solve([f.clone() for f in start], sweeps, opts.tol)
        return _balance(factors, weight)
    probe = min(_PROBE_SWEEPS, sweeps) if opts.n_init > 1 else sweeps
    kinds = _STARTS if opts.init == "svd" else ("random",)
    best: tuple[list[torch.Tensor], float] | None = None
    for k in range(opts.n_init):
        init = kinds[min(k, len(kinds) - 1)]
        factors, err = problem.solve(_init(weight, rank, init, opts.seed + k), probe, opts.tol)
        if best is None or err < best[1]:
            best = (factors, err)
    assert best is not None
    factors, err = best
    if sweeps > probe and err > 1e-13:
        factors, err = problem.solve(factors, sweeps - probe, opts.tol)
    return _balance(factors, weight)


def _extend(weight: torch.Tensor, factors: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
    """An ALS start at ``rank`` from a fit with fewer terms: its terms, then the residual's
    leading singular vectors (random columns where a mode is too small) for the new ones."""
    k = factors[0].shape[1]
    if rank <= k:
        return [f[:, :rank].clone() for f in factors]
    residual = weight - contract_contiguous(EQUATION, factors)
    if not bool(residual.any()):  # an exact fit: new terms from the kernel's own start
        residual = weight
    fresh = _init(residual, rank - k, "svd", seed=k, once=True)
    return [torch.cat([f, g], dim=1) for f, g in zip(factors, fresh, strict=True)]


def _balance(
    factors: list[torch.Tensor], weight: torch.Tensor
) -> tuple[list[torch.Tensor], float, float]:
    """Spread each term's scale evenly over the four factors; report error and degeneracy."""
    norms = [torch.linalg.vector_norm(f, dim=0) for f in factors]
    lam = math.prod(norms)
    unit = [f / n.clamp_min(1e-300) for f, n in zip(factors, norms, strict=True)]
    scale = lam.clamp_min(0).pow(0.25)
    balanced = [f * scale for f in unit]
    approx = contract_contiguous(EQUATION, balanced)
    approx_sq = float(torch.sum(approx * approx))
    err = float(torch.linalg.vector_norm(weight - approx) / torch.linalg.vector_norm(weight))
    degeneracy = float(torch.sum(lam * lam)) / max(approx_sq, 1e-300)
    return balanced, err, degeneracy


def cp_sensitivity(factors: list[torch.Tensor]) -> float:
    """Closed form of the CP sensitivity: ``sum_n I_n sum_r prod_{m != n} ||a_r^(m)||^2``."""
    sq = [torch.sum(f * f, dim=0) for f in factors]
    return sum(
        f.shape[0] * float(torch.sum(math.prod(sq[m] for m in range(len(sq)) if m != n)))
        for n, f in enumerate(factors)
    )


def min_sensitivity_scaling(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rescale each term's factors (same product) to minimise the sensitivity.

    For a term with squared factor norms x_n and fixed product, ``sum_n I_n prod_{m != n} x_m``
    is smallest when ``x_n`` is proportional to ``I_n`` (Lagrange), i.e. norms ``~ sqrt(I_n)``.
    """
    norms = [torch.linalg.vector_norm(f, dim=0).clamp_min(1e-300) for f in factors]
    lam = math.prod(norms)
    sizes = torch.tensor([float(f.shape[0]) for f in factors], dtype=torch.float64)
    # target norms c * sqrt(I_n) with prod = lam
    c = (lam / math.prod(math.sqrt(float(n)) for n in sizes)) ** (1.0 / len(factors))
    return [
        f / n * (c * math.sqrt(float(size)))
        for f, n, size in zip(factors, norms, sizes, strict=True)
    ]


def stabilize_cp(
    weight: torch.Tensor,
    factors: list[torch.Tensor],
    max_error: float,
    max_iter: int,
    tol: float = 1e-4,
) -> list[torch.Tensor]:
    """Sensitivity-constrained CPD: minimise ``cp_sensitivity`` with relative error <= max_error.

    Starts from ``factors`` (an ALS fit) and updates one factor at a time with
    :func:`constrained_update`, whose penalty for factor n is diagonal:
    ``D[r] = sum_{m != n} I_m prod_{k != m, n} ||a_r^(k)||^2``. Stops when a sweep lowers the
    sensitivity by less than the fraction ``tol``.
    """
    factors = min_sensitivity_scaling([f.clone() for f in factors])
    order = len(factors)
    sizes = [f.shape[0] for f in factors]
    problem = _CPProblem(weight, factors[0].shape[1], 0.0)
    max_err_sq = max_error * max_error * problem.norm_sq

    def update(grams: list[torch.Tensor], n: int, mttkrp: torch.Tensor) -> torch.Tensor:
        gram = math.prod(g for m, g in enumerate(grams) if m != n)
        sq = [torch.diagonal(g) for g in grams]
        penalty = sum(
            sizes[m] * math.prod(sq[k] for k in range(order) if k not in (m, n))
            for m in range(order)
            if m != n
        )
        return constrained_update(mttkrp, gram, penalty, problem.norm_sq, max_err_sq)

    ss = cp_sensitivity(factors)
    for _ in range(max_iter):
        before = ss
        # the ALS sweep's MTTKRPs (three passes over the kernel, not four), constrained updates
        problem.sweep(factors, update)
        factors = min_sensitivity_scaling(factors)
        ss = cp_sensitivity(factors)
        if before - ss <= tol * before:
            break
    # undo the shrinkage of the constrained updates (lowers the error, see least_squares_scale)
    c = least_squares_scale(weight, contract_contiguous(EQUATION, factors))
    if c > 0:
        factors = [f * c ** (1.0 / order) for f in factors]
    return factors


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
        # the rank search needs errors only; stabilisation keeps the error within its slack
        return options.model_copy(
            update={
                "max_iter": min(options.max_iter, 100),
                "n_init": 1,
                "max_gflop": min(options.max_gflop, 2.0),
                # a sweep that improves the error by < 1e-4 of itself no longer reorders the
                # candidates
                "tol": max(options.tol, 1e-4),
                "stabilize": False,
                "warm_ladder": False,
            }
        )

    def fit(
        self,
        weight: torch.Tensor,
        ranks: tuple[int, ...],
        options: CPOptions,
        max_error: float | None = None,
        start: list[torch.Tensor] | None = None,
    ) -> Factorization:
        """ALS at ``ranks`` (then stabilised if asked, within ``max_error`` when given), from
        ``start`` when given."""
        shape: KernelShape = tuple(weight.shape)  # type: ignore[assignment]
        (r,) = ranks
        if r >= exact_rank(shape):
            factors, err, degeneracy = _exact_factors(weight), 0.0, 1.0
        else:
            factors, err, degeneracy = cp_als(weight, r, options, start)
        info: dict = {}
        if options.stabilize:
            info = {"unstabilized_error": err, "unstabilized_sensitivity": cp_sensitivity(factors)}
            if err > 0.0:
                bound = err * (1.0 + options.stabilize_slack)
                if max_error is not None:  # keep an eps target the ALS fit meets
                    bound = max(err, min(bound, max_error))
                factors = stabilize_cp(
                    weight, factors, bound, options.stabilize_iter, options.stabilize_tol
                )
            else:
                factors = min_sensitivity_scaling(factors)
            # error and degeneracy of the stabilised factors (their scales are kept)
            approx = contract_contiguous(EQUATION, factors)
            err = float(
                torch.linalg.vector_norm(weight - approx) / torch.linalg.vector_norm(weight)
            )
            lam_sq = math.prod(torch.sum(f * f, dim=0) for f in factors)
            degeneracy = float(torch.sum(lam_sq)) / max(float(torch.sum(approx * approx)), 1e-300)
            info["sensitivity"] = cp_sensitivity(factors)
        if degeneracy > DEGENERACY_WARNING:
            warnings.warn(
                f"cp rank {r} on {shape}: degenerate solution (sum of squared term norms is "
                f"{degeneracy:.3g}x the approximation's energy); try a lower rank or l2_reg>0",
                RuntimeWarning,
                stacklevel=4,
            )
        return self.make(
            factors, EQUATION, shape, (r,), fit_error=err, degeneracy=degeneracy, **info
        )

    def factorize_many(
        self,
        weight: Any,
        specs: Sequence[Mapping[str, Any]],
        *,
        until: Callable[[int, Factorization], bool] | None = None,
        reuse: dict[str, Any] | None = None,
        statistics: Any = None,
        **options: Any,
    ) -> list[Factorization]:
        """:meth:`Decomposition.factorize_many` with warm starts: with one ALS start
        (``n_init=1``) and ``warm_ladder`` (default; budget allocation's search options turn it
        off) the fixed-rank specs are fitted in increasing rank,
        each from the previous fit plus new terms from its residual (:func:`_extend`), so a
        ladder of ranks costs one continued fit instead of cold starts. Results differ from
        independent ``factorize`` calls by what the stopping rule ``tol`` lets through (on the
        demo CNN's kernels, errors within 0.01 either way at 1e-4, 2-3x faster). With ``until``
        the specs are fitted in their own order, cold."""
        groups = options.get("groups", 1)
        layout = {"groups", "tensorize"}
        opts = self.parse_options({k: v for k, v in options.items() if k not in layout})
        w = validate_weight(weight, tuple(MODE_NAMES))
        cold = opts.n_init > 1 or not opts.warm_ladder or until is not None
        # other orders, grouped or tensorized kernels: the base's
        other = w.ndim != 4 or groups != 1 or options.get("tensorize") is not None
        if cold or other or statistics is not None or not bool(w.any()):
            return super().factorize_many(
                w, specs, until=until, reuse=reuse, statistics=statistics, **options
            )
        parsed = [parse_rank_spec(**dict(spec)) for spec in specs]
        with plain_tensors():  # ordinary tensors whatever the caller's mode (as the base's)
            return self._warm_ladder(w, parsed, opts)

    def _warm_ladder(
        self, w: torch.Tensor, parsed: list[Any], opts: CPOptions
    ) -> list[Factorization]:
        """:meth:`factorize_many`'s warm-started ladder over the parsed specs, in their order."""
        w64 = _float64(w)
        shape: KernelShape = tuple(int(n) for n in w.shape)  # type: ignore[assignment]
        results: list[Factorization | None] = [None] * len(parsed)
        ladder = sorted(
            (self.bond_ranks(spec.ranks, shape), i)
            for i, spec in enumerate(parsed)
            if isinstance(spec, FixedRank)
        )
        previous: list[torch.Tensor] | None = None
        for ranks, i in ladder:
            exact = ranks[0] >= exact_rank(shape)
            start = None if previous is None or exact else _extend(w64, previous, ranks[0])
            fitted = self.fit(w64, ranks, opts, start=start)
            if not exact:
                previous = [f.detach() for f in fitted.factors]
            results[i] = self._finish(fitted, w, w64)
        for i, spec in enumerate(parsed):
            if results[i] is None:
                results[i] = self._factorize(w, w64, spec, opts)
        return [r for r in results if r is not None]

    def fit_eps(self, weight: torch.Tensor, eps: float, options: CPOptions) -> Factorization:
        """The generic rank search; with ``stabilize`` the search runs without it and the final
        fit is stabilised within eps as well as within its slack."""
        if not options.stabilize:
            return super().fit_eps(weight, eps, options)
        plain = super().fit_eps(weight, eps, options.model_copy(update={"stabilize": False}))
        return self.fit(weight, plain.ranks, options, max_error=eps * (1.0 - 1e-9))

    def fit_ratio(self, weight: torch.Tensor, budget: int, options: CPOptions) -> Factorization:
        """The generic budget search; with ``stabilize`` the search and its refits run without
        it (stabilising every candidate cost minutes) and only the winner is stabilised, at its
        ranks (same parameters, so the budget still holds)."""
        if not options.stabilize:
            return super().fit_ratio(weight, budget, options)
        plain = super().fit_ratio(weight, budget, options.model_copy(update={"stabilize": False}))
        return self.fit(weight, plain.ranks, options)


class CPStableOptions(CPOptions):
    """Options of ``cp-stable``: those of ``cp`` with ``stabilize=True`` by default, and one ALS
    start (``n_init=1``) so the stabilised fit costs about what three plain starts do."""

    stabilize: bool = True
    n_init: Annotated[int, Field(ge=1, le=100)] = 1


@register("cp-stable")
class CPStable(CP):
    """``cp`` with the sensitivity-constrained refinement on (``cp`` with ``stabilize=True``).

    Registered under its own name so every method-parametrized suite and ``compress`` /
    ``study`` pick the stabilised fit up like any other method.
    """

    Options = CPStableOptions
