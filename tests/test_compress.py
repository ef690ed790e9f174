"""Whole-model compression, summary, save / load and export."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tnconv
from tnconv.errors import BudgetError, RankSpecError
from tnconv.io import LoadError

from .conftest import METHODS, REAL_KERNELS, supports


class SmallNet(nn.Module):
    """Convs of every flavour: stem with bias, strided, non-square kernel, grouped, pointwise."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.body = nn.Sequential(
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(32, 32, (3, 1), padding=(1, 0)),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=4),
            nn.Conv2d(32, 24, 1),
        )
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        return self.head(self.body(x).mean(dim=(2, 3)))


def cp_rank2_(model: nn.Module) -> nn.Module:
    """Give every ungrouped conv an exactly low-rank kernel (a sum of two rank-one terms), which
    every method represents exactly with far fewer parameters than the dense kernel."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.groups == 1:
                t, s, kh, kw = m.weight.shape
                parts = [
                    torch.randn(n, 2, generator=gen, dtype=m.weight.dtype) for n in (t, s, kh, kw)
                ]
                m.weight.copy_(torch.einsum("ta,sa,ha,wa->tshw", *parts))
    return model


def real_net() -> nn.Sequential:
    """Trained kernels (dlib 5x5, PP-OCR 3x3) in a plain conv stack."""

    def conv_from(key: str, padding: int) -> nn.Conv2d:
        w = torch.tensor(REAL_KERNELS[key])
        conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], padding=padding)
        with torch.no_grad():
            conv.weight.copy_(w)
        return conv

    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        conv_from("dlib_mmod/conv02", 2),
        nn.ReLU(),
        nn.Conv2d(32, 45, 1),
        nn.ReLU(),
        conv_from("dlib_mmod/conv04", 2),
        nn.ReLU(),
        nn.Conv2d(45, 96, 1),
        nn.ReLU(),
        conv_from("ppocrv4_det/49_conv2d_156.w_0", 1),
    ).eval()


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def factorized(model: nn.Module) -> dict[str, tnconv.FactorizedConv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, tnconv.FactorizedConv2d)}


# -- compress -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_original_untouched_and_outputs_preserved(method: str) -> None:
    torch.manual_seed(0)
    model = cp_rank2_(SmallNet().double()).eval()
    before = copy.deepcopy(model)
    small = tnconv.compress(model, method, eps=1e-6)
    assert small is not model
    assert same_state(model, before)
    assert all(type(a) is type(b) for a, b in zip(model.modules(), before.modules(), strict=True))
    names = ["stem", "body.0", "body.2", "body.5"]
    # a network that cannot take a layer's shape (StructureError) leaves it dense, saying why
    takes = {n for n in names if supports(method, tuple(model.get_submodule(n).weight.shape))}
    assert set(factorized(small)) == takes
    x = torch.randn(2, 3, 13, 11, dtype=torch.float64)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)
    reasons = tnconv.dense_reasons(small)
    # the grouped conv is fitted per group (a shared group index); exact fits save nothing here
    assert "no saving" in reasons["body.4"]
    assert all("must divide" in reasons[n] for n in set(names) - takes)


def test_inplace_modifies_and_returns_the_model() -> None:
    model = SmallNet()
    out = tnconv.compress(model, "tucker", 4, inplace=True)
    assert out is model
    assert isinstance(model.body[0], tnconv.FactorizedConv2d)


def test_layer_selection() -> None:
    model = SmallNet()
    only = tnconv.compress(model, "tt", 2, layers=["body.0", "body.2"])
    assert set(factorized(only)) == {"body.0", "body.2"}
    by_kernel = tnconv.compress(
        model, "tt", 2, layers=lambda n, m: getattr(m, "kernel_size", ()) == (3, 3)
    )
    assert set(factorized(by_kernel)) == {"stem", "body.0", "body.4"}  # body.4 is grouped
    by_type = tnconv.compress(model, "tt", 2, layers=nn.Linear)
    assert isinstance(by_type.head, tnconv.FactorizedLinear) and not factorized(by_type)
    with pytest.raises(KeyError, match=r"no module named .body\.9."):
        tnconv.compress(model, "tt", 2, layers=["body.9"])
    with pytest.raises(TypeError, match=r"not an nn\.Linear"):
        tnconv.compress(model, "tt", 2, layers=["bn"])


def test_bad_arguments() -> None:
    model = SmallNet()
    with pytest.raises(RankSpecError):
        tnconv.compress(model, "tt", 2, eps=0.3)
    with pytest.raises(RankSpecError, match="budget"):
        tnconv.compress(model, "tt", 2, budget=0.5)
    with pytest.raises(RankSpecError, match="budget"):
        tnconv.compress(model, "tt", budget=1.5)
    with pytest.raises(KeyError, match="tucker"):
        tnconv.compress(model, "nope", 2)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        tnconv.compress(torch.randn(3), "tt", 2)
    with pytest.raises(ValueError, match="input_size"):
        tnconv.compress(model, "tt", 2, must_save="flops", input_size=(1, 5, 8, 8))


@pytest.mark.parametrize("method", METHODS)
def test_layers_that_cannot_be_helped_stay_dense(method: str) -> None:
    torch.manual_seed(0)
    model = SmallNet()  # random kernels: at eps=0.01 no method saves anything
    out = (
        tnconv.compress(model, method, eps=0.01)
        if method != "cp"
        else tnconv.compress(model, method, 10**6)
    )
    assert not factorized(out)
    rows = {r.name: r for r in tnconv.summary(out, (1, 3, 16, 16)).rows}
    assert "kept dense" in rows["body.0"].note and "no saving" in rows["body.0"].note


def test_must_save_flops_uses_the_input_size() -> None:
    model = real_net()
    out = tnconv.compress(model, "tucker", eps=0.3, must_save="both", input_size=(1, 3, 16, 16))
    s = tnconv.summary(out)
    assert s.input_size == (1, 3, 16, 16)  # recorded by compress
    for r in s.rows:
        if r.method != "dense":
            assert r.params < r.dense_params and r.flops < r.dense_flops


# -- budget allocation ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["params", "flops"])
def test_budget_is_met_and_beats_uniform_ranks(kind: str) -> None:
    model = real_net()
    size = (1, 3, 16, 16)
    share = 0.3
    out = tnconv.compress(model, "tt", budget=(kind, share), input_size=size)
    s = tnconv.summary(out)
    key = (lambda r: r.params) if kind == "params" else (lambda r: r.flops)
    dense_key = (lambda r: r.dense_params) if kind == "params" else (lambda r: r.dense_flops)
    assert sum(key(r) for r in s.rows) <= share * sum(dense_key(r) for r in s.rows) + 1e-9
    chosen = [r for r in s.rows if r.method == "tt"]
    assert len({r.ranks for r in chosen}) > 1  # not a uniform rank

    # the allocation's total squared error is no worse than the best uniform rank in budget
    # the criterion: sum over layers of -log(1 - e^2) (a dense layer has e = 0)
    def loss(rows) -> float:
        return sum(-math.log(1 - (r.relative_error or 0.0) ** 2) for r in rows)

    alloc_err = loss(chosen)
    best_uniform = math.inf
    for rank in range(1, 46):
        t = tnconv.summary(tnconv.compress(model, "tt", rank, input_size=size))
        if sum(key(r) for r in t.rows) <= share * sum(dense_key(r) for r in t.rows):
            best_uniform = min(best_uniform, loss(t.rows))
    assert best_uniform < math.inf
    assert alloc_err <= best_uniform + 1e-9


@pytest.mark.parametrize("must_save", ["params", "flops"])
def test_budget_eps_ladder_stops_where_candidates_stop_saving(
    must_save: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The allocation walks the eps grid from the loosest bound and, when parameters must be
    saved, stops at the first factorization as large as the dense kernel (one layer: the ladder
    allocation gives it 0.6 of it, so the reach of twice that is past it); the plan is the one
    the whole grid gives (the candidates it skips would be refused anyway)."""
    from tnconv import allocation

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(12, 12, 3, padding=1)
    ).eval()  # random: small eps do not compress
    dec = type(tnconv.get("tucker"))
    fitted: list[list] = []
    original = dec.factorize_many

    def recording(self, weight, specs, **options):
        out = original(self, weight, specs, **options)
        fitted.append([(spec, f.num_params) for spec, f in zip(specs, out, strict=False)])
        return out

    monkeypatch.setattr(dec, "factorize_many", recording)
    kwargs = {"budget": 0.6, "input_size": (1, 12, 8, 8), "must_save": must_save}
    walked = tnconv.compress(model, "tucker", **kwargs)
    eps = [(spec["eps"], n) for spec, n in fitted[-1] if "eps" in spec]
    assert [e for e, _ in eps] == sorted((e for e, _ in eps), reverse=True)
    if must_save == "params":
        assert len(eps) < len(allocation._EPS_GRID) and eps[-1][1] >= 12 * 12 * 9
        assert all(n < 12 * 12 * 9 for _, n in eps[:-1])

        def every(self, weight, specs, until=None, **options):  # the whole grid, no stop
            return original(self, weight, specs, **options)

        monkeypatch.setattr(dec, "factorize_many", every)
        whole = tnconv.compress(model, "tucker", **kwargs)
        assert tnconv.summary(whole).rows[0].ranks == tnconv.summary(walked).rows[0].ranks
    else:  # no parameter saving required: the walk reaches past the dense size, not the grid
        assert eps[-1][1] >= 12 * 12 * 9 or len(eps) == len(allocation._EPS_GRID)


