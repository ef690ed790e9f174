"""Rank specifications: parsing, validation and the budget helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tnconv.errors import RankSpecError
from tnconv.rank import (
    ErrorBound,
    FixedRank,
    ParamRatio,
    bisect_eps,
    largest_fitting,
    param_budget,
    parse_rank_spec,
)


def test_int_tuple_ratio_eps_forms() -> None:
    assert parse_rank_spec(5) == FixedRank(ranks=5)
    assert parse_rank_spec((2, 3, 4)) == FixedRank(ranks=(2, 3, 4))
    assert parse_rank_spec([2, 3]) == FixedRank(ranks=(2, 3))
    assert parse_rank_spec(np.int64(7)) == FixedRank(ranks=7)
    assert parse_rank_spec(0.25) == ParamRatio(ratio=0.25)
    assert parse_rank_spec(eps=0.3) == ErrorBound(eps=0.3)
    assert parse_rank_spec(ratio=1) == ParamRatio(ratio=1.0)
    assert parse_rank_spec(ratio=np.float32(0.5)) == ParamRatio(ratio=0.5)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": -3}, "rank"),
        ({"rank": 1.5}, "rank"),
        ({"rank": 1.0}, "rank"),
        ({"rank": float("nan")}, "rank"),
        ({"rank": "4"}, "rank"),
        ({"rank": True}, "rank"),
        ({"rank": (2, 0)}, "rank"),
        ({"rank": (2, 2.5)}, "rank"),
        ({"rank": ()}, "rank"),
        ({"rank": None}, "exactly one"),
        ({"eps": 0.0}, "eps"),
        ({"eps": 1.0}, "eps"),
        ({"eps": -0.1}, "eps"),
        ({"eps": float("inf")}, "eps"),
        ({"eps": "0.1"}, "eps"),
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.2}, "ratio"),
        ({"ratio": -1}, "ratio"),
        ({"ratio": float("nan")}, "ratio"),
        ({"rank": 3, "eps": 0.1}, "exactly one"),
        ({"eps": 0.1, "ratio": 0.5}, "exactly one"),
        ({"rank": 3, "eps": 0.1, "ratio": 0.5}, "exactly one"),
    ],
)
def test_bad_specs_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(RankSpecError, match=field) as info:
        parse_rank_spec(**kwargs)
    assert isinstance(info.value, ValueError)


@given(st.floats(min_value=1e-9, max_value=1 - 1e-9))
def test_float_rank_in_unit_interval_means_ratio(x: float) -> None:
    assert parse_rank_spec(x) == ParamRatio(ratio=x)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_eps_accepted_iff_in_open_unit_interval(x: float) -> None:
    if 0 < x < 1:
        assert parse_rank_spec(eps=x).eps == x
    else:
        with pytest.raises(RankSpecError, match="eps"):
            parse_rank_spec(eps=x)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_ratio_accepted_iff_in_half_open_unit_interval(x: float) -> None:
    if 0 < x <= 1:
        assert parse_rank_spec(ratio=x).ratio == x
    else:
        with pytest.raises(RankSpecError, match="ratio"):
            parse_rank_spec(ratio=x)


@given(st.integers(min_value=-(10**6), max_value=10**6))
def test_int_rank_accepted_iff_positive(r: int) -> None:
    if r > 0:
        assert parse_rank_spec(r).ranks == r
    else:
        with pytest.raises(RankSpecError):
            parse_rank_spec(r)


@given(st.floats(min_value=1e-6, max_value=1.0), st.integers(min_value=1, max_value=10**7))
def test_param_budget_is_floor_of_share(ratio: float, dense: int) -> None:
    budget = param_budget(ratio, dense)
    assert budget <= ratio * dense * (1 + 1e-9)
    assert budget + 1 > ratio * dense * (1 - 1e-9)


def test_param_budget_exact_quarters() -> None:
    assert param_budget(0.25, 400) == 100
    assert param_budget(0.1, 30) == 3


@given(st.integers(1, 50), st.integers(1, 50), st.integers(0, 60))
def test_largest_fitting_matches_linear_scan(lo: int, span: int, threshold: int) -> None:
    hi = lo + span
    expected = max((n for n in range(lo, hi + 1) if n <= threshold), default=None)
    assert largest_fitting(lo, hi, lambda n: n <= threshold) == expected


def test_bisect_eps_finds_lowest_error_within_budget() -> None:
    # size(eps) = ceil(100 * (1 - eps)), error = eps: the best fit has the smallest eps
    def fit(e: float) -> float:
        return e

    found = bisect_eps(fit, lambda e: math.ceil(100 * (1 - e)), lambda e: e, budget=30)
    assert found is not None
    assert math.ceil(100 * (1 - found)) <= 30
    assert found == pytest.approx(0.70, abs=1e-3)
    assert bisect_eps(fit, lambda e: 1000, lambda e: e, budget=30) is None
