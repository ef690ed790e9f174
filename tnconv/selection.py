"""Rank selection driven by the metric the user cares about: ``tnconv.select_ranks``.

:mod:`tnconv.allocation` spends a global budget by *kernel* error; this module spends it by what a
callback ``evaluate(model) -> float`` (higher is better, e.g. validation accuracy) measures, with
the two greedy strategies of Kozyrskiy & Phan (2020), generic over every decomposition:

* **one-step**: a sensitivity scan (the metric with only one layer compressed, at each of its
  candidate ranks), then a greedy choice under the budget assuming the layers' metric drops add
  up;
* **multi-step**: start dense and lower one layer's rank one step at a time, re-evaluating the
  whole model for every layer that could move and taking the move that loses the least metric per
  parameter (or FLOP) saved, until the budget is met.

Both return a per-layer spec that ``tnconv.compress(model, method, spec=...)`` accepts, with the
log of every evaluation. Candidates per layer are the method's uniform ranks at a ladder of
shares of the dense layer (``shares``), fitted once and reused.
"""

from __future__ import annotations

import copy
import logging
import math
import pickle
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ._modes import plain_copy
from .allocation import (
    Budget,
    dense_conv_flops,
    kept_dense_costs,
    layer_from_conv,
    options_for_layer,
    parse_budget,
)
from .compress import (
    LayerSelector,
    conv_input_shapes,
    default_input_size,
    is_depthwise,
    select_convs,
)
from .decompositions.base import Decomposition
from .errors import BudgetError, NotPicklableError, StudyError
from .executors import (
    ModelPayload,
    TaskRunner,
    check_picklable,
    default_worker_threads,
    model_payload,
)
from .layers import FactorizedConv2d, kernel_fit_shape
from .registry import get

__all__ = ["Evaluation", "RankSelection", "select_ranks"]

log = logging.getLogger(__name__)

DEFAULT_SHARES = (0.04, 0.08, 0.12, 0.17, 0.23, 0.3, 0.4, 0.5, 0.65, 0.8)
# weight of the kernel-error loss, -log(1 - e^2), next to the metric: it only breaks ties (equal
# accuracy at two ranks), far below one sample's worth of accuracy on any real validation set
_TIE_BREAK = 1e-4


@dataclass(frozen=True)
class Evaluation:
    """One call of ``evaluate``: which configuration it saw and what it returned."""

    index: int
    phase: Literal["baseline", "scan", "step", "final"]
    layer: str | None  # the layer that changed (None: baseline / final)
    ranks: dict[str, tuple[int, ...]]  # the compressed layers and their ranks
    cost: int  # params (or FLOPs) of the selected layers in this configuration
    metric: float


@dataclass
class _Candidate:
    ranks: tuple[int, ...]
    layer: FactorizedConv2d | None  # None: the dense layer
    cost: int
    error: float

    @property
    def loss(self) -> float:
        return -math.log(max(1.0 - self.error**2, 1e-12))


class RankSelection(dict):  # type: ignore[type-arg]
    """The chosen ranks, ``{layer name: rank tuple}`` (pass it as ``compress(spec=...)``).

    Attributes: ``method``, ``strategy``, ``budget`` (a :class:`tnconv.Budget`), ``cost`` and
    ``allowed`` (the selected layers' params or FLOPs after selection, and the budget's limit),
    ``dense_cost``, ``baseline`` (the metric of the model as given), ``metric`` (the metric of
    the selected configuration), ``log`` (every :class:`Evaluation`, in order) and ``model``
    (the compressed model that was evaluated last).
    """

    method: str
    strategy: str
    budget: Budget
    cost: int
    allowed: float
    dense_cost: int
    baseline: float
    metric: float
    log: list[Evaluation]
    model: nn.Module

    @property
    def evaluations(self) -> int:
        return len(self.log)


