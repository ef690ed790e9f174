"""RSDTR: the eps bound under every option, agreement with an independent re-implementation of
the published search, never more parameters than it, layout and rotation, the exhaustive search
against brute force, FLOPs of the layer against the paper's four-sublayer pipeline, fine-tuning
and option validation. (The generic suites cover rsdtr as well: it is registered.)"""

from __future__ import annotations

import itertools
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import tnconv
from tnconv.decompositions import rsdtr as rsdtr_module
from tnconv.decompositions.rsdtr import pipeline_flops
from tnconv.errors import OptionError

from .conftest import REAL_3D, REAL_KERNELS, adam_losses, decaying_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from published_rsdtr import published_rsdtr, ring_dense

# every trained kernel with more than one input channel (the 3-D ones, a 3-input stem, a 1x1)
REAL = {k: v for k, v in REAL_KERNELS.items() if v.shape[1] > 1}


# -- the paper, reproduced ------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(REAL))
@pytest.mark.parametrize("eps", [0.3, 0.5])
def test_published_mode_equals_independent_reimplementation(name: str, eps: float) -> None:
    w = torch.tensor(REAL[name], dtype=torch.float64)
    ref = published_rsdtr(w, eps)
    f = tnconv.get("rsdtr").factorize(w, eps=eps, search="published")
    assert f.ranks == ref.ranks
    assert f.num_params == ref.params
    assert f.info["shift"] == ref.shift
    torch.testing.assert_close(f.to_tensor(), ring_dense(ref.cores), rtol=1e-9, atol=1e-12)
    assert f.relative_error(w) <= eps


@given(
    shape=st.tuples(
        st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 2, 3]), st.sampled_from([1, 3])
    ),
    eps=st.floats(0.05, 0.95),
    seed=st.integers(0, 1000),
)
def test_published_mode_equals_reimplementation_on_random_kernels(
    shape: tuple, eps: float, seed: int
) -> None:
    w = decaying_kernel(shape, seed)
    ref = published_rsdtr(w, eps)
    f = tnconv.get("rsdtr").factorize(w, eps=eps, search="published")
    assert (f.ranks, f.num_params) == (ref.ranks, ref.params)


# -- better than the paper -------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(REAL))
@pytest.mark.parametrize("eps", [0.3, 0.5])
def test_never_more_params_than_published_on_real_kernels(name: str, eps: float) -> None:
    w = torch.tensor(REAL[name])
    f = tnconv.get("rsdtr").factorize(w, eps=eps)
    assert f.relative_error(w) <= eps
    assert f.num_params <= published_rsdtr(w, eps).params


def test_fewer_params_than_published_in_total_on_real_kernels() -> None:
    ours = published = 0
    for eps in (0.3, 0.5):
        for w in REAL_3D.values():
            ours += tnconv.get("rsdtr").factorize(w, eps=eps).num_params
            published += published_rsdtr(torch.tensor(w), eps).params
    # measured 0.82 of the published parameters on these four kernels
    assert ours <= 0.85 * published


# -- the bound, under every option --------------------------------------------------------------
option_sets = st.sampled_from(
    [
        {},
        {"search": "published"},
        {"refine": False},
        {"objective": "flops"},
        {"objective": "flops", "input_size": (7, 9), "stride": 2},
        {"search_max_gflop": 0.0, "refine_seeds": 1},
        {"als_max_gflop": 0.0},
        {"refine_seeds": 3, "als_sweeps": 1},
    ]
)


@given(
    shape=st.tuples(
        st.integers(1, 10),
        st.integers(1, 10),
        st.sampled_from([1, 2, 3, 5]),
        st.sampled_from([1, 3]),
    ),
    eps=st.floats(0.01, 0.99),
    seed=st.integers(0, 1000),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    decaying=st.booleans(),
    options=option_sets,
)
def test_eps_bound_holds_for_every_option(
    shape: tuple, eps: float, seed: int, dtype: torch.dtype, decaying: bool, options: dict
) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = decaying_kernel(shape, seed) if decaying else torch.randn(shape, generator=gen)
    w = w.to(dtype)
    f = tnconv.get("rsdtr").factorize(w, eps=eps, **options)
    assert f.relative_error(w) <= eps
    assert f.num_params == sum(t.numel() for t in f.factors)


