"""Speed machinery: the calibrated cost model, every execution variant against conv2d, frozen
inference and torch.compile. No test here depends on a timing."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import tnconv
from tnconv import calibration
from tnconv.allocation import dense_conv_flops
from tnconv.calibration import DEFAULT_TABLES, CostTable, KindCost
from tnconv.compress import conv_input_shapes
from tnconv.contraction import ConvGeometry, ConvNetwork, DataStep, plan_conv

from .conftest import METHODS, supports


def _factorization(
    method: str, shape: tuple, rank, seed: int = 0, **options
) -> tnconv.Factorization:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    opts = {"max_iter": 3, "n_init": 1} if method == "cp" else {}
    return tnconv.get(method).factorize(w, rank, **opts, **options)


def _table(layout: str, grouped_mac: float, copy: float) -> CostTable:
    base = DEFAULT_TABLES[layout]
    return dataclasses.replace(
        base, grouped=KindCost(base.grouped.call, grouped_mac, base.grouped.elem), copy=copy
    )


def _matmul_table(layout: str, mac: float) -> CostTable:
    return dataclasses.replace(DEFAULT_TABLES[layout], matmul=KindCost(0.0, mac, 0.0))


# tables that make each variant win: grouped convs cheap or dear, layout copies free or dear,
# 1x1 steps as matrix products or as conv2d calls
TABLES = {
    "default": DEFAULT_TABLES,
    "groups-cheap": {lay: _table(lay, 1e-13, 1e-8) for lay in ("nchw", "nhwc")},
    "groups-dear": {lay: _table(lay, 1e-8, 1e-13) for lay in ("nchw", "nhwc")},
    "matmul-cheap": {lay: _matmul_table(lay, 1e-15) for lay in ("nchw", "nhwc")},
    "matmul-dear": {lay: _matmul_table(lay, 1e-6) for lay in ("nchw", "nhwc")},
}


@given(
    n=st.integers(1, 3),
    c=st.integers(1, 5),
    o=st.integers(1, 5),
    h=st.integers(1, 4),
    w=st.integers(1, 4),
    layout=st.sampled_from(["nchw", "nhwc", "infer-nchw", "infer-nhwc"]),
    out=st.sampled_from([None, "nchw", "nhwc"]),
)
def test_pointwise_matmul_equals_conv2d(n, c, o, h, w, layout, out) -> None:
    """A 1x1 conv as a matrix product: conv2d's values, in the input's layout or the one asked
    for, including the shapes whose layout is ambiguous (one channel, one pixel)."""
    from tnconv.contraction import pointwise_matmul

    gen = torch.Generator().manual_seed(n * 1000 + c * 100 + o * 10 + h)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(o, c, 1, 1, generator=gen, dtype=torch.float64)
    nhwc = layout.endswith("nhwc")
    if nhwc:
        x = x.contiguous(memory_format=torch.channels_last)
    out_nhwc = None if out is None else out == "nhwc"
    y = pointwise_matmul(x, weight, None if layout.startswith("infer") else nhwc, out_nhwc)
    ref = F.conv2d(x, weight)
    torch.testing.assert_close(y, ref)
    if layout.startswith("infer"):  # the layout conv2d infers (NCHW where ambiguous)
        nhwc = not ref.is_contiguous()
    fmt = torch.channels_last if (nhwc if out_nhwc is None else out_nhwc) else None
    assert y.is_contiguous(memory_format=fmt or torch.contiguous_format)


@pytest.mark.parametrize("method", ["tucker", "tt", "cp"])
def test_converted_plan_fuses_its_conversions_into_pointwise_matmuls(method: str) -> None:
    """An NCHW input run in channels-last: a first / last 1x1 step run as a matrix product
    reads / writes NCHW itself (no conversion copies), with conv2d's values and NCHW output."""
    f = _factorization(method, (32, 24, 3, 3), 6)
    layer = tnconv.FactorizedConv2d(f, padding=1).float()
    x = torch.randn(2, 24, 10, 10)
    plan = plan_conv(
        layer.network,
        layer.geometry,
        tuple(x.shape),
        layout="nchw",
        tables=TABLES["matmul-cheap"],
        convert=True,
    )
    data = [s for s in plan.steps if isinstance(s, DataStep)]
    assert plan.convert and plan.fused_in == data[0].matmul
    assert plan.fused_out == (data[-1].matmul and plan.final_perm is None)
    assert plan.fused_in or plan.fused_out
    with torch.no_grad():
        y = plan(x, list(layer.factors), layer.bias)
    ref = F.conv2d(x, layer.to_tensor().detach(), layer.bias, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    assert y.is_contiguous()


def test_thin_channels_last_products_are_never_chosen() -> None:
    """A channels-last 1x1 step with fewer than THIN_MATMUL channels on a side runs as a conv
    even where the table prices the product lower (the product's cost model misses there);
    NCHW follows the table."""
    from tnconv.contraction.cost import THIN_MATMUL

    f = _factorization("tucker", (32, 24, 3, 3), (8, 6))
    layer = tnconv.FactorizedConv2d(f, padding=1).float()
    x = torch.randn(2, 24, 10, 10)
    assert min(f.ranks) < THIN_MATMUL
    for layout, expect in (("nhwc", False), ("nchw", True)):
        plan = plan_conv(
            layer.network,
            layer.geometry,
            tuple(x.shape),
            layout=layout,
            tables=TABLES["matmul-cheap"],
        )
        pointwise = [s for s in plan.steps if isinstance(s, DataStep) and s.pointwise]
        assert pointwise and all(s.matmul is expect for s in pointwise)


def test_pointwise_steps_run_as_the_table_prices_them() -> None:
    """The same 1x1 steps run as matrix products or as conv2d calls, whichever the table
    prices lower; the FLOPs torch counts are the plan's either way."""
    from torch.utils.flop_counter import FlopCounterMode

    f = _factorization("tucker", (32, 24, 3, 3), (16, 16))
    layer = tnconv.FactorizedConv2d(f, padding=1).float()
    x = torch.randn(2, 24, 10, 10)
    for name, expect in (("matmul-cheap", True), ("matmul-dear", False)):
        for layout in ("nchw", "nhwc"):
            plan = plan_conv(
                layer.network, layer.geometry, tuple(x.shape), layout=layout, tables=TABLES[name]
            )
            pointwise = [s for s in plan.steps if isinstance(s, DataStep) and s.pointwise]
            assert pointwise and all(s.matmul is expect for s in pointwise)
            xin = x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                y = plan(xin, list(layer.factors))
            assert counter.get_total_flops() == plan.flops
            ref = F.conv2d(xin, layer.to_tensor().detach(), padding=1)
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


@settings(max_examples=16)
@given(
    method=st.sampled_from(METHODS),
    k=st.sampled_from([(1, 1), (3, 3), (3, 1), (2, 3)]),
    rank=st.integers(1, 4),
    batch=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.sampled_from([0, 1, "same"]),
    table=st.sampled_from(sorted(TABLES)),
    fold=st.sampled_from([None, "batch", "groups", "expand"]),
    layout=st.sampled_from(["nchw", "nhwc"]),
    convert=st.sampled_from([None, True, False]),
    frozen=st.booleans(),
)
def test_every_execution_variant_equals_conv2d(
    method, k, rank, batch, stride, dilation, padding, table, fold, layout, convert, frozen
) -> None:
    """Whatever the cost table, fold mode, layout, conversion or frozen folding, the plan runs
    exactly ``F.conv2d`` on the reconstructed kernel, in the input's layout."""
    assume(supports(method, (6, 4, *k), rank))
    if padding == "same" and stride != 1:
        stride = 1
    f = _factorization(method, (6, 4, *k), rank)
    net = ConvNetwork.from_factorization(f)
    geo = ConvGeometry.make(k, stride, padding, dilation)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 9, 8, generator=gen, dtype=torch.float64)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
        convert = None if convert else convert
    plan = plan_conv(
        net,
        geo,
        tuple(x.shape),
        layout=layout,
        tables=TABLES[table],
        frozen=frozen,
        fold=fold,
        convert=convert,
    )
    folded = plan.fold_factors(f.factors) if frozen else None
    y = plan(x, f.factors, None, folded)
    ref = F.conv2d(x, f.to_tensor(), None, stride, padding, dilation)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)  # the output keeps the input's layout
    steps = [s for s in plan.steps if isinstance(s, DataStep)]
    if fold == "groups":
        assert all(s.data_shape[0] == batch for s in steps)  # nothing folded into the batch
    if fold == "batch":
        assert all(s.repeat == 1 for s in steps)
    if fold == "expand":  # fold / group indices as identity blocks: one dense conv each
        assert all(s.groups == 1 and s.data_shape[0] == batch for s in steps if s.expand > 1)


