"""Model surgery: replace a model's Linear and conv layers by factorized ones.

:func:`compress` factorizes the chosen convolutions: with the same rank / eps / ratio for every
layer, with a per-layer ``spec`` (each layer its own spec, and optionally its own method), or
under a global ``budget`` whose allocation across layers lives in :mod:`tnconv.allocation`. A
layer stays dense whenever factorizing it would not save anything. This module knows layers and
modules, not algebra: it asks the registry for a decomposition and the layer for its FLOPs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn
from tqdm.auto import tqdm

from . import sequential_fit, timing
from ._modes import check_not_meta, plain_copy
from .allocation import (
    Budget,
    FitStep,
    LatencyProbe,
    SaveCriterion,
    allocate,
    candidate_for,
    dense_conv_flops,
    fit_on_workers,
    fit_runner,
    layer_from_conv,
    layer_scorers,
    layer_statistics,
    options_for_layer,
    parse_budget,
    round_ranks,
    saving_shortfall,
)
from .bn_folding import fold_batchnorm
from .convs import (
    DENSE_REASONS,
    INPUT_SIZE,
    LATENCY_GUARD,
    LayerSelector,
    conv_input_shapes,
    default_input_size,
    depthwise_reason,
    is_depthwise,
    select_convs,
    set_module,
)
from .decompositions.base import Decomposition
from .decompositions.output_aware import polish
from .errors import BudgetError, OptionError, RankSpecError, StructureError, StudyError
from .executors import TaskRunner, check_picklable
from .factorization import Factorization
from .layers import FactorizedLayer
from .logit_error import LogitProbe
from .rank import parse_rank_spec
from .recommend import auto_spec
from .registry import get
from .sequential_fit import Refit, fit_sequentially
from .statistics import InputStatistics, calibrate_inputs

__all__ = [
    "Budget",
    "LayerSpec",
    "compress",
    "conv_input_shapes",
    "default_input_size",
    "dense_conv_flops",
    "dense_reasons",
    "select_convs",
]

log = logging.getLogger(__name__)

ALLOCATE_BY = ("kernel", "output", "logits")  # what compress(budget=, calibration=) ranks by


class LayerSpec(BaseModel):
    """How one layer is factorized when ``compress`` gets a per-layer ``spec``.

    Exactly one of ``rank`` / ``eps`` / ``ratio`` (as for ``Decomposition.factorize``);
    ``method`` overrides compress's method for this layer; ``options`` are merged over
    compress's keyword options.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    method: str | Decomposition | None = None
    rank: Any = None
    eps: Any = None
    ratio: Any = None
    options: dict[str, Any] = {}

    @classmethod
    def of(cls, name: str, value: Any) -> LayerSpec:
        """Read one entry of ``spec``: a ``LayerSpec``, a dict of its fields, or a bare rank
        (int, tuple or float in (0, 1)). Raises :class:`RankSpecError` naming the layer."""
        try:
            if isinstance(value, LayerSpec):
                spec = value
            elif isinstance(value, Mapping):
                spec = cls.model_validate(dict(value))
            else:
                spec = cls(rank=value)
            parse_rank_spec(spec.rank, spec.eps, spec.ratio)
        except (ValidationError, RankSpecError) as exc:
            raise RankSpecError(
                f"spec for layer {name!r} is invalid ({value!r}): {exc}. Give a rank (int, "
                "tuple, float in (0, 1)) or a dict with one of 'rank' / 'eps' / 'ratio' and "
                "optionally 'method' and 'options'"
            ) from exc
        return spec


