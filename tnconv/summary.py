"""``tnconv.summary``: one row per Linear / conv layer of a (compressed) model, and the whole
model's parameters and FLOPs before and after."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import timing
from ._modes import check_not_meta, plain_copy
from .compress import (
    DENSE_REASONS,
    conv_input_shapes,
    default_input_size,
    dense_conv_flops,
    set_module,
)
from .layers import DENSE_TYPES, FactorizedLayer

__all__ = ["LayerRow", "Summary", "summary"]


@dataclass
class LayerRow:
    """One Linear / conv layer: what it is, what it costs, and (if factorized) how well it fits.

    ``relative_error`` is the error reported when the layer was factorized (fine-tuning moves
    the factors afterwards): the kernel's relative error, or with ``compress(calibration=)``
    the relative output error on the calibration inputs (with the default sequential refit:
    in the compressed model, against the dense layer's outputs); ``note`` says why a dense
    layer was left dense by ``compress``;
    ``sensitivity`` is the current factors' first-order noise gain
    (:meth:`Factorization.sensitivity`), None for a dense layer (and for factors on the meta
    device, which have shapes but no values).
    ``latency_ms`` / ``dense_latency_ms``: measured inference time of the layer and of its dense
    equivalent at the layer's input (``summary(..., latency=True)``), else None.
    """

    name: str
    method: str  # "dense" for a dense layer
    ranks: tuple[int, ...]
    shape: tuple[int, ...]  # kernel (T, S/groups, *k); (out, in) for a Linear
    dense_params: int
    params: int
    dense_flops: int
    flops: int
    relative_error: float | None
    note: str = ""
    sensitivity: float | None = None
    latency_ms: float | None = None
    dense_latency_ms: float | None = None
    kind: str = ""  # "linear", "conv1d", "conv2d", "conv3d", with "/g<groups>" when grouped

    @property
    def compression(self) -> float:
        return self.dense_params / self.params if self.params else math.nan


@dataclass
class Summary:
    """Per-layer rows plus totals; ``str(summary)`` is a table, ``rows`` the data."""

    rows: list[LayerRow]
    input_size: tuple[int, ...]
    model_params: int
    other_params: int = field(default=0)  # parameters outside the layers' kernels (bias, BN)
    # the whole model's inference FLOPs at input_size (torch.utils.flop_counter, one forward
    # without gradients), and what they and its parameters were with every row dense
    model_flops: int = 0
    # summary(latency=True): the whole model's milliseconds and its dense equivalent's
    model_ms: float | None = None
    dense_model_ms: float | None = None

    @property
    def dense_model_params(self) -> int:
        return self.model_params - self.params + self.dense_params

    @property
    def dense_model_flops(self) -> int:
        return self.model_flops - self.flops + self.dense_flops

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
            f"{'layer':28s} {'kind':10s} {'method':8s} {'ranks':16s} {'params':>17s} "
            f"{'MFLOPs':>17s}"
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
                f"{r.name[-28:]:28s} {r.kind:10s} {r.method:8s} {ranks[:16]:16s} "
                f"{r.dense_params:>8d}->{r.params:<8d} "
                f"{r.dense_flops / 1e6:>8.2f}->{r.flops / 1e6:<8.2f}{ms} {err} {sens}  {r.note}"
            )
        lines.append("-" * len(head))
        p_ratio = self.dense_params / max(self.params, 1)
        f_ratio = self.dense_flops / max(self.flops, 1)
        lines.append(
            f"{'layers total':28s} {'':10s} {'':8s} {'':16s} "
            f"{self.dense_params:>8d}->{self.params:<8d} "
            f"{self.dense_flops / 1e6:>8.2f}->{self.flops / 1e6:<8.2f}"
            + (f" {self._ms(True):>8.3f}->{self._ms(False):<8.3f}" if self.timed else "")
        )
        lines.append(
            f"layer params x{p_ratio:.2f} smaller, FLOPs x{f_ratio:.2f} fewer at input "
            f"{tuple(self.input_size)}; {self.other_params} parameters outside their kernels"
        )
        mp = self.dense_model_params / max(self.model_params, 1)
        lines.append(
            f"whole model: parameters {self.dense_model_params} -> {self.model_params} "
            f"(x{mp:.2f} smaller)"
            + (
                f", MFLOPs {self.dense_model_flops / 1e6:.2f} -> {self.model_flops / 1e6:.2f} "
                f"(x{self.dense_model_flops / max(self.model_flops, 1):.2f} fewer)"
                if self.model_flops
                else ""
            )
            + (
                f", {self.dense_model_ms:.3f} -> {self.model_ms:.3f} ms "
                f"(x{self.dense_model_ms / self.model_ms:.2f} faster)"
                if self.model_ms is not None and self.dense_model_ms is not None
                else ""
            )
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
    """Rows for every ``nn.Linear`` / ``nn.Conv1d/2d/3d`` and factorized layer of ``model``,
    and the whole model's parameters and FLOPs before and after (``str()`` shows both).

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
        if isinstance(module, FactorizedLayer):
            kshape = module.kernel_shape
            dense_flops = dense_conv_flops(module.dense_shell(device="meta"), shape) if shape else 0
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
                    kind=_kind(module),
                )
            )
            kernel_params += module.num_params
        elif isinstance(module, DENSE_TYPES):
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
                    kind=_kind(module),
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
            if isinstance(module, FactorizedLayer):
                pair["dense"] = module.to_dense()
            ms = timing.module_latencies(pair, shape, channels_last=channels_last, repeats=repeats)
            row.latency_ms = ms["this"]
            row.dense_latency_ms = ms.get("dense", ms["this"])
    total = sum(p.numel() for p in model.parameters())
    result = Summary(rows, size, total, total - kernel_params, _model_flops(model, size))
    if latency:
        # the whole model against its dense equivalent, round-robin: per-layer gains do not add
        # up end to end (calls and memory passes between layers)
        dense = plain_copy(model)
        for name, module in list(dense.named_modules()):
            if isinstance(module, FactorizedLayer):
                set_module(dense, name, module.to_dense())
        ms = timing.module_latencies(
            {"this": model, "dense": dense}, size, channels_last=channels_last, repeats=repeats
        )
        result.model_ms, result.dense_model_ms = ms["this"], ms["dense"]
    return result


def _kind(module: nn.Module) -> str:
    if isinstance(module, FactorizedLayer):
        dims, groups = module.spatial_dims, module.groups
    elif isinstance(module, nn.Linear):
        dims, groups = 0, 1
    else:
        dims, groups = len(module.kernel_size), module.groups
    name = "linear" if dims == 0 else f"conv{dims}d"
    return name + (f"/g{groups}" if groups > 1 else "")


def _model_flops(model: nn.Module, size: Sequence[int]) -> int:
    """Inference FLOPs of one forward pass at ``size`` (0 for a model on the meta device): the
    second of two passes, so a factorized layer's folded weights are not counted."""
    param = next(model.parameters(), None)
    if param is None or param.is_meta:
        return 0
    dtype = param.dtype if param.is_floating_point() else torch.float32
    x = torch.zeros(tuple(size), device=param.device, dtype=dtype)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
            with FlopCounterMode(display=False) as counter:
                model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def _quantization_note(module: nn.Module) -> str:
    from .quantization import quantization_note  # quantization builds on compress and layers

    return quantization_note(module)
