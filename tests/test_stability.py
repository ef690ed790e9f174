"""Sensitivity (first-order noise gain) of every factorization, stabilised CP and ``tc``."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tnconv
from tnconv.factorization import Factorization

from .conftest import METHODS, REAL_3D, decaying_kernel


def jacobian_sensitivity(f: Factorization) -> float:
    """Oracle: sum over factors of ||d vec(W) / d vec(G_n)||_F^2 by autograd."""
    factors = [t.detach().to(torch.float64) for t in f.factors]
    total = 0.0
    for n in range(len(factors)):

        def kernel(g: torch.Tensor, n: int = n) -> torch.Tensor:
            return f.with_factors([g if m == n else t for m, t in enumerate(factors)]).to_tensor()

        jac = torch.autograd.functional.jacobian(kernel, factors[n])
        total += float(torch.sum(jac * jac))
    return total


def monte_carlo_gain(f: Factorization, sigma: float, draws: int, seed: int) -> float:
    """E ||W(G + sigma*N) - W(G)||^2 / sigma^2 estimated from ``draws`` noise samples."""
    gen = torch.Generator().manual_seed(seed)
    base = f.to(torch.float64)
    w0 = base.to_tensor()
    acc = 0.0
    for _ in range(draws):
        noisy = [
            t + sigma * torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in base.factors
        ]
        acc += float(torch.sum((base.with_factors(noisy).to_tensor() - w0) ** 2))
    return acc / draws / sigma**2


@pytest.mark.parametrize("method", METHODS)
@given(
    shape=st.tuples(
        st.integers(1, 6), st.integers(1, 6), st.sampled_from([1, 3]), st.sampled_from([1, 3])
    ),
    rank=st.integers(1, 4),
    seed=st.integers(0, 100),
)
def test_sensitivity_matches_jacobian(method: str, shape: tuple, rank: int, seed: int) -> None:
    w = decaying_kernel(shape, seed)
    f = tnconv.get(method).factorize(w, rank)
    assert f.sensitivity() == pytest.approx(jacobian_sensitivity(f), rel=1e-9, abs=1e-12)


def test_sensitivity_matches_monte_carlo(method: str, one_thread: None) -> None:
    w = torch.tensor(REAL_3D["dlib_mmod/conv02"], dtype=torch.float64)[:12, :10]
    f = tnconv.get(method).factorize(w, 3)
    scale = max(float(t.abs().max()) for t in f.factors)
    gain = monte_carlo_gain(f, sigma=1e-4 * scale, draws=300, seed=0)
    # 300 draws of a quadratic form in thousands of Gaussians: a few percent of spread
    assert gain == pytest.approx(f.sensitivity(), rel=0.1)


@given(shape=st.tuples(*[st.integers(1, 5)] * 4), rank=st.integers(1, 4), seed=st.integers(0, 99))
def test_cp_sensitivity_closed_form(shape: tuple, rank: int, seed: int) -> None:
    """ECCV 2020: ss = sum_n I_n ||KhatriRao_{m != n} A_m||_F^2 = sum_n I_n sum_r prod ||a_r||^2."""
    gen = torch.Generator().manual_seed(seed)
    factors = [torch.randn(n, rank, generator=gen, dtype=torch.float64) for n in shape]
    f = Factorization(factors, "tr,sr,hr,wr->tshw", shape, (rank,))
    sq = [torch.sum(a * a, dim=0) for a in factors]
    closed = sum(
        shape[n] * float(torch.sum(math.prod(sq[m] for m in range(4) if m != n))) for n in range(4)
    )
    assert f.sensitivity() == pytest.approx(closed, rel=1e-10)


def test_sensitivity_hyperedge_and_grouped_modes() -> None:
    """An index shared by several factors and the output (STP-style), and a grouped channel."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)  # (u, t, r)
    b = torch.randn(4, 5, 2, generator=gen, dtype=torch.float64)  # (r, s, u): u is a hyperedge
    c = torch.randn(4, 3, 3, generator=gen, dtype=torch.float64)  # (r, h, w)
    f = Factorization(
        [a, b, c], "utr,rsu,rhw->utshw", (6, 5, 3, 3), (4,), modes=("ut", "s", "h", "w")
    )
    assert f.sensitivity() == pytest.approx(jacobian_sensitivity(f), rel=1e-10)
    single = Factorization([torch.ones(2, 2, 1, 1)], "tshw->tshw", (2, 2, 1, 1), ())
    assert single.sensitivity() == 4.0


def test_sensitivity_depends_on_scaling_not_on_product() -> None:
    """Moving scale between CP factors keeps W but changes the gain (the degeneracy handle)."""
    w = decaying_kernel((6, 5, 3, 3), 1)
    f = tnconv.get("cp").factorize(w, 3)
    a, b, c, d = f.factors
    skewed = f.with_factors([a * 100, b / 100, c, d])
    assert torch.allclose(skewed.to_tensor(), f.to_tensor())
    assert skewed.sensitivity() > 100 * f.sensitivity()
