"""Degenerate kernels, layer inputs and geometry, shared-work fits and their speed-related
behaviour (stopping rules, work caps, caches). Timing targets live in benchmarks/fit_speed.py.

The degenerate suite runs every registered method on zero, rank-one, constant, tiny (1e-30),
huge (1e30) and one-dead-channel kernels in four dtypes, with every spec kind, under a
per-example deadline: a hang or a runaway search fails the test instead of stalling the suite.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import signal
from collections.abc import Iterator
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import tnconv
from tnconv.decompositions._linalg import cached
from tnconv.decompositions.cp import CPOptions, cp_als
from tnconv.decompositions.tucker import hooi
from tnconv.errors import InputShapeError, StructureError, TnconvError

from .conftest import METHODS, decaying_kernel

KINDS = ("zero", "rank1", "constant", "tiny", "huge", "dead_channel")
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def make_kernel(kind: str, shape: tuple[int, int, int, int], seed: int) -> torch.Tensor:
    """A float64 kernel of the given degenerate kind."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "zero":
        return torch.zeros(shape, dtype=torch.float64)
    if kind == "constant":
        return torch.full(shape, 0.37, dtype=torch.float64)
    if kind == "rank1":
        vecs = [torch.randn(n, generator=gen, dtype=torch.float64) for n in shape]
        return torch.einsum("t,s,h,w->tshw", *vecs)
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "tiny":
        return w * 1e-30
    if kind == "huge":
        return w * 1e30
    w[0] = 0.0  # dead_channel: one output channel all zeros
    return w


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging) when the body runs longer than ``seconds`` (Unix alarm)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"took longer than {seconds} s: a search does not terminate")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_result(f: tnconv.Factorization, w: torch.Tensor, kind: str, spec: dict) -> None:
    """What every factorization of a degenerate kernel must satisfy."""
    assert f.shape == tuple(w.shape)
    assert all(factor.dtype == w.dtype for factor in f.factors)
    assert all(bool(torch.isfinite(factor.float()).all()) for factor in f.factors)
    err = f.relative_error(w)
    assert math.isfinite(err), f"relative error {err}"
    if not bool(w.any()):
        assert err == 0.0
        assert all(not bool(factor.any()) for factor in f.factors), "zero kernel: zero factors"
        return
    # representable exactly at every rank: rank-one and constant kernels
    loose = 3e-2 if w.dtype in (torch.float16, torch.bfloat16) else 1e-3
    if kind in ("rank1", "constant") and "rank" in spec:
        assert err <= loose, f"{kind} kernel at rank {spec['rank']}: error {err}"
    if "eps" in spec and tnconv.get(f.method).guarantees_eps:
        assert err <= spec["eps"] + loose


@pytest.mark.parametrize("method", METHODS)
@settings(
    max_examples=12,
    deadline=timedelta(seconds=8),
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from(DTYPES),
    spec=st.sampled_from([{"rank": 1}, {"rank": 2}, {"eps": 0.3}, {"ratio": 0.5}]),
    t=st.integers(1, 6),
    s=st.integers(1, 5),
    k=st.sampled_from([1, 3]),
    seed=st.integers(0, 3),
)
def test_degenerate_kernels(
    method: str, kind: str, dtype: torch.dtype, spec: dict, t: int, s: int, k: int, seed: int
) -> None:
    w = make_kernel(kind, (t, s, k, k), seed).to(dtype)
    dec = tnconv.get(method)
    if not bool(torch.isfinite(w).all()):  # 1e30 overflows float16: a typed error, not a hang
        with pytest.raises(TnconvError, match="NaN or Inf"):
            dec.factorize(w, **spec)
        return
    try:
        f = dec.factorize(w, **spec)
    except StructureError:  # a network that cannot take this shape (semi-tensor t): typed
        return
    except TnconvError as exc:  # a typed refusal is allowed (e.g. a ratio too small to fit)
        assert "ratio" in spec, f"unexpected {type(exc).__name__}: {exc}"
        return
    check_result(f, w, kind, spec)


