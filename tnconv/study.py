"""Comparative studies: every method at matched budgets, on a model or on bare kernels.

:func:`study` runs each decomposition at each parameter budget and records kernel error,
parameters, FLOPs and measured latency (and, for models, accuracy through a caller's callback,
before and after an optional fine-tuning callback). :class:`StudyResult` prints a table, writes a
CSV and draws a Pareto plot of error (or accuracy) against parameters.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ._modes import check_not_meta, plain_copy
from .allocation import shared_candidates
from .compress import LayerSelector, compress, default_input_size
from .errors import BudgetError, StructureError
from .factorization import validate_weight
from .layers import FactorizedConv2d
from .registry import available, get
from .summary import summary
from .timing import time_round_robin

__all__ = ["StudyResult", "StudyRow", "study"]

log = logging.getLogger(__name__)


@dataclass
class StudyRow:
    """One method at one budget, on a whole model or on one kernel.

    ``error`` is the root-mean-square relative kernel error over the compressed layers (one
    kernel: its relative error); ``accuracy`` / ``accuracy_tuned`` come from the caller's
    ``evaluate`` before / after ``fine_tune``; latencies are medians in milliseconds.
    """

    target: str
    method: str
    budget: float
    params: int
    dense_params: int
    flops: int
    dense_flops: int
    error: float
    latency_ms: float = math.nan
    dense_latency_ms: float = math.nan
    accuracy: float = math.nan
    accuracy_tuned: float = math.nan
    fit_seconds: float = math.nan
    layers_dense: int = 0
    note: str = ""

    @property
    def param_share(self) -> float:
        return self.params / self.dense_params if self.dense_params else math.nan


@dataclass
class StudyResult:
    """Rows of a study, with a table, CSV and Pareto plot."""

    rows: list[StudyRow] = field(default_factory=list)
    input_size: tuple[int, ...] = ()

    def to_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) | {"param_share": r.param_share} for r in self.rows]

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        rows = self.to_dicts()
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["target"])
            writer.writeheader()
            writer.writerows(rows)
        return path

    def pareto(
        self, metric: Literal["error", "accuracy", "accuracy_tuned"] = "error"
    ) -> list[StudyRow]:
        """Rows no other row beats on both parameters and ``metric`` (per target)."""
        better_low = metric == "error"
        keep = []
        for r in self.rows:
            value = getattr(r, metric)
            if math.isnan(value):
                continue
            dominated = False
            for o in self.rows:
                ov = getattr(o, metric)
                if o is r or o.target != r.target or math.isnan(ov):
                    continue
                at_least = o.params <= r.params and (ov <= value if better_low else ov >= value)
                strictly = o.params < r.params or (ov < value if better_low else ov > value)
                if at_least and strictly:
                    dominated = True
                    break
            if not dominated:
                keep.append(r)
        return keep

    def __str__(self) -> str:
        has_acc = any(not math.isnan(r.accuracy) for r in self.rows)
        has_tuned = any(not math.isnan(r.accuracy_tuned) for r in self.rows)
        head = (
            f"{'target':18s} {'method':8s} {'budget':>6s} {'params':>17s} {'MFLOPs':>15s} "
            f"{'error':>6s} {'ms':>13s}"
        )
        head += "  acc" if has_acc else ""
        head += "   tuned" if has_tuned else ""
        lines = [head, "-" * (len(head) + 8)]
        for r in self.rows:
            line = (
                f"{r.target[-18:]:18s} {r.method:8s} {r.budget:6.2f} "
                f"{r.dense_params:>8d}->{r.params:<8d} "
                f"{r.dense_flops / 1e6:>7.2f}->{r.flops / 1e6:<7.2f} {r.error:6.3f} "
                f"{r.dense_latency_ms:>6.2f}->{r.latency_ms:<6.2f}"
            )
            if has_acc:
                line += f" {100 * r.accuracy:5.1f}"
            if has_tuned:
                line += f"  {100 * r.accuracy_tuned:5.1f}"
            if r.note:
                line += f"  {r.note}"
            lines.append(line)
        return "\n".join(lines)

    def plot(self, path: str | Path, metric: str | None = None, title: str = "") -> Path:
        """Pareto plot of ``metric`` (default: tuned accuracy, else accuracy, else error)
        against the share of dense parameters, one line per method; needs matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError("plots need matplotlib: pip install 'tnconv[plot]'") from exc
        if metric is None:
            metric = next(
                (
                    m
                    for m in ("accuracy_tuned", "accuracy")
                    if any(not math.isnan(getattr(r, m)) for r in self.rows)
                ),
                "error",
            )
        fig, ax = plt.subplots(figsize=(7, 4.5))
        methods = sorted({r.method for r in self.rows if r.method != "dense"})
        targets = sorted({r.target for r in self.rows})
        for target in targets:
            for method in methods:
                pts = sorted(
                    (r.param_share, getattr(r, metric))
                    for r in self.rows
                    if r.method == method
                    and r.target == target
                    and not math.isnan(getattr(r, metric))
                )
                if pts:
                    label = method if len(targets) == 1 else f"{method} ({target})"
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            dense = [r for r in self.rows if r.method == "dense" and r.target == target]
            for r in dense:
                if not math.isnan(getattr(r, metric)):
                    ax.axhline(
                        getattr(r, metric),
                        color="grey",
                        linestyle="--",
                        linewidth=1,
                        label="dense" if target == targets[0] else None,
                    )
        front = self.pareto(metric)  # type: ignore[arg-type]
        ax.scatter(
            [r.param_share for r in front],
            [getattr(r, metric) for r in front],
            s=120,
            facecolors="none",
            edgecolors="black",
            label="Pareto front",
        )
        ax.set_xlabel("parameters kept (share of the dense layers)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(title or f"{metric.replace('_', ' ')} vs parameters")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def study(
    target: nn.Module | Mapping[str, Any],
    methods: Sequence[str] | None = None,
    budgets: Sequence[float] = (0.1, 0.25, 0.5),
    *,
    layers: LayerSelector = None,
    input_size: Sequence[int] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    fine_tune: Callable[[nn.Module], None] | None = None,
    latency_repeats: int = 10,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
) -> StudyResult:
    """Compare decompositions at matched parameter budgets.

    Args:
        target: a model (its convolutions, or ``layers``, are compressed with
            ``compress(..., budget=b)``, a global allocation at the same share for every
            method), or a mapping name -> kernel (T, S, kh, kw) (each factorized with ratio=b and
            run as a stride-1 'same' convolution).
        methods: registered names; default: the base methods, ``tnconv.available("base")``
            (a derived ``admm-<base>`` factorizes exactly as its base).
        budgets: shares of the dense parameters, in (0, 1].
        layers: which convs of a model to compress (names or predicate).
        input_size: (B, C, H, W) for FLOPs and latency; models default to
            ``default_input_size`` with batch 8, kernels to (8, S, 32, 32).
        evaluate: ``evaluate(model) -> accuracy`` for models (e.g. test-set accuracy).
        fine_tune: ``fine_tune(model)`` trains a compressed model in place; then ``evaluate``
            runs again (``accuracy_tuned``).
        latency_repeats: timed forward passes per candidate (0 skips timing).
        options: per-method factorize options, e.g. ``{"cp": {"n_init": 1}}``.
        progress: tqdm bar over the runs.
    """
    names = list(methods) if methods is not None else available(kind="base")
    for name in names:
        get(name)  # unknown names fail before any work
    for b in budgets:
        if not 0 < b <= 1:
            raise ValueError(f"budgets must be shares in (0, 1]; got {b}")
    options = options or {}
    if isinstance(target, nn.Module):
        return _study_model(
            target,
            names,
            budgets,
            layers,
            input_size,
            evaluate,
            fine_tune,
            latency_repeats,
            options,
            progress,
        )
    if evaluate is not None or fine_tune is not None:
        raise ValueError("evaluate / fine_tune need a model, not bare kernels")
    return _study_kernels(target, names, budgets, input_size, latency_repeats, options, progress)


