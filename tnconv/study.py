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
import random
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ._modes import check_not_meta, plain_copy
from .allocation import _SHARED, shared_candidates
from .compress import LayerSelector, compress, default_input_size
from .errors import BudgetError, StructureError, StudyError
from .executors import ModelPayload as _ModelPayload
from .executors import TaskRunner, default_worker_threads
from .executors import check_picklable as _check_picklable
from .executors import model_payload as _payload
from .factorization import validate_weight
from .layers import FactorizedConv2d
from .registry import available, get
from .statistics import CalibrationDataError, _first_input
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
    executor: Any = None,
    workers: int | None = None,
    worker_threads: int | None = None,
    model_factory: Callable[[], nn.Module] | None = None,
    resume: str | Path | None = None,
    seed: int = 0,
    calibration: Any = None,
) -> StudyResult:
    """Compare decompositions at matched parameter budgets.

    A model study is a grid of cells, one per (method, budget): compress, time, ``evaluate``,
    ``fine_tune``, ``evaluate`` again. The cells run one after another in this process, or in
    parallel on ``executor``; each cell starts from the torch / numpy / ``random`` seeds of
    ``(seed, method, budget)``, so a cell's numbers do not depend on where or after which other
    cell it ran. A cell that raises is a row whose ``note`` holds the exception; the others go on.

    Args:
        target: a model (its convolutions, or ``layers``, are compressed with
            ``compress(..., budget=b)``, a global allocation at the same share for every
            method), or a mapping name -> kernel (T, S, kh, kw) (each factorized with ratio=b and
            run as a stride-1 'same' convolution).
        methods: registered names; default: the base methods, ``tnconv.available("base")``
            (a derived ``admm-<base>`` factorizes exactly as its base).
        budgets: shares of the dense parameters, in (0, 1].
        layers: which convs of a model to compress (names or predicate; resolved to names here,
            so a predicate need not be picklable).
        input_size: (B, C, H, W) for FLOPs and latency; models default to
            ``default_input_size`` with batch 8, kernels to (8, S, 32, 32).
        evaluate: ``evaluate(model) -> accuracy`` for models (e.g. test-set accuracy); picklable
            (a module-level function or a ``functools.partial`` of one) when ``executor`` is set.
        fine_tune: ``fine_tune(model)`` trains a compressed model in place; then ``evaluate``
            runs again (``accuracy_tuned``); picklable when ``executor`` is set.
        latency_repeats: timed forward passes per candidate (0 skips timing).
        options: per-method factorize options, e.g. ``{"cp": {"n_init": 1}}``.
        progress: tqdm bar over the cells.
        executor: where model cells run. ``None``: here, in order. ``"processes"``: a local
            process pool (spawn) of ``workers`` processes (default: the CPU count). A
            ``concurrent.futures.Executor`` (anything with ``submit`` returning futures), a
            ``distributed.Client`` (its workers; the model is scattered once, not sent per cell)
            or a Dask scheduler address ``"tcp://host:8786"``.
        workers: process count for ``executor="processes"``.
        worker_threads: torch threads in each worker; default 1 for ``"processes"`` and Dask
            (one cell per core), untouched for other executors and for serial runs.
        model_factory: a picklable ``factory() -> nn.Module`` building the architecture; with
            it, workers receive the factory and the model's ``state_dict`` instead of the
            pickled model (for models whose class cannot be pickled by reference).
        resume: a CSV path. Each finished row is appended to it as it arrives; rows already in
            it are not recomputed (cells whose row records a failure are retried), and at the end
            it holds the whole study in grid order (then rows of cells outside this grid, kept).
        seed: base of every cell's seeds.
        calibration: input batches (tensors or ``(inputs, labels)`` pairs; labels ignored)
            for a data-aware study of a model: every cell runs ``compress(...,
            calibration=)`` (output-aware fits, BN folded on an eval-mode model, sequential
            refit; docs/data_aware.md), so the methods are compared on what their layers
            compute on these inputs. The inputs are kept in the study's context (sent to each
            worker): give a few hundred, not a dataset. ``resume`` keys rows by (method,
            budget) only: a resumed study keeps rows computed with other calibration inputs.
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
            _Settings(
                layers=layers,
                input_size=input_size,
                evaluate=evaluate,
                fine_tune=fine_tune,
                repeats=latency_repeats,
                options={k: dict(v) for k, v in options.items()},
                progress=progress,
                executor=executor,
                workers=workers,
                worker_threads=worker_threads,
                model_factory=model_factory,
                resume=Path(resume) if resume is not None else None,
                seed=seed,
                calibration=_calibration_inputs(calibration),
            ),
        )
    if evaluate is not None or fine_tune is not None or calibration is not None:
        raise ValueError("evaluate / fine_tune / calibration need a model, not bare kernels")
    if executor is not None or resume is not None or model_factory is not None:
        raise StudyError(
            "executor=, resume= and model_factory= apply to model studies; a study of bare "
            "kernels runs in this process"
        )
    return _study_kernels(target, names, budgets, input_size, latency_repeats, options, progress)


@dataclass
class _Settings:
    layers: LayerSelector
    input_size: Sequence[int] | None
    evaluate: Callable[[nn.Module], float] | None
    fine_tune: Callable[[nn.Module], None] | None
    repeats: int
    options: dict[str, dict[str, Any]]
    progress: bool
    executor: Any
    workers: int | None
    worker_threads: int | None
    model_factory: Callable[[], nn.Module] | None
    resume: Path | None
    seed: int
    calibration: tuple[torch.Tensor, ...] | None = None


def _calibration_inputs(batches: Any) -> tuple[torch.Tensor, ...] | None:
    """The calibration batches' input tensors (labels dropped), or None."""
    if batches is None:
        return None
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    inputs = tuple(_first_input(b) for b in batches)
    if not inputs:
        raise CalibrationDataError("calibration= holds no batch")
    return inputs


