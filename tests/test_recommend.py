"""tnconv.recommend and compress(model, "auto", budget=...): per-layer method and rank."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tnconv
from tnconv.decompositions.tt import TT
from tnconv.errors import RankSpecError, RegistrationError, UnknownMethodError
from tnconv.recommend import candidate_methods, recommend

from .conftest import decaying_kernel


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.b = nn.Conv2d(12, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.fixture(scope="module")
def model() -> Two:
    torch.manual_seed(0)
    m = Two()
    with torch.no_grad():
        m.a.weight.copy_(decaying_kernel((12, 8, 3, 3), 10).float())
        m.b.weight.copy_(decaying_kernel((16, 12, 3, 3), 11).float())
    return m


@pytest.fixture(scope="module")
def rec(model: Two, one_thread: None):
    # the spec carries these options into compress's full refit (CP's defaults: 3 x 500 sweeps)
    return recommend(model, 0.3, options={"cp": {"n_init": 1, "max_iter": 100}})


def test_recommendation_meets_the_budget_and_compress_applies_it(model: Two, rec) -> None:
    used, dense = rec.spent()
    assert dense == 12 * 8 * 9 + 16 * 12 * 9
    assert used <= 0.3 * dense
    assert set(rec.methods) == set(candidate_methods())
    spec = rec.spec
    assert spec and all(v["method"] in rec.methods for v in spec.values())
    small = tnconv.compress(model, None, spec=spec)
    rows = {r.name: r for r in tnconv.summary(small, (1, 8, 8, 8)).rows}
    for row in rec.rows:
        got = rows[row.layer]
        assert got.method == row.method and got.params == row.params
        assert tuple(got.ranks) == row.ranks
        # the full-option refit at the chosen ranks is what the quick fit predicted, or better
        assert got.relative_error <= row.predicted_error * 1.05 + 1e-3


def test_choice_is_the_best_candidate_within_its_size(rec) -> None:
    for row in rec.rows:
        alternatives = [e for e in row.alternatives.values() if e == e]
        # among every method's candidates no larger than the chosen one, none has lower error
        assert row.predicted_error <= min(alternatives) + 1e-12


def test_single_layer_beats_every_single_method_candidate(model: Two) -> None:
    some = ["tucker", "tt", "tr"]  # the quick ones (the fixture covers every method)
    one = recommend(model, 0.25, layers=["b"], methods=some)
    (row,) = one.rows
    assert row.params <= 0.25 * row.dense_params
    for method in some:
        alone = recommend(model, 0.25, layers=["b"], methods=[method])
        assert row.predicted_error <= alone.rows[0].predicted_error + 1e-12


def test_compress_auto(model: Two) -> None:
    some = ["tucker", "tt"]
    rec = recommend(model, 0.3, methods=some)
    small = tnconv.compress(model, "AUTO", budget=0.3, methods=some, tucker={"max_iter": 50})
    assert isinstance(model.a, nn.Conv2d) and isinstance(model.b, nn.Conv2d)  # untouched
    rows = {r.name: r for r in tnconv.summary(small, (1, 8, 8, 8)).rows}
    assert {n: r.method for n, r in rows.items()} == {r.layer: r.method for r in rec.rows}
    assert {r.method for r in rows.values()} <= {*some, "dense"}
    assert sum(r.params for r in rows.values()) <= 0.3 * sum(r.dense_params for r in rows.values())
    x = torch.randn(2, 8, 8, 8)
    assert small(x).shape == model(x).shape


def test_auto_at_full_budget_keeps_layers_dense_and_says_why(model: Two) -> None:
    same = tnconv.compress(model, "auto", budget=1.0, methods=["tucker"])
    assert isinstance(same.a, nn.Conv2d) and isinstance(same.b, nn.Conv2d)
    assert set(tnconv.dense_reasons(same)) == {"a", "b"}


def test_flops_budget(model: Two) -> None:
    flops = recommend(model, ("flops", 0.5), input_size=(1, 8, 8, 8), methods=["tucker", "tt"])
    used, dense = flops.spent()
    assert flops.budget_kind == "flops" and 0 < used <= 0.5 * dense


def test_auto_is_a_mode_not_a_method(model: Two) -> None:
    with pytest.raises(UnknownMethodError):
        tnconv.get("auto")
    with pytest.raises(RegistrationError, match="reserved"):
        tnconv.register("auto", TT)
    assert "auto" not in tnconv.available()
    with pytest.raises(RankSpecError, match="budget"):
        tnconv.compress(model, "auto")
    with pytest.raises(RankSpecError):
        tnconv.compress(model, "auto", rank=4)
    with pytest.raises(TypeError, match="auto"):
        tnconv.compress(model, "auto", budget=0.3, max_iter=3)
    with pytest.raises(UnknownMethodError):
        recommend(model, 0.3, methods=["nope"])
    with pytest.raises(RankSpecError):
        recommend(model, 0.0)
    with pytest.raises(tnconv.OptionError):
        recommend(model, 0.3, methods=["cp"], options={"cp": {"max_iter": -1}})


def test_training_time_entries_are_excluded() -> None:
    class Trained(TT):
        training_time = True

    tnconv.register("test-trained", Trained)
    try:
        assert "test-trained" in tnconv.available()
        assert "test-trained" not in candidate_methods()
        with pytest.raises(ValueError, match="training-time"):
            candidate_methods(["test-trained"])
    finally:
        tnconv.unregister("test-trained")
