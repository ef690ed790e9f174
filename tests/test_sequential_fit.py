"""Sequential (asymmetric) output reconstruction: the paired statistics against F.conv2d on the
calibration inputs, the corrected kernel's defining properties, and compress(sequential=)."""

from __future__ import annotations

import copy
import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import tnconv
from tnconv.errors import OptionError
from tnconv.sequential_fit import PairedStatistics, fit_sequentially, forward_order

from .conftest import METHODS
from .test_data_aware import FAST, correlated_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def _conv(s: int, t: int, k: tuple[int, int], stride: int, padding: int, dilation: int, seed: int):
    torch.manual_seed(seed)
    return nn.Conv2d(s, t, k, stride, padding, dilation).double()


def _paired(conv: nn.Conv2d, seen: list, dense: list, **kw) -> PairedStatistics:
    paired = PairedStatistics(conv.weight, max_patches=None, **kw)
    for a, b in zip(seen, dense, strict=True):
        paired.update(conv, a, b)
    return paired


def _oracle(conv, x_seen, x_dense, kernel, bias) -> float:
    """||conv(x', W') + b' - conv(x, W) - b|| / ||conv(x, W)|| over all batches, by F.conv2d."""
    args = (conv.stride, conv.padding, conv.dilation)
    num = den = 0.0
    with torch.no_grad():
        for a, b in zip(x_seen, x_dense, strict=True):
            ref = F.conv2d(b, conv.weight, conv.bias, *args)
            out = F.conv2d(a, kernel, bias, *args)
            num += float((out - ref).square().sum())
            den += float(F.conv2d(b, conv.weight, None, *args).square().sum())
    return math.sqrt(num / den)