@dataclass(frozen=True)
class _Context:
    """What every cell of one study shares: sent once per worker (process pool, Dask) or with
    each cell (other executors). Small: names, shapes, options and the two callables."""

    layers: tuple[str, ...] | None
    size: tuple[int, ...]
    evaluate: Callable[[nn.Module], float] | None
    fine_tune: Callable[[nn.Module], None] | None
    repeats: int
    options: dict[str, dict[str, Any]]
    dense_params: int
    dense_flops: int
    dense_ms: float
    threads: int | None
    calibration: tuple[torch.Tensor, ...] | None = None


@dataclass(frozen=True)
class _Cell:
    """One (method, budget) of the grid, at ``index`` in the result's rows."""

    index: int
    method: str
    budget: float
    seed: int


def _cell_seed(seed: int, method: str, budget: float) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{method}|{budget!r}".encode())) % (2**31)


def _run_cell(model: nn.Module, cell: _Cell, ctx: _Context) -> StudyRow:
    """Compress, time, evaluate and fine-tune one cell; exceptions become the row's note."""
    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cell.seed)
            np.random.seed(cell.seed)
            random.seed(cell.seed)
            return _compute_cell(model, cell, ctx)
    except Exception as exc:
        log.warning("study cell %s @ %s failed", cell.method, cell.budget, exc_info=True)
        return _failed_row(cell, ctx, exc)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _failed_row(cell: _Cell, ctx: _Context, exc: BaseException) -> StudyRow:
    return StudyRow(
        "model",
        cell.method,
        cell.budget,
        0,
        ctx.dense_params,
        0,
        ctx.dense_flops,
        math.nan,
        note=f"{_FAILED}{type(exc).__name__}: {exc}",
    )


_FAILED = "failed: "