def _metric(value: Any) -> float:
    """``evaluate``'s return value as a finite float (TypeError / ValueError otherwise)."""
    try:
        metric = float(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"evaluate(model) must return a number; got {type(value).__name__}"
        ) from exc
    if not math.isfinite(metric):
        raise ValueError(f"evaluate(model) returned {metric}; it must be finite")
    return metric


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@dataclass(frozen=True)
class _Trial:
    """One evaluation as a worker receives it: every selected layer's candidate index (the last
    index is the dense layer); ``index`` is its place in the log."""

    index: int
    levels: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class _EvalContext:
    """What every trial shares, sent once per worker (process pool, Dask) or with each trial
    (other executors): the callable and the fitted candidate layers (None: the dense layer)."""

    evaluate: Callable[[nn.Module], float]
    candidates: dict[str, list[FactorizedConv2d | None]]
    training: dict[str, bool]  # every module's mode in the model select_ranks evaluates
    threads: int | None


# worker side: one model per thread (a thread pool's threads must not swap each other's layers)
_WORKER = threading.local()
_POOL: dict[str, Any] = {}


def _init_worker(payload: ModelPayload, ctx: _EvalContext) -> None:
    """Process-pool initializer: the model and the candidates arrive once per worker process."""
    _POOL["payload"], _POOL["context"] = payload, ctx


def _worker_trial(
    trial: _Trial, ctx: _EvalContext | None = None, payload: ModelPayload | None = None
) -> Any:
    """``evaluate`` of the model at ``trial``'s candidates, in a worker. The dense model and a
    copy of the candidates are built once per thread (per payload token); each trial swaps the
    layers it needs."""
    payload = payload if payload is not None else _POOL["payload"]
    ctx = ctx if ctx is not None else _POOL["context"]
    if ctx.threads is not None:
        torch.set_num_threads(ctx.threads)
    if getattr(_WORKER, "token", None) != payload.token:
        model = payload.build()
        for name, module in model.named_modules():
            module.training = ctx.training.get(name, module.training)
        _WORKER.model = model
        _WORKER.layers = {
            name: [model.get_submodule(name) if c is None else c for c in cands]
            for name, cands in copy.deepcopy(ctx.candidates).items()
        }
        _WORKER.token = payload.token
    for name, k in trial.levels:
        _swap(_WORKER.model, name, _WORKER.layers[name][k])
    return ctx.evaluate(_WORKER.model)


@dataclass
class _Search:
    """The working state shared by both strategies: one model copy whose layers are swapped, or
    (with ``runner``) trials sent to an executor's workers."""

    work: nn.Module
    evaluate: Callable[[nn.Module], float]
    convs: dict[str, nn.Conv2d]
    candidates: dict[str, list[_Candidate]]  # cheapest first, the dense layer last
    bar: Any
    runner: TaskRunner | None = None
    log: list[Evaluation] = field(default_factory=list)
    current: dict[str, _Candidate] = field(default_factory=dict)

    def set(self, name: str, cand: _Candidate) -> None:
        _swap(self.work, name, self.convs[name] if cand.layer is None else cand.layer)
        self.current[name] = cand

    def measure(self, phase: str, layer: str | None) -> float:
        """``evaluate`` of the current configuration, logged."""
        return self.measure_many([(phase, layer, {})])[0]

    def measure_many(
        self, trials: Sequence[tuple[str, str | None, dict[str, _Candidate]]]
    ) -> list[float]:
        """``evaluate`` of the current configuration with each trial's layers changed
        (``(phase, layer named in the log, {layer: candidate})``), logged in order.
        Independent evaluations: on the executor's workers when there is one. The current
        configuration is the same afterwards."""
        configs = [{**self.current, **changes} for _, _, changes in trials]
        if self.runner is None:
            before = dict(self.current)
            metrics = []
            try:
                for (phase, layer, _), config in zip(trials, configs, strict=True):
                    for name, cand in config.items():
                        if self.current[name] is not cand:
                            self.set(name, cand)
                    metrics.append(self._record(phase, layer, self.evaluate(self.work)))
            finally:
                for name, cand in before.items():
                    if self.current[name] is not cand:
                        self.set(name, cand)
            return metrics
        runner = self.runner
        index = {
            name: {id(c): k for k, c in enumerate(cands)} for name, cands in self.candidates.items()
        }
        tasks = [
            _Trial(
                len(self.log) + i,
                tuple((name, index[name][id(cand)]) for name, cand in config.items()),
            )
            for i, config in enumerate(configs)
        ]
        results: dict[int, Any] = {}
        runner.run(
            tasks,
            lambda trial, value: results.__setitem__(trial.index, value),
            key=lambda trial: f"{runner.key}-{trial.index}",
        )
        # logged in trial order, whichever worker finished first: the serial run's log
        saved = dict(self.current)
        try:
            metrics = []
            for (phase, layer, _), config, task in zip(trials, configs, tasks, strict=True):
                self.current = config
                metrics.append(self._record(phase, layer, results[task.index]))
        finally:
            self.current = saved
        return metrics

    def _record(self, phase: str, layer: str | None, value: Any) -> float:
        """Log ``value`` (``evaluate``'s return) for the current configuration."""
        metric = _metric(value)
        self.log.append(
            Evaluation(
                len(self.log),
                phase,  # type: ignore[arg-type]
                layer,
                {n: c.ranks for n, c in self.current.items() if c.layer is not None},
                sum(c.cost for c in self.current.values()),
                metric,
            )
        )
        self.bar.update(1)
        return metric