@pytest.mark.parametrize("method", METHODS)
def test_zero_kernel_every_path(method: str) -> None:
    """factorize, from_conv, compress (eps and budget) and study on all-zero convs terminate,
    with zero factors and error 0 (they used to loop forever or divide by zero)."""
    torch.manual_seed(0)
    # even channel counts: every network (semi-tensor t = 2 too) takes the zero conv
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    with torch.no_grad():
        model[2].weight.zero_()
    x = torch.randn(2, 3, 6, 6)
    with time_limit(60):
        layer = tnconv.FactorizedConv2d.from_conv(model[2], method, eps=0.3)
        assert all(not bool(p.any()) for p in layer.factors)
        y = torch.randn(2, 4, 6, 6)
        torch.testing.assert_close(layer(y), model[2](y))
        # (the pool leaves out the 3-channel conv that sttucker's t = 2 keeps dense: counted, it
        # leaves too little of a 0.5 share for the smallest sttucker network of the zero conv)
        budget = tnconv.Budget(share=0.5, pool="factorizable")
        for kwargs in ({"eps": 0.3}, {"budget": budget}, {"rank": 2}):
            small = tnconv.compress(model, method, progress=False, **kwargs)
            assert small(x).shape == model(x).shape
            for name, module in small.named_modules():
                if isinstance(module, tnconv.FactorizedConv2d) and name == "2":
                    assert module.info["relative_error"] == 0.0
        result = tnconv.study(
            {"zero": model[2].weight.detach(), "live": model[0].weight.detach()},
            methods=[method],
            budgets=[0.5],
            latency_repeats=0,
            progress=False,
        )
        assert len(result.rows) >= 1


def test_relative_error_zero_over_zero() -> None:
    f = tnconv.get("tucker").factorize(torch.zeros(3, 2, 3, 3), 1)
    assert f.relative_error(torch.zeros(3, 2, 3, 3)) == 0.0
    live = f.with_factors([torch.ones_like(x) for x in f.factors])
    assert live.relative_error(torch.zeros(3, 2, 3, 3)) == math.inf


# -- layer inputs and geometry ------------------------------------------------------------------
def test_numpy_integer_geometry() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(
        4, 6, 3, stride=np.int64(2), padding=np.int32(1), dilation=(np.int64(1), np.int16(2))
    ).double()
    layer = tnconv.FactorizedConv2d.from_conv(conv, "tucker", (6, 4))
    assert layer.stride == (2, 2) and all(type(v) is int for v in layer.stride)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-8, atol=1e-9)
    f = layer.factorization
    other = tnconv.FactorizedConv2d(f, stride=np.int64(1), padding=(np.int64(1), np.int8(0)))
    expected = F.conv2d(x, f.to_tensor(), None, 1, (1, 0))
    torch.testing.assert_close(other(x), expected, rtol=1e-8, atol=1e-9)


def test_layer_input_errors_match_conv2d() -> None:
    conv = nn.Conv2d(4, 6, 3)
    layer = tnconv.FactorizedConv2d.from_conv(conv, "tt", 2)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        layer(np.zeros((1, 4, 5, 5), dtype=np.float32))
    with pytest.raises(TypeError):
        conv(np.zeros((1, 4, 5, 5), dtype=np.float32))
    bad = torch.zeros(1, 5, 5, 5)
    with pytest.raises(RuntimeError, match=r"expected input\[1, 5, 5, 5\] to have 4 channels"):
        conv(bad)
    # the same kind of error and message as nn.Conv2d, and still a ValueError for old callers
    with pytest.raises(RuntimeError, match=r"expected input\[1, 5, 5, 5\] to have 4 channels"):
        layer(bad)
    with pytest.raises(InputShapeError):
        layer(bad)
    with pytest.raises(ValueError, match="but got 5 channels instead"):
        layer(bad)
    with pytest.raises(RuntimeError, match=r"3D \(unbatched\) or 4D"):
        layer(torch.zeros(5, 5))


