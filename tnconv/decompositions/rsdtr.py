"""RSDTR: reduced-storage direct tensor ring (Gabor & Zdunek), with a better search.

The kernel ``W (T, S, kh, kw)`` is a ring of four cores, in the kernel's mode order::

    G_T (R_WT, T, R_TS), G_S (R_TS, S, R_SH), G_H (R_SH, kh, R_HW), G_W (R_HW, kw, R_WT)
    W[t, s, h, w] = trace(G_T[:, t, :] @ G_S[:, s, :] @ G_H[:, h, :] @ G_W[:, w, :])

equation ``"atb,bsc,chd,dwa->tshw"`` (the layout of ``tr``), ranks ``(R_WT, R_TS, R_SH, R_HW)``.

**The published search** (``search="published"``; the paper's code, after Mickelin & Karaman's
``TRcheckall``): for each of the 4 circular shifts of the modes, TR-SVD at accuracy ``eps``
(three sequential SVDs, each truncated at ``eps / sqrt(3)`` times the norm of the matrix it
factors), the first rank ``R`` split as ``R = r0 * r1`` for every divisor ``r0``; the ring with the
fewest parameters wins and is rotated back to the kernel's mode order.

**tnconv's search** (``search="tnconv"``, the default) keeps the structure and the guarantee and
chooses better:

* Sequential truncation makes the squared error exactly the sum of the discarded squared singular
  values, so the budget is ``eps^2 ||W||^2`` in total, not a fixed third per step. The search
  spends it freely: any first rank the budget allows, any split of it, any second rank, and the
  smallest third rank the rest of the budget allows, on all four shifts. A branch and bound keeps
  this fast: the eps-rank of each unfolding of ``W`` floors the product of the two bonds that cut
  it, interlacing floors the third rank, so whole branches are discarded without an SVD. The
  first SVD of a shift is shared by every first rank and divisor, the second by every second
  rank, and the spectra come from small Gram matrices. First ranks spending a grid of shares of
  the budget go first; the rest is searched best-first until a work cap (``search_max_gflop``),
  below which the search is exhaustive over sequential plans (``info["search_exhaustive"]``).
* The published plans are evaluated alongside, so the result never has more parameters than the
  published search (objective ``"params"``).
* Refinement: the cheapest few distinct rings are refitted by alternating least squares at their
  ranks, which leaves the error below ``eps``; the slack is spent shrinking bonds (truncate the
  two cores a bond joins, re-fit, keep it only if the measured error still meets ``eps``), under
  a work cap.
* ``objective="flops"`` minimises the FLOPs of the paper's four-sublayer pipeline at
  ``input_size`` instead; it also runs the parameter search, so it never returns more FLOPs than
  ``objective="params"``.

The returned ring's error is measured, not assumed: ``relative_error <= eps`` always holds.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import heapq
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..factorization import Factorization, KernelShape, contract_contiguous
from ..registry import register
from ._linalg import cached, tail_energy
from ._ring import ring_params
from .base import Decomposition
from .tr import cap_ring_ranks

__all__ = ["EQUATION", "RSDTR", "RSDTROptions", "pipeline_flops"]

log = logging.getLogger(__name__)

EQUATION = "atb,bsc,chd,dwa->tshw"
_T = TypeVar("_T")
_U = TypeVar("_U")
Ranks = tuple[int, int, int, int]
PositiveInt = Annotated[int, Field(gt=0)]

# Shares of the error budget whose first ranks the search takes before all others. On the
# trained kernels measured (../shared/data, eps 0.3 and 0.5) the optimum always had one of them.
_FIRST_SHARES = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
# the budget allocation's quick search takes only these, without the paper's plans: on a trained
# 24x96, a trained 45x45x5x5, a power-law and a random 256x256x3x3 kernel at its 15 error levels
# its rings had at most 0.01 of the dense parameters more, in 0.45-0.75x the time
_QUICK_SHARES = (0.5, 1.0)
# from this eps on, the search's later spectra are float32 (their tail sums are accurate to about
# 1e-7 of the kernel's energy, i.e. 1e-3 of the budget here; the chosen ring's SVDs are float64)
_SINGLE_EPS = 0.01
# refinement starts from sequential rings costing at most this factor above the cheapest
_SEED_SLACK = 1.2
# ALS sweeps after a bond is truncated, before the bound is checked; a trial whose error after
# the first sweep is above this factor of eps is abandoned
_SHRINK_SWEEPS = 4
_SHRINK_GIVE_UP = 1.03


class RSDTROptions(BaseModel):
    """Options of ``rsdtr``.

    Attributes:
        search: ``"tnconv"`` (free split of the error budget + refinement) or ``"published"``
            (the paper's search, reproduced exactly: parameters only, no refinement).
        objective: what the eps search minimises: ``"params"`` or ``"flops"`` (of the
            four-sublayer pipeline at ``input_size`` and ``stride``, see :func:`pipeline_flops`).
        input_size: (H, W) of the layer's input, for the FLOPs objective and the reported FLOPs.
        stride: the layer's stride (int or pair), likewise.
        search_max_gflop: work cap of the SVD search beyond its first phase, in 1e9
            multiply-adds of eigen-decompositions; below it the search is exhaustive.
        first_shares: shares of the error budget whose first ranks the search's first phase
            takes (in full, whatever the work cap).
        paper_plans: offer the paper's plans first and keep the best of them as a backup, so
            the ring never has more parameters than the published search's (the allocation's
            quick search turns this off: they were a third of its time).
        refine: ALS + bond shrinking after the SVD search.
        refine_seeds: how many of the cheapest distinct rings the refinement starts from.
        als_sweeps: ALS sweeps at fixed ranks (in ``fit`` and before shrinking).
        als_max_gflop: ALS work allowed per factorization (per objective), in 1e9 multiply-adds.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    search: Literal["tnconv", "published"] = "tnconv"
    objective: Literal["params", "flops"] = "params"
    input_size: tuple[PositiveInt, PositiveInt] = (32, 32)
    stride: tuple[PositiveInt, PositiveInt] = (1, 1)
    search_max_gflop: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 2.0
    first_shares: tuple[Annotated[float, Field(gt=0.0, le=1.0)], ...] = Field(
        default=_FIRST_SHARES, min_length=1
    )
    paper_plans: bool = True
    refine: bool = True
    refine_seeds: Annotated[int, Field(ge=1, le=64)] = 8
    als_sweeps: Annotated[int, Field(ge=0, le=1000)] = 10
    als_max_gflop: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 2.0

    @field_validator("stride", mode="before")
    @classmethod
    def _pair(cls, value: object) -> object:
        return (value, value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _published_minimises_params(self) -> RSDTROptions:
        if self.search == "published" and self.objective != "params":
            raise ValueError(
                "search='published' reproduces the paper, which minimises parameters only; "
                "use objective='params' or search='tnconv'"
            )
        return self


def pipeline_flops(
    shape: Sequence[int],
    ranks: Sequence[int],
    input_size: tuple[int, int] = (32, 32),
    stride: tuple[int, int] = (1, 1),
) -> int:
    """FLOPs (2 per multiply-add) of one image through the paper's four-sublayer pipeline.

    The sublayers of a ring with ranks ``(R_WT, R_TS, R_SH, R_HW)`` on an input (S, H, W), with
    padding ``k // 2`` per spatial axis (size-preserving for odd kernels at stride 1):

    1. 1x1: S -> R_TS * R_SH at (H, W);
    2. kh x 1 conv R_SH -> R_HW, stride on H, shared over the R_TS axis: out (H', W);
    3. 1 x kw conv R_HW -> R_WT, stride on W, shared over R_TS: out (H', W');
    4. 1x1 closing the ring: R_WT * R_TS -> T at (H', W').
    """
    return 2 * int(_pipeline_macs(shape, tuple(int(r) for r in ranks), input_size, stride))


def _pipeline_macs(
    shape: Sequence[int], ranks: Sequence, input_size: tuple[int, int], stride: tuple[int, int]
) -> float | np.ndarray:
    """Multiply-adds of :func:`pipeline_flops`; ``ranks`` may hold arrays (elementwise)."""
    t, s, kh, kw = (int(n) for n in shape)
    r_wt, r_ts, r_sh, r_hw = ranks
    h, w = input_size
    ho = (h + 2 * (kh // 2) - kh) // stride[0] + 1
    wo = (w + 2 * (kw // 2) - kw) // stride[1] + 1
    return (
        h * w * s * r_ts * r_sh
        + r_ts * ho * w * r_sh * kh * r_hw
        + r_ts * ho * wo * r_hw * kw * r_wt
        + ho * wo * r_wt * r_ts * t
    )


# a cost of kernel-ordered ranks (R_WT, R_TS, R_SH, R_HW); it must accept arrays of ranks
# (elementwise) as well as ints, and grow with every rank
Cost = Callable[[Sequence], "float | np.ndarray"]


# ---------------------------------------------------------------------------------------------
# spectra
# ---------------------------------------------------------------------------------------------
def _thin_svd(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``mat = U @ diag(S) @ Vh`` (descending S) through a QR of the long side.

    Same factorization as ``torch.linalg.svd(mat, full_matrices=False)``; LAPACK's divide and
    conquer SVD of a thin matrix run multi-threaded on a busy 2-core machine was measured 100x
    slower than this QR followed by the SVD of the small triangular factor.
    """
    if mat.shape[0] < mat.shape[1]:
        u, s, vh = _thin_svd(mat.T)
        return vh.T, s, u.T
    q, r = torch.linalg.qr(mat)
    u, s, vh = torch.linalg.svd(r)
    return q @ u, s, vh


def _left_split(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, s, rows)`` with ``mat = U @ rows``, ``U`` orthonormal with the left singular vectors
    in descending order and ``s[j] = ||rows[j]||`` (the singular values), so truncating after r
    terms discards exactly ``sum(s[r:]**2)``.

    A wide matrix goes through the eigen-decomposition of its small Gram matrix (2.5-3x faster
    than :func:`_thin_svd` at 512-1536 rows; ``U`` is orthonormal to rounding and ``rows = U^T
    mat`` exactly, so the discarded energy is exact whatever the Gram's rounding); a tall one
    through :func:`_thin_svd`.
    """
    if mat.shape[0] > mat.shape[1]:
        u, s, vh = _thin_svd(mat)
        return u, s, s[:, None] * vh
    _, u = torch.linalg.eigh(mat @ mat.T)
    u = torch.flip(u, (1,))
    rows = u.T @ mat
    return u, torch.linalg.vector_norm(rows, dim=1), rows


def _sq_svals(mat: torch.Tensor) -> torch.Tensor:
    """Squared singular values of ``mat``, descending, from the smaller Gram matrix, in the
    matrix's dtype.

    In float64 accurate to about 1e-16 of the largest in absolute terms, which is all an energy
    budget needs (a chosen ring's error is recomputed from its own SVDs); in float32 (the search
    at eps >= ``_SINGLE_EPS``, on unit-scaled matrices) tail sums are accurate to about 1e-7 of
    the total energy.
    """
    gram = mat @ mat.T if mat.shape[0] <= mat.shape[1] else mat.T @ mat
    return torch.flip(torch.linalg.eigvalsh(gram), (0,)).clamp_min(0.0)


def _eigvals_desc(gram: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric PSD matrix, descending, clamped at 0."""
    return torch.flip(torch.linalg.eigvalsh(gram), (0,)).clamp_min(0.0)


def _tail_sq(lam: torch.Tensor) -> torch.Tensor:
    """``tail[r] = sum(lam[r:])`` for r = 0..len(lam)."""
    tail = torch.flip(torch.cumsum(torch.flip(lam, (0,)), 0), (0,))
    return torch.cat([tail, tail.new_zeros(1)])


def _min_rank(tail: torch.Tensor, budget: float) -> int:
    """Smallest r >= 1 with ``tail[r] <= budget`` (``tail`` as from :func:`tail_energy`)."""
    ok = torch.nonzero(tail <= budget).flatten()
    return max(1, int(ok[0])) if ok.numel() else tail.numel() - 1


def _published_rank(s: torch.Tensor, delta: float) -> int:
    """The paper's truncation: drop the longest tail with squared sum *below* (delta ||s||)^2."""
    bound = delta * float(torch.linalg.vector_norm(s))
    tail = torch.cumsum(torch.flip(s, (0,)) ** 2, 0)
    return s.numel() - int(torch.count_nonzero(tail < bound * bound))


def _eig_work(m1: int, m2: int) -> float:
    """Multiply-adds of the Gram matrix of an (m1, m2) matrix and its eigen-decomposition."""
    k, big = min(m1, m2), max(m1, m2)
    return float(k * k * big + 4 * k**3)


# the largest shared Gram matrix of a shift's first remainder (see _Shift.gram), in bytes
_GRAM_BYTES = 1 << 27

# kernels with at least this many entries keep torch's thread pool for fixed-rank fits and the
# ratio search: their eigen-decompositions (up to 512 x 512 for 512-channel kernels) are large
# enough to gain from it on a quiet machine. The eps search never does (see RSDTR.fit_eps).
_POOL_ENTRIES = 1 << 20


@contextlib.contextmanager
def _one_thread(weight: torch.Tensor | None = None) -> Iterator[int]:
    """Run torch's intra-op work on one thread for the duration, then restore the pool size;
    yields the caller's thread count.

    The search makes thousands of eigen-decompositions of matrices with tens to hundreds of
    rows: latency-bound work that gains nothing from threads. On a 2-core machine shared with
    another busy process, the 2-thread pool made the same factorization 20-100x slower (each
    small call waits for both threads to be scheduled). A ``weight`` of at least
    ``_POOL_ENTRIES`` entries keeps the pool.
    """
    threads = torch.get_num_threads()
    if threads == 1 or (weight is not None and weight.numel() >= _POOL_ENTRIES):
        yield threads
        return
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def _map(fn: Callable[[_T], _U], items: Sequence[_T], workers: int) -> list[_U]:
    """``[fn(x) for x in items]``, on up to ``workers`` Python threads (torch releases the GIL
    in its kernels, so single-threaded linear algebra on independent data runs in parallel,
    with none of the intra-op pool's per-call synchronisation). Same results in the same order
    whatever ``workers``: each ``fn(x)`` must touch only its own state."""
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]

    def single(x: _T) -> _U:
        # OpenMP's thread count is per OS thread: a new thread starts at the process default
        # (OMP_NUM_THREADS or the cores), not at the caller's 1, and a 2-thread reduction gives
        # other bits; one thread per task keeps the result independent of the thread count
        torch.set_num_threads(1)
        return fn(x)

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(single, items))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---------------------------------------------------------------------------------------------
# the SVD search
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class _Plan:
    """A TR-SVD of the kernel shifted to start at mode ``shift``: its bonds in shifted order.

    ``bonds[j]`` is the bond left of the j-th mode of the shifted tensor, so ``bonds[0]`` is the
    closing bond and ``bonds[0] * bonds[1]`` the first SVD's rank; it is kernel bond
    ``(shift + j) % 4``.
    """

    shift: int
    bonds: Ranks

    def kernel_ranks(self) -> Ranks:
        ranks = [0] * 4
        for j, b in enumerate(self.bonds):
            ranks[(self.shift + j) % 4] = b
        return tuple(ranks)  # type: ignore[return-value]


@dataclass
class _Step1:
    """The second SVD of a first split (r0, r1), as the search needs it.

    ``lam``: squared singular values; ``tail``: discarded energy per rank; ``head2[r]``: energy
    of the leading r singular values of the third SVD's matrix at the largest second rank, which
    bounds the same at every smaller second rank (computed when the search first needs it, see
    :meth:`_Shift.head2`); ``rows``: ``S @ Vh`` (the remainder passed on), computed only when a
    third spectrum is asked for (most splits are pruned before).
    """

    lam: torch.Tensor
    tail: torch.Tensor
    head2: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    third: torch.Tensor | None = None  # the third SVD's spectrum at the largest second rank


class _SharedGram:
    """The Gram matrix ``src @ src.T`` of ``src`` (top * side, other), whose rows come in
    groups of ``side`` (one per row of ``S @ Vh``), filled by row groups on demand: its leading
    ``B * side`` block costs ``(B side)^2 other / 2`` multiply-adds (one triangle, mirrored)."""

    def __init__(self, src: torch.Tensor, side: int) -> None:
        self.src = src.contiguous()
        self.side = side
        self.top = src.shape[0] // side
        self.full = src.new_empty(src.shape[0], src.shape[0])
        self.filled = 0  # rows of S @ Vh whose rows and columns are in `full`

    @staticmethod
    def work(size: int, other: int) -> float:
        """Multiply-adds of the leading ``size`` block."""
        return float(size) ** 2 * other / 2

    def leading(self, big_r: int) -> torch.Tensor:
        """The Gram's leading ``(big_r * side)`` square block (a view)."""
        while big_r > self.filled:
            # 64 rows of S @ Vh at a time: their rows left of and on the diagonal, mirrored
            upto = min(self.top, self.filled + 64)
            lo, hi = self.filled * self.side, upto * self.side
            block = self.src[lo:hi] @ self.src[:hi].T
            self.full[lo:hi, :hi] = block
            self.full[:lo, lo:hi] = block[:, :lo].T
            self.filled = upto
        size = big_r * self.side
        return self.full[:size, :size]


@dataclass
class _Shift:
    """The kernel circularly shifted to start at mode ``p``, with its first (shared) SVD."""

    p: int
    x: torch.Tensor  # (n0, n1, n2, n3)
    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    tail: torch.Tensor  # tail[r] = energy discarded at first rank r
    fast: dict[tuple[int, int, bool], _Step1] = field(default_factory=dict)
    exact: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # third spectra by (r0, r1, r2): the searches of many budgets revisit the same nodes
    third: dict[tuple[int, int, int, bool], torch.Tensor] = field(default_factory=dict)
    unit32: torch.Tensor | None = None  # S @ Vh / s[0] in float32, for the float32 spectra
    # shared Gram matrices of S @ Vh (see :meth:`gram`) by (split, row side?, single), dropped
    # after each search (they are large), and the direct Gram work done per key so far
    grams: dict[tuple[int, bool, bool], _SharedGram] = field(default_factory=dict)
    gram_work: dict[tuple[int, bool, bool], float] = field(default_factory=dict)

    @classmethod
    def of(cls, weight: torch.Tensor, p: int) -> _Shift:
        x = weight.permute([(p + j) % 4 for j in range(4)]).contiguous()
        # LAPACK's own SVD, as the paper: the split of the first rank into (r0, r1) puts
        # singular pairs on both sides of the second SVD, so its spectrum depends on their signs
        u, s, vh = torch.linalg.svd(x.reshape(x.shape[0], -1), full_matrices=False)
        return cls(p, x, u, s, vh, tail_energy(s))

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(self.x.shape)

    def unit32_rows(self) -> torch.Tensor:
        """``S @ Vh / s[0]`` in float32 (made once): entries at most 1, no over/underflow."""
        if self.unit32 is None:
            top = float(self.s[0]) or 1.0
            self.unit32 = (self.s[:, None] * self.vh / top).float()
        return self.unit32

    def remainder1(self, r0: int, r1: int, single: bool = False) -> torch.Tensor:
        """The second SVD's matrix ``(r1 * n1, n2 * n3 * r0)`` for the first split (r0, r1);
        ``single``: in float32 and divided by the largest singular value (see :meth:`energy`).
        """
        big_r = r0 * r1
        # row a0 * r1 + a1, as the paper splits
        rest = self.unit32_rows()[:big_r] if single else self.s[:big_r, None] * self.vh[:big_r]
        rest = rest.reshape(r0, r1, -1).permute(1, 2, 0)  # the closing bond rides along last
        return rest.reshape(r1 * self.dims[1], -1)

    def energy(self, lam: torch.Tensor) -> torch.Tensor:
        """Squared singular values of a matrix derived from :meth:`remainder1` back in the
        kernel's dtype and scale (float32 ones were computed on the unit-scaled remainder)."""
        if lam.dtype == self.s.dtype:
            return lam
        return lam.to(self.s.dtype) * (float(self.s[0]) or 1.0) ** 2

    def gram(self, r0: int, r1: int, split: int, single: bool = False) -> torch.Tensor:
        """The smaller Gram matrix of :meth:`remainder1` reshaped to ``(r1 * n1..n_split, rest)``
        (``split`` 1: the second SVD's matrix itself; 2: rows ``(r1 n1 n2)``):
        ``mat @ mat.T`` or ``mat.T @ mat``, with ``mat`` the matrix; the smaller of the two.

        Its rows are ``(a1, row)`` and its columns ``(col, a0)``, with entries from row
        ``a0 * r1 + a1`` of ``S @ Vh``; so it is a sum of diagonal blocks of one Gram of ``S @ Vh``
        reshaped to ``(R * row, col)`` (row side) or ``(R * col, row)`` (column side), shared by
        every split (r0, r1) of every first rank up to R (see :class:`_SharedGram`). That Gram is
        started once the direct products of a search have cost as much as it would (so at worst
        twice the direct work); on a 512x512x3x3 kernel it replaces most of the search's Gram
        work.
        """
        n = self.dims
        rows = math.prod(n[1 : split + 1])
        cols = math.prod(n[split + 1 :])
        big_r = r0 * r1
        row_side = r1 * rows <= cols * r0
        side, other = (rows, cols) if row_side else (cols, rows)
        key = (split, row_side, single)
        shared = self.grams.get(key)
        if shared is None:
            # the direct product: (r1 row)^2 (col r0) or (col r0)^2 (r1 row) multiply-adds
            direct = float(big_r * side) ** 2 * other / (r0 if row_side else r1)
            spent = self.gram_work.get(key, 0.0) + direct
            self.gram_work[key] = spent
            top = min(self.s.numel(), math.isqrt(_GRAM_BYTES // (4 if single else 8)) // side)
            if big_r <= top and spent >= _SharedGram.work(big_r * side, other):
                src = self.unit32_rows()[:top] if single else self.s[:top, None] * self.vh[:top]
                src = src.reshape(top, rows, cols)
                if not row_side:
                    src = src.transpose(1, 2)
                shared = self.grams[key] = _SharedGram(src.reshape(top * side, other), side)
        if shared is None or big_r > shared.top:
            mat = self.remainder1(r0, r1, single)
            if split == 2:
                mat = mat.reshape(r1 * rows, cols * r0)
            return mat @ mat.T if row_side else mat.T @ mat
        lead = shared.leading(big_r)
        if row_side:  # sum over a0 of the blocks (a0 r1 + a1, a0 r1 + b1): rows (a1, row)
            if r0 == 1:
                return lead.clone()
            k = lead.reshape(r0, r1, side, r0, r1, side)
            return torch.diagonal(k, dim1=0, dim2=3).sum(-1).reshape(r1 * side, r1 * side)
        # sum over a1 of the blocks (a0 r1 + a1, b0 r1 + a1), in the matrix's order (col, a0)
        if r1 == 1:
            g = lead.reshape(r0, side, r0, side)
        else:
            k = lead.reshape(r0, r1, side, r0, r1, side)
            g = torch.diagonal(k, dim1=1, dim2=4).sum(-1)
        return g.permute(1, 0, 3, 2).reshape(r0 * side, r0 * side)

    def step1(self, r0: int, r1: int, single: bool = False, rows: bool = False) -> _Step1:
        """The second SVD's spectrum for the split (r0, r1), from a Gram matrix (cached).

        ``single``: in float32 (see :func:`_sq_svals`). ``rows``: with ``S @ Vh`` of the second
        SVD too (``_Step1.rows``), from one eigen-decomposition when neither is cached yet (the
        paper's plans need both). ``head2`` is left to :meth:`head2`.
        """
        key = (r0, r1, single)
        step = self.fast.get(key)
        if step is not None and (step.rows is not None or not rows):
            return step
        gram = self.gram(r0, r1, 1, single)
        if not rows:
            lam = self.energy(_eigvals_desc(gram))
            step = self.fast[key] = _Step1(lam, _tail_sq(lam))
            return step
        lam, vecs = torch.linalg.eigh(gram)
        lam, vecs = torch.flip(lam, (0,)).clamp_min(0.0), torch.flip(vecs, (1,))
        if gram.shape[0] == r1 * self.dims[1]:  # the row Gram: S @ Vh = U^T M
            out = vecs.T @ self.remainder1(r0, r1, single)
        else:  # the column Gram: S @ Vh = (V sqrt(lam))^T
            out = (vecs * lam.sqrt()).T
        if step is None:
            energy = self.energy(lam)
            step = self.fast[key] = _Step1(energy, _tail_sq(energy))
        step.rows = out  # in the remainder's dtype and scale
        return step

    def third_full(self, r0: int, r1: int, single: bool = False) -> torch.Tensor:
        """Squared singular values of the third SVD's matrix at the largest second rank
        (cached on :meth:`step1`), without eigenvectors.

        That matrix is ``U^T M`` reshaped, with ``M`` the second SVD's matrix and ``U``
        orthogonal on its range, so its column Gram is that of ``M`` reshaped to
        ``(r1 n1 n2, n3 r0)``: it comes from ``M`` alone.
        """
        step = self.step1(r0, r1, single)
        if step.third is None:
            step.third = self.energy(_eigvals_desc(self.gram(r0, r1, 2, single)))
        return step.third

    def head2(self, r0: int, r1: int, single: bool = False) -> torch.Tensor:
        """``head2`` of :meth:`step1` (cached there): cumulative :meth:`third_full`."""
        step = self.step1(r0, r1, single)
        if step.head2 is None:
            third = self.third_full(r0, r1, single)
            step.head2 = torch.cat([third.new_zeros(1), torch.cumsum(third, 0)])
        return step.head2

    def lam2(self, r0: int, r1: int, r2: int, single: bool = False) -> torch.Tensor:
        """Squared singular values of the third SVD at second rank r2 (from a Gram matrix)."""
        key = (r0, r1, r2, single)
        if key not in self.third:
            if r2 >= self.step1(r0, r1, single).lam.numel():  # every row of S @ Vh
                self.third[key] = self.third_full(r0, r1, single)
                return self.third[key]
            rows = self.step1(r0, r1, single, rows=True).rows
            assert rows is not None
            self.third[key] = self.energy(_sq_svals(rows[:r2].reshape(r2 * self.dims[2], -1)))
        return self.third[key]

    def tail2(self, r0: int, r1: int, r2: int, single: bool = False) -> torch.Tensor:
        """Discarded energy of the third SVD per rank, at second rank r2 (from a Gram matrix)."""
        return _tail_sq(self.lam2(r0, r1, r2, single))

    def build(
        self, bonds: Sequence[int], budget: float | None = None
    ) -> tuple[list[torch.Tensor], float]:
        """TR-SVD at shifted bonds (r0, r1, r2, r3): cores in shifted order and squared error.

        With a ``budget``, the third rank is raised if the exact spectra leave less of it than
        planned (the search plans from Gram-based spectra).
        """
        r0, r1, r2, r3 = bonds
        n = self.dims
        big_r = r0 * r1
        first = self.u[:, :big_r].reshape(n[0], r0, r1).permute(1, 0, 2)
        spent = float(self.tail[big_r])
        u1, s1, rows1 = _left_split(self.remainder1(r0, r1))
        spent += float(torch.sum(s1[r2:] ** 2))
        u2, s2, rows2 = _left_split(rows1[:r2].reshape(r2 * n[2], -1))
        tail2 = tail_energy(s2)
        if budget is not None:
            r3 = max(r3, _min_rank(tail2, budget - spent))
        cores = [
            first,
            u1[:, :r2].reshape(r1, n[1], r2),
            u2[:, :r3].reshape(r2, n[2], r3),
            rows2[:r3].reshape(r3, n[3], r0),  # the closing bond rode along last
        ]
        return cores, spent + float(tail2[r3])

    def exact_step1(self, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Singular values and ``S @ Vh`` of the second SVD by an SVD (for the paper's rule)."""
        key = (r0, r1)
        if key not in self.exact:
            _, s1, vh1 = _thin_svd(self.remainder1(r0, r1))
            self.exact[key] = (s1, s1[:, None] * vh1)
        return self.exact[key]


class _Search:
    """Sequential TR-SVD plans over the four shifts of one kernel, sharing every SVD.

    Nothing here depends on the error budget except the searches themselves, so one instance
    serves many budgets (the ratio search bisects over eps with one).
    """

    def __init__(self, weight: torch.Tensor, workers: int = 1) -> None:
        """``workers``: Python threads for independent work (the four shifts' SVDs, the paper's
        plans per shift, the seeds' rings); results do not depend on it."""
        self.weight = weight
        self.shape: KernelShape = tuple(weight.shape)  # type: ignore[assignment]
        self.norm2 = float(torch.sum(weight * weight))
        self.workers = workers
        self.shifts = _map(lambda p: _Shift.of(weight, p), range(4), workers)
        self._pair_tails: dict[bool, list[torch.Tensor]] = {}
        self.work = 0.0
        self._published: dict[tuple[float, bool], list[_Plan]] = {}

    def eps_ranks(self, budget: float) -> dict[tuple[str, int], int]:
        """Eps-ranks of the unfoldings at this budget: any ring within it has
        ``R_k * R_{k+1} >= rho["mode", k]`` (the two bonds around mode k cut its unfolding) and
        ``R_k * R_{k+2} >= rho["pair", k]`` (modes k, k+1 against the other two)."""
        slack = budget * (1 + 1e-9) + 1e-300  # a floor may be too low, never too high
        rho = {("mode", p): _min_rank(sh.tail, slack) for p, sh in enumerate(self.shifts)}
        pair_tails = self.pair_tails(budget >= _SINGLE_EPS**2 * self.norm2)
        for k in range(4):
            rho["pair", k] = _min_rank(pair_tails[k % 2], slack)
        return rho

    def pair_tails(self, single: bool) -> list[torch.Tensor]:
        """Discarded energy per rank of the unfoldings (T S | kh kw) and (S kh | kw T), which the
        bonds (R_WT, R_SH) and (R_TS, R_HW) cut. ``single``: from float32 spectra (the second is
        1536 x 1536 at 512 channels: 1.3 s in float64), lowered by 1e-5 of the energy, a margin
        far above their rounding, so the floors they give stay floors."""
        if single not in self._pair_tails:
            t, s, kh, kw = self.shape
            unfoldings = [
                self.weight.reshape(t * s, kh * kw),
                self.weight.permute(1, 2, 3, 0).reshape(s * kh, kw * t),
            ]
            if single:
                top = float(self.weight.abs().max()) or 1.0
                margin = 1e-5 * self.norm2
                self._pair_tails[single] = [
                    (
                        _tail_sq(_sq_svals((u / top).float()).double() * top * top) - margin
                    ).clamp_min(0.0)
                    for u in unfoldings
                ]
            else:
                self._pair_tails[single] = [_tail_sq(_sq_svals(u)) for u in unfoldings]
        return self._pair_tails[single]

    # -- the paper ------------------------------------------------------------------------------
    def published(self, eps: float, exact: bool = True) -> list[_Plan]:
        """The paper's plans: per shift (in order), its first rank, every divisor (ascending),
        its per-step rule (cached per eps).

        ``exact``: the later spectra by SVD, as the paper (for ``search="published"``); else
        from the search's Gram matrices, which only differ where a tail sum ties the bound to
        about 1e-16 (the tnconv search uses them as candidates and as a floor).
        """
        key = (eps, exact)
        if key in self._published:
            return self._published[key]
        delta, single = eps / math.sqrt(3), eps >= _SINGLE_EPS

        def of_shift(sh: _Shift) -> list[_Plan]:
            plans = []
            big_r = _published_rank(sh.s, delta)
            for r0 in _divisors(big_r):
                r1 = big_r // r0
                if exact:
                    s1, rows = sh.exact_step1(r0, r1)
                    r2 = _published_rank(s1, delta)
                    s2 = torch.linalg.svdvals(rows[:r2].reshape(r2 * sh.dims[2], -1))
                    r3 = _published_rank(s2, delta)
                else:
                    # the third spectrum needs S @ Vh: one eigen-decomposition for both
                    step = sh.step1(r0, r1, single, rows=True)
                    r2 = _published_rank(step.lam.sqrt(), delta)
                    r3 = _published_rank(sh.lam2(r0, r1, r2, single).sqrt(), delta)
                plans.append(_Plan(sh.p, (r0, r1, r2, r3)))
            return plans

        # each shift's spectra live on its own _Shift: the shifts can run side by side
        plans = [pl for per in _map(of_shift, self.shifts, self.workers) for pl in per]
        self._published[key] = plans
        return plans

    # -- branch and bound -----------------------------------------------------------------------
    def floors(
        self,
        cost: Cost,
        rho: dict[tuple[str, int], int],
        p: int,
        b0: int,
        b1: int,
        b2: np.ndarray,
        b3_min: np.ndarray | int = 1,
    ) -> np.ndarray:
        """Lower bounds of ``cost`` over every ring whose shifted bonds start (b0, b1, b2[i]).

        The eps-ranks floor the last bond (and so does ``b3_min``); every cost grows with every
        rank, so the cost at the smallest allowed last bond is a floor.
        """
        n = self.shifts[p].dims
        fixed = max(-(-rho["mode", (p + 3) % 4] // b0), -(-rho["pair", (p + 1) % 4] // b1), 1)
        b3 = np.maximum(np.maximum(b3_min, fixed), -(-rho["mode", (p + 2) % 4] // b2))
        b3 = np.minimum(b3, n[3] * b0)
        bonds = (np.full_like(b2, b0), np.full_like(b2, b1), b2, b3)
        return np.asarray(cost([bonds[(m - p) % 4] for m in range(4)]), dtype=np.float64)

    def branch_floor(
        self, cost: Cost, rho: dict[tuple[str, int], int], p: int, b0: int, b1: int
    ) -> float:
        """A lower bound of ``cost`` over every ring whose shifted bonds start (b0, b1)."""
        n = self.shifts[p].dims
        lo2 = max(1, -(-rho["mode", (p + 1) % 4] // b1), -(-rho["pair", p] // b0))
        hi2 = min(b1 * n[1], n[2] * n[3] * b0)
        if hi2 < lo2:
            return math.inf
        return float(self.floors(cost, rho, p, b0, b1, np.arange(lo2, hi2 + 1)).min())

    def best(
        self,
        cost: Cost,
        eps: float,
        keep: int = 1,
        max_work: float = math.inf,
        shares: Sequence[float] = _FIRST_SHARES,
        paper_plans: bool = True,
    ) -> list[_Plan]:
        """The ``keep`` cheapest distinct sequential plans found within the budget, cheapest first.

        The first is the cheapest plan of all sequential plans (every shift, every split of every
        first rank, every second rank, the smallest third rank the budget allows) unless the work
        cap stopped the search: nodes are taken in two phases, first the first ranks that spend a
        grid of shares of the budget (``shares``), then all others, best-first by floor,
        until ``max_work`` multiply-adds (counted by estimate, cached or not, so the answer does
        not depend on what an earlier search left in the caches). The paper's plans are offered
        first (``paper_plans``), so the first plan never costs more than the paper's. Ties go to
        the smaller plan (shift, then bonds).
        """
        budget = eps * eps * self.norm2
        single = eps >= _SINGLE_EPS
        rho = self.eps_ranks(budget)
        found: dict[Ranks, tuple[float, _Plan]] = {}
        top: list[float] = []  # the costs of the `keep` cheapest distinct plans, a max-heap
        work = 0.0

        def offer(plan: _Plan) -> None:
            ranks = plan.kernel_ranks()
            key = (float(cost(ranks)), plan)
            if ranks in found:
                found[ranks] = min(found[ranks], key)
                return
            found[ranks] = key
            heapq.heappush(top, -key[0])
            if len(top) > keep:
                heapq.heappop(top)

        def bar() -> float:
            """A node whose floor is above this cannot hold one of the `keep` cheapest."""
            return -top[0] if len(top) == keep else math.inf

        for plan in self.published(eps, exact=False) if paper_plans else []:
            offer(plan)
        # two kinds of node: a first split (r0, r1), whose expansion costs the second SVD, and a
        # second rank r2 under it, whose evaluation costs the third
        queue: list[tuple[int, float, int, tuple[int, int, int, int, float]]] = []
        order = itertools.count()
        evaluated: dict[tuple[int, int, int], list[int]] = {}  # second ranks evaluated per split
        for p, sh in enumerate(self.shifts):
            tail0 = sh.tail.tolist()
            grid = {_min_rank(sh.tail, share * budget) for share in shares}
            for big_r in range(1, sh.s.numel() + 1):
                if tail0[big_r] > budget:
                    continue
                phase = 0 if big_r in grid else 1
                for r0 in _divisors(big_r):
                    r1 = big_r // r0
                    floor = self.branch_floor(cost, rho, p, r0, r1)
                    heapq.heappush(queue, (phase, floor, next(order), (p, r0, r1, 0, 0.0)))
        while queue:
            phase, floor, _, node = heapq.heappop(queue)
            p, r0, r1, r2, left2 = node
            if floor > bar():
                if phase == 1:
                    break  # phase 1 is ordered by floor: every node left is hopeless too
                continue
            if phase == 1 and work > max_work:
                log.info("rsdtr: SVD search stopped at its work cap (%.3g multiply-adds)", work)
                break
            sh = self.shifts[p]
            n = sh.dims
            if r2:
                # the third matrix at r2 extends the one at any smaller second rank by rows, so
                # its energy beyond every rank is no smaller (Ky Fan): the tail at the nearest
                # smaller r2 this search evaluated floors the third rank, often enough to skip
                # this node or to put it back in the queue behind better ones
                done = evaluated.setdefault((p, r0, r1), [])
                below = bisect.bisect_left(done, r2)
                if below:
                    tail_below = sh.tail2(r0, r1, done[below - 1], single)
                    r3_min = _min_rank(tail_below, left2)
                    refined = float(self.floors(cost, rho, p, r0, r1, np.array([r2]), r3_min)[0])
                    if refined > bar():
                        continue
                    if refined > floor:
                        heapq.heappush(queue, (phase, refined, next(order), node))
                        continue
                work += _eig_work(r2 * n[2], n[3] * r0)
                bisect.insort(done, r2)
                offer(_Plan(p, (r0, r1, r2, _min_rank(sh.tail2(r0, r1, r2, single), left2))))
                continue
            work += _eig_work(r1 * n[1], n[2] * n[3] * r0)
            work += _eig_work(min(r1 * n[1], n[2] * n[3] * r0) * n[2], n[3] * r0)
            st = sh.step1(r0, r1, single)
            left1 = budget - float(sh.tail[r0 * r1])
            r2s = np.arange(1, st.lam.numel() + 1)
            left2s = left1 - st.tail.cpu().numpy()[1:]
            r2s, left2s = r2s[left2s >= 0], left2s[left2s >= 0]
            # a second rank whose floor is above the bar now stays so (the bar only falls):
            # pushing it would only pop it and drop it, so it is dropped here, and when all of
            # them are, the third spectrum (head2) is not needed at all
            if r2s.size == 0 or not (self.floors(cost, rho, p, r0, r1, r2s) <= bar()).any():
                continue
            # the third matrix at second rank r2 is a row block of the one at full rank, so its
            # leading singular values are no larger (interlacing): its energy beyond rank r is at
            # least kept(r2) - head2[r], which floors the third rank
            kept = np.cumsum(st.lam.cpu().numpy())[r2s - 1]
            head2 = sh.head2(r0, r1, single).cpu().numpy()
            r3_min = np.maximum(np.searchsorted(head2, kept - left2s, side="left"), 1)
            floors = self.floors(cost, rho, p, r0, r1, r2s, r3_min)
            limit = bar()
            for f, c2, left in zip(floors.tolist(), r2s.tolist(), left2s.tolist(), strict=True):
                if f <= limit:
                    heapq.heappush(queue, (phase, f, next(order), (p, r0, r1, c2, left)))
        self.work = work
        self.release()
        return [plan for _, plan in sorted(found.values())[:keep]]

    def release(self) -> None:
        """Drop the shifts' shared Gram matrices (up to 128 MB each; the spectra stay cached)."""
        for sh in self.shifts:
            sh.grams.clear()

    def cores(self, plan: _Plan, budget: float) -> tuple[list[torch.Tensor], float]:
        """The ring of a plan in kernel order (G_T, G_S, G_H, G_W) and its squared error.

        The third rank is the planned one, raised if the exact spectra leave less of the budget
        than the search's Gram-based estimates did (the paper's plans never need that).
        """
        shifted, sq_err = self.shifts[plan.shift].build(plan.bonds, budget)
        return _rotate_back(shifted, plan.shift), sq_err


def _dense(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The kernel (T, S, kh, kw) of a 4-core ring in kernel order, contracted in the cheapest
    pairwise order (opt_einsum's exhaustive search over the four cores)."""
    return contract_contiguous(EQUATION, cores)


def _dense_work(shape: Sequence[int], ranks: Sequence[int]) -> float:
    """Multiply-adds of forming the dense kernel of a ring (kernel order): the cheaper of the
    two pairings, (G_T G_S)(G_H G_W) or (G_S G_H)(G_W G_T)."""
    t, s, kh, kw = shape
    r_wt, r_ts, r_sh, r_hw = ranks
    dense = t * s * kh * kw
    # (R_WT, T, S, R_SH) x (R_SH, kh, kw, R_WT), closing over R_SH and R_WT
    first = r_wt * t * r_ts * s * r_sh + r_sh * kh * r_hw * kw * r_wt + dense * r_sh * r_wt
    # (R_TS, S, kh, R_HW) x (R_HW, kw, T, R_TS), closing over R_HW and R_TS
    second = r_ts * s * r_sh * kh * r_hw + r_hw * kw * r_wt * t * r_ts + dense * r_hw * r_ts
    return float(min(first, second))


def _error(weight: torch.Tensor, cores: Sequence[torch.Tensor]) -> float:
    """Relative Frobenius error of a 4-core ring (kernel order) against ``weight``."""
    return float(
        torch.linalg.vector_norm(weight - _dense(cores)) / torch.linalg.vector_norm(weight)
    )


def _rotate_back(shifted: Sequence[torch.Tensor], p: int) -> list[torch.Tensor]:
    """Cores of a ring fitted to the tensor shifted to start at mode p, in kernel mode order."""
    return [shifted[(m - p) % 4].contiguous() for m in range(4)]


def _ranks_of(cores: Sequence[torch.Tensor]) -> Ranks:
    return tuple(int(c.shape[0]) for c in cores)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# refinement: ALS at fixed ranks, then bond shrinking under the bound
# ---------------------------------------------------------------------------------------------
@dataclass
class _Budget:
    """Multiply-adds left for ALS."""

    left: float


class _RingALS:
    """Alternating least squares on a 4-core ring fitted to one kernel.

    Each core update is an exact least-squares solve; its error comes from the normal equations
    (``||W||^2 - 2 <G, rhs> + <G Gram, G>``), so no update needs the dense ring. An update that
    does not lower the error is rejected, so the error never rises.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.norm2 = float(torch.sum(weight * weight))
        self.unfoldings = [
            weight.permute([(k + j) % 4 for j in range(4)]).reshape(weight.shape[k], -1)
            for k in range(4)
        ]

    def sweep_work(self, ranks: Sequence[int]) -> float:
        """Multiply-adds of one sweep at these ranks (environment, Gram, right side, solve)."""
        total = self.weight.numel()
        work = 0.0
        for k in range(4):
            n_k = self.weight.shape[k]
            unknowns = ranks[k] * ranks[(k + 1) % 4]
            rows = total // n_k
            work += rows * unknowns * (unknowns + n_k + max(ranks)) + unknowns**3
        return work

    def _update(self, cores: list[torch.Tensor], k: int) -> tuple[torch.Tensor, float]:
        env = cores[(k + 1) % 4]
        for j in (2, 3):
            env = torch.tensordot(env, cores[(k + j) % 4], dims=([env.ndim - 1], [0]))
        rk1, rk = env.shape[0], env.shape[-1]
        # W_k (I_k, M) ~= G_k (I_k, r_k * r_{k+1}) @ Z^T with Z[J, (a, b)] = env[b, J, a]
        z = env.reshape(rk1, -1, rk).permute(1, 2, 0).reshape(-1, rk * rk1)
        gram = z.T @ z
        rhs = self.unfoldings[k] @ z
        ridge = 1e-13 * float(torch.diagonal(gram).max().clamp_min(1e-300))
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        g = torch.linalg.solve(gram + ridge * eye, rhs.T).T
        err2 = self.norm2 - 2.0 * float(torch.sum(g * rhs)) + float(torch.sum((g @ gram) * g))
        core = g.reshape(self.weight.shape[k], rk, rk1).permute(1, 0, 2).contiguous()
        return core, err2

    def run(
        self,
        cores: list[torch.Tensor],
        sweeps: int,
        budget: _Budget,
        tol: float = 1e-4,
        error: float | None = None,
    ) -> tuple[list[torch.Tensor], float]:
        """Up to ``sweeps`` sweeps the budget pays for (stopping when one gains less than the
        fraction ``tol``); returns the cores and their relative error.

        ``error``: the cores' relative error if the caller knows it. Unknown, the first update
        is taken unconditionally (an exact least-squares solve for its core cannot be worse than
        the core it replaces, up to rounding) and the dense ring is formed only if no update ran.
        """
        cores = list(cores)
        if self.norm2 == 0.0:
            return cores, 0.0
        err2 = math.inf if error is None else error**2 * self.norm2
        per_sweep = self.sweep_work(_ranks_of(cores))
        for _ in range(sweeps):
            if per_sweep > budget.left or err2 <= 1e-26 * self.norm2:
                break
            budget.left -= per_sweep
            start = err2
            for k in range(4):
                core, new2 = self._update(cores, k)
                if new2 <= err2:
                    cores[k], err2 = core, new2
            if math.isfinite(start) and start - err2 <= tol * start:
                break
        if math.isinf(err2):
            budget.left -= _dense_work(self.weight.shape, _ranks_of(cores))
            err2 = _error(self.weight, cores) ** 2 * self.norm2
        return cores, math.sqrt(max(err2, 0.0) / self.norm2)


def _truncate_bond(cores: list[torch.Tensor], k: int, rank: int) -> list[torch.Tensor]:
    """Lower bond k (left of core k) to ``rank`` by a truncated SVD of the two cores it joins.

    The SVD of the joined pair ``A (r_a n_a, r) @ B (r, n_b r_b)`` is taken through thin QRs of
    both sides, so only an (r, r) matrix is decomposed.
    """
    a, b = cores[(k - 1) % 4], cores[k]
    ra, na, r = a.shape
    _, nb, rb = b.shape
    qa, fa = torch.linalg.qr(a.reshape(ra * na, r))
    qb, fb = torch.linalg.qr(b.reshape(r, nb * rb).T)
    u, s, vh = _thin_svd(fa @ fb.T)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    out = list(cores)
    out[(k - 1) % 4] = (qa @ (u[:, :rank] * root)).reshape(ra, na, rank)
    out[k] = ((root[:, None] * vh[:rank]) @ qb.T).reshape(rank, nb, rb)
    return out


def _shrink(
    als: _RingALS,
    cores: list[torch.Tensor],
    error: float,
    eps: float,
    cost: Cost,
    sweeps: int,
    budget: _Budget,
) -> list[torch.Tensor]:
    """ALS at the ring's ranks (``error``: the ring's relative error, at most ``eps``), then
    repeatedly lower the bond that saves most whose re-fitted ring still meets ``eps`` (measured
    on the dense ring); returns the last ring that met it."""
    cores, _ = als.run(cores, sweeps, budget, error=error)
    while True:
        ranks = _ranks_of(cores)
        savings = []
        for k in range(4):
            if ranks[k] > 1:
                smaller = list(ranks)
                smaller[k] -= 1
                savings.append((float(cost(ranks)) - float(cost(smaller)), k))
        for saving, k in sorted(savings, reverse=True):
            if saving <= 0:
                continue
            trial = _truncate_bond(cores, k, ranks[k] - 1)
            if _ranks_of(trial)[k] == ranks[k]:
                continue
            # a trial ends in one or two dense checks: stop when the work cap cannot pay them
            check = _dense_work(als.weight.shape, _ranks_of(trial))
            if budget.left < 2 * check:
                return cores
            # one sweep recovers most of what ALS will: a trial still well above the bound after
            # it is dropped without paying for the rest
            trial, err = als.run(trial, 1, budget)
            if err > eps * _SHRINK_GIVE_UP:
                continue
            trial, err = als.run(trial, _SHRINK_SWEEPS - 1, budget, error=err)
            budget.left -= check if err <= eps else 0.0
            if err <= eps and _error(als.weight, trial) <= eps:
                cores = trial
                break
        else:
            return cores


# ---------------------------------------------------------------------------------------------
# the decomposition
# ---------------------------------------------------------------------------------------------
@register("rsdtr")
class RSDTR(Decomposition):
    """Reduced-storage direct tensor ring over (T, S, kh, kw). Ranks (R_WT, R_TS, R_SH, R_HW)."""

    rank_order = "(R_WT, R_TS, R_SH, R_HW): the bonds kw-T (closing), T-S, S-kh, kh-kw"
    guarantees_eps = True
    Options = RSDTROptions

    def __init__(self) -> None:
        # the ratio search evaluates many eps on one kernel: it shares one _Search among them
        self._shared: _Search | None = None

    def bond_ranks(self, rank: int | tuple[int, ...], shape: KernelShape) -> tuple[int, ...]:
        # the fit builds the ring from whichever of the four shifts carries the ranks, as the
        # search does: ranks some shift carries are kept as they are (those of any ring the
        # search found among them), others capped as shift 0 caps them
        asked = self.expand_ranks(rank, 4)
        for p in range(4):
            dims = tuple(shape[(p + j) % 4] for j in range(4))
            rotated = tuple(asked[(p + j) % 4] for j in range(4))
            if cap_ring_ranks(rotated, dims) == rotated:  # type: ignore[arg-type]
                return asked
        return self.log_capped(asked, cap_ring_ranks(asked, shape))

    def num_params_at(self, shape: KernelShape, ranks: tuple[int, ...]) -> int:
        return ring_params(shape, ranks)

    def search_options(self, options: RSDTROptions) -> RSDTROptions:
        return options.model_copy(
            update={
                "als_sweeps": 0,
                "refine": False,
                "search_max_gflop": 0.0,
                "first_shares": _QUICK_SHARES,
                "paper_plans": False,
            }
        )

    def _search_for(self, weight: torch.Tensor, workers: int = 1) -> _Search:
        shared = self._shared
        if shared is not None and shared.weight is weight:
            shared.workers = workers
            return shared
        # one set of SVDs per kernel, shared by every fit on it (factorize_many, searches)
        search = cached(weight, "rsdtr-search", lambda: _Search(weight, workers))
        search.workers = workers
        return search

    def _make(
        self,
        weight: torch.Tensor,
        cores: list[torch.Tensor],
        options: RSDTROptions,
        sq_err: float | None = None,
        **info: object,
    ) -> Factorization:
        """The factorization of these cores; ``sq_err``: their squared error when it is known
        exactly (a sequential TR-SVD's discarded energy), else it is measured on the dense ring.
        """
        shape: KernelShape = tuple(weight.shape)  # type: ignore[assignment]
        ranks = _ranks_of(cores)
        norm2 = float(torch.sum(weight * weight))
        if sq_err is None or norm2 == 0.0:
            fit_error = _error(weight, cores)
        else:
            fit_error = math.sqrt(max(sq_err, 0.0) / norm2)
        return self.make(
            [c.contiguous() for c in cores],
            EQUATION,
            shape,
            ranks,
            fit_error=fit_error,
            pipeline_flops=pipeline_flops(shape, ranks, options.input_size, options.stride),
            input_size=list(options.input_size),
            stride=list(options.stride),
            **info,
        )

    # -- fixed ranks ------------------------------------------------------------------------------
    def fit(
        self, weight: torch.Tensor, ranks: tuple[int, ...], options: RSDTROptions
    ) -> Factorization:
        """TR-SVD at these ranks from every shift whose SVDs can carry them; the most accurate
        ring is refined by ALS (single-threaded, see :func:`_one_thread`)."""
        with _one_thread(weight):
            return self._fit_fixed(weight, ranks, options)

    def _fit_fixed(
        self, weight: torch.Tensor, ranks: tuple[int, ...], options: RSDTROptions
    ) -> Factorization:
        search = self._search_for(weight)
        best: tuple[float, int, list[torch.Tensor]] | None = None
        for sh in search.shifts:
            p, n = sh.p, sh.dims
            r0, r1, r2, r3 = (ranks[(p + j) % 4] for j in range(4))
            if (
                r0 * r1 > min(n[0], n[1] * n[2] * n[3])
                or r2 > min(r1 * n[1], n[2] * n[3] * r0)
                or r3 > min(r2 * n[2], n[3] * r0)
            ):
                continue  # this shift's SVDs cannot carry these ranks
            shifted, err = sh.build((r0, r1, r2, r3))
            if best is None or err < best[0]:
                best = (err, p, _rotate_back(shifted, p))
        assert best is not None  # some shift carries every rank tuple bond_ranks lets through
        sq_err, shift, cores = best
        if options.als_sweeps:
            budget, als = _Budget(options.als_max_gflop * 1e9), _RingALS(weight)
            error = math.sqrt(max(sq_err, 0.0) / als.norm2) if als.norm2 else 0.0
            cores, _ = als.run(cores, options.als_sweeps, budget, error=error)
            return self._make(weight, cores, options, shift=shift)
        return self._make(weight, cores, options, sq_err, shift=shift)

    # -- error bound --------------------------------------------------------------------------
    def fit_eps(self, weight: torch.Tensor, eps: float, options: RSDTROptions) -> Factorization:
        """The cheapest ring within eps (see the module docstring).

        Torch's intra-op pool is held at one thread whatever the kernel's size (see
        :func:`_one_thread`); the caller's threads run independent parts side by side instead
        (see :func:`_map`). With the pool kept, a 512x512x3x3 search at eps 0.3 on a busy 2-core
        machine took 156 s on two threads against 29 s on one.
        """
        with _one_thread() as threads:
            return self._fit_eps(weight, eps, options, threads)

    def _fit_eps(
        self, weight: torch.Tensor, eps: float, options: RSDTROptions, workers: int = 1
    ) -> Factorization:
        shape: KernelShape = tuple(weight.shape)  # type: ignore[assignment]
        search = self._search_for(weight, workers)
        budget = eps * eps * search.norm2
        if budget == 0.0:  # a zero kernel: the smallest ring represents it exactly
            zeros = [weight.new_zeros(1, n, 1) for n in shape]
            return self._make(weight, zeros, options, shift=0, search=options.search)

        def params(r: Sequence) -> float | np.ndarray:
            return ring_params(shape, r)

        if options.search == "published":
            # the paper keeps the first ring with strictly fewer parameters: shift, then divisor
            paper = min(search.published(eps), key=lambda pl: params(pl.kernel_ranks()))
            cores, sq_err = search.cores(paper, budget)
            return self._make(weight, cores, options, sq_err, shift=paper.shift, search="published")

        def flops(r: Sequence) -> float | np.ndarray:
            return _pipeline_macs(shape, r, options.input_size, options.stride)

        found = self._search_and_refine(search, eps, params, options)
        if options.objective == "flops":
            # the parameter-optimal ring is a candidate too, so FLOPs never exceed its FLOPs
            lean = self._search_and_refine(search, eps, flops, options)
            found = min(
                (lean, found),
                key=lambda c: (flops(_ranks_of(c[0][1])), params(_ranks_of(c[0][1]))),
            )
        (plan, cores, sq_err), exhaustive = found
        return self._make(
            weight,
            cores,
            options,
            sq_err,
            shift=plan.shift,
            search="tnconv",
            sequential_ranks=list(plan.kernel_ranks()),
            search_exhaustive=exhaustive,
        )

    def _search_and_refine(
        self, search: _Search, eps: float, cost: Cost, options: RSDTROptions
    ) -> tuple[tuple[_Plan, list[torch.Tensor], float | None], bool]:
        """The cheapest ring within eps under ``cost``: SVD search, then refinement of the
        cheapest few. Returns ((the sequential plan it came from, cores, their squared error if
        known without the dense ring), search exhaustive?)."""
        budget = eps * eps * search.norm2
        cap = options.search_max_gflop * 1e9
        keep = options.refine_seeds if options.refine else 1
        seeds = search.best(cost, eps, keep, cap, options.first_shares, options.paper_plans)
        # refinement only shrinks: a seed far above the cheapest is not worth its ALS work. Rings
        # with a unit bond are trains, for which the sequential SVD is already near optimal
        # (ALS rarely frees a bond); closed rings gain most, so they go first.
        cheapest = float(cost(seeds[0].kernel_ranks())) if seeds else math.inf
        seeds = [pl for pl in seeds if float(cost(pl.kernel_ranks())) <= _SEED_SLACK * cheapest]
        seeds.sort(key=lambda pl: (min(pl.bonds) == 1, float(cost(pl.kernel_ranks())), pl))
        exhaustive = search.work <= cap
        candidates = []  # (plan, cores, squared error)
        rings = _map(lambda pl: search.cores(pl, budget), seeds, search.workers)
        for plan, (cores, sq_err) in zip(seeds, rings, strict=True):
            if sq_err <= budget and float(cost(_ranks_of(cores))) <= float(
                cost(plan.kernel_ranks())
            ):
                candidates.append((plan, cores, sq_err))
            else:  # rounding in the search's spectra cost this plan its edge
                log.debug("rsdtr: plan %s does not hold with exact SVDs; skipped", plan)
        # the paper's plans hold with exact SVDs: the best of them backs up seeds that lost their
        # edge to rounding, so the answer never costs more than the paper's
        if options.paper_plans or not candidates:
            paper = min(
                search.published(eps, exact=False), key=lambda pl: float(cost(pl.kernel_ranks()))
            )
            if all(
                float(cost(_ranks_of(c))) > float(cost(paper.kernel_ranks()))
                for _, c, _ in candidates
            ):
                candidates.append((paper, *search.cores(paper, budget)))
        search.release()  # the paper's plans may have been computed here
        if options.refine:
            als, work = _RingALS(search.weight), _Budget(options.als_max_gflop * 1e9)
            candidates = [
                (plan, _shrink(als, c, math.sqrt(sq / search.norm2), eps, cost, sweeps, work), None)
                for plan, c, sq in candidates
                for sweeps in [options.als_sweeps]
            ]
        return min(candidates, key=lambda pc: float(cost(_ranks_of(pc[1])))), exhaustive

    # -- parameter budget ---------------------------------------------------------------------
    def fit_ratio(self, weight: torch.Tensor, budget: int, options: RSDTROptions) -> Factorization:
        """The generic search (eps bisection + uniform ranks, grown within the budget), with one
        shared set of SVDs for all the eps and ranks it tries on this kernel."""
        with _one_thread(weight):
            self._shared = _Search(weight)
            try:
                return super().fit_ratio(weight, budget, options)
            finally:
                self._shared = None