@pytest.mark.parametrize("name", sorted(REAL_3D))
@pytest.mark.parametrize("options", [{"objective": "flops"}, {"refine": False}])
def test_eps_bound_on_real_kernels_with_options(name: str, options: dict) -> None:
    w = torch.tensor(REAL_3D[name])
    f = tnconv.get("rsdtr").factorize(w, eps=0.4, **options)
    assert f.relative_error(w) <= 0.4


def test_rings_larger_than_dense_are_returned_not_refused() -> None:
    """factorize reports: a tight eps on an incompressible kernel costs more than dense."""
    w = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f = tnconv.get("rsdtr").factorize(w, eps=0.01)
    assert f.num_params > w.numel()
    assert f.relative_error(w) <= 0.01


def test_zero_kernel_gives_zero_ring() -> None:
    w = torch.zeros(4, 3, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0 vs 0 is an exact fit (error 0), nothing to warn about
        f = tnconv.get("rsdtr").factorize(w, eps=0.5)
    assert f.ranks == (1, 1, 1, 1)
    assert torch.count_nonzero(f.to_tensor()) == 0
    assert f.relative_error(w) == 0.0


# -- the search -----------------------------------------------------------------------------------
def brute_force_min_params(w: torch.Tensor, eps: float) -> int:
    """Fewest parameters of any sequential TR-SVD plan within eps (numpy, no shortcuts)."""
    x64 = w.numpy().astype(np.float64)
    budget = eps * eps * float(np.sum(x64 * x64)) * (1 + 1e-12)
    best = math.inf
    for p in range(4):
        order = [(p + j) % 4 for j in range(4)]
        x = np.transpose(x64, order)
        n = x.shape
        _, s0, vh0 = np.linalg.svd(x.reshape(n[0], -1), full_matrices=False)
        for big_r in range(1, s0.size + 1):
            t0 = float(np.sum(s0[big_r:] ** 2))
            if t0 > budget:
                continue
            for r0 in (d for d in range(1, big_r + 1) if big_r % d == 0):
                r1 = big_r // r0
                rest = (s0[:big_r, None] * vh0[:big_r]).reshape(r0, r1, -1)
                rest = np.transpose(rest, (1, 2, 0)).reshape(r1 * n[1], -1)
                _, s1, vh1 = np.linalg.svd(rest, full_matrices=False)
                for r2 in range(1, s1.size + 1):
                    t1 = float(np.sum(s1[r2:] ** 2))
                    if t0 + t1 > budget:
                        continue
                    rest2 = (s1[:r2, None] * vh1[:r2]).reshape(r2 * n[2], -1)
                    s2 = np.linalg.svd(rest2, compute_uv=False)
                    r3 = next(
                        r
                        for r in range(1, s2.size + 1)
                        if t0 + t1 + float(np.sum(s2[r:] ** 2)) <= budget
                    )
                    bonds = (r0, r1, r2, r3)
                    best = min(best, sum(bonds[j] * n[j] * bonds[(j + 1) % 4] for j in range(4)))
    return int(best)


@pytest.mark.parametrize(
    ("shape", "seed", "eps"),
    [
        ((8, 6, 3, 3), 0, 0.3),
        ((6, 9, 3, 2), 1, 0.5),
        ((5, 7, 3, 3), 2, 0.2),
        ((7, 5, 1, 1), 3, 0.4),
    ],
)
def test_search_finds_the_best_sequential_plan(shape: tuple, seed: int, eps: float) -> None:
    """Without refinement and below the work cap the branch and bound is exhaustive."""
    w = decaying_kernel(shape, seed)
    f = tnconv.get("rsdtr").factorize(w, eps=eps, refine=False, search_max_gflop=1e6)
    assert f.info["search_exhaustive"]
    assert f.num_params == brute_force_min_params(w, eps)


@pytest.mark.parametrize("shares", [(1.0,), (0.5, 1.0), (0.05, 0.3)])
def test_search_is_exhaustive_whatever_its_first_shares(shares: tuple) -> None:
    """The first shares only order the search: without a work cap it still finds the best."""
    w = decaying_kernel((8, 6, 3, 3), 5)
    f = tnconv.get("rsdtr").factorize(
        w, eps=0.3, refine=False, search_max_gflop=1e6, first_shares=shares
    )
    assert f.info["search_exhaustive"]
    assert f.num_params == brute_force_min_params(w, 0.3)


@pytest.mark.parametrize("name", sorted(REAL)[:4])
def test_quick_search_without_paper_plans_keeps_the_bound(name: str) -> None:
    """The allocation's quick search (two shares, no paper plans, no refinement) still returns
    rings within eps, and on real kernels within 2% of the full search's parameters."""
    w = torch.tensor(REAL[name])
    rsdtr = tnconv.get("rsdtr")
    quick = rsdtr.search_options(rsdtr.parse_options({}))
    assert not quick.paper_plans and quick.first_shares == (0.5, 1.0)
    for eps in (0.2, 0.5):
        fast = rsdtr.factorize(w, eps=eps, **quick.model_dump())
        full = rsdtr.factorize(w, eps=eps, refine=False)
        assert fast.relative_error(w) <= eps
        assert fast.num_params <= 1.02 * full.num_params + 4


def test_search_is_exhaustive_on_a_real_kernel() -> None:
    w = torch.tensor(REAL["ppocrv4_det/00_conv2d_0.w_0"])
    f = tnconv.get("rsdtr").factorize(w, eps=0.3, refine=False, search_max_gflop=1e6)
    assert f.num_params == brute_force_min_params(w, 0.3)


def test_refinement_never_adds_parameters() -> None:
    w = torch.tensor(REAL_3D["dlib_mmod/conv06"])
    plain = tnconv.get("rsdtr").factorize(w, eps=0.3, refine=False)
    refined = tnconv.get("rsdtr").factorize(w, eps=0.3)
    assert refined.num_params <= plain.num_params
    assert refined.relative_error(w) <= 0.3


# -- layout and rotation --------------------------------------------------------------------------
def test_factor_layout_follows_rank_order() -> None:
    w = decaying_kernel((12, 10, 3, 2), 2)
    f = tnconv.get("rsdtr").factorize(w, (2, 3, 4, 2))
    assert f.equation == "atb,bsc,chd,dwa->tshw"
    assert f.ranks == (2, 3, 4, 2)
    assert [tuple(t.shape) for t in f.factors] == [(2, 12, 3), (3, 10, 4), (4, 3, 2), (2, 2, 2)]


@pytest.mark.parametrize("shift", [0, 1, 2, 3])
def test_rings_found_on_shifted_kernels_rotate_back(shift: int) -> None:
    """A ring fitted to the kernel shifted to start at any mode reconstructs the kernel itself,
    and its error is exactly the energy its SVDs discarded."""
    w = decaying_kernel((6, 5, 3, 2), shift)
    search = rsdtr_module._Search(w)
    n = search.shifts[shift].dims
    full = rsdtr_module._Plan(shift, (1, n[0], min(n[0] * n[1], n[2] * n[3]), n[3]))
    cores, sq_err = search.cores(full, 0.0)
    torch.testing.assert_close(rsdtr_module._dense(cores), w, rtol=1e-10, atol=1e-12)
    assert [c.shape[1] for c in cores] == [6, 5, 3, 2]  # (G_T, G_S, G_H, G_W)
    budget = 0.2**2 * search.norm2
    plan = search.best(lambda r: rsdtr_module.ring_params(w.shape, r), 0.2)[0]
    cores, sq_err = search.cores(plan, budget)
    err = float(torch.linalg.vector_norm(w - rsdtr_module._dense(cores)) ** 2)
    assert err == pytest.approx(sq_err, rel=1e-8, abs=1e-12)
    assert sq_err <= budget


def test_winning_shift_is_reported_and_reconstructs() -> None:
    w = torch.tensor(REAL_3D["ppocrv4_det/49_conv2d_156.w_0"], dtype=torch.float64)
    shifts = {
        tnconv.get("rsdtr").factorize(w, eps=e, refine=False).info["shift"] for e in (0.3, 0.5)
    }
    assert shifts - {0}  # the spatial-first shifts win on this kernel
    f = tnconv.get("rsdtr").factorize(w, eps=0.3, refine=False)
    assert f.relative_error(w) == pytest.approx(f.info["fit_error"], rel=1e-9)


def test_fixed_ranks_search_the_shift() -> None:
    """At fixed ranks the most accurate shift is kept: never worse than TR-SVD from T."""
    w = torch.tensor(REAL_3D["dlib_mmod/conv04"], dtype=torch.float64)
    for ranks in [(2, 5, 6, 3), (4, 4, 4, 4), (1, 9, 5, 2)]:
        ours = tnconv.get("rsdtr").factorize(w, ranks, als_sweeps=0)
        tr = tnconv.get("tr").factorize(w, ranks, als_sweeps=0)
        assert ours.ranks == tr.ranks == ranks
        assert ours.relative_error(w) <= tr.relative_error(w) * (1 + 1e-12)


# -- FLOPs ----------------------------------------------------------------------------------------
def test_pipeline_flops_formula() -> None:
    # (R_WT, R_TS, R_SH, R_HW) = (2, 3, 4, 5) on (T, S, 3, 3), input 8 x 8, stride 2 -> 4 x 4
    t, s = 7, 6
    expected = 2 * (
        8 * 8 * s * 3 * 4 + 3 * 4 * 8 * 4 * 3 * 5 + 3 * 4 * 4 * 5 * 3 * 2 + 4 * 4 * 2 * 3 * t
    )
    assert pipeline_flops((t, s, 3, 3), (2, 3, 4, 5), (8, 8), (2, 2)) == expected


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    ("name", "eps"), [("ppocrv4_det/49_conv2d_156.w_0", 0.3), ("dlib_mmod/conv04", 0.5)]
)
def test_layer_flops_within_pipeline(name: str, eps: float, stride: int) -> None:
    """FactorizedConv2d runs a found ring at most 10% above the paper's four sublayers (the
    planner may find a cheaper order: at stride 2 it does)."""
    w = torch.tensor(REAL_3D[name])
    f = tnconv.get("rsdtr").factorize(w, eps=eps, input_size=(16, 16), stride=stride)
    kh, kw = w.shape[2:]
    layer = tnconv.FactorizedConv2d(f, stride=stride, padding=(kh // 2, kw // 2))
    x = torch.randn(4, w.shape[1], 16, 16)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    executed = counter.get_total_flops()
    assert f.info["pipeline_flops"] == pipeline_flops(f.shape, f.ranks, (16, 16), (stride, stride))
    assert executed <= 1.1 * 4 * f.info["pipeline_flops"]
    if stride == 1:
        assert executed >= 0.9 * 4 * f.info["pipeline_flops"]


@pytest.mark.parametrize("stride", [1, 2])
def test_layer_flops_match_pipeline_at_fixed_ranks(stride: int) -> None:
    w = decaying_kernel((64, 64, 3, 3), 0)
    f = tnconv.get("rsdtr").factorize(w, (3, 4, 6, 5))
    layer = tnconv.FactorizedConv2d(f, stride=stride, padding=1).float()
    x = torch.randn(8, 64, 14, 14)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    pipeline = 8 * pipeline_flops(f.shape, f.ranks, (14, 14), (stride, stride))
    assert counter.get_total_flops() <= 1.1 * pipeline
    torch.testing.assert_close(
        layer(x), F.conv2d(x, f.to_tensor().float(), None, stride, 1), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("name", sorted(REAL_3D))
def test_flops_objective_never_more_flops_than_params_objective(name: str) -> None:
    w = torch.tensor(REAL_3D[name])
    dec = tnconv.get("rsdtr")
    by_params = dec.factorize(w, eps=0.5, input_size=(28, 28))
    by_flops = dec.factorize(w, eps=0.5, objective="flops", input_size=(28, 28))
    assert by_flops.info["pipeline_flops"] <= by_params.info["pipeline_flops"]
    assert by_flops.relative_error(w) <= 0.5


# -- training -------------------------------------------------------------------------------------
def test_fine_tuning_from_factors_lowers_the_loss() -> None:
    """Start from the eps=0.5 ring of a trained kernel and fit the dense layer's outputs: the
    ring is Frobenius-optimal-ish, not output-optimal, so a few Adam steps lower the loss."""
    torch.manual_seed(0)
    w = torch.tensor(REAL_3D["dlib_mmod/conv02"])
    teacher = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], padding=2, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(w)
    student = tnconv.FactorizedConv2d.from_conv(teacher, "rsdtr", eps=0.5)
    x = torch.randn(8, w.shape[1], 12, 12)
    target = teacher(x).detach()
    losses = adam_losses(student, x, target, lr=1e-3)
    assert losses[-1] < 0.9 * losses[0]  # measured 0.80
    assert all(b <= a * (1 + 1e-3) for a, b in itertools.pairwise(losses))


# -- options --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"objective": "latency"}, "objective"),
        ({"search": "exhaustive"}, "search"),
        ({"search": "published", "objective": "flops"}, "published"),
        ({"input_size": (0, 8)}, "input_size"),
        ({"input_size": (8,)}, "input_size"),
        ({"stride": 0}, "stride"),
        ({"search_max_gflop": -1.0}, "search_max_gflop"),
        ({"refine_seeds": 0}, "refine_seeds"),
        ({"als_sweeps": -1}, "als_sweeps"),
        ({"als_max_gflop": float("nan")}, "als_max_gflop"),
        ({"first_shares": ()}, "first_shares"),
        ({"first_shares": (0.5, 0.0)}, "first_shares"),
        ({"shifts": 4}, "shifts"),
    ],
)
def test_bad_options_raise_option_error(options: dict, field: str) -> None:
    with pytest.raises(OptionError, match=field):
        tnconv.get("rsdtr").factorize(torch.randn(6, 5, 3, 3), eps=0.3, **options)


