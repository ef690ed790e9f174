"""Small linear-algebra helpers shared by the decompositions (torch, any device).

Everything here runs on the tensor's own device and dtype: no transfer to the CPU, no numpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch

from .._modes import tensor_version

__all__ = [
    "balance_scales",
    "cached",
    "leading_left_vectors",
    "mode_unfold",
    "rank_for_budget",
    "svd",
    "sym_eig_desc",
    "tail_energy",
]

V = TypeVar("V")

_MEMO_ATTR = "_tnconv_memo"


def cached(tensor: torch.Tensor, key: Hashable, compute: Callable[[], V]) -> V:
    """``compute()``, remembered for as long as ``tensor`` lives and is not modified in place.

    Lets the candidates of one search (every eps of a bisection, every rank of a budget
    allocation) share the expensive spectra of one kernel: one decomposition, many truncations.
    The memo is an attribute of the tensor object itself, so it dies with it.

    An inference tensor (made under ``torch.inference_mode``) has no version counter, so an
    in-place change to it could not be detected: nothing is remembered for it, ``compute()`` runs
    every time. ``Decomposition.factorize`` fits on an ordinary float64 copy, so its searches keep
    the memo whatever mode the caller is in.
    """
    version = tensor_version(tensor)
    if version is None:
        return compute()
    memo = getattr(tensor, _MEMO_ATTR, None)
    if memo is None or memo[0] != version:
        memo = (version, {})
        setattr(tensor, _MEMO_ATTR, memo)
    store: dict[Hashable, Any] = memo[1]
    if key not in store:
        store[key] = compute()
    return store[key]


def svd(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``mat = U @ diag(S) @ Vh`` with singular values in descending order.

    A long matrix (one side 4x the other or more) goes through a QR of the long side first:
    LAPACK's divide-and-conquer SVD of such a matrix was measured many times slower than the QR
    plus the SVD of the small triangular factor, and the result is the same factorization.
    """
    m, n = mat.shape
    if m >= 4 * n:
        q, r = torch.linalg.qr(mat)
        u, s, vh = torch.linalg.svd(r)
        return q @ u, s, vh
    if n >= 4 * m:
        q, r = torch.linalg.qr(mat.T)
        u, s, vh = torch.linalg.svd(r)
        return vh.T, s, (q @ u).T
    return torch.linalg.svd(mat, full_matrices=False)


def sym_eig_desc(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of a symmetric PSD matrix."""
    lam, vecs = torch.linalg.eigh(gram)
    return torch.flip(lam, (0,)).clamp_min(0.0), torch.flip(vecs, (1,))


def tail_energy(s: torch.Tensor) -> torch.Tensor:
    """``tail[r] = sum(s[r:]**2)`` for r = 0..len(s) (so ``tail[len(s)] == 0``)."""
    sq = s.to(torch.float64) ** 2
    tail = torch.flip(torch.cumsum(torch.flip(sq, (0,)), 0), (0,))
    return torch.cat([tail, tail.new_zeros(1)])


def rank_for_budget(s: torch.Tensor, budget_sq: float) -> int:
    """Smallest rank r >= 1 whose discarded energy ``sum(s[r:]**2)`` is at most ``budget_sq``."""
    tail = tail_energy(s)
    ok = torch.nonzero(tail <= budget_sq).flatten()
    r = int(ok[0]) if ok.numel() else len(s)
    return max(1, r)


def mode_unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: ``(I_mode, prod of the other sizes)``, others in their order."""
    return torch.movedim(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def leading_left_vectors(mat: torch.Tensor, r: int) -> torch.Tensor:
    """The ``r`` leading left singular vectors of ``mat`` (``r <= mat.shape[0]``).

    For a wide matrix (m rows <= n columns) they are the leading eigenvectors of the m x m Gram
    matrix, several times cheaper than an SVD (only the leading subspace is needed, and in
    float64 squaring the spectrum costs nothing that matters for it).
    """
    m, n = mat.shape
    if m <= n:
        _, vecs = torch.linalg.eigh(mat @ mat.T)
        return torch.flip(vecs[:, m - r :], (1,))
    u, _, _ = svd(mat)
    return u[:, :r]


def balance_scales(factors: list[torch.Tensor], spread: float = 1e6) -> list[torch.Tensor]:
    """The same network with every factor at the geometric mean of their Frobenius norms, when
    the largest norm exceeds ``spread`` times the smallest (else the factors as they are).

    Multiplying the factors of an einsum network by scalars whose product is 1 leaves the
    network unchanged; equal norms keep every factor far from underflow and overflow (a ring
    fitted in float64 with cores at 1e-51 and 1e+25 reconstructs fine there, but its float32
    copy is zero). Factors with a zero or non-finite norm are returned as they are."""
    norms = [float(torch.linalg.vector_norm(c)) for c in factors]
    if min(norms) <= 0.0 or not all(math.isfinite(n) for n in norms):
        return factors
    if max(norms) <= spread * min(norms):
        return factors
    log_mean = sum(math.log(n) for n in norms) / len(norms)
    return [c * math.exp(log_mean - math.log(n)) for c, n in zip(factors, norms, strict=True)]
