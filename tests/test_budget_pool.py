"""budget= counts the selected layers that stay dense (depthwise convs, layers the method's
network cannot take): the factorized layers are compressed harder so that every selected layer
together meets the share; Budget(pool="factorizable") counts the factorizable layers alone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import tnconv
from tnconv.allocation import Budget, kept_dense_costs, parse_budget
from tnconv.errors import BudgetError, RankSpecError
from tnconv.recommend import recommend

SIZE = (1, 32, 8, 8)


class Inverted(nn.Module):
    """MobileNetV2-style: 1x1 expand, depthwise k x k, 1x1 project."""

    def __init__(self, cin: int = 32, hidden: int = 96, k: int = 3) -> None:
        super().__init__()
        self.expand = nn.Conv2d(cin, hidden, 1, bias=False)
        self.depthwise = nn.Conv2d(hidden, hidden, k, padding=k // 2, groups=hidden, bias=False)
        self.project = nn.Conv2d(hidden, cin, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.relu(self.depthwise(torch.relu(self.expand(x)))))


def _model(seed: int = 0, **kwargs: int) -> Inverted:
    torch.manual_seed(seed)
    return Inverted(**kwargs).eval()


def _rows(small: nn.Module, size: tuple[int, ...] = SIZE) -> dict[str, tnconv.LayerRow]:
    return {r.name: r for r in tnconv.summary(small, input_size=size).rows}


def test_depthwise_counts_against_the_budget_and_says_so() -> None:
    model = _model()
    small = tnconv.compress(model, "tucker", budget=0.25, input_size=SIZE)
    rows = _rows(small)
    assert rows["depthwise"].method == "dense"
    assert rows["expand"].method == "tucker" and rows["project"].method == "tucker"
    # every selected layer together, the dense depthwise conv included, meets the share
    assert sum(r.params for r in rows.values()) <= 0.25 * sum(r.dense_params for r in rows.values())
    note = tnconv.dense_reasons(small)["depthwise"]
    assert "depthwise" in note and "864 weight parameters count against budget=0.25" in note
    assert "count against budget" in rows["depthwise"].note


def test_pool_factorizable_is_the_old_accounting() -> None:
    model = _model()
    old = tnconv.compress(model, "tucker", budget=Budget(share=0.25, pool="factorizable"))
    new = tnconv.compress(model, "tucker", budget=0.25)
    rows_old, rows_new = _rows(old), _rows(new)
    factorized = ("expand", "project")
    spent_old = sum(rows_old[n].params for n in factorized)
    dense = sum(rows_old[n].dense_params for n in factorized)
    assert spent_old <= 0.25 * dense
    # the old pool leaves the depthwise conv out: the selection as a whole exceeds the share,
    # and the new one spends less on the factorized layers to meet it
    assert sum(r.params for r in rows_old.values()) > 0.25 * sum(
        r.dense_params for r in rows_old.values()
    )
    assert sum(rows_new[n].params for n in factorized) < spent_old
    assert "count against" not in tnconv.dense_reasons(old)["depthwise"]
    # the same via a dict
    via_dict = tnconv.compress(model, "tucker", budget={"share": 0.25, "pool": "factorizable"})
    assert _rows(via_dict)["expand"].ranks == rows_old["expand"].ranks


def test_depthwise_alone_over_the_share_is_a_budget_error() -> None:
    # 7x7 depthwise on 64 channels: 3136 of 4160 weights; a 0.2 share allows 832 in all
    model = _model(cin=8, hidden=64, k=7)
    with pytest.raises(BudgetError, match=r"kept dense.*pool='factorizable'"):
        tnconv.compress(model, "tucker", budget=0.2)
    with pytest.raises(BudgetError, match="depthwise"):
        recommend(model, 0.2, methods=["tucker"])
    # the old pool still compresses it
    small = tnconv.compress(model, "tucker", budget=Budget(share=0.2, pool="factorizable"))
    assert _rows(small, (1, 8, 8, 8))["expand"].method == "tucker"


def test_flops_budget_counts_depthwise_flops() -> None:
    model = _model()
    small = tnconv.compress(model, "tucker", budget=("flops", 0.4), input_size=SIZE)
    rows = _rows(small)
    assert sum(r.flops for r in rows.values()) <= 0.4 * sum(r.dense_flops for r in rows.values())
    dw_flops = rows["depthwise"].dense_flops
    assert (
        f"its {dw_flops} FLOPs count against budget=0.4" in tnconv.dense_reasons(small)["depthwise"]
    )


def test_unfit_layers_count_too() -> None:
    # the semi-tensor train with t=2 cannot take a layer with 3 input channels
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
            self.body = nn.Conv2d(16, 16, 3, padding=1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(torch.relu(self.stem(x)))

    torch.manual_seed(0)
    model = Odd().eval()
    small = tnconv.compress(model, "stt", budget=0.4, t=2, input_size=(1, 3, 8, 8))
    rows = _rows(small, (1, 3, 8, 8))
    assert rows["stem"].method == "dense" and rows["body"].method == "stt"
    assert "count against budget=0.4" in tnconv.dense_reasons(small)["stem"]
    assert sum(r.params for r in rows.values()) <= 0.4 * sum(r.dense_params for r in rows.values())


def test_recommend_and_auto_count_depthwise() -> None:
    model = _model()
    rec = recommend(model, 0.3, methods=["tucker", "tt"])
    assert set(rec.kept) == {"depthwise"} and rec.kept["depthwise"] == 864
    used, dense = rec.spent()
    assert dense == sum(p.numel() for p in model.parameters()) and used <= 0.3 * dense
    small = tnconv.compress(model, "auto", budget=0.3, methods=["tucker", "tt"])
    note = tnconv.dense_reasons(small)["depthwise"]
    assert note.startswith("depthwise convolution") and "count against budget=0.3" in note
    rows = _rows(small)
    assert sum(r.params for r in rows.values()) <= 0.3 * sum(r.dense_params for r in rows.values())


def test_parse_budget_rejects_an_unknown_pool() -> None:
    with pytest.raises(RankSpecError, match="pool"):
        parse_budget({"share": 0.25, "pool": "everything"})
    assert parse_budget(0.3).pool == "selected"


def test_kept_costs_need_a_probe_for_latency() -> None:
    conv = _model().depthwise
    shapes = {"dw": (1, 32, 8, 8)}
    with pytest.raises(BudgetError, match="LatencyProbe"):
        kept_dense_costs(Budget(share=0.5, kind="latency"), [("dw", conv)], shapes)
    assert kept_dense_costs(Budget(share=0.5, kind="flops"), [("dw", conv)], {}) == {"dw": 0.0}
    assert kept_dense_costs(Budget(share=0.5, pool="factorizable"), [("dw", conv)], shapes) == {}


@given(
    share=st.floats(0.01, 1.0),
    factorizable=st.floats(1.0, 1e7),
    kept=st.floats(0.0, 1e7),
)
def test_allowance_meets_the_share_of_the_pool(
    share: float, factorizable: float, kept: float
) -> None:
    selected = Budget(share=share).allowance(factorizable, kept)
    # what the factorized layers may spend plus what the dense ones cost is the share of all
    assert math.isclose(selected + kept, share * (factorizable + kept), rel_tol=1e-9, abs_tol=1e-6)
    assert selected <= share * factorizable + 1e-6  # never more than the old pool gave
    old = Budget(share=share, pool="factorizable").allowance(factorizable, kept)
    assert math.isclose(old, share * factorizable)


@given(
    hidden=st.sampled_from([16, 24, 32, 48]),
    k=st.sampled_from([3, 5]),
    share=st.floats(0.2, 0.6),
)
def test_selected_layers_meet_any_feasible_share(hidden: int, k: int, share: float) -> None:
    model = _model(seed=hidden + k, hidden=hidden, k=k)
    rows_dense = _rows(model)
    total = sum(r.dense_params for r in rows_dense.values())
    try:
        small = tnconv.compress(model, "tucker", budget=share)
    except BudgetError as exc:
        # infeasible only where the dense depthwise conv and the smallest factorizations
        # together exceed the share
        assert "smallest" in str(exc)
        return
    rows = _rows(small)
    assert sum(r.params for r in rows.values()) <= share * total + 1e-6


def test_select_ranks_counts_depthwise() -> None:
    model = _model()
    x = torch.randn(4, *SIZE[1:])
    with torch.no_grad():
        ref = model(x)

    def fidelity(m: nn.Module) -> float:
        with torch.no_grad():
            return -float((m(x) - ref).pow(2).mean())

    sel = tnconv.select_ranks(model, "tucker", fidelity, 0.3, progress=False)
    ones = model.expand.weight.numel() + model.project.weight.numel()
    assert math.isclose(sel.allowed, 0.3 * (ones + 864) - 864)
    small = tnconv.compress(model, "tucker", spec=sel)
    rows = _rows(small)
    assert sum(r.params for r in rows.values()) <= 0.3 * sum(r.dense_params for r in rows.values())


def test_admm_budget_counts_depthwise() -> None:
    model = _model()
    admm = tnconv.ADMM(model, "tucker", budget=0.25, rho=1.0)
    admm.step()
    allocated = tnconv.compress(model, "tucker", budget=0.25)
    assert admm.layer_names == ["expand", "project"]
    assert admm.ranks == {n: allocated.get_submodule(n).ranks for n in ("expand", "project")}


def test_candidate_flops_are_computed_on_first_read_only() -> None:
    from tnconv.allocation import Candidate

    calls = []

    def flops() -> int:
        calls.append(1)
        return 1234

    c = Candidate(None, 10, flops, 0.1)  # type: ignore[arg-type]
    assert not calls
    twin = copy.copy(c)
    assert c.flops == 1234 and c.flops == 1234 and len(calls) == 1
    assert twin.flops == 1234 and len(calls) == 2  # a copy made before the read computes its own
    c.flops = 7
    assert c.flops == 7 and Candidate(None, 1, 5, 0.0).flops == 5


def test_params_budget_plans_no_candidate_flops(monkeypatch: pytest.MonkeyPatch) -> None:
    from tnconv.layers import FactorizedLayer

    calls = []
    real = FactorizedLayer.flops

    def counting(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FactorizedLayer, "flops", counting)
    model = _model()
    by_params = tnconv.compress(model, "tucker", budget=0.3, input_size=SIZE)
    assert not calls  # the candidates' inference plans were never built or timed
    by_flops = tnconv.compress(model, "tucker", budget=("flops", 0.3), input_size=SIZE)
    assert calls  # a FLOP budget reads them
    rows = _rows(by_flops)
    assert sum(r.flops for r in rows.values()) <= 0.3 * sum(r.dense_flops for r in rows.values())
    assert isinstance(by_params.expand, FactorizedLayer)
