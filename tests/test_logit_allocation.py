"""compress(allocate_by="logits"): each candidate priced by the error at the model's outputs with
that one layer replaced, checked against replacing the layer by hand and running the model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tnconv
from tnconv.allocation import layer_from_conv
from tnconv.compress import set_module
from tnconv.errors import OptionError
from tnconv.logit_error import LogitProbe

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """Stem, a residual pair (the shortcut is a value the layer's suffix needs), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(12, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        r = torch.relu(self.conv1(h))
        h = torch.relu(self.conv2(r) + h)
        return self.head(h.mean(dim=(2, 3)))


class Untraceable(Block):
    """The same network with data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out * 0 if float(out.abs().sum()) > 1e12 else out


class Loud(nn.Module):
    """Two parallel convs of the same input; the second's output is scaled down 100x before the
    head, so its errors barely reach the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.loud = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.quiet = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.head = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.loud(x) + 0.01 * self.quiet(x))
        return self.head(h.mean(dim=(2, 3)))


def batches(channels: int, n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(8, channels, 10, 10, generator=gen) for _ in range(n)]


def output_error(model: nn.Module, small: nn.Module, xs: list[torch.Tensor]) -> float:
    """Relative error of ``small``'s outputs against ``model``'s over the inputs ``xs``."""
    with torch.no_grad():
        num = sum(float((small(x) - model(x)).norm()) ** 2 for x in xs)
        den = sum(float(model(x).norm()) ** 2 for x in xs)
    return (num / den) ** 0.5


def by_hand(model: nn.Module, name: str, module: nn.Module, xs: list[torch.Tensor]) -> float:
    """The oracle: the layer replaced in a copy of the model, the whole model run."""
    other = copy.deepcopy(model)
    set_module(other, name, copy.deepcopy(module))
    num = den = 0.0
    with torch.no_grad():
        for x in xs:
            ref, out = model(x).double(), other(x).double()
            num += float((out - ref).square().sum())
            den += float(ref.square().sum())
    return (num / den) ** 0.5


@pytest.mark.parametrize("make", [Block, Untraceable])
@pytest.mark.parametrize("name", ["stem", "conv1", "conv2"])
def test_logit_error_equals_replacing_the_layer_by_hand(make: type, name: str) -> None:
    torch.manual_seed(0)
    model = make().eval()
    xs = batches(3)
    probe = LogitProbe(model, xs, max_samples=20)  # 8 + 8 + 4 of the 24 inputs
    used = [xs[0], xs[1], xs[2][:4]]
    conv = model.get_submodule(name)
    for ratio in (0.2, 0.5):
        f = tnconv.get("tucker").factorize(conv.weight.detach(), ratio=ratio)
        layer = layer_from_conv(conv, f)
        got = probe.error(name, layer)
        assert got > 1e-4
        assert got == pytest.approx(by_hand(model, name, layer, used), rel=1e-5)
    assert (probe.graph is None) == (make is Untraceable)
    assert probe.error(name, conv) == pytest.approx(0.0, abs=1e-6)  # the dense layer itself


def test_compress_by_logits_records_the_logit_errors_and_weighs_layers_by_them(
    monkeypatch,
) -> None:
    import tnconv.sequential_fit as sf

    monkeypatch.setattr(sf, "POLISH_ITERATIONS", 0)  # the layers as the allocation priced them
    torch.manual_seed(0)
    model = Loud().eval()
    xs = batches(8, n=2, seed=1)
    small = {
        by: tnconv.compress(
            model,
            "tucker",
            budget=0.3,
            calibration=xs,
            allocate_by=by,
            fold_bn=False,
            sequential=False,  # the allocation's own fits, as it priced them
        )
        for by in ("output", "logits")
    }
    logits = small["logits"]
    for name in ("loud", "quiet"):
        layer = logits.get_submodule(name)
        # the allocation's price of the chosen fit is its logit error, measured by hand
        assert layer.info["scored_error"] == pytest.approx(
            by_hand(model, name, layer, xs), rel=1e-5
        )
        assert layer.info["layer_error"] == pytest.approx(layer.info["relative_error"])
    # the quiet conv's errors barely reach the logits: the loud one gets the parameters
    assert logits.loud.num_params > 2 * logits.quiet.num_params
    errors = {by: output_error(model, m, xs) for by, m in small.items()}
    assert errors["logits"] < 0.97 * errors["output"], errors


def test_allocate_by_is_validated() -> None:
    model = Loud().eval()
    xs = batches(8, n=1)
    with pytest.raises(OptionError, match="'kernel', 'output', 'logits'"):
        tnconv.compress(model, "tucker", budget=0.3, calibration=xs, allocate_by="logit")
    with pytest.raises(OptionError, match="calibration="):
        tnconv.compress(model, "tucker", budget=0.3, allocate_by="logits")
    with pytest.raises(OptionError, match="budget="):
        tnconv.compress(model, "tucker", rank=2, calibration=xs, allocate_by="logits")
    with pytest.raises(OptionError, match="calibration="):
        tnconv.recommend(model, 0.3, allocate_by="logits")


def test_auto_prices_every_methods_candidates_by_the_logits() -> None:
    """compress(model, "auto", allocate_by="logits"): the candidates of every method are priced
    at the model's outputs, so the quiet conv (errors scaled down 100x) gets fewer parameters
    and the model ends closer to the dense one than with output-error pricing."""
    torch.manual_seed(0)
    model = Loud().eval()
    xs = batches(8, n=2, seed=1)
    methods = ["tucker", "tt"]
    rec = tnconv.recommend(model, 0.3, methods=methods, calibration=xs, allocate_by="logits")
    rows = {r.layer: r for r in rec.rows}
    by_kernel = {r.layer: r for r in tnconv.recommend(model, 0.3, methods=methods).rows}
    # the predictions are errors at the logits: the quiet conv's barely count
    assert rows["quiet"].predicted_error < 0.1 * rows["loud"].predicted_error
    assert rows["loud"].params > by_kernel["loud"].params, (rows, by_kernel)
    small = {
        by: tnconv.compress(
            model,
            "auto",
            budget=0.3,
            calibration=xs,
            allocate_by=by,
            methods=methods,
            fold_bn=False,
            sequential=False,
        )
        for by in ("output", "logits")
    }
    assert small["logits"].loud.num_params > small["logits"].quiet.num_params
    errors = {by: output_error(model, m, xs) for by, m in small.items()}
    assert errors["logits"] < 0.97 * errors["output"], errors
    # by default the chosen layers are then refitted in forward order (sequential)
    refitted = tnconv.compress(model, "auto", budget=0.3, calibration=xs, methods=methods)
    layers = [m for m in refitted.modules() if isinstance(m, tnconv.FactorizedLayer)]
    assert layers and all(m.info.get("sequential") for m in layers)