# ---------------------------------------------------------------------------------------------
# decisions
# ---------------------------------------------------------------------------------------------
def compress(
    model: nn.Module,
    method: str | Decomposition | None,
    rank: Any = None,
    *,
    eps: Any = None,
    ratio: Any = None,
    layers: LayerSelector = None,
    budget: Any = None,
    spec: Mapping[str, Any] | None = None,
    inplace: bool = False,
    input_size: Sequence[int] | None = None,
    must_save: SaveCriterion | None = None,
    progress: bool | None = None,
    round_to: int | None = None,
    channels_last: bool = False,
    calibration: Any = None,
    fold_bn: bool | None = None,
    allocate_by: Literal["kernel", "output", "logits"] = "kernel",
    sequential: bool | None = None,
    executor: Any = None,
    workers: int | None = None,
    worker_threads: int | None = None,
    depthwise: Literal["dense", "factorize"] = "dense",
    **options: Any,
) -> nn.Module:
    """Replace the chosen layers of ``model`` by factorized ones: ``nn.Conv2d`` by
    ``FactorizedConv2d``, ``nn.Linear`` by ``FactorizedLinear``, ``nn.Conv1d`` / ``nn.Conv3d``
    by ``FactorizedConv1d`` / ``3d``; grouped convs are factorized per group with the group as
    a shared index of the network; depthwise convs (one input channel per group) stay dense
    (``summary`` says so) unless ``depthwise="factorize"``.

    Args:
        model: any module; it is deep-copied first unless ``inplace=True``.
        method: a registered name (``tnconv.available()``) or a ``Decomposition``; may be None
            when every ``spec`` entry names its own method. ``"auto"`` (with ``budget=``)
            chooses a method and ranks per layer among the registered ones
            (:func:`tnconv.recommend`); its options are ``methods=[names]`` and
            per-method option dicts keyed by method name (``cp={"n_init": 1}``). With
            ``calibration`` its choice follows ``allocate_by`` and the chosen layers are then
            fitted output-aware (and ``sequential``) like one method's.
        rank, eps, ratio: the per-layer spec, as for ``Decomposition.factorize``.
        layers: layer names, a layer type or tuple of types (``nn.Conv2d``), a predicate
            ``(name, module) -> bool``, or None for every Linear / Conv1d / Conv2d / Conv3d.
        budget: instead of a per-layer spec, a global target: a share in (0, 1] of the selected
            layers' parameters, or ``("flops", share)`` / ``("latency", share)`` /
            ``Budget(kind=..., share=...)``. Ranks are allocated across layers
            (:func:`tnconv.allocation.allocate`) by error saved per parameter (FLOP, or
            millisecond measured on this machine at each layer's input): the sum over layers of
            ``-log(1 - e^2)`` (e: relative kernel error) is minimised under the budget.
            The share is of *every selected layer*, including those that stay dense whatever
            the budget (depthwise convs; layers the method's network cannot take, e.g. a
            semi-tensor ``t`` that does not divide them; layers the forward pass does not
            reach): their weight parameters (FLOPs at their input, measured latency) are
            spent first, and the factorized layers are compressed harder so that the selected
            layers as a whole meet the share (where depthwise convs hold 8% of the selected
            weights, ``budget=0.25`` leaves the others (0.25 - 0.08) / 0.92 = 0.18 of
            theirs). Their ``dense_reasons`` / ``summary`` note says what they counted.
            ``Budget(share=..., pool="factorizable")`` counts only the layers the method may
            factorize (the behaviour before depthwise layers counted); :class:`BudgetError`
            when the layers kept dense already hold more than the share.
        spec: per-layer specs instead of one for all: ``{layer name: rank}`` or ``{layer name:
            {"rank" | "eps" | "ratio": value, "method": name, "options": {...}}}`` (see
            :class:`LayerSpec`). Exactly the named layers are compressed; it excludes ``rank`` /
            ``eps`` / ``ratio`` / ``budget`` / ``layers``.
        inplace: modify ``model`` itself instead of a copy.
        input_size: input (B, C, H, W) used to measure FLOPs; defaults to
            :func:`default_input_size`. Needed only for FLOP criteria; recorded on the result.
        must_save: a layer is replaced only if the factorization has fewer parameters
            ("params"), fewer FLOPs ("flops"), both ("both"), or runs faster than the dense
            layer ("latency": both timed at the layer's input from ``input_size`` on this
            machine, round-robin in one loop, inference mode); otherwise it stays dense and
            ``tnconv.summary`` says why. With "latency" the whole model is then timed against
            the dense one at ``input_size`` (round-robin, a second of rounds per timing), and
            when it is not faster by ``GUARD_MARGIN`` (3% of the dense time, against timing
            noise) the fewest of the least-saving factorized layers that make it so are put
            back (:func:`latency_guard`; per-layer gains do not add up end to end).
            Default: "flops" when the method's options ask for ``objective="flops"``, else
            "params".
        progress: show a tqdm bar over layers (default: when there are 8 or more).
        round_to: round each factorized layer's ranks to the nearest multiple of this (as
            AIMET does for SIMD-friendly channel counts), keeping the rounded layer only where
            it is measured faster at the layer's input and still meets ``must_save`` and the
            budget (:func:`tnconv.allocation.round_ranks`; the measurement is logged and kept
            in the layer's ``info["round_to"]``).
        channels_last: time layers (latency criteria, ``round_to``) on channels-last inputs,
            for models that will run in that layout.
        calibration: input batches (a DataLoader, a list of tensors or of ``(inputs, labels)``
            pairs): every chosen layer is then fitted to its *outputs* on these inputs
            (:func:`tnconv.calibrate_inputs`, ``Decomposition.factorize(statistics=)``), and
            ``eps`` / ``ratio`` / ``budget`` bound and allocate the output error instead of the
            kernel error. See docs/data_aware.md.
        fold_bn: fold every conv -> BatchNorm2d pair into the conv before factorizing
            (:func:`tnconv.bn_folding.fold_batchnorm`: the BN becomes ``nn.Identity``, the
            model is unchanged in eval mode). Default: True with ``calibration`` when ``model``
            is in eval mode, else False (fitting folded kernels by kernel error alone lost
            accuracy on the digits CNN: docs/data_aware.md).
        allocate_by: with ``budget`` and ``calibration``: ``"kernel"`` (default) allocates
            ranks by kernel error and fits each layer output-aware at its ranks; ``"output"``
            allocates by each layer's output error (every candidate fitted output-aware);
            ``"logits"`` allocates by the error at the model's outputs with that one layer
            replaced by the candidate and the rest dense, on the first
            :data:`tnconv.logit_error.LOGIT_SAMPLES` calibration inputs (every candidate fitted
            output-aware; the model's prefix runs once per layer, each candidate runs itself
            and the rest of the model: :class:`tnconv.logit_error.LogitProbe`).
            docs/data_aware.md compares them. With ``method="auto"`` the same pricing
            chooses among every method's candidates (:func:`tnconv.recommend`).
        sequential: with ``calibration``: once every layer's ranks are chosen, refit the
            factorized ungrouped Conv2d layers one at a time in forward order, each to the
            dense layer's outputs from the inputs it sees in the compressed model (the layers
            before it already refitted), its bias corrected for the shifted means
            (:mod:`tnconv.sequential_fit`, Zhang et al.'s asymmetric reconstruction): errors
            stop compounding with depth. The first
            :data:`tnconv.sequential_fit.SEQUENTIAL_SAMPLES` calibration inputs are used; the
            pass costs one more fit per layer, finished by up to
            :data:`tnconv.sequential_fit.POLISH_ITERATIONS` L-BFGS steps on the exact output
            error (:func:`tnconv.decompositions.output_aware.polish`), and one run of both
            models over those inputs (per layer, up to it, where the dense model's layer inputs
            do not fit in memory). A refit that does worse on them than the layer's first fit
            is not kept (the first fit's bias is still corrected). The ranks, sizes and
            ``must_save`` decisions are the first fits'; ``info["sequential_error"]`` holds
            each layer's output error in the compressed model against the dense layer's
            (bias-free dense output as the reference), ``info["dense_input_error"]`` the first
            fit's there.
            With a budget allocated by kernel error (the default) the first fits are then
            weight-only (the refits replace their output-aware fits). Default: True with
            ``calibration``. ``sequential=False`` keeps the output-aware fits on the dense
            model's inputs, each finished by the same polish on its layer's patch moment
            (ranks and decisions unchanged).
        executor: with ``budget``, where the per-layer candidate fits of the allocation run.
            ``None`` (default): here, in order. ``"processes"``: a local spawn process pool of
            ``workers`` processes (default: the CPU count, at most one per layer), a
            ``distributed.Client``, a Dask scheduler address ``"tcp://host:8786"``, or any
            ``concurrent.futures.Executor`` (as for :func:`tnconv.select_ranks`). A task is one
            layer's fits in one pass of the allocation (its kernel, the method's options, the
            rank levels or eps bounds, its input statistics when calibrated), never the model;
            it returns the fitted factorizations, from which the layers and candidates are
            built here. Passes: the rank ladders (and, for one-pass allocations, the eps
            walks), the eps walks the first allocation asks for, the finalists' refits with
            the full options, and with ``calibration`` the output-aware refits. Latency timing
            (latency budgets, ``must_save="latency"``, ``round_to``) and every decision stay
            here (timings are this machine's). The result is the serial run's: the same ranks
            and factors when the workers compute as this process does (the same torch thread
            count for bit-identical float sums; ``worker_threads``). Inside
            :func:`tnconv.allocation.shared_candidates` the fits already made are reused and
            only the missing ones are sent. With ``method="auto"`` the recommendation's fits
            (every method on every layer, :func:`tnconv.recommend`) run on the executor, one
            task per (layer, method); the chosen layers' final fits (one per layer) run here.
            Not with ``rank`` / ``eps`` / ``ratio`` / ``spec`` (one fit per layer):
            :class:`tnconv.StudyError`. ``options`` and the method must be picklable.
        workers: process count for ``executor="processes"``.
        worker_threads: torch threads in each worker; default 1 for ``"processes"`` and Dask
            (one layer per core), untouched for other executors.
        depthwise: ``"dense"`` (default) keeps depthwise convs dense. ``"factorize"`` treats
            them as any grouped conv: each channel's (1, 1, kh, kw) kernel is factorized at
            common ranks with the channel as the network's shared group index, through the
            same executor. Where the method's network saves parameters on a per-channel
            kernel, this is a real factorization along (channels, kh, kw): for ``cp``, ``tt``,
            ``tr`` and ``rsdtr`` rank r is a sum of r spatially separable kernels per channel
            (rank 1: a kh x 1 then a 1 x kw depthwise conv, C (kh + kw + 2) parameters against
            C kh kw); for Tucker-like networks (``tucker``, ``tc``) the per-channel core is as
            large as the kernel, so the layer stays dense ("no saving"). Under ``budget=`` the
            layers are then candidates of the allocation like the others. Not with
            ``method="auto"`` (:class:`RankSpecError`).
        **options: method options, as for ``factorize``.

    Returns:
        The compressed model (``model`` itself when ``inplace``).

    Raises:
        NotPicklableError: with ``executor``, ``options`` or the method cannot reach a worker
            (before any work).
        StudyError: an unknown ``executor``, ``workers`` without ``"processes"``,
            ``workers`` / ``worker_threads`` without ``executor``, or ``executor`` without
            ``budget``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress needs a torch.nn.Module; got {type(model).__name__}")
    if executor is None and (workers is not None or worker_threads is not None):
        raise StudyError("workers= and worker_threads= apply with an executor")
    if executor is not None:
        if budget is None or spec is not None:
            raise StudyError(
                "executor= runs the per-layer candidate fits of a budget allocation; give "
                "budget= (rank= / eps= / ratio= / spec= fit each layer once, here)"
            )
        check_picklable("options", options)  # before any work
        if isinstance(method, Decomposition):
            check_picklable("method", method)
    if allocate_by not in ALLOCATE_BY:
        raise OptionError(
            f"allocate_by must be one of {', '.join(map(repr, ALLOCATE_BY))}; got {allocate_by!r}"
        )
    if allocate_by == "logits" and (calibration is None or budget is None):
        raise OptionError(
            "allocate_by='logits' prices candidates by the model's outputs on the calibration "
            "inputs under a budget: give budget= and calibration="
        )
    if sequential is None:
        sequential = calibration is not None
    if sequential and calibration is None:
        raise OptionError("sequential=True refits layers on calibration inputs: give calibration=")
    if depthwise not in ("dense", "factorize"):
        raise RankSpecError(f"depthwise must be 'dense' or 'factorize'; got {depthwise!r}")
    if isinstance(method, str) and method.lower() == "auto":
        if depthwise != "dense":
            raise RankSpecError(
                'compress(model, "auto") keeps depthwise convs dense; depthwise="factorize" '
                "takes one method"
            )
        if spec is not None or any(v is not None for v in (rank, eps, ratio)):
            raise RankSpecError(
                'compress(model, "auto") takes budget=, not rank / eps / ratio / spec'
            )
        args = dict(input_size=input_size, must_save=must_save, progress=progress)
        target = model if inplace else plain_copy(model)
        if fold_bn if fold_bn is not None else (calibration is not None and not model.training):
            picked = [n for n, c in select_convs(target, layers) if _foldable(c)]
            fold_batchnorm(target, inplace=True, convs=picked)
        parallel = dict(executor=executor, workers=workers, worker_threads=worker_threads)
        chosen, dense, kept = auto_spec(
            target,
            budget=budget,
            layers=layers,
            options=options,
            calibration=calibration,
            allocate_by=allocate_by,
            **args,
            **parallel,
        )
        if chosen:
            compress(
                target,
                None,
                spec=chosen,
                inplace=True,
                calibration=calibration,
                fold_bn=False,
                sequential=sequential,
                **args,
            )
        reasons = dict(getattr(target, DENSE_REASONS, {}))
        for name in dense:
            reasons[name] = "auto: no method's factorization was worth its cost under the budget"
        for name, note in kept.items():  # the depthwise convs the recommendation counted
            why = depthwise_reason(target.get_submodule(name))
            reasons[name] = "; ".join(filter(None, [why, note]))
        setattr(target, DENSE_REASONS, reasons)
        return target
    if must_save is None:
        must_save = "flops" if options.get("objective") == "flops" else "params"
    if must_save not in ("params", "flops", "both", "latency"):
        raise ValueError(
            f"must_save must be 'params', 'flops', 'both' or 'latency'; got {must_save!r}"
        )
    if round_to is not None and (
        isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1
    ):
        raise ValueError(f"round_to must be a positive int (e.g. 8) or None; got {round_to!r}")
    target_budget = None
    if spec is not None:
        if any(v is not None for v in (rank, eps, ratio, budget, layers)):
            raise RankSpecError(
                "spec= gives every layer its own spec; do not combine it with rank=, eps=, "
                "ratio=, budget= or layers="
            )
        per_layer = _parse_layer_specs(spec, method, options)
        layers = list(per_layer)
    elif budget is not None:
        if any(v is not None for v in (rank, eps, ratio)):
            raise RankSpecError("give either budget= or one of rank=, eps=, ratio=, not both")
        target_budget = parse_budget(budget)
    else:
        parse_rank_spec(rank, eps, ratio)  # fail before any work
    if spec is None:
        if method is None:
            raise TypeError("compress needs a method (a registered name or a Decomposition)")
        decomposition = _decomposition(method)
        # ranks and parameter counts may depend on an option (a semi-tensor factor t)
        decomposition = decomposition.bind(decomposition.parse_options(options))

    target = model if inplace else plain_copy(model)
    if fold_bn is None:
        fold_bn = calibration is not None and not model.training
    chosen = select_convs(target, layers)

    def kept_depthwise(conv: nn.Module) -> bool:
        return depthwise == "dense" and is_depthwise(conv)

    for name, conv in chosen:
        if not kept_depthwise(conv):
            check_not_meta(conv.weight, f"the weight of layer {name!r}")
    if fold_bn:  # the chosen layers are fitted as the kernels they compute with their BN
        fold_batchnorm(target, inplace=True, convs=[n for n, c in chosen if _foldable(c)])
    timed = (
        must_save == "latency"
        or round_to is not None
        or (target_budget is not None and target_budget.kind == "latency")
    )
    probe = LatencyProbe(channels_last=channels_last) if timed else None
    need_flops = (
        must_save != "params"
        or timed
        or (target_budget is not None and target_budget.kind == "flops")
    )
    size = tuple(input_size) if input_size is not None else None
    shapes: dict[str, tuple[int, ...]] = {}
    if need_flops or size is not None:
        size = size or default_input_size(target)
        shapes = conv_input_shapes(target, size)
    reasons: dict[str, str] = dict(getattr(target, DENSE_REASONS, {}))
    eligible = []
    for name, conv in chosen:
        if kept_depthwise(conv):
            reasons[name] = depthwise_reason(conv)
        elif need_flops and name not in shapes:
            reasons[name] = (
                f"not reached by a forward pass on input {size}: FLOPs and latency unknown"
            )
        else:
            eligible.append((name, conv))
    statistics: dict[int, InputStatistics] = {}
    # a budget allocated by kernel error uses the dense inputs' statistics only for its final
    # output-aware fits, which the sequential refit replaces
    by_kernel_then_sequential = sequential and target_budget is not None and allocate_by == "kernel"
    if calibration is not None and eligible and not by_kernel_then_sequential:
        # input statistics describe ungrouped 2-D convs; the other kinds are fitted by kernel
        names = [name for name, conv in eligible if _calibrated(conv)]
        others = [name for name, conv in eligible if not _calibrated(conv)]
        if others:
            log.info("calibration: %s fitted by kernel error (not ungrouped Conv2d)", others)
        by_name = calibrate_inputs(target, calibration, layers=names) if names else {}
        statistics = {id(conv): by_name[name] for name, conv in eligible if name in by_name}
    scorers: dict[int, Callable[[nn.Module], float]] = {}
    if allocate_by == "logits" and eligible:
        probe_logits = LogitProbe(target, calibration)
        by_layer = probe_logits.scorers([name for name, _ in eligible])
        scorers = {id(conv): by_layer[name] for name, conv in eligible}
    show = progress if progress is not None else len(eligible) >= 8
    label = "per-layer spec" if spec is not None else decomposition.name
    bar = tqdm(eligible, desc=f"compress ({label})", disable=not show, leave=False)

    replaced: dict[str, nn.Module] = {}  # name -> the dense module a factorized one replaced

    def install(name: str, layer: FactorizedLayer | None, reason: str) -> None:
        if layer is None:
            reasons[name] = reason
            log.info("%s stays dense: %s", name, reason)
        else:
            reasons.pop(name, None)
            replaced[name] = target.get_submodule(name)
            set_module(target, name, layer)

    def method_of(name: str) -> str:
        return per_layer[name][0].name if spec is not None else decomposition.name

    steps = _announce(bar, method_of)

    def rounded(
        dec: Decomposition, name: str, conv: nn.Module, f: Factorization, opts: dict
    ) -> Factorization:
        if round_to is None or probe is None:
            return f
        kind = target_budget.kind if target_budget is not None else None
        layer_opts = options_for_layer(dec, conv, shapes[name], opts)
        return round_ranks(
            dec, conv, f, shapes[name], round_to, layer_opts, must_save, probe, kind
        )[0]

    with layer_statistics(statistics):
        if target_budget is not None:
            # selected, kept dense (depthwise, not reached): counted in the budget's pool
            names = {n for n, _ in eligible}
            kept = [(n, c) for n, c in chosen if n not in names]
            plan = _budget_plan(
                decomposition,
                eligible,
                kept,
                shapes,
                target_budget,
                options,
                must_save,
                steps,
                probe,
                statistics=statistics,
                by_output=allocate_by != "kernel",
                scorers=scorers,
                rounded=rounded,
                executor=executor,
                workers=workers,
                worker_threads=worker_threads,
            )
            for name, _ in eligible:
                install(name, *plan[name])
            for name, _ in kept:  # the budget counted them: say so beside why they stay dense
                note = plan.get(name, (None, ""))[1]
                if note:
                    reasons[name] = f"{reasons[name]}; {note}"
        else:
            for name, conv in steps:
                if spec is not None:
                    dec, layer_opts, lspec = per_layer[name]
                    triple = (lspec.rank, lspec.eps, lspec.ratio)
                else:
                    dec, layer_opts, triple = decomposition, options, (rank, eps, ratio)
                layer, reason = _factorize_layer(
                    dec, conv, shapes.get(name), triple, layer_opts, must_save, probe
                )
                if layer is not None and round_to is not None:
                    f = rounded(dec, name, conv, layer.factorization, layer_opts)
                    layer = layer_from_conv(conv, f)
                install(name, layer, reason)
    if statistics and not sequential and replaced:
        _polish_output_aware(target, replaced, statistics)
    if sequential and replaced:
        _refit_sequentially(
            target,
            replaced,
            calibration,
            lambda name: per_layer[name][:2] if spec is not None else (decomposition, options),
            shapes,
        )
    if must_save == "latency" and probe is not None and replaced and size is not None:
        reference = model if not inplace else _with_modules(target, replaced)
        guard = latency_guard(target, reference, replaced, shapes, size, probe)
        reasons.update(guard.pop("undone"))
        setattr(target, LATENCY_GUARD, guard)
    setattr(target, DENSE_REASONS, reasons)
    if size is not None:
        setattr(target, INPUT_SIZE, tuple(size))
    return target


def _budget_plan(
    decomposition: Decomposition,
    eligible: list[tuple[str, nn.Module]],
    kept: list[tuple[str, nn.Module]],
    shapes: dict[str, tuple[int, ...]],
    budget: Budget,
    options: dict[str, Any],
    must_save: SaveCriterion,
    steps: Iterator[tuple[str, nn.Module]],
    probe: LatencyProbe | None,
    *,
    statistics: dict[int, InputStatistics],
    by_output: bool,
    scorers: dict[int, Callable[[nn.Module], float]] | None = None,
    rounded: Callable[[Decomposition, str, nn.Module, Factorization, dict], Factorization],
    executor: Any,
    workers: int | None,
    worker_threads: int | None,
) -> dict[str, tuple[FactorizedLayer | None, str]]:
    """Every eligible layer's factorized layer (None: dense) and reason under ``budget``: the
    allocation, ``round_to``'s rounding, and with calibration by kernel (``statistics`` and not
    ``by_output``) the output-aware refit at the chosen ranks; ``scorers`` (conv id ->
    candidate layer -> error) price the candidates instead of their own errors (logit
    allocation); and for each ``kept`` layer (selected, kept dense: counted in the budget's
    pool, :func:`tnconv.allocation.allocate`) ``(None, note)`` saying what it counted. The fits
    run on ``executor``'s workers when given (one task per layer and pass); timing stays here."""
    runner: TaskRunner | None = None
    if executor is not None:
        runner = fit_runner(
            executor,
            decomposition,
            options,
            workers=workers,
            worker_threads=worker_threads,
            max_tasks=max(1, len(eligible)),
        )
    try:
        with layer_statistics(statistics if by_output else {}), layer_scorers(scorers or {}):
            plan = allocate(
                decomposition,
                eligible,
                shapes,
                budget,
                options,
                must_save,
                steps,
                probe,
                runner,
                kept=kept,
            )
        convs = dict(eligible)
        chosen: dict[str, Factorization | None] = {}
        for name, conv in eligible:
            f = plan[name][0].factorization
            chosen[name] = None if f is None else rounded(decomposition, name, conv, f, options)
        if statistics and not by_output:  # ranks by kernel error, fit by output
            opts = {
                name: options_for_layer(decomposition, convs[name], shapes.get(name), options)
                for name, f in chosen.items()
                if f is not None
            }
            if runner is None:
                for name in opts:
                    f = chosen[name]
                    assert f is not None
                    chosen[name] = decomposition.factorize(
                        convs[name].weight.detach(), f.ranks, **opts[name]
                    )
            else:
                jobs = {
                    name: (
                        convs[name].weight,
                        opts[name],
                        [FitStep(({"rank": chosen[name].ranks},), single=True)],  # type: ignore[union-attr]
                    )
                    for name in opts
                }
                for name, fits in fit_on_workers(
                    runner, decomposition, jobs, "calibrated refits"
                ).items():
                    chosen[name] = fits[0][0]
    finally:
        if runner is not None:
            runner.close()
    out: dict[str, tuple[FactorizedLayer | None, str]] = {
        name: (None if f is None else layer_from_conv(convs[name], f), plan[name][1])
        for name, f in chosen.items()
    }
    for name, _ in kept:
        out[name] = (None, plan.get(name, (None, ""))[1])
    return out