geometry = dict(
    k=st.sampled_from([(1, 1), (3, 3), (3, 1), (2, 3)]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    seed=st.integers(0, 1000),
)


def _inputs(s: int, seed: int, noise: float) -> tuple[list, list]:
    dense = [correlated_inputs(3, s, 9, seed + i) for i in range(2)]
    gen = torch.Generator().manual_seed(seed + 7)
    mix = torch.eye(s, dtype=torch.float64) + 0.3 * torch.randn(
        s, s, generator=gen, dtype=torch.float64
    )
    seen = [
        torch.einsum("sr,brhw->bshw", mix, x)
        + noise * torch.randn(x.shape, generator=gen, dtype=torch.float64)
        + 0.2
        for x in dense
    ]
    return seen, dense


@settings(max_examples=25, deadline=None)
@given(**geometry)
def test_paired_output_error_equals_the_conv_oracle(k, stride, padding, dilation, seed) -> None:
    """The error of any kernel and bias on the compressed inputs against the dense layer's
    outputs, from the streamed moments, is the one F.conv2d measures (two batches)."""
    conv = _conv(5, 4, k, stride, padding, dilation, seed)
    seen, dense = _inputs(5, seed, 0.1)
    paired = _paired(conv, seen, dense)
    gen = torch.Generator().manual_seed(seed)
    kernel = conv.weight.detach() + 0.3 * torch.randn(
        conv.weight.shape, generator=gen, dtype=torch.float64
    )
    bias = conv.bias.detach() + torch.randn(4, generator=gen, dtype=torch.float64)
    expected = _oracle(conv, seen, dense, kernel, bias)
    got = paired.output_error(kernel, bias - conv.bias.detach())
    assert got == pytest.approx(expected, rel=1e-7)
    assert paired.output_error(conv.weight) == pytest.approx(
        _oracle(conv, seen, dense, conv.weight.detach(), conv.bias.detach()), rel=1e-7
    )


@settings(max_examples=25, deadline=None)
@given(**geometry)
def test_the_corrected_kernel_and_bias_never_do_worse(k, stride, padding, dilation, seed) -> None:
    """W* minimises the ridge objective, so its error on the compressed inputs is at most the
    dense kernel's; the corrected bias matches the output means exactly (F.conv2d)."""
    conv = _conv(5, 4, k, stride, padding, dilation, seed)
    seen, dense = _inputs(5, seed, 0.3)
    paired = _paired(conv, seen, dense)
    target = paired.target_kernel()
    bias = paired.target_bias(conv.bias, target)
    plain = _oracle(conv, seen, dense, conv.weight.detach(), conv.bias.detach())
    corrected = _oracle(conv, seen, dense, target, conv.bias.detach())
    both = _oracle(conv, seen, dense, target, bias)
    assert corrected <= plain + 1e-9
    assert both <= corrected + 1e-9
    args = (conv.stride, conv.padding, conv.dilation)
    gap = sum(
        (F.conv2d(a, target, bias, *args) - F.conv2d(b, conv.weight, conv.bias, *args)).sum(
            dim=(0, 2, 3)
        )
        for a, b in zip(seen, dense, strict=True)
    )
    assert torch.allclose(gap, torch.zeros_like(gap), atol=1e-8)


def test_equal_inputs_leave_kernel_and_bias_as_they_are() -> None:
    conv = _conv(6, 5, (3, 3), 1, 1, 1, 0)
    x = [correlated_inputs(4, 6, 8, i) for i in range(2)]
    for limit in (10**6, 0):  # full patch moments, then the channel-only correction
        paired = _paired(conv, x, x, patch_limit=limit)
        assert torch.allclose(paired.target_kernel(), conv.weight.detach(), atol=1e-12)
        assert torch.allclose(paired.target_bias(conv.bias, conv.weight), conv.bias, atol=1e-12)


def test_channel_only_correction_undoes_a_channel_mixing() -> None:
    """Beyond the patch limit only the channel moments are kept: when the compressed model's
    input is the dense one mixed across channels (x' = A x), W* undoes the mixing."""
    conv = _conv(6, 5, (3, 3), 1, 1, 1, 1)
    dense = [correlated_inputs(4, 6, 8, 10 + i) for i in range(2)]
    gen = torch.Generator().manual_seed(3)
    mix = torch.eye(6, dtype=torch.float64) + 0.5 * torch.randn(
        6, 6, generator=gen, dtype=torch.float64
    )
    seen = [torch.einsum("sr,brhw->bshw", mix, x) for x in dense]
    paired = _paired(conv, seen, dense, patch_limit=0)
    assert paired.cross is None and math.isnan(paired.output_error(conv.weight))
    target = paired.target_kernel(damping=1e-8)
    plain = _oracle(conv, seen, dense, conv.weight.detach(), conv.bias.detach())
    fixed = _oracle(conv, seen, dense, target, conv.bias.detach())
    assert plain > 0.3 and fixed < 1e-3, (plain, fixed)


class Deep(nn.Module):
    """Four convs in a chain, the last one's map as the output: every layer's error reaches
    the output (no pooling to average it away)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.conv4 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return self.conv4(h).flatten(1)


def _chain() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Deep().eval(), correlated_inputs(16, 3, 8, 5).float()


@pytest.mark.parametrize("method", METHODS)
def test_sequential_compress_gets_closer_to_the_dense_logits(method: str) -> None:
    """Same ranks, every method: refitting in forward order on the compressed inputs brings the
    outputs on the calibration inputs closer to the dense model's than fitting each layer on
    the dense inputs; no layer's error in the compressed model is above its first fit's, and
    the reported error is the one F.conv2d measures there."""
    model, x = _chain()
    before = copy.deepcopy(model.state_dict())
    layers = ["conv2", "conv3", "conv4"]
    opts = FAST.get(method, {})
    common = dict(ratio=0.3, layers=layers, calibration=[x], **opts)
    plain = tnconv.compress(model, method, sequential=False, **common)
    seq = tnconv.compress(model, method, **common)  # the default with calibration
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for name in layers:
        assert seq.get_submodule(name).ranks == plain.get_submodule(name).ranks
    with torch.no_grad():
        ref = model(x)
        err = [float((m(x) - ref).norm() / ref.norm()) for m in (plain, seq)]
    assert err[1] < err[0], err
    for name in layers:
        info = seq.get_submodule(name).info
        assert info["sequential_error"] <= info["dense_input_error"] + 1e-9
    # the reported error: the layer in the compressed model against the dense layer
    seen, dense_in = {}, {}
    hooks = [
        seq.conv3.register_forward_pre_hook(lambda m, a: seen.update(x=a[0])),
        model.conv3.register_forward_pre_hook(lambda m, a: dense_in.update(x=a[0])),
    ]
    with torch.no_grad():
        seq(x), model(x)
        out = seq.conv3(seen["x"])
        ref3 = model.conv3(dense_in["x"])
        base = ref3 - model.conv3.bias[:, None, None]
    for h in hooks:
        h.remove()
    info = seq.conv3.info
    assert info["sequential"] and info["relative_error"] == info["sequential_error"]
    assert info["sequential_error"] == pytest.approx(
        float((out - ref3).norm() / base.norm()), rel=1e-3, abs=1e-5
    )
    kernel = seq.conv3.to_tensor().detach()
    assert info["kernel_error"] == pytest.approx(
        float((kernel - model.conv3.weight.detach()).norm() / model.conv3.weight.detach().norm()),
        rel=1e-4,
    )


def test_budget_compress_is_sequential_by_default_with_calibration() -> None:
    model, x = _chain()
    small = tnconv.compress(model, "tucker", budget=0.3, calibration=[x], layers=["conv2", "conv3"])
    assert small.conv2.info["sequential"] and small.conv3.info["sequential"]
    assert small.conv3.info["sequential_error"] <= small.conv3.info["dense_input_error"] + 1e-6
    params = small.conv2.num_params + small.conv3.num_params
    assert params <= 0.3 * (small.conv2.dense_params + small.conv3.dense_params)
    plain = tnconv.compress(model, "tucker", budget=0.3, layers=["conv2", "conv3"])
    assert "sequential" not in plain.conv3.info


def test_sequential_needs_calibration_and_is_an_option() -> None:
    model, x = _chain()
    with pytest.raises(OptionError, match="calibration"):
        tnconv.compress(model, "tucker", ratio=0.3, sequential=True)
    off = tnconv.compress(model, "tucker", ratio=0.3, calibration=[x], sequential=False)
    assert "sequential" not in off.conv2.info


def test_forward_order_and_the_driver_on_a_plain_conv_refit() -> None:
    """The driver visits layers in call order (not definition order) and installs what the
    refit returns; a dense refit of W* itself reproduces the corrected kernel."""

    class Backwards(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Conv2d(4, 4, 3, padding=1)
            self.early = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.late(torch.relu(self.early(x)))

    torch.manual_seed(0)
    dense = Backwards().eval()
    x = correlated_inputs(4, 3, 8, 1).float()
    assert forward_order(dense, ["late", "early"], x) == ["early", "late"]
    model = copy.deepcopy(dense)
    with torch.no_grad():
        model.early.weight.mul_(0.5)  # an upstream change the late layer must absorb
    with torch.no_grad():
        start = float((model(x) - dense(x)).norm() / dense(x).norm())
    visited = []

    def refit(name):
        def make(kernel, stats):
            visited.append(name)
            if name == "early":
                return None  # left as it is: halved
            conv = copy.deepcopy(dense.get_submodule(name))
            conv.weight.data.copy_(kernel)
            return conv

        return make

    report = fit_sequentially(model, dense, {"late": refit("late"), "early": refit("early")}, [x])
    assert torch.equal(model.early.weight, dense.early.weight * 0.5)
    assert visited == ["early", "late"]
    assert report["late"]["sequential_error"] < report["late"]["dense_input_error"]
    with torch.no_grad():
        gap = float((model(x) - dense(x)).norm() / dense(x).norm())
    assert gap < 0.6 * start, (gap, start)  # 0.236 -> 0.120: the ReLU before it is not linear


def test_one_pass_and_one_pass_per_layer_give_the_same_refits(monkeypatch) -> None:
    """With the dense model's layer inputs kept from one pass, every refit happens inside one
    pass of the compressed model (each layer refitted at its first call, the pass going on
    through it); without the cache, both models run up to each layer again: the same refits
    and errors."""
    import tnconv.sequential_fit as sf

    passes = []
    one_pass = sf._refit_in_one_pass
    monkeypatch.setattr(
        sf, "_refit_in_one_pass", lambda *a, **k: passes.append(1) or one_pass(*a, **k)
    )
    model, x = _chain()
    common = dict(ratio=0.3, layers=["conv2", "conv3", "conv4"], calibration=[x[:8], x[8:]])
    cached = tnconv.compress(model, "tucker", **common)
    assert passes == [1]
    monkeypatch.setattr(sf, "DENSE_CACHE_BYTES", 0)
    recomputed = tnconv.compress(model, "tucker", **common)
    assert passes == [1]
    for name in ("conv2", "conv3", "conv4"):
        a, b = cached.get_submodule(name), recomputed.get_submodule(name)
        assert a.info["sequential"] == b.info["sequential"]
        for key in ("sequential_error", "dense_input_error"):
            assert a.info[key] == pytest.approx(b.info[key], rel=1e-5, abs=1e-7)
        assert torch.allclose(a.to_tensor(), b.to_tensor(), rtol=1e-4, atol=1e-6)
        assert torch.allclose(a.bias, b.bias, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_sequential_compress_under_inference_mode_and_no_grad(mode) -> None:
    """Called inside inference_mode / no_grad, the refitted model equals the one made outside
    and can be trained (its parameters are ordinary tensors)."""
    model, x = _chain()
    common = dict(ratio=0.3, layers=["conv2", "conv3"], calibration=[x])
    outside = tnconv.compress(model, "tucker", **common)
    with mode():
        inside = tnconv.compress(model, "tucker", **common)
    for name in ("conv2", "conv3"):
        assert inside.get_submodule(name).info["sequential"]
        assert torch.allclose(
            inside.get_submodule(name).to_tensor(), outside.get_submodule(name).to_tensor()
        )
    assert not any(p.is_inference() for p in inside.parameters())
    inside(x).square().mean().backward()
    assert inside.conv3.bias.grad is not None


# -- the refit's finishing step: L-BFGS on the exact patch-moment objective ----------------------
def _conv_error(conv: nn.Conv2d, xs: list, kernel: torch.Tensor) -> float:
    """||conv(x, W') - conv(x, W)|| / ||conv(x, W)|| over ``xs``, by F.conv2d."""
    return _oracle(conv, xs, xs, kernel, conv.bias)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 1000))