def test_fold_choice_follows_the_table_and_layout() -> None:
    """A ring's middle steps fold a bond: into the batch when grouped convs are dear, as conv
    groups with a repeated weight when the layout copies that batch folding needs are dear."""
    f = _factorization("tr", (32, 32, 3, 3), 4)
    net = ConvNetwork.from_factorization(f)
    geo = ConvGeometry.make((3, 3), 1, 1)
    shape = (8, 32, 14, 14)

    def repeats(tables: dict, layout: str) -> list[int]:
        plan = plan_conv(net, geo, shape, layout=layout, tables=tables, convert=False)
        return [s.repeat for s in plan.steps if isinstance(s, DataStep)]

    assert max(repeats(TABLES["groups-dear"], "nhwc")) == 1
    assert max(repeats(TABLES["groups-cheap"], "nhwc")) > 1
    # the plan is a pure function of the table: same table, same plan
    a = plan_conv(net, geo, shape, layout="nhwc", tables=TABLES["default"])
    b = plan_conv(net, geo, shape, layout="nhwc", tables=TABLES["default"])
    assert a.path == b.path and a.steps == b.steps


def test_nchw_input_converted_only_when_predicted_faster() -> None:
    f = _factorization("tucker", (64, 64, 3, 3), (16, 16))
    net = ConvNetwork.from_factorization(f)
    geo = ConvGeometry.make((3, 3), 1, 1)
    cheap_nhwc = {
        "nchw": dataclasses.replace(DEFAULT_TABLES["nchw"], spatial=KindCost(1e-3, 1e-9, 1e-9)),
        "nhwc": dataclasses.replace(DEFAULT_TABLES["nhwc"], copy=1e-12),
    }
    dear_copy = {
        "nchw": DEFAULT_TABLES["nchw"],
        "nhwc": dataclasses.replace(DEFAULT_TABLES["nhwc"], copy=1e-6),
    }
    assert plan_conv(net, geo, (4, 64, 14, 14), tables=cheap_nhwc).convert
    assert not plan_conv(net, geo, (4, 64, 14, 14), tables=dear_copy).convert


