"""The semi-tensor family (sttucker, stt, str): the STP algebra against its definition with
explicit Kronecker products, each network against its STP definition, the invariants against the
classical twins, typed errors, and random initialisation / training from scratch for every
registered method."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import tnconv
from tnconv.decompositions._stp import (
    kron_identity,
    left_stp,
    move_inner_factor,
    stp_mode_product,
)
from tnconv.errors import RankSpecError, StructureError

from .conftest import METHODS, REAL_3D, adam_losses, decaying_kernel

TWINS = {"sttucker": "tucker", "stt": "tt", "str": "tr"}
N_BONDS = {"sttucker": 2, "stt": 3, "str": 4}
STP_BONDS = {"sttucker": (0, 1), "stt": (0,), "str": (0, 1)}


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


# -- the algebra -----------------------------------------------------------------------------------
@given(
    m=st.integers(1, 4),
    n=st.integers(1, 6),
    p=st.integers(1, 6),
    q=st.integers(1, 4),
    seed=st.integers(0, 100),
)
def test_left_stp_is_its_definition(m: int, n: int, p: int, q: int, seed: int) -> None:
    a, b = _randn(m, n, seed=seed), _randn(p, q, seed=seed + 1)
    lcm = math.lcm(n, p)
    expected = torch.kron(a, torch.eye(lcm // n, dtype=a.dtype)) @ torch.kron(
        b, torch.eye(lcm // p, dtype=b.dtype)
    )
    torch.testing.assert_close(left_stp(a, b), expected)


@given(m=st.integers(1, 4), n=st.integers(1, 5), q=st.integers(1, 4), seed=st.integers(0, 100))
def test_left_stp_reduces_to_the_matrix_product(m: int, n: int, q: int, seed: int) -> None:
    a, b = _randn(m, n, seed=seed), _randn(n, q, seed=seed + 1)
    torch.testing.assert_close(left_stp(a, b), a @ b)


@given(t=st.integers(1, 4), m=st.integers(1, 3), p=st.integers(1, 3), q=st.integers(1, 3))
def test_left_stp_with_a_multiple_is_a_times_b_kron_identity(t: int, m: int, p: int, q: int):
    a, b = _randn(m, t * p), _randn(p, q, seed=1)
    torch.testing.assert_close(left_stp(a, b), a @ kron_identity(b, t))
    torch.testing.assert_close(kron_identity(b, t), torch.kron(b, torch.eye(t, dtype=b.dtype)))


@given(dims=st.lists(st.integers(1, 4), min_size=4, max_size=4), seed=st.integers(0, 100))
def test_left_stp_is_associative(dims: list[int], seed: int) -> None:
    """(A ⋉ B) ⋉ C = A ⋉ (B ⋉ C) for any sizes: the property the networks' chains rely on."""
    m, n, p, q = dims
    a, b = _randn(m, n, seed=seed), _randn(p, q, seed=seed + 1)
    c = _randn(2 * q, 3, seed=seed + 2)
    torch.testing.assert_close(left_stp(left_stp(a, b), c), left_stp(a, left_stp(b, c)))


@given(
    shape=st.lists(st.integers(1, 4), min_size=3, max_size=3),
    mode=st.integers(0, 2),
    t=st.integers(1, 3),
    j=st.integers(1, 4),
    seed=st.integers(0, 100),
)
def test_stp_mode_product_is_mode_product_with_kron_identity(
    shape: list[int], mode: int, t: int, j: int, seed: int
) -> None:
    shape = list(shape)
    k = shape[mode]
    shape[mode] = k * t
    x, u = _randn(*shape, seed=seed), _randn(j, k, seed=seed + 1)
    big = kron_identity(u, t)  # (j t, k t)
    expected = torch.movedim(torch.tensordot(big, x, dims=([1], [mode])), 0, mode)
    torch.testing.assert_close(stp_mode_product(x, u, mode), expected)
    if t == 1:  # the ordinary mode product
        torch.testing.assert_close(
            stp_mode_product(x, u, mode),
            torch.movedim(torch.tensordot(u, x, dims=([1], [mode])), 0, mode),
        )


