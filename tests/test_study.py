"""Comparative studies on models and on bare kernels."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tnconv
from tnconv.study import StudyResult, StudyRow

from .conftest import REAL_KERNELS


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 5, padding=2),
        nn.ReLU(),
        nn.Conv2d(32, 45, 5, padding=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(45, 3),
    )
    with torch.no_grad():  # trained kernels where the shapes fit
        net[2].weight.copy_(torch.tensor(REAL_KERNELS["dlib_mmod/conv02"]))
    return net.eval()


def test_study_on_a_model_matches_budgets_and_calls_back(tmp_path) -> None:
    model = conv_net()
    calls: list[str] = []

    def evaluate(m: nn.Module) -> float:
        calls.append("eval")
        return 0.5

    def fine_tune(m: nn.Module) -> None:
        calls.append("tune")

    result = tnconv.study(
        model,
        ["tucker", "tt"],
        [0.2, 0.5],
        input_size=(2, 3, 12, 12),
        evaluate=evaluate,
        fine_tune=fine_tune,
        latency_repeats=2,
        progress=False,
    )
    rows = {(r.method, r.budget): r for r in result.rows}
    assert set(rows) == {("dense", 1.0), ("tucker", 0.2), ("tucker", 0.5), ("tt", 0.2), ("tt", 0.5)}
    dense = rows[("dense", 1.0)]
    for (method, budget), r in rows.items():
        assert r.params <= budget * dense.params + 1e-9
        assert r.dense_params == dense.params and r.dense_flops == dense.flops
        assert r.latency_ms > 0 and r.dense_latency_ms > 0
        if method != "dense":
            assert 0 < r.error < 1 and r.accuracy == 0.5 and r.accuracy_tuned == 0.5
    assert rows[("tt", 0.5)].error < rows[("tt", 0.2)].error
    assert calls.count("tune") == 4 and calls.count("eval") == 1 + 2 * 4
    # CSV and Pareto plot
    csv = result.to_csv(tmp_path / "s.csv").read_text().splitlines()
    assert len(csv) == 1 + len(result.rows) and "param_share" in csv[0]
    assert result.plot(tmp_path / "s.png").stat().st_size > 1000
    assert "tucker" in str(result)


def test_a_calibrated_study_runs_compress_with_the_calibration() -> None:
    """study(calibration=): each cell is compress(calibration=) (output-aware, sequential), so
    its row matches that compress call, and its layers are closer at the model's outputs on
    the calibration inputs than the kernel-fitted study's."""
    model = conv_net()
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 3, 12, 12, generator=gen) for _ in range(2)]
    common = dict(input_size=(2, 3, 12, 12), latency_repeats=0, progress=False)
    aware = tnconv.study(model, ["tucker"], [0.3], calibration=[(x, 0) for x in xs], **common)
    plain = tnconv.study(model, ["tucker"], [0.3], **common)
    row = next(r for r in aware.rows if r.method == "tucker")
    small = tnconv.compress(model, "tucker", budget=0.3, calibration=xs, input_size=(2, 3, 12, 12))
    layers = [m for m in small.modules() if isinstance(m, tnconv.FactorizedLayer)]
    assert layers and all(m.info.get("sequential") for m in layers)
    rows = tnconv.summary(small, (2, 3, 12, 12)).rows
    assert row.params == sum(r.params for r in rows)
    errors = [r.relative_error for r in rows if r.relative_error is not None]
    assert row.error == pytest.approx(math.sqrt(sum(e * e for e in errors) / len(rows)))
    assert row.error != next(r for r in plain.rows if r.method == "tucker").error
    with pytest.raises(ValueError, match="calibration"):
        tnconv.study({"k": torch.randn(8, 8, 3, 3)}, ["tucker"], [0.3], calibration=xs)


