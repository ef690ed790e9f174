"""Small linear-algebra helpers shared by the decompositions (torch, float64)."""

from __future__ import annotations

import torch

__all__ = ["leading_left_vectors", "mode_unfold", "rank_for_budget", "svd", "tail_energy"]


def svd(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``mat = U @ diag(S) @ Vh`` with singular values in descending order."""
    return torch.linalg.svd(mat, full_matrices=False)


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
