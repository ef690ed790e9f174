"""Every bad input gets a clear, typed error naming the problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tnconv
from tnconv.errors import (
    BudgetError,
    EquationError,
    InvalidWeightError,
    OptionError,
    RankSpecError,
    UnknownMethodError,
)

from .conftest import require_support


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (torch.randn(4), "got 1-D"),
        (torch.randn(2, 4, 3, 3, 1, 1), "got 6-D"),
        (torch.randn(4, 0, 3, 3), "zero-sized"),
        (torch.ones(4, 3, 3, 3, dtype=torch.int64), "floating"),
        (torch.full((4, 3, 3, 3), float("nan")), "NaN"),
        (torch.tensor([[[[1.0, float("inf")]]]]), "NaN or Inf"),
        ("not a tensor", "cannot be converted|got 0-D"),
    ],
)
def test_bad_weights(method: str, weight: object, message: str) -> None:
    with pytest.raises(InvalidWeightError, match=message) as info:
        tnconv.get(method).factorize(weight, 2)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rank": 0},
        {"rank": -1},
        {"rank": "2"},
        {"rank": 2.0},
        {"eps": 0},
        {"eps": 1.5},
        {"ratio": 0},
        {"ratio": 2},
        {"rank": 2, "eps": 0.2},
        {"eps": 0.2, "ratio": 0.5},
        {},
    ],
)
def test_bad_rank_specs(method: str, kwargs: dict) -> None:
    w = torch.randn(6, 5, 3, 3)
    with pytest.raises(RankSpecError):
        tnconv.get(method).factorize(w, **kwargs)


def test_wrong_rank_tuple_length(method: str) -> None:
    with pytest.raises(RankSpecError, match="rank"):
        tnconv.get(method).factorize(torch.randn(6, 5, 3, 3), (2,) * 7)


def test_unknown_option(method: str) -> None:
    with pytest.raises(OptionError, match="no_such_option"):
        tnconv.get(method).factorize(torch.randn(6, 5, 3, 3), 2, no_such_option=1)


def test_tiny_ratio_is_a_budget_error(method: str) -> None:
    with pytest.raises(BudgetError, match="ratio"):
        tnconv.get(method).factorize(torch.randn(64, 64, 3, 3), ratio=1e-6)


def test_unknown_method_lists_known() -> None:
    with pytest.raises(KeyError) as info:
        tnconv.get("no-such-method")
    assert isinstance(info.value, UnknownMethodError)
    for name in tnconv.available():
        assert name in str(info.value)
    with pytest.raises(KeyError, match="tucker"):
        tnconv.FactorizedConv2d.from_conv(nn.Conv2d(3, 4, 3), "nope", 2)


def test_bad_layer_arguments() -> None:
    f = tnconv.get("tucker").factorize(torch.randn(6, 5, 3, 3), 2)
    with pytest.raises(ValueError, match="groups=5 but the factorization has 1"):
        tnconv.FactorizedConv2d(f, groups=5)
    with pytest.raises(InvalidWeightError, match="groups=3 does not divide"):
        tnconv.get("tucker").factorize(torch.randn(4, 2, 3, 3), 2, groups=3)
    with pytest.raises(InvalidWeightError, match="1 spatial mode"):
        tnconv.FactorizedConv1d(f)
    with pytest.raises(TypeError, match="Conv2d"):
        tnconv.FactorizedConv2d.from_conv(nn.Linear(3, 4), "tucker", 2)
    with pytest.raises(TypeError, match="Factorization"):
        tnconv.FactorizedConv2d(torch.randn(6, 5, 3, 3))
    with pytest.raises(ValueError, match="stride"):
        tnconv.FactorizedConv2d(f, stride=0)
    with pytest.raises(ValueError, match="padding"):
        tnconv.FactorizedConv2d(f, padding="full")
    with pytest.raises(ValueError, match="padding"):
        tnconv.FactorizedConv2d(f, padding=-1)
    with pytest.raises(ValueError, match="'same'"):
        tnconv.FactorizedConv2d(f, padding="same", stride=2)
    with pytest.raises(ValueError, match="padding_mode"):
        tnconv.FactorizedConv2d(f, padding_mode="mirror")
    with pytest.raises(ValueError, match="bias"):
        tnconv.FactorizedConv2d(f, bias=torch.zeros(7))
    layer = tnconv.FactorizedConv2d(f)
    with pytest.raises(ValueError, match="expected input"):
        layer(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="smaller than"):
        layer(torch.randn(2, 5, 2, 2))


def test_bad_equations() -> None:
    a, b = torch.randn(4, 2), torch.randn(2, 3, 3, 3)
    with pytest.raises(EquationError, match="->"):
        tnconv.Factorization([a, b], "ta,ashw", (4, 3, 3, 3), (2,))
    with pytest.raises(EquationError, match="operands"):
        tnconv.Factorization([a], "ta,ashw->tshw", (4, 3, 3, 3), (2,))
    with pytest.raises(EquationError, match="sizes"):
        tnconv.Factorization([torch.randn(4, 5), b], "ta,ashw->tshw", (4, 3, 3, 3), (2,))
    with pytest.raises(EquationError, match="mode"):
        tnconv.Factorization([a, b], "ta,ashw->tshw", (4, 3, 3, 2), (2,))
    with pytest.raises(EquationError, match="summed inside one factor"):
        tnconv.Factorization([a, torch.randn(2, 3, 3, 3, 2)], "ta,ashwz->tshw", (4, 3, 3, 3), (2,))
    with pytest.raises(EquationError, match="exactly one factor"):
        tnconv.Factorization(
            [torch.randn(4, 2, 3), torch.randn(2, 3, 3, 3)], "tah,ashw->tshw", (4, 3, 3, 3), (2,)
        )


def test_numpy_weight_is_accepted(method: str) -> None:
    require_support(method, (6, 5, 3, 3), 2)
    w = np.random.default_rng(0).standard_normal((6, 5, 3, 3)).astype(np.float32)
    f = tnconv.get(method).factorize(w, 2)
    assert f.to_tensor().dtype == torch.float32
    assert f.to_tensor().shape == (6, 5, 3, 3)
