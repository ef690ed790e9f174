"""The paper's CIFAR models, the block convs it compresses, and the per-eps reduction table."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tnconv
from tnconv.compress import conv_input_shapes
from tnconv.experiments import reduction
from tnconv.experiments.reduction import model_flops, reduction_table
from tnconv.models import (
    MODELS,
    CifarResNet,
    ShortcutA,
    block_convs,
    create,
    resnet20,
    resnet56,
    vgg19_bn,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# exact counts; the literature rounds them to 0.27M, 0.46M, 0.85M and 20.0M (He et al. 2016,
# Table 6; the RSDTR paper's VGG-19-BN with one linear classifier)
@pytest.mark.parametrize(
    ("name", "count", "rounded"),
    [
        ("resnet20", 269_722, 0.27),
        ("resnet32", 464_154, 0.46),
        ("resnet56", 853_018, 0.85),
        ("vgg19_bn", 20_035_018, 20.0),
    ],
)
def test_parameter_counts_match_the_literature(name: str, count: int, rounded: float) -> None:
    model = create(name)
    assert n_params(model) == count
    assert round(count / 1e6, 2 if rounded < 1 else 1) == rounded
    # num_classes changes only the classifier: 64 (ResNet) or 512 (VGG) features + 1 bias each
    features = 64 if name.startswith("resnet") else 512
    assert n_params(create(name, num_classes=100)) == count + 90 * (features + 1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_shapes_and_conv_layout(name: str) -> None:
    torch.manual_seed(0)
    model = create(name, num_classes=7).eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # 6n + 1 convs for ResNet-(6n+2), 16 for VGG-19; all 3x3: no conv in any shortcut
    expected = {"resnet20": 19, "resnet32": 31, "resnet56": 55, "vgg19_bn": 16}[name]
    assert len(convs) == expected
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)


def test_resnet_stages_resolution_and_widths() -> None:
    model = resnet20().eval()
    seen = {}
    for stage in ("layer1", "layer2", "layer3"):
        getattr(model, stage).register_forward_hook(
            lambda m, i, o, stage=stage: seen.__setitem__(stage, tuple(o.shape))
        )
    model(torch.zeros(1, 3, 32, 32))
    assert seen == {
        "layer1": (1, 16, 32, 32),
        "layer2": (1, 32, 16, 16),
        "layer3": (1, 64, 8, 8),
    }


def test_option_a_shortcut_subsamples_and_zero_pads() -> None:
    x = torch.randn(2, 16, 8, 8)
    shortcut = ShortcutA(16, 32, stride=2)
    assert n_params(shortcut) == 0 and not list(shortcut.buffers())
    y = shortcut(x)
    assert y.shape == (2, 32, 4, 4)
    # the input's channels sit in the middle (8 zero channels on either side)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert torch.count_nonzero(y[:, :8]) == 0 and torch.count_nonzero(y[:, 24:]) == 0
    # odd number of extra channels: the extra one goes after; odd sizes round up
    y = ShortcutA(3, 8, stride=2)(torch.randn(1, 3, 5, 5))
    assert y.shape == (1, 8, 3, 3)
    assert torch.count_nonzero(y[:, :2]) == 0 and torch.count_nonzero(y[:, 5:]) == 0
    with pytest.raises(ValueError, match="only add channels"):
        ShortcutA(32, 16, 2)


def test_downsampling_block_adds_the_option_a_shortcut() -> None:
    model = resnet20().eval()
    block = model.layer2[0]
    assert isinstance(block.shortcut, ShortcutA) and isinstance(
        model.layer2[1].shortcut, nn.Identity
    )
    assert n_params(block) == (16 * 32 + 32 * 32) * 9 + 4 * 32  # two kernels and two BNs
    with torch.no_grad():
        block.conv2.weight.zero_()  # the residual branch now adds BN(0) = 0
    x = torch.randn(2, 16, 32, 32)
    expected = F.relu(F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8)))
    torch.testing.assert_close(block(x), expected)


def test_kaiming_init() -> None:
    torch.manual_seed(0)
    model = vgg19_bn()
    weight = model.features[-3].weight  # the last conv, 512 -> 512
    assert isinstance(model.features[-3], nn.Conv2d)
    expected = (2.0 / (512 * 9)) ** 0.5  # He normal, fan-in
    assert abs(float(weight.detach().std()) / expected - 1) < 0.01
    assert abs(float(weight.detach().mean())) < 0.01 * expected
    bn = model.features[1]
    assert torch.equal(bn.weight, torch.ones(64)) and torch.equal(bn.bias, torch.zeros(64))


def test_block_convs_names() -> None:
    r20 = resnet20()
    names = block_convs(r20)
    assert len(names) == 18 and len(set(names)) == 18
    assert names[:3] == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1"]
    assert names[-1] == "layer3.2.conv2"
    all_convs = {n for n, m in r20.named_modules() if isinstance(m, nn.Conv2d)}
    assert all_convs - set(names) == {"conv1"}  # only the stem is left out
    assert len(block_convs(resnet56())) == 54

    vgg = vgg19_bn()
    names = block_convs(vgg)
    convs = [n for n, m in vgg.named_modules() if isinstance(m, nn.Conv2d)]
    assert names == convs[1:] and convs[0] == "features.0" and len(names) == 15

    with pytest.raises(TypeError, match="layers="):
        block_convs(nn.Sequential(nn.Conv2d(3, 8, 3)))


def test_compressing_block_convs_keeps_stem_and_classifier_dense() -> None:
    torch.manual_seed(0)
    model = resnet20().eval()
    small = tnconv.compress(
        model, "tt", eps=0.4, layers=block_convs(model), input_size=(1, 3, 32, 32)
    )
    rows = {r.name: r for r in tnconv.summary(small).rows}
    assert set(rows) == {"conv1", "linear", *block_convs(model)}  # the classifier has a row too
    assert rows["conv1"].method == "dense" and rows["conv1"].note == ""  # never selected
    factorized = [n for n in block_convs(model) if rows[n].method == "tt"]
    kept = tnconv.dense_reasons(small)
    assert factorized and set(factorized) | set(kept) == set(block_convs(model))
    assert isinstance(small.layer1[0].conv1, tnconv.FactorizedConv2d) or "layer1.0.conv1" in kept
    assert torch.equal(small.linear.weight, model.linear.weight)
    assert torch.equal(small.conv1.weight, model.conv1.weight)
    # the names are structural: the compressed model reports the same block convs
    assert block_convs(small) == block_convs(model)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg_block_convs_survive_compression() -> None:
    torch.manual_seed(0)
    vgg = vgg19_bn()
    first = ["features.3", "features.7"]  # two of the block convs, enough to check the plumbing
    small = tnconv.compress(vgg, "tt", eps=0.6, layers=first)
    assert all(isinstance(small.get_submodule(n), tnconv.FactorizedConv2d) for n in first)
    assert isinstance(small.features[0], nn.Conv2d)
    assert block_convs(small) == block_convs(vgg)


def _block_flops_by_formula(model: CifarResNet) -> int:
    total = 0
    shapes = conv_input_shapes(model, (1, 3, 32, 32))
    for name in block_convs(model):
        conv = model.get_submodule(name)
        _, _, h, w = shapes[name]
        ho, wo = h // conv.stride[0], w // conv.stride[1]
        total += 2 * conv.out_channels * conv.in_channels * 9 * ho * wo
    return total


def test_reduction_table_on_resnet20(tmp_path) -> None:
    torch.manual_seed(0)
    model = resnet20()
    eps = [0.2, 0.45, 0.7]
    table = reduction_table(model, "tt", eps, name="resnet20")
    assert [r.eps for r in table.rows] == eps
    assert table.input_size == (1, 3, 32, 32) and table.method == "tt"
    kernels = sum(model.get_submodule(n).weight.numel() for n in block_convs(model))
    for row in table.rows:
        assert row.params_dense == 269_722 and row.block_params_dense == kernels == 267_264
        # everything outside the block convs is untouched
        assert row.params_dense - row.block_params_dense == row.params - row.block_params
        assert row.block_params <= row.block_params_dense  # a layer that does not save stays dense
        assert row.layers == 18 and 0 <= row.kept_dense <= 18
        assert row.flops_dense == model_flops(model) == 81_102_080
        assert row.block_flops_dense == _block_flops_by_formula(model)
        assert row.params_reduction == pytest.approx(row.params_dense / row.params)
        assert row.seconds > 0
    # the compressed side is measured on the model compress returns: executed FLOPs, all params
    small = tnconv.compress(model, "tt", eps=eps[1], layers=block_convs(model))
    model_flops(small)  # the first inference pass also folds the weights-only steps, once
    row = table.rows[1]
    assert row.params == n_params(small) and row.flops == model_flops(small)
    small_rows = tnconv.summary(small, (1, 3, 32, 32)).rows
    assert row.block_flops == sum(r.flops for r in small_rows if r.name not in ("conv1", "linear"))
    assert row.kept_dense == len(tnconv.dense_reasons(small))

    params = [r.params for r in table.rows]
    assert params == sorted(params, reverse=True) and params[-1] < params[0]  # looser eps, fewer
    assert table.rows[-1].block_params_reduction > 1.2

    text = str(table)
    assert text.splitlines()[0].startswith("resnet20, tt") and len(text.splitlines()) == 3 + 3
    assert "269,722 -> " in text
    markdown = table.to_markdown().splitlines()
    assert len(markdown) == 2 + 3 and markdown[0].startswith("| eps |")

    table.to_csv(tmp_path / "t.csv")
    table.to_csv(tmp_path / "t.csv", append=True)
    with open(tmp_path / "t.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and rows[0]["model"] == "resnet20"
    assert float(rows[2]["params_reduction"]) == pytest.approx(table.rows[2].params_reduction)
    assert int(rows[1]["block_params"]) == table.rows[1].block_params


def test_reduction_cli(tmp_path, capsys) -> None:
    out = tmp_path / "r.csv"
    code = reduction.main(
        ["--model", "resnet20", "--method", "tt", "--eps", "0.5", "--csv", str(out)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "resnet20, tt" in printed and "block params" in printed
    assert out.read_text().count("\n") == 2
    assert reduction.main(["--method", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown method 'nope'" in err and "tt" in err and len(err.splitlines()) == 1
    assert reduction.main(["--eps", "2"]) == 2
    assert "(0, 1)" in capsys.readouterr().err