def test_flops_are_those_executed_and_near_the_minimum() -> None:
    """With any table, the plan's FLOPs equal torch's count of what runs and stay within the
    10% slack of the FLOP-optimal order (plus what expanded steps multiply by zero, within
    EXPAND_SLACK)."""
    from torch.utils.flop_counter import FlopCounterMode

    from tnconv.contraction.cost import EXPAND_SLACK

    for method in ("tr", "tt", "cp", "tucker"):
        f = _factorization(method, (32, 24, 3, 3), 5)
        layer = tnconv.FactorizedConv2d(f, padding=1).float()
        net, geo = layer.network, layer.geometry
        lean = plan_conv(net, geo, (4, 24, 10, 10), memory_weight=0.0)
        for tables in TABLES.values():
            for layout in ("nchw", "nhwc"):
                plan = plan_conv(net, geo, (4, 24, 10, 10), layout=layout, tables=tables)
                # the order within the slack; identity blocks (expanded steps) within theirs
                assert plan.macs - plan.expanded_macs <= 1.1 * lean.macs
                assert plan.expanded_macs <= EXPAND_SLACK * lean.macs
                x = torch.randn(4, 24, 10, 10)
                with FlopCounterMode(display=False) as counter:
                    plan(x, list(layer.factors))
                assert counter.get_total_flops() == plan.flops


STP_SHAPES = {"sttucker": ((8, 12, 3, 3), (4, 4)), "stt": ((8, 12, 3, 3), (4, 2, 2))}
STP_SHAPES["str"] = ((8, 12, 3, 3), (2, 4, 3, 2))