def _study_model(
    model: nn.Module,
    methods: list[str],
    budgets: Sequence[float],
    layers: LayerSelector,
    input_size: Sequence[int] | None,
    evaluate: Callable[[nn.Module], float] | None,
    fine_tune: Callable[[nn.Module], None] | None,
    repeats: int,
    options: Mapping[str, Mapping[str, Any]],
    progress: bool,
) -> StudyResult:
    size = tuple(input_size) if input_size is not None else (8, *default_input_size(model)[1:])
    for name, p in model.named_parameters():
        check_not_meta(p, f"parameter {name!r}")  # nothing can be fitted or timed on it
    model = plain_copy(model).eval()
    first = next(model.parameters())
    x = torch.zeros(size, dtype=first.dtype, device=first.device)
    base = summary(model, size)
    chosen = None
    if layers is not None:
        from .compress import select_convs

        chosen = {n for n, _ in select_convs(model, layers)}
    dense_rows = [r for r in base.rows if chosen is None or r.name in chosen]
    dense_params = sum(r.dense_params for r in dense_rows)
    dense_flops = sum(r.dense_flops for r in dense_rows)
    dense_acc = evaluate(model) if evaluate is not None else math.nan
    result = StudyResult(input_size=size)
    dense_ms = math.nan
    if repeats:
        with torch.no_grad():
            dense_ms = time_round_robin({"dense": lambda: model(x)}, repeats)["dense"]
    result.rows.append(
        StudyRow(
            "model",
            "dense",
            1.0,
            dense_params,
            dense_params,
            dense_flops,
            dense_flops,
            0.0,
            dense_ms,
            dense_ms,
            dense_acc,
            dense_acc,
        )
    )
    bar = tqdm(total=len(methods) * len(budgets), desc="study", disable=not progress, leave=False)
    for method in methods:
        # one method's budgets share its per-layer candidate fits: one rank ladder per layer
        with shared_candidates():
            for budget in budgets:
                start = time.perf_counter()
                try:
                    small = compress(
                        model,
                        method,
                        budget=budget,
                        layers=layers,
                        input_size=size,
                        progress=False if not progress else None,
                        **dict(options.get(method, {})),
                    )
                except (BudgetError, StructureError) as exc:  # no such network for this kernel
                    result.rows.append(
                        StudyRow(
                            "model",
                            method,
                            budget,
                            0,
                            dense_params,
                            0,
                            dense_flops,
                            math.nan,
                            note=f"no fit: {exc}",
                        )
                    )
                    bar.update()
                    continue
                seconds = time.perf_counter() - start
                s = summary(small, size)
                rows = [r for r in s.rows if chosen is None or r.name in chosen]
                errors = [r.relative_error for r in rows if r.relative_error is not None]
                row = StudyRow(
                    "model",
                    method,
                    budget,
                    params=sum(r.params for r in rows),
                    dense_params=dense_params,
                    flops=sum(r.flops for r in rows),
                    dense_flops=dense_flops,
                    error=math.sqrt(sum(e * e for e in errors) / len(rows)) if rows else math.nan,
                    dense_latency_ms=dense_ms,
                    fit_seconds=seconds,
                    layers_dense=sum(1 for r in rows if r.method == "dense"),
                )
                if repeats:  # timed against the dense model in one loop: same noise for both
                    with torch.no_grad():
                        t = time_round_robin(
                            {"dense": lambda: model(x), "small": lambda small=small: small(x)},
                            repeats,
                        )
                    row.latency_ms, row.dense_latency_ms = t["small"], t["dense"]
                if evaluate is not None:
                    row.accuracy = evaluate(small)
                    if fine_tune is not None:
                        fine_tune(small)
                        row.accuracy_tuned = evaluate(small)
                result.rows.append(row)
                log.info("study %s @ %.2f: %s", method, budget, row)
                bar.update()
    bar.close()
    return result