def _compute_cell(model: nn.Module, cell: _Cell, ctx: _Context) -> StudyRow:
    size, chosen = ctx.size, set(ctx.layers) if ctx.layers is not None else None
    first = next(model.parameters())
    x = torch.zeros(size, dtype=first.dtype, device=first.device)
    start = time.perf_counter()
    try:
        small = compress(
            model,
            cell.method,
            budget=cell.budget,
            layers=list(ctx.layers) if ctx.layers is not None else None,
            input_size=size,
            progress=False,
            calibration=list(ctx.calibration) if ctx.calibration is not None else None,
            **ctx.options.get(cell.method, {}),
        )
    except (BudgetError, StructureError) as exc:  # no such network for this kernel
        return StudyRow(
            "model",
            cell.method,
            cell.budget,
            0,
            ctx.dense_params,
            0,
            ctx.dense_flops,
            math.nan,
            note=f"no fit: {exc}",
        )
    seconds = time.perf_counter() - start
    s = summary(small, size)
    rows = [r for r in s.rows if chosen is None or r.name in chosen]
    errors = [r.relative_error for r in rows if r.relative_error is not None]
    row = StudyRow(
        "model",
        cell.method,
        cell.budget,
        params=sum(r.params for r in rows),
        dense_params=ctx.dense_params,
        flops=sum(r.flops for r in rows),
        dense_flops=ctx.dense_flops,
        error=math.sqrt(sum(e * e for e in errors) / len(rows)) if rows else math.nan,
        dense_latency_ms=ctx.dense_ms,
        fit_seconds=seconds,
        layers_dense=sum(1 for r in rows if r.method == "dense"),
    )
    if ctx.repeats:  # timed against the dense model in one loop: same noise for both
        with torch.no_grad():
            t = time_round_robin(
                {"dense": lambda: model(x), "small": lambda: small(x)}, ctx.repeats
            )
        row.latency_ms, row.dense_latency_ms = t["small"], t["dense"]
    if ctx.evaluate is not None:
        row.accuracy = float(ctx.evaluate(small))
        if ctx.fine_tune is not None:
            ctx.fine_tune(small)
            row.accuracy_tuned = float(ctx.evaluate(small))
    log.info("study %s @ %.2f: %s", cell.method, cell.budget, row)
    return row


# --- worker side: what a worker process keeps between the cells it runs -------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(payload: _ModelPayload, ctx: _Context) -> None:
    """Process-pool initializer: the model and context arrive once per worker process."""
    _WORKER["payload"], _WORKER["context"] = payload, ctx


def _worker_cell(
    cell: _Cell, ctx: _Context | None = None, payload: _ModelPayload | None = None
) -> StudyRow:
    """Run one cell in a worker. The dense model is built once per worker (per payload token);
    consecutive cells of one method share its per-layer candidate fits, as in a serial study."""
    payload = payload if payload is not None else _WORKER["payload"]
    ctx = ctx if ctx is not None else _WORKER["context"]
    if ctx.threads is not None:
        torch.set_num_threads(ctx.threads)
    if _WORKER.get("token") != payload.token:
        _WORKER.update(token=payload.token, model=payload.build(), shared=None)
    key = (payload.token, cell.method)
    if _WORKER.get("shared") is None or _WORKER["shared"][0] != key:
        _WORKER["shared"] = (key, {})
    token = _SHARED.set(_WORKER["shared"][1])
    try:
        return _run_cell(_WORKER["model"], cell, ctx)
    finally:
        _SHARED.reset(token)


# --- driver side ---------------------------------------------------------------------------------


_ROW_TYPES: dict[str, Callable[[str], Any]] = {
    f.name: (int if f.type in ("int", int) else float if f.type in ("float", float) else str)
    for f in fields(StudyRow)
}


def _read_rows(path: Path) -> list[StudyRow]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = set(_ROW_TYPES) - set(reader.fieldnames or ())
        if missing:
            raise StudyError(f"{path} is not a study CSV: no column(s) {sorted(missing)}")
        return [
            StudyRow(**{k: _ROW_TYPES[k](v) for k, v in rec.items() if k in _ROW_TYPES})
            for rec in reader
        ]


