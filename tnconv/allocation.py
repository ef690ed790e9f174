"""Budget allocation: per-layer ranks that meet a global parameter, FLOP or latency budget.

Model surgery (:mod:`tnconv.compress`) decides *which* layers to replace; this module decides *how
much* each layer keeps when a whole-model budget is given. It prices candidate factorizations of
each layer (parameters, FLOPs at the layer's input, relative kernel error, and, when asked,
latency measured on this machine) and chooses one per layer so that the summed
``-log(1 - e^2)`` is minimal under the budget. It knows layers and decompositions only through
their public interfaces. :func:`round_ranks` rounds a layer's ranks to multiples (``round_to``)
when that measurably helps.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import uuid
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from . import timing
from .contraction import ConvGeometry
from .decompositions.base import LAYOUT_KEYS, Decomposition
from .errors import BudgetError, RankSpecError, StructureError, StudyError, TnconvError
from .executors import TaskRunner, check_picklable, default_worker_threads
from .factorization import Factorization
from .layers import FactorizedLayer, factorized_type, kernel_fit_shape

__all__ = [
    "Budget",
    "Candidate",
    "LatencyProbe",
    "SaveCriterion",
    "allocate",
    "candidate_for",
    "dense_conv_flops",
    "kept_dense_costs",
    "layer_from_conv",
    "layer_scorers",
    "options_for_layer",
    "parse_budget",
    "round_ranks",
    "saving_shortfall",
    "shared_candidates",
]

log = logging.getLogger(__name__)

SaveCriterion = Literal["params", "flops", "both", "latency"]

# error levels tried per layer when allocating a global budget (error-bounded methods)
_EPS_GRID = (0.02, 0.05, 0.08, 0.12, 0.16, 0.2, 0.25, 0.3, 0.36, 0.43, 0.5, 0.6, 0.7, 0.8, 0.9)
_RANK_STEPS = 14  # geometric rank levels tried per layer for methods without an eps guarantee
# a budget's eps walk stops at this many times the parameters the ladder-only allocation gives
# the layer (see allocate)
_EPS_REACH = 2.0


# The candidate fits priced inside a `shared_candidates()` block: (what, kernel shape, key) ->
# [(kernel values, result)]. None outside such a block (nothing is remembered).
_SHARED: ContextVar[dict[Hashable, list[tuple[torch.Tensor, Any]]] | None] = ContextVar(
    "tnconv_shared_candidates", default=None
)


@contextmanager
def shared_candidates() -> Iterator[None]:
    """Inside the block, budget allocations reuse the candidate fits of any layer already priced
    with the same kernel values, method, options, input shape and save criterion, so one method
    studied at several budgets fits each layer's rank ladder once (:func:`tnconv.study` does
    this). Latency-timed candidates are always re-measured. Everything is forgotten on exit.
    """
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


_MISSING = object()


def _shared_get(what: str, weight: torch.Tensor, key: Hashable) -> Any:
    """The result stored for an equal kernel and key in the current :func:`shared_candidates`
    block, or ``_MISSING``."""
    store = _SHARED.get()
    if store is None:
        return _MISSING
    w = weight.detach()
    for kernel, result in store.get((what, tuple(w.shape), key), []):
        if kernel.dtype == w.dtype and kernel.device == w.device and torch.equal(kernel, w):
            return result
    return _MISSING


def _shared(what: str, weight: torch.Tensor, key: Hashable, compute: Callable[[], Any]) -> Any:
    """``compute()``, or the result of an earlier call for an equal kernel and key in the
    current :func:`shared_candidates` block (kernels compared by value: compress works on a
    copy of the model, so the tensors differ from call to call)."""
    found = _shared_get(what, weight, key)
    if found is not _MISSING:
        return found
    result = compute()
    store = _SHARED.get()
    if store is not None:
        w = weight.detach()
        store.setdefault((what, tuple(w.shape), key), []).append((w.clone(), result))
    return result


def _options_key(options: dict[str, Any]) -> str:
    return repr(sorted(options.items()))


class Budget(BaseModel):
    """A global compression target: keep ``share`` of the selected layers' params, FLOPs or
    latency (dense latency measured on this machine at each layer's input).

    ``pool`` says which layers the share is of. ``"selected"`` (default): every selected layer,
    including those that must stay dense (depthwise convs, layers the method's network cannot
    take): their cost is spent first and the factorized layers share what is left, so the
    selected layers as a whole meet the share. ``"factorizable"``: only the layers the method
    may factorize (the layers kept dense are not counted; before this option existed, the only
    behaviour).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    share: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
    kind: Literal["params", "flops", "latency"] = "params"
    pool: Literal["selected", "factorizable"] = "selected"

    def allowance(self, factorizable: float, kept: float) -> float:
        """What the factorizable layers may cost together: ``share`` of their dense cost
        ``factorizable`` plus the cost ``kept`` of the selected layers kept dense, less
        ``kept`` (``pool="selected"``), or ``share`` of ``factorizable`` alone. May be
        negative: the layers kept dense already cost more than the share allows."""
        if self.pool == "factorizable":
            return self.share * factorizable
        return self.share * (factorizable + kept) - kept

    def kept_note(self, cost: float) -> str:
        """The note on a selected layer kept dense whose ``cost`` (this budget's kind) counts
        against the budget ("" when the pool leaves it out)."""
        if self.pool == "factorizable":
            return ""
        what = {"params": "weight parameters", "flops": "FLOPs", "latency": "ms"}[self.kind]
        amount = f"{cost:.3f}" if self.kind == "latency" else f"{cost:.0f}"
        return (
            f"its {amount} {what} count against budget={self.share:g} (the factorized layers "
            "are compressed harder so that the selected layers as a whole meet it)"
        )


def parse_budget(budget: Any) -> Budget:
    try:
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, dict):
            return Budget.model_validate(budget)
        if isinstance(budget, (tuple, list)) and len(budget) == 2:
            return Budget(kind=budget[0], share=budget[1])
        return Budget(share=budget)
    except ValidationError as exc:
        raise RankSpecError(
            f"budget={budget!r} is invalid: budget must be a share in (0, 1] of the selected "
            "layers' parameters, (kind, share) with kind 'params', 'flops' or 'latency', or "
            "Budget(share=, kind=, pool='selected' | 'factorizable')"
        ) from exc