def test_ratio_meets_budget_with_lower_error_than_published_at_same_size() -> None:
    """ratio= picks the lowest error within the budget; at the published ring's size it is at
    least as accurate as the published ring."""
    w = torch.tensor(REAL_3D["ppocrv4_det/49_conv2d_156.w_0"], dtype=torch.float64)
    ref = published_rsdtr(w, 0.5)
    ratio = ref.params / w.numel()
    f = tnconv.get("rsdtr").factorize(w, ratio=ratio)
    assert f.num_params <= ref.params
    ref_err = float(
        torch.linalg.vector_norm(w - ring_dense(ref.cores)) / torch.linalg.vector_norm(w)
    )
    assert f.relative_error(w) <= ref_err


# -- compress passes each layer's geometry ---------------------------------------------------------
def test_compress_gives_each_layer_its_input_size_and_stride() -> None:
    w = torch.tensor(REAL_3D["dlib_mmod/conv02"])  # 32 -> 32, 5x5
    model = nn.Sequential(
        nn.Conv2d(32, 32, 5, padding=2), nn.Conv2d(32, 32, 5, stride=2, padding=2)
    )
    with torch.no_grad():
        for conv in model:
            conv.weight.copy_(w)
    small = tnconv.compress(model, "rsdtr", eps=0.5, objective="flops", input_size=(1, 32, 24, 20))
    for idx, (size, stride) in enumerate([((24, 20), (1, 1)), ((24, 20), (2, 2))]):
        f = small[idx].factorization
        assert (tuple(f.info["input_size"]), tuple(f.info["stride"])) == (size, stride)
        alone = tnconv.get("rsdtr").factorize(
            w, eps=0.5, objective="flops", input_size=size, stride=stride
        )
        assert f.ranks == alone.ranks
    # an option the caller sets is kept
    fixed = tnconv.compress(model, "rsdtr", eps=0.5, stride=1, input_size=(1, 32, 24, 20))
    assert tuple(fixed[1].factorization.info["stride"]) == (1, 1)


