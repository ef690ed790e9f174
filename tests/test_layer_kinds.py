"""Every method on every layer kind: Linear, Conv1d, grouped Conv2d, Conv3d through the one
executor, checked against ``F.linear`` / ``F.conv1d`` / ``F.conv2d`` / ``F.conv3d`` on the
reconstructed kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import tnconv
from tnconv.decompositions.lifting import to_order4
from tnconv.errors import InputShapeError, KernelOrderError
from tnconv.factorization import parse_equation
from tnconv.layers import FactorizedConv1d, FactorizedConv2d, FactorizedConv3d, FactorizedLinear

from .conftest import METHODS, supports

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
LAYER = {0: FactorizedLinear, 1: FactorizedConv1d, 2: FactorizedConv2d, 3: FactorizedConv3d}


@st.composite
def layer_cases(draw: st.DrawFn, dims: int) -> dict:
    groups = draw(st.sampled_from([1, 2, 3])) if dims else 1
    per_in = draw(st.sampled_from([2, 4, 6]))
    per_out = draw(st.sampled_from([2, 4, 6]))
    case = {
        "dims": dims,
        "groups": groups,
        "in": per_in * groups,
        "out": per_out * groups,
        "rank": draw(st.integers(1, 4)),
        "bias": draw(st.booleans()),
        "batch": draw(st.integers(1, 2)),
    }
    if dims:
        case["kernel"] = tuple(draw(st.integers(1, 3)) for _ in range(dims))
        case["stride"] = tuple(draw(st.integers(1, 2)) for _ in range(dims))
        case["padding"] = tuple(draw(st.integers(0, 2)) for _ in range(dims))
        case["dilation"] = tuple(draw(st.integers(1, 2)) for _ in range(dims))
        case["size"] = tuple(draw(st.integers(5, 8)) for _ in range(dims))
    else:
        case["lead"] = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    return case


def _supported(method: str, case: dict) -> bool:
    per_group = (
        case["out"] // case["groups"],
        case["in"] // case["groups"],
        *case.get("kernel", ()),
    )
    lifted = tuple(to_order4(torch.empty(per_group, device="meta")).shape)
    return supports(method, lifted, case["rank"])


@pytest.mark.parametrize("dims", [0, 1, 2, 3])
@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=6)
@given(data=st.data())
def test_every_method_every_layer_kind_equals_dense(method: str, dims: int, data) -> None:
    case = data.draw(layer_cases(dims))
    assume(_supported(method, case))
    gen = torch.Generator().manual_seed(0)
    shape = (case["out"], case["in"] // case["groups"], *case.get("kernel", ()))
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    f = tnconv.get(method).factorize(w, case["rank"], groups=case["groups"])
    assert f.shape == shape and f.groups == case["groups"]
    bias = torch.randn(case["out"], generator=gen, dtype=torch.float64) if case["bias"] else None
    kernel = f.to_tensor()
    if dims == 0:
        layer = FactorizedLinear(f, bias=bias)
        x = torch.randn(*case["lead"], case["in"], generator=gen, dtype=torch.float64)
        expected = F.linear(x, kernel, bias)
    else:
        geometry = {k: case[k] for k in ("stride", "padding", "dilation")}
        layer = LAYER[dims](f, bias=bias, groups=case["groups"], **geometry)
        x = torch.randn(
            case["batch"], case["in"], *case["size"], generator=gen, dtype=torch.float64
        )
        expected = CONV[dims](x, kernel, bias, groups=case["groups"], **geometry)
    got = layer(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    with torch.no_grad():  # the frozen path (folded factor-only steps) too
        torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-9)


def _factor_count(f: tnconv.Factorization) -> int:
    return len(parse_equation(f.equation)[0])


def test_what_each_family_is_on_a_matrix() -> None:
    """Order 2 is the family's network with the unit spatial modes dropped and the bond-only
    factors absorbed: a low-rank product, a two-core train, a two-core ring."""
    w = torch.randn(24, 20, dtype=torch.float64)
    tt = tnconv.get("tt").factorize(w, 5)
    assert _factor_count(tt) == 2 and tt.num_params == 24 * 5 + 5 * 20
    ring = tnconv.get("rsdtr").factorize(w, 3)
    inputs, _ = parse_equation(ring.equation)
    assert len(inputs) == 2 and all(len(t) == 3 for t in inputs)  # (r, t, r'), (r', s, r)
    cp = tnconv.get("cp").factorize(w, 4)
    assert _factor_count(cp) == 2 and cp.num_params == 4 * (24 + 20)
    for f in (tt, ring, cp):
        assert f.info["fitted_as"] == [24, 20, 1, 1]
        assert f.relative_error(w) == pytest.approx(f.info["relative_error"], rel=1e-6)
    # full rank: exact
    assert tnconv.get("tucker").factorize(w, 20).relative_error(w) < 1e-10


def test_conv3d_kernel_keeps_the_spatial_modes_apart() -> None:
    w = torch.randn(8, 6, 3, 2, 5, dtype=torch.float64)
    f = tnconv.get("tucker").factorize(w, eps=1e-9)
    assert f.modes is not None and len(f.modes) == 5
    assert f.to_tensor().shape == w.shape
    assert f.relative_error(w) < 1e-8
    assert f.info["fitted_as"] == [8, 6, 3, 10]


def test_grouped_network_has_the_group_in_every_factor() -> None:
    w = torch.randn(12, 4, 3, 3, dtype=torch.float64)
    for method in ("tucker", "tt", "cp"):
        f = tnconv.get(method).factorize(w, eps=0.3, groups=3)
        inputs, _ = parse_equation(f.equation)
        assert f.group and all(f.group in t for t in inputs)
        assert f.groups == 3 and f.modes is not None and f.modes[0].startswith(f.group)
        assert f.relative_error(w) <= 0.3 + 1e-9
        assert f.relative_error(w) == pytest.approx(f.info["relative_error"], rel=1e-6)
        assert len(f.info["group_errors"]) == 3
        # block g of the kernel is group g's own fit
        for g in range(3):
            block = f.to_tensor()[4 * g : 4 * g + 4]
            err = float(torch.linalg.vector_norm(block - w[4 * g : 4 * g + 4]))
            rel = err / float(torch.linalg.vector_norm(w[4 * g : 4 * g + 4]))
            assert rel == pytest.approx(f.info["group_errors"][g], rel=1e-6)


def test_grouped_ratio_holds_for_the_whole_kernel() -> None:
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    f = tnconv.get("tt").factorize(w, ratio=0.3, groups=2)
    assert f.num_params <= 0.3 * w.numel()


def test_linear_accepts_any_leading_shape() -> None:
    lin = nn.Linear(12, 10)
    layer = FactorizedLinear.from_linear(lin, "tt", ratio=0.5)
    kernel = layer.to_tensor().detach()
    for shape in [(12,), (3, 12), (2, 4, 12), (1, 1, 1, 12)]:
        x = torch.randn(shape)
        torch.testing.assert_close(layer(x), F.linear(x, kernel, lin.bias), rtol=1e-5, atol=1e-5)
    with pytest.raises(InputShapeError, match=r"\(\.\.\., 12\)"):
        layer(torch.randn(3, 11))
    dense = layer.to_linear()
    x = torch.randn(5, 12)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-5)
    assert layer.flops((5, 12)) > 0


def test_unbatched_and_channels_last_conv_inputs() -> None:
    conv1 = nn.Conv1d(6, 8, 3, padding=1)
    l1 = FactorizedConv1d.from_conv(conv1, "tr", ratio=0.6)
    x = torch.randn(6, 11)
    torch.testing.assert_close(l1(x), F.conv1d(x, l1.to_tensor(), l1.bias, padding=1))
    conv3 = nn.Conv3d(6, 8, 3, padding=1, groups=2)
    l3 = FactorizedConv3d.from_conv(conv3, "rsdtr", ratio=0.6)
    x = torch.randn(2, 6, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)
    expected = F.conv3d(x, l3.to_tensor(), l3.bias, padding=1, groups=2)
    got = l3(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(l3(x[0]), expected[0], rtol=1e-4, atol=1e-5)
    assert isinstance(l3.to_conv3d(), nn.Conv3d) and l3.to_conv3d().groups == 2


@pytest.mark.parametrize("dims", [0, 1, 3])
def test_from_scratch_trains_with_the_dense_init_scale(dims: int) -> None:
    gen = torch.Generator().manual_seed(0)
    if dims == 0:
        layer = FactorizedLinear.from_scratch("tucker", 64, 48, 8, generator=gen)
        dense = nn.Linear(64, 48)
    else:
        layer = LAYER[dims].from_scratch("tt", 32, 24, 3, 4, groups=2, generator=gen)
        dense = {1: nn.Conv1d, 3: nn.Conv3d}[dims](32, 24, 3, groups=2)
    std = float(layer.to_tensor().detach().std())
    assert 0.5 < std / float(dense.weight.std()) < 2.0
    x = torch.randn(2, 32, *([6] * dims)) if dims else torch.randn(4, 64)
    layer(x).square().mean().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in layer.factors)


def test_a_method_without_an_order_says_which_have_it() -> None:
    class SquareOnly(type(tnconv.get("tucker"))):  # type: ignore[misc]
        name = "square-only"
        kernel_orders = (4,)

    with pytest.raises(KernelOrderError, match=r"order 2 \(T, S\).*tucker"):
        SquareOnly().factorize(torch.randn(4, 3), 2)


# -- tensorized channels --------------------------------------------------------------------------
TENSORIZABLE = METHODS


def tt_matrix_weight(seed: int = 0) -> torch.Tensor:
    """A (512, 256) weight that is exactly a rank-2 TT-matrix over ((8, 8, 8), (8, 8, 4)): full
    rank as a matrix, 448 parameters as a train."""
    gen = torch.Generator().manual_seed(seed)
    cores = [
        torch.randn(shape, generator=gen, dtype=torch.float64)
        for shape in ((1, 8, 8, 2), (2, 8, 8, 2), (2, 8, 4, 1))
    ]
    return torch.einsum("aijb,bklc,cmnd->ikmjln", *cores).reshape(512, 256)


def test_tensorized_train_is_a_tt_matrix() -> None:
    w = tt_matrix_weight()
    assert int(torch.linalg.matrix_rank(w)) == 256  # nothing for a matrix low rank to take
    f = tnconv.get("tt").factorize(w, eps=1e-6, tensorize=((8, 8, 8), (8, 8, 4)))
    assert f.relative_error(w) < 1e-6 and f.num_params == 448
    assert f.info["tensorize"] == [[8, 8, 8], [8, 8, 4]]
    assert f.modes is not None and len(f.modes[0]) == 3 and len(f.modes[1]) == 3
    for method in ("tr", "rsdtr"):  # a ring holds the train (closing bond 1)
        g = tnconv.get(method).factorize(w, 2, tensorize=((8, 8, 8), (8, 8, 4)))
        assert g.relative_error(w) < 1e-6


@pytest.mark.parametrize("method", TENSORIZABLE)
@pytest.mark.parametrize("dims", [0, 2, 3])
def test_tensorized_layers_equal_dense(method: str, dims: int) -> None:
    gen = torch.Generator().manual_seed(1)
    shape = (24, 16, *([3] * dims))
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    semi = method in ("str", "stt", "sttucker")  # ranks multiples of t = 2
    f = tnconv.get(method).factorize(w, 4 if semi else 3, tensorize=((4, 6), (4, 4)))
    kernel = f.to_tensor()
    assert f.modes is not None and f.info["tensorize"] == [[4, 6], [4, 4]]
    # one index per channel factor; the semi-tensor split cuts some into pieces
    assert (len(f.modes[0]), len(f.modes[1])) == (2, 2) or semi
    assert min(len(f.modes[0]), len(f.modes[1])) >= 2
    if dims == 0:
        x = torch.randn(5, 16, generator=gen, dtype=torch.float64)
        got, expected = FactorizedLinear(f)(x), F.linear(x, kernel)
    else:
        x = torch.randn(2, 16, *([6] * dims), generator=gen, dtype=torch.float64)
        got = LAYER[dims](f, padding=1)(x)
        expected = CONV[dims](x, kernel, padding=1)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_tensorize_errors_and_auto() -> None:
    from tnconv.decompositions.lifting import auto_tensorize
    from tnconv.errors import OptionError, StructureError

    assert auto_tensorize(512, 256) == ((8, 8, 8), (8, 8, 4))
    assert auto_tensorize(10, 64) == ((5, 2), (8, 8))
    assert auto_tensorize(7, 64) is None  # a prime channel count: not tensorized
    w = torch.randn(24, 16)
    with pytest.raises(OptionError, match="multiply to 24 x 8"):
        tnconv.get("tt").factorize(w, 2, tensorize=((4, 6), (2, 4)))
    with pytest.raises(OptionError, match="as many"):
        tnconv.get("tt").factorize(w, 2, tensorize=((4, 6), (16,)))
    # a semi-tensor network's own channel split (S = (j, a), a of size t = 2) must nest with
    # the requested one: a pair of sizes (8, 1) cannot hold it
    with pytest.raises(StructureError, match="do not nest"):
        tnconv.get("stt").factorize(w, ratio=0.5, tensorize=((3, 8), (16, 1)))


def test_compress_tensorized_saves_and_loads(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
    with torch.no_grad():
        model[0].weight.copy_(tt_matrix_weight().float())
    plain = tnconv.compress(model, "tt", eps=1e-4, layers=["0"])
    assert "no saving" in tnconv.dense_reasons(plain)["0"]
    small = tnconv.compress(model, "tt", eps=1e-4, layers=["0"], tensorize="auto")
    assert isinstance(small[0], FactorizedLinear) and small[0].num_params == 448
    x = torch.randn(3, 256)
    torch.testing.assert_close(small(x), model(x), rtol=1e-3, atol=1e-3)
    path = tmp_path / "tt.tnconv"
    tnconv.save(small, path)
    back = tnconv.load(
        path, model=nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
    )
    torch.testing.assert_close(back(x), small(x))


# -- autograd modes ------------------------------------------------------------------------------
KIND_MODULES = {
    "linear": lambda: nn.Linear(8, 6),
    "conv1d": lambda: nn.Conv1d(4, 6, 3, padding=1),
    "grouped": lambda: nn.Conv2d(4, 8, 3, padding=1, groups=2),
    "conv3d": lambda: nn.Conv3d(4, 6, 3, padding=1),
}
KIND_INPUTS = {
    "linear": (3, 8),
    "conv1d": (2, 4, 7),
    "grouped": (2, 4, 6, 6),
    "conv3d": (1, 4, 4, 4, 4),
}
MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}


def every_method_kind_and_mode(test):
    """Parametrize ``test`` over every method x layer kind x no-autograd mode."""
    for name, values in (("mode", MODES), ("kind", KIND_MODULES), ("method", METHODS)):
        test = pytest.mark.parametrize(name, list(values))(test)
    return test


@every_method_kind_and_mode
def test_every_layer_kind_under_inference_mode_and_no_grad(
    method: str, kind: str, mode: str
) -> None:
    torch.manual_seed(0)
    dense = KIND_MODULES[kind]()
    x = torch.randn(KIND_INPUTS[kind])
    with MODES[mode]():
        try:
            layer = tnconv.layers.factorized_type(dense).from_dense(dense, method, 2)
        except tnconv.errors.StructureError:
            pytest.skip(f"{method} cannot take the {kind} kernel at rank 2")
        small = tnconv.compress(nn.Sequential(dense), method, rank=2)
        y = layer(x)
    expected = layer.to_dense()(x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(small(x), small(x))  # the compressed model runs outside the mode too
    # built in the mode, the layer still trains afterwards
    layer(x).square().sum().backward()
    assert all(p.grad is not None for p in layer.factors)


@every_method_kind_and_mode
def test_repeated_frozen_calls_of_every_layer_kind_see_a_changed_factor(
    method: str, kind: str, mode: str
) -> None:
    """Frozen calls keep the last call's bound plan (keyed by input and factor state): for
    every kind, a factor changed in place between two calls on the same input, and an input of
    another batch size, give the dense layer's output on the current kernel."""
    torch.manual_seed(0)
    dense = KIND_MODULES[kind]()
    try:
        layer = tnconv.layers.factorized_type(dense).from_dense(dense, method, 2)
    except tnconv.errors.StructureError:
        pytest.skip(f"{method} cannot take the {kind} kernel at rank 2")
    layer.eval()
    x = torch.randn(KIND_INPUTS[kind])
    for step in range(3):
        if step == 1:
            with torch.no_grad():
                layer.factors[0].mul_(-1.5)  # in place: same storage, a new version
        inp = x if step < 2 else torch.cat([x, x])  # then another batch size
        with MODES[mode]():
            y = layer(inp)
            again = layer(inp)
        torch.testing.assert_close(y, layer.to_dense()(inp), rtol=1e-4, atol=1e-5)
        assert torch.equal(again, y)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", list(KIND_MODULES))
@pytest.mark.parametrize("identity", ["inner", "outer"])
@pytest.mark.parametrize("method", ["stt", "str", "sttucker"])
def test_both_identity_orders_on_every_layer_kind(
    method: str, identity: str, kind: str, mode: str
) -> None:
    """The semi-tensor methods in either place of the identity's index (``identity=``) on
    every layer kind, without autograd and with it: the layer computes its dense equivalent."""
    torch.manual_seed(0)
    dense = KIND_MODULES[kind]()
    x = torch.randn(KIND_INPUTS[kind])
    layer_type = tnconv.layers.factorized_type(dense)
    try:
        layer = layer_type.from_dense(dense, method, 2, identity=identity)
    except tnconv.errors.StructureError:
        pytest.skip(f"{method} cannot take the {kind} kernel at rank 2")
    assert layer.info["identity"] == identity
    expected = layer.to_dense()(x)
    with MODES[mode]():
        for _ in range(2):  # the second call is the kept one
            torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)