def kept_dense_costs(
    budget: Budget,
    layers: Iterable[tuple[str, nn.Module]],
    shapes: dict[str, tuple[int, ...]],
    probe: LatencyProbe | None = None,
) -> dict[str, float]:
    """The cost, in ``budget``'s kind, of each selected layer that stays dense whatever the
    allocation does (depthwise convs, layers the method cannot take): its weight's parameters
    (the unit the factorizable layers are counted in: weights, no bias), its FLOPs at its input
    ``shapes[name]`` (0 for a layer the forward pass does not reach), or its latency there
    measured with ``probe`` (a latency budget; 0 when not reached). Empty with
    ``pool="factorizable"``."""
    if budget.pool == "factorizable":
        return {}
    costs: dict[str, float] = {}
    for name, conv in layers:
        shape = shapes.get(name)
        if budget.kind == "params":
            costs[name] = float(conv.weight.numel())
        elif shape is None:
            costs[name] = 0.0
        elif budget.kind == "flops":
            costs[name] = float(dense_conv_flops(conv, shape))
        else:
            if probe is None:
                raise BudgetError(
                    f"a latency budget needs a LatencyProbe to time layer {name!r}, kept dense"
                )
            costs[name] = probe.measure(conv, [], shape)[0]
    return costs


def dense_conv_flops(conv: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of a dense ``nn.Linear`` / ``nn.ConvNd`` on ``input_shape`` as
    torch.utils.flop_counter counts them (no bias)."""
    if isinstance(conv, nn.Linear):
        return 2 * math.prod(input_shape[:-1]) * conv.out_features * conv.in_features
    kernel = tuple(conv.kernel_size)
    geometry = ConvGeometry.make(kernel, conv.stride, conv.padding, conv.dilation)
    out = geometry.output_size(tuple(input_shape[2:]), kernel)
    per_output = (conv.in_channels // conv.groups) * math.prod(kernel)
    return 2 * input_shape[0] * conv.out_channels * math.prod(out) * per_output


def layer_from_conv(conv: nn.Module, f: Factorization) -> FactorizedLayer:
    """The factorized layer running ``f`` in place of the dense ``conv`` (any kind)."""
    return factorized_type(conv).like(conv, f)


# Input statistics of the layers being compressed (conv module id -> statistics), set by
# ``compress(calibration=...)`` for the duration of the call: every fit of those layers (budget
# ladders, refits, rounding) is then output-aware.
_STATISTICS: ContextVar[dict[int, Any] | None] = ContextVar("tnconv_statistics", default=None)


@contextmanager
def layer_statistics(stats: dict[int, Any]) -> Iterator[None]:
    """Inside the block, :func:`options_for_layer` adds ``statistics=`` for the convs in
    ``stats`` (keyed by ``id(conv)``)."""
    token = _STATISTICS.set(stats)
    try:
        yield
    finally:
        _STATISTICS.reset(token)


# Scorers of the layers being compressed (conv module id -> candidate module -> error), set by
# ``compress(allocate_by="logits")`` for the allocation: a candidate's error is then the
# relative error at the model's outputs with that one layer replaced (tnconv.logit_error).
_SCORERS: ContextVar[dict[int, Callable[[nn.Module], float]] | None] = ContextVar(
    "tnconv_scorers", default=None
)


@contextmanager
def layer_scorers(scorers: dict[int, Callable[[nn.Module], float]]) -> Iterator[None]:
    """Inside the block, the budget allocation prices each candidate of the convs in
    ``scorers`` (keyed by ``id(conv)``) by ``scorer(candidate layer)`` instead of the
    factorization's own relative error (kept as ``info["layer_error"]``)."""
    token = _SCORERS.set(scorers)
    try:
        yield
    finally:
        _SCORERS.reset(token)


def _scorer(conv: nn.Module) -> Callable[[nn.Module], float] | None:
    known = _SCORERS.get()
    return None if known is None else known.get(id(conv))


def _scored(conv: nn.Module, layer: FactorizedLayer, cand: Candidate) -> Candidate:
    """``cand`` with its error replaced by the layer's scorer's (when one is set), the
    factorization's info recording both (``layer_error``, ``scored_error``)."""
    score = _scorer(conv)
    if score is None or cand.factorization is None:
        return cand
    f = cand.factorization
    error = float(score(layer))
    f.info = {**f.info, "layer_error": f.info.get("relative_error"), "scored_error": error}
    cand.error = error
    return cand


def options_for_layer(
    decomposition: Decomposition,
    conv: nn.Conv2d,
    shape: tuple[int, int, int, int] | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    """``options`` plus the layer's ``input_size`` (H, W) and ``stride``, for a method whose
    options have those fields (a FLOPs objective depends on them) and where the caller left them
    unset, and the layer's input ``statistics`` inside :func:`layer_statistics`; other methods
    get ``options`` unchanged."""
    fields = getattr(decomposition.Options, "model_fields", {})
    extra: dict[str, Any] = {}
    known = _STATISTICS.get()
    if known is not None and id(conv) in known and "statistics" not in options:
        extra["statistics"] = known[id(conv)]
    if getattr(conv, "groups", 1) > 1:
        extra["groups"] = conv.groups
    if not isinstance(conv, nn.Conv2d):  # the FLOP objective's geometry is a 2-D conv's
        return {**options, **extra}
    if "stride" in fields and "stride" not in options:
        extra["stride"] = tuple(conv.stride)
    if "input_size" in fields and "input_size" not in options and shape is not None:
        extra["input_size"] = tuple(shape[2:])
    return {**options, **extra}


@dataclass
class Candidate:
    """One way to run a layer: its factorization (None: the dense layer), parameters, inference
    FLOPs at the layer's input, relative kernel error and (when measured) latency.

    ``flops`` may be given as a zero-argument callable; it is then computed on its first read
    and kept. A factorized candidate's FLOPs are those of its executed inference plan, which is
    planned and autotuned (timed) on this machine: a parameter budget that does not ask for a
    FLOP saving never reads them (on ResNet-50 that planning was a quarter of ``sttucker``'s
    compress time).
    """

    factorization: Factorization | None  # None: the dense layer itself
    params: int
    flops: int
    error: float
    latency: float = math.nan  # ms per inference forward at the layer's input, when measured


def _candidate_flops(self: Candidate) -> int:
    value = self.__dict__["_flops"]
    if callable(value):
        value = int(value())
        self.__dict__["_flops"] = value
    return value


def _set_candidate_flops(self: Candidate, value: int | Callable[[], int]) -> None:
    self.__dict__["_flops"] = value


# (set after the dataclass is made, so that its __init__ takes flops= and the property stores it)
Candidate.flops = property(_candidate_flops, _set_candidate_flops)  # type: ignore[assignment]


@dataclass(frozen=True)
class LatencyProbe:
    """Times candidate layers against their dense conv at the layer's input shape, round-robin
    in one loop (:func:`tnconv.timing.module_latencies`), on channels-last inputs if asked."""

    channels_last: bool = False
    repeats: int = timing.LATENCY_REPEATS

    def measure(
        self, conv: nn.Module, layers: Sequence[nn.Module], shape: Sequence[int]
    ) -> tuple[float, list[float]]:
        """(dense ms, [ms of each layer])."""
        modules = {"dense": conv, **{str(i): layer for i, layer in enumerate(layers)}}
        ms = timing.module_latencies(
            modules, shape, channels_last=self.channels_last, repeats=self.repeats
        )
        return ms["dense"], [ms[str(i)] for i in range(len(layers))]


def saving_shortfall(
    cand: Candidate,
    dense_params: int,
    dense_flops: int | None,
    must_save: SaveCriterion,
    dense_latency: float | None = None,
) -> str:
    """Why ``cand`` is no better than the dense layer ("" when it saves what is required)."""
    reasons = []
    if must_save in ("params", "both") and cand.params >= dense_params:
        reasons.append(f"{cand.params} factorized params >= {dense_params} dense")
    if must_save in ("flops", "both") and dense_flops is not None and cand.flops >= dense_flops:
        reasons.append(f"{cand.flops} factorized FLOPs >= {dense_flops} dense")
    if must_save == "latency" and dense_latency is not None and not cand.latency < dense_latency:
        reasons.append(f"measured {cand.latency:.3f} ms factorized >= {dense_latency:.3f} ms dense")
    return "; ".join(reasons)


def candidate_for(
    layer: FactorizedLayer | None, f: Factorization | None, shape: tuple | None, dense: tuple
) -> Candidate:
    """The candidate running ``f`` as ``layer`` at input ``shape`` (its FLOPs computed when
    first read), or the dense layer's (``dense``: (params, FLOPs)) when ``f`` is None."""
    if f is None or layer is None:
        return Candidate(None, dense[0], dense[1] or 0, 0.0)
    flops: int | Callable[[], int] = 0
    if shape is not None:
        flops = lambda: layer.flops(shape, inference=True)  # noqa: E731
    return Candidate(f, f.num_params, flops, float(f.info.get("relative_error", math.nan)))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# candidate fits, here or on an executor's workers
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FitStep:
    """One call of a layer's fits: ``factorize_many(weight, specs)``, stopping after the first
    fit with at least ``limit`` parameters (None: every spec); with ``single``, one
    ``factorize(weight, **spec)`` per spec (the finalists' refits)."""

    specs: tuple[dict[str, Any], ...]
    limit: float | None = None
    single: bool = False


@dataclass(frozen=True)
class _FitTask:
    """One layer's fits as a worker receives them: the kernel (T, S / G, *k), the method's name,
    its options (with the layer's input ``statistics`` when calibrated) and the steps, run in
    order on one shared float64 copy of the kernel and its spectra. Never the model. With
    ``skip``, a :class:`TnconvError` / ``ValueError`` of the fits comes back as the result
    (the method cannot fit this layer) instead of failing the run."""

    index: int
    layer: str
    method: str
    weight: torch.Tensor
    options: dict[str, Any]
    steps: tuple[FitStep, ...]
    skip: bool = False


def _fit_steps(
    decomposition: Decomposition,
    weight: torch.Tensor,
    options: dict[str, Any],
    steps: Sequence[FitStep],
    reuse: dict[str, Any],
) -> list[list[Factorization]]:
    """The fits of each step, in order (the serial and the worker side both run this)."""
    out = []
    for step in steps:
        if step.single:
            out.append([decomposition.factorize(weight, **spec, **options) for spec in step.specs])
            continue
        limit = step.limit
        until = None if limit is None else (lambda i, f, limit=limit: f.num_params >= limit)
        out.append(
            decomposition.factorize_many(
                weight, list(step.specs), until=until, reuse=reuse, **options
            )
        )
    return out


_FIT_POOL: dict[str, Any] = {}


def _init_fit_worker(methods: dict[str, Decomposition], threads: int | None) -> None:
    """Process-pool initializer: the decompositions arrive once per worker process."""
    _FIT_POOL["shared"] = (methods, threads)


def _fit_worker(
    task: _FitTask,
    methods: dict[str, Decomposition] | None = None,
    threads: int | None = None,
) -> list[list[Factorization]] | Exception:
    """A layer's fits in a worker: the factorizations (factors, ranks, info) of each step."""
    if methods is None:
        methods, threads = _FIT_POOL["shared"]
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _fit_steps(methods[task.method], task.weight, task.options, task.steps, {})
    except (TnconvError, ValueError) as exc:
        if not task.skip:
            raise
        return exc


def fit_runner(
    executor: Any,
    methods: Decomposition | Sequence[Decomposition],
    options: Any,
    *,
    workers: int | None = None,
    worker_threads: int | None = None,
    max_tasks: int = 1,
) -> TaskRunner:
    """A :class:`TaskRunner` for per-layer fits of ``methods`` on ``executor`` (as
    ``compress(executor=)`` takes it): the decompositions travel once per worker, each task is
    one layer's kernel, options and specs. :class:`NotPicklableError` names ``options`` or the
    method when they cannot reach a worker; :class:`StudyError` an unusable ``executor`` /
    ``workers``."""
    check_picklable("options", options)
    decs = [methods] if isinstance(methods, Decomposition) else list(methods)
    for dec in decs:
        check_picklable("method", dec)
    shared = ({dec.name: dec for dec in decs}, default_worker_threads(executor, worker_threads))
    return TaskRunner(
        executor,
        _fit_worker,
        shared,
        workers=workers,
        max_tasks=max_tasks,
        initializer=_init_fit_worker,
        initargs=shared,
        error=StudyError,
        key=f"tnconv-fit-{uuid.uuid4().hex[:8]}",
    )


def fit_task(
    layer: str,
    method: str,
    weight: torch.Tensor,
    options: dict[str, Any],
    steps: Sequence[FitStep],
    *,
    skip: bool = False,
) -> _FitTask:
    """A task for :func:`run_fit_tasks` (a private copy of the kernel: only it is pickled)."""
    return _FitTask(-1, layer, method, weight.detach().clone(), options, tuple(steps), skip)


def run_fit_tasks(
    runner: TaskRunner, tasks: Sequence[_FitTask], phase: str
) -> list[list[list[Factorization]] | Exception]:
    """Every task on ``runner``'s workers; the results in task order (each: the fits of each
    step, or with ``skip`` the exception that ended them). A failure (the task's own exception,
    a lost worker) is re-raised here with a note naming the layer and method; the other tasks
    are cancelled."""
    if not tasks:
        return []
    numbered = [dataclasses.replace(t, index=i) for i, t in enumerate(tasks)]
    log.info("%s: %d layer fits on the executor", phase, len(numbered))
    results: dict[int, Any] = {}

    def finish(task: _FitTask, result: Any) -> None:
        results[task.index] = result

    def lost(task: _FitTask, exc: BaseException) -> None:
        exc.add_note(
            f"tnconv: the {task.method} fits of layer {task.layer!r} ({phase}) failed on a worker"
        )
        raise exc

    runner.run(numbered, finish, lost=lost, key=lambda t: f"{runner.key}-{phase}-{t.index}")
    return [results[i] for i in range(len(numbered))]


def fit_on_workers(
    runner: TaskRunner,
    decomposition: Decomposition,
    jobs: dict[str, tuple[torch.Tensor, dict[str, Any], Sequence[FitStep]]],
    phase: str = "fit",
) -> dict[str, list[list[Factorization]]]:
    """Every layer's ``decomposition`` fits (``{name: (kernel, options, steps)}``; layers with
    no steps are skipped) as one task per layer on ``runner``'s workers: ``{name: [fits of
    each step]}`` (see :func:`run_fit_tasks`)."""
    names = [name for name, (_, _, steps) in jobs.items() if steps]
    tasks = [fit_task(n, decomposition.name, jobs[n][0], jobs[n][1], jobs[n][2]) for n in names]
    return dict(zip(names, run_fit_tasks(runner, tasks, phase), strict=True))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# global budget allocation
# ---------------------------------------------------------------------------------------------
@dataclass
class _LayerOptions:
    """The candidates of one layer: by uniform rank level, plus eps-grid fits and dense."""

    by_level: dict[int, Candidate]  # uniform rank r -> its fit, or the dense layer if no saving
    all: list[Candidate]  # every distinct candidate that saves, plus the dense layer last


def _rank_levels(decomposition: Decomposition, kshape: tuple, dense_params: int) -> list[int]:
    """Uniform ranks worth trying: every r whose factorization is smaller than the dense kernel
    (at most 32 of them, spread out), or a geometric ladder for families without eps."""
    top = max(decomposition.bond_ranks(10**9, kshape))  # type: ignore[arg-type]
    below = [
        r
        for r in range(1, min(top, 4096) + 1)
        if _takes(decomposition, kshape, r)
        and decomposition.num_params_at(kshape, decomposition.bond_ranks(r, kshape)) < dense_params
    ] or [max(decomposition.min_ranks(kshape))]  # the smallest uniform rank it takes
    if len(below) > 32:
        below = sorted({below[round(k * (len(below) - 1) / 31)] for k in range(32)})
    if not decomposition.guarantees_eps and len(below) > _RANK_STEPS:
        last = below[-1]
        below = sorted({max(1, round(last ** (k / (_RANK_STEPS - 1)))) for k in range(_RANK_STEPS)})
    return below


def _takes(decomposition: Decomposition, kshape: tuple, rank: int) -> bool:
    """Whether the network takes the uniform rank (a semi-tensor bond needs a multiple of t)."""
    try:
        decomposition.bond_ranks(rank, kshape)
    except StructureError:
        return False
    return True


class _LayerFits:
    """The candidate factorizations of one layer, fitted in two parts that share its spectra:
    the uniform rank ladder, and an eps-grid walk (error-bounded families) from the loosest
    bound towards tighter ones, which can be continued later to a larger size limit."""

    def __init__(
        self,
        name: str,
        decomposition: Decomposition,
        conv: nn.Conv2d,
        shape: tuple[int, int, int, int] | None,
        levels: list[int],
        options: dict[str, Any],
    ) -> None:
        self.name, self.decomposition, self.conv, self.shape = name, decomposition, conv, shape
        self.levels, self.options = levels, options
        self.weight = conv.weight.detach()
        self.dense_info = (self.weight.numel(), dense_conv_flops(conv, shape) if shape else None)
        self.reuse: dict[str, Any] = {}  # the float64 kernel and its spectra, for every call
        self.layers: dict[tuple[int, ...], FactorizedLayer] = {}  # by ranks, as the candidates
        self.level_ranks: dict[int, tuple[int, ...]] = {}
        self.cands: dict[tuple[int, ...], Candidate] = {}
        # the eps walk: loosest bound first (the optimum at a smaller eps has no fewer
        # parameters), so it can stop at the first fit as large as it needs to look
        self.grid = sorted(_EPS_GRID, reverse=True) if decomposition.guarantees_eps else []
        self.walked: list[Factorization] = []

    def _add(self, f: Factorization) -> None:
        if f.ranks not in self.cands:
            layer = layer_from_conv(self.conv, f)
            self.layers[f.ranks] = layer
            cand = candidate_for(layer, f, self.shape, self.dense_info)
            self.cands[f.ranks] = _scored(self.conv, layer, cand)

    def _fit(self, step: FitStep, fitted: list[Factorization] | None) -> list[Factorization]:
        """``step``'s fits: ``fitted`` (done on a worker) or fitted here."""
        if fitted is None:
            (fitted,) = _fit_steps(
                self.decomposition, self.weight, self.options, [step], self.reuse
            )
        for f in fitted:
            self._add(f)
        return fitted

    @property
    def laddered(self) -> bool:
        return bool(self.level_ranks)

    def ladder_step(self) -> FitStep:
        """The uniform-rank ladder's fits."""
        return FitStep(tuple({"rank": r} for r in self.levels))

    def ladder(self, fitted: list[Factorization] | None = None) -> None:
        """Fit the ladder here, or take its ``fitted`` factorizations (from a worker)."""
        log.info(
            "%s: %d uniform-rank %s candidates for kernel %s",
            self.name,
            len(self.levels),
            self.decomposition.name,
            tuple(self.weight.shape),
        )
        fitted = self._fit(self.ladder_step(), fitted)
        self.level_ranks = {r: f.ranks for r, f in zip(self.levels, fitted, strict=True)}

    def walk_step(self, limit: float) -> FitStep | None:
        """The fits :meth:`walk` (``limit``) still needs (None: none)."""
        if any(f.num_params >= limit for f in self.walked):
            return None
        todo = self.grid[len(self.walked) :]
        return FitStep(tuple({"eps": e} for e in todo), limit) if todo else None

    def walk(self, limit: float, fitted: list[Factorization] | None = None) -> int:
        """Continue the eps walk up to the first fit with at least ``limit`` parameters; return
        how many of the walk's fits that takes (a walk shared by several budgets has the same
        fits, in the same order, as each budget's own walk would). ``fitted``: the fits of
        :meth:`walk_step` (``limit``), done on a worker."""
        step = self.walk_step(limit)
        if step is None:
            for n, f in enumerate(self.walked, start=1):
                if f.num_params >= limit:
                    return n
            return len(self.walked)
        log.info(
            "%s: up to %d eps-bounded %s candidates (up to %.4g parameters)",
            self.name,
            len(step.specs),
            self.decomposition.name,
            limit,
        )
        self.walked += self._fit(step, fitted)
        return len(self.walked)

    def release(self) -> None:
        """Drop the float64 kernel and its spectra (a later walk recomputes what it needs)."""
        self.reuse.clear()

    def options_for(
        self, must_save: SaveCriterion, probe: LatencyProbe | None, walked: int = 0
    ) -> _LayerOptions:
        """The ladder's fits and the first ``walked`` fits of the eps walk as candidates (timed
        against the dense layer with ``probe``)."""
        dense_params, dense_flops = self.dense_info
        dense = Candidate(None, dense_params, dense_flops or 0, 0.0)
        ranks = [*self.level_ranks.values(), *(f.ranks for f in self.walked[:walked])]
        cands = {r: self.cands[r] for r in dict.fromkeys(ranks)}
        dense_latency = None
        if probe is not None and self.shape is not None:
            # every candidate of the layer and the dense conv in one round-robin loop
            layers = [self.layers[r] for r in cands]
            dense_latency, ms = probe.measure(self.conv, layers, self.shape)
            dense.latency = dense_latency
            cands = {r: copy.copy(c) for r, c in cands.items()}  # (FLOPs still unread)
            for cand, t in zip(cands.values(), ms, strict=True):
                cand.latency = t
        saving = {
            r: c
            for r, c in cands.items()
            if not saving_shortfall(c, dense_params, dense_flops, must_save, dense_latency)
        }
        by_level = {level: saving.get(r, dense) for level, r in self.level_ranks.items()}
        return _LayerOptions(by_level, [*saving.values(), dense])


def _loss(c: Candidate) -> float:
    """What the allocation minimises per layer: ``-log(1 - e^2)``, the log of the energy share a
    kernel loses (about ``e^2`` for small errors). It grows without bound as ``e -> 1``, so no
    layer is sacrificed to save parameters elsewhere, as a plain sum of ``e^2`` would allow."""
    return -math.log(max(1.0 - c.error**2, 1e-12))


def _hull(cands: list[Candidate], cost: Callable[[Candidate], float]) -> list[Candidate]:
    """Lower convex hull of (cost, loss), cheapest first: the efficient upgrades."""
    pts = sorted(cands, key=lambda c: (cost(c), c.error))
    frontier: list[Candidate] = []
    for c in pts:  # keep only candidates with strictly lower error than every cheaper one
        if not frontier or c.error < frontier[-1].error:
            frontier.append(c)
    hull: list[Candidate] = []
    for c in frontier:
        while len(hull) >= 2:
            x1, y1 = cost(hull[-2]), _loss(hull[-2])
            x2, y2 = cost(hull[-1]), _loss(hull[-1])
            x3, y3 = cost(c), _loss(c)
            # drop the middle point when it lies on or above the chord
            if (y2 - y1) * (x3 - x1) >= (y3 - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(c)
    return hull


def _greedy(
    options: dict[str, _LayerOptions],
    cost: Callable[[Candidate], float],
    allowed: float,
    unit: float = 1.0,
) -> dict[str, Candidate] | None:
    """Climb every layer's convex hull, most loss saved per unit of cost first."""
    hulls = {name: _hull(o.all, cost) for name, o in options.items()}
    choice = {name: 0 for name in hulls}
    spent = sum(cost(h[0]) for h in hulls.values())
    if spent > allowed:
        return None
    steps = []
    for name, hull in hulls.items():
        for k in range(1, len(hull)):
            gain = _loss(hull[k - 1]) - _loss(hull[k])
            extra = cost(hull[k]) - cost(hull[k - 1])
            steps.append((gain / max(extra, unit), name, k))
    steps.sort(key=lambda s: -s[0])
    for _, name, k in steps:
        if choice[name] != k - 1:  # an earlier step of this layer did not fit
            continue
        extra = cost(hulls[name][k]) - cost(hulls[name][k - 1])
        if spent + extra <= allowed:
            choice[name], spent = k, spent + extra
    return {name: hulls[name][k] for name, k in choice.items()}


def _fill(
    picked: dict[str, Candidate],
    options: dict[str, _LayerOptions],
    cost: Callable[[Candidate], float],
    allowed: float,
    unit: float = 1.0,
) -> dict[str, Candidate]:
    """Spend what is left: repeatedly take the single swap that saves the most loss per unit of
    extra cost and still fits."""
    picked = dict(picked)
    spent = sum(cost(c) for c in picked.values())
    while True:
        best: tuple[float, str, Candidate] | None = None
        for name, o in options.items():
            cur = picked[name]
            for c in o.all:
                gain = _loss(cur) - _loss(c)
                extra = cost(c) - cost(cur)
                if not gain > 0 or spent + extra > allowed:  # (NaN-safe: never loops on NaN)
                    continue
                score = gain / max(extra, unit)
                if best is None or score > best[0]:
                    best = (score, name, c)
        if best is None:
            return picked
        _, name, c = best
        spent += cost(c) - cost(picked[name])
        picked[name] = c


def allocate(
    decomposition: Decomposition,
    layers: list[tuple[str, nn.Conv2d]],
    shapes: dict[str, tuple[int, int, int, int]],
    budget: Budget,
    options: dict[str, Any],
    must_save: SaveCriterion,
    bar: Iterable[tuple[str, nn.Conv2d]],
    probe: LatencyProbe | None = None,
    runner: TaskRunner | None = None,
    kept: Sequence[tuple[str, nn.Module]] = (),
) -> dict[str, tuple[Candidate, str]]:
    """Choose one candidate per layer, minimising the summed :func:`_loss` under the budget:
    the better of a greedy climb of the layers' convex hulls and the best uniform rank, each
    then topped up with whatever budget is left. A latency budget or ``must_save="latency"``
    times every candidate against the dense layer with ``probe`` (default: NCHW inputs).

    ``kept``: selected layers that stay dense whatever is allocated (compress passes the
    depthwise convs). With ``budget.pool == "selected"`` their cost, and that of the layers in
    ``bar`` whose shape the method's network cannot take, is in the pool the share is taken
    of and is spent first (:meth:`Budget.allowance`): the factorized layers are compressed
    harder so that every selected layer together meets the share. The plan then also has an
    entry for each ``kept`` layer (no factorization; the note that it counted,
    :meth:`Budget.kept_note`). :class:`BudgetError` when the smallest factorizations do not
    fit what is left (naming the cost of the layers kept dense).

    With ``runner`` (:func:`fit_runner`) the candidate fits run on its workers, one task per
    layer and pass (the ladders, then the eps walks, then the finalists' refits), and give the
    serial run's candidates; timing (``probe``) and every decision stay here."""

    def cost(c: Candidate) -> float:
        if budget.kind == "latency":
            return c.latency
        return c.params if budget.kind == "params" else c.flops

    if probe is None and (budget.kind == "latency" or must_save == "latency"):
        probe = LatencyProbe()
    unit = 1e-6 if budget.kind == "latency" else 1.0  # ms: a free upgrade is not worth 1 ms

    full = decomposition.parse_options(options)
    quick = decomposition.search_options(full)
    quick_options = {k: getattr(quick, k) for k in type(quick).model_fields}
    quick_options |= {k: options[k] for k in LAYOUT_KEYS if k in options}
    options_by_layer: dict[str, _LayerOptions] = {}
    fits_by_layer: dict[str, _LayerFits] = {}
    levels_by_layer: dict[str, list[int]] = {}
    # timed candidates are measured once per layer, so every walk is done before they are
    two_pass = probe is None and decomposition.guarantees_eps

    def full_walk(fits: _LayerFits) -> float:
        """Where a walk stops at the latest: at the first candidate as large as the dense
        kernel when a saving of parameters is required (any larger one would be refused)."""
        return fits.dense_info[0] if must_save in ("params", "both") else math.inf

    unfit: dict[str, str] = {}  # layers whose shape the network cannot take
    for name, conv in bar:
        kshape = kernel_fit_shape(conv, options.get("tensorize"))
        try:
            per_group = conv.weight.numel() // getattr(conv, "groups", 1)
            levels_by_layer[name] = _rank_levels(decomposition, kshape, per_group)
        except StructureError as exc:
            unfit[name] = str(exc)
            continue
        layer_options = options_for_layer(decomposition, conv, shapes.get(name), quick_options)

        def fits_of(
            name: str = name, conv: nn.Conv2d = conv, layer_options: dict = layer_options
        ) -> _LayerFits:
            return _LayerFits(
                name, decomposition, conv, shapes.get(name), levels_by_layer[name], layer_options
            )

        key = (
            decomposition.name,
            _options_key(layer_options),
            shapes.get(name),
            tuple(levels_by_layer[name]),
        )
        # fits are shared within a study (the walk grows as budgets ask); timed candidates
        # are measured afresh
        # scored candidates depend on the whole model: never shared
        fits_by_layer[name] = fits = (
            fits_of()
            if _scorer(conv) is not None
            else _shared("candidates", conv.weight, key, fits_of)
        )
        if runner is None:
            if not fits.laddered:
                fits.ladder()
            walked = 0
            if not two_pass:
                walked = fits.walk(full_walk(fits))
                fits.release()
            options_by_layer[name] = fits.options_for(must_save, probe, walked)
    if runner is not None:
        # the same fits as above, one task per layer: the ladder and (one pass) the whole walk
        jobs = {}
        for name, fits in fits_by_layer.items():
            steps = [fits.ladder_step()] if not fits.laddered else []
            walk = None if two_pass else fits.walk_step(full_walk(fits))
            jobs[name] = (fits.weight, fits.options, steps + ([walk] if walk else []))
        done = fit_on_workers(runner, decomposition, jobs, "candidates")
        for name, fits in fits_by_layer.items():
            got = iter(done.get(name, []))
            if not fits.laddered:
                fits.ladder(next(got))
            walked = 0
            if not two_pass:
                walked = fits.walk(full_walk(fits), next(got, None))
                fits.release()
            options_by_layer[name] = fits.options_for(must_save, probe, walked)
    convs = dict(layers)
    fixed = kept_dense_costs(
        budget, [*kept, *((n, convs[n]) for n in unfit if n in convs)], shapes, probe
    )
    fixed_total = sum(fixed.values())

    def dense_plan() -> dict[str, tuple[Candidate, str]]:
        """The entries of the layers kept dense (the unfit ones with their reason)."""
        out = {}
        for name, _ in kept:
            out[name] = (Candidate(None, 0, 0, 0.0), budget.kept_note(fixed.get(name, 0.0)))
        for name, reason in unfit.items():
            note = budget.kept_note(fixed[name]) if name in fixed else ""
            out[name] = (Candidate(None, 0, 0, 0.0), "; ".join(filter(None, [reason, note])))
        return out

    if not options_by_layer:
        return dense_plan()
    dense_total = sum(cost(o.all[-1]) for o in options_by_layer.values())
    allowed = budget.allowance(dense_total, fixed_total)
    if fixed_total:
        log.info(
            "budget %s of %s: %.6g of the selected layers' %.6g in layers kept dense, "
            "%.6g left for the %d factorizable ones",
            budget.share,
            budget.kind,
            fixed_total,
            dense_total + fixed_total,
            allowed,
            len(options_by_layer),
        )
    if two_pass:
        # the eps walks go only as far as this budget can use: up to _EPS_REACH times the
        # parameters the ladder-only allocation gives each layer (the whole walk where it gives
        # the dense kernel, or where the ladder alone cannot meet the budget)
        first = _greedy(options_by_layer, cost, allowed, unit)
        limits = {
            name: min(
                full_walk(fits),
                _EPS_REACH * first[name].params if first is not None else math.inf,
            )
            for name, fits in fits_by_layer.items()
        }
        walks: dict[str, list[list[Factorization]]] = {}
        if runner is not None:
            jobs = {}
            for name, fits in fits_by_layer.items():
                step = fits.walk_step(limits[name])
                jobs[name] = (fits.weight, fits.options, [step] if step else [])
            walks = fit_on_workers(runner, decomposition, jobs, "eps walks")
        for name, fits in fits_by_layer.items():
            walked = fits.walk(limits[name], walks[name][0] if name in walks else None)
            fits.release()
            options_by_layer[name] = fits.options_for(must_save, probe, walked)

    def total_loss(p: dict[str, Candidate]) -> float:
        return sum(_loss(c) for c in p.values())

    greedy = _greedy(options_by_layer, cost, allowed, unit)
    uniform: list[dict[str, Candidate]] = []
    for r in sorted({r for levels in levels_by_layer.values() for r in levels}):
        # a layer whose ladder stops below r stays dense at that level, as compress(rank=r) does
        level = {n: o.by_level.get(r, o.all[-1]) for n, o in options_by_layer.items()}
        if sum(cost(c) for c in level.values()) <= allowed:
            uniform.append(level)
    if greedy is None and not uniform:
        smallest = sum(min(cost(c) for c in o.all) for o in options_by_layer.values())
        kept_text = ""
        if fixed_total:
            kept_text = (
                f" after the {fixed_total:.0f} of the {len(fixed)} selected layers kept dense "
                f"({', '.join(list(fixed)[:4])}{' ...' if len(fixed) > 4 else ''}; "
                "Budget(pool='factorizable') leaves them out of the pool, layers= can "
                "deselect them)"
            )
        raise BudgetError(
            f"budget {budget.share} of the selected layers' {budget.kind} allows "
            f"{allowed:.0f} for the factorized layers{kept_text}, but the smallest "
            f"{decomposition.name} factorizations need {smallest:.0f}"
        )
    filled = [_fill(p, options_by_layer, cost, allowed, unit) for p in [greedy, *uniform] if p]
    # the search ran with the method's quick options; refit the finalists with the full ones
    # (the best found, and the largest uniform rank that fits, the natural baseline)
    finalists = [min(filled, key=total_loss)]
    if uniform:
        finalists.append(_fill(uniform[-1], options_by_layer, cost, allowed, unit))
    refitted: dict[tuple[str, tuple[int, ...]], Candidate] = {}
    full_options = {
        name: options_for_layer(decomposition, convs[name], shapes.get(name), options)
        for name in options_by_layer
    }

    def refit_key(name: str, ranks: tuple[int, ...]) -> tuple:
        return (decomposition.name, _options_key(full_options[name]), ranks)

    prefit: dict[tuple[str, tuple[int, ...]], Factorization] = {}
    if runner is not None and quick != full:
        # the finalists' refits, one task per layer (each distinct ranks once)
        wanted: dict[str, list[tuple[int, ...]]] = {}
        for p in finalists:
            for name, c in p.items():
                f = c.factorization
                if f is None or f.ranks in wanted.get(name, []):
                    continue
                if _shared_get("refit", convs[name].weight, refit_key(name, f.ranks)) is _MISSING:
                    wanted.setdefault(name, []).append(f.ranks)
        jobs = {
            name: (
                convs[name].weight,
                full_options[name],
                [FitStep(tuple({"rank": r} for r in ranks), single=True)],
            )
            for name, ranks in wanted.items()
        }
        for name, (fits,) in fit_on_workers(runner, decomposition, jobs, "refits").items():
            prefit.update({(name, r): f for r, f in zip(wanted[name], fits, strict=True)})

    def refit(name: str, c: Candidate) -> Candidate:
        if c.factorization is None or quick == full:
            return c
        key = (name, c.factorization.ranks)
        if key not in refitted:
            conv = convs[name]
            opts = full_options[name]
            ranks = c.factorization.ranks

            def compute(conv: nn.Module = conv, opts: dict = opts, ranks: tuple = ranks) -> Any:
                if (name, ranks) in prefit:
                    return prefit[name, ranks]
                return decomposition.factorize(conv.weight.detach(), ranks, **opts)

            if _scorer(conv) is not None:
                f = compute()
            else:
                f = _shared("refit", conv.weight, refit_key(name, ranks), compute)
            dense = (conv.weight.numel(), None)  # (unused: f is a factorization)
            full_layer = layer_from_conv(conv, f)
            full_fit = _scored(
                conv, full_layer, candidate_for(full_layer, f, shapes.get(name), dense)
            )
            full_fit.latency = c.latency  # same ranks, same structure: the same executed plan
            # the user's options define the factorization at these ranks (as compress(rank=)
            # would fit it), even where they trade error for something else: cp-stable's
            # stabilisation raises the error the quick search saw
            if full_fit.error > c.error:
                log.debug(
                    "%s: refit at %s with the full options has error %.4g (search: %.4g)",
                    name,
                    ranks,
                    full_fit.error,
                    c.error,
                )
            refitted[key] = full_fit if cost(full_fit) <= cost(c) else c
        return refitted[key]

    finals = [{n: refit(n, c) for n, c in p.items()} for p in finalists]
    best = min(finals, key=total_loss)
    log.info(
        "budget %s of %s: spent %.6g of %.6g, summed loss %.4f",
        budget.share,
        budget.kind,
        sum(cost(c) for c in best.values()),
        allowed,
        total_loss(best),
    )
    plan = {
        name: (
            c,
            ""
            if c.factorization is not None
            else "the budget allocation found no factorization worth its cost here",
        )
        for name, c in best.items()
    }
    plan.update(dense_plan())
    return plan


# ---------------------------------------------------------------------------------------------
# hardware-friendly ranks
# ---------------------------------------------------------------------------------------------
def round_ranks(
    decomposition: Decomposition,
    conv: nn.Conv2d,
    f: Factorization,
    shape: tuple[int, int, int, int],
    multiple: int,
    options: dict[str, Any],
    must_save: SaveCriterion,
    probe: LatencyProbe,
    budget_kind: str | None = None,
) -> tuple[Factorization, str]:
    """``f`` refitted at its ranks rounded to the nearest multiple of ``multiple`` (at least
    ``multiple``, ties up, then capped at what each bond can carry), kept only when measured
    faster than ``f`` at ``shape`` (one round-robin loop with the dense layer), still saving what
    ``must_save`` asks and, under a ``budget_kind`` budget, costing no more than ``f``.

    Returns the factorization kept and a one-line note of the measurement (also stored as
    ``info["round_to"]`` of the result).
    """
    kshape = kernel_fit_shape(conv, options.get("tensorize"))
    target = tuple(max(multiple, multiple * math.floor(r / multiple + 0.5)) for r in f.ranks)
    try:
        ranks = decomposition.bond_ranks(target, kshape)  # type: ignore[arg-type]
        if tuple(ranks) == tuple(f.ranks):
            return f, ""
        g = decomposition.factorize(conv.weight.detach(), ranks, **options)
    except (TnconvError, ValueError) as exc:
        return f, f"round_to={multiple}: ranks {f.ranks} kept ({exc})"
    layers = [layer_from_conv(conv, f), layer_from_conv(conv, g)]
    dense_ms, (f_ms, g_ms) = probe.measure(conv, layers, shape)
    dense = (conv.weight.numel(), dense_conv_flops(conv, shape))
    cf = candidate_for(layers[0], f, shape, dense)
    cg = candidate_for(layers[1], g, shape, dense)
    cf.latency, cg.latency = f_ms, g_ms
    keep = g_ms < f_ms and not saving_shortfall(cg, dense[0], dense[1], must_save, dense_ms)
    if budget_kind == "params":
        keep = keep and cg.params <= cf.params
    elif budget_kind == "flops":
        keep = keep and cg.flops <= cf.flops
    note = (
        f"round_to={multiple}: ranks {f.ranks} {f_ms:.3f} ms -> {g.ranks} {g_ms:.3f} ms "
        f"(dense {dense_ms:.3f} ms), {'rounded' if keep else 'kept unrounded'}"
    )
    log.info("%s", note)
    kept = g if keep else f
    kept.info["round_to"] = note
    return kept, note
