"""Per-layer method and rank under a global budget: the recommendation behind
``tnconv.compress(model, "auto", budget=...)``.

For every selected layer and every registered decomposition (training-time entries excluded) the
recommendation prices candidates: parameters (or FLOPs) and the relative kernel error of a fit
with the method's quick search options, at

* uniform ranks whose size lands on a ladder of shares of the dense layer (every method), and
* error bounds ``eps`` on a grid, for methods with an error-bounded algorithm
  (``guarantees_eps``): there the ranks come straight from the kernel's spectra (Tucker-2 from
  the OUT / IN mode spectra and the HOSVD core, TT / TR / RSDTR from the sequential cuts' SVDs),
  and a fit at them is a truncation, not an iterative search.

Each method is judged by the error its own algorithm reaches at a size, so the comparison is
the same for all. The candidates of every (layer, method) pool into one set per layer and the
convex-hull greedy of :mod:`tnconv.allocation` picks one per layer, minimising the summed
``-log(1 - e^2)`` under the budget. The result is a ``spec`` for ``compress(spec=...)``.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn
from tqdm.auto import tqdm

from .allocation import (
    Candidate,
    FitStep,
    SaveCriterion,
    _fill,
    _greedy,
    _LayerOptions,
    _loss,
    _scored,
    candidate_for,
    dense_conv_flops,
    fit_runner,
    fit_task,
    kept_dense_costs,
    layer_from_conv,
    layer_scorers,
    layer_statistics,
    options_for_layer,
    parse_budget,
    run_fit_tasks,
    saving_shortfall,
)
from .convs import (
    LayerSelector,
    conv_input_shapes,
    default_input_size,
    is_depthwise,
    select_convs,
)
from .decompositions.base import LAYOUT_KEYS, Decomposition
from .errors import BudgetError, OptionError, RankSpecError, StudyError, TnconvError
from .factorization import Factorization
from .layers import kernel_fit_shape
from .logit_error import LogitProbe
from .rank import largest_fitting
from .registry import available, get
from .statistics import calibrate_inputs

__all__ = ["AUTO", "Recommendation", "RecommendationRow", "candidate_methods", "recommend"]

log = logging.getLogger(__name__)

AUTO = "auto"  # a compress mode, never a decomposition name (the registry refuses it)

# multiples of the budget's share at which each method gets a uniform-rank candidate (a layer
# rarely ends far from the global share; fits at large ranks are what costs, e.g. CP's ALS)
_SHARE_STEPS = (0.3, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8)
# error bounds tried for error-bounded methods (ranks from the spectra)
_EPS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.65)


def _shares(budget_share: float) -> list[float]:
    return sorted({min(0.9, budget_share * k) for k in _SHARE_STEPS})


def candidate_methods(methods: Sequence[str] | None = None) -> list[str]:
    """The registered methods "auto" chooses among: ``methods`` (validated) or every registered
    one, less training-time entries (those with a true ``training_time`` attribute)."""
    names = available() if methods is None else [str(m).lower() for m in methods]
    chosen = []
    for name in names:
        dec = get(name)  # unknown names raise UnknownMethodError listing the known ones
        if getattr(dec, "training_time", False):
            if methods is not None:
                raise ValueError(
                    f"{name!r} is a training-time method (it needs training, not a fit); "
                    "it cannot be chosen by a recommendation"
                )
            continue
        chosen.append(name)
    if not chosen:
        raise ValueError("no registered method to choose from")
    return chosen


@dataclass
class RecommendationRow:
    """One layer's choice: ``method`` is "dense" when no candidate was worth its cost.

    ``predicted_error`` is the candidate's relative kernel error (quick-option fit), or with
    ``allocate_by="output"`` / ``"logits"`` its output-aware fit's relative output error / the
    relative error at the model's outputs with that one layer replaced;
    ``alternatives`` maps every method to its lowest predicted error within the chosen size
    (NaN: none of its candidates fits).
    """

    layer: str
    shape: tuple[int, int, int, int]
    method: str
    ranks: tuple[int, ...]
    params: int
    dense_params: int
    flops: int
    dense_flops: int
    predicted_error: float
    alternatives: dict[str, float] = field(default_factory=dict)


@dataclass
class Recommendation:
    """Per-layer methods and ranks; ``spec`` feeds ``tnconv.compress(model, spec=...)``."""

    rows: list[RecommendationRow]
    budget_kind: str
    budget_share: float
    methods: list[str]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # selected layers kept dense whatever the choice (depthwise convs) -> their cost, in
    # ``budget_kind``, counted in the budget's pool (empty with Budget(pool="factorizable"))
    kept: dict[str, float] = field(default_factory=dict)

    @property
    def spec(self) -> dict[str, dict[str, Any]]:
        """``{layer: {"method": m, "rank": ranks, "options": {...}}}`` for the factorized
        layers (layers left dense are absent)."""
        return {
            r.layer: {
                "method": r.method,
                "rank": r.ranks,
                "options": self.options.get(r.method, {}),
            }
            for r in self.rows
            if r.method != "dense"
        }

    def spent(self) -> tuple[int, int]:
        """(chosen, dense) parameters or FLOPs over the selected layers, per ``budget_kind``,
        the layers kept dense (``kept``) included on both sides."""
        fixed = round(sum(self.kept.values()))
        if self.budget_kind == "flops":
            used, dense = sum(r.flops for r in self.rows), sum(r.dense_flops for r in self.rows)
        else:
            used, dense = sum(r.params for r in self.rows), sum(r.dense_params for r in self.rows)
        return used + fixed, dense + fixed

    def to_dicts(self) -> list[dict[str, Any]]:
        out = []
        for r in self.rows:
            d = asdict(r)
            alts = d.pop("alternatives")
            d["shape"] = "x".join(map(str, r.shape))
            d["ranks"] = ",".join(map(str, r.ranks))
            out.append(d | {f"error_{m}": alts.get(m, math.nan) for m in self.methods})
        return out

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        rows = self.to_dicts()
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["layer"])
            writer.writeheader()
            writer.writerows(rows)
        return path

    def __str__(self) -> str:
        used, dense = self.spent()
        lines = [
            f"recommendation at {self.budget_share:g} of the {self.budget_kind}: "
            f"{used} of {dense} ({used / max(dense, 1):.3f})",
            f"{'layer':24s} {'shape':16s} {'method':8s} {'ranks':16s} {'params':>8s} "
            f"{'error':>6s}  best error per method at that size",
        ]
        for r in self.rows:
            alts = " ".join(
                f"{m}={e:.3f}" for m, e in sorted(r.alternatives.items()) if not math.isnan(e)
            )
            lines.append(
                f"{r.layer:24s} {'x'.join(map(str, r.shape)):16s} {r.method:8s} "
                f"{','.join(map(str, r.ranks)):16s} {r.params:8d} {r.predicted_error:6.3f}  "
                f"{alts}"
            )
        return "\n".join(lines)


def _quick(dec: Decomposition, options: dict[str, Any]) -> dict[str, Any]:
    quick = dec.search_options(dec.parse_options(options))
    layout = {k: options[k] for k in LAYOUT_KEYS if k in options}
    return {k: getattr(quick, k) for k in type(quick).model_fields} | layout


def _method_specs(
    dec: Decomposition, conv: nn.Conv2d, options: dict[str, Any], shares: list[float]
) -> list[dict[str, Any]]:
    """The specs one method is fitted at on one layer: the largest uniform rank under each
    share of the dense parameters, then (error-bounded methods) the eps grid."""
    weight = conv.weight.detach()
    kshape = kernel_fit_shape(
        conv, options.get("tensorize")
    )  # one group's kernel, as the family fits it
    groups = getattr(conv, "groups", 1)
    dense_params = weight.numel()
    specs: list[dict[str, Any]] = []
    top = max(dec.bond_ranks(10**9, kshape))  # type: ignore[arg-type]
    seen_ranks: set[int] = set()
    for share in shares:
        r = largest_fitting(
            1,
            min(top, 4096),
            lambda r, share=share: (
                groups * dec.num_params_at(kshape, dec.bond_ranks(r, kshape))  # type: ignore[arg-type]
                <= share * dense_params
            ),
        )
        if r is not None and r not in seen_ranks:
            seen_ranks.add(r)
            specs.append({"rank": r})
    if dec.guarantees_eps:
        specs += [{"eps": e} for e in _EPS]
    return specs


def _method_candidates(
    dec: Decomposition,
    conv: nn.Conv2d,
    shape: tuple[int, int, int, int] | None,
    options: dict[str, Any],
    must_save: SaveCriterion,
    need_flops: bool,
    shares: list[float],
    fits: list[Factorization] | None = None,
) -> list[Candidate]:
    """Candidates of one method on one layer that save what ``must_save`` asks: from ``fits``
    (of :func:`_method_specs`, made on a worker) or fitted here."""
    weight = conv.weight.detach()
    dense_params = weight.numel()
    dense_flops = dense_conv_flops(conv, shape) if shape is not None else None
    if fits is None:
        fits = [
            dec.factorize(weight, **spec, **options)
            for spec in _method_specs(dec, conv, options, shares)
        ]
    found: dict[tuple[int, ...], Candidate] = {}
    for f in fits:
        if f.ranks in found:
            continue
        if need_flops:
            cand = candidate_for(layer_from_conv(conv, f), f, shape, (dense_params, dense_flops))
        else:
            cand = Candidate(f, f.num_params, 0, float(f.info["relative_error"]))
        if not saving_shortfall(cand, dense_params, dense_flops, must_save):
            found[f.ranks] = cand
    return list(found.values())


def _fit_jobs(
    jobs: list[tuple[str, nn.Conv2d, str]],
    decs: dict[str, Decomposition],
    shapes: dict[str, tuple[int, int, int, int]],
    options: dict[str, dict[str, Any]],
    shares: list[float],
    executor: Any,
    workers: int | None,
    worker_threads: int | None,
) -> list[list[Factorization] | Exception]:
    """Every (layer, method) job's fits at :func:`_method_specs` on ``executor``, one task
    per job, in job order; a job the method cannot fit gives its exception (as serially)."""
    out: list[list[Factorization] | Exception] = [[] for _ in jobs]
    tasks, where = [], []
    for i, (name, conv, m) in enumerate(jobs):
        dec = decs[m]
        opts = options_for_layer(dec, conv, shapes.get(name), _quick(dec, options.get(m, {})))
        try:
            specs = _method_specs(dec, conv, opts, shares)
        except (TnconvError, ValueError) as exc:
            out[i] = exc
            continue
        step = FitStep(tuple(specs), single=True)
        tasks.append(fit_task(name, m, conv.weight, opts, [step], skip=True))
        where.append(i)
    with fit_runner(
        executor,
        list(decs.values()),
        options,
        workers=workers,
        worker_threads=worker_threads,
        max_tasks=max(1, len(tasks)),
    ) as runner:
        for i, result in zip(where, run_fit_tasks(runner, tasks, "recommend"), strict=True):
            out[i] = result if isinstance(result, Exception) else result[0]
    return out


def _calibrated_pricing(
    model: nn.Module, chosen: list[tuple[str, nn.Module]], calibration: Any, allocate_by: str
) -> tuple[dict[int, Any], dict[int, Any]]:
    """The input statistics (conv id -> statistics) that make every candidate fit of the
    ungrouped Conv2d layers output-aware, and with ``"logits"`` their scorers (conv id ->
    candidate -> error at the model's outputs); both empty for ``"kernel"``."""
    if allocate_by == "kernel":
        return {}, {}
    names = [n for n, c in chosen if type(c) is nn.Conv2d and c.groups == 1]
    by_name = calibrate_inputs(model, calibration, layers=names) if names else {}
    convs = dict(chosen)
    statistics = {id(convs[n]): st for n, st in by_name.items()}
    scorers: dict[int, Any] = {}
    if allocate_by == "logits":
        probe = LogitProbe(model, calibration)
        scorers = {id(convs[n]): f for n, f in probe.scorers([n for n, _ in chosen]).items()}
    return statistics, scorers


def recommend(
    model: nn.Module,
    budget: Any,
    *,
    layers: LayerSelector = None,
    methods: Sequence[str] | None = None,
    input_size: Sequence[int] | None = None,
    must_save: SaveCriterion = "params",
    options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool | None = None,
    executor: Any = None,
    workers: int | None = None,
    worker_threads: int | None = None,
    calibration: Any = None,
    allocate_by: Literal["kernel", "output", "logits"] = "kernel",
) -> Recommendation:
    """Choose a method and ranks per layer so the whole selection meets ``budget``.

    Args:
        model: the dense model (not modified).
        budget: a share in (0, 1] of the selected layers' parameters, or ``("flops", share)``
            (as ``compress(budget=)``).
        layers: layer names, a type, a predicate, or None for every Linear / conv layer
            (depthwise convs skipped).
        methods: registered names to choose among (default: every registered one, less
            training-time entries).
        input_size: (B, C, H, W) for FLOPs; needed for a FLOPs budget or ``must_save`` "flops" /
            "both" (default: :func:`tnconv.compress.default_input_size`).
        must_save: a candidate must have fewer "params", "flops" or "both" than the dense layer.
        options: per-method options, ``{"cp": {"n_init": 1}}``; they are validated, the search
            uses their quick variant and the recommendation's ``spec`` carries them.
        progress: a tqdm bar over (layer, method) (default: with 8 or more of them).
        executor: where the candidate fits run, one task per (layer, method): its kernel,
            options and specs, never the model; the fitted factorizations come back and the
            candidates and the choice are made here, as serially (the same result when the
            workers compute as this process does). The values of
            ``compress(executor=)``: ``"processes"``, a ``distributed.Client``, a scheduler
            address or a ``concurrent.futures.Executor``.
        workers: process count for ``executor="processes"``.
        worker_threads: torch threads in each worker (default 1 for the pool and Dask).
        calibration: input batches (as ``compress(calibration=)``), needed by ``allocate_by``
            "output" / "logits".
        allocate_by: ``"kernel"`` (default) prices each candidate by its kernel error;
            ``"output"`` fits every candidate of the ungrouped Conv2d layers output-aware on
            the calibration inputs' statistics and prices it by its output error;
            ``"logits"`` does the same fits and prices each by the error at the model's
            outputs with that one layer replaced (:class:`tnconv.logit_error.LogitProbe`).
            Other layer kinds keep their kernel errors.

    Returns:
        :class:`Recommendation` (``.spec`` for ``compress``).

    Cost: one quick fit per candidate, about 20 per (layer, method); CP's ALS dominates. The
    3-layer digits CNN (32-64-128-128 channels) takes a few seconds per method; a 512x512x3x3
    layer several seconds per method (see docs/analysis.md).
    """
    if must_save not in ("params", "flops", "both"):
        raise ValueError(f"must_save must be 'params', 'flops' or 'both'; got {must_save!r}")
    target = parse_budget(budget)
    names = candidate_methods(methods)
    options = {str(k).lower(): dict(v) for k, v in (options or {}).items()}
    for key in options:
        if key not in names:
            raise RankSpecError(
                f"options given for {key!r}, which is not among the candidate methods "
                f"({', '.join(names)})"
            )
    decs = {n: get(n) for n in names}
    for n, dec in decs.items():
        dec.parse_options(options.get(n, {}))  # fail before any work
    if executor is None and (workers is not None or worker_threads is not None):
        raise StudyError("workers= and worker_threads= apply with an executor")
    if allocate_by not in ("kernel", "output", "logits"):
        raise OptionError(
            f"allocate_by must be 'kernel', 'output' or 'logits'; got {allocate_by!r}"
        )
    if allocate_by != "kernel" and calibration is None:
        raise OptionError(f"allocate_by={allocate_by!r} prices candidates on calibration=")
    selected = select_convs(model, layers)
    chosen = [(n, c) for n, c in selected if not is_depthwise(c)]
    kept_layers = [(n, c) for n, c in selected if is_depthwise(c)]
    if not chosen:
        raise ValueError("no Linear / conv layer (other than depthwise) selected")
    need_flops = target.kind == "flops" or must_save != "params"
    shapes: dict[str, tuple[int, int, int, int]] = {}
    if need_flops or input_size is not None:
        shapes = conv_input_shapes(model, tuple(input_size or default_input_size(model)))
        missing = [n for n, _ in chosen if n not in shapes]
        if need_flops and missing:
            raise ValueError(f"layers {missing} are not reached by a forward pass: FLOPs unknown")

    def cost(c: Candidate) -> int:
        return c.params if target.kind == "params" else c.flops

    jobs = [(n, conv, m) for n, conv in chosen for m in names]
    show = progress if progress is not None else len(jobs) >= 8
    pools: dict[str, list[Candidate]] = {n: [] for n, _ in chosen}
    shares = _shares(target.share)
    statistics, scorers = _calibrated_pricing(model, chosen, calibration, allocate_by)
    with layer_statistics(statistics), layer_scorers(scorers):
        fitted: list[list[Factorization] | Exception | None] = [None] * len(jobs)
        if executor is not None:
            fitted = _fit_jobs(  # type: ignore[assignment]
                jobs, decs, shapes, options, shares, executor, workers, worker_threads
            )
        for (name, conv, m), fits in tqdm(
            zip(jobs, fitted, strict=True), desc="recommend", disable=not show, leave=False
        ):
            dec = decs[m]
            opts = options_for_layer(dec, conv, shapes.get(name), _quick(dec, options.get(m, {})))
            try:
                if isinstance(fits, Exception):
                    raise fits
                found = _method_candidates(
                    dec, conv, shapes.get(name), opts, must_save, need_flops, shares, fits
                )
            except (TnconvError, ValueError) as exc:  # a method that cannot fit this layer
                log.warning("recommend: %s skipped on %s: %s", m, name, exc)
                continue
            if scorers:  # priced at the model's outputs
                found = [
                    _scored(conv, layer_from_conv(conv, c.factorization), c)  # type: ignore[arg-type]
                    for c in found
                ]
            pools[name] += found
    dense: dict[str, Candidate] = {}
    per_layer: dict[str, _LayerOptions] = {}
    for name, conv in chosen:
        flops = dense_conv_flops(conv, shapes[name]) if name in shapes else 0
        dense[name] = Candidate(None, conv.weight.numel(), flops, 0.0)
        per_layer[name] = _LayerOptions({}, [*pools[name], dense[name]])
    # the depthwise convs stay dense: with pool="selected" their cost is spent first (in the
    # unit of cost(): FLOPs for any kind but params)
    counted = target if target.kind != "latency" else target.model_copy(update={"kind": "flops"})
    fixed = kept_dense_costs(counted, kept_layers, shapes)
    allowed = target.allowance(sum(cost(d) for d in dense.values()), sum(fixed.values()))
    picked = _greedy(per_layer, cost, allowed)
    if picked is None:
        smallest = sum(min(cost(c) for c in o.all) for o in per_layer.values())
        kept_text = ""
        if fixed:
            kept_text = (
                f" after the {sum(fixed.values()):.0f} of the {len(fixed)} depthwise convs "
                "kept dense (Budget(pool='factorizable') leaves them out of the pool)"
            )
        raise BudgetError(
            f"budget {target.share} of the selected layers' {target.kind} allows {allowed:.0f}"
            f"{kept_text}, but the smallest candidates need {smallest}"
        )
    picked = _fill(picked, per_layer, cost, allowed)
    log.info("recommend: summed loss %.4f", sum(_loss(c) for c in picked.values()))
    rows = []
    for name, conv in chosen:
        c = picked[name]
        f = c.factorization
        within = [x for x in pools[name] if cost(x) <= cost(c)]
        alternatives = {
            m: min((x.error for x in within if x.factorization.method == m), default=math.nan)  # type: ignore[union-attr]
            for m in names
        }
        rows.append(
            RecommendationRow(
                layer=name,
                shape=tuple(int(n) for n in conv.weight.shape),  # type: ignore[arg-type]
                method="dense" if f is None else f.method,
                ranks=() if f is None else tuple(f.ranks),
                params=c.params,
                dense_params=dense[name].params,
                flops=c.flops,
                dense_flops=dense[name].flops,
                predicted_error=c.error,
                alternatives=alternatives,
            )
        )
    return Recommendation(rows, target.kind, target.share, names, options, fixed)


def auto_spec(
    model: nn.Module,
    *,
    budget: Any,
    layers: LayerSelector,
    input_size: Sequence[int] | None,
    must_save: SaveCriterion | None,
    progress: bool | None,
    options: dict[str, Any],
    executor: Any = None,
    workers: int | None = None,
    worker_threads: int | None = None,
    calibration: Any = None,
    allocate_by: Literal["kernel", "output", "logits"] = "kernel",
) -> tuple[dict[str, dict[str, Any]], list[str], dict[str, str]]:
    """The ``spec`` that ``compress(model, "auto", budget=...)`` applies, the selected
    layers the recommendation leaves dense, and for each selected depthwise conv (kept dense,
    counted in the budget's pool) the note saying what it counted (:meth:`Budget.kept_note`).

    ``options`` are compress's keyword options in auto mode: ``methods=[...]`` (candidates) and
    per-method option dicts keyed by method name (``cp={"n_init": 1}``). ``executor``,
    ``workers``, ``worker_threads``: where the recommendation's fits run; ``calibration``,
    ``allocate_by``: how its candidates are priced (:func:`recommend`).
    """
    if budget is None:
        raise RankSpecError(
            'compress(model, "auto") needs budget= (a share of the parameters, or '
            '("flops", share)); rank / eps / ratio belong to one method'
        )
    opts = dict(options)
    methods = opts.pop("methods", None)
    known = set(available())
    for key, value in opts.items():
        if key.lower() not in known or not isinstance(value, Mapping):
            raise TypeError(
                f'compress(model, "auto") got option {key!r}: in auto mode options are '
                "methods=[names] and per-method option dicts keyed by method name, "
                'e.g. cp={"n_init": 1}'
            )
    rec = recommend(
        model,
        budget,
        layers=layers,
        methods=methods,
        input_size=input_size,
        must_save=must_save or "params",
        options=opts,
        progress=progress,
        executor=executor,
        workers=workers,
        worker_threads=worker_threads,
        calibration=calibration,
        allocate_by=allocate_by,
    )
    log.info("%s", rec)
    target = parse_budget(budget)
    counted = target if target.kind != "latency" else target.model_copy(update={"kind": "flops"})
    kept = {name: counted.kept_note(cost) for name, cost in rec.kept.items()}
    return rec.spec, [r.layer for r in rec.rows if r.method == "dense"], kept
