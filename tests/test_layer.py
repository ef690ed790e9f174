"""FactorizedConv2d against the dense oracle ``F.conv2d(x, f.to_tensor(), ...)``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tnconv
from tnconv.errors import InputShapeError

from .conftest import METHODS, REAL_3D, adam_losses, require_support, supports


def _factorization(method: str, shape: tuple, rank: int, seed: int) -> tnconv.Factorization:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    return tnconv.get(method).factorize(w, rank)


@st.composite
def conv_cases(draw: st.DrawFn) -> dict:
    t, s = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    kh, kw = draw(st.sampled_from([1, 2, 3, 5])), draw(st.sampled_from([1, 2, 3]))
    stride = draw(st.one_of(st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    dilation = draw(st.one_of(st.integers(1, 2), st.tuples(st.integers(1, 2), st.integers(1, 2))))
    same_ok = stride in (1, (1, 1))
    padding = draw(
        st.one_of(
            st.integers(0, 3),
            st.tuples(st.integers(0, 2), st.integers(0, 3)),
            st.sampled_from(["valid", "same"] if same_ok else ["valid"]),
        )
    )
    d = dilation if isinstance(dilation, tuple) else (dilation, dilation)
    h = draw(st.integers(d[0] * (kh - 1) + 1, 13))
    w = draw(st.integers(d[1] * (kw - 1) + 1, 13))
    return {
        "shape": (t, s, kh, kw),
        "stride": stride,
        "dilation": dilation,
        "padding": padding,
        "input": (draw(st.integers(1, 3)), s, h, w),
        "rank": draw(st.integers(1, 4)),
        "bias": draw(st.booleans()),
        "seed": draw(st.integers(0, 10_000)),
    }


@pytest.mark.parametrize("method", METHODS)
@given(case=conv_cases())
def test_layer_equals_dense_conv(method: str, case: dict) -> None:
    assume(supports(method, case["shape"], case["rank"]))
    f = _factorization(method, case["shape"], case["rank"], case["seed"])
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    bias = (
        torch.randn(case["shape"][0], generator=gen, dtype=torch.float64) if case["bias"] else None
    )
    layer = tnconv.FactorizedConv2d(
        f, stride=case["stride"], padding=case["padding"], dilation=case["dilation"], bias=bias
    )
    x = torch.randn(case["input"], generator=gen, dtype=torch.float64)
    expected = F.conv2d(x, f.to_tensor(), bias, case["stride"], case["padding"], case["dilation"])
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_padding_modes_match_nn_conv(method: str, padding_mode: str) -> None:
    require_support(method, (5, 4, 3, 2))
    conv = nn.Conv2d(4, 5, (3, 2), stride=(2, 1), padding=(1, 1), padding_mode=padding_mode)
    conv = conv.double()
    layer = tnconv.FactorizedConv2d.from_conv(conv, method, 10**6)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_from_conv_copies_geometry_and_leaves_conv_untouched(method: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, dilation=1, bias=True).double()
    before = copy.deepcopy(conv.state_dict())
    layer = tnconv.FactorizedConv2d.from_conv(conv, method, 10**6)
    for k, v in conv.state_dict().items():
        assert torch.equal(v, before[k])
    assert layer.stride == (2, 2) and layer.padding == (1, 1) and layer.dilation == (1, 1)
    assert torch.equal(layer.bias.detach(), conv.bias.detach())
    assert layer.bias.data_ptr() != conv.bias.data_ptr()
    x = torch.randn(3, 6, 11, 10, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-8, atol=1e-9)
    assert layer.in_channels == 6 and layer.out_channels == 8 and layer.kernel_size == (3, 3)
    assert layer.method == method


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["ppocrv4_det/49_conv2d_156.w_0", "dlib_mmod/conv04"])
def test_real_kernel_layer(method: str, name: str) -> None:
    w = torch.tensor(REAL_3D[name])
    require_support(method, tuple(w.shape))
    conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], padding="same", bias=False)
    with torch.no_grad():
        conv.weight.copy_(w)
    layer = tnconv.FactorizedConv2d.from_conv(conv, method, ratio=0.3)
    x = torch.randn(2, w.shape[1], 15, 17)
    ref = F.conv2d(x, layer.to_tensor().detach(), None, 1, "same")
    # float32: a chain of small convs rounds differently from one dense conv
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_every_factor_and_match_dense(method: str) -> None:
    require_support(method, (6, 5, 3, 3), 3)
    f = _factorization(method, (6, 5, 3, 3), 3, 0)
    layer = tnconv.FactorizedConv2d(f, stride=2, padding=1, bias=True)
    x = torch.randn(2, 5, 9, 9, dtype=torch.float64)
    layer(x).square().sum().backward()
    # oracle: the same loss through the dense reconstruction, differentiated by autograd
    factors = [p.detach().clone().requires_grad_(True) for p in layer.factors]
    dense = tnconv.Factorization(factors, f.equation, f.shape, f.ranks).to_tensor()
    F.conv2d(x, dense, layer.bias.detach(), 2, 1).square().sum().backward()
    for p, ref in zip(layer.factors, factors, strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-8, atol=1e-10)
    assert layer.bias.grad is not None


@pytest.mark.parametrize("method", METHODS)
def test_fine_tuning_lowers_loss(method: str) -> None:
    torch.manual_seed(0)
    teacher = nn.Conv2d(8, 8, 3, padding=1)
    student = tnconv.FactorizedConv2d.from_conv(teacher, method, 2)
    # the target is the factorized kernel itself; the student starts from perturbed factors
    x = torch.randn(16, 8, 8, 8)
    target = student(x).detach()
    with torch.no_grad():
        for p in student.factors:
            p.mul_(1 + 0.3 * torch.randn_like(p))
    losses = adam_losses(student, x, target, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("method", METHODS)
@given(rank=st.integers(1, 5), stride=st.integers(1, 2), t=st.integers(1, 16), s=st.integers(1, 12))
def test_executed_flops_equal_plan(method: str, rank: int, stride: int, t: int, s: int) -> None:
    assume(supports(method, (t, s, 3, 3), rank))
    f = _factorization(method, (t, s, 3, 3), rank, 0)
    layer = tnconv.FactorizedConv2d(f, stride=stride, padding=1).float()
    x = torch.randn(4, s, 15, 15)
    plan = layer.plan_for(x.shape)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    assert counter.get_total_flops() == plan.flops == layer.flops(x.shape)


def test_plans_are_cached_per_shape() -> None:
    f = _factorization("tr", (8, 6, 3, 3), 2, 0)
    layer = tnconv.FactorizedConv2d(f, padding=1)
    a = layer.plan_for((2, 6, 8, 8))
    assert layer.plan_for((2, 6, 8, 8)) is a
    assert layer.plan_for((3, 6, 8, 8)) is not a


def test_unbatched_and_channels_last_and_float32() -> None:
    f = _factorization("tucker", (8, 6, 3, 3), 3, 0).to(torch.float32)
    layer = tnconv.FactorizedConv2d(f, padding=1)
    x = torch.randn(6, 10, 9)
    torch.testing.assert_close(layer(x), layer(x[None])[0])
    xb = torch.randn(2, 6, 10, 9)
    torch.testing.assert_close(
        layer(xb.to(memory_format=torch.channels_last)), layer(xb), rtol=1e-5, atol=1e-5
    )
    assert layer(xb).dtype == torch.float32


def test_to_conv2d_and_factorization_roundtrip() -> None:
    f = _factorization("tt", (8, 6, 3, 3), 3, 0)
    layer = tnconv.FactorizedConv2d(f, stride=1, padding=1, bias=True)
    dense = layer.to_conv2d()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(dense(x), layer(x))
    g = layer.factorization
    assert g.equation == f.equation and g.ranks == f.ranks and g.method == "tt"
    torch.testing.assert_close(g.to_tensor(), f.to_tensor())
    assert layer.num_params == f.num_params and layer.dense_params == 8 * 6 * 9
    assert "method='tt'" in repr(layer)


def test_grouped_channel_modes_execute() -> None:
    """A tensorised channel mode (T = 4 x 3 as two indices) runs like any other."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 2, generator=gen, dtype=torch.float64)  # t1 r
    b = torch.randn(3, 2, generator=gen, dtype=torch.float64)  # t2 r
    c = torch.randn(2, 5, 3, 3, generator=gen, dtype=torch.float64)  # r s h w
    f = tnconv.Factorization(
        [a, b, c], "xr,yr,rshw->xyshw", (12, 5, 3, 3), (2,), modes=("xy", "s", "h", "w")
    )
    layer = tnconv.FactorizedConv2d(f, padding=1, stride=2)
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.conv2d(x, f.to_tensor(), None, 2, 1))


