"""tnconv.select_ranks: budget met, spec accepted by compress, the log, the strategies' logic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tnconv
from tnconv.errors import BudgetError, UnknownMethodError

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 12, 3, padding=1)
        self.a = nn.Conv2d(12, 24, 3, padding=1)
        self.b = nn.Conv2d(24, 24, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(torch.relu(self.stem(x)))))


LAYERS = ["a", "b"]


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(4, 2, 8, 8)
    with torch.no_grad():
        ref = model(x)
    return model, x, ref


def _fidelity(x: torch.Tensor, ref: torch.Tensor):
    @torch.no_grad()
    def evaluate(m: nn.Module) -> float:
        return -float((m(x) - ref).norm() / ref.norm())

    return evaluate


@pytest.mark.parametrize("strategy", ["one-step", "multi-step"])
@pytest.mark.parametrize("method", ["tucker", "tt"])
def test_budget_met_and_spec_rebuilds_the_evaluated_model(setup, strategy, method) -> None:
    model, x, ref = setup
    evaluate = _fidelity(x, ref)
    sel = tnconv.select_ranks(
        model, method, evaluate, 0.3, strategy=strategy, layers=LAYERS, progress=False
    )
    dense = sum(model.get_submodule(n).weight.numel() for n in LAYERS)
    assert sel.allowed == pytest.approx(0.3 * dense) and sel.dense_cost == dense
    small = tnconv.compress(model, method, spec=sel)
    params = sum(
        m.num_params if isinstance(m, tnconv.FactorizedConv2d) else m.weight.numel()
        for m in (small.get_submodule(n) for n in LAYERS)
    )
    assert params == sel.cost <= sel.allowed
    assert set(sel) <= set(LAYERS) and all(isinstance(r, tuple) for r in sel.values())
    # the spec rebuilds exactly the configuration the final evaluation saw
    assert evaluate(small) == pytest.approx(sel.metric, abs=1e-6)
    assert sel.log[0].phase == "baseline" and sel.log[-1].phase == "final"
    assert sel.log[-1].metric == sel.metric and sel.log[-1].cost == sel.cost
    assert sel.baseline == pytest.approx(0.0, abs=1e-6)
    if strategy == "multi-step":
        steps = [e for e in sel.log if e.phase == "step"]
        assert steps and all(e.layer in LAYERS for e in steps)
    # the original is untouched
    assert all(type(model.get_submodule(n)) is nn.Conv2d for n in LAYERS)


def test_one_step_scans_each_layer_alone_and_spends_on_what_the_metric_sees(setup) -> None:
    """A metric that only sees layer ``a``: the scan compresses one layer at a time, and the
    greedy choice gives ``a`` the largest candidate that fits with ``b`` at its smallest."""
    model, x, _ = setup
    with torch.no_grad():
        ref_a = model.a(torch.relu(model.stem(x)))

    @torch.no_grad()
    def only_a(m: nn.Module) -> float:
        return -float((m.a(torch.relu(m.stem(x))) - ref_a).norm() / ref_a.norm())

    sel = tnconv.select_ranks(
        model, "tucker", only_a, 0.35, strategy="one-step", layers=LAYERS, progress=False
    )
    scans = [e for e in sel.log if e.phase == "scan"]
    assert scans and all(len(e.ranks) == 1 and e.layer in e.ranks for e in scans)
    scan_b = [e for e in scans if e.layer == "b"]
    assert all(e.metric == pytest.approx(0.0, abs=1e-6) for e in scan_b)  # b is invisible
    cost_b = min(e.cost for e in scan_b) - (model.a.weight.numel())  # b's cheapest candidate
    a_costs = sorted(
        {e.cost - model.b.weight.numel() for e in scans if e.layer == "a"}
        | {model.a.weight.numel()}
    )
    best_a = max(c for c in a_costs if c + cost_b <= sel.allowed)
    tucker = tnconv.get("tucker")
    chosen_a = (
        tucker.num_params_at((24, 12, 3, 3), sel["a"]) if "a" in sel else model.a.weight.numel()
    )
    assert chosen_a == best_a
    # what is left goes to b (ties in the metric are broken by kernel error)
    assert sel.cost <= sel.allowed and "b" in sel


def test_flops_budget(setup) -> None:
    model, x, ref = setup
    sel = tnconv.select_ranks(
        model,
        "tucker",
        _fidelity(x, ref),
        ("flops", 0.5),
        layers=LAYERS,
        input_size=(1, 2, 8, 8),
        progress=False,
    )
    small = tnconv.compress(model, "tucker", spec=sel)
    s = tnconv.summary(small, input_size=(1, 2, 8, 8))
    flops = sum(r.flops for r in s.rows if r.name in LAYERS)
    assert flops == sel.cost <= sel.allowed


def test_errors(setup) -> None:
    model, x, ref = setup
    ev = _fidelity(x, ref)
    with pytest.raises(ValueError, match="strategy"):
        tnconv.select_ranks(model, "tucker", ev, 0.3, strategy="two-step", layers=LAYERS)
    with pytest.raises(BudgetError, match="smallest candidates"):
        tnconv.select_ranks(model, "tucker", ev, 0.001, layers=["a"], progress=False)
    with pytest.raises(ValueError, match="finite"):
        tnconv.select_ranks(
            model, "tucker", lambda m: float("nan"), 0.3, layers=["a"], progress=False
        )
    with pytest.raises(TypeError, match="number"):
        tnconv.select_ranks(model, "tucker", lambda m: "good", 0.3, layers=["a"], progress=False)
    with pytest.raises(ValueError, match="shares"):
        tnconv.select_ranks(model, "tucker", ev, 0.3, layers=LAYERS, shares=(0.5, 1.5))
    with pytest.raises(ValueError, match="budget"):
        tnconv.select_ranks(model, "tucker", ev, 1.5, layers=LAYERS)
    with pytest.raises(UnknownMethodError):
        tnconv.select_ranks(model, "no-such-method", ev, 0.3, layers=LAYERS)
    with pytest.raises(TypeError, match="callable"):
        tnconv.select_ranks(model, "tucker", 0.9, 0.3, layers=LAYERS)  # type: ignore[arg-type]
