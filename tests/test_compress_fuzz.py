"""Property-based fuzz of ``tnconv.compress`` over randomly generated small CNNs.

Models: sequential stacks and residual blocks, random channel counts, rectangular kernels of
sides 1 to 7, strides, paddings (ints, pairs, ``"same"``), dilations, padding modes, groups,
biases on / off, BatchNorm on / off, an optional linear head, float32 or float64. Every base
method at every spec kind (rank / eps / ratio / parameter budget / FLOP budget), with and without
calibration inputs (output-aware fits), models in train or eval mode (BN folded). The properties:

- ``compress`` returns a model whose output has the dense output's shape and is finite, or it
  raises a typed tnconv error (a subclass of ``TnconvError``); never anything else;
- every factorized layer computes the convolution of its input with its own kernel (the dense
  ``to_conv2d()`` equivalent), whatever its geometry and contraction order;
- an ``eps`` spec is honoured by every layer it factorizes (its kernel error) for the methods
  that guarantee it, on weight-only fits;
- the input model is never modified: same modules (identity), same parameter objects, same
  state_dict values, same train / eval flag;
- no example runs for long: hypothesis' per-example deadline, and a hard alarm that turns a
  hang into a failure instead of a stuck test run.

The committed settings keep the file fast (a few examples per method and spec kind, derandomised
in CI); ``HYPOTHESIS_PROFILE=thorough`` runs many more.
"""

from __future__ import annotations

import contextlib
import math
import signal
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tnconv
from tnconv import FactorizedConv2d
from tnconv.errors import TnconvError

from .conftest import METHODS

SPEC_KINDS = ["rank", "eps", "ratio", "budget", "flops_budget"]
# per-example limits: the slowest examples (CP budget allocation over three 12x12x7x7 layers with
# calibration inputs) take ~9 s of CPU on one thread; the deadline leaves room for a loaded
# machine, and the alarm turns a real hang into a failure
DEADLINE_MS = 30_000
HARD_TIMEOUT_S = 120
EXAMPLES = settings().max_examples  # 20 in CI ("ci" profile), 200 with "thorough"


@contextlib.contextmanager
def hard_timeout(seconds: int) -> Iterator[None]:
    """Raise ``TimeoutError`` in the main thread if the block runs longer than ``seconds``."""

    def fire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"compress ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Residual(nn.Module):
    """``body(x) + skip(x)`` (skip: identity or a 1x1 projection conv)."""

    def __init__(self, body: nn.Module, skip: nn.Module) -> None:
        super().__init__()
        self.body, self.skip = body, skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


@dataclass
class Net:
    """A generated model, its input size (B, C, H, W) and a description for failure reports."""

    model: nn.Module
    input_size: tuple[int, int, int, int]
    description: str

    def __repr__(self) -> str:
        return f"Net({self.description}, input {self.input_size})"