class _CopyCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that copy a feature map (``clone`` / ``copy_`` of a permuted view)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default):
            self.copies += 1
        return func(*args, **(kwargs or {}))


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every aten op dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_tucker_layer_runs_its_three_convs_and_nothing_else(layout, bias) -> None:
    """A grouped conv's Tucker-2 (the group a shared index of the network) runs as three grouped
    convs: the input's split into groups and the output's merge back are identities skipped
    with the views around them, and the bias is added by the last conv. Exact against
    F.conv2d on the reconstructed kernel."""
    torch.manual_seed(0)
    dense = nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=bias)
    layer = tnconv.FactorizedConv2d.from_conv(dense, "tucker", rank=(3, 2)).eval()
    x = torch.randn(2, 32, 6, 5)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        layer(x)  # plan and folded weights
        recorder = _OpRecorder()
        with recorder:
            y = layer(x)
        ref = F.conv2d(x, layer.to_dense().weight, layer.bias, 1, 1, 1, 4)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "nhwc")
    convs = [op for op in recorder.ops if "convolution" in op]
    assert len(convs) == 3, recorder.ops
    moved = [op for op in recorder.ops if op.split(".")[0] in ("add", "permute", "view")]
    assert not moved, recorder.ops
    # copies: only an NCHW input's conversion to channels-last and back, where the plan does so
    plan = layer.plan_for(tuple(x.shape), layout, True)
    copies = [op for op in recorder.ops if op.split(".")[0] in ("clone", "copy_")]
    assert len(copies) == (2 if plan.convert and layout == "nchw" else 0), recorder.ops


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_grouped_tt_folds_its_extra_index_inside_the_groups(layout) -> None:
    """A grouped conv's TT holds its middle index inside the group index on the feature map;
    run as conv groups, that index goes inside the groups too (weight repeated per group), so
    no step permutes the map: exact against F.conv2d, frozen and not, every plan step's weight
    as the reconstructed kernel implies."""
    torch.manual_seed(0)
    dense = nn.Conv2d(32, 32, 3, padding=1, groups=4)
    layer = tnconv.FactorizedConv2d.from_conv(dense, "tt", rank=(3, 2, 2))
    x = torch.randn(2, 32, 6, 5, dtype=torch.float64)
    layer = layer.double()
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x, layer.to_dense().weight, layer.bias, 1, 1, 1, 4)
    plan = plan_conv(
        layer.network,
        layer.geometry,
        tuple(x.shape),
        layout=layout,
        fold="groups",
        tables=DEFAULT_TABLES,
        frozen=True,
        convert=False,
    )
    inner = [s for s in plan.steps if getattr(s, "fold_inner", False)]
    assert inner, plan.describe()
    assert all(s.data_perm is None for s in inner)
    with torch.no_grad():
        torch.testing.assert_close(plan(x, list(layer.factors), layer.bias), ref)
        folded = plan.fold_factors(list(layer.factors))
        recorder = _OpRecorder()
        with recorder:  # frozen: the weights are made, only the feature map moves
            y = plan(x, list(layer.factors), layer.bias, folded=folded)
    torch.testing.assert_close(y, ref)
    if layout == "nhwc":
        assert not [op for op in recorder.ops if op.split(".")[0] in ("clone", "copy_")], (
            recorder.ops
        )
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), ref)


@pytest.mark.parametrize("method", sorted(STP_SHAPES))
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_expanded_steps_read_and_write_interleaved_channels_without_copies(method, layout) -> None:
    """A semi-tensor layer in the paper's order interleaves the STP index in its channel modes
    (S = (j, a), ``a`` inner): folding ``a`` permutes the map, while an expanded step (identity
    blocks over ``a`` in the weight) reads and writes the channels where they are. Exact, FLOPs
    as counted by torch (the identities' zeros included), and no copy of the feature map at
    all."""
    from torch.utils.flop_counter import FlopCounterMode

    shape, rank = STP_SHAPES[method]
    f = _factorization(method, shape, rank, identity="inner")
    layer = tnconv.FactorizedConv2d(f, padding=1)
    x = torch.randn(2, shape[1], 7, 6, dtype=torch.float64)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x, f.to_tensor(), None, 1, 1)
    copies = {}
    for fold in ("batch", "expand"):
        plan = plan_conv(
            layer.network,
            layer.geometry,
            tuple(x.shape),
            layout=layout,
            fold=fold,
            tables=DEFAULT_TABLES,
            frozen=True,
            convert=False,
        )
        folded = plan.fold_factors(f.factors)
        with torch.no_grad(), _CopyCounter() as counter, FlopCounterMode(display=False) as flops:
            y = plan(x, f.factors, None, folded)
        torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
        assert flops.get_total_flops() == plan.data_flops
        copies[fold] = counter.copies
        if fold == "expand":
            assert any(s.expand > 1 for s in plan.steps if isinstance(s, DataStep))
            assert plan.expanded_macs > 0
    assert copies["expand"] == 0 < copies["batch"]


@pytest.mark.parametrize("method", ["sttucker", "str", "tr"])
def test_expansion_is_chosen_when_copies_are_dear_and_capped(method) -> None:
    """With copies priced dear, the planner expands steps rather than permute the map, but the
    zeros it multiplies never add more than EXPAND_SLACK of the plan's own multiply-adds."""
    from tnconv.contraction.cost import EXPAND_SLACK

    shape, rank = STP_SHAPES.get(method, ((8, 12, 3, 3), 3))
    f = _factorization(method, shape, rank)
    net = ConvNetwork.from_factorization(f)
    geo = ConvGeometry.make((3, 3), 1, 1)
    dear = {k: dataclasses.replace(t, copy=1e-3) for k, t in DEFAULT_TABLES.items()}
    for layout in ("nchw", "nhwc"):
        plan = plan_conv(
            net, geo, (4, shape[1], 9, 9), layout=layout, tables=dear, frozen=True, convert=False
        )
        lean = plan_conv(net, geo, (4, shape[1], 9, 9), memory_weight=0.0, frozen=True)
        assert plan.expanded_macs <= EXPAND_SLACK * lean.data_macs
        if method == "sttucker":  # its 1x1 ends expand at +1/t of their own work: within
            assert plan.expanded_macs > 0
        x = torch.randn(4, shape[1], 9, 9, dtype=torch.float64)
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
        y = plan(x, f.factors, None, plan.fold_factors(f.factors))
        torch.testing.assert_close(y, F.conv2d(x, f.to_tensor(), None, 1, 1))