def _refit_sequentially(
    target: nn.Module,
    replaced: Mapping[str, nn.Module],
    calibration: Any,
    method_of: Callable[[str], tuple[Decomposition, dict[str, Any]]],
    shapes: Mapping[str, tuple[int, ...]],
) -> None:
    """``compress(sequential=True)``: refit the factorized ungrouped Conv2d layers of
    ``target`` (``replaced``: name -> the dense module) at their ranks, in forward order, on
    the inputs they see in ``target`` (:func:`tnconv.sequential_fit.fit_sequentially`)."""
    refits: dict[str, Refit] = {}
    for name, conv in replaced.items():
        if type(conv) is not nn.Conv2d or conv.groups != 1:
            continue  # fitted by kernel error: no patch statistics for other kinds
        dec, opts = method_of(name)
        ranks = target.get_submodule(name).factorization.ranks
        layer_opts = options_for_layer(dec, conv, shapes.get(name), opts)

        def refit(
            w: torch.Tensor,
            stats: InputStatistics,
            dec=dec,
            conv=conv,
            ranks=ranks,
            opts=layer_opts,
        ) -> nn.Module:
            f = dec.factorize(w, ranks, **{**opts, "statistics": stats})
            return layer_from_conv(conv, _polished(f, w, stats))

        refits[name] = refit
    if refits:
        dense = _with_modules(target, {n: replaced[n] for n in refits})
        fit_sequentially(target, dense, refits, calibration)


