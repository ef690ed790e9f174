"""Plan autotuning: every candidate is exact, the timed choice is one of them, and it is off
with the built-in tables (the suite's deterministic plans) or TNCONV_AUTOTUNE=0."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import tnconv
from tnconv.calibration import DEFAULT_TABLES
from tnconv.contraction.autotune import autotune_enabled, candidate_plans, fastest_plan

from .conftest import METHODS

pytestmark = pytest.mark.usefixtures("one_thread")

MEASURED = {k: dataclasses.replace(t, source="measured") for k, t in DEFAULT_TABLES.items()}


@pytest.mark.parametrize("method", METHODS)
def test_every_candidate_and_the_choice_compute_the_convolution(method: str) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(12, 16, 3, padding=1, stride=2)
    opts = {"n_init": 1, "max_iter": 10} if method.startswith("cp") else {}
    try:
        layer = tnconv.FactorizedConv2d.from_conv(conv, method, ratio=0.5, **opts).eval()
    except (tnconv.BudgetError, tnconv.StructureError):
        pytest.skip(f"{method} cannot take this shape")
    x = torch.randn(2, 12, 9, 9)
    factors = [f.detach() for f in layer.factors]
    ref = F.conv2d(x, layer.to_tensor().detach(), layer.bias, stride=2, padding=1)
    plans = candidate_plans(layer.network, layer.geometry, tuple(x.shape), "nchw", MEASURED)
    assert plans and plans[0].frozen
    for plan in plans:
        with torch.no_grad():
            y = plan(x, factors, layer.bias, plan.fold_factors(factors))
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    best = fastest_plan(plans, factors, "nchw", repeats=2)
    assert any(best is p for p in plans)
    # channels-last inputs: the tables' plan, and the one without permuting copies if it differs
    xl = x.contiguous(memory_format=torch.channels_last)
    last = candidate_plans(layer.network, layer.geometry, tuple(x.shape), "nhwc", MEASURED)
    assert 1 <= len(last) <= 2
    for plan in last:
        with torch.no_grad():
            y = plan(xl, factors, layer.bias, plan.fold_factors(factors))
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_candidates_include_the_plan_without_channel_copies(layout: str) -> None:
    """A semi-tensor Tucker-2 layer interleaves its STP index in the channels: one candidate
    expands its 1x1 ends (identity blocks) instead of permuting the map."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 32, 3, padding=1)
    layer = tnconv.FactorizedConv2d.from_conv(conv, "sttucker", ratio=0.25)
    # tables that price copies at nothing choose the copies; the candidates still expand
    cheap = {k: dataclasses.replace(t, copy=1e-15) for k, t in MEASURED.items()}
    plans = candidate_plans(layer.network, layer.geometry, (2, 32, 8, 8), layout, cheap)
    assert plans[0].expanded_macs == 0
    assert any(p.expanded_macs > 0 for p in plans)


def test_nchw_candidates_include_native_and_converting_plans() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 32, 3, padding=1)
    layer = tnconv.FactorizedConv2d.from_conv(conv, "tucker", ratio=0.25)
    plans = candidate_plans(layer.network, layer.geometry, (1, 32, 16, 16), "nchw", MEASURED)
    assert {p.convert for p in plans} == {False, True}


def test_autotune_is_off_with_builtin_tables_or_when_disabled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TNCONV_AUTOTUNE", raising=False)
    assert not autotune_enabled(DEFAULT_TABLES)
    assert autotune_enabled(MEASURED)
    monkeypatch.setenv("TNCONV_AUTOTUNE", "0")
    assert not autotune_enabled(MEASURED)


KINDS = {
    "linear": (torch.nn.Linear(12, 10), (6, 12)),
    "conv1d": (torch.nn.Conv1d(6, 8, 3, padding=1), (2, 6, 9)),
    "grouped": (torch.nn.Conv2d(8, 8, 3, padding=1, groups=2), (2, 8, 6, 6)),
    "conv3d": (torch.nn.Conv3d(4, 6, 3, padding=1), (2, 4, 5, 5, 5)),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("method", ["tucker", "tt", "cp", "rsdtr"])
def test_candidates_of_every_layer_kind_compute_the_layer(method: str, kind: str) -> None:
    """On each layer kind's executor input, every candidate (and the timed choice, channels-last
    3-D inputs included) gives the layer's own output."""
    torch.manual_seed(0)
    dense, shape = KINDS[kind]
    opts = {"n_init": 1, "max_iter": 10} if method == "cp" else {}
    layer = tnconv.layers.factorized_type(dense).from_dense(dense, method, ratio=0.6, **opts)
    layer.eval()
    x = torch.randn(*shape)
    xe = layer.executor_input(x)[0]
    factors = [f.detach() for f in layer.factors]
    with torch.no_grad():
        ref = layer(x)
        for layout in ("nchw", "nhwc"):
            plans = candidate_plans(
                layer.network, layer.geometry, tuple(xe.shape), layout, MEASURED
            )
            best = fastest_plan(plans, factors, layout, repeats=1)
            for plan in [*plans, best]:
                y = plan(xe, factors, layer.bias, plan.fold_factors(factors))
                out = layer.executor_output(y, layer.executor_input(x)[1])
                torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_fastest_plan_times_its_candidates_for_a_time_budget(monkeypatch) -> None:
    """The candidates are timed for ``min_seconds`` of rounds at least (AUTOTUNE_SECONDS by
    default), so batch-1 layers are not chosen on five noisy rounds; the fastest one wins."""
    from tnconv.contraction import autotune

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(12, 16, 3, padding=1)
    layer = tnconv.FactorizedConv2d.from_conv(conv, "tucker", ratio=0.5).eval()
    factors = [f.detach() for f in layer.factors]
    plans = candidate_plans(layer.network, layer.geometry, (1, 12, 9, 9), "nchw", MEASURED)
    assert len(plans) >= 2
    seen = {}

    def clock(fns, repeats, *, min_seconds=0.0):
        seen.update(repeats=repeats, min_seconds=min_seconds)
        return {k: (2.0 if k == "1" else 3.0) for k in fns}  # candidate 1 the fastest

    monkeypatch.setattr(autotune, "time_round_robin", clock)
    assert fastest_plan(plans, factors, "nchw") is plans[1]
    assert seen == {"repeats": autotune.AUTOTUNE_REPEATS, "min_seconds": autotune.AUTOTUNE_SECONDS}
    assert autotune.AUTOTUNE_SECONDS > 0
