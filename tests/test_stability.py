"""Sensitivity (first-order noise gain) of every factorization, stabilised CP and ``tc``."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import tnconv
from tnconv.factorization import Factorization

from .conftest import METHODS, REAL_3D, decaying_kernel, require_support, supports


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
@settings(max_examples=4)
@given(
    shape=st.tuples(
        st.integers(1, 6), st.integers(1, 6), st.sampled_from([1, 3]), st.sampled_from([1, 3])
    ),
    rank=st.integers(1, 4),
    seed=st.integers(0, 100),
)
def test_sensitivity_matches_jacobian(method: str, shape: tuple, rank: int, seed: int) -> None:
    assume(supports(method, shape, rank))
    w = decaying_kernel(shape, seed)
    f = tnconv.get(method).factorize(w, rank)
    assert f.sensitivity() == pytest.approx(jacobian_sensitivity(f), rel=1e-9, abs=1e-12)


def test_sensitivity_matches_monte_carlo(method: str, one_thread: None) -> None:
    w = torch.tensor(REAL_3D["dlib_mmod/conv02"], dtype=torch.float64)[:12, :10]
    rank = 3 if supports(method, tuple(w.shape), 3) else 4
    require_support(method, tuple(w.shape), rank)
    f = tnconv.get(method).factorize(w, rank)
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
    f = tnconv.get("cp").factorize(w, 3, n_init=1, max_iter=50)
    a, b, c, d = f.factors
    skewed = f.with_factors([a * 100, b / 100, c, d])
    assert torch.allclose(skewed.to_tensor(), f.to_tensor())
    assert skewed.sensitivity() > 100 * f.sensitivity()


# -- the constrained update ------------------------------------------------------------------
@given(seed=st.integers(0, 200), slack=st.floats(0.0, 0.5), diagonal=st.booleans())
def test_constrained_update_is_feasible_and_optimal(
    seed: int, slack: float, diagonal: bool
) -> None:
    """Oracle: direct solves G(lam) = WZ (Z^T Z + lam D)^-1 on a grid of lam; among the feasible
    ones none has a lower penalty than the update's answer. A diagonal D (CP's) may be passed as
    its diagonal: same answer as the matrix."""
    from tnconv.decompositions._stable import constrained_update

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(7, 20, generator=gen, dtype=torch.float64)
    z = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    if diagonal:
        d = torch.diag(torch.rand(4, generator=gen, dtype=torch.float64) * 10 + 0.01)
    else:
        root = torch.randn(4, 4, generator=gen, dtype=torch.float64)
        d = root @ root.T + 0.1 * torch.eye(4, dtype=torch.float64)
    norm_sq = float(torch.sum(w * w))
    gram, wz = z.T @ z, w @ z

    def err_sq(g: torch.Tensor) -> float:
        return float(torch.sum((w - g @ z.T) ** 2))

    def pen(g: torch.Tensor) -> float:
        return float(torch.trace(g @ d @ g.T))

    ls = torch.linalg.solve(gram, wz.T).T
    bound = err_sq(ls) * (1 + slack) ** 2
    g = constrained_update(wz, gram, d, norm_sq, bound)
    if diagonal:
        torch.testing.assert_close(
            constrained_update(wz, gram, torch.diagonal(d), norm_sq, bound),
            g,
            rtol=1e-9,
            atol=1e-12,
        )
    assert err_sq(g) <= bound * (1 + 1e-8)
    for lam in torch.logspace(-6, 4, 60).tolist():
        trial = torch.linalg.solve(gram + lam * d, wz.T).T
        if err_sq(trial) <= bound:
            assert pen(g) <= pen(trial) * (1 + 1e-6)


# -- stabilised CP -------------------------------------------------------------------------------
@given(shape=st.tuples(*[st.integers(1, 5)] * 4), rank=st.integers(1, 4), seed=st.integers(0, 99))
def test_min_sensitivity_scaling_keeps_kernel(shape: tuple, rank: int, seed: int) -> None:
    from tnconv.decompositions.cp import cp_sensitivity, min_sensitivity_scaling

    gen = torch.Generator().manual_seed(seed)
    factors = [torch.randn(n, rank, generator=gen, dtype=torch.float64) for n in shape]
    scaled = min_sensitivity_scaling(factors)
    eq = "tr,sr,hr,wr->tshw"
    assert torch.allclose(torch.einsum(eq, *scaled), torch.einsum(eq, *factors), atol=1e-10)
    assert cp_sensitivity(scaled) <= cp_sensitivity(factors) * (1 + 1e-10)


@pytest.mark.parametrize("name", ["dlib_mmod/conv02", "ppocrv4_det/49_conv2d_156.w_0"])
def test_stabilized_cp_same_error_much_lower_sensitivity(name: str, one_thread: None) -> None:
    w = torch.tensor(REAL_3D[name], dtype=torch.float64)
    cp = tnconv.get("cp")
    plain = cp.factorize(w, 8, n_init=1, max_iter=100)
    stable = cp.factorize(w, 8, n_init=1, max_iter=100, stabilize=True, stabilize_iter=30)
    assert stable.relative_error(w) <= 1.02 * plain.relative_error(w) + 1e-12
    assert stable.sensitivity() <= 0.5 * plain.sensitivity()
    assert stable.info["sensitivity"] == pytest.approx(stable.sensitivity(), rel=1e-9)
    assert stable.info["unstabilized_error"] == pytest.approx(plain.info["fit_error"], rel=1e-9)


def test_stabilize_options_are_validated() -> None:
    w = decaying_kernel((4, 3, 3, 3), 0)
    for method in ("cp", "tc"):
        with pytest.raises(ValueError, match="stabilize_slack"):
            tnconv.get(method).factorize(w, 2, stabilize=True, stabilize_slack=-0.1)


# -- tc ----------------------------------------------------------------------------------------
def test_tc_is_a_shared_core_btd() -> None:
    """tr(A_t G_hw B_s) == sum over blocks a of the Tucker-2 block G x_T A[a] x_S B[a]."""
    w = decaying_kernel((8, 6, 3, 3), 2)
    f = tnconv.get("tc").factorize(w, (3, 2, 2))
    a, g, b = f.factors
    blocks = sum(torch.einsum("bhwc,tb,sc->tshw", g, a[k], b[:, :, k].T) for k in range(a.shape[0]))
    assert torch.allclose(blocks, f.to_tensor(), atol=1e-12)
    assert f.equation == "atb,bhwc,csa->tshw" and f.ranks == (3, 2, 2)


def test_tc_planner_runs_the_three_convs() -> None:
    """1x1 S -> R_c R_a, kh x kw R_c -> R_b per block, 1x1 R_a R_b -> T: minimal FLOPs."""
    conv = torch.nn.Conv2d(32, 24, 3, padding=1, bias=False)
    layer = tnconv.FactorizedConv2d.from_conv(conv, "tc", rank=(2, 4, 3))
    ra, rb, rc = layer.ranks
    plan = layer.plan_for((2, 32, 8, 8))
    assert len(plan.describe()) == 3
    per_pixel = ra * rc * 32 + ra * rb * rc * 9 + ra * rb * 24
    assert plan.flops == 2 * 2 * 64 * per_pixel
    x = torch.randn(2, 32, 8, 8)
    ref = torch.nn.functional.conv2d(x, layer.to_tensor(), padding=1)
    assert torch.allclose(layer(x), ref, atol=1e-5)


def test_tc_stabilized_lowers_sensitivity_within_slack(one_thread: None) -> None:
    w = torch.tensor(REAL_3D["dlib_mmod/conv02"], dtype=torch.float64)
    tc = tnconv.get("tc")
    plain = tc.factorize(w, 4, stabilize=False)
    stable = tc.factorize(w, 4)
    assert stable.relative_error(w) <= 1.02 * plain.relative_error(w) * (1 + 1e-9)
    assert stable.sensitivity() <= 0.5 * plain.sensitivity()
    assert stable.info["unstabilized_sensitivity"] == pytest.approx(plain.sensitivity(), rel=1e-9)


def test_tc_more_compact_than_tucker2_on_a_trained_kernel(one_thread: None) -> None:
    w = torch.tensor(REAL_3D["dlib_mmod/conv04"], dtype=torch.float64)
    f = tnconv.get("tc").factorize(w, 4)
    tucker = tnconv.get("tucker").factorize(w, ratio=f.num_params / f.dense_params)
    assert tucker.num_params <= f.num_params
    assert f.relative_error(w) < tucker.relative_error(w)


def test_summary_reports_sensitivity_per_layer() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 12, 3, padding=1)
    )
    small = tnconv.compress(model, "cp", rank=3, layers=["2"])
    rows = {r.name: r for r in tnconv.summary(small, (1, 3, 6, 6)).rows}
    assert rows["0"].sensitivity is None
    assert rows["2"].sensitivity == pytest.approx(small[2].factorization.sensitivity())
    assert "sensitiv." in str(tnconv.summary(small, (1, 3, 6, 6)))


@pytest.mark.parametrize("method", ["cp-stable", "tc"])
def test_budget_allocation_keeps_the_stabilised_fit(method: str) -> None:
    """Budget allocation searches with the quick (unstabilised) options, then refits the chosen
    ranks with the user's: those are kept although stabilising raised the error a little."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3)
    ).eval()
    out = tnconv.compress(model, method, budget=0.4, input_size=(1, 8, 8, 8), progress=False)
    layers = [m for m in out.modules() if getattr(m, "factorization", None) is not None]
    assert layers
    for layer in layers:
        info = layer.factorization.info
        assert "unstabilized_sensitivity" in info
        assert info["sensitivity"] < info["unstabilized_sensitivity"]