def _polished(f: Factorization, w: torch.Tensor, stats: InputStatistics) -> Factorization:
    """``f``, a fit of the kernel ``w`` (T, S, kh, kw), finished by
    :func:`~tnconv.decompositions.output_aware.polish` on the patch moment of ``stats`` (``f``
    itself without one, or with :data:`tnconv.sequential_fit.POLISH_ITERATIONS` = 0)."""
    if stats.patch is None:
        return f
    return polish(f, w, stats.patch, iterations=sequential_fit.POLISH_ITERATIONS)


def _polish_output_aware(
    target: nn.Module,
    replaced: Mapping[str, nn.Module],
    statistics: Mapping[int, InputStatistics],
) -> None:
    """``compress(calibration=, sequential=False)``: finish each installed output-aware fit
    (ranks chosen, latency decided) by :func:`~tnconv.decompositions.output_aware.polish` on
    the exact patch-moment output error of its layer's inputs, as the sequential refit does;
    equation and ranks stay, so every decision made on the first fit holds."""
    for name, conv in replaced.items():
        stats = statistics.get(id(conv))
        layer = target.get_submodule(name)
        if stats is None or not isinstance(layer, FactorizedLayer):
            continue
        f = layer.factorization
        w = conv.weight.detach()
        polished = _polished(f, w, stats)
        if polished is f:
            continue
        # the errors the first fit recorded describe it, not the polished factors
        w64, fitted = w.double(), polished.to_tensor().detach().double()
        polished.info["relative_error"] = stats.output_error(fitted - w64, w64)
        polished.info["kernel_error"] = float((fitted - w64).norm() / w64.norm())
        set_module(target, name, layer_from_conv(conv, polished))