# ---------------------------------------------------------------------------------------------
# calibration cache
# ---------------------------------------------------------------------------------------------
def test_calibration_is_measured_once_cached_and_reset(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TNCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TNCONV_CALIBRATION", "")
    calls = []
    real = calibration._measure

    def fake_measure(layout: str, repeats: int) -> CostTable:
        calls.append(layout)
        return dataclasses.replace(DEFAULT_TABLES[layout], source="measured")

    monkeypatch.setattr(calibration, "_measure", fake_measure)
    calibration._MEMO.clear()
    table = calibration.cost_table("nhwc", threads=1)
    assert table.source == "measured" and sorted(calls) == ["nchw", "nhwc"]
    data = json.loads((tmp_path / "calibration.json").read_text())
    assert calibration.machine_key("nhwc", 1) in data
    assert "threads=1" in calibration.machine_key("nhwc", 1)
    calibration._MEMO.clear()
    assert calibration.cost_table("nchw", threads=1).source == "measured"  # from disk
    assert len(calls) == 2
    calibration.cost_table("nchw", threads=2)  # another thread count: measured again
    assert len(calls) == 4
    assert calibration.reset() == [tmp_path / "calibration.json"]
    assert not (tmp_path / "calibration.json").exists()
    calibration.cost_table("nchw", threads=1)
    assert len(calls) == 6
    monkeypatch.setattr(calibration, "_measure", real)


def test_calibration_table_file_and_errors(tmp_path, monkeypatch) -> None:
    path = tmp_path / "tables.json"
    path.write_text(json.dumps({k: t.to_json() for k, t in DEFAULT_TABLES.items()}))
    monkeypatch.setenv("TNCONV_CALIBRATION", str(path))
    assert calibration.cost_table("nhwc") == DEFAULT_TABLES["nhwc"]
    with pytest.raises(ValueError, match="layout"):
        calibration.cost_table("nwhc")
    path.write_text("{}")
    with pytest.raises(ValueError, match="per layout"):
        calibration.cost_table("nchw")


def test_real_calibration_is_small_and_sane(tmp_path, monkeypatch) -> None:
    """The measurement itself runs (a few seconds) and yields positive, finite rates."""
    monkeypatch.setenv("TNCONV_CACHE_DIR", str(tmp_path))
    tables = calibration.calibrate(threads=1, repeats=1)
    for table in tables.values():
        assert table.source == "measured" and table.threads == 1
        for kind in (table.pointwise, table.spatial, table.grouped):
            assert all(v >= 0 and v < 1 for v in (kind.call, kind.mac, kind.elem))
            assert kind.mac > 0 or kind.elem > 0
        assert table.copy >= 0
    assert (tmp_path / "calibration.json").exists()


# ---------------------------------------------------------------------------------------------
# frozen inference
# ---------------------------------------------------------------------------------------------
def test_frozen_inference_folds_once_and_follows_the_factors() -> None:
    torch.manual_seed(0)
    f = _factorization("tt", (16, 12, 3, 3), 4)
    layer = tnconv.FactorizedConv2d(f, padding=1).float()
    x = torch.randn(2, 12, 9, 9)
    with torch.no_grad():
        y1 = layer(x)
        folded = layer._folded
        assert folded is not None
        y2 = layer(x)
        assert layer._folded is folded  # reused, not recomputed
    ref = F.conv2d(x, layer.to_tensor().detach(), None, 1, 1)
    torch.testing.assert_close(y1, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y2, y1)
    # an optimizer step changes the factors in place: the folded weights must follow
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.train()
    loss = layer(x).square().mean()
    loss.backward()
    opt.step()
    with torch.inference_mode():
        y3 = layer(x)
    ref3 = F.conv2d(x, layer.to_tensor().detach(), None, 1, 1)
    torch.testing.assert_close(y3, ref3, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(y3, y1)
    # training with gradients never uses folded weights: gradients reach every factor
    layer.train()
    layer.zero_grad()
    layer(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.factors)


def test_eval_mode_with_frozen_factors_folds() -> None:
    f = _factorization("tr", (8, 8, 3, 3), 3)
    layer = tnconv.FactorizedConv2d(f, padding=1).eval()
    for p in layer.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert layer._folded is not None
    y.sum().backward()  # gradients still reach the input
    ref = F.conv2d(x.detach(), layer.to_tensor(), None, 1, 1)
    torch.testing.assert_close(y.detach(), ref)
    assert x.grad is not None


@pytest.mark.slow
def test_torch_compile_equals_eager() -> None:
    """torch.compile runs compressed layers with the eager outputs (skipped when inductor
    cannot build on this machine)."""
    torch.manual_seed(0)
    model = (
        torch.nn.Sequential(
            tnconv.FactorizedConv2d(_factorization("tucker", (8, 3, 3, 3), (4, 3)), padding=1),
            torch.nn.ReLU(),
            tnconv.FactorizedConv2d(_factorization("tt", (8, 8, 3, 3), 3), stride=2, padding=1),
        )
        .float()
        .eval()
    )
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        eager = model(x)
        try:
            compiled = torch.compile(model)(x)
        except Exception as exc:  # no C++ toolchain, unsupported platform
            pytest.skip(f"torch.compile unavailable here: {type(exc).__name__}: {exc}")
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# latency criteria in compress / allocation / summary (a deterministic fake clock)
# ---------------------------------------------------------------------------------------------
def _small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, stride=2, padding=1),
    )


