"""tnconv.quantize: error bounds, straight-through gradients, calibration, errors, save / load."""

from __future__ import annotations

import copy
import io
import os

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from safetensors import safe_open
from torch import nn

import tnconv
from tnconv.factorization import Factorization
from tnconv.io import LoadError, pack_codes, unpack_codes
from tnconv.quantization import (
    ActivationQuantizer,
    CalibrationError,
    QuantizationError,
    QuantizedConv2d,
    QuantizedFactorizedConv2d,
    QuantizedLinear,
    fake_quantize,
    quantize,
    quantize_weight,
    weight_scale,
)

from .conftest import adam_losses

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Stem, two compressible 3x3 convs (one strided), a pointwise conv and a linear head."""

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, width, 3, padding=1)
        self.a = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.b = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1)
        self.head = nn.Linear(2 * width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.a(x))
        return self.head(torch.relu(self.b(x)).mean(dim=(2, 3)))


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Net().eval()


def _inputs(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 2, 10, 10, generator=torch.Generator().manual_seed(seed))


COMPRESSED = ["a", "b"]
CP_FAST = {"n_init": 1, "max_iter": 60}  # CP's ALS is the slow fit; tests need no precision


def _compress(model: nn.Module, method: str, **kwargs: object) -> nn.Module:
    options = CP_FAST if method == "cp" else {}
    return tnconv.compress(model, method, layers=COMPRESSED, **kwargs, **options)


# ---------------------------------------------------------------------------------------------
# the quantizer itself
# ---------------------------------------------------------------------------------------------
@given(
    bits=st.integers(2, 8),
    axis=st.sampled_from([None, 0, 1, -1]),
    seed=st.integers(0, 2**16),
    log_scale=st.floats(-6, 4),
)
def test_weight_quantization_error_within_half_a_step(
    bits: int, axis: int | None, seed: int, log_scale: float
) -> None:
    w = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(seed)) * 10**log_scale
    codes, scale = quantize_weight(w, bits, axis)
    levels = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= levels
    err = (w - codes.float() * scale).abs()
    assert bool((err <= scale / 2 * (1 + 1e-6)).all())
    # the scale is the per-slice peak over the levels, up to the 16-bit rounding (upwards)
    dims = [d for d in range(3) if axis is None or d != axis % 3]
    peak = w.abs().amax(dim=dims, keepdim=True)
    assert bool((scale >= peak / levels).all())
    assert bool((scale <= peak / levels * (1 + 2**-15)).all())


@given(bits=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_weight_quantization_is_idempotent(bits: int, seed: int) -> None:
    """codes * scale quantizes to itself exactly: the basis of bit-exact reloading."""
    w = torch.randn(6, 7, generator=torch.Generator().manual_seed(seed)) * 3.7
    codes, scale = quantize_weight(w, bits, 0)
    deq = codes.float() * scale
    codes2, scale2 = quantize_weight(deq, bits, 0)
    assert torch.equal(codes, codes2) and torch.equal(scale, scale2)
    assert torch.equal(codes2.float() * scale2, deq)


def test_zero_channels_get_scale_one() -> None:
    w = torch.zeros(3, 4)
    w[1] = torch.linspace(-1, 1, 4)
    scale = weight_scale(w, 8, 0)
    assert scale[0].item() == 1.0 and scale[2].item() == 1.0
    codes, _ = quantize_weight(w, 8, 0)
    assert int(codes[0].abs().sum()) == 0


@given(bits=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_activation_quantizer_error_and_clipping(bits: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = ActivationQuantizer(bits)
    calib = torch.randn(200, generator=gen) * 2 + 0.5
    q.calibrating = True
    q(calib)
    q.calibrating = False
    q.eval()  # a fixed range (training mode follows the batches)
    scale, zero = q.qparams()
    lo, hi = (-zero * scale).item(), ((2**bits - 1 - zero) * scale).item()
    assert lo <= 0.0 <= hi
    x = torch.randn(500, generator=gen) * 3
    y = q(x)
    inside = (x >= lo) & (x <= hi)
    assert bool(((x - y).abs()[inside] <= scale / 2 * (1 + 1e-5)).all())
    assert torch.allclose(y[x > hi], torch.tensor(hi))
    assert torch.allclose(y[x < lo], torch.tensor(lo), atol=1e-6)
    assert len(torch.unique(y)) <= 2**bits


def test_straight_through_gradient_is_one_inside_and_zero_outside() -> None:
    x = torch.linspace(-3, 3, 61, requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.1), 0.0, -10, 10)
    g = torch.randn(61)
    y.backward(g)
    inside = (x.detach() / 0.1 >= -10.5) & (x.detach() / 0.1 <= 10.5)
    assert torch.equal(x.grad, g * inside)
    assert bool(inside.any() and (~inside).any())


def test_uncalibrated_quantizer_is_an_error() -> None:
    with pytest.raises(CalibrationError, match="never calibrated"):
        ActivationQuantizer(8)(torch.ones(3))


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------
def test_quantized_layer_runs_its_quantized_factors(method: str) -> None:
    """Weights only: the layer equals F.conv2d on the kernel rebuilt from the quantized factors,
    every factor is within half a step of the original, and STE gradients are the oracle's."""
    torch.manual_seed(3)
    conv = nn.Conv2d(12, 16, 3, padding=1, bias=True)
    options = CP_FAST if method == "cp" else {}
    layer = tnconv.FactorizedConv2d.from_conv(conv, method, ratio=0.5, **options)
    x = torch.randn(2, 12, 7, 7)
    model = nn.Sequential(layer)
    q = quantize(model, weight_bits=6, activation_bits=None, input_size=x.shape)[0]
    assert isinstance(q, QuantizedFactorizedConv2d)
    qf = q.quantized_factors()
    for f, fq, axis in zip(layer.factors, qf, q.axes, strict=True):
        scale = weight_scale(f, 6, axis)
        assert bool(((f - fq).abs() <= scale / 2 * (1 + 1e-6)).all())
    # oracle: the quantized factors as leaves, reconstructed and convolved densely
    leaves = [t.detach().clone().requires_grad_(True) for t in qf]
    network = Factorization(leaves, layer.equation, (16, 12, 3, 3), layer.ranks, modes=layer.modes)
    kernel = network.to_tensor()
    ref = F.conv2d(x, kernel, q.bias.detach(), 1, 1)
    y = q(x)
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    for p, leaf in zip(q.factors, leaves, strict=True):
        assert torch.allclose(p.grad, leaf.grad, atol=1e-5, rtol=1e-4)
    # the original layer is untouched
    assert all(p.grad is None for p in layer.factors)
    assert torch.equal(layer.factors[0], model[0].factors[0])


