"""tnconv.finetune: exact factor-norm balancing, a loss that goes down on a tiny problem,
distillation toward a teacher, and typed errors on bad loaders and arguments."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tnconv
from tnconv.errors import LoaderError, OptionError
from tnconv.layers import factorized_type
from tnconv.training import (
    _contracted_axes,
    _factorized_layers,
    _param_groups,
    balance_factors,
    factor_sensitivity,
)

from .conftest import METHODS

pytestmark = pytest.mark.usefixtures("one_thread")


# -- balancing ------------------------------------------------------------------------------------
@given(
    method=st.sampled_from(METHODS),
    t=st.sampled_from([8, 12, 16]),
    s=st.sampled_from([4, 8, 12]),
    seed=st.integers(0, 2**16),
    log_scales=st.lists(st.floats(-3.0, 3.0), min_size=8, max_size=8),
)
def test_balancing_keeps_the_kernel_and_equalises_the_factors(
    method: str, t: int, s: int, seed: int, log_scales: list[float]
) -> None:
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(s, t, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    opts = {"n_init": 1, "max_iter": 20} if method.startswith("cp") else {}
    try:
        layer = tnconv.FactorizedConv2d.from_conv(conv, method, ratio=0.5, **opts)
    except (tnconv.BudgetError, tnconv.StructureError):
        assume(False)  # this network cannot take this shape at this ratio
    with torch.no_grad():  # unbalance: the kernel is unchanged only if the scales multiply to 1
        scales = [10.0**v for v in log_scales[: len(layer.factors)]]
        scales[-1] = 1.0 / float(torch.tensor(scales[:-1]).prod())
        for f, c in zip(layer.factors, scales, strict=False):
            f.mul_(c)
    kernel = layer.to_tensor().detach().double()
    balance_factors(layer)
    after = layer.to_tensor().detach().double()
    assert torch.allclose(after, kernel, rtol=1e-4, atol=1e-5 * float(kernel.abs().max()))
    norms = torch.tensor([float(f.detach().norm()) for f in layer.factors])
    assert torch.allclose(norms, norms.mean().expand_as(norms), rtol=1e-3)
    if method in ("cp", "cp-stable"):  # one bond shared by all factors: every term balanced
        factors = [f.detach() for f in layer.factors]
        (bond,) = _contracted_axes(layer.equation, len(factors)).values()
        cols = torch.stack([torch.linalg.vector_norm(factors[i], dim=0) for i, _ in bond])
        assert torch.allclose(cols, cols[:1].expand_as(cols), rtol=1e-3)


@pytest.mark.parametrize("method", ["cp", "tr", "tucker"])
@pytest.mark.parametrize(
    "dense",
    [nn.Linear(12, 10), nn.Conv1d(6, 8, 3), nn.Conv3d(4, 6, 3)],
    ids=["linear", "conv1d", "conv3d"],
)
def test_every_layer_kind_is_balanced_and_fine_tuned(method: str, dense: nn.Module) -> None:
    """Linear / Conv1d / Conv3d factorized layers get the same stabilisers as Conv2d: the
    kernel survives balancing, the norms are equalised, finetune trains and keeps them so."""
    torch.manual_seed(0)
    opts = {"n_init": 1, "max_iter": 20} if method == "cp" else {}
    layer = factorized_type(dense).from_dense(dense, method, ratio=0.6, **opts)
    with torch.no_grad():
        layer.factors[0].mul_(1e3)
        layer.factors[-1].mul_(1e-3)
    kernel = layer.to_tensor().detach().double()
    balance_factors(layer)
    assert torch.allclose(layer.to_tensor().detach().double(), kernel, rtol=1e-4, atol=1e-6)
    norms = torch.tensor([float(f.detach().norm()) for f in layer.factors])
    assert torch.allclose(norms, norms.mean().expand_as(norms), rtol=1e-3)
    assert factor_sensitivity(layer) > 0
    model = nn.Sequential(layer, nn.Flatten())
    assert _factorized_layers(model) == [layer]  # finetune stabilises it
    groups = _param_groups(model, [layer], 1e-3, True, True)
    per_factor = [
        g for g in groups if len(g["params"]) == 1 and g["params"][0] in set(layer.factors)
    ]
    assert len(per_factor) == len(layer.factors)
    assert all(g["lr"] != 1e-3 for g in per_factor)  # relative to the factors' share


def test_balancing_rejects_a_dense_layer() -> None:
    with pytest.raises(TypeError, match="FactorizedConv2d"):
        balance_factors(nn.Conv2d(2, 2, 3))  # type: ignore[arg-type]


# -- factor sensitivity ---------------------------------------------------------------------------
def _cp_layer(factors: list[torch.Tensor]) -> tnconv.FactorizedConv2d:
    """A CP layer (t, s, 3, 3) holding exactly ``factors`` ((t, R), (s, R), (3, R), (3, R))."""
    t, rank = factors[0].shape
    s = factors[1].shape[0]
    conv = nn.Conv2d(s, t, 3, bias=False)
    layer = tnconv.FactorizedConv2d.from_conv(conv, "cp", rank, n_init=1, max_iter=2)
    assert isinstance(layer, tnconv.FactorizedConv2d)
    with torch.no_grad():
        for f, value in zip(layer.factors, factors, strict=True):
            f.copy_(value)
    return layer


def _exact_sensitivity(layer: tnconv.FactorizedConv2d) -> float:
    """The defining formula with the expectation done exactly: E ||sum_i J_i g_i||^2 with
    independent g_i of i.i.d. entries of variance rms(f_i)^2 is sum_i rms(f_i)^2 ||J_i||_F^2,
    the Jacobians J_i of the kernel with respect to each factor taken by autograd."""
    factors = [f.detach().double() for f in layer.factors]
    kernel = layer._network(factors).to_tensor()
    total = 0.0
    for i, f in enumerate(factors):

        def of_factor(x: torch.Tensor, i: int = i) -> torch.Tensor:
            return layer._network([*factors[:i], x, *factors[i + 1 :]]).to_tensor()

        jac = torch.autograd.functional.jacobian(of_factor, f)
        total += float(f.pow(2).mean()) * float(jac.pow(2).sum())
    return (total / len(factors)) ** 0.5 / float(kernel.norm())


def _monte_carlo_sensitivity(layer: tnconv.FactorizedConv2d, probes: int) -> float:
    """The definition sampled: sqrt(E ||sum_i J_i g_i||^2 / n) / ||W|| by central differences
    (exact to O(eps^2) for a kernel linear in each factor), g_i ~ N(0, rms(f_i)^2) i.i.d."""
    factors = [f.detach().double() for f in layer.factors]
    kernel = layer._network(factors).to_tensor()
    gen = torch.Generator().manual_seed(0)
    eps, total = 1e-4, 0.0
    for _ in range(probes):
        steps = [
            eps * f.pow(2).mean().sqrt() * torch.randn(f.shape, generator=gen, dtype=f.dtype)
            for f in factors
        ]
        plus = layer._network([f + g for f, g in zip(factors, steps, strict=True)]).to_tensor()
        minus = layer._network([f - g for f, g in zip(factors, steps, strict=True)]).to_tensor()
        total += float((plus - minus).pow(2).sum()) / (2 * eps) ** 2
    return (total / (probes * len(factors))) ** 0.5 / float(kernel.norm())


@pytest.mark.parametrize("method", ["cp", "tucker", "tt", "tr", "tc"])
def test_sensitivity_equals_its_defining_formula(method: str) -> None:
    gen = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(6, 8, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    opts = {"n_init": 1, "max_iter": 20} if method == "cp" else {}
    layer = tnconv.FactorizedConv2d.from_conv(conv, method, ratio=0.5, **opts)
    assert isinstance(layer, tnconv.FactorizedConv2d)
    kappa = factor_sensitivity(layer)
    assert kappa == pytest.approx(_exact_sensitivity(layer), rel=1e-6)  # autograd Jacobians
    assert kappa == pytest.approx(_monte_carlo_sensitivity(layer, 300), rel=0.05)  # sampled


def test_sensitivity_of_cp_is_the_term_norms_over_the_kernel() -> None:
    """Columns of one norm: kappa^2 = sum_r ||term_r||^2 / ||W||^2 exactly; two large
    cancelling terms (a degenerate fit) make it large, orthogonal terms make it 1."""
    gen = torch.Generator().manual_seed(0)
    t, s = 16, 12
    cols = [torch.randn(n, 2, generator=gen, dtype=torch.float64) for n in (t, s, 3, 3)]
    cols[0][:, 1] = -cols[0][:, 0] + 0.05 * cols[0][:, 1]  # term 1 nearly cancels term 0
    for c in cols[1:]:
        c[:, 1] = c[:, 0]
    factors = [30.0**0.25 * c / c.norm(dim=0) for c in cols]  # every column of norm 30^(1/4)
    layer = _cp_layer([f.float() for f in factors])
    terms = torch.einsum("tr,sr,hr,wr->rtshw", *factors)
    kernel = terms.sum(0)
    formula = float(terms.flatten(1).norm(dim=1).pow(2).sum() / kernel.norm() ** 2) ** 0.5
    assert formula > 10  # the degenerate case this is about
    assert _exact_sensitivity(layer) == pytest.approx(formula, rel=1e-3)
    assert factor_sensitivity(layer) == pytest.approx(formula, rel=1e-6)
    # one rank-1 term, orthonormal columns: 1
    eye = [torch.linalg.qr(torch.randn(n, 3, generator=gen))[0] for n in (t, s)]
    spatial = [torch.eye(3), torch.eye(3)]
    orthogonal = _cp_layer(eye + spatial)
    assert _exact_sensitivity(orthogonal) == pytest.approx(1.0, rel=1e-3)
    assert factor_sensitivity(orthogonal) == pytest.approx(1.0, rel=1e-6)


def test_sensitivity_ignores_how_the_scale_is_shared() -> None:
    gen = torch.Generator().manual_seed(1)
    layer = _cp_layer([torch.randn(n, 4, generator=gen) for n in (8, 6, 3, 3)])
    kappa = factor_sensitivity(layer)
    with torch.no_grad():
        for f, c in zip(layer.factors, (100.0, 0.1, 0.5, 0.2), strict=True):
            f.mul_(c)  # the scales multiply to one: the same kernel
    assert factor_sensitivity(layer) == pytest.approx(kappa, rel=1e-6)
    with pytest.raises(TypeError, match="FactorizedConv2d"):
        factor_sensitivity(nn.Conv2d(2, 2, 3))  # type: ignore[arg-type]


def test_sensitivity_divides_only_a_sensitive_layers_factor_rates() -> None:
    gen = torch.Generator().manual_seed(0)
    cols = [torch.randn(n, 2, generator=gen) for n in (8, 6, 3, 3)]
    cols[0][:, 1] = -cols[0][:, 0] + 0.05 * torch.randn(8, generator=gen)
    for c in cols[1:]:
        c[:, 1] = c[:, 0]
    degenerate = _cp_layer(cols)
    model = nn.Sequential(degenerate, nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 6, 5, 5))
    balance_factors(degenerate)
    kappa = factor_sensitivity(degenerate)
    assert kappa > 5
    plain = _param_groups(model, [degenerate], 1e-3, relative=True, sensitive=False)
    damped = _param_groups(model, [degenerate], 1e-3, relative=True, sensitive=True)
    assert [g["params"] for g in plain] == [g["params"] for g in damped]
    for a, b in zip(plain[:-1], damped[:-1], strict=True):  # one group per factor
        assert b["lr"] == pytest.approx(a["lr"] / kappa, rel=1e-9)
    assert damped[-1]["lr"] == plain[-1]["lr"] == 1e-3  # the linear layer: untouched


def test_sensitivity_leaves_a_dense_models_training_unchanged() -> None:
    data = _data()
    runs = []
    for sensitive in (True, False):
        model = _net()
        torch.manual_seed(0)
        tnconv.finetune(model, _loader(data), epochs=1, sensitivity_lr=sensitive)
        runs.append(model.state_dict())
    for key, value in runs[0].items():
        assert torch.equal(value, runs[1][key]), key


# -- training --------------------------------------------------------------------------------------
def _data(n: int = 96, seed: int = 0) -> TensorDataset:
    """Four classes told apart by which quadrant of an 8x8 image is bright."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = 0.5 * torch.randn(n, 3, 8, 8, generator=gen)
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 1.0
    return TensorDataset(x, y)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 4),
    )


