"""Depthwise convs factorized along (channels, kh, kw) with compress(depthwise="factorize"):
the channel is the network's shared group index, so cp / tt / tr / rsdtr give a sum of
spatially separable kernels per channel; checked against F.conv2d on the reconstructed kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tnconv
from tnconv.errors import RankSpecError
from tnconv.layers import FactorizedConv2d

SEPARABLE = ["cp", "tt", "tr", "rsdtr"]  # networks that save parameters on a per-channel kernel


@settings(max_examples=8)
@given(
    method=st.sampled_from(SEPARABLE),
    channels=st.integers(1, 6),
    kh=st.integers(1, 5),
    kw=st.integers(1, 5),
    rank=st.integers(1, 3),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    bias=st.booleans(),
)
def test_depthwise_factorized_equals_conv2d_on_the_reconstructed_kernel(
    method: str,
    channels: int,
    kh: int,
    kw: int,
    rank: int,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    bias: bool,
) -> None:
    gen = torch.Generator().manual_seed(channels * 31 + kh * 7 + kw)
    w = torch.randn(channels, 1, kh, kw, generator=gen, dtype=torch.float64)
    f = tnconv.get(method).factorize(w, rank, groups=channels)
    assert f.shape == (channels, 1, kh, kw) and f.groups == channels
    b = torch.randn(channels, generator=gen, dtype=torch.float64) if bias else None
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    layer = FactorizedConv2d(f, bias=b, groups=channels, **geometry)
    x = torch.randn(2, channels, 9, 8, generator=gen, dtype=torch.float64)
    expected = F.conv2d(x, f.to_tensor(), b, groups=channels, **geometry)
    torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-9)
    if min(kh, kw) > 1 and rank == 1:
        # rank 1 per channel: a kh x 1 then a 1 x kw kernel, each channel's kernel an outer
        # product (matrix rank 1)
        per_channel = f.to_tensor()[:, 0]
        assert all(int(torch.linalg.matrix_rank(k)) == 1 for k in per_channel)


def test_rank_one_recovers_separable_kernels_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 7, 1, generator=gen, dtype=torch.float64)
    b = torch.randn(8, 1, 7, generator=gen, dtype=torch.float64)
    w = (a * b).unsqueeze(1)  # (8, 1, 7, 7), every channel's kernel an outer product
    for method in SEPARABLE:
        f = tnconv.get(method).factorize(w, 1, groups=8)
        assert f.relative_error(w) < 1e-8, method
        assert f.num_params == 8 * (7 + 7 + 2) < w.numel()


class Inverted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(16, 64, 1, bias=False)
        self.depthwise = nn.Conv2d(64, 64, 7, padding=3, groups=64, bias=False)
        self.project = nn.Conv2d(64, 16, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.relu(self.depthwise(torch.relu(self.expand(x)))))


def _separable_model() -> Inverted:
    torch.manual_seed(0)
    model = Inverted().eval()
    with torch.no_grad():  # depthwise kernels of rank 2 per channel: rank 2 fits exactly
        u, v = torch.randn(64, 7, 2), torch.randn(64, 2, 7)
        model.depthwise.weight.copy_((u @ v).unsqueeze(1))
    return model


def test_compress_factorizes_depthwise_where_the_method_saves() -> None:
    model = _separable_model()
    x = torch.randn(2, 16, 10, 10)
    small = tnconv.compress(model, "cp", rank=2, depthwise="factorize")
    layer = small.depthwise
    assert isinstance(layer, FactorizedConv2d) and layer.groups == 64
    assert layer.num_params == 64 * 2 * (7 + 7 + 2) < model.depthwise.weight.numel()
    assert layer.info["relative_error"] < 1e-4
    with torch.no_grad():
        torch.testing.assert_close(
            small.depthwise(x[:, :1].expand(2, 64, 10, 10).contiguous()),
            model.depthwise(x[:, :1].expand(2, 64, 10, 10).contiguous()),
            rtol=1e-3,
            atol=1e-3,
        )
    # Tucker's per-channel core is as large as the kernel: no saving, stays dense, says why
    kept = tnconv.compress(model, "tucker", rank=1, depthwise="factorize")
    assert isinstance(kept.depthwise, nn.Conv2d)
    assert "no saving" in tnconv.dense_reasons(kept)["depthwise"]
    # the default keeps it dense as a depthwise conv
    default = tnconv.compress(model, "cp", rank=2)
    assert "depthwise convolution" in tnconv.dense_reasons(default)["depthwise"]


def test_budget_with_factorized_depthwise() -> None:
    model = _separable_model()
    small = tnconv.compress(model, "tt", budget=0.25, depthwise="factorize")
    rows = tnconv.summary(small, input_size=(1, 16, 10, 10)).rows
    assert sum(r.params for r in rows) <= 0.25 * sum(r.dense_params for r in rows)
    # the depthwise conv is a candidate like the others: a 7x7 kernel's separable forms save
    assert isinstance(small.depthwise, FactorizedConv2d)
    assert small.depthwise.num_params < model.depthwise.weight.numel()


def test_depthwise_option_errors() -> None:
    model = _separable_model()
    with pytest.raises(RankSpecError, match="depthwise must be"):
        tnconv.compress(model, "cp", rank=2, depthwise="yes")  # type: ignore[arg-type]
    with pytest.raises(RankSpecError, match="auto"):
        tnconv.compress(model, "auto", budget=0.3, depthwise="factorize")