def _fake_clock(slowdown: float, rounded_bonus: float = 1.0):
    """Milliseconds from FLOPs: dense convs at 1 ms per MFLOP, factorized ones ``slowdown``
    times slower per FLOP, and ``rounded_bonus`` times faster when every rank is a multiple
    of 8."""

    def fake(modules, shape, *, channels_last=False, repeats=0, min_seconds=0.0):
        out = {}
        for name, m in modules.items():
            if not isinstance(m, (torch.nn.Conv2d, tnconv.FactorizedConv2d)):
                # a whole model: the sum of its layers' times at their inputs
                inputs = conv_input_shapes(m, shape)
                layers = dict(m.named_modules())
                out[name] = sum(
                    fake({"x": layers[n]}, s, repeats=repeats)["x"] for n, s in inputs.items()
                )
                continue
            if isinstance(m, tnconv.FactorizedConv2d):
                ms = slowdown * m.flops(tuple(shape)) / 1e6
                if all(r % 8 == 0 for r in m.ranks):
                    ms /= rounded_bonus
            else:
                ms = dense_conv_flops(m, shape) / 1e6
            out[name] = ms + 0.01
        return out

    return fake


def test_must_save_latency_keeps_slower_layers_dense(monkeypatch) -> None:
    monkeypatch.setattr(tnconv.timing, "module_latencies", _fake_clock(slowdown=2.0))
    size = (1, 3, 12, 12)
    model = _small_model()
    small = tnconv.compress(model, "tucker", rank=6, must_save="latency", input_size=size)
    shapes = conv_input_shapes(model, size)
    flops_only = tnconv.compress(model, "tucker", rank=6, must_save="flops", input_size=size)
    for name, conv in model.named_modules():
        if not isinstance(conv, torch.nn.Conv2d):
            continue
        fact = dict(flops_only.named_modules())[name]
        if not isinstance(fact, tnconv.FactorizedConv2d):
            continue
        faster = 2.0 * fact.flops(shapes[name]) < dense_conv_flops(conv, shapes[name])
        got = dict(small.named_modules())[name]
        assert isinstance(got, tnconv.FactorizedConv2d) == faster, name
        if not faster:
            assert "measured" in tnconv.dense_reasons(small)[name]
    assert any(isinstance(m, tnconv.FactorizedConv2d) for m in small.modules())
    assert any("measured" in r for r in tnconv.dense_reasons(small).values())


def test_latency_budget_is_met_on_the_measured_costs(monkeypatch) -> None:
    clock = _fake_clock(slowdown=1.5)
    monkeypatch.setattr(tnconv.timing, "module_latencies", clock)
    size = (2, 3, 12, 12)
    model = _small_model()
    small = tnconv.compress(
        model,
        "tucker",
        budget=("latency", 0.6),
        input_size=size,
        layers=lambda n, m: m.in_channels > 3,
    )
    shapes = conv_input_shapes(model, size)
    spent = dense = 0.0
    for name, conv in model.named_modules():
        if isinstance(conv, torch.nn.Conv2d) and conv.in_channels > 3:
            now = dict(small.named_modules())[name]
            spent += clock({"m": now}, shapes[name])["m"]
            dense += clock({"m": conv}, shapes[name])["m"]
    assert spent <= 0.6 * dense + 1e-9
    assert any(isinstance(m, tnconv.FactorizedConv2d) for m in small.modules())
    with pytest.raises(tnconv.RankSpecError, match="latency"):
        tnconv.compress(model, "tucker", budget=("time", 0.5))


