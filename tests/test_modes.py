"""Every public entry point under the autograd modes a deployment script uses.

Modes: ``torch.inference_mode()`` around the call, ``torch.no_grad()`` around it, weights that
are inference tensors (the model built inside ``inference_mode``, used outside it), frozen
weights (``requires_grad=False``), and weights on the meta device (shapes, no values: a typed
``InvalidWeightError`` where values are needed; ``from_scratch`` and ``summary`` work).

Every base method goes through ``factorize``, ``factorize_many``, ``from_conv``, ``from_scratch``
and ``compress`` in every mode; the heavier entry points (``study``, ``quantize``, ``ADMM``,
``analysis``) run over a subset of methods. Results must match the plain-mode result, and what
tnconv builds must be trainable afterwards (ordinary tensors, gradients reach the factors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

import tnconv
from tnconv import FactorizedConv2d
from tnconv.bn_folding import fold_batchnorm
from tnconv.errors import InvalidWeightError

from .conftest import METHODS

MODES = ["inference_mode", "no_grad", "inference_tensors", "frozen"]
HEAVY_METHODS = ["tt", "tucker", "stt"]  # a chain, a core and a semi-tensor network


def _net() -> nn.Sequential:
    """Two 3x3 convs (4 -> 8 -> 6 channels; even counts so the semi-tensor methods with t=2
    apply), a BatchNorm (running-stat buffers) and a linear head."""
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def make_net(mode: str) -> nn.Sequential:
    """The test network with its weights in the form ``mode`` asks for (seeded)."""
    torch.manual_seed(0)
    if mode == "inference_tensors":
        with torch.inference_mode():
            net = _net()
        assert net[3].weight.is_inference()
        return net
    if mode == "meta":
        with torch.device("meta"):
            return _net()
    net = _net()
    if mode == "frozen":
        net.requires_grad_(False)
    return net


@contextlib.contextmanager
def calling(mode: str) -> Iterator[None]:
    """The context the entry point is called in."""
    if mode == "inference_mode":
        with torch.inference_mode():
            yield
    elif mode == "no_grad":
        with torch.no_grad():
            yield
    else:
        yield


def x_in(c: int = 4) -> torch.Tensor:
    return torch.randn(2, c, 6, 6, generator=torch.Generator().manual_seed(1))


def assert_trainable(module: nn.Module, x: torch.Tensor) -> None:
    """Outside every special mode: a forward and backward pass reaches each trainable factor of
    every FactorizedConv2d (so nothing tnconv built is an inference tensor)."""
    layers = [m for m in module.modules() if isinstance(m, FactorizedConv2d)]
    assert layers, "expected factorized layers"
    for layer in layers:
        for p in layer.parameters():
            assert not p.is_inference()
            p.requires_grad_(True)
            p.grad = None
    module.train()
    module(x).square().sum().backward()
    for layer in layers:
        for f in layer.factors:
            assert f.grad is not None and torch.isfinite(f.grad).all()


def _reference(fn: Callable[[], object]) -> object:
    with torch.enable_grad():
        return fn()


# -- every method: factorize, factorize_many, from_conv, from_scratch, compress ----------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_factorize_and_factorize_many(method: str, mode: str) -> None:
    d = tnconv.get(method)
    w = make_net(mode)[3].weight  # (6, 8, 3, 3)
    expected = d.factorize(make_net("plain")[3].weight.detach().clone(), ratio=0.6)
    with calling(mode):
        f = d.factorize(w, ratio=0.6)
        many = d.factorize_many(w, [{"ratio": 0.6}, {"rank": d.min_ranks((6, 8, 3, 3))}])
    assert f.ranks == expected.ranks
    assert f.info["relative_error"] == pytest.approx(expected.info["relative_error"], rel=1e-5)
    assert many[0].ranks == f.ranks
    assert many[0].info["relative_error"] == pytest.approx(f.info["relative_error"], rel=1e-6)
    assert many[1].ranks == d.bond_ranks(d.min_ranks((6, 8, 3, 3)), (6, 8, 3, 3))
    for g in (f, *many):
        assert all(not t.is_inference() and not t.requires_grad for t in g.factors)
        assert torch.isfinite(g.to_tensor()).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_from_conv(method: str, mode: str) -> None:
    net = make_net(mode)
    with calling(mode):
        layer = FactorizedConv2d.from_conv(net[3], method, ratio=0.6)
        y = layer(x_in(8))
    ref = FactorizedConv2d.from_conv(make_net("plain")[3], method, ratio=0.6)
    with torch.no_grad():
        torch.testing.assert_close(y, ref(x_in(8)), rtol=1e-4, atol=1e-5)
    assert_trainable(layer, x_in(8))


@pytest.mark.parametrize("mode", [*MODES, "meta"])
@pytest.mark.parametrize("method", METHODS)
def test_from_scratch(method: str, mode: str) -> None:
    device = "meta" if mode == "meta" else None
    rank = tnconv.get(method).min_ranks((6, 8, 3, 3))
    with calling(mode):
        layer = FactorizedConv2d.from_scratch(method, 8, 6, 3, rank, padding=1, device=device)
    if mode == "meta":
        assert all(p.is_meta for p in layer.parameters())
        assert layer(x_in(8).to("meta")).shape == (2, 6, 6, 6)
        layer = layer.to_empty(device="cpu")  # then real values, as a checkpoint would bring
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    assert_trainable(layer, x_in(8))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_compress(method: str, mode: str) -> None:
    net = make_net(mode)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with calling(mode):
        small = tnconv.compress(net, method, ratio=0.6)
        y = small.eval()(x_in())
    ref = tnconv.compress(make_net("plain"), method, ratio=0.6).eval()
    with torch.no_grad():
        torch.testing.assert_close(y, ref(x_in()), rtol=1e-4, atol=1e-5)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the whole copy is made of ordinary tensors: BatchNorm's buffers update in training
    assert not any(t.is_inference() for t in (*small.parameters(), *small.buffers()))
    assert_trainable(small, x_in())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["tt", "tc", "rsdtr", "sttucker"])
def test_compress_budget_and_summary(method: str, mode: str) -> None:
    net = make_net(mode)
    with calling(mode):
        small = tnconv.compress(net, method, budget=0.6)
        table = tnconv.summary(small, (1, 4, 6, 6))
    ref = tnconv.summary(tnconv.compress(make_net("plain"), method, budget=0.6), (1, 4, 6, 6))
    assert [(r.name, r.ranks, r.params) for r in table.rows] == [
        (r.name, r.ranks, r.params) for r in ref.rows
    ]
    assert all(r.sensitivity is not None for r in table.rows if r.method != "dense")


# -- heavier entry points, a subset of methods --------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", HEAVY_METHODS)
def test_study(method: str, mode: str) -> None:
    net = make_net(mode)
    with calling(mode):
        result = tnconv.study(
            net, [method], budgets=(0.6,), input_size=(1, 4, 6, 6), latency_repeats=0,
            progress=False,
        )  # fmt: skip
        kernels = tnconv.study(
            {"k": net[3].weight}, [method], budgets=(0.6,), input_size=(1, 8, 6, 6),
            latency_repeats=0, progress=False,
        )  # fmt: skip
    rows = [r for r in result.rows if r.method == method]
    assert len(rows) == 1 and rows[0].params < rows[0].dense_params
    assert 0 < rows[0].error < 1
    rows = [r for r in kernels.rows if r.method == method]
    assert len(rows) == 1 and 0 < rows[0].error < 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", HEAVY_METHODS)
def test_quantize(method: str, mode: str) -> None:
    net = make_net(mode)
    with calling(mode):
        small = tnconv.compress(net, method, ratio=0.6)
        q = tnconv.quantize(small, 8, 8, calibration=[x_in()])
        y = q.eval()(x_in())
    assert y.shape == (2, 3) and torch.isfinite(y).all()
    with torch.no_grad():
        dense = small.eval()(x_in())
    assert float((y - dense).abs().max()) < 0.1 * float(dense.abs().max()) + 1e-3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", HEAVY_METHODS)
def test_admm(method: str, mode: str) -> None:
    net = make_net(mode)
    with calling(mode):
        admm = tnconv.ADMM(net, method, ratio=0.6)
        admm.step()
        penalty = admm.penalty()
        small = admm.compress()
    assert float(penalty) > 0
    assert sum(isinstance(m, FactorizedConv2d) for m in small.modules()) == 2
    if mode not in ("inference_tensors", "frozen"):
        # a model built normally can still be trained toward the decomposition afterwards,
        # even by a trainer made under inference_mode (its Z and U are ordinary tensors)
        admm.step()
        net.train()
        (net(x_in()).square().sum() + admm.penalty()).backward()
        assert net[3].weight.grad is not None


def _output_sum(model: nn.Module) -> float:
    """A stand-in metric for ``analysis.sweep`` (an evaluation runs without gradients)."""
    with torch.no_grad():
        return float(model.eval()(x_in()).sum())


@pytest.mark.parametrize("mode", MODES)
def test_analysis(mode: str) -> None:
    net = make_net(mode)
    w = net[3].weight
    ref_spectra = tnconv.analysis.hosvd_spectra(make_net("plain")[3].weight.detach())
    with calling(mode):
        cuts = tnconv.analysis.cuts(w)
        spectra = tnconv.analysis.hosvd_spectra(w)
        rows = tnconv.analysis.layer_table(net)
        small = tnconv.analysis.truncate(net, "OUT", 0.5)
        kernel, kept, loss = tnconv.analysis.truncate_kernel(w, "OUT,KH", 2)
        sweep = tnconv.analysis.sweep(net, _output_sum, ["OUT"], [0.5])
    assert len(cuts) == len(tnconv.analysis.CUTS) and rows
    for k, s in spectra.items():
        torch.testing.assert_close(torch.as_tensor(s), torch.as_tensor(ref_spectra[k]))
    assert kernel.shape == w.shape and kept == 2 and 0 < loss < 1
    assert tnconv.analysis.truncation_record(small) and sweep
    assert not any(t.is_inference() for t in small.parameters())


# -- meta-device weights: a typed error where values are needed ---------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_meta_weights_raise_a_typed_error(method: str) -> None:
    net = make_net("meta")
    with pytest.raises(InvalidWeightError, match="meta device"):
        tnconv.get(method).factorize(net[3].weight, ratio=0.6)
    with pytest.raises(InvalidWeightError, match="meta device"):
        tnconv.get(method).factorize_many(net[3].weight, [{"ratio": 0.6}])
    with pytest.raises(InvalidWeightError, match="meta device"):
        FactorizedConv2d.from_conv(net[3], method, ratio=0.6)
    with pytest.raises(InvalidWeightError, match=r"layer '0'.*meta device"):
        tnconv.compress(net, method, ratio=0.6)
    with pytest.raises(InvalidWeightError, match=r"layer '0'.*meta device"):
        tnconv.compress(net, method, budget=0.6)


def test_meta_model_entry_points() -> None:
    net = make_net("meta")
    with pytest.raises(InvalidWeightError, match=r"layer '0'.*meta device"):
        tnconv.ADMM(net, "tt", ratio=0.6)
    with pytest.raises(InvalidWeightError, match="meta device"):
        tnconv.study(net, ["tt"], budgets=(0.6,), input_size=(1, 4, 6, 6), progress=False)
    with pytest.raises(InvalidWeightError, match="meta device"):
        tnconv.analysis.cuts(net[3].weight)
    with pytest.raises(InvalidWeightError, match="meta device"):
        tnconv.analysis.layer_table(net)
    with pytest.raises(InvalidWeightError, match="meta device"):
        tnconv.quantize(net, 8, 8, calibration=[x_in()])
    # weight-only quantization of a skeleton needs no values: the weights quantize on the fly
    assert tnconv.quantize(net, 8, None)(x_in().to("meta")).shape == (2, 3)
    # a skeleton's summary needs no values: parameters and FLOPs, no sensitivities
    net[3] = FactorizedConv2d.from_scratch("tt", 8, 6, 3, 2, padding=1, device="meta")
    table = tnconv.summary(net, (1, 4, 6, 6))
    assert [r.method for r in table.rows] == ["dense", "tt", "dense"]  # conv, conv, linear head
    assert table.rows[1].params < table.rows[1].dense_params and table.rows[1].flops > 0
    assert table.rows[1].sensitivity is None
    with pytest.raises(InvalidWeightError, match="meta device"):
        tnconv.summary(net, (1, 4, 6, 6), latency=True)


# -- the caches keyed on version counters, with inference tensors -------------------------------


def test_reuse_sees_an_inference_kernel_changed_in_place() -> None:
    d = tnconv.get("tucker")
    with torch.inference_mode():
        w = torch.randn(6, 8, 3, 3, generator=torch.Generator().manual_seed(0))
        reuse: dict = {}
        first = d.factorize_many(w, [{"rank": 2}], reuse=reuse)[0]
        again = d.factorize_many(w, [{"rank": 2}], reuse=reuse)[0]
        w.mul_(-1.0).add_(torch.ones_like(w))  # no version counter records this
        changed = d.factorize_many(w, [{"rank": 2}], reuse=reuse)[0]
    torch.testing.assert_close(again.to_tensor(), first.to_tensor())
    fresh = d.factorize(w.clone(), rank=2)
    torch.testing.assert_close(changed.to_tensor(), fresh.to_tensor())
    assert not torch.allclose(changed.to_tensor(), first.to_tensor())


def test_folded_weights_follow_inference_factors_changed_in_place() -> None:
    layer = FactorizedConv2d.from_conv(make_net("plain")[3], "tt", rank=2).eval()
    with torch.inference_mode():
        inference_factor = layer.factors[0].detach().clone()
    layer.factors[0] = nn.Parameter(inference_factor, requires_grad=False)
    for p in layer.parameters():
        p.requires_grad_(False)
    x = x_in(8)
    with torch.inference_mode():
        y1 = layer(x)
        layer.factors[0].mul_(2.0)  # an in-place change no version counter sees
        y2 = layer(x)
    torch.testing.assert_close(y2, 2.0 * y1)


# -- BN folding (compress(fold_bn=True), inplace or not) with inference-tensor weights ----------

WEIGHTS = ["plain", "inference_tensors", "frozen"]
CALLS = ["plain", "inference_mode", "no_grad"]


def _bn_net(weights: str) -> nn.Sequential:
    """``make_net(weights)`` in eval mode with non-trivial BatchNorm statistics and affine
    parameters (set in the mode that may modify the net's tensors)."""
    net = make_net(weights)
    gen = torch.Generator().manual_seed(3)
    ctx = torch.inference_mode() if weights == "inference_tensors" else torch.no_grad()
    with ctx:
        bn = net[1]
        bn.running_mean.normal_(0, 0.5, generator=gen)
        bn.running_var.uniform_(0.5, 2.0, generator=gen)
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.normal_(0, 0.2, generator=gen)
    return net.eval()


def _assert_conv_trains(conv: nn.Module, x: torch.Tensor, frozen: bool) -> None:
    """The folded conv holds ordinary parameters (``requires_grad`` as the net's) and a backward
    pass outside every special mode reaches both."""
    params = [conv.weight, conv.bias]
    assert all(not p.is_inference() for p in params)
    assert all(p.requires_grad is not frozen for p in params)
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    conv(x).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_fold_batchnorm_in_every_mode(weights: str, call: str, inplace: bool) -> None:
    net = _bn_net(weights)
    with torch.inference_mode():
        expected = net(x_in()).clone()
    with calling(call):
        folded = fold_batchnorm(net, inplace=inplace)
    assert (folded is net) is inplace
    assert isinstance(folded[1], nn.Identity)
    assert isinstance(net[1], nn.Identity) is inplace
    with torch.no_grad():
        torch.testing.assert_close(folded(x_in()), expected, rtol=1e-5, atol=1e-6)
    if not inplace:  # a copy is ordinary tensors throughout: the whole model trains
        assert not any(t.is_inference() for t in (*folded.parameters(), *folded.buffers()))
    _assert_conv_trains(folded[0], x_in(), frozen=weights == "frozen")


def test_fold_batchnorm_inplace_keeps_an_ordinary_parameter_object() -> None:
    """In place on ordinary weights, the conv's parameters are updated, not replaced: an
    optimizer built on the model before folding still holds them."""
    net = _bn_net("plain")
    weight, bias = net[0].weight, net[0].bias
    fold_batchnorm(net, inplace=True)
    assert net[0].weight is weight and net[0].bias is bias


@pytest.mark.parametrize("weights", WEIGHTS)
def test_fold_batchnorm_gives_a_biasless_conv_a_bias_like_its_weight(weights: str) -> None:
    ctx = torch.inference_mode() if weights == "inference_tensors" else contextlib.nullcontext()
    with ctx:
        net = nn.Sequential(nn.Conv2d(4, 8, 3, bias=False), nn.BatchNorm2d(8)).eval()
    if weights == "frozen":
        net.requires_grad_(False)
    folded = fold_batchnorm(net, inplace=True)
    bias = folded[0].bias
    assert isinstance(bias, nn.Parameter) and not bias.is_inference()
    assert bias.requires_grad is (weights != "frozen")
    assert bias.dtype == folded[0].weight.dtype and bias.shape == (8,)


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_compress_fold_bn_in_every_mode(weights: str, call: str, inplace: bool) -> None:
    net = _bn_net(weights)
    with calling(call):
        small = tnconv.compress(net, "tucker", ratio=0.5, inplace=inplace, fold_bn=True)
    with torch.no_grad():  # the user's own inference tensors (inplace) run without autograd
        y = small.eval()(x_in())
    assert (small is net) is inplace
    assert isinstance(small[1], nn.Identity)
    ref = tnconv.compress(_bn_net("plain"), "tucker", ratio=0.5, fold_bn=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(y, ref(x_in()), rtol=1e-4, atol=1e-5)
    if inplace and weights == "inference_tensors":
        # the layers tnconv rebuilt are trainable; the user's untouched Linear head is still an
        # inference tensor (it cannot take part in a backward pass), so train the layers alone
        assert_trainable(small[0], x_in())
        assert_trainable(small[3], x_in(8))
    else:
        assert_trainable(small, x_in())