@pytest.mark.parametrize("method", ["tt", "rsdtr", "tucker"])
@pytest.mark.parametrize("budget", [0.15, 0.4])
def test_budget_eps_walk_stops_at_twice_the_ladder_allocation(
    method: str, budget: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The eps walks stop at _EPS_REACH times what the ladder-only allocation gives each layer,
    and on trained kernels the plan is as good as the one from every layer's whole walk."""
    from tnconv import allocation

    dec = type(tnconv.get(method))
    original = dec.factorize_many
    walks: dict[tuple, list[int]] = {}

    def recording(self, weight, specs, **options):
        out = original(self, weight, specs, **options)
        sizes = [f.num_params for spec, f in zip(specs, out, strict=False) if "eps" in spec]
        walks.setdefault(tuple(weight.shape), []).extend(sizes)
        return out

    monkeypatch.setattr(dec, "factorize_many", recording)
    model = real_net()
    kwargs = {"budget": budget, "input_size": (1, 3, 16, 16)}
    walked = tnconv.compress(model, method, **kwargs)
    short = dict(walks)
    dense = {
        tuple(m.weight.shape): m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d)
    }
    for shape, sizes in short.items():
        # a walk never continues past a fit as large as the dense kernel
        assert all(n < dense[shape] for n in sizes[:-1])

    walks.clear()
    monkeypatch.setattr(allocation, "_EPS_REACH", math.inf)  # every walk to the dense size
    whole = tnconv.compress(model, method, **kwargs)
    assert sum(len(v) for v in short.values()) <= sum(len(v) for v in walks.values())

    def loss(m: nn.Module) -> float:
        errs = [r.relative_error for r in tnconv.summary(m).rows if r.relative_error is not None]
        return sum(-math.log(1 - e * e) for e in errs)

    assert loss(walked) <= loss(whole) * 1.02 + 1e-9