def _with_modules(model: nn.Module, modules: Mapping[str, nn.Module]) -> nn.Module:
    """A copy of ``model`` with ``modules`` (name -> module) installed."""
    other = plain_copy(model)
    for name, module in modules.items():
        set_module(other, name, module)
    return other


# The whole-model guard keeps a compressed model only when it is measured this much faster than
# the dense one (a share of the dense time): run-to-run noise of a few-ms model at batch 1.
GUARD_MARGIN = 0.03
# Wall time of each whole-model comparison: two identical CIFAR ResNets at batch 1 read 2-3%
# apart over 20 rounds, about 1% over a second of rounds (the margin must clear the noise).
GUARD_SECONDS = 1.0


def latency_guard(
    model: nn.Module,
    dense: nn.Module,
    replaced: Mapping[str, nn.Module],
    shapes: Mapping[str, tuple[int, ...]],
    size: Sequence[int],
    probe: LatencyProbe,
    margin: float = GUARD_MARGIN,
    seconds: float = GUARD_SECONDS,
) -> dict[str, Any]:
    """Make the compressed ``model`` at least as fast as ``dense`` end to end, in place.

    Both are timed round-robin at ``size`` (``probe.repeats`` rounds at least, ``seconds`` of
    them at least). When ``model`` is not faster than ``dense`` by ``margin`` (a share of the
    dense time), the factorized layers are ranked by what each saves (timed against its dense
    original at its own input), and the fewest of the least-saving ones whose return to dense
    (``replaced``: name -> the dense module) makes the model fast enough is found by bisection
    over that ranking, each step timing the two models again. With every layer back the model
    is the dense one. Layer-by-layer choices do not add up: the factorized layers' extra memory
    passes and calls cost time the per-layer timings do not see. Returns ``{"dense_ms", "ms",
    "undone": {name: reason}}``, the timings those of the model as left.
    """

    def timed() -> tuple[float, float]:
        ms = timing.module_latencies(
            {"dense": dense, "ours": model},
            size,
            channels_last=probe.channels_last,
            repeats=probe.repeats,
            min_seconds=seconds,
        )
        return ms["dense"], ms["ours"]

    def fast_enough(ms: float, dense_ms: float) -> bool:
        return ms < dense_ms * (1.0 - margin)

    dense_ms, ms = timed()
    if fast_enough(ms, dense_ms):
        return {"dense_ms": dense_ms, "ms": ms, "undone": {}}
    first = (ms, dense_ms)
    saving = {}
    for name, original in replaced.items():
        if name in shapes:
            d, (f,) = probe.measure(original, [model.get_submodule(name)], shapes[name])
            saving[name] = d - f
    ranked = sorted(saving, key=saving.__getitem__)
    factorized = {name: model.get_submodule(name) for name in ranked}

    def undo(count: int) -> None:
        for i, name in enumerate(ranked):
            set_module(model, name, replaced[name] if i < count else factorized[name])

    # bisection for the fewest undone: ``low`` was timed too slow, ``high`` fast enough (all
    # undone is the dense model itself); a few timings instead of one per layer
    low, high, timings = 0, len(ranked), {}
    while high - low > 1:
        mid = (low + high) // 2
        undo(mid)
        timings[mid] = timed()
        if fast_enough(timings[mid][1], timings[mid][0]):
            high = mid
        else:
            low = mid
    undo(high)
    dense_ms, ms = timings[high] if high in timings else timed()
    undone = {
        name: (
            f"whole-model latency guard: the compressed model ran {first[0]:.3f} ms vs "
            f"{first[1]:.3f} ms dense; this layer saved least ({saving[name]:+.3f} ms at its "
            f"input; {high} of {len(ranked)} put back)"
        )
        for name in ranked[:high]
    }
    for name, why in undone.items():
        log.info("latency guard: %s back to dense (%s)", name, why)
    return {"dense_ms": dense_ms, "ms": ms, "undone": undone}