def test_round_to_keeps_rounded_ranks_only_when_faster(monkeypatch) -> None:
    size = (1, 3, 12, 12)
    model = _small_model()
    layers = ["4"]  # 32 -> 32
    monkeypatch.setattr(
        tnconv.timing, "module_latencies", _fake_clock(slowdown=1.0, rounded_bonus=3.0)
    )
    small = tnconv.compress(model, "tucker", rank=11, layers=layers, input_size=size, round_to=8)
    assert small[4].ranks == (8, 8)
    assert "rounded" in small[4].info["round_to"]
    # rounding 12 -> 16 adds FLOPs; with no bonus for multiples it is slower: not kept
    monkeypatch.setattr(tnconv.timing, "module_latencies", _fake_clock(slowdown=1.0))
    small = tnconv.compress(model, "tucker", rank=12, layers=layers, input_size=size, round_to=8)
    assert small[4].ranks == (12, 12)
    assert "kept unrounded" in small[4].info["round_to"]
    torch.testing.assert_close(
        small[4].to_tensor(), tnconv.get("tucker").factorize(model[4].weight, 12).to_tensor()
    )
    with pytest.raises(ValueError, match="round_to"):
        tnconv.compress(model, "tucker", rank=4, round_to=0)


def test_summary_shows_measured_latency(monkeypatch) -> None:
    monkeypatch.setattr(tnconv.timing, "module_latencies", _fake_clock(slowdown=1.0))
    small = tnconv.compress(_small_model(), "tt", rank=4, input_size=(1, 3, 12, 12))
    s = tnconv.summary(small, latency=True)
    assert all(r.latency_ms is not None and r.dense_latency_ms is not None for r in s.rows)
    assert "ms (dense->this)" in str(s)
    assert tnconv.summary(small).rows[0].latency_ms is None


def test_real_latency_measurement_runs() -> None:
    """The real clock end to end on a tiny model (no assertion on which layers win)."""
    small = tnconv.compress(
        _small_model(),
        "tucker",
        rank=4,
        must_save="latency",
        input_size=(1, 3, 8, 8),
        channels_last=True,
    )
    x = torch.randn(1, 3, 8, 8)
    for name, reason in tnconv.dense_reasons(small).items():
        # the per-layer guard ("measured ...", "... saving") or the whole-model guard
        assert any(w in reason for w in ("measured", "saving", "whole-model latency")), name
    s = tnconv.summary(small, latency=True, repeats=2)
    assert all(r.latency_ms > 0 for r in s.rows)
    assert small(x).shape == (1, 32, 4, 4)