def test_per_channel_axis_is_the_conv_steps_output_channel() -> None:
    """Tucker-2 runs 1x1 (S->R_S), kxk (R_S->R_T), 1x1 (R_T->T): every factor's scales run along
    its output-channel mode (core: R_T, U_T: T, U_S: R_S)."""
    conv = nn.Conv2d(16, 24, 3, padding=1)
    layer = tnconv.FactorizedConv2d.from_conv(conv, "tucker", (6, 5))
    q = quantize(nn.Sequential(layer), 8, None, input_size=(4, 16, 9, 9))[0]
    assert q.path == ((0, 3), (0, 2), (0, 1))
    assert q.axes == (0, 0, 1)  # core (R_T, R_S, kh, kw), U_T (T, R_T), U_S (S, R_S)
    flat = quantize(nn.Sequential(layer), 8, None, per_channel=False, input_size=(4, 16, 9, 9))
    assert flat[0].axes == (None, None, None)


def test_quantize_whole_model_with_feature_maps(method: str) -> None:
    model = _net()
    before = copy.deepcopy(model.state_dict())
    small = _compress(model, method, ratio=0.5)
    x = _inputs()
    q8 = quantize(small, 8, 8, calibration=[(x, None)])
    kinds = {n: type(m) for n, m in q8.named_children()}
    assert kinds == {
        "stem": QuantizedConv2d,
        "a": QuantizedFactorizedConv2d,
        "b": QuantizedFactorizedConv2d,
        "head": QuantizedLinear,
    }
    for name in COMPRESSED:  # every feature map between the steps has its calibrated quantizer
        layer = q8.get_submodule(name)
        steps = layer.plan_for((8, layer.in_channels, 10, 10)).steps
        n_data = sum(type(s).__name__ == "DataStep" for s in steps)
        assert len(layer.between_quant) == n_data - 1
        assert all(b.calibrated for b in layer.between_quant)
    ref = small(x)
    err8 = (q8(x) - ref).norm() / ref.norm()
    q4 = quantize(small, 4, 4, calibration=[x])
    err4 = (q4(x) - ref).norm() / ref.norm()
    assert err8 < 0.05 and err8 < err4
    # nothing of the input models changed
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not any(isinstance(m, QuantizedFactorizedConv2d) for m in small.modules())