def _foldable(module: nn.Module) -> bool:
    """A conv whose following BatchNorm tnconv folds before factorizing."""
    return isinstance(module, nn.Conv2d) and module.groups == 1


_calibrated = _foldable  # the layers calibrate_inputs describes


def _announce(bar: tqdm, method_of: Callable[[str], str]) -> Iterator[tuple[str, nn.Module]]:
    """The layers of ``bar``, each shown on the bar and logged (INFO) with its method and kernel
    shape before its work starts, so a long compression says where it is."""
    for name, conv in bar:
        shape = "x".join(str(n) for n in conv.weight.shape)
        bar.set_postfix_str(f"{name} {method_of(name)} {shape}", refresh=True)
        log.info("compress: %s (%s, kernel %s)", name, method_of(name), shape)
        yield name, conv


def _decomposition(method: str | Decomposition) -> Decomposition:
    return method if isinstance(method, Decomposition) else get(method)


def _parse_layer_specs(
    spec: Mapping[str, Any], method: str | Decomposition | None, options: dict[str, Any]
) -> dict[str, tuple[Decomposition, dict[str, Any], LayerSpec]]:
    """Validate every entry of ``spec`` (method known, options valid) before any work."""
    if not isinstance(spec, Mapping) or not spec:
        raise RankSpecError(
            f"spec must be a non-empty mapping from layer name to spec; got {spec!r}"
        )
    parsed = {}
    for name, value in spec.items():
        lspec = LayerSpec.of(name, value)
        chosen = lspec.method if lspec.method is not None else method
        if chosen is None:
            raise TypeError(f"spec for layer {name!r} names no method and compress got none")
        dec = _decomposition(chosen)
        layer_opts = {**options, **lspec.options}
        dec = dec.bind(dec.parse_options(layer_opts))
        parsed[name] = (dec, layer_opts, lspec)
    return parsed