# -- shared work, stopping rules, caps -----------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_factorize_many_equals_factorize(method: str) -> None:
    w = decaying_kernel((6, 4, 3, 3), seed=1)
    dec = tnconv.get(method)
    specs = [{"rank": 2}, {"eps": 0.4}, {"ratio": 0.4}, {"eps": 0.2}]
    many = dec.factorize_many(w, specs)
    for spec, f in zip(specs, many, strict=True):
        alone = dec.factorize(w, **spec)
        assert f.ranks == alone.ranks, spec
        assert f.relative_error(w) == pytest.approx(alone.relative_error(w), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("method", ["tucker", "rsdtr", "cp"])
def test_factorize_many_stops_where_until_says(method: str) -> None:
    w = decaying_kernel((6, 4, 3, 3), seed=2)
    dec = tnconv.get(method)
    options = {"n_init": 1} if method == "cp" else {}  # CP's warm ladder path too
    specs = [{"rank": 3}, {"rank": 1}, {"rank": 2}]
    seen: list[int] = []

    def until(i: int, f: tnconv.Factorization) -> bool:
        seen.append(i)
        return i == 1

    many = dec.factorize_many(w, specs, until=until, **options)
    assert seen == [0, 1]  # fitted in the given order; the third is never fitted
    alone = [dec.factorize(w, **spec, **options) for spec in specs[:2]]
    assert [f.ranks for f in many] == [f.ranks for f in alone]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), ranks=st.lists(st.integers(1, 40), min_size=2, max_size=5))
def test_cp_warm_started_ladder_never_gets_worse_with_rank(seed: int, ranks: list[int]) -> None:
    """With one start, factorize_many fits CP ranks in increasing order, each from the smaller
    fit plus new terms: the first ALS update can always return to the smaller fit, so the error
    cannot grow with the rank. Results come back in the order of the specs."""
    w = decaying_kernel((8, 6, 3, 3), seed=seed)
    cp = tnconv.get("cp")
    many = cp.factorize_many(w, [{"rank": r} for r in ranks], n_init=1, max_iter=25)
    for r, f in zip(ranks, many, strict=True):
        assert f.ranks == cp.bond_ranks(r, tuple(w.shape))
    # fitted by rank, equal ranks in the order given (each continues the one before)
    ladder = sorted((f.ranks[0], i, f.relative_error(w)) for i, f in enumerate(many))
    for (_, _, smaller), (_, _, larger) in itertools.pairwise(ladder):
        assert larger <= smaller + 1e-6


def test_cp_warm_starts_fit_as_well_as_cold_starts() -> None:
    w = decaying_kernel((16, 12, 3, 3), seed=3)
    cp = tnconv.get("cp")
    ranks = [2, 4, 8, 16, 32]
    warm = cp.factorize_many(w, [{"rank": r} for r in ranks], n_init=1, max_iter=60)
    for r, f in zip(ranks, warm, strict=True):
        cold = cp.factorize(w, r, n_init=1, max_iter=60)
        assert f.relative_error(w) <= cold.relative_error(w) + 0.01, r


def test_cp_cold_ladder_is_independent_fits_and_what_allocation_uses() -> None:
    """warm_ladder=False fits every rank from its own start, exactly as factorize would; the
    budget search's options ask for it."""
    w = decaying_kernel((16, 12, 3, 3), seed=4)
    cp = tnconv.get("cp")
    ranks = [2, 5, 9]
    cold = cp.factorize_many(w, [{"rank": r} for r in ranks], n_init=1, warm_ladder=False)
    for r, f in zip(ranks, cold, strict=True):
        alone = cp.factorize(w, r, n_init=1, warm_ladder=False)
        assert f.relative_error(w) == alone.relative_error(w)
    for name in ("cp", "cp-stable"):
        dec = tnconv.get(name)
        assert dec.search_options(dec.parse_options({})).warm_ladder is False


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 3), st.integers(1, 3)),
    rank=st.integers(1, 12),
    seed=st.integers(0, 999),
)
def test_cp_sweep_is_textbook_als(shape: tuple[int, int, int, int], rank: int, seed: int) -> None:
    """Oracle: an ALS sweep written from its definition (each factor in turn is the
    least-squares solution ``W_(n) KR_{m != n} (A_m) pinv(Hadamard_{m != n} A_m^T A_m)``, MTTKRPs
    by einsum), with the first three factors' columns normalised as the solver keeps them; and
    the error it returns is the reconstruction's."""
    import tnconv.decompositions.cp as cp_module

    assume(rank <= min(shape[:2]))  # each update's Gram is then positive definite (Schur)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, dtype=torch.float64, generator=gen)
    factors = [torch.randn(n, rank, dtype=torch.float64, generator=gen) for n in shape]
    expected = [f.clone() for f in factors]
    letters = "tshw"
    for n in range(4):
        others = [m for m in range(4) if m != n]
        eq = "tshw," + ",".join(letters[m] + "r" for m in others) + "->" + letters[n] + "r"
        mttkrp = torch.einsum(eq, w, *(expected[m] for m in others))
        gram = math.prod(expected[m].T @ expected[m] for m in others)
        # a near-singular Gram leaves the solution to rounding: not a question for an oracle
        assume(float(torch.linalg.cond(gram)) < 1e6)
        sol = mttkrp @ torch.linalg.pinv(gram)
        expected[n] = sol / sol.norm(dim=0).clamp_min(1e-300) if n < 3 else sol
    problem = cp_module._CPProblem(w, rank, 0.0)
    err = problem.sweep(factors)
    kernel = torch.einsum("tr,sr,hr,wr->tshw", *expected)
    torch.testing.assert_close(
        torch.einsum("tr,sr,hr,wr->tshw", *factors), kernel, rtol=1e-6, atol=1e-6
    )
    # (the solver's error comes from ||W||^2 - 2 <W, W_hat> + ||W_hat||^2: near an exact fit
    # its cancellation leaves ~sqrt(machine epsilon))
    assert err == pytest.approx(float((w - kernel).norm() / w.norm()), rel=1e-6, abs=1e-6)