def test_quantized_model_fine_tunes() -> None:
    """Fine-tuning through the STE lowers the loss and moves the latent factors; feature-map
    ranges follow the training batches (here the logits grow far beyond their calibration)."""
    small = tnconv.compress(_net(), "tucker", ratio=0.4, layers=COMPRESSED)
    x = _inputs(32)
    labels = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(0))
    q = quantize(small, 4, 4, calibration=[x]).train()
    start = [p.detach().clone() for p in q.a.factors]
    hi_before = float(q.head.output_quant.hi)
    # 4-bit steps: a moderate rate (at 1e-2 Adam oscillated on some fits and the loss rose)
    losses = adam_losses(q, x, labels, lr=5e-3, steps=80, loss_fn=F.cross_entropy)
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(start[0], q.a.factors[0])
    assert q.head.output_quant.hi > hi_before


def test_quantize_errors() -> None:
    small = tnconv.compress(_net(), "tucker", ratio=0.5, layers=COMPRESSED)
    x = _inputs()
    for bad in (1, 9, 0, 8.0, True, "8"):
        with pytest.raises(QuantizationError, match="weight_bits"):
            quantize(small, bad, 8, calibration=[x])
        with pytest.raises(QuantizationError, match="activation_bits"):
            quantize(small, 8, bad, calibration=[x])
    assert issubclass(QuantizationError, ValueError)
    with pytest.raises(CalibrationError, match="empty"):
        quantize(small, 8, 8, calibration=[])
    with pytest.raises(CalibrationError, match="calibration"):
        quantize(small, 8, 8)
    with pytest.raises(CalibrationError, match="tensors"):
        quantize(small, 8, 8, calibration=["not a batch"])
    q = quantize(small, 8, 8, calibration=x)  # one tensor is one batch
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize(q, 8, 8, calibration=[x])
    with pytest.raises(TypeError):
        quantize("model", 8)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# storage
# ---------------------------------------------------------------------------------------------
@given(bits=st.integers(2, 8), n=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_pack_unpack_roundtrip(bits: int, n: int, seed: int) -> None:
    levels = 2 ** (bits - 1) - 1
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-levels, levels + 1, (n,), generator=gen).to(torch.int8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == -(-n * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, (n,)), codes)