def test_budget_too_small_is_an_error() -> None:
    with pytest.raises(BudgetError, match="budget"):
        tnconv.compress(real_net(), "tt", budget=1e-4)


# -- summary --------------------------------------------------------------------------------------
def test_summary_rows_and_flops_match_the_flop_counter() -> None:
    model = real_net()
    small = tnconv.compress(model, "tr", ratio=0.2)
    size = (2, 3, 12, 10)
    s = tnconv.summary(small, size)
    assert [r.name for r in s.rows] == [
        n
        for n, m in small.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear, tnconv.FactorizedLayer))
    ]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        small(torch.zeros(size))
    assert s.flops == counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(size))
    assert s.dense_flops == counter.get_total_flops()
    for r in s.rows:
        if r.method == "tr":
            layer = small.get_submodule(r.name)
            assert r.params == layer.num_params and r.ranks == layer.ranks
            assert 0 < r.relative_error < 1
    text = str(s)
    assert "layers total" in text and "tr" in text
    assert s.model_params == sum(p.numel() for p in small.parameters())
    # the whole model: every FLOP is in a row here, every parameter of the dense model counted
    assert s.model_flops == s.flops and s.dense_model_flops == s.dense_flops
    assert s.dense_model_params == sum(p.numel() for p in model.parameters())
    assert "whole model: parameters" in text