def _study_kernels(
    kernels: Mapping[str, Any],
    methods: list[str],
    budgets: Sequence[float],
    input_size: Sequence[int] | None,
    repeats: int,
    options: Mapping[str, Mapping[str, Any]],
    progress: bool,
) -> StudyResult:
    result = StudyResult(input_size=tuple(input_size) if input_size else ())
    runs = [(k, m, b) for k in kernels for m in methods for b in budgets]
    dense_cache: dict[str, tuple[nn.Conv2d, torch.Tensor, int, float]] = {}
    for name, method, budget in tqdm(runs, desc="study", disable=not progress, leave=False):
        w = validate_weight(kernels[name]).detach().float()
        t, s, kh, kw = w.shape
        if name not in dense_cache:
            size = tuple(input_size) if input_size else (8, s, 32, 32)
            conv = nn.Conv2d(s, t, (kh, kw), padding="same", bias=False)
            with torch.no_grad():
                conv.weight.copy_(w)
            x = torch.zeros((size[0], s, *size[2:]))
            flops = summary(nn.Sequential(conv), x.shape).flops
            ms = math.nan
            if repeats:
                with torch.no_grad():
                    ms = time_round_robin({"d": lambda conv=conv, x=x: conv(x)}, repeats)["d"]
            dense_cache[name] = (conv, x, flops, ms)
        conv, x, dense_flops, dense_ms = dense_cache[name]
        start = time.perf_counter()
        try:
            layer = FactorizedConv2d.from_conv(
                conv, method, ratio=budget, **dict(options.get(method, {}))
            )
        except (BudgetError, StructureError) as exc:  # no such network for this kernel
            result.rows.append(
                StudyRow(
                    name,
                    method,
                    budget,
                    0,
                    w.numel(),
                    0,
                    dense_flops,
                    math.nan,
                    note=f"no fit: {exc}",
                )
            )
            continue
        seconds = time.perf_counter() - start
        row = StudyRow(
            name,
            method,
            budget,
            layer.num_params,
            w.numel(),
            layer.flops(tuple(x.shape)),
            dense_flops,
            float(layer.info["relative_error"]),
            dense_latency_ms=dense_ms,
            fit_seconds=seconds,
        )
        if repeats:  # timed against the dense conv in one loop: same noise for both
            with torch.no_grad():
                t = time_round_robin(
                    {"d": lambda conv=conv, x=x: conv(x), "f": lambda layer=layer, x=x: layer(x)},
                    repeats,
                )
            row.latency_ms, row.dense_latency_ms = t["f"], t["d"]
        result.rows.append(row)
    return result
