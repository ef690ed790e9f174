"""The conv-einsum planner: exact optimality of the order, the shape of plans for the
classical networks, and FLOP accounting."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tnconv
from tnconv.contraction import ConvGeometry, ConvNetwork, ConvPathOptimizer, plan_conv


def all_linear_paths(n: int) -> list[list[tuple[int, int]]]:
    """Every order of pairwise contractions of n operands (opt_einsum's linear format)."""
    if n == 1:
        return [[]]
    paths = []
    for i, j in itertools.combinations(range(n), 2):
        for rest in all_linear_paths(n - 1):
            paths.append([(i, j), *rest])
    return paths


def _factorization(method: str, shape: tuple, rank, seed: int = 0) -> tnconv.Factorization:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    return tnconv.get(method).factorize(w, rank, **({"max_iter": 5} if method == "cp" else {}))


@settings(max_examples=12)
@given(
    method=st.sampled_from(["tucker", "tt", "tr", "cp"]),
    t=st.integers(2, 24),
    s=st.integers(2, 24),
    k=st.sampled_from([1, 3]),
    rank=st.integers(1, 6),
    batch=st.integers(1, 8),
    hw=st.integers(3, 12),
    stride=st.integers(1, 2),
)
def test_order_is_optimal_against_every_order(
    method: str, t: int, s: int, k: int, rank: int, batch: int, hw: int, stride: int
) -> None:
    """With memory weighed at 0 the optimizer's choice needs the fewest multiply-adds."""
    f = _factorization(method, (t, s, k, k), rank)
    net = ConvNetwork.from_factorization(f)
    geo = ConvGeometry.make((k, k), stride=stride, padding=k // 2)
    shape = (batch, s, hw, hw)
    best = plan_conv(net, geo, shape, memory_weight=0.0)
    paths = all_linear_paths(len(net.terms) + 1)
    assert best.macs == min(plan_conv(net, geo, shape, path=p).macs for p in paths)
    assert best.cost == best.macs  # the optimizer prices exactly what the executor runs


def test_optimizer_works_through_opt_einsum_contract_path() -> None:
    import opt_einsum

    f = _factorization("tr", (32, 32, 3, 3), 4)
    net = ConvNetwork.from_factorization(f)
    opt = ConvPathOptimizer(net, (14, 14), (14, 14))
    sizes = dict(net.sizes)
    shapes = [(8, 32, 14, 14)] + [tuple(sizes[c] for c in term) for term in net.terms]
    path, _info = opt_einsum.contract_path(net.einsum(), *shapes, shapes=True, optimize=opt)
    assert len(path) == len(net.terms) and math.isfinite(opt.cost)


def _data_steps(plan) -> list[tuple]:
    return [
        (s.weight_shape, s.groups, s.data_shape[0] // plan.input_shape[0])
        for s in plan.steps
        if hasattr(s, "weight_shape")
    ]


def test_tucker2_runs_as_1x1_kxk_1x1() -> None:
    f = _factorization("tucker", (256, 256, 3, 3), (64, 48))
    layer = tnconv.FactorizedConv2d(f, padding=1)
    plan = layer.plan_for((32, 256, 14, 14))
    assert _data_steps(plan) == [
        ((48, 256, 1, 1), 1, 1),
        ((64, 48, 3, 3), 1, 1),
        ((256, 64, 1, 1), 1, 1),
    ]


def test_cp_runs_as_pointwise_depthwise_pointwise() -> None:
    f = _factorization("cp", (128, 96, 3, 3), 32)
    layer = tnconv.FactorizedConv2d(f, padding=1)
    steps = _data_steps(layer.plan_for((16, 96, 14, 14)))
    assert steps[0] == ((32, 96, 1, 1), 1, 1)
    assert steps[-1] == ((128, 32, 1, 1), 1, 1)
    assert all(g == 32 for _, g, _ in steps[1:-1])  # depthwise spatial steps in between


def test_tr_matches_four_sublayer_pipeline_flops() -> None:
    """The ring executes at most at the FLOPs of the RSDTR paper's pipeline (+10%)."""
    r_wt, r_ts, r_sh, r_hw = 3, 4, 6, 5
    f = _factorization("tr", (64, 64, 3, 3), (r_wt, r_ts, r_sh, r_hw))
    assert f.ranks == (r_wt, r_ts, r_sh, r_hw)
    b, h, w, t, s = 32, 14, 14, 64, 64
    for stride in (1, 2):
        layer = tnconv.FactorizedConv2d(f, stride=stride, padding=1)
        plan = layer.plan_for((b, s, h, w))
        ho = (h + 2 - 3) // stride + 1
        pipeline = 2 * (
            b * h * w * s * r_ts * r_sh  # 1x1 S -> R_TS * R_SH
            + b * r_ts * ho * w * r_sh * 3 * r_hw  # kh x 1, shared over R_TS
            + b * r_ts * ho * ho * r_hw * 3 * r_wt  # 1 x kw
            + b * ho * ho * r_wt * r_ts * t  # 1x1 closing the ring
        )
        assert plan.flops <= 1.1 * pipeline


@pytest.mark.parametrize("kernel", [(1, 1), (3, 1), (2, 4)])
def test_geometry_output_sizes_match_torch(kernel: tuple) -> None:
    for stride, pad, dil in itertools.product([1, 2, 3], [0, 1, 2], [1, 2]):
        geo = ConvGeometry.make(kernel, stride, pad, dil)
        x = torch.zeros(1, 1, 11, 10)
        w = torch.zeros(1, 1, *kernel)
        if 11 + 2 * pad < dil * (kernel[0] - 1) + 1:
            continue
        ref = torch.nn.functional.conv2d(x, w, None, stride, pad, dil).shape[2:]
        assert geo.output_size((11, 10), kernel) == tuple(ref)