def test_summary_csv(tmp_path) -> None:
    s = tnconv.summary(tnconv.compress(SmallNet(), "tucker", 4), (1, 3, 8, 8))
    path = tmp_path / "s.csv"
    s.to_csv(path)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("name,method,ranks") and len(lines) == len(s.rows) + 1


# -- save / load / export -------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_save_load_roundtrip(method: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = SmallNet().eval()
    small = tnconv.compress(model, method, 3, input_size=(1, 3, 16, 16))
    path = tmp_path / "small.pt"
    tnconv.save(small, path)
    x = torch.randn(2, 3, 16, 16)
    again = tnconv.load(path, trusted=True)
    assert torch.equal(again(x), small(x))
    fresh = SmallNet().eval()  # the architecture only, new random weights
    rebuilt = tnconv.load(path, model=fresh)
    assert torch.equal(rebuilt(x), small(x))
    assert isinstance(fresh.body[0], nn.Conv2d)  # the given model is not modified
    assert tnconv.dense_reasons(rebuilt) == tnconv.dense_reasons(small)
    assert tnconv.summary(rebuilt).input_size == (1, 3, 16, 16)


def test_load_errors(tmp_path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(LoadError, match="not a tnconv save"):
        tnconv.load(plain)
    small = tnconv.compress(SmallNet(), "tt", 2)
    path = tmp_path / "s.pt"
    tnconv.save(small, path)
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["tnconv"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    bad = tmp_path / "v99.pt"
    save_file(tensors, str(bad), metadata={"tnconv": json.dumps(dict(header, version=99))})
    with pytest.raises(LoadError, match="version 99"):
        tnconv.load(bad)
    other = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(LoadError, match=r"no module|kernel"):
        tnconv.load(path, model=other)
    with pytest.raises(FileNotFoundError):
        tnconv.load(tmp_path / "missing.pt")


@pytest.mark.parametrize("method", METHODS)
def test_torch_export_gives_the_same_outputs(method: str) -> None:
    torch.manual_seed(0)
    small = tnconv.compress(SmallNet().eval(), method, 3)
    x = torch.randn(2, 3, 16, 16)
    exported = torch.export.export(small, (x,))
    torch.testing.assert_close(exported.module()(x), small(x))


# -- per-layer spec -----------------------------------------------------------------------------
def test_spec_gives_each_layer_its_own_method_and_rank() -> None:
    model = cp_rank2_(SmallNet().double()).eval()
    spec = {
        "body.0": 2,
        "body.2": {"method": "tucker", "rank": (2, 2)},
        "body.5": {"eps": 1e-6, "method": "tt"},
    }
    small = tnconv.compress(model, "cp", spec=spec)
    layers = factorized(small)
    assert set(layers) == set(spec)  # exactly the named layers
    assert (layers["body.0"].method, layers["body.0"].ranks) == ("cp", (2,))
    assert (layers["body.2"].method, layers["body.2"].ranks) == ("tucker", (2, 2))
    assert layers["body.5"].method == "tt"
    for name, layer in layers.items():  # each equals a direct factorize with the same spec
        conv = model.get_submodule(name)
        assert torch.allclose(layer.to_tensor(), conv.weight, atol=1e-8), name
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    assert torch.allclose(small(x), model(x), atol=1e-7)


def test_spec_without_a_default_method_and_its_errors() -> None:
    model = cp_rank2_(SmallNet().double()).eval()
    small = tnconv.compress(model, None, spec={"body.0": {"method": "tt", "rank": 2}})
    assert factorized(small)["body.0"].method == "tt"
    with pytest.raises(TypeError, match=r"body\.0"):
        tnconv.compress(model, None, spec={"body.0": 2})
    with pytest.raises(RankSpecError, match="not combine"):
        tnconv.compress(model, "cp", 2, spec={"body.0": 2})
    with pytest.raises(RankSpecError, match=r"body\.0"):
        tnconv.compress(model, "cp", spec={"body.0": {"eps": 0.1, "rank": 2}})
    with pytest.raises(RankSpecError, match=r"body\.0"):
        tnconv.compress(model, "cp", spec={"body.0": {"rnak": 2}})
    with pytest.raises(KeyError, match="nope"):
        tnconv.compress(model, "cp", spec={"nope": 2})
    with pytest.raises(tnconv.OptionError):
        tnconv.compress(model, "cp", spec={"body.0": {"rank": 2, "options": {"bogus": 1}}})