def select_ranks(
    model: nn.Module,
    method: str | Decomposition,
    evaluate: Callable[[nn.Module], float],
    budget: Any,
    strategy: Literal["one-step", "multi-step"] = "one-step",
    layers: LayerSelector = None,
    *,
    shares: Sequence[float] = DEFAULT_SHARES,
    input_size: Sequence[int] | None = None,
    progress: bool = True,
    executor: Any = None,
    workers: int | None = None,
    worker_threads: int | None = None,
    model_factory: Callable[[], nn.Module] | None = None,
    **options: Any,
) -> RankSelection:
    """Choose every selected layer's rank so that the metric stays highest within ``budget``.

    Args:
        model: the dense model (never modified; evaluated on copies).
        method: a registered name or a ``Decomposition``.
        evaluate: ``evaluate(model) -> float``, higher is better (e.g. validation accuracy).
            Called on the baseline, then per candidate (one-step) or per step and layer
            (multi-step).
        budget: the selected layers keep at most this share of their dense parameters (a float
            in (0, 1]), or ``("flops", share)`` / ``Budget(kind=..., share=...)``.
        strategy: ``"one-step"`` (per-layer sensitivity scan, then a greedy choice) or
            ``"multi-step"`` (lower ranks step by step, re-evaluating the whole model).
        layers: conv names, a predicate ``(name, module) -> bool``, or None for every
            ``nn.Conv2d`` with ``groups == 1``.
        shares: candidate sizes per layer, as shares of the dense kernel's parameters; each gives
            the largest uniform rank whose factorization fits it.
        input_size: (B, C, H, W) for FLOP budgets (default: :func:`default_input_size`).
        progress: a tqdm bar over evaluations.
        executor: where the evaluations run, as for :func:`tnconv.study`. ``None``: here, in
            order. ``"processes"``: a local spawn process pool of ``workers`` processes
            (default: the CPU count), a ``concurrent.futures.Executor``, a
            ``distributed.Client`` or a Dask scheduler address ``"tcp://host:8786"``. The
            candidates are fitted here; the model and the fitted candidate layers travel once
            per worker (process pool, Dask; with each evaluation to another executor), each
            evaluation as its layers' candidate indices. The independent evaluations (one-step:
            the baseline and the whole scan; multi-step: every layer's move of a step) run in
            parallel; the choice, the log and the numbers are the serial run's when ``evaluate``
            is deterministic (the same thread count for bit-identical float sums). ``evaluate``
            must then be picklable (a module-level function or a ``functools.partial`` of one),
            and see each model it is given afresh (a worker reuses its model between calls).
        workers: process count for ``executor="processes"``.
        worker_threads: torch threads in each worker; default 1 for ``"processes"`` and Dask,
            untouched for other executors.
        model_factory: a picklable ``factory() -> nn.Module``: with it, workers receive the
            factory and the model's ``state_dict`` instead of the pickled model.
        **options: method options, as for ``factorize``.

    Returns:
        A :class:`RankSelection`: ``{layer name: ranks}`` (layers left dense are absent) plus the
        evaluation log; ``compress(model, method, spec=selection)`` builds the model.

    Raises:
        BudgetError: even the smallest candidates of every layer exceed the budget.
        ValueError / TypeError: a bad strategy, shares, budget or ``evaluate``.
        NotPicklableError: with an executor, ``evaluate``, the model, ``model_factory`` or a
            fitted candidate layer cannot be pickled (before any evaluation).
        StudyError: an unknown ``executor``, or ``workers`` without ``"processes"``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"select_ranks needs a torch.nn.Module; got {type(model).__name__}")
    if strategy not in ("one-step", "multi-step"):
        raise ValueError(f"strategy must be 'one-step' or 'multi-step'; got {strategy!r}")
    if not callable(evaluate):
        raise TypeError("evaluate must be a callable evaluate(model) -> float")
    if executor is not None:
        check_picklable("evaluate", evaluate)  # before any work
    elif workers is not None or model_factory is not None:
        raise StudyError("workers= and model_factory= apply with an executor")
    shares = tuple(float(s) for s in shares)
    if not shares or not all(0.0 < s < 1.0 for s in shares):
        raise ValueError(f"shares must be floats in (0, 1); got {shares!r}")
    target = parse_budget(budget)
    decomposition = method if isinstance(method, Decomposition) else get(method)
    decomposition.parse_options(options)

    work = plain_copy(model)
    selected = select_convs(work, layers)
    convs = dict((n, c) for n, c in selected if not is_depthwise(c))
    depthwise = [(n, c) for n, c in selected if is_depthwise(c)]
    if not convs:
        raise ValueError("no Linear / conv layer (other than depthwise) selected")
    payload = model_payload(work, model_factory) if executor is not None else None
    shapes: dict[str, tuple[int, int, int, int]] = {}
    if target.kind == "flops" or input_size is not None:
        shapes = conv_input_shapes(work, input_size or default_input_size(work))
        missing = [n for n in convs if n not in shapes]
        if missing:
            raise ValueError(f"layers {missing} are not reached by a forward pass: FLOPs unknown")

    def dense_cost(name: str) -> int:
        conv = convs[name]
        if target.kind == "flops":
            return dense_conv_flops(conv, shapes[name])
        return conv.weight.numel()

    candidates: dict[str, list[_Candidate]] = {}
    for name, conv in tqdm(
        convs.items(), desc=f"select_ranks: fit ({decomposition.name})", disable=not progress
    ):
        candidates[name] = _candidates(
            decomposition, conv, shapes.get(name), shares, options, target, dense_cost(name)
        )
    dense_total = sum(dense_cost(n) for n in convs)
    # the depthwise convs stay dense: with pool="selected" their cost is spent first
    # (in dense_cost's unit: parameters for any kind but flops)
    counted = target if target.kind == "flops" else target.model_copy(update={"kind": "params"})
    kept = sum(kept_dense_costs(counted, depthwise, shapes).values())
    allowed = target.allowance(dense_total, kept)
    cheapest = sum(c[0].cost for c in candidates.values())
    if cheapest > allowed:
        kept_text = f" after the {kept:.0f} of the depthwise convs kept dense" if kept else ""
        raise BudgetError(
            f"budget {target.share} of the {target.kind} ({allowed:.0f}{kept_text}) is below "
            f"the smallest candidates of every layer ({cheapest}); lower the shares or raise "
            "the budget"
        )

    evaluations = (
        1 + sum(len(c) - 1 for c in candidates.values()) + 1 if strategy == "one-step" else None
    )
    runner = None
    if executor is not None:
        assert payload is not None
        ctx = _EvalContext(
            evaluate,
            {n: [c.layer for c in cands] for n, cands in candidates.items()},
            {n: m.training for n, m in work.named_modules()},
            default_worker_threads(executor, worker_threads),
        )
        try:
            pickle.dumps(ctx)
        except Exception as exc:
            raise NotPicklableError(
                f"the fitted {decomposition.name} candidate layers cannot be sent to worker "
                f"processes ({type(exc).__name__}: {exc})"
            ) from exc
        most = (evaluations or 1) if strategy == "one-step" else len(convs)
        runner = TaskRunner(
            executor,
            _worker_trial,
            (ctx, payload),
            workers=workers,
            max_tasks=most,
            initializer=_init_worker,
            initargs=(payload, ctx),
            error=StudyError,
            key=f"tnconv-select-{payload.token[:8]}",
        )
    bar = tqdm(total=evaluations, desc=f"select_ranks ({strategy})", disable=not progress)
    search = _Search(work, evaluate, convs, candidates, bar, runner)
    for name in convs:
        search.current[name] = candidates[name][-1]  # dense
    try:
        if strategy == "one-step":
            baseline, drops = _scan(search)  # independent: one batch on an executor
            chosen = _one_step(search, drops, allowed)
        else:
            baseline = search.measure("baseline", None)
            chosen = _multi_step(search, allowed)
        for name, cand in chosen.items():
            search.set(name, cand)
        metric = search.measure("final", None)
    finally:
        bar.close()
        if runner is not None:
            runner.close()

    result = RankSelection({n: c.ranks for n, c in chosen.items() if c.layer is not None})
    result.method = decomposition.name
    result.strategy = strategy
    result.budget = target
    result.cost = sum(c.cost for c in chosen.values())
    result.allowed = allowed
    result.dense_cost = dense_total
    result.baseline = baseline
    result.metric = metric
    result.log = search.log
    result.model = search.work
    log.info(
        "select_ranks(%s, %s): metric %.4f -> %.4f at %d / %d %s (%d evaluations)",
        decomposition.name,
        strategy,
        baseline,
        metric,
        result.cost,
        dense_total,
        target.kind,
        len(search.log),
    )
    return result


def _candidates(
    decomposition: Decomposition,
    conv: nn.Conv2d,
    shape: tuple[int, int, int, int] | None,
    shares: Sequence[float],
    options: dict[str, Any],
    target: Budget,
    dense_cost: int,
) -> list[_Candidate]:
    """Fits at the largest uniform rank under each share of the dense parameters, cheapest first,
    then the dense layer (cost ``dense_cost``)."""
    weight = conv.weight.detach()
    kshape = kernel_fit_shape(
        conv, options.get("tensorize")
    )  # one group's kernel, as the family fits it
    groups = getattr(conv, "groups", 1)
    dense_params = weight.numel()
    top = max(decomposition.bond_ranks(10**9, kshape))  # type: ignore[arg-type]
    params_at = {
        r: groups * decomposition.num_params_at(kshape, decomposition.bond_ranks(r, kshape))  # type: ignore[arg-type]
        for r in range(1, min(top, 4096) + 1)
    }
    levels = sorted(
        {
            max([r for r, p in params_at.items() if p <= share * dense_params], default=1)
            for share in shares
        }
    )
    opts = options_for_layer(decomposition, conv, shape, options)
    found: dict[tuple[int, ...], _Candidate] = {}
    for r in levels:
        f = decomposition.factorize(weight, r, **opts)
        if f.ranks in found or f.num_params >= dense_params:
            continue
        layer = layer_from_conv(conv, f)
        cost = layer.flops(shape) if target.kind == "flops" else f.num_params  # type: ignore[arg-type]
        if cost >= dense_cost:
            continue
        error = f.info.get("relative_error")
        error = float(error) if error is not None else f.relative_error(weight)
        found[f.ranks] = _Candidate(f.ranks, layer, cost, error)
    dense = _Candidate(tuple(), None, dense_cost, 0.0)
    return [*sorted(found.values(), key=lambda c: c.cost), dense]


def _scan(search: _Search) -> tuple[float, dict[tuple[str, int], float]]:
    """The baseline (every layer dense), then the sensitivity scan: the metric with one layer
    at each of its candidates, all in one batch of independent evaluations. Returns the
    baseline and each (layer, candidate index)'s drop."""
    trials: list[tuple[str, str | None, dict[str, _Candidate]]] = [("baseline", None, {})]
    for name, cands in search.candidates.items():
        trials += [("scan", name, {name: cand}) for cand in cands[:-1]]
    baseline, *metrics = search.measure_many(trials)
    drop: dict[tuple[str, int], float] = {}
    it = iter(metrics)
    for name, cands in search.candidates.items():
        for k in range(len(cands) - 1):
            drop[name, k] = baseline - next(it)
        drop[name, len(cands) - 1] = 0.0
    return baseline, drop