@given(
    shape=st.lists(st.integers(1, 3), min_size=4, max_size=4),
    src=st.integers(0, 3),
    dst=st.integers(0, 3),
    t=st.integers(1, 3),
)
def test_move_inner_factor_relabels_and_inverts(shape: list[int], src: int, dst: int, t: int):
    if src == dst:
        return
    shape = list(shape)
    shape[src] *= t
    x = _randn(*shape)
    y = move_inner_factor(x, src, dst, t)
    assert y.shape[src] == shape[src] // t and y.shape[dst] == shape[dst] * t
    torch.testing.assert_close(move_inner_factor(y, dst, src, t), x)
    assert torch.equal(torch.sort(y.flatten()).values, torch.sort(x.flatten()).values)


# -- each network against its STP definition (explicit Kronecker products) -------------------------
def test_sttucker_is_core_times_kron_factors() -> None:
    t, w = 2, decaying_kernel((8, 6, 3, 3), 0)
    f = tnconv.get("sttucker").factorize(w, (4, 4), t=t, identity="inner")
    g, u_t, u_s = f.factors
    rt, rs = f.ranks
    # the core's (R_T/t, R_S/t, kh, t, kw, t) as the classical (R_T, R_S, kh, kw), R = (rho, a)
    core = g.permute(0, 3, 1, 5, 2, 4).reshape(rt, rs, 3, 3)
    dense = stp_mode_product(stp_mode_product(core, u_t, 0), u_s, 1)
    torch.testing.assert_close(f.to_tensor(), dense)
    big = torch.einsum("abhw,ta,sb->tshw", core, kron_identity(u_t, t), kron_identity(u_s, t))
    torch.testing.assert_close(f.to_tensor(), big)
    assert f.num_params == rt * rs * 9 + (8 * rt + 6 * rs) // t**2


def test_stt_is_a_left_stp_chain() -> None:
    t, w = 2, decaying_kernel((6, 8, 3, 3), 1)
    f = tnconv.get("stt").factorize(w, (4, 3, 2), t=t, identity="inner")
    g_t, g_s, g_h, g_w = f.factors
    r1, r2, r3 = f.ranks
    a = g_t.reshape(6, r1)  # (T, r1) with r1 = (rho, a), a inner
    z = torch.einsum("bhc,cw->bhw", g_h, g_w)
    dense = sum(left_stp(a, g_s[:, :, k])[:, :, None, None] * z[k][None, None] for k in range(r2))
    torch.testing.assert_close(f.to_tensor(), dense)
    assert f.num_params == 6 * r1 + r1 * 8 * r2 // t**2 + r2 * 3 * r3 + r3 * 3