@pytest.mark.parametrize(("bits", "method"), [(8, "tucker"), (4, "tucker"), (3, "tt"), (2, "cp")])
def test_save_load_bit_exact_and_smaller(bits: int, method: str, tmp_path) -> None:
    model = Net(width=24).eval()
    small = _compress(model, method, ratio=0.5)
    x = _inputs()
    q = quantize(small, bits, bits, calibration=[x]).eval()
    path = tmp_path / "q.pt"
    tnconv.save(q, path)
    for again in (tnconv.load(path, trusted=True), tnconv.load(path, model=Net(width=24))):
        again.eval()
        assert torch.equal(again(x), q(x))
        assert type(again.a) is QuantizedFactorizedConv2d and again.a.path == q.a.path
    with safe_open(str(path), "pt") as f:
        stored = f.get_tensor("__tnconv__.quantized.a.factors.0.codes")
        assert stored.dtype == (torch.int8 if bits == 8 else torch.uint8)
        assert stored.numel() == -(-q.a.factors[0].numel() * bits // 8)
        assert "a.factors.0" not in set(f.keys())
    fp32 = tmp_path / "fp32.pt"
    tnconv.save(small, fp32)
    weights = sum(p.numel() for p in q.parameters())
    # the file shrinks by at least half the bytes the codes save on fp32 (the rest: per-tensor
    # zip entries, the scales and the feature-map quantizers)
    assert os.path.getsize(fp32) - os.path.getsize(path) > 0.5 * weights * 4 * (1 - bits / 32)


def test_load_rejects_a_mismatched_quantized_layer(tmp_path) -> None:
    small = tnconv.compress(_net(), "tucker", ratio=0.5, layers=COMPRESSED)
    q = quantize(small, 8, 8, calibration=[_inputs()])
    tnconv.save(q, tmp_path / "q.pt")

    class Other(Net):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Identity()  # type: ignore[assignment]

    with pytest.raises(LoadError, match="head"):
        tnconv.load(tmp_path / "q.pt", model=Other())


def test_version_1_files_still_load(tmp_path) -> None:
    """A file as tnconv 0.1 wrote it: version 1 header, the module pickled with its weights."""
    small = tnconv.compress(_net(), "tt", ratio=0.5, layers=COMPRESSED)
    tnconv.save(small, tmp_path / "v2.pt")
    header = tnconv.io.read_header(tmp_path / "v2.pt").model_dump(mode="json")
    header["version"] = 1
    for key in ("quantized", "architecture"):
        header.pop(key)
    buffer = io.BytesIO()
    torch.save(small, buffer)
    torch.save(
        {"tnconv": header, "state_dict": small.state_dict(), "architecture": buffer.getvalue()},
        tmp_path / "v1.pt",
    )
    x = _inputs()
    assert torch.equal(tnconv.load(tmp_path / "v1.pt", trusted=True)(x), small(x))
    assert torch.equal(tnconv.load(tmp_path / "v1.pt", model=_net(5))(x), small(x))


# ---------------------------------------------------------------------------------------------
# int8 execution
# ---------------------------------------------------------------------------------------------
def test_int8_execution_matches_fake_quantization() -> None:
    """Tucker-2 runs its three steps on quantized::conv2d; the result is within one output step
    of the fake-quantized model (int32 accumulation vs float rounding), and layers that cannot
    run in int8 say why."""
    model = Net(width=16).eval()
    small = tnconv.compress(model, "tucker", ratio=0.4, layers=COMPRESSED)
    x = _inputs(16)
    q = quantize(small, 8, 8, calibration=[x]).eval()
    int8, left = tnconv.quantization.to_int8(q)
    assert left == {}
    assert type(int8.a).__name__ == "Int8FactorizedConv2d"
    with torch.no_grad():
        ref, out = q(x), int8(x)
    step = q.head.output_quant.qparams()[0]
    assert float((ref - out).abs().max()) <= float(step) * 1.001
    q4 = quantize(small, 8, 4, calibration=[x])
    _, left4 = tnconv.quantization.to_int8(q4)
    assert set(left4) == {"stem", "a", "b", "head"}
    assert all("8-bit" in r for r in left4.values())


@pytest.mark.parametrize("steps", ["conv", "planned"])
def test_strided_dilated_layer_in_either_step_order(steps: str) -> None:
    """Stride, dilation, a non-square kernel and a bias: weights-only quantization equals the
    oracle whatever the step order; with 8-bit feature maps the int8 kernels agree too."""
    torch.manual_seed(5)
    conv = nn.Conv2d(8, 12, (3, 2), stride=2, padding=(2, 1), dilation=(2, 1), bias=True)
    model = nn.Sequential(tnconv.FactorizedConv2d.from_conv(conv, "tucker", (5, 4)))
    x = torch.randn(3, 8, 11, 9)
    q = quantize(model, 5, None, input_size=x.shape, steps=steps)[0]
    kernel = q.to_tensor().detach()
    ref = F.conv2d(x, kernel, q.bias.detach(), 2, (2, 1), (2, 1))
    assert torch.allclose(q(x), ref, atol=1e-5, rtol=1e-4)
    q8 = quantize(model, 8, 8, calibration=[x], steps=steps).eval()
    int8, left = tnconv.quantization.to_int8(q8)
    if not left:
        step = q8[0].output_quant.qparams()[0]
        with torch.no_grad():
            assert float((int8(x) - q8(x)).abs().max()) <= float(step) * 1.001
    else:
        assert steps == "planned" and "multiplies factors" in left["0"]
    with pytest.raises(ValueError, match="steps"):
        quantize(model, 8, None, input_size=x.shape, steps="fast")  # type: ignore[arg-type]


def _kind_case(kind: str, method: str) -> tuple[nn.Module, torch.Tensor]:
    """A small factorized Linear (input with two leading axes), strided Conv1d or Conv3d."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(100)
    dense, x = {
        "linear": (lambda: nn.Linear(24, 20), (2, 8, 24)),
        "conv1d": (lambda: nn.Conv1d(12, 16, 3, stride=2, padding=1), (4, 12, 15)),
        "conv3d": (lambda: nn.Conv3d(8, 12, 3, padding=1), (2, 8, 4, 5, 6)),
    }[kind]
    layer = dense()
    options = CP_FAST if method == "cp" else {}
    factorized = tnconv.layers.factorized_type(layer).from_dense(
        layer, method, ratio=0.5, **options
    )
    return nn.Sequential(factorized).eval(), torch.randn(x, generator=gen)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv3d"])
@pytest.mark.parametrize("method", ["tucker", "tt", "cp", "rsdtr"])
def test_int8_execution_of_every_kind(method: str, kind: str) -> None:
    """Factorized Linear / Conv1d run their steps on quantized::conv2d (over the executor's
    (1, S, 1, M) / (B, S, 1, L) maps), Conv3d on quantized::conv3d; the outputs, in the layer's
    own shapes, are within one output step of fake quantization (measured: identical on x86 /
    fbgemm / onednn, one step on qnnpack). summary names the engine."""
    model, x = _kind_case(kind, method)
    q = quantize(model, 8, 8, calibration=[x]).eval()
    int8, left = tnconv.quantization.to_int8(q)
    assert left == {}
    assert type(int8[0]).__name__ == "Int8Factorized" + type(model[0]).__name__[len("Factorized") :]
    with torch.no_grad():
        ref, out = q(x), int8(x)
    assert out.shape == ref.shape == model(x).shape
    step = q[0].output_quant.qparams()[0]
    assert float((ref - out).abs().max()) <= float(step) * 1.001
    assert f"int8: {int8[0].engine}" in tnconv.quantization.quantization_note(q[0])


def test_int8_conv3d_missing_kernel_stays_fake_quantized(monkeypatch) -> None:
    """Where quantized::conv3d does not run (some PyTorch builds), a Conv3d layer stays
    fake-quantized with the reason, and building its int8 module is a QuantizationError."""
    from tnconv import quantization

    model, x = _kind_case("conv3d", "tucker")
    q = quantize(model, 8, 8, calibration=[x]).eval()
    monkeypatch.setattr(quantization, "_int8_conv_runs", lambda rank, engine: "no conv3d here")
    int8, left = quantization.to_int8(q)
    assert left == {"0": "no conv3d here"}
    assert isinstance(int8[0], quantization.QuantizedFactorizedConv3d)
    assert quantization.quantization_note(q[0]).endswith("int8: no")
    with pytest.raises(QuantizationError, match="no conv3d here"):
        quantization.Int8FactorizedConv3d(q[0])
