"""Real int8 execution on every quantized engine of this machine, and on x86 kernels without
VNNI (forced through the variables FBGEMM and oneDNN read), against fake quantization on
adversarial inputs: feature maps at the ends of their range and weights near +-127 codes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import tnconv
from tnconv.quantization import _isa_capped_below_vnni as isa_capped
from tnconv.quantization import (
    default_reduce_range,
    int8_engine,
    int8_saturates,
    quantize,
    quantized_layers,
    to_int8,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ENGINES = [e for e in torch.backends.quantized.supported_engines if e != "none"]
X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
NO_VNNI = {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def adversarial_model(seed: int = 0) -> nn.Sequential:
    """A dense conv, a Tucker-2 conv and a linear head whose weights sit at +-max: every
    per-channel code is +-127, the case where two u8 x s8 products overflow int16."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(32, 48, 3, padding=1)
    factorized = tnconv.FactorizedConv2d.from_conv(nn.Conv2d(48, 48, 3, padding=1), "tucker", 12)
    with torch.no_grad():
        conv.weight.copy_(torch.sign(torch.randn_like(conv.weight)))
        for f in factorized.factors:
            f.copy_(torch.sign(torch.randn_like(f)) * f.abs().amax())
    return nn.Sequential(conv, factorized, nn.Flatten(), nn.Linear(48 * 6 * 6, 10))


def adversarial_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration batch, and an evaluation batch at and beyond the calibrated range's ends."""
    gen = torch.Generator().manual_seed(seed)
    calib = torch.rand(4, 32, 6, 6, generator=gen) * 4
    extreme = torch.where(torch.rand(4, 32, 6, 6, generator=gen) < 0.5, 0.0, 6.0)
    return calib, extreme


def worst_steps(engine: str, reduce_range: bool) -> tuple[float, dict[str, str]]:
    """Largest |int8 - fake quantization| of each quantized layer's output, in output steps."""
    model = adversarial_model()
    calib, extreme = adversarial_inputs()
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        q = quantize(model, 8, 8, calibration=[calib], reduce_range=reduce_range).eval()
        int8, left = to_int8(q)
    finally:
        torch.backends.quantized.engine = before
    assert left == {}
    engines = {name: m.engine for name, m in int8.named_modules() if hasattr(m, "engine")}
    worst = 0.0
    with torch.no_grad():
        # compare layer by layer on the same (fake-quantized) inputs, so errors do not compound
        h = extreme
        for k, layer in enumerate(q):
            reference = layer(h)
            if k in (0, 1, 3):
                out = int8[k](h)
                step = float(layer.output_quant.qparams()[0])
                worst = max(worst, float((out - reference).abs().max()) / step)
            h = reference
    return worst, engines


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("reduce_range", [True, False])
def test_int8_matches_fake_quantization_on_adversarial_inputs(
    engine: str, reduce_range: bool
) -> None:
    """Within one output step on every engine this machine has, with either feature-map range:
    a layer whose engine could saturate here runs on qnnpack instead."""
    worst, engines = worst_steps(engine, reduce_range)
    assert worst <= 1.001, f"{engine}: int8 is {worst:.2f} steps off"
    expected = engine if reduce_range or not int8_saturates(engine) else "qnnpack"
    assert set(engines.values()) == {expected}


def test_reduce_range_halves_the_feature_map_codes() -> None:
    model = adversarial_model()
    calib, _extreme = adversarial_inputs()
    q = quantize(model, 8, 8, calibration=[calib], reduce_range=True).eval()
    for _, layer in quantized_layers(q):
        assert layer.config.reduce_range and layer.output_quant.top == 127
        scale, zero = layer.output_quant.qparams()
        y = layer.output_quant(torch.linspace(-50, 50, 101))
        codes = torch.round(y / scale + zero)
        assert int(codes.min()) >= 0 and int(codes.max()) <= 127
    assert "reduce_range=True" in repr(q)
    full = quantize(model, 8, 8, calibration=[calib], reduce_range=False)
    assert all(layer.output_quant.top == 255 for _, layer in quantized_layers(full))


def test_reduce_range_survives_save_and_load(tmp_path) -> None:
    model = adversarial_model()
    calib, _ = adversarial_inputs()
    q = quantize(model, 8, 8, calibration=[calib], reduce_range=True).eval()
    path = tmp_path / "q.tnconv"
    tnconv.save(q, path)
    back = tnconv.load(path, model=adversarial_model()).eval()
    assert all(layer.config.reduce_range for _, layer in quantized_layers(back))
    with torch.no_grad():
        assert torch.equal(back(calib), q(calib))


def test_default_reduce_range_follows_the_engine() -> None:
    assert default_reduce_range("x86") and default_reduce_range("fbgemm")
    assert default_reduce_range("onednn") and not default_reduce_range("qnnpack")
    assert not int8_saturates("qnnpack")


def test_unknown_engine_is_a_typed_error() -> None:
    q = quantize(adversarial_model(), 8, 8, calibration=[adversarial_inputs()[0]])
    layer = quantized_layers(q)[0][1]
    with pytest.raises(tnconv.quantization.QuantizationError, match="not available"):
        int8_engine(layer, "no-such-engine")