def _loss(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(data.tensors[0]), data.tensors[1]))


def _loader(data: TensorDataset, seed: int = 0) -> DataLoader:
    return DataLoader(
        data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("method", ["cp", "tr", "tt", "tucker"])
def test_finetune_reduces_the_loss_and_balances(method: str) -> None:
    data = _data()
    opts = {"n_init": 1, "max_iter": 30} if method == "cp" else {}
    small = tnconv.compress(_net(), method, ratio=0.3, layers=["2"], **opts)
    layer = small[2]
    assert isinstance(layer, tnconv.FactorizedConv2d)
    before = _loss(small, data)
    torch.manual_seed(0)
    history = tnconv.finetune(small, _loader(data), epochs=4, lr=3e-2)
    assert len(history) == 4 and history[-1] < history[0]
    assert _loss(small, data) < 0.5 * before  # measured: 1.39 -> 0.01-0.02 for all four
    assert not small.training
    norms = torch.tensor([float(f.detach().norm()) for f in layer.factors])
    assert torch.allclose(norms, norms.mean().expand_as(norms), rtol=1e-3)  # kept balanced


def test_distillation_moves_the_student_toward_the_teacher() -> None:
    data = _data()
    teacher = _net(1)
    torch.manual_seed(1)
    tnconv.finetune(teacher, _loader(data), epochs=4, lr=3e-2)  # a plain dense model trains too
    student = tnconv.compress(copy.deepcopy(teacher), "tr", ratio=0.2, layers=["2"])
    x = data.tensors[0]

    def gap() -> float:
        with torch.no_grad():
            return float(
                F.kl_div(
                    F.log_softmax(student.eval()(x), 1),
                    F.log_softmax(teacher.eval()(x), 1),
                    reduction="batchmean",
                    log_target=True,
                )
            )

    start = gap()
    teacher.train()  # its mode is restored afterwards
    torch.manual_seed(0)
    history = tnconv.finetune(student, _loader(data), 2, teacher=teacher, alpha=1.0, lr=5e-3)
    assert len(history) == 2 and all(v >= 0 for v in history)  # alpha 1: the KL term alone
    assert teacher.training
    assert gap() < 0.5 * start
    # alpha=0 is plain cross-entropy: the same run as without a teacher
    a, b = copy.deepcopy(student), copy.deepcopy(student)
    torch.manual_seed(3)
    ha = tnconv.finetune(a, _loader(data), 1, teacher=teacher, alpha=0.0)
    torch.manual_seed(3)
    hb = tnconv.finetune(b, _loader(data), 1)
    assert ha == pytest.approx(hb, rel=1e-5)


# -- bad input ---------------------------------------------------------------------------------
def test_bad_loaders_are_loader_errors() -> None:
    model = _net()
    data = _data(32)

    def generator():
        yield data.tensors[0][:4], data.tensors[1][:4]

    with pytest.raises(LoaderError, match="sized iterable"):
        tnconv.finetune(model, generator())
    with pytest.raises(LoaderError, match="no batch"):
        tnconv.finetune(model, [])
    with pytest.raises(LoaderError, match=r"\(inputs, labels\)"):
        tnconv.finetune(model, [data.tensors[0][:4]])  # inputs only
    with pytest.raises(LoaderError, match="labels"):
        tnconv.finetune(model, [(data.tensors[0][:4], data.tensors[0][:4])])  # float "labels"
    with pytest.raises(LoaderError, match=r"\(inputs, labels\) tensors"):
        tnconv.finetune(model, [([1, 2], [0, 1])])
    assert issubclass(LoaderError, TypeError) and issubclass(LoaderError, tnconv.TnconvError)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": 1.5}, "epochs"),
        ({"lr": -1e-3}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"temperature": 0.0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"clip": 0.0}, "clip"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"optimizer": "lbfgs"}, "optimizer"),
    ],
)
def test_bad_arguments_are_option_errors(kwargs: dict, match: str) -> None:
    data = _data(16)
    model = _net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(OptionError, match=match):
        tnconv.finetune(model, _loader(data), **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched


def test_wrong_types_are_type_errors() -> None:
    data = _data(16)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        tnconv.finetune("model", _loader(data))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="teacher"):
        tnconv.finetune(_net(), _loader(data), teacher=lambda x: x)  # type: ignore[arg-type]