def test_polish_never_raises_the_output_error_and_keeps_the_network(method: str, seed: int) -> None:
    """From any method's fit, the polished factors give a kernel whose output error on the
    calibration inputs (F.conv2d) is no higher, with the same equation, ranks and sizes."""
    from tnconv.decompositions.output_aware import polish
    from tnconv.statistics import InputStatistics, conv_patches

    conv = _conv(6, 8, (3, 3), 1, 1, 1, seed)
    xs = [correlated_inputs(4, 6, 8, seed + i) for i in range(2)]
    stats = InputStatistics(6, (3, 3), max_patches=None)
    for x in xs:
        stats.update(conv_patches(conv, x))
    w = conv.weight.detach()
    start = tnconv.get(method).factorize(w, 0.3, **FAST.get(method, {}))
    done = polish(start, w, stats.patch, iterations=30, damping=0.0)
    assert done.equation == start.equation and done.ranks == start.ranks
    assert [t.shape for t in done.factors] == [t.shape for t in start.factors]
    before = _conv_error(conv, xs, start.to_tensor())
    after = _conv_error(conv, xs, done.to_tensor())
    assert after <= before * (1 + 1e-9), (before, after)
    if done is not start:
        assert done.info["polish"]["after"] == pytest.approx(after, rel=1e-6, abs=1e-9)


