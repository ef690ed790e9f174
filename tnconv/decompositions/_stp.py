"""Semi-tensor product (STP) algebra (Cheng's left STP, as used by Zhao et al., arXiv 2109.15200).

* :func:`left_stp` -- ``A ⋉ B = (A ⊗ I_{l/n})(B ⊗ I_{l/p})`` for ``A`` (m x n), ``B`` (p x q),
  ``l = lcm(n, p)``; when ``n = t p`` it is ``A (B ⊗ I_t)``, and when ``n = p`` the ordinary
  product.
* :func:`stp_mode_product` -- the semi-tensor mode-n product ``X ⋉_n U = X ×_n (U ⊗ I_t)`` for a
  factor ``U`` (J x K) and a mode of size ``I_n = t K``: the factor is t x t times smaller than
  the ordinary mode-n factor ``U ⊗ I_t`` (tJ x tK) it stands for.
* :func:`move_inner_factor` -- the index bookkeeping that turns every semi-tensor network of a
  kernel into a classical one: an identity Kronecker ``⊗ I_t`` is an index of size t that one
  factor shares with the result, so it can be moved from one mode of the tensor to another.

The Kronecker products here are explicit only in the oracles (:func:`kron_identity`); the
networks in :mod:`tnconv.decompositions.stp` carry the identity as a shared einsum index.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "kron_identity",
    "left_stp",
    "move_inner_factor",
    "stp_mode_product",
]


def kron_identity(a: torch.Tensor, t: int) -> torch.Tensor:
    """``A ⊗ I_t`` for ``A`` (m x n): shape (m t, n t), ``[(i,x),(j,y)] = A[i,j] δ_xy``."""
    eye = torch.eye(t, dtype=a.dtype, device=a.device)
    return torch.kron(a.contiguous(), eye)  # torch.kron fails on some strided views


def left_stp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Left semi-tensor product of matrices ``A`` (m x n) and ``B`` (p x q).

    ``A ⋉ B = (A ⊗ I_{l/n}) (B ⊗ I_{l/p})`` with ``l = lcm(n, p)``; shape (m l/n, q l/p).
    Computed without forming the Kronecker products: for ``n = t p`` it is
    ``A (B ⊗ I_t)``, i.e. ``[i, (j, x)] = sum_k A[i, (k, x)] B[k, j]``, and symmetrically for
    ``p = t n``; the general case reduces to both.
    """
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"left_stp takes matrices; got shapes {tuple(a.shape)}, {tuple(b.shape)}")
    n, (p, q) = a.shape[1], b.shape
    lcm = math.lcm(n, p)
    ta, tb = lcm // n, lcm // p
    if ta > 1:  # A ⊗ I_ta: entry [(i,x),(k,y)] = A[i,k] δ_xy
        a = kron_identity(a, ta)
    # a is (m ta, lcm), lcm = tb p: a (B ⊗ I_tb) = sum_k a[:, (k, x)] B[k, j] -> [., (j, x)]
    rows = a.shape[0]
    out = torch.einsum("ikx,kj->ijx", a.reshape(rows, p, tb), b)
    return out.reshape(rows, q * tb)


def stp_mode_product(x: torch.Tensor, u: torch.Tensor, mode: int) -> torch.Tensor:
    """Semi-tensor mode-``mode`` product ``X ⋉_n U = X ×_n (U ⊗ I_t)``.

    Args:
        x: tensor whose mode ``mode`` has size ``I_n = t K``.
        u: factor (J, K) with K dividing ``I_n``; ``t = I_n / K``.

    Returns:
        The tensor with mode ``mode`` of size ``J t``: entry ``[.., (j, a), ..] =
        sum_k U[j, k] X[.., (k, a), ..]`` (the identity's index ``a`` passes through).
    """
    size = x.shape[mode]
    j, k = u.shape
    if size % k:
        raise ValueError(f"mode {mode} has size {size}, not a multiple of the factor's {k} columns")
    t = size // k
    moved = torch.movedim(x, mode, 0)
    rest = moved.shape[1:]
    split = moved.reshape(k, t, -1)  # [(k, a), rest]
    out = torch.einsum("jk,kar->jar", u, split).reshape(j * t, *rest)
    return torch.movedim(out, 0, mode)


def move_inner_factor(x: torch.Tensor, src: int, dst: int, t: int) -> torch.Tensor:
    """Move the inner (fastest) factor of size ``t`` of mode ``src`` to the inner end of ``dst``.

    Mode ``src`` (size ``t K``, row-major ``(k, a)``) becomes size K, mode ``dst`` (size D)
    becomes ``D t`` with row-major index ``(d, a)``. Entries are only relabelled, so norms
    and inner products are unchanged; ``move_inner_factor(y, dst, src, t)`` undoes it.
    """
    shape = list(x.shape)
    if shape[src] % t:
        raise ValueError(f"mode {src} of size {shape[src]} is not divisible by t={t}")
    d = x.ndim
    # split src into (k, a): the axes after src shift by one
    split = x.reshape(*shape[:src], shape[src] // t, t, *shape[src + 1 :])
    a_axis = src + 1
    dst_axis = dst if dst < src else dst + 1
    order = [ax for ax in range(d + 1) if ax != a_axis]
    pos = order.index(dst_axis) + 1
    order.insert(pos, a_axis)
    moved = split.permute(order)
    new_shape = list(shape)
    new_shape[src] //= t
    new_shape[dst] *= t
    return moved.reshape(new_shape)