def test_a_repeated_frozen_call_still_checks_what_it_skips() -> None:
    """A repeat of the last frozen call skips the input checks and reshapes; anything that is
    not that repeat goes through them: a wrong channel count, an unbatched map, a non-tensor."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    layer = tnconv.FactorizedConv2d.from_conv(conv, "tucker", (4, 4)).eval()
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        expected = F.conv2d(x, layer.factorization.to_tensor().float(), layer.bias, padding=1)
        for _ in range(2):
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        with pytest.raises(InputShapeError, match="channels"):
            layer(torch.randn(2, 5, 5, 5))
        with pytest.raises(TypeError, match=r"torch\.Tensor"):
            layer(x.numpy())
        for _ in range(2):  # unbatched: reshaped in and out, every time
            torch.testing.assert_close(layer(x[0]), expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_repeated_inference_calls_follow_every_change_to_the_layer(method: str) -> None:
    """Without autograd a layer keeps its last call's plan and folded weights (keyed by the
    input's shape and strides, the factors' storage and versions, the bias, the threads); each
    change below must be seen by the next call: oracle F.conv2d on the current kernel."""
    require_support(method, (8, 6, 3, 3), 2)
    layer = tnconv.FactorizedConv2d(_factorization(method, (8, 6, 3, 3), 2, 0), padding=1)
    layer = layer.float().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 6, 7, 7, generator=gen)

    def check(inp: torch.Tensor) -> None:
        with torch.no_grad():
            y = layer(inp)
            again = layer(inp)
        bias = None if layer.bias is None else layer.bias.detach()
        ref = F.conv2d(inp, layer.to_tensor().detach(), bias, 1, 1)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
        assert torch.equal(again, y)
        assert y.is_contiguous(memory_format=torch.channels_last) == (
            inp.is_contiguous(memory_format=torch.channels_last) and not inp.is_contiguous()
        )

    check(x)  # each change below comes right after a call on x: the next call on x sees it
    with torch.no_grad():
        layer.factors[0].mul_(-2.0)  # in place: a new version
    check(x)
    layer.factors[1] = nn.Parameter(layer.factors[1].detach() * 3.0)  # a new tensor
    check(x)
    layer.factors[0].data = layer.factors[0].detach() + 0.5  # new storage, same parameter
    check(x)
    layer.bias = nn.Parameter(torch.randn(8, generator=gen))  # a bias where there was none
    check(x)
    with torch.no_grad():
        layer.bias.add_(1.0)
    check(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)  # plans are per thread count
        check(x)
    finally:
        torch.set_num_threads(threads)
    with torch.inference_mode():
        y = layer(x)
    torch.testing.assert_close(
        y, F.conv2d(x, layer.to_tensor().detach(), layer.bias.detach(), 1, 1), rtol=1e-4, atol=1e-5
    )
    check(x)  # after an inference-mode call, plain no_grad again
    clone = copy.deepcopy(layer)  # the copy keeps nothing of the original's calls
    assert clone._memo is None
    with torch.no_grad():
        clone.factors[2].zero_()
    check(x)  # the original is unchanged by its copy
    check(torch.randn(3, 6, 7, 7, generator=gen))  # another shape
    check(torch.randn(3, 6, 7, 7, generator=gen).contiguous(memory_format=torch.channels_last))
    check(x)