def test_cp_line_search_check_hands_its_mttkrp_to_the_next_sweep() -> None:
    """The ALS line search's error check computes the T update's MTTKRP of the trial factors;
    a sweep starting from them reuses it. Oracle: the defining einsum, and a sweep that
    recomputes it (bitwise the same factors)."""
    import tnconv.decompositions.cp as cp_module

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(9, 7, 3, 2, dtype=torch.float64, generator=gen)
    problem = cp_module._CPProblem(w, 5, 0.0)
    factors = [torch.randn(n, 5, dtype=torch.float64, generator=gen) for n in w.shape]
    err, first = problem.checked(factors)
    a, b, c, d = factors
    torch.testing.assert_close(first, torch.einsum("tshw,sr,hr,wr->tr", w, b, c, d))
    approx = torch.einsum("tr,sr,hr,wr->tshw", a, b, c, d)
    assert err == pytest.approx(float((w - approx).norm() / w.norm()), rel=1e-10)
    reused, fresh = [f.clone() for f in factors], [f.clone() for f in factors]
    assert problem.sweep(reused, first=first) == problem.sweep(fresh)
    for x, y in zip(reused, fresh, strict=True):
        assert torch.equal(x, y)


def test_cache_dies_with_in_place_change() -> None:
    w = torch.randn(3, 3)
    calls = []

    def compute() -> float:
        calls.append(1)
        return float(w.sum())

    first = cached(w, "sum", compute)
    assert cached(w, "sum", compute) == first and len(calls) == 1
    w.add_(1.0)  # an in-place change bumps the version counter: recomputed
    assert cached(w, "sum", compute) == pytest.approx(first + 9.0) and len(calls) == 2


def test_hooi_stops_early_and_never_worse_than_its_start() -> None:
    w = decaying_kernel((24, 20, 3, 3), seed=2)
    ranks = {0: 5, 1: 4}
    _, _, start_err = hooi(w, ranks, 0, 0.0)
    _, _, loose_err = hooi(w, ranks, 100, 1e-2)
    _, _, tight_err = hooi(w, ranks, 100, 1e-12)
    assert tight_err <= loose_err <= start_err
    f = tnconv.get("tucker").factorize(w, (5, 4))
    # the float32 sweeps leave an exact float64 error behind
    assert f.info["fit_error"] == pytest.approx(f.relative_error(w), rel=1e-9)


def test_cp_work_cap_and_determinism() -> None:
    w = decaying_kernel((12, 10, 3, 3), seed=3)
    _, capped_err, _ = cp_als(w, 6, CPOptions(max_gflop=1e-9, n_init=1))
    full = tnconv.get("cp").factorize(w, 6)
    assert full.relative_error(w) < capped_err  # one sweep (the cap) is far from converged
    again = tnconv.get("cp").factorize(w, 6)
    assert again.relative_error(w) == pytest.approx(full.relative_error(w), rel=1e-9)


def test_compress_reports_each_layer(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3))
    with caplog.at_level(logging.INFO, logger="tnconv"):
        tnconv.compress(model, "tucker", eps=0.3, progress=False)
    messages = [r.getMessage() for r in caplog.records]
    assert any("compress: 2 (tucker, kernel 6x8x3x3)" in m for m in messages), messages
