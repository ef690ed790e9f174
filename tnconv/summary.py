"""``tnconv.summary``: one row per convolution of a (compressed) model."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from . import timing
from ._modes import check_not_meta
from .compress import DENSE_REASONS, conv_input_shapes, default_input_size, dense_conv_flops
from .layers import FactorizedConv2d

__all__ = ["LayerRow", "Summary", "summary"]


@dataclass
class LayerRow:
    """One convolution: what it is, what it costs, and (if factorized) how well it fits.

    ``relative_error`` is the kernel's relative error when it was factorized (fine-tuning moves
    the factors afterwards); ``note`` says why a dense layer was left dense by ``compress``;
    ``sensitivity`` is the current factors' first-order noise gain
    (:meth:`Factorization.sensitivity`), None for a dense layer (and for factors on the meta
    device, which have shapes but no values).
    ``latency_ms`` / ``dense_latency_ms``: measured inference time of the layer and of its dense
    equivalent at the layer's input (``summary(..., latency=True)``), else None.
    """

    name: str
    method: str  # "dense" for an nn.Conv2d
    ranks: tuple[int, ...]
    shape: tuple[int, int, int, int]  # kernel (T, S/groups, kh, kw)
    dense_params: int
    params: int
    dense_flops: int
    flops: int
    relative_error: float | None
    note: str = ""
    sensitivity: float | None = None
    latency_ms: float | None = None
    dense_latency_ms: float | None = None

    @property
    def compression(self) -> float:
        return self.dense_params / self.params if self.params else math.nan


@dataclass
class Summary:
    """Per-layer rows plus totals; ``str(summary)`` is a table, ``rows`` the data."""

    rows: list[LayerRow]
    input_size: tuple[int, ...]
    model_params: int
    other_params: int = field(default=0)  # parameters outside the conv kernels (bias, BN, FC)

    @property
    def dense_params(self) -> int:
        return sum(r.dense_params for r in self.rows)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def dense_flops(self) -> int:
        return sum(r.dense_flops for r in self.rows)

    @property
    def flops(self) -> int:
        return sum(r.flops for r in self.rows)

    @property
    def timed(self) -> bool:
        return any(r.latency_ms is not None for r in self.rows)

    def _ms(self, dense: bool) -> float:
        return sum(
            (r.dense_latency_ms if dense else r.latency_ms) or 0.0
            for r in self.rows
            if r.latency_ms is not None
        )

    def to_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.rows]

    def to_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(LayerRow.__dataclass_fields__))
            writer.writeheader()
            for row in self.to_dicts():
                row["ranks"] = "x".join(map(str, row["ranks"]))
                row["shape"] = "x".join(map(str, row["shape"]))
                writer.writerow(row)

    def __str__(self) -> str:
        ms_head = f" {'ms (dense->this)':>17s}" if self.timed else ""
        head = (
            f"{'layer':28s} {'method':8s} {'ranks':16s} {'params':>17s} {'MFLOPs':>17s}"
            f"{ms_head} {'rel.err':>7s} {'sensitiv.':>9s}  note"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            ranks = "x".join(map(str, r.ranks)) if r.ranks else "-"
            err = f"{r.relative_error:7.4f}" if r.relative_error is not None else "      -"
            sens = f"{r.sensitivity:9.3g}" if r.sensitivity is not None else f"{'-':>9s}"
            ms = ""
            if self.timed:
                ms = (
                    f" {r.dense_latency_ms:>8.3f}->{r.latency_ms:<8.3f}"
                    if r.latency_ms is not None and r.dense_latency_ms is not None
                    else f" {'-':>17s}"
                )
            lines.append(
                f"{r.name[-28:]:28s} {r.method:8s} {ranks[:16]:16s} "
                f"{r.dense_params:>8d}->{r.params:<8d} "
                f"{r.dense_flops / 1e6:>8.2f}->{r.flops / 1e6:<8.2f}{ms} {err} {sens}  {r.note}"
            )
        lines.append("-" * len(head))
        p_ratio = self.dense_params / max(self.params, 1)
        f_ratio = self.dense_flops / max(self.flops, 1)
        lines.append(
            f"{'conv total':28s} {'':8s} {'':16s} {self.dense_params:>8d}->{self.params:<8d} "
            f"{self.dense_flops / 1e6:>8.2f}->{self.flops / 1e6:<8.2f}"
            + (f" {self._ms(True):>8.3f}->{self._ms(False):<8.3f}" if self.timed else "")
        )
        lines.append(
            f"conv params x{p_ratio:.2f} smaller, FLOPs x{f_ratio:.2f} fewer at input "
            f"{tuple(self.input_size)}; model parameters {self.model_params} "
            f"({self.other_params} outside conv kernels)"
        )
        return "\n".join(lines)


def summary(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    *,
    latency: bool = False,
    channels_last: bool = False,
    repeats: int = timing.LATENCY_REPEATS,
) -> Summary:
    """Rows for every ``nn.Conv2d`` and ``FactorizedConv2d`` of ``model``.

    FLOPs are counted as ``torch.utils.flop_counter`` does (2 per multiply-add, biases excluded)
    for one inference forward pass (no gradients: factor-only steps folded once) at
    ``input_size`` (B, C, H, W). The default is the size ``compress`` was
    given, else ``(1, C, 224, 224)`` with C the first convolution's input channels.

    ``latency=True`` also times each layer (inference, at its input in the forward pass, on
    channels-last inputs if ``channels_last``) against its dense equivalent, round-robin in one
    loop per layer with ``repeats`` rounds; the table then shows milliseconds per layer.

    A model on the meta device (a skeleton: shapes, no values) is summarised too, parameters and
    FLOPs only (no sensitivities); ``latency=True`` on it raises ``InvalidWeightError``.
    """
    size = tuple(input_size) if input_size is not None else default_input_size(model)
    shapes = conv_input_shapes(model, size)
    reasons = getattr(model, DENSE_REASONS, {})
    rows: list[LayerRow] = []
    kernel_params = 0
    for name, module in model.named_modules():
        shape = shapes.get(name)
        if isinstance(module, FactorizedConv2d):
            kshape = (module.out_channels, module.in_channels, *module.kernel_size)
            dense_flops = (
                2 * shape[0] * module.dense_params * math.prod(_out_hw(module, shape))
                if shape
                else 0
            )
            err = module.info.get("relative_error")
            note = "" if shape else "not reached by the forward pass"
            note = "; ".join(filter(None, [note, _quantization_note(module)]))
            rows.append(
                LayerRow(
                    name,
                    module.method or "custom",
                    tuple(module.ranks),
                    kshape,
                    module.dense_params,
                    module.num_params,
                    dense_flops,
                    module.flops(shape, inference=True) if shape else 0,
                    float(err) if err is not None else None,
                    note,
                    # factors on the meta device (a model skeleton) have no values to measure
                    None if module.factors[0].is_meta else module.factorization.sensitivity(),
                )
            )
            kernel_params += module.num_params
        elif isinstance(module, nn.Conv2d):
            flops = dense_conv_flops(module, shape) if shape else 0
            note = reasons.get(name, "")
            if not shape:
                note = (note + "; " if note else "") + "not reached by the forward pass"
            note = "; ".join(filter(None, [note, _quantization_note(module)]))
            rows.append(
                LayerRow(
                    name,
                    "dense",
                    (),
                    tuple(module.weight.shape),
                    module.weight.numel(),
                    module.weight.numel(),
                    flops,
                    flops,
                    None,
                    f"kept dense: {note}" if name in reasons else note,
                )
            )
            kernel_params += module.weight.numel()
    if latency:
        for p in model.parameters():
            check_not_meta(p, "a parameter of the model (latency=True times real runs)")
        modules = dict(model.named_modules())
        for row in rows:
            shape = shapes.get(row.name)
            if shape is None:
                continue
            module = modules[row.name]
            pair = {"this": module}
            if isinstance(module, FactorizedConv2d):
                pair["dense"] = module.to_conv2d()
            ms = timing.module_latencies(pair, shape, channels_last=channels_last, repeats=repeats)
            row.latency_ms = ms["this"]
            row.dense_latency_ms = ms.get("dense", ms["this"])
    total = sum(p.numel() for p in model.parameters())
    return Summary(rows, size, total, total - kernel_params)


def _quantization_note(module: nn.Module) -> str:
    from .quantization import quantization_note  # quantization builds on compress and layers

    return quantization_note(module)


def _out_hw(layer: FactorizedConv2d, shape: Sequence[int]) -> tuple[int, int]:
    return layer.geometry.output_size((shape[2], shape[3]), layer.kernel_size)