def test_polish_recovers_an_exact_factorization_from_perturbed_factors() -> None:
    """A kernel of exact Tucker-2 ranks, its factors perturbed: the polish brings the output
    error from 0.2+ to near zero (the objective's minimum is the kernel itself)."""
    from tnconv.decompositions.output_aware import polish
    from tnconv.statistics import InputStatistics, conv_patches

    gen = torch.Generator().manual_seed(0)
    exact = tnconv.get("tucker").factorize(torch.randn(8, 6, 3, 3, generator=gen).double(), (3, 2))
    w = exact.to_tensor().detach()
    noisy = copy.copy(exact)
    noisy.factors = [f + 0.2 * torch.randn(f.shape, generator=gen).double() for f in exact.factors]
    conv = _conv(6, 8, (3, 3), 1, 1, 1, 0)
    with torch.no_grad():
        conv.weight.copy_(w)
    xs = [correlated_inputs(4, 6, 8, i) for i in range(2)]
    stats = InputStatistics(6, (3, 3), max_patches=None)
    for x in xs:
        stats.update(conv_patches(conv, x))
    done = polish(noisy, w, stats.patch, iterations=200, damping=0.0)
    assert _conv_error(conv, xs, noisy.to_tensor()) > 0.2
    assert _conv_error(conv, xs, done.to_tensor()) < 1e-3
