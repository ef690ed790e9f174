"""The published RSDTR search, re-implemented from its description as a reference oracle.

Gabor & Zdunek's RSDTR (code: mateuszgabor/rsdtr_compression) factorizes a conv kernel
``W (T, S, kh, kw)`` with the search of Mickelin & Karaman's ``TRcheckall``:

* for every circular shift of the modes, ``(T, S, kh, kw)``, ``(S, kh, kw, T)``,
  ``(kh, kw, T, S)``, ``(kw, T, S, kh)``:
  * SVD the first unfolding and take its truncation rank ``R`` at the bound
    ``eps / sqrt(3) * ||singular values||``;
  * for every divisor ``r0`` of ``R`` (ascending), run TR-SVD with closing rank ``r0``: three
    sequential SVDs, each truncated at ``eps / sqrt(3)`` times the norm of the matrix it factors
    (the current remainder, not the original kernel), the first one recomputed for every
    divisor as the published code does;
  * keep the ring with the fewest parameters (strictly fewer replaces; ties keep the first);
* rotate the winning ring back so the cores are in the kernel's mode order.

The truncation rule is the published one: drop the longest tail of singular values whose squared
sum is *strictly* below the bound squared.

This file is written independently of ``tnconv`` (it imports nothing from it) so that tests and
``benchmarks/rsdtr_vs_published.py`` can check tnconv's ``rsdtr`` against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["PublishedRing", "published_rsdtr", "ring_dense", "truncation_rank"]


@dataclass
class PublishedRing:
    """Result of the published search.

    Attributes:
        cores: ``[G_T (R_WT, T, R_TS), G_S (R_TS, S, R_SH), G_H (R_SH, kh, R_HW),
            G_W (R_HW, kw, R_WT)]``, float64.
        ranks: ``(R_WT, R_TS, R_SH, R_HW)``.
        shift: index of the mode the winning ring's decomposition started from (0 = T).
        closing_rank: the divisor ``r0`` chosen for the winning shift.
        params: number of entries of the cores.
    """

    cores: list[torch.Tensor]
    ranks: tuple[int, int, int, int]
    shift: int
    closing_rank: int
    params: int


def truncation_rank(s: torch.Tensor, bound: float) -> int:
    """Rank kept when dropping the longest tail of ``s`` with ``sum(tail**2) < bound**2``."""
    tail = torch.cumsum(torch.flip(s, (0,)) ** 2, 0)  # tail[k] = energy of the last k+1 values
    dropped = int(torch.count_nonzero(tail < bound * bound))
    return s.numel() - dropped


def _tr_svd(x: torch.Tensor, eps: float, r0: int) -> list[torch.Tensor]:
    """TR-SVD of a d-way tensor with closing rank ``r0`` (a divisor of the first rank)."""
    dims = list(x.shape)
    d = len(dims)
    delta = eps / math.sqrt(d - 1)
    u, s, vh = torch.linalg.svd(x.reshape(dims[0], -1), full_matrices=False)
    big_r = truncation_rank(s, delta * float(torch.linalg.vector_norm(s)))
    r1 = big_r // r0
    # column a0 * r1 + a1 of U becomes G_0[a0, :, a1]
    cores = [u[:, :big_r].reshape(dims[0], r0, r1).permute(1, 0, 2)]
    carry = (s[:big_r, None] * vh[:big_r]).reshape(r0, r1, -1)
    carry = carry.permute(1, 2, 0)  # (r1, I_1 ... I_{d-1}, r0): the closing bond moves last
    left = r1
    for k in range(1, d - 1):
        u, s, vh = torch.linalg.svd(carry.reshape(left * dims[k], -1), full_matrices=False)
        r = truncation_rank(s, delta * float(torch.linalg.vector_norm(s)))
        cores.append(u[:, :r].reshape(left, dims[k], r))
        carry = s[:r, None] * vh[:r]
        left = r
    cores.append(carry.reshape(left, dims[-1], r0))
    return cores


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def published_rsdtr(weight: torch.Tensor, eps: float) -> PublishedRing:
    """The published RSDTR search on a kernel (T, S, kh, kw) at relative error bound ``eps``."""
    w = torch.as_tensor(weight).detach().to(torch.float64)
    d = w.ndim
    delta = eps / math.sqrt(d - 1)
    best: tuple[int, list[torch.Tensor], int, int] | None = None
    for shift in range(d):
        order = [(shift + j) % d for j in range(d)]
        x = w.permute(order).contiguous()
        # the published code takes a full SVD here too, then recomputes it for every divisor
        _, s, _ = torch.linalg.svd(x.reshape(x.shape[0], -1), full_matrices=False)
        big_r = truncation_rank(s, delta * float(torch.linalg.vector_norm(s)))
        for r0 in _divisors(big_r):
            cores = _tr_svd(x, eps, r0)
            size = sum(c.numel() for c in cores)
            if best is None or size < best[0]:
                best = (size, cores, shift, r0)
    assert best is not None
    size, cores, shift, r0 = best
    # cores[j] carries mode (shift + j) % d: put mode m's core at position m
    back = [cores[(m - shift) % d] for m in range(d)]
    ranks = tuple(int(c.shape[0]) for c in back)
    return PublishedRing(back, ranks, shift, r0, size)  # type: ignore[arg-type]


def ring_dense(cores: list[torch.Tensor]) -> torch.Tensor:
    """The tensor a ring of cores ``(r_k, I_k, r_{k+1})`` represents."""
    acc = cores[0]
    for core in cores[1:]:
        acc = torch.tensordot(acc, core, dims=([acc.ndim - 1], [0]))
    return torch.diagonal(acc, dim1=0, dim2=acc.ndim - 1).sum(-1)