def test_cli_calibrate_show_and_reset(tmp_path, monkeypatch, capsys) -> None:
    from tnconv.cli import main

    monkeypatch.setenv("TNCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibration, "_measure", lambda layout, repeats: DEFAULT_TABLES[layout])
    assert main(["calibrate", "--threads", "1"]) == 0
    assert (tmp_path / "calibration.json").exists()
    assert main(["calibrate", "--show"]) == 0
    assert "threads=1" in capsys.readouterr().out
    assert main(["calibrate", "--reset", "--show"]) == 0
    assert not (tmp_path / "calibration.json").exists()
    assert main(["calibrate", "--threads", "0"]) == 2


def test_copies_and_saved_models_plan_afresh(tmp_path) -> None:
    import copy

    f = _factorization("tr", (8, 8, 3, 3), 3)
    layer = tnconv.FactorizedConv2d(f, padding=1)
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    assert layer._plans and layer._folded is not None
    twin = copy.deepcopy(layer)
    assert not twin._plans and twin._folded is None
    tnconv.save(torch.nn.Sequential(layer), tmp_path / "m.pt")
    again = tnconv.load(tmp_path / "m.pt", trusted=True)[0]
    assert not again._plans and again._folded is None
    with torch.no_grad():
        torch.testing.assert_close(twin(x), y)
        torch.testing.assert_close(again(x), y)


def test_inconsistent_calibration_timings_fall_back_to_the_built_in_costs(caplog) -> None:
    """Timings no linear model fits (a busy machine) must not become a table: one measured under
    load priced every call at 15 ms and made every plan fold its network into one product."""
    from tnconv.calibration import DEFAULT_TABLES, _fit

    default = DEFAULT_TABLES["nhwc"].pointwise
    linear = [(m, e, 1e-5 + 2e-11 * m + 1e-10 * e) for m, e in ((1e6, 1e4), (4e6, 3e4), (1e7, 1e5))]
    fitted = _fit(linear, default, "pointwise")
    assert fitted != default and abs(fitted.call - 1e-5) < 1e-6
    noisy = [(1e6, 1e4, 0.02), (4e6, 3e4, 1e-4), (1e7, 1e5, 0.03), (2e6, 2e4, 1e-5)]
    with caplog.at_level("WARNING", logger="tnconv.calibration"):
        assert _fit(noisy, default, "pointwise") == default
    assert "built-in pointwise costs" in caplog.text


def test_a_converting_plan_pays_each_conversion_once() -> None:
    """A converting plan whose end steps cannot read / write NCHW themselves (str: grouped 1x1
    ends and a final regrouping) costs its channels-last plan plus the two conversions, once."""
    import math

    from tnconv.calibration import DEFAULT_TABLES

    torch.manual_seed(0)
    conv2d = torch.nn.Conv2d(16, 16, 3, padding=1)
    layer = tnconv.FactorizedConv2d.from_conv(conv2d, "str", ratio=0.5)
    shape = (2, 16, 8, 8)
    args = (layer.network, layer.geometry, shape)
    conv = plan_conv(*args, layout="nchw", tables=DEFAULT_TABLES, frozen=True, convert=True)
    nhwc = plan_conv(*args, layout="nhwc", tables=DEFAULT_TABLES, frozen=True)
    assert conv.convert and not conv.fused_in and not conv.fused_out
    table = DEFAULT_TABLES["nhwc"]
    conversions = table.to_nhwc.seconds(0, math.prod(shape)) + table.to_nchw.seconds(
        0, math.prod(conv.output_shape)
    )
    assert conv.cost == pytest.approx(nhwc.cost + conversions, rel=1e-9)


def test_the_kernels_alone_bound_runs_the_layers_own_kernels(monkeypatch) -> None:
    """``benchmarks/layer_speed.py``'s bound (``kernels_only``) runs the products and
    convolutions the layer runs, on operands of the same shapes: where a plan converts an NCHW
    input, its fused first / last 1x1 product reads / writes the NCHW map as a transposed
    operand, and so must the bound (it once ran them on channels-last maps: another GEMM)."""
    import importlib.util
    import sys
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    import tnconv.layers.base as layer_base

    cheap_nhwc = {
        "nchw": dataclasses.replace(DEFAULT_TABLES["nchw"], spatial=KindCost(1e-3, 1e-9, 1e-9)),
        "nhwc": dataclasses.replace(DEFAULT_TABLES["nhwc"], copy=1e-12),
    }
    monkeypatch.setattr(layer_base, "cost_table", lambda layout, *args, **kw: cheap_nhwc[layout])
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "layer_speed.py"
    spec = importlib.util.spec_from_file_location("_layer_speed_under_test", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # (its dataclasses look themselves up)
    monkeypatch.setattr(sys, "path", list(sys.path))  # it adds benchmarks/ to the path
    spec.loader.exec_module(bench)

    f = _factorization("tucker", (64, 64, 3, 3), (16, 16))
    layer = tnconv.FactorizedConv2d(f, padding=1).float().eval()
    x = torch.randn(1, 64, 14, 14)

    def kernels(fn) -> list[tuple[str, str]]:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
        names = ("aten::mm", "aten::addmm", "aten::bmm", "aten::convolution")
        return sorted((e.name, str(e.input_shapes)) for e in prof.events() if e.name in names)

    with torch.no_grad():
        layer(x)
        plan = layer.plan_for(tuple(x.shape), "nchw", frozen=True)
        assert plan.convert and (plan.fused_in or plan.fused_out)
        bound = bench.kernels_only(layer, x)
        ran = kernels(lambda: layer(x))
        assert [name for name, _ in ran].count("aten::convolution") == 1
        assert ran == kernels(bound)

    # with every 1x1 step a conv, nothing takes the conversions in: the plan copies the map to
    # channels-last and back, and the bound runs those two copies too (the same shapes)
    no_products = {
        k: dataclasses.replace(t, matmul=KindCost(1.0, 1.0, 1.0)) for k, t in cheap_nhwc.items()
    }
    monkeypatch.setattr(layer_base, "cost_table", lambda layout, *args, **kw: no_products[layout])
    layer = tnconv.FactorizedConv2d(f, padding=1).float().eval()

    def copies(fn) -> list[str]:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
        return sorted(str(e.input_shapes) for e in prof.events() if e.name == "aten::copy_")

    with torch.no_grad():
        layer(x)
        plan = layer.plan_for(tuple(x.shape), "nchw", frozen=True)
        assert plan.convert and not plan.fused_in and not plan.fused_out
        bound = bench.kernels_only(layer, x)
        assert len(copies(bound)) == 2
        assert copies(bound) == copies(lambda: layer(x))
        assert kernels(bound) == kernels(lambda: layer(x))