def _factorize_layer(
    decomposition: Decomposition,
    conv: nn.Module,
    shape: tuple[int, ...] | None,
    spec: tuple[Any, Any, Any],
    options: dict[str, Any],
    must_save: SaveCriterion,
    probe: LatencyProbe | None = None,
) -> tuple[FactorizedLayer | None, str]:
    rank, eps, ratio = spec
    options = options_for_layer(decomposition, conv, shape, options)
    try:
        f = decomposition.factorize(conv.weight.detach(), rank, eps=eps, ratio=ratio, **options)
    except (BudgetError, StructureError) as exc:
        return None, str(exc)
    layer = layer_from_conv(conv, f)
    dense = (conv.weight.numel(), dense_conv_flops(conv, shape) if shape else None)
    cand = candidate_for(layer, f, shape, dense)
    dense_ms = None
    if must_save == "latency" and probe is not None and shape is not None:
        dense_ms, (cand.latency,) = probe.measure(conv, [layer], shape)
    reason = saving_shortfall(cand, dense[0], dense[1], must_save, dense_ms)
    if reason:
        return None, f"no saving at the requested accuracy: {reason}"
    return layer, ""


def dense_reasons(model: nn.Module) -> dict[str, str]:
    """Why ``compress`` left some selected layers dense (layer name -> reason)."""
    return dict(getattr(model, DENSE_REASONS, {}))