def _out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@st.composite
def conv_args(
    draw: st.DrawFn, cin: int, h: int, w: int, cout: int | None = None, same: bool = False
) -> tuple[dict[str, Any], int, int, int]:
    """Keyword arguments of one ``nn.Conv2d`` from ``cin`` channels at (h, w), with its output
    (channels, h', w'). ``same``: stride 1 and an output of the input's size (for residual
    bodies); ``cout``: a fixed output channel count."""
    groups = draw(st.sampled_from([g for g in range(1, cin + 1) if cin % g == 0]))
    if cout is None:
        cout = groups * draw(st.integers(1, max(1, 12 // groups)))
    elif cout % groups:
        groups = 1
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    args: dict[str, Any] = dict(
        in_channels=cin,
        out_channels=cout,
        kernel_size=(kh, kw),
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
    )
    if same:
        args["padding"] = "same"
        stride = (1, 1)
    else:
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
        padding: Any = (
            draw(st.integers(0, dilation[0] * (kh - 1) // 2 + 1)),
            draw(st.integers(0, dilation[1] * (kw - 1) // 2 + 1)),
        )
        if padding[0] == padding[1] and draw(st.booleans()):
            padding = padding[0]
        if stride == (1, 1) and draw(st.integers(0, 4)) == 0:
            padding = "same"
        args.update(stride=stride, padding=padding)
    pad = args["padding"]
    if pad == "same":
        oh, ow = h, w
        pads = ((dilation[0] * (kh - 1) + 1) // 2, (dilation[1] * (kw - 1) + 1) // 2)
    else:
        pads = (pad, pad) if isinstance(pad, int) else pad
        oh = _out(h, kh, stride[0], pads[0], dilation[0])
        ow = _out(w, kw, stride[1], pads[1], dilation[1])
    modes = ["zeros", "zeros", "replicate"]
    if max(pads) <= min(h, w):  # torch's own limits for the other modes
        modes.append("circular")
    if max(pads) < min(h, w):
        modes.append("reflect")
    args["padding_mode"] = draw(st.sampled_from(modes))
    return args, cout, oh, ow


@st.composite
def cnns(draw: st.DrawFn) -> Net:
    """A small random CNN (weights seeded by the draw) and its input size."""
    seed = draw(st.integers(0, 2**16))
    c0 = draw(st.integers(1, 6))
    h, w = draw(st.integers(5, 14)), draw(st.integers(5, 14))
    size = (2, c0, h, w)
    parts: list[tuple[str, Any]] = []
    c = c0
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):  # a plain conv (+ BN) + ReLU
            args, cout, oh, ow = draw(conv_args(c, h, w))
            if oh < 1 or ow < 1:
                break
            parts.append(("conv", args))
            if draw(st.booleans()):
                parts.append(("bn", cout))
            parts.append(("relu", None))
            c, h, w = cout, oh, ow
        else:  # a residual block: two 'same' convs, identity or 1x1 projection skip
            a1, mid, _, _ = draw(conv_args(c, h, w, same=True))
            cout = draw(st.integers(1, 12))
            a2, _, _, _ = draw(conv_args(mid, h, w, cout=cout, same=True))
            bn = draw(st.booleans())
            project = cout != c or draw(st.booleans())
            parts.append(("res", (a1, a2, bn, project, c, cout)))
            parts.append(("relu", None))
            c = cout
    head = draw(st.booleans())
    torch.manual_seed(seed)
    modules: list[nn.Module] = []
    desc: list[str] = []
    for kind, arg in parts:
        if kind == "conv":
            modules.append(nn.Conv2d(**arg))
            desc.append(f"conv{arg}")
        elif kind == "bn":
            modules.append(nn.BatchNorm2d(arg))
            desc.append("bn")
        elif kind == "relu":
            modules.append(nn.ReLU())
        else:
            a1, a2, bn, project, cin, cout = arg
            body = [nn.Conv2d(**a1)]
            if bn:
                body.append(nn.BatchNorm2d(a1["out_channels"]))
            body += [nn.ReLU(), nn.Conv2d(**a2)]
            skip = nn.Conv2d(cin, cout, 1, bias=False) if project else nn.Identity()
            modules.append(Residual(nn.Sequential(*body), skip))
            desc.append(f"res(conv{a1}, conv{a2}, bn={bn}, project={project})")
    if not modules:
        modules.append(nn.Conv2d(c0, 4, 1))
        desc.append("conv1x1")
    if head:
        modules += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LazyLinear(3)]
        desc.append("head")
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64]))
    model = nn.Sequential(*modules)
    with torch.no_grad():
        model(torch.zeros(size))  # materialises the lazy head; every generated net runs
        model.to(dtype)
        for m in model.modules():  # BatchNorm with non-trivial statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    model.train(draw(st.booleans()))
    return Net(model, size, " -> ".join(desc) + f" [{dtype}]")


@st.composite
def spec_of(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    """``compress`` keyword arguments for one spec kind."""
    if kind == "rank":
        return {"rank": draw(st.integers(1, 6))}
    if kind == "eps":
        return {"eps": draw(st.floats(0.02, 0.9))}
    if kind == "ratio":
        return {"ratio": draw(st.floats(0.02, 1.0))}
    if kind == "budget":
        return {"budget": draw(st.floats(0.05, 1.0))}
    return {"budget": ("flops", draw(st.floats(0.05, 1.0)))}


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "modules": [(n, id(m)) for n, m in model.named_modules()],
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "attrs": sorted(vars(model)),
    }


def _assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = _snapshot(model)
    assert after["modules"] == before["modules"], "compress replaced modules of its input"
    assert after["params"] == before["params"], "compress replaced parameters of its input"
    assert after["training"] == before["training"], "compress changed train / eval flags"
    assert after["attrs"] == before["attrs"], "compress set attributes on its input"
    assert after["state"].keys() == before["state"].keys()
    for k, v in after["state"].items():
        assert torch.equal(v, before["state"][k]), f"compress modified {k} of its input"


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch, dense nets
@pytest.mark.parametrize("kind", SPEC_KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_compress_fuzz(method: str, kind: str) -> None:
    # a few examples per (method, kind): 50 pairs share the profile's example count
    n = max(2, math.ceil(EXAMPLES / 7))

    @settings(
        max_examples=n,
        deadline=DEADLINE_MS,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(net=cnns(), spec=spec_of(kind), data_aware=st.booleans())
    def check(net: Net, spec: dict[str, Any], data_aware: bool) -> None:
        model = net.model
        dtype = next(model.parameters()).dtype
        x = torch.randn(net.input_size, generator=torch.Generator().manual_seed(0), dtype=dtype)
        if data_aware:  # output-aware fits on calibration inputs
            spec = {**spec, "calibration": [x]}
        with torch.no_grad():
            was = model.training
            dense_out = model.eval()(x)
            model.train(was)
        before = _snapshot(model)
        try:
            with hard_timeout(HARD_TIMEOUT_S), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # degenerate CP fits warn; not the subject
                small = tnconv.compress(
                    model, method, input_size=net.input_size, progress=False, **spec
                )
        except TnconvError:
            _assert_unchanged(model, before)
            return
        _assert_unchanged(model, before)
        assert small is not model
        assert small.training == model.training
        layers = [m for m in small.modules() if isinstance(m, FactorizedConv2d)]
        seen: list[tuple[FactorizedConv2d, torch.Tensor, torch.Tensor]] = []
        hooks = [
            m.register_forward_hook(lambda m, args, y: seen.append((m, args[0], y))) for m in layers
        ]
        with torch.no_grad():
            out = small.eval()(x)
        for h in hooks:
            h.remove()
        assert out.shape == dense_out.shape
        assert torch.isfinite(out).all()
        # each factorized layer computes the convolution with its own kernel, whatever the
        # stride / padding / dilation / padding mode and the contraction order chosen
        tol = 1e-4 if x.dtype == torch.float32 else 1e-9
        for layer, inp, y in seen:
            with torch.no_grad():
                expected = layer.to_conv2d()(inp)
            assert y.shape == expected.shape
            scale = float(expected.abs().max()) + float(inp.abs().max()) * 1e-3
            assert float((y - expected).abs().max()) <= tol * scale, layer
        # with calibration inputs the fit bounds a model of the output error (mode-wise input
        # moments), not the exact output error it reports: the fuzz found it up to 6% over eps
        # (tt / tr at eps=0.375 on a 1x3x2x4 kernel: 0.399; also rsdtr, tucker, stt), so the
        # bound is checked on weight-only fits (see the i21-modes report)
        if "eps" in spec and tnconv.get(method).guarantees_eps and not data_aware:
            for layer in layers:
                assert layer.info["relative_error"] <= spec["eps"] * (1 + 1e-6) + 1e-7

    check()
