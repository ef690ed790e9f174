"""The whole-model latency guard: compress(must_save="latency") ends no slower than dense."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

import tnconv
from tnconv.allocation import LatencyProbe
from tnconv.compress import GUARD_MARGIN, LATENCY_GUARD, latency_guard


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(8, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
    ).eval()


class Sleepy(nn.Module):
    """A reference that takes ``ms`` milliseconds per call, whatever it computes."""

    def __init__(self, inner: nn.Module, ms: float) -> None:
        super().__init__()
        self.inner, self.ms = inner, ms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        end = time.perf_counter() + self.ms / 1000
        while time.perf_counter() < end:
            pass
        return self.inner(x)


def _compressed() -> tuple[nn.Module, nn.Module, dict[str, nn.Module]]:
    dense = net()
    small = tnconv.compress(dense, "tucker", ratio=0.3)
    replaced = {n: dense.get_submodule(n) for n in ("0", "2", "4")}
    return dense, small, replaced


def test_guard_puts_layers_back_until_the_model_is_not_slower() -> None:
    dense, small, replaced = _compressed()
    shapes = {n: (1, dense.get_submodule(n).in_channels, 8, 8) for n in replaced}
    probe = LatencyProbe(repeats=3)
    # a reference no model can beat: every factorized layer goes back, least saving first
    reference = nn.Identity()
    guard = latency_guard(small, reference, replaced, shapes, (1, 8, 8, 8), probe)
    assert set(guard["undone"]) == set(replaced)
    assert all("latency guard" in why for why in guard["undone"].values())
    assert not any(isinstance(m, tnconv.FactorizedLayer) for m in small.modules())
    x = torch.randn(1, 8, 8, 8)
    torch.testing.assert_close(small(x), dense(x))


def test_guard_wants_the_margin_not_just_a_tie() -> None:
    """The guard keeps a model only when it is faster than the reference by ``margin``: against
    a twin of itself with a margin no timing can meet (100x faster), every layer goes back."""
    dense, small, replaced = _compressed()
    shapes = {n: (1, dense.get_submodule(n).in_channels, 8, 8) for n in replaced}
    twin = copy.deepcopy(small)
    guard = latency_guard(
        small, twin, replaced, shapes, (1, 8, 8, 8), LatencyProbe(repeats=3), margin=0.99
    )
    assert set(guard["undone"]) == set(replaced)
    assert 0.0 < GUARD_MARGIN < 0.1


def test_guard_keeps_a_model_that_is_faster() -> None:
    dense, small, replaced = _compressed()
    shapes = {n: (1, dense.get_submodule(n).in_channels, 8, 8) for n in replaced}
    reference = Sleepy(dense, 20.0)  # 20 ms more than the dense model
    guard = latency_guard(small, reference, replaced, shapes, (1, 8, 8, 8), LatencyProbe(repeats=3))
    assert guard["undone"] == {} and guard["ms"] < guard["dense_ms"]
    assert sum(isinstance(m, tnconv.FactorizedLayer) for m in small.modules()) == 3


def test_compress_records_the_whole_model_timing_and_summary_reports_it() -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(
        nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1)
    ).eval()
    size = (1, 128, 16, 16)
    # a tenth of the parameters: about 10x fewer FLOPs per layer, so the layers are kept
    small = tnconv.compress(dense, "tucker", ratio=0.1, must_save="latency", input_size=size)
    if not any(isinstance(m, tnconv.FactorizedLayer) for m in small.modules()):
        # every layer refused one by one: nothing to guard end to end
        assert not hasattr(small, LATENCY_GUARD)
        return
    guard = getattr(small, LATENCY_GUARD)
    assert guard["ms"] > 0 and guard["dense_ms"] > 0
    # the guard's contract: it ended faster than dense by the margin, or with every layer back
    factorized = [m for m in small.modules() if isinstance(m, tnconv.FactorizedLayer)]
    assert guard["ms"] < guard["dense_ms"] * (1 - GUARD_MARGIN) or not factorized
    s = tnconv.summary(small, size, latency=True, repeats=3)
    assert s.model_ms is not None and s.dense_model_ms is not None
    assert " ms (x" in str(s).splitlines()[-1]