def test_str_is_a_ring_of_left_stps() -> None:
    t, w = 2, decaying_kernel((6, 8, 3, 3), 2)
    f = tnconv.get("str").factorize(w, (2, 4, 3, 2), t=t, identity="inner")
    g_t, g_s, g_h, g_w = f.factors
    r0, r1, r2, r3 = f.ranks
    # classical cores from the STPs: G_w (r3, kw, r0) ⋉ G_T and G_T (.., r1) ⋉ G_S
    w_mat = g_w.reshape(r3 * 3, r0)  # rows (c, w), columns r0 = (p, d)
    t_mat = g_t.reshape(r0 // t, -1)  # rows p, columns (i, q, a)
    wt = left_stp(w_mat, t_mat).reshape(r3, 3, 6 // t, r1, t)  # [c, w, i, (q,a), d]
    wt = wt.permute(0, 1, 2, 4, 3).reshape(r3 * 3 * 6, r1)  # rows (c, w, (i, d)), cols r1
    s_mat = g_s.reshape(r1 // t, -1)  # rows q, columns (j, b)
    wts = left_stp(wt, s_mat).reshape(r3, 3, 6, 8 // t, r2, t)  # [c, w, T, j, b, a]
    wts = wts.permute(0, 1, 2, 3, 5, 4).reshape(r3, 3, 6, 8, r2)  # [c, w, T, S, b]
    dense = torch.einsum("cwtsb,bhc->tshw", wts, g_h)
    torch.testing.assert_close(f.to_tensor(), dense)
    expected = r0 * 6 * r1 // t**2 + r1 * 8 * r2 // t**2 + r2 * 3 * r3 + r3 * 3 * r0
    assert f.num_params == expected


def _outer_to_inner(w: torch.Tensor, mode: int, t: int) -> torch.Tensor:
    """Channel ``j t + a`` of the result is channel ``a (C / t) + j`` of ``w`` (index
    arithmetic, independent of the library's reshapes)."""
    c = w.shape[mode]
    src = [(k % t) * (c // t) + k // t for k in range(c)]
    return w.index_select(mode, torch.tensor(src))


CHANNEL_MODES = {"sttucker": (0, 1), "stt": (1,), "str": (0, 1)}
RANKS = {"sttucker": (4, 4), "stt": (4, 3, 2), "str": (2, 4, 3, 2)}


@pytest.mark.parametrize("method", sorted(TWINS))
@pytest.mark.parametrize("t", [2, 3])
def test_outer_order_is_the_inner_network_on_permuted_channels(method: str, t: int) -> None:
    """``identity="outer"`` fits W as "inner" fits W with its channels regrouped (a, j) ->
    (j, a): the same factors, the same error, and a kernel that is the inner one's with the
    channels put back."""
    w = decaying_kernel((6 * t, 4 * t, 3, 3), 4)
    ranks = tuple(r * t // 2 if k in STP_BONDS[method] else r for k, r in enumerate(RANKS[method]))
    dec = tnconv.get(method)
    outer = dec.factorize(w, ranks, t=t, identity="outer")
    permuted = w
    for mode in CHANNEL_MODES[method]:
        permuted = _outer_to_inner(permuted, mode, t)
    inner = dec.factorize(permuted, ranks, t=t, identity="inner")
    for a, b in zip(outer.factors, inner.factors, strict=True):
        torch.testing.assert_close(a, b)
    assert outer.info["identity"] == "outer" and inner.info["identity"] == "inner"
    back = outer.to_tensor()
    for mode in CHANNEL_MODES[method]:
        back = _outer_to_inner(back, mode, t)
    torch.testing.assert_close(back, inner.to_tensor())
    assert outer.info["relative_error"] == pytest.approx(inner.info["relative_error"], rel=1e-9)
    # the identity's index is the first of its channel mode's two
    for mode in CHANNEL_MODES[method]:
        assert outer.modes[mode] == inner.modes[mode][::-1]


@pytest.mark.parametrize(
    ("method", "default"), [("stt", "outer"), ("str", "outer"), ("sttucker", "inner")]
)
def test_default_order_of_each_method(method: str, default: str) -> None:
    f = tnconv.get(method).factorize(decaying_kernel((8, 8, 3, 3), 0), 4)
    assert f.info["identity"] == default
    with pytest.raises(tnconv.OptionError, match="identity"):
        tnconv.get(method).factorize(decaying_kernel((8, 8, 3, 3), 0), 4, identity="middle")


def test_documented_factor_layouts() -> None:
    w = decaying_kernel((8, 12, 3, 3), 3)
    shapes = {
        m: [tuple(x.shape) for x in tnconv.get(m).factorize(w, r, t=2).factors]
        for m, r in (("sttucker", (4, 6)), ("stt", (6, 4, 2)), ("str", (2, 6, 4, 2)))
    }
    assert shapes["sttucker"] == [(2, 3, 3, 2, 3, 2), (4, 2), (6, 3)]
    assert shapes["stt"] == [(8, 3, 2), (3, 6, 4), (4, 3, 2), (2, 3)]
    assert shapes["str"] == [(1, 4, 3, 2), (3, 6, 4), (4, 3, 2), (2, 3, 1, 2)]


# -- invariants against the classical twins --------------------------------------------------------
@pytest.mark.parametrize("method", sorted(TWINS))
@pytest.mark.parametrize("name", ["ppocrv4_det/49_conv2d_156.w_0", "dlib_mmod/conv02"])
@pytest.mark.parametrize("rank", [2, 4])
def test_t1_is_the_classical_twin_on_real_kernels(method: str, name: str, rank: int) -> None:
    w = torch.tensor(REAL_3D[name], dtype=torch.float64)
    ours = tnconv.get(method).factorize(w, rank, t=1)
    twin = tnconv.get(TWINS[method]).factorize(w, rank)
    assert ours.ranks == twin.ranks and ours.num_params == twin.num_params
    assert ours.relative_error(w) == pytest.approx(twin.relative_error(w), rel=1e-6)
    smaller = tnconv.get(method).factorize(w, rank * 2, t=2)
    assert smaller.num_params < tnconv.get(TWINS[method]).factorize(w, rank * 2).num_params


@st.composite
def stp_cases(draw: st.DrawFn) -> dict:
    t = draw(st.integers(2, 4))
    return {
        "t": t,
        "shape": (
            t * draw(st.integers(1, 4)),
            t * draw(st.integers(1, 4)),
            draw(st.sampled_from([1, 3])),
            draw(st.sampled_from([1, 3])),
        ),
        "rank": t * draw(st.integers(1, 3)),
        "seed": draw(st.integers(0, 1000)),
    }


@pytest.mark.parametrize("method", sorted(TWINS))
@given(case=stp_cases())
def test_invariants_over_shapes_ranks_and_t(method: str, case: dict) -> None:
    t, shape, rank = case["t"], case["shape"], case["rank"]
    w = _randn(*shape, seed=case["seed"])
    dec, twin = tnconv.get(method), tnconv.get(TWINS[method])
    # t = 1: the classical twin exactly, at the same ranks
    one = dec.factorize(w, rank, t=1)
    ref = twin.factorize(w, rank)
    assert one.ranks == ref.ranks and one.num_params == ref.num_params
    assert one.relative_error(w) == pytest.approx(ref.relative_error(w), rel=1e-6, abs=1e-12)
    # t > 1 at the same (uncapped) ranks: strictly fewer parameters
    bound = dec.bind(dec.parse_options({"t": t}))
    ranks = bound.bond_ranks(rank, shape)
    if twin.bond_ranks(ranks, shape) == ranks:
        f = dec.factorize(w, ranks, t=t)
        assert f.ranks == ranks and f.info["t"] == t
        assert f.num_params == bound.num_params_at(shape, ranks)
        assert f.num_params < twin.num_params_at(shape, ranks)
        assert all(r % t == 0 for k, r in enumerate(f.ranks) if k in STP_BONDS[method])
    # full-size ranks reconstruct exactly, at t = 1 and at t > 1
    for tt in (1, t):
        assert dec.factorize(w, 10**6, t=tt).relative_error(w) < 1e-10


@pytest.mark.parametrize("method", sorted(TWINS))
@given(case=stp_cases(), eps=st.floats(0.05, 0.95))
def test_eps_bound_holds_for_every_t(method: str, case: dict, eps: float) -> None:
    w = decaying_kernel(case["shape"], case["seed"])
    f = tnconv.get(method).factorize(w, eps=eps, t=case["t"])
    assert f.relative_error(w) <= eps
    assert tnconv.get(method).guarantees_eps


@pytest.mark.parametrize("method", sorted(TWINS))
def test_ratio_and_eps_on_a_real_kernel(method: str) -> None:
    w = torch.tensor(REAL_3D["ppocrv4_det/49_conv2d_156.w_0"], dtype=torch.float64)
    dec = tnconv.get(method)
    for t in (2, 4):
        f = dec.factorize(w, ratio=0.2, t=t)
        assert f.num_params <= 0.2 * w.numel() and f.info["t"] == t
        g = dec.factorize(w, eps=0.4, t=t)
        assert g.relative_error(w) <= 0.4


# -- typed errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(TWINS))
def test_t_must_divide_the_stp_bonds(method: str) -> None:
    w = decaying_kernel((8, 8, 3, 3), 0)
    ranks = [4] * N_BONDS[method]
    ranks[STP_BONDS[method][0]] = 5
    with pytest.raises(StructureError, match=r"t=2 must divide.*5 -> 4, 6") as info:
        tnconv.get(method).factorize(w, tuple(ranks))
    assert isinstance(info.value, RankSpecError) and isinstance(info.value, ValueError)
    with pytest.raises(StructureError, match="3 -> 4"):
        tnconv.get(method).factorize(w, 3, t=4)
    # ranks above what the network carries are capped, to a multiple of t
    capped = tnconv.get(method).factorize(w, 10**6 + 1, t=4).ranks
    assert all(capped[k] % 4 == 0 for k in STP_BONDS[method])


@pytest.mark.parametrize("method", sorted(TWINS))
def test_t_must_divide_the_channels(method: str) -> None:
    w = decaying_kernel((6, 9, 3, 3), 0)
    with pytest.raises(StructureError, match=r"t=2 must divide .*S.*t that work here: \[1, 3"):
        tnconv.get(method).factorize(w, 6)
    for spec in ({"eps": 0.3}, {"ratio": 0.5}):
        with pytest.raises(StructureError):
            tnconv.get(method).factorize(w, **spec)
    assert tnconv.get(method).factorize(w, 6, t=3).info["t"] == 3


@pytest.mark.parametrize("method", sorted(TWINS))
@pytest.mark.parametrize("t", [0, -1, 2.0, "2", True])
def test_bad_t_is_an_option_error(method: str, t: object) -> None:
    with pytest.raises(tnconv.OptionError, match="t"):
        tnconv.get(method).factorize(decaying_kernel((4, 4, 3, 3), 0), 2, t=t)


def test_sttucker_takes_two_ranks() -> None:
    with pytest.raises(RankSpecError, match="2 ranks"):
        tnconv.get("sttucker").factorize(decaying_kernel((4, 4, 3, 3), 0), (2, 2, 2, 2))


# -- the layer -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(TWINS))
@given(
    t=st.sampled_from([2, 3]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    seed=st.integers(0, 100),
    identity=st.sampled_from(["inner", "outer"]),
)
def test_layer_equals_conv2d_for_any_t(
    method: str, t: int, stride: int, padding: int, dilation: int, seed: int, identity: str
) -> None:
    w = _randn(2 * t, 3 * t, 3, 3, seed=seed)
    f = tnconv.get(method).factorize(w, t, t=t, identity=identity)
    layer = tnconv.FactorizedConv2d(f, stride=stride, padding=padding, dilation=dilation)
    x = _randn(2, 3 * t, 9, 8, seed=seed + 1)
    expected = F.conv2d(x, f.to_tensor(), None, stride, padding, dilation)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", sorted(TWINS))
def test_gradients_float32_and_padding_modes(method: str) -> None:
    f = tnconv.get(method).factorize(decaying_kernel((6, 4, 3, 3), 5).float(), 2)
    assert all(x.dtype == torch.float32 for x in f.factors)
    conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect").double()
    layer = tnconv.FactorizedConv2d.from_conv(conv, method, 10**6)
    x = _randn(2, 4, 7, 6)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-8, atol=1e-9)
    layer(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.factors)


def test_compress_keeps_layers_the_network_cannot_take_dense() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 45, 3)
    )
    # (budget= counts the layers kept dense in its pool: half of the model's weights cannot pay
    # for the 13,392 kept dense here, half of the factorizable ones can)
    budget = tnconv.Budget(share=0.5, pool="factorizable")
    for kwargs in ({"eps": 0.5}, {"budget": budget}):
        small = tnconv.compress(model, "str", t=4, **kwargs)
        reasons = tnconv.dense_reasons(small)
        assert set(reasons) >= {"0", "2"} and "t=4 must divide" in reasons["2"]
        assert isinstance(small[1], tnconv.FactorizedConv2d) and small[1].info["t"] == 4


# -- random initialisation and training from scratch, for every registered method ------------------
@pytest.mark.parametrize("method", METHODS)
def test_from_scratch_has_conv2d_default_std(method: str, one_thread: None) -> None:
    """E[mean(W^2)] = 1 / (3 fan_in), nn.Conv2d's default: a z-test over independent draws."""
    rank, draws = 4, 24
    target = 1.0 / (3 * 8 * 9)
    gen = torch.Generator().manual_seed(7)
    second = []
    for _ in range(draws):
        layer = tnconv.FactorizedConv2d.from_scratch(
            method, 8, 16, 3, rank, padding=1, generator=gen, dtype=torch.float64
        )
        second.append(float(layer.to_tensor().detach().square().mean()))
        assert (
            layer.bias is not None and float(layer.bias.detach().abs().max()) <= 1 / (8 * 9) ** 0.5
        )
    m = torch.tensor(second)
    z = abs(float(m.mean()) - target) / (float(m.std()) / draws**0.5)
    assert z < 4.5, (float(m.mean()) / target, z)
    assert 0.6 < float(m.mean()) / target < 1.4


@pytest.mark.parametrize("method", METHODS)
def test_random_is_exact_in_expectation_and_seeded(method: str) -> None:
    dec = tnconv.get(method)
    a = dec.random((8, 6, 3, 3), 2, seed=3, std=0.5)
    b = dec.random((8, 6, 3, 3), 2, seed=3, std=0.5)
    assert all(torch.equal(x, y) for x, y in zip(a.factors, b.factors, strict=True))
    assert a.method == method and a.factors[0].dtype == torch.float32
    # the factors' scale gives entries of variance std^2: N * s^(2K) = std^2
    _, out = a.equation.split("->")
    sizes = a.index_sizes()
    summed = math.prod(n for c, n in sizes.items() if c not in out)
    k = len(a.factors)
    var = (0.5**2 / summed) ** (1 / k)
    assert float(torch.cat([f.flatten() for f in a.factors]).double().var()) == pytest.approx(
        var, rel=0.35
    )


def test_from_scratch_layer_matches_conv_and_trains() -> None:
    gen = torch.Generator().manual_seed(0)
    layer = tnconv.FactorizedConv2d.from_scratch(
        "str", 8, 8, 3, 4, stride=2, padding=1, dilation=1, generator=gen, t=2
    )
    assert layer.info == {"init": "random", "std": pytest.approx(1 / (3 * 72) ** 0.5)}
    x = torch.randn(4, 8, 9, 9, generator=gen)
    ref = F.conv2d(x, layer.to_tensor(), layer.bias, 2, 1)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)
    teacher = tnconv.FactorizedConv2d.from_scratch("str", 8, 8, 3, 4, 2, 1, generator=gen)
    target = teacher(x).detach()
    losses = adam_losses(layer, x, target, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(StructureError):
        tnconv.FactorizedConv2d.from_scratch("stt", 5, 8, 3, 4)


def test_save_load_round_trip(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3))
    x = torch.randn(2, 8, 9, 9)
    for method in sorted(TWINS):
        small = tnconv.compress(model, method, rank=4, t=2)
        small[2] = tnconv.FactorizedConv2d.from_scratch(method, 16, 8, 3, 4, t=2)
        tnconv.save(small, tmp_path / f"{method}.pt")
        again = tnconv.load(tmp_path / f"{method}.pt", trusted=True)
        assert torch.equal(again(x), small(x))
        assert again[0].modes == small[0].modes and again[0].info["t"] == 2