@settings(max_examples=20, deadline=None)
@given(
    dims=st.tuples(st.integers(2, 7), st.integers(2, 7), st.integers(1, 3), st.integers(1, 3)),
    p=st.integers(0, 3),
    split=st.integers(0, 20),
    seed=st.integers(0, 1000),
    scale=st.sampled_from([1.0, 1e-30, 1e30]),
)
def test_second_split_spectra_equal_their_definition(
    dims: tuple, p: int, split: int, seed: int, scale: float
) -> None:
    """The search's spectra of a split, taken without eigenvectors (and in float32 on request),
    equal the definitions: the second SVD's squared singular values, and the energy profile of
    the third SVD's matrix ``S @ Vh`` reshaped at the largest second rank."""
    w = decaying_kernel(dims, seed) * scale
    sh = rsdtr_module._Shift.of(w, p)
    n = sh.dims
    big_r = 1 + split % min(n[0], n[1] * n[2] * n[3])
    r0 = rsdtr_module._divisors(big_r)[split % len(rsdtr_module._divisors(big_r))]
    r1 = big_r // r0
    mat = sh.remainder1(r0, r1)
    _, s1, vh1 = torch.linalg.svd(mat, full_matrices=False)
    third = torch.linalg.svdvals((s1[:, None] * vh1).reshape(s1.numel() * n[2], n[3] * r0))
    energy = float(torch.sum(w * w))
    for single, tol in ((False, 1e-12), (True, 1e-6)):
        step = sh.step1(r0, r1, single)
        got_head2 = sh.head2(r0, r1, single)
        assert step.head2 is got_head2  # cached on the split
        assert torch.isfinite(step.lam).all() and torch.isfinite(got_head2).all()
        assert torch.allclose(step.lam, s1**2, rtol=0, atol=tol * energy)
        head2 = torch.cumsum(third**2, 0)
        assert torch.allclose(got_head2[1 : head2.numel() + 1], head2, rtol=0, atol=tol * energy)
        r2 = max(1, s1.numel() // 2)
        want = torch.linalg.svdvals((s1[:r2, None] * vh1[:r2]).reshape(r2 * n[2], -1)) ** 2
        got = sh.lam2(r0, r1, r2, single)
        assert torch.allclose(got[: want.numel()], want, rtol=0, atol=tol * energy)


def test_refinement_work_cap_bounds_the_dense_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every dense error check of the refinement is paid from ``als_max_gflop``: with no work
    allowed, the refinement forms no dense ring at all and returns the sequential ring."""
    w = decaying_kernel((12, 10, 3, 3), seed=4)
    calls: list[int] = []
    original = rsdtr_module._error

    def counting(weight: torch.Tensor, cores: list) -> float:
        calls.append(1)
        return original(weight, cores)

    monkeypatch.setattr(rsdtr_module, "_error", counting)
    capped = tnconv.get("rsdtr").factorize(w, eps=0.3, als_max_gflop=0.0)
    assert len(calls) <= 2  # the reported fit error only
    calls.clear()
    free = tnconv.get("rsdtr").factorize(w, eps=0.3)
    assert len(calls) > 2
    assert free.num_params <= capped.num_params
    assert capped.relative_error(w) <= 0.3 and free.relative_error(w) <= 0.3


@settings(max_examples=25, deadline=None)
@given(
    dims=st.tuples(st.integers(2, 6), st.integers(2, 6), st.integers(1, 3), st.integers(1, 3)),
    p=st.integers(0, 3),
    seed=st.integers(0, 1000),
    single=st.booleans(),
)
def test_shared_gram_equals_the_direct_gram(dims: tuple, p: int, seed: int, single: bool) -> None:
    """The Gram matrices taken as sums of blocks of one shared Gram of ``S @ Vh`` equal the
    products of the second and third SVD's matrices themselves, entry for entry and in their
    index order, for every split of every first rank; ``S @ Vh`` of a split from that Gram's
    eigen-decomposition reproduces the matrix's Gram and is orthogonal by rows."""
    w = decaying_kernel(dims, seed)
    direct = rsdtr_module._Shift.of(w, p)
    shared = rsdtr_module._Shift.of(w, p)
    with pytest.MonkeyPatch.context() as patch:  # the shared Gram from the first split on
        patch.setattr(rsdtr_module._SharedGram, "work", staticmethod(lambda size, other: 0.0))
        _check_shared_grams(w, direct, shared, single)


def _check_shared_grams(
    w: torch.Tensor, direct: rsdtr_module._Shift, shared: rsdtr_module._Shift, single: bool
) -> None:
    n = shared.dims
    tol = (1e-5 if single else 1e-12) * float(torch.sum(w * w)) / float(shared.s[0]) ** 2
    for big_r in range(1, min(n[0], n[1] * n[2] * n[3]) + 1):
        for r0 in rsdtr_module._divisors(big_r):
            r1 = big_r // r0
            mat = shared.remainder1(r0, r1, single)
            for split, m in ((1, mat), (2, mat.reshape(r1 * n[1] * n[2], n[3] * r0))):
                want = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
                got = shared.gram(r0, r1, split, single)
                assert got.shape == want.shape and got.dtype == want.dtype
                assert torch.allclose(got, want, rtol=0, atol=tol * (1 if single else 1e2))
            step = shared.step1(r0, r1, single, rows=True)
            rows = step.rows
            assert rows is not None
            scale = 1.0 if not single else float(shared.s[0]) ** -2
            assert torch.allclose(rows.T @ rows, mat.T @ mat, rtol=0, atol=10 * tol)
            assert torch.allclose(
                rows @ rows.T, torch.diag(step.lam * scale).to(rows.dtype), rtol=0, atol=10 * tol
            )
            # the eigenvalues-only path (direct Grams here) agrees with it
            assert torch.allclose(
                direct.step1(r0, r1, single).lam, step.lam, rtol=0, atol=10 * tol * (1 / scale)
            )
    assert shared.grams, "the shared Gram was never used"


def test_eps_search_results_do_not_depend_on_threads() -> None:
    """The eps search runs independent parts on the caller's torch threads: the ring is the same,
    bit for bit, on one thread and on two (and the caller's thread count is restored)."""
    before = torch.get_num_threads()
    try:
        for w in (
            torch.as_tensor(REAL_KERNELS["dlib_mmod/conv04"]),
            decaying_kernel((40, 36, 3, 3), 7),
        ):
            rings = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                rings.append(tnconv.get("rsdtr").factorize(w.clone(), eps=0.3))
                assert torch.get_num_threads() == threads
            one, two = rings
            assert one.ranks == two.ranks
            for a, b in zip(one.factors, two.factors, strict=True):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(before)
