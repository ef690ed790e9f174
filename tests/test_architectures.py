"""Real architectures (hand-built blocks, no downloads): compress replaces their Linear, 1x1,
grouped, Conv1d and Conv3d layers, keeps depthwise convs dense, and holds the budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tnconv
from tnconv.models.blocks import ARCHITECTURES, resnet50

from .conftest import METHODS

# small widths: the same layer kinds and groups, seconds per compression (the depthwise nets
# wide enough that their depthwise convs, counted in the budget, hold under 15% of the weights:
# at width 8 they hold 21-35%, nearly all of a 0.25 budget)
TINY = {
    "resnet-bottleneck": (8, (1, 3, 16, 16)),
    "resnext": (8, (1, 3, 16, 16)),
    "mobilenet-v2": (16, (1, 3, 16, 16)),
    "efficientnet-mbconv": (16, (1, 3, 16, 16)),
    "convnext": (32, (1, 3, 16, 16)),
    "temporal-1d": (8, (1, 8, 32)),
    "video-3d": (4, (1, 3, 4, 8, 8)),
}


def _check(name: str, method: str) -> tnconv.Summary:
    width, size = TINY[name]
    torch.manual_seed(0)
    model = ARCHITECTURES[name][0](width=width).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = tnconv.compress(model, method, budget=0.25, input_size=size, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(size)
    with torch.no_grad():
        y, y_dense = small(x), model(x)
    assert y.shape == y_dense.shape and bool(torch.isfinite(y).all())
    s = tnconv.summary(small, input_size=size)
    # the budget: a quarter of the parameters of every selected layer (here: every layer), the
    # depthwise convs and the layers the method's network cannot take, kept dense, included
    assert sum(r.params for r in s.rows) <= 0.25 * sum(r.dense_params for r in s.rows) + 1
    for r in s.rows:
        if "/g" in r.kind and r.shape[1] == 1:
            assert r.method == "dense" and "depthwise" in r.note
            assert "count against budget=0.25" in r.note
    return s


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("method", ["tucker", "tr"])
def test_every_architecture(name: str, method: str) -> None:
    s = _check(name, method)
    kinds = {r.kind.split("/")[0] for r in s.rows if r.method != "dense"}
    expected = {"temporal-1d": {"conv1d"}, "video-3d": {"conv3d"}}.get(name, {"conv2d"})
    assert expected <= kinds
    replaced = sum(r.dense_params for r in s.rows if r.method != "dense")
    weights = sum(r.dense_params for r in s.rows if "depthwise" not in r.note)
    assert replaced >= 0.8 * weights


class _Kinds(nn.Module):
    """One layer of every kind: grouped conv, 1x1, Conv1d, Conv3d, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=2)
        self.pointwise = nn.Conv2d(16, 16, 1)
        self.temporal = nn.Conv1d(16, 16, 3, padding=1)
        self.volume = nn.Conv3d(4, 8, 3, padding=1)
        self.head = nn.Linear(16 + 8, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pointwise(torch.relu(self.grouped(x)))  # (B, 16, 8, 8)
        t = self.temporal(y.flatten(2)).mean(-1)  # the 64 pixels as a sequence
        v = self.volume(y.reshape(-1, 4, 4, 8, 8)).flatten(2).mean(-1)
        return self.head(torch.cat([t, v], 1))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_on_every_layer_kind(method: str) -> None:
    torch.manual_seed(0)
    model = _Kinds().eval()
    x = torch.randn(2, 8, 8, 8)
    small = tnconv.compress(model, method, ratio=0.5)
    kinds = {type(m).__name__ for m in small.modules()}
    # the semi-tensor networks cannot take every shape here (t must divide it): those stay dense
    assert len(kinds & {"FactorizedConv1d", "FactorizedConv2d", "FactorizedConv3d"}) >= 2
    reasons = tnconv.dense_reasons(small)
    assert all("must divide" in why or "no saving" in why for why in reasons.values())
    with torch.no_grad():
        assert small(x).shape == model(x).shape


def test_resnet50_shape_and_layer_count() -> None:
    with torch.device("meta"):
        model = resnet50()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 53 and isinstance(model.head, nn.Linear)