def _one_step(
    search: _Search, drop: dict[tuple[str, int], float], allowed: float
) -> dict[str, _Candidate]:
    """Greedy upgrades from the scan's drops by metric recovered per unit of cost."""

    def value(name: str, k: int) -> float:  # what a layer's choice costs in metric
        return drop[name, k] + _TIE_BREAK * search.candidates[name][k].loss

    choice = {name: 0 for name in search.candidates}
    spent = sum(search.candidates[n][0].cost for n in choice)
    while True:
        best: tuple[float, str, int] | None = None
        for name, cands in search.candidates.items():
            k0 = choice[name]
            for k in range(k0 + 1, len(cands)):
                gain = value(name, k0) - value(name, k)
                extra = cands[k].cost - cands[k0].cost
                if gain <= 0 or spent + extra > allowed:
                    continue
                score = gain / max(extra, 1)
                if best is None or score > best[0]:
                    best = (score, name, k)
        if best is None:
            break
        _, name, k = best
        spent += search.candidates[name][k].cost - search.candidates[name][choice[name]].cost
        choice[name] = k
    return {name: search.candidates[name][k] for name, k in choice.items()}


def _multi_step(search: _Search, allowed: float) -> dict[str, _Candidate]:
    """From dense, lower one layer one rank level at a time: re-evaluate the whole model for
    every layer that can move and keep the move losing the least metric per unit of cost."""
    level = {name: len(c) - 1 for name, c in search.candidates.items()}
    metric = search.log[-1].metric  # the baseline: every layer dense

    def spent() -> int:
        return sum(search.candidates[n][k].cost for n, k in level.items())

    while spent() > allowed:
        best: tuple[float, str, float] | None = None
        movable = [name for name in search.candidates if level[name] > 0]
        trials = search.measure_many(  # independent: one batch on an executor
            [("step", name, {name: search.candidates[name][level[name] - 1]}) for name in movable]
        )
        for name, trial in zip(movable, trials, strict=True):
            cands, k = search.candidates[name], level[name]
            loss = metric - trial + _TIE_BREAK * (cands[k - 1].loss - cands[k].loss)
            score = loss / max(cands[k].cost - cands[k - 1].cost, 1)
            if best is None or score < best[0]:
                best = (score, name, trial)
        if best is None:  # every layer at its smallest candidate: checked feasible before
            break
        _, name, metric = best
        level[name] -= 1
        search.set(name, search.candidates[name][level[name]])
    return {name: search.candidates[name][k] for name, k in level.items()}
