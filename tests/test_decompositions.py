"""Every registered decomposition against its defining properties (parametrized over
``tnconv.available()``, so plugins are covered too) and against TensorLy at equal ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import tnconv
from tnconv.errors import BudgetError
from tnconv.rank import param_budget

from .conftest import (
    EPS_METHODS,
    METHODS,
    REAL_3D,
    decaying_kernel,
    require_support,
    supports,
    uniform_ranks,
)

kernel_shapes = st.tuples(
    st.integers(1, 10), st.integers(1, 10), st.sampled_from([1, 2, 3, 5]), st.sampled_from([1, 3])
)


def random_kernel(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


# -- structure ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@given(shape=kernel_shapes, rank=st.integers(1, 6), seed=st.integers(0, 1000))
def test_structure_and_counts(method: str, shape: tuple, rank: int, seed: int) -> None:
    assume(supports(method, shape, rank))
    w = random_kernel(shape, seed, torch.float32)
    dec = tnconv.get(method)
    f = dec.factorize(w, rank)
    assert f.shape == shape
    assert f.method == method
    assert f.num_params == sum(int(t.numel()) for t in f.factors)
    assert f.num_params == dec.num_params_at(shape, f.ranks)
    assert f.ranks == dec.bond_ranks(rank, shape)
    assert all(t.dtype == torch.float32 for t in f.factors)
    dense = f.to_tensor()
    assert dense.shape == shape and dense.dtype == torch.float32
    assert f.info["relative_error"] == pytest.approx(f.relative_error(w), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=15, deadline=None)
@given(
    shape=st.sampled_from([(16, 16, 3, 3), (8, 24, 3, 3), (24, 8, 1, 3), (12, 10, 5, 5)]),
    ratio=st.sampled_from([0.15, 0.3, 0.6]),
    seed=st.integers(0, 1000),
)
@example(shape=(8, 24, 3, 3), ratio=0.3, seed=0)  # rsdtr: (6, 6, 1, 3), not from shift 0
def test_a_fit_at_the_ranks_of_a_found_factorization_keeps_them(
    method: str, shape: tuple, ratio: float, seed: int
) -> None:
    """The ranks a search returns are ranks the method fits as they are (the sequential refit
    and rank rounding refit at them): rsdtr's rings from shifts other than the first once had
    their ranks capped as shift 0 would cap them ((6, 6, 1, 3) -> (2, 4, 1, 3) below)."""
    w = random_kernel(shape, seed)
    dec = tnconv.get(method)
    found = dec.factorize(w, ratio)
    assert dec.bond_ranks(found.ranks, shape) == found.ranks
    again = dec.factorize(w, found.ranks)
    assert again.ranks == found.ranks and again.num_params == found.num_params


@pytest.mark.parametrize("method", METHODS)
@given(shape=kernel_shapes, rank=st.integers(1, 10**6))
def test_capped_ranks_are_idempotent_and_never_raised(method: str, shape: tuple, rank: int) -> None:
    assume(supports(method, shape, rank))
    dec = tnconv.get(method)
    capped = dec.bond_ranks(rank, shape)
    assert dec.bond_ranks(capped, shape) == capped
    assert all(1 <= r <= rank for r in capped)


# -- exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@given(shape=kernel_shapes, seed=st.integers(0, 1000))
def test_full_rank_reconstructs(method: str, shape: tuple, seed: int) -> None:
    assume(supports(method, shape))
    w = random_kernel(shape, seed)
    f = tnconv.get(method).factorize(w, 10**6)
    assert f.relative_error(w) < 1e-10


@pytest.mark.parametrize("name", sorted(REAL_3D))
def test_full_rank_reconstructs_real_kernels(method: str, name: str) -> None:
    require_support(method, REAL_3D[name].shape)
    w = torch.tensor(REAL_3D[name], dtype=torch.float64)
    f = tnconv.get(method).factorize(w, 10**6)
    assert f.relative_error(w) < 1e-10


# -- eps -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", EPS_METHODS)
@given(
    shape=kernel_shapes,
    eps=st.floats(0.01, 0.99),
    seed=st.integers(0, 1000),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    decaying=st.booleans(),
)
def test_eps_bound_holds(
    method: str, shape: tuple, eps: float, seed: int, dtype: torch.dtype, decaying: bool
) -> None:
    assume(supports(method, shape))
    w = (decaying_kernel(shape, seed) if decaying else random_kernel(shape, seed)).to(dtype)
    f = tnconv.get(method).factorize(w, eps=eps)
    assert f.relative_error(w) <= eps


@pytest.mark.parametrize("method", EPS_METHODS)
@pytest.mark.parametrize("name", sorted(REAL_3D))
@pytest.mark.parametrize("eps", [0.05, 0.3, 0.6])
def test_eps_bound_holds_on_real_kernels(method: str, name: str, eps: float) -> None:
    require_support(method, REAL_3D[name].shape)
    w = torch.tensor(REAL_3D[name])
    f = tnconv.get(method).factorize(w, eps=eps)
    assert f.relative_error(w) <= eps
    # looser accuracy never needs more parameters than the full-rank network
    assert f.num_params <= tnconv.get(method).factorize(w, 10**6).num_params


@pytest.mark.parametrize("method", EPS_METHODS)
def test_looser_eps_is_smaller_on_real_kernel(method: str) -> None:
    w = torch.tensor(
        REAL_3D["dlib_mmod/conv04" if supports(method, (45, 45, 5, 5)) else "dlib_mmod/conv02"]
    )
    dec = tnconv.get(method)
    sizes = [dec.factorize(w, eps=e).num_params for e in (0.1, 0.3, 0.5, 0.7)]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[-1] < sizes[0]


def test_eps_without_guarantee_reaches_target_when_possible() -> None:
    # every registered method accepts eps; the ones without a guarantee search their rank
    for method in sorted(set(METHODS) - set(EPS_METHODS)):
        w = decaying_kernel((6, 5, 3, 3), 0)
        f = tnconv.get(method).factorize(w, eps=0.5)
        assert f.relative_error(w) <= 0.5


# -- ratio ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@given(shape=kernel_shapes, ratio=st.floats(0.05, 1.0), seed=st.integers(0, 1000))
def test_ratio_fits_budget(method: str, shape: tuple, ratio: float, seed: int) -> None:
    assume(supports(method, shape))
    w = decaying_kernel(shape, seed)
    dec = tnconv.get(method)
    budget = param_budget(ratio, math.prod(shape))
    smallest = dec.num_params_at(shape, dec.min_ranks(shape))
    if smallest > budget:
        with pytest.raises(BudgetError):
            dec.factorize(w, ratio=ratio)
        return
    f = dec.factorize(w, ratio=ratio)
    assert f.num_params <= budget
    if ratio < 1.0:  # a float rank means ratio, but only in (0, 1): 1.0 is not a rank
        assert dec.factorize(w, ratio).num_params <= budget


@pytest.mark.parametrize("name", sorted(REAL_3D))
@pytest.mark.parametrize("ratio", [0.15])
def test_ratio_beats_uniform_rank_on_real_kernels(method: str, name: str, ratio: float) -> None:
    """ratio= minimises error under the budget: never worse than the best uniform rank."""
    w = torch.tensor(REAL_3D[name], dtype=torch.float64)
    shape = tuple(w.shape)
    dec = tnconv.get(method)
    budget = param_budget(ratio, math.prod(shape))
    require_support(method, shape)
    uniform = [
        r
        for r in uniform_ranks(method, shape)
        if dec.num_params_at(shape, dec.bond_ranks(r, shape)) <= budget
    ]
    if not uniform:
        pytest.skip("no uniform rank fits")
    f = dec.factorize(w, ratio=ratio)
    ref = dec.factorize(w, max(uniform))
    assert f.num_params <= budget
    assert f.relative_error(w) <= ref.relative_error(w) + 1e-9


# -- against TensorLy at equal ranks ------------------------------------------------------------
tl = pytest.importorskip("tensorly")
tl_dec = pytest.importorskip("tensorly.decomposition")


def _tensorly_error(method: str, w: torch.Tensor, ranks: tuple[int, ...]) -> float:
    x = w.numpy()
    shape = x.shape
    if method == "cp":
        approx = tl.cp_to_tensor(tl_dec.parafac(x, ranks[0], init="svd", random_state=0))
    elif method == "tucker":
        approx = tl.tucker_to_tensor(tl_dec.tucker(x, rank=[*ranks, *shape[len(ranks) :]]))
    elif method == "tt":
        approx = tl.tt_to_tensor(tl_dec.tensor_train(x, rank=[1, *ranks, 1]))
    else:
        approx = tl.tr_to_tensor(tl_dec.tensor_ring(x, rank=[*ranks, ranks[0]]))
    return float(np.linalg.norm(x - approx) / np.linalg.norm(x))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["cp", "tucker", "tt", "tr", "rsdtr"])
@pytest.mark.parametrize("name", ["ppocrv4_det/49_conv2d_156.w_0", "dlib_mmod/conv04"])
@pytest.mark.parametrize("rank", [2, 4, 9])
def test_no_worse_than_tensorly(method: str, name: str, rank: int) -> None:
    tl.set_backend("numpy")
    w = torch.tensor(REAL_3D[name], dtype=torch.float64)
    dec = tnconv.get(method)
    # TensorLy's TR-SVD starts at the T mode: rsdtr compared at ranks that shift carries (its
    # own bond_ranks keeps ranks any of the four shifts carries)
    ranks = tnconv.get("tr" if method == "rsdtr" else method).bond_ranks(rank, tuple(w.shape))
    ours = dec.factorize(w, ranks).relative_error(w)
    theirs = _tensorly_error(method, w, ranks)
    assert ours <= theirs * (1 + 1e-7)


def test_tucker_full_and_tucker2_layouts() -> None:
    w = decaying_kernel((8, 6, 3, 3), 1)
    f2 = tnconv.get("tucker").factorize(w, (3, 2))
    assert [tuple(t.shape) for t in f2.factors] == [(3, 2, 3, 3), (8, 3), (6, 2)]
    f4 = tnconv.get("tucker").factorize(w, (3, 2, 2, 3))
    assert [tuple(t.shape) for t in f4.factors] == [(3, 2, 2, 3), (8, 3), (6, 2), (3, 2), (3, 3)]
    full = tnconv.get("tucker").factorize(w, eps=0.3, full=True)
    assert len(full.ranks) == 4 and full.relative_error(w) <= 0.3


def test_ring_layouts_follow_documented_rank_order() -> None:
    w = decaying_kernel((12, 10, 3, 3), 2)
    tr = tnconv.get("tr").factorize(w, (2, 3, 4, 2))
    assert [tuple(t.shape) for t in tr.factors] == [(2, 12, 3), (3, 10, 4), (4, 3, 2), (2, 3, 2)]
    tt = tnconv.get("tt").factorize(w, (5, 4, 2))
    assert [tuple(t.shape) for t in tt.factors] == [(12, 5), (5, 10, 4), (4, 3, 2), (2, 3)]


def test_cp_reports_degeneracy_and_balances_scales() -> None:
    w = decaying_kernel((8, 6, 3, 3), 3)
    f = tnconv.get("cp").factorize(w, 4)
    assert f.info["degeneracy"] >= 0.99
    norms = torch.stack([torch.linalg.vector_norm(t, dim=0) for t in f.factors])
    torch.testing.assert_close(norms, norms[:1].expand_as(norms))


def test_float32_input_gives_float32_and_device_preserved(method: str) -> None:
    require_support(method, (6, 5, 3, 3), 2)
    w = decaying_kernel((6, 5, 3, 3), 4).float()
    f = tnconv.get(method).factorize(w, 2)
    assert all(t.dtype == torch.float32 and t.device == w.device for t in f.factors)


@given(seed=st.integers(0, 2**31 - 1), data=st.data())
def test_contract_contiguous_equals_einsum_for_every_method(seed: int, data: st.DataObject) -> None:
    """The dense kernel of every registered network, in any sizes: einsum's values, contiguous."""
    from tnconv.factorization import contract_contiguous

    method = data.draw(st.sampled_from(METHODS))
    shape = data.draw(kernel_shapes.map(lambda s: (2 * s[0], 2 * s[1], s[2], s[3])))
    rank = data.draw(st.sampled_from([2, 4]))
    assume(supports(method, shape, rank))
    f = tnconv.get(method).random(shape, rank, seed=seed, dtype=torch.float64)
    dense = contract_contiguous(f.equation, f.factors)
    assert dense.is_contiguous()
    torch.testing.assert_close(dense, torch.einsum(f.equation, *f.factors), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "equation",
    [
        "ab,bc->ac",  # the last matmul as written
        "ab,bc->ca",  # the last matmul with its operands swapped
        "ab,bc,cd->da",  # a pairwise step first
        "abc,cd->bda",  # interleaved output: einsum, then one copy
        "ab,ab->ab",  # a batch index (shared and kept)
        "abc,cd->ad",  # an index summed inside one operand
        "ab->ba",  # one operand
    ],
)
def test_contract_contiguous_layouts(equation: str) -> None:
    from tnconv.factorization import contract_contiguous

    gen = torch.Generator().manual_seed(0)
    sizes = dict(zip("abcd", (3, 4, 5, 2), strict=True))
    ops = [
        torch.randn([sizes[c] for c in term], generator=gen, dtype=torch.float64)
        for term in equation.split("->")[0].split(",")
    ]
    dense = contract_contiguous(equation, ops)
    assert dense.is_contiguous()
    torch.testing.assert_close(dense, torch.einsum(equation, *ops))