def test_study_on_kernels_and_pareto() -> None:
    kernels = {
        "conv04": REAL_KERNELS["dlib_mmod/conv04"],
        "ocr": REAL_KERNELS["ppocrv4_det/49_conv2d_156.w_0"],
    }
    result = tnconv.study(kernels, ["tucker", "tr"], [0.1, 0.3], latency_repeats=0, progress=False)
    assert len(result.rows) == 2 * 2 * 2
    for r in result.rows:
        assert r.params <= r.budget * r.dense_params and math.isnan(r.latency_ms)
    front = result.pareto("error")
    assert front and all(r in result.rows for r in front)
    for r in front:  # nothing on the same kernel is both smaller and more accurate
        assert not any(
            o.target == r.target and o.params < r.params and o.error < r.error for o in result.rows
        )


def test_pareto_definition() -> None:
    rows = [
        StudyRow("k", "a", 0.1, 10, 100, 0, 0, 0.5),
        StudyRow("k", "b", 0.2, 20, 100, 0, 0, 0.6),  # dominated by a
        StudyRow("k", "c", 0.3, 30, 100, 0, 0, 0.2),
    ]
    assert [r.method for r in StudyResult(rows).pareto("error")] == ["a", "c"]


def test_study_errors() -> None:
    with pytest.raises(KeyError):
        tnconv.study(conv_net(), ["nope"], [0.5])
    with pytest.raises(ValueError, match="budgets"):
        tnconv.study(conv_net(), ["tt"], [1.5])
    with pytest.raises(ValueError, match="model"):
        tnconv.study({"k": REAL_KERNELS["dlib_mmod/conv04"]}, ["tt"], [0.5], evaluate=lambda m: 1.0)


def test_a_budget_a_method_cannot_meet_is_a_row_not_a_crash() -> None:
    result = tnconv.study(
        conv_net(), ["tt"], [0.001], input_size=(1, 3, 8, 8), latency_repeats=0, progress=False
    )
    (row,) = [r for r in result.rows if r.method == "tt"]
    assert "no fit" in row.note and math.isnan(row.error)


@pytest.mark.parametrize("method", ["tucker", "cp"])
def test_study_budgets_share_candidate_fits_with_the_same_result(monkeypatch, method) -> None:
    """A study fits each layer's candidates once per method (shared_candidates) and still
    returns what separate compress calls return."""
    model = conv_net()
    kwargs = {"n_init": 1, "max_iter": 20} if method == "cp" else {}
    budgets = [0.2, 0.35, 0.5]
    alone = {
        b: tnconv.summary(
            tnconv.compress(model, method, budget=b, input_size=(2, 3, 12, 12), **kwargs),
            (2, 3, 12, 12),
        )
        for b in budgets
    }
    dec = type(tnconv.get(method))
    calls: list[tuple] = []
    original = dec.factorize_many

    def counting(self, weight, specs, **options):
        out = original(self, weight, specs, **options)
        calls.extend(
            (tuple(weight.shape), repr(sorted(spec.items()))) for spec in specs[: len(out)]
        )
        return out

    monkeypatch.setattr(dec, "factorize_many", counting)
    result = tnconv.study(
        model,
        [method],
        budgets,
        input_size=(2, 3, 12, 12),
        latency_repeats=0,
        options={method: kwargs},
        progress=False,
    )
    # every candidate fitted once per conv, not once per conv and budget (the eps walks of
    # later budgets continue where earlier ones stopped)
    assert len(calls) == len(set(calls))
    assert {shape for shape, _ in calls} == {(32, 3, 3, 3), (32, 32, 5, 5), (45, 32, 5, 5), (3, 45)}
    for r in result.rows[1:]:
        s = alone[r.budget]
        assert r.params == sum(row.params for row in s.rows)
        assert r.flops == sum(row.flops for row in s.rows)


def test_shared_candidates_compares_kernels_by_value() -> None:
    from tnconv.allocation import shared_candidates

    model = conv_net()
    with shared_candidates():
        first = tnconv.compress(model, "tucker", budget=0.3, input_size=(2, 3, 12, 12))
        with torch.no_grad():
            model[2].weight.mul_(-1.0)  # same shape, other values: must be fitted again
        second = tnconv.compress(model, "tucker", budget=0.3, input_size=(2, 3, 12, 12))
    w1, w2 = first[2].to_tensor(), second[2].to_tensor()
    torch.testing.assert_close(w1, -w2, rtol=1e-4, atol=1e-5)
