"""Sensitivity-constrained least squares: the update behind stabilised CP and TC.

Phan et al. (ECCV 2020) stabilise a CP fit by minimising its sensitivity
``ss = sum_n ||dW/dG_n||_F^2`` subject to the approximation error staying within a bound
``||W - W_hat||_F <= delta``, one factor at a time. With the other factors fixed, the kernel is
linear in factor n (``W_(n) ~= G Z^T``) and ``ss`` is a quadratic form in G
(``ss = const + tr(G D G^T)``, D positive semi-definite), so each update is

    minimise tr(G D G^T)  subject to  ||W_(n) - G Z^T||_F^2 <= delta^2,

a quadratically constrained least-squares problem. Its solution is the ridge-like
``G(lam) = W_(n) Z (Z^T Z + lam D)^-1`` with the multiplier ``lam >= 0`` chosen so that the error
meets the bound with equality (or ``lam -> 0``, the plain least-squares update, when even that
misses it). With ``D = L L^T`` and ``L^-1 Z^T Z L^-T = Q diag(mu) Q^T``, both the error and the
penalty are scalar functions of ``lam`` (``P = W_(n) Z L^-T Q``, ``p_r = ||P[:, r]||^2``):

    err^2(lam) = ||W||^2 - sum_r p_r (mu_r + 2 lam) / (mu_r + lam)^2     (increasing in lam)
    pen(lam)   = sum_r p_r / (mu_r + lam)^2                              (decreasing in lam)

so ``lam`` is found by bisection on ``log(lam)`` at the cost of one eigendecomposition. The
derivation is ours (from the definitions; the paper's text was not available here).
"""

from __future__ import annotations

import math

import torch

__all__ = ["constrained_update", "least_squares_scale"]


_GRID = 64  # points per round of the multiplier search


def least_squares_scale(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """The scalar c minimising ``||W - c * approx||_F``: ``<W, approx> / ||approx||^2``.

    The constrained updates shrink the approximation (like a ridge); multiplying it back by c
    lowers the error and undoes the shrinkage (a layer followed by batch norm in eval mode keeps
    its output scale), at the price of a factor ``c^(2(N-1)/N)`` on an N-factor sensitivity.
    """
    den = float(torch.sum(approx * approx))
    return float(torch.sum(weight * approx)) / den if den > 0 else 1.0


def constrained_update(
    wz: torch.Tensor,
    gram: torch.Tensor,
    penalty: torch.Tensor,
    norm_sq: float,
    max_err_sq: float,
) -> torch.Tensor:
    """The factor minimising ``tr(G D G^T)`` with ``||W_(n) - G Z^T||^2 <= max_err_sq``.

    Args:
        wz: ``W_(n) @ Z``, shape (I_n, R) (the MTTKRP for CP).
        gram: ``Z^T Z``, shape (R, R).
        penalty: D, the (R, R) positive semi-definite matrix of the sensitivity terms in G, or
            its diagonal (R,) where D is diagonal (CP's).
        norm_sq: ``||W||_F^2``.
        max_err_sq: the squared absolute error allowed.

    Returns:
        G, shape (I_n, R). When the bound cannot be met the plain least-squares update.
    """
    r = gram.shape[0]
    diagonal = penalty.dim() == 1
    scale = float((penalty if diagonal else torch.diagonal(penalty)).abs().max().clamp_min(1e-300))
    if diagonal:  # L = diag(sqrt(D)): the triangular solves are scalings
        root = torch.sqrt(penalty + 1e-10 * scale)
        m = gram / root[:, None] / root[None, :]
    else:
        eye = torch.eye(r, dtype=gram.dtype, device=gram.device)
        chol = torch.linalg.cholesky(penalty + 1e-10 * scale * eye)
        half = torch.linalg.solve_triangular(chol, gram, upper=False)
        m = torch.linalg.solve_triangular(chol, half.T, upper=False)
    # M = L^-1 (Z^T Z) L^-T, symmetric PSD
    mu, q = torch.linalg.eigh((m + m.T) / 2)
    mu = mu.clamp_min(0.0)
    # P = wz L^-T Q
    white = wz / root if diagonal else torch.linalg.solve_triangular(chol, wz.T, upper=False).T
    p_mat = white @ q
    p = torch.sum(p_mat * p_mat, dim=0)
    floor = 1e-12 * float(mu.max().clamp_min(1e-300))

    def err_sq(log_lams: torch.Tensor) -> torch.Tensor:
        lam = torch.exp(log_lams)[:, None]
        den = mu + lam
        return norm_sq - torch.sum(p * (mu + 2 * lam) / (den * den), dim=1)

    def err_at(log_lam: float) -> float:
        return float(err_sq(torch.tensor([log_lam], dtype=mu.dtype, device=mu.device))[0])

    lam = floor
    if err_at(math.log(floor)) < max_err_sq:
        lo, hi = math.log(floor), math.log(max(float(mu.max()), floor))
        while err_at(hi) < max_err_sq and hi < lo + 200:
            hi += 5.0
        # err^2 increases with lam: the largest feasible log(lam) on a grid of the bracket,
        # four rounds of 64 points (the bracket shrinks 63-fold per round; one vectorised
        # evaluation per round instead of one per bisection step)
        for _ in range(4):
            grid = torch.linspace(lo, hi, _GRID, dtype=mu.dtype, device=mu.device)
            feasible = (err_sq(grid) <= max_err_sq).nonzero()
            k = int(feasible[-1]) if len(feasible) else 0
            lo, hi = float(grid[k]), float(grid[min(k + 1, _GRID - 1)])
        lam = math.exp(lo)
    sol = (p_mat / (mu + lam)) @ q.T  # (I_n, R) in the whitened basis
    if diagonal:
        return sol / root
    return torch.linalg.solve_triangular(chol.T, sol.T, upper=True).T