@pytest.mark.parametrize(
    ("env", "engine", "capped"),
    [
        ({"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}, "fbgemm", True),
        ({"FBGEMM_ENABLE_INSTRUCTIONS": "AVX512_E1"}, "fbgemm", False),
        ({"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}, "onednn", False),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, "onednn", True),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, "onednn", False),
        ({"DNNL_MAX_CPU_ISA": "avx2"}, "x86", True),
        ({"ONEDNN_MAX_CPU_ISA": "ALL"}, "x86", False),
        ({}, "x86", False),
    ],
)
def test_isa_caps_are_read_like_the_libraries_do(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], engine: str, capped: bool
) -> None:
    for name in ("FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert isa_capped(engine) is capped
    if capped:
        assert int8_saturates(engine)


NO_VNNI_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_int8_engines import worst_steps
    from tnconv.quantization import int8_saturates

    torch.set_num_threads(1)
    assert int8_saturates("x86") and int8_saturates("fbgemm") and int8_saturates("onednn")
    # the forced kernels really saturate: u8 255 x s8 127 summed over 64 channels
    x = torch.quantize_per_tensor(torch.full((1, 64, 2, 2), 255.0), 1.0, 0, torch.quint8)
    w = torch._make_per_channel_quantized_tensor(
        torch.full((4, 64, 1, 1), 127, dtype=torch.int8),
        torch.ones(4, dtype=torch.double), torch.zeros(4, dtype=torch.long), 0)
    exact = 255 * 127 * 64
    for engine in ("fbgemm", "onednn"):
        torch.backends.quantized.engine = engine
        packed = torch.ops.quantized.conv2d_prepack(w, None, [1, 1], [0, 0], [1, 1], 1)
        y = torch.ops.quantized.conv2d(x, packed, exact / 100, 0).dequantize()
        assert float(y.max()) < 0.9 * exact, (engine, float(y.max()))
    for engine in {engines!r}:
        for reduce_range in (True, False):
            worst, used = worst_steps(engine, reduce_range)
            assert worst <= 1.001, (engine, reduce_range, worst)
            if not reduce_range and engine != "qnnpack":
                assert set(used.values()) == {{"qnnpack"}}, used
    print("ok")
    """
)


@pytest.mark.skipif(not X86, reason="FBGEMM / oneDNN instruction caps exist on x86 only")
@pytest.mark.skipif(
    not {"fbgemm", "onednn", "qnnpack"} <= set(ENGINES), reason="needs fbgemm, onednn, qnnpack"
)
def test_no_vnni_kernels_are_exact_through_reduce_range_or_qnnpack() -> None:
    """The CPU of the failure report (AVX2, no VNNI), forced on this one: the raw x86 kernels
    saturate there, and tnconv's int8 path is still within one step on every engine."""
    tests = os.path.dirname(__file__)
    script = NO_VNNI_SCRIPT.format(tests=tests, engines=ENGINES)
    env = {**os.environ, **NO_VNNI, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_summary_names_the_range_and_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    calib, _ = adversarial_inputs()
    q = quantize(adversarial_model(), 8, 8, calibration=[calib], reduce_range=False)
    notes = [r.note for r in tnconv.summary(q, (1, 32, 6, 6)).rows]
    engine = torch.backends.quantized.engine
    expected = "qnnpack (fallback)" if int8_saturates(engine) else engine
    assert notes and all(n.endswith(f"256 levels), int8: {expected}") for n in notes), notes
    # a CPU whose engine saturates: the summary says the layers run on qnnpack instead
    monkeypatch.setattr(tnconv.quantization, "int8_saturates", lambda engine=None: True)
    notes = [r.note for r in tnconv.summary(q, (1, 32, 6, 6)).rows]
    if "qnnpack" in ENGINES:
        assert all(n.endswith("int8: qnnpack (fallback)") for n in notes), notes
    q7 = quantize(adversarial_model(), 8, 8, calibration=[calib], reduce_range=True)
    notes = [r.note for r in tnconv.summary(q7, (1, 32, 6, 6)).rows]
    assert all(n.endswith(f"(128 levels, reduce_range), int8: {engine}") for n in notes), notes
    w4 = quantize(adversarial_model(), 4, None, input_size=(1, 32, 6, 6))
    assert all(r.note == "w4, int8: no" for r in tnconv.summary(w4, (1, 32, 6, 6)).rows)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_code_clamp_equals_the_float_clamp(engine: str, channels_last: bool) -> None:
    """The reduced range's code clamp on requantized outputs, on every engine and layout (torch's
    qnnpack clamp is wrong on channels-last tensors; tnconv works around it)."""
    from tnconv.quantization import _clamp_codes, _quantized_engine

    x = torch.linspace(-1, 3, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _quantized_engine(engine):
        q = torch.quantize_per_tensor(x, 0.02, 50, torch.quint8)
        clamped = _clamp_codes(q, 127)
    assert int(clamped.int_repr().max()) == 127
    assert torch.equal(clamped.dequantize(), q.dequantize().clamp(-1.0, 77 * 0.02))
