"""Pricing the steps of a conv-einsum: per-op cost tables and the step cost model.

A :class:`CostTable` holds one machine's measured per-op costs (:class:`KindCost` per kind of
op: 1x1, spatial and grouped convolutions, 1x1 steps as matrix products, layout-changing copies,
weights-only einsums) for one memory layout and thread count. :mod:`tnconv.calibration` measures
and caches them; this module only defines them and prices steps with them
(:func:`step_seconds`, :func:`pointwise_seconds`), so the planner never imports the calibration.
Without a table the planner weighs multiply-adds against elements moved (:data:`MEMORY_WEIGHT`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = [
    "EXPAND_SLACK",
    "FLOP_SLACK",
    "LARGE_MAP_ROWS",
    "MEMORY_WEIGHT",
    "THIN_MATMUL",
    "CostTable",
    "KindCost",
    "effective_macs",
    "pointwise_seconds",
    "step_seconds",
]

# Without a cost table (plan_conv(..., tables=None)): moving one element costs about as much
# time as 8 multiply-adds, the thin 1x1 and depthwise steps of a tensor network being memory
# bound on CPUs. FactorizedConv2d always plans with a measured table (tnconv.calibration).
MEMORY_WEIGHT = 8.0
# ...but a plan may not execute more than 10% more FLOPs than the FLOP-optimal order: the FLOPs
# tnconv reports are the ones a layer runs, and they must stay close to the network's minimum.
FLOP_SLACK = 0.10
# A step may run its fold indices as identity blocks of a dense conv (DataStep.expand: the
# multiply-adds times the fold size, no permuting copy of the map) when priced faster; those
# extra multiply-adds (by the identities' zeros) are run and reported, and may add at most this
# share of the FLOP-optimal plan's (measured: a semi-tensor Tucker-2 layer, 256 channels on
# 14x14, batch 32, channels-last: 72 ms expanded vs 120 ms with its channel copies, +26% FLOPs).
EXPAND_SLACK = 0.5
# A channels-last 1x1 product with fewer channels on either side runs far below the linear
# model (measured: 64x8x14x14, 8 -> 8 channels, 131 us as a product, 52 us as a conv, on 2
# threads), so it is never chosen and never used to fit the product's costs.
THIN_MATMUL = 16
# ...and so does one over a large map (batch x pixels): the 1x1 Tucker-2 steps at batch 32 ran
# 4-15% slower as products than as oneDNN convs (256@14, 128@28, 64@56, 512@7; 2 threads),
# while at batch 1 (49-196 pixels) the products were 5-17% faster.
LARGE_MAP_ROWS = 1024


@dataclass(frozen=True)
class KindCost:
    """Seconds of one op: ``call + mac * multiply-adds + elem * elements moved``."""

    call: float
    mac: float
    elem: float

    def seconds(self, macs: float, elems: float) -> float:
        return self.call + self.mac * macs + self.elem * elems


@dataclass(frozen=True)
class CostTable:
    """Per-op costs of one machine, layout and thread count.

    ``pointwise``: 1x1 convolutions; ``matmul``: the same 1x1 steps run as one matrix product
    over the pixels (no convolution call: oneDNN's 1x1 kernels were measured 2-4x slower at
    batch 1 and up to 5x slower in NCHW at batch 32, yet faster for some large channels-last
    batches, so the table decides); ``spatial``: convolutions with a kh x kw (or kh x 1) kernel;
    ``grouped``: convolutions with groups > 1; ``copy``: seconds per element of a copy that
    changes the memory order (a permute made contiguous); ``einsum``: seconds per call of a
    weights-only ``torch.einsum`` (its multiply-adds are priced as ``pointwise.mac``);
    ``to_nhwc`` / ``to_nchw``: converting a whole feature map to channels-last / back (priced
    per call and per element: on small maps the transposes are several times dearer per
    element than ``copy``, e.g. 47 us for a 1x512x7x7 map back to NCHW).
    Multiply-adds are counted as the vector kernels run them (:func:`effective_macs`: output
    channels per group padded to ``simd`` floats).
    """

    layout: str
    threads: int
    pointwise: KindCost
    spatial: KindCost
    grouped: KindCost
    matmul: KindCost
    copy: float
    einsum: float
    source: str = "default"
    simd: int = 8  # floats per vector register
    to_nhwc: KindCost = KindCost(1.0e-5, 0.0, 3.0e-10)
    to_nchw: KindCost = KindCost(3.5e-5, 0.0, 4.0e-10)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> CostTable:
        kinds = {k: KindCost(**data[k]) for k in ("pointwise", "spatial", "grouped", "matmul")}
        return cls(
            layout=str(data["layout"]),
            threads=int(data["threads"]),
            copy=float(data["copy"]),
            einsum=float(data["einsum"]),
            source=str(data.get("source", "file")),
            simd=int(data.get("simd", 8)),
            # (tables written before the conversions were measured use the defaults)
            **{k: KindCost(**data[k]) for k in ("to_nhwc", "to_nchw") if k in data},
            **kinds,
        )


def effective_macs(table: CostTable, macs: float, groups: int, cin: int, cout: int) -> float:
    """Multiply-adds as vectorised conv kernels run them: each group's ``cout`` output channels
    padded to a whole vector of ``table.simd`` floats (a conv with 1 output channel per group
    costs as much as one with ``simd``), except depthwise convs (1 in, 1 out per group), which
    vectorise across groups."""
    if cout <= 0 or (groups > 1 and cin == 1 and cout == 1):
        return macs
    w = table.simd
    return macs * (-(-cout // w) * w) / cout


# ---------------------------------------------------------------------------------------------
# pricing a step with a machine's cost table
# ---------------------------------------------------------------------------------------------
def step_seconds(
    table: CostTable,
    n_fold: int,
    n_group: int,
    spatial: bool,
    macs: float,
    elems_in: float,
    elems_out: float,
    fold: str | None = None,
    channels: tuple[int, int] = (0, 0),
) -> tuple[float, bool]:
    """Predicted seconds of one data step and whether its fold indices should run as conv
    groups (weight repeated) rather than be folded into the batch. ``channels``: the conv's
    (in, out) channels per group, for :func:`effective_macs`.

    Folding into the batch is a view in NCHW but, in channels-last, moves the folded axes
    between the channel and batch dimensions (a copy of the step's input and output); a grouped
    conv needs no copy in either layout but runs at the grouped-conv rate. ``fold`` forces
    ``"batch"`` or ``"groups"``.
    """
    elems = elems_in + elems_out
    cin, cout = channels

    def kind(groups: int) -> float:
        eff = effective_macs(table, macs, groups, cin, cout)
        if groups > 1:
            return table.grouped.seconds(eff, elems)
        if spatial:
            return table.spatial.seconds(eff, elems)
        return pointwise_seconds(table, macs, elems, cin, cout)[0]

    batch = kind(n_group)
    if n_fold == 1:
        return batch, False
    if table.layout == "nhwc":
        batch += table.copy * elems
    grouped = kind(n_fold * n_group)
    if fold == "batch":
        return batch, False
    if fold == "groups":
        return grouped, True
    return (grouped, True) if grouped < batch else (batch, False)


def pointwise_seconds(
    table: CostTable, macs: float, elems: float, cin: int, cout: int
) -> tuple[float, bool]:
    """Predicted seconds of an ungrouped 1x1 step and whether it runs as a matrix product
    (:func:`~tnconv.contraction.execute.pointwise_matmul`) rather than a conv2d call: whichever
    the table prices lower; in channels-last always a conv where either side is thinner than
    :data:`THIN_MATMUL` channels or the map has :data:`LARGE_MAP_ROWS` pixels or more (the
    linear costs cannot fit both regimes of the product)."""
    conv = table.pointwise.seconds(effective_macs(table, macs, 1, cin, cout), elems)
    if table.layout == "nhwc":
        rows = elems / max(cin + cout, 1)  # batch x pixels: elems = rows * (cin + cout)
        if min(cin, cout) < THIN_MATMUL or rows >= LARGE_MAP_ROWS:
            return conv, False
    matmul = table.matmul.seconds(macs, elems)
    return (matmul, True) if matmul < conv else (conv, False)