class _CsvLog:
    """Appends rows to the resume CSV as they finish (flushed: an interruption keeps them)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def append(self, row: StudyRow) -> None:
        if self.path is None:
            return
        record = asdict(row) | {"param_share": row.param_share}
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(record))
            if new:
                writer.writeheader()
            writer.writerow(record)


def _study_model(
    model: nn.Module, methods: list[str], budgets: Sequence[float], cfg: _Settings
) -> StudyResult:
    size = (
        tuple(cfg.input_size) if cfg.input_size is not None else (8, *default_input_size(model)[1:])
    )
    for name, p in model.named_parameters():
        check_not_meta(p, f"parameter {name!r}")  # nothing can be fitted or timed on it
    model = plain_copy(model).eval()
    first = next(model.parameters())
    x = torch.zeros(size, dtype=first.dtype, device=first.device)
    base = summary(model, size)
    chosen: tuple[str, ...] | None = None
    if cfg.layers is not None:
        from .compress import select_convs

        chosen = tuple(n for n, _ in select_convs(model, cfg.layers))
    dense_rows = [r for r in base.rows if chosen is None or r.name in chosen]
    dense_params = sum(r.dense_params for r in dense_rows)
    dense_flops = sum(r.dense_flops for r in dense_rows)

    done: dict[tuple[str, float], StudyRow] = {}
    if cfg.resume is not None and cfg.resume.exists() and cfg.resume.stat().st_size:
        for r in _read_rows(cfg.resume):
            if r.target != "model" or r.dense_params != dense_params:
                raise StudyError(
                    f"{cfg.resume} holds a study of another model or layer choice "
                    f"(dense params {r.dense_params}, this study: {dense_params})"
                )
            if not r.note.startswith(_FAILED):
                done[(r.method, r.budget)] = r
        log.info("study: %d finished rows read from %s", len(done), cfg.resume)
    csv_log = _CsvLog(cfg.resume)

    dense = done.get(("dense", 1.0))
    if dense is None:
        dense_acc = float(cfg.evaluate(model)) if cfg.evaluate is not None else math.nan
        dense_ms = math.nan
        if cfg.repeats:
            with torch.no_grad():
                dense_ms = time_round_robin({"dense": lambda: model(x)}, cfg.repeats)["dense"]
        dense = StudyRow(
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
        csv_log.append(dense)

    cells = [
        _Cell(i + 1, m, float(b), _cell_seed(cfg.seed, m, float(b)))
        for i, (m, b) in enumerate((m, b) for m in methods for b in budgets)
    ]
    rows: list[StudyRow | None] = [dense] + [done.get((c.method, c.budget)) for c in cells]
    todo = [c for c in cells if rows[c.index] is None]
    parallel = cfg.executor is not None
    if cfg.workers is not None and cfg.executor != "processes":
        raise StudyError(
            f"workers={cfg.workers} sizes executor='processes'; a distributed.Client or an "
            "Executor brings its own workers"
        )
    threads = default_worker_threads(cfg.executor, cfg.worker_threads)
    ctx = _Context(
        chosen,
        size,
        cfg.evaluate,
        cfg.fine_tune,
        cfg.repeats,
        cfg.options,
        dense_params,
        dense_flops,
        dense.dense_latency_ms,
        threads,
        cfg.calibration,
    )
    bar = tqdm(total=len(todo), desc="study", disable=not cfg.progress, leave=False)

    def finish(cell: _Cell, row: StudyRow) -> None:
        rows[cell.index] = row
        csv_log.append(row)
        bar.update()

    if todo and not parallel:
        by_method: dict[str, list[_Cell]] = {}
        for c in todo:
            by_method.setdefault(c.method, []).append(c)
        for group in by_method.values():
            # one method's budgets share its per-layer candidate fits: one rank ladder per layer
            with shared_candidates():
                for c in group:
                    finish(c, _run_cell(model, c, ctx))
    elif todo:
        _check_picklable("evaluate", cfg.evaluate)
        _check_picklable("fine_tune", cfg.fine_tune)
        _check_picklable("options", cfg.options)
        _run_parallel(todo, ctx, _payload(model, cfg.model_factory), cfg, finish)
    bar.close()
    result = StudyResult(rows=[r for r in rows if r is not None], input_size=size)
    if cfg.resume is not None:
        # the whole study in grid order, then any rows of other cells the file held
        grid = {(r.method, r.budget) for r in result.rows}
        extra = [r for key, r in done.items() if key not in grid]
        StudyResult(rows=result.rows + extra).to_csv(cfg.resume)
    return result


def _run_parallel(
    todo: list[_Cell],
    ctx: _Context,
    payload: _ModelPayload,
    cfg: _Settings,
    finish: Callable[[_Cell, StudyRow], None],
) -> None:
    """Submit every cell, record each row as it arrives (any order); a cell whose worker fails
    (a crash, an unpicklable result) becomes a failed row. A process pool's workers receive the
    model and context once (initializer), a Dask cluster once (scatter); other executors with
    each cell."""

    def lost(cell: _Cell, exc: BaseException) -> StudyRow:
        log.warning("study cell %s @ %s lost its worker: %s", cell.method, cell.budget, exc)
        return _failed_row(cell, ctx, exc)

    def key(cell: _Cell) -> str:
        return f"tnconv-study-{payload.token[:8]}-{cell.index}-{cell.method}-{cell.budget}"

    with TaskRunner(
        cfg.executor,
        _worker_cell,
        (ctx, payload),
        workers=cfg.workers,
        max_tasks=len(todo),
        initializer=_init_worker,
        initargs=(payload, ctx),
        error=StudyError,
        key="tnconv-study",
    ) as runner:
        runner.run(todo, finish, lost=lost, key=key)


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
