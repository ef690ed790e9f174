"""The whole-model latency guard: compress(must_save="latency") ends no slower than dense."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tnconv
from tnconv import timing
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
    guard = latency_guard(small, reference, replaced, shapes, (1, 8, 8, 8), probe, seconds=0.1)
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
        small,
        twin,
        replaced,
        shapes,
        (1, 8, 8, 8),
        LatencyProbe(repeats=3),
        margin=0.99,
        seconds=0.1,
    )
    assert set(guard["undone"]) == set(replaced)
    assert 0.0 < GUARD_MARGIN < 0.1


def test_guard_keeps_a_model_that_is_faster() -> None:
    dense, small, replaced = _compressed()
    shapes = {n: (1, dense.get_submodule(n).in_channels, 8, 8) for n in replaced}
    reference = Sleepy(dense, 20.0)  # 20 ms more than the dense model
    guard = latency_guard(
        small, reference, replaced, shapes, (1, 8, 8, 8), LatencyProbe(repeats=3), seconds=0.1
    )
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


def test_a_time_budget_adds_rounds_up_to_the_cap(monkeypatch) -> None:
    calls = {"a": 0, "b": 0}

    def sleeper(key: str):
        def fn() -> None:
            calls[key] += 1
            time.sleep(0.001)

        return fn

    fns = {k: sleeper(k) for k in calls}
    timing.time_round_robin(fns, 3)
    assert calls == {"a": 5, "b": 5}  # two warm-up calls and the rounds asked for
    calls.update(a=0, b=0)
    timing.time_round_robin(fns, 3, min_seconds=0.1)
    # ~2 ms a round: about 50 rounds fill 0.1 s (sleep overshoots, so fewer, never 3)
    assert 15 <= calls["a"] - 2 <= 60 and calls["a"] == calls["b"]
    monkeypatch.setattr(timing, "MAX_REPEATS", 7)
    calls.update(a=0, b=0)
    timing.time_round_robin(fns, 3, min_seconds=10.0)
    assert calls["a"] - 2 == 7


def _chain(n: int) -> tuple[nn.Sequential, nn.Module, dict[str, nn.Module]]:
    torch.manual_seed(0)
    dense = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(n)]).eval()
    small = tnconv.compress(dense, "tucker", rank=4)
    replaced = {str(i): dense.get_submodule(str(i)) for i in range(n)}
    return dense, small, replaced


@settings(max_examples=40, deadline=None)
@given(
    factorized=st.lists(
        st.floats(0.2, 1.8, allow_nan=False).map(lambda v: round(v, 3)), min_size=1, max_size=12
    )
)
def test_the_guard_puts_back_the_fewest_least_saving_layers(factorized) -> None:
    """With an additive clock (a model's time is the sum of its layers': 1 ms a dense conv,
    ``factorized[i]`` ms the i-th factorized one), the guard ends fast enough by the margin or
    with every layer back, and where "fast enough" only grows with the number put back (least
    saving first) it puts back the fewest: the brute-force answer. It times the two models a
    logarithmic number of times, not once per layer."""
    n = len(factorized)
    dense, small, replaced = _chain(n)
    cost = {id(m): 1.0 for m in replaced.values()}
    for i, ms in enumerate(factorized):
        cost[id(small.get_submodule(str(i)))] = ms
    whole_timings = []

    def clock(modules, shape, *, channels_last=False, repeats=0, min_seconds=0.0):
        out = {}
        for name, m in modules.items():
            parts = list(m.children()) if isinstance(m, nn.Sequential) else [m]
            out[name] = sum(cost[id(p)] for p in parts)
        if any(isinstance(m, nn.Sequential) for m in modules.values()):
            whole_timings.append(min_seconds)
        return out

    shapes = {name: (1, 8, 6, 6) for name in replaced}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(timing, "module_latencies", clock)
        guard = latency_guard(
            small, dense, replaced, shapes, (1, 8, 6, 6), LatencyProbe(), seconds=0.5
        )

    order = sorted(range(n), key=lambda i: 1.0 - factorized[i])  # least saving first (stable)

    def model_ms(k: int) -> float:
        back = set(order[:k])
        return sum(1.0 if i in back else factorized[i] for i in range(n))

    # with every layer back the model is the dense one: the guard's end whatever it measures
    passes = [model_ms(k) < n * (1 - GUARD_MARGIN) for k in range(n)] + [True]
    kept = [i for i in range(n) if isinstance(small.get_submodule(str(i)), tnconv.FactorizedLayer)]
    k = n - len(kept)
    assert set(kept) == set(order[k:])  # the ones put back are the least saving
    assert passes[k]
    first = passes.index(True)
    if all(passes[first:]):  # monotone: bisection finds the brute-force answer
        assert k == first
    assert guard["ms"] == pytest.approx(model_ms(k)) and guard["dense_ms"] == n
    assert len(guard["undone"]) == k
    assert len(whole_timings) <= 2 + math.ceil(math.log2(n + 1))
    assert all(s == 0.5 for s in whole_timings)
