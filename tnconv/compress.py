"""Model surgery: replace a model's ``nn.Conv2d`` layers by ``FactorizedConv2d``.

:func:`compress` factorizes the chosen convolutions with one method, either with the same
rank / eps / ratio for every layer or under a global ``budget`` that it allocates across layers,
and keeps a layer dense whenever factorizing it would not save anything. This module knows
layers and modules, not algebra: it asks the registry for a decomposition and the layer for its
FLOPs.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn
from tqdm.auto import tqdm

from .decompositions.base import Decomposition
from .errors import BudgetError, RankSpecError, StructureError
from .factorization import Factorization
from .layers import FactorizedConv2d
from .rank import parse_rank_spec
from .registry import get

__all__ = [
    "Budget",
    "compress",
    "conv_input_shapes",
    "default_input_size",
    "dense_reasons",
    "select_convs",
]

log = logging.getLogger(__name__)

LayerSelector = Sequence[str] | Callable[[str, nn.Module], bool] | None
SaveCriterion = Literal["params", "flops", "both"]

# attributes tnconv keeps on a compressed model (they survive deepcopy, pickling and tnconv.save)
DENSE_REASONS = "_tnconv_dense_reasons"
INPUT_SIZE = "_tnconv_input_size"

# error levels tried per layer when allocating a global budget (error-bounded methods)
_EPS_GRID = (0.02, 0.05, 0.08, 0.12, 0.16, 0.2, 0.25, 0.3, 0.36, 0.43, 0.5, 0.6, 0.7, 0.8, 0.9)
_RANK_STEPS = 14  # geometric rank levels tried per layer for methods without an eps guarantee


class Budget(BaseModel):
    """A global compression target: keep ``share`` of the selected layers' params or FLOPs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    share: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
    kind: Literal["params", "flops"] = "params"


def _parse_budget(budget: Any) -> Budget:
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
            "layers' parameters, or (kind, share) with kind 'params' or 'flops'"
        ) from exc


# ---------------------------------------------------------------------------------------------
# layer selection and shapes
# ---------------------------------------------------------------------------------------------
def select_convs(model: nn.Module, layers: LayerSelector = None) -> list[tuple[str, nn.Conv2d]]:
    """The ``nn.Conv2d`` modules chosen by ``layers`` (names, a predicate, or None for all).

    Raises ``KeyError`` for a name that is not in the model and ``TypeError`` for a named module
    that is not an ``nn.Conv2d``.
    """
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if layers is None:
        return convs
    if callable(layers):
        return [(n, m) for n, m in convs if layers(n, m)]
    if isinstance(layers, str):
        layers = [layers]
    modules = dict(model.named_modules())
    chosen = []
    for name in layers:
        if name not in modules:
            known = ", ".join(n for n, _ in convs[:12]) + (" ..." if len(convs) > 12 else "")
            raise KeyError(f"no module named {name!r} in the model; conv layers: {known}")
        if not isinstance(modules[name], nn.Conv2d):
            raise TypeError(f"module {name!r} is a {type(modules[name]).__name__}, not nn.Conv2d")
        chosen.append((name, modules[name]))
    return chosen


def default_input_size(model: nn.Module) -> tuple[int, int, int, int]:
    """The input size used when none is given: the size recorded by :func:`compress`, or
    ``(1, C, 224, 224)`` with C the input channels of the model's first convolution."""
    recorded = getattr(model, INPUT_SIZE, None)
    if recorded is not None:
        return tuple(recorded)  # type: ignore[return-value]
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, FactorizedConv2d)):
            return (1, module.in_channels, 224, 224)
    raise ValueError("the model has no convolution; give input_size")


def conv_input_shapes(
    model: nn.Module, input_size: Sequence[int]
) -> dict[str, tuple[int, int, int, int]]:
    """Input shape of every conv (dense or factorized) in one forward pass on zeros."""
    shapes: dict[str, tuple[int, int, int, int]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, FactorizedConv2d)):

            def record(mod: nn.Module, args: tuple, name: str = name) -> None:
                shapes[name] = tuple(args[0].shape)  # type: ignore[assignment]

            hooks.append(module.register_forward_pre_hook(record))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(tuple(input_size), device=device, dtype=dtype))
    except Exception as exc:
        raise ValueError(
            f"could not run the model on an input of size {tuple(input_size)} to measure "
            f"FLOPs ({type(exc).__name__}: {exc}); pass the right input_size"
        ) from exc
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def dense_conv_flops(conv: nn.Conv2d, input_shape: Sequence[int]) -> int:
    """FLOPs of ``conv`` on ``input_shape`` as torch.utils.flop_counter counts them (no bias)."""
    b, _, h, w = input_shape
    pad = conv.padding
    if isinstance(pad, str):
        ho, wo = (
            (h, w)
            if pad == "same"
            else (
                (h - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1,
                (w - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) // conv.stride[1] + 1,
            )
        )
    else:
        ho = (h + 2 * pad[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[
            0
        ] + 1
        wo = (w + 2 * pad[1] - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) // conv.stride[
            1
        ] + 1
    per_output = (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]
    return 2 * b * conv.out_channels * ho * wo * per_output


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _layer_from(conv: nn.Conv2d, f: Factorization) -> FactorizedConv2d:
    return FactorizedConv2d(
        f,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=None if conv.bias is None else conv.bias.detach(),
        padding_mode=conv.padding_mode,
    )


# ---------------------------------------------------------------------------------------------
# decisions
# ---------------------------------------------------------------------------------------------
@dataclass
class _Candidate:
    factorization: Factorization | None  # None: the dense layer itself
    params: int
    flops: int
    error: float


def _saves(
    cand: _Candidate, dense_params: int, dense_flops: int | None, must_save: SaveCriterion
) -> str:
    """Why ``cand`` is no better than the dense layer ("" when it saves what is required)."""
    reasons = []
    if must_save in ("params", "both") and cand.params >= dense_params:
        reasons.append(f"{cand.params} factorized params >= {dense_params} dense")
    if must_save in ("flops", "both") and dense_flops is not None and cand.flops >= dense_flops:
        reasons.append(f"{cand.flops} factorized FLOPs >= {dense_flops} dense")
    return "; ".join(reasons)


def _candidate(
    layer: FactorizedConv2d | None, f: Factorization | None, shape: tuple | None, dense: tuple
) -> _Candidate:
    if f is None or layer is None:
        return _Candidate(None, dense[0], dense[1] or 0, 0.0)
    flops = layer.flops(shape) if shape is not None else 0
    return _Candidate(f, f.num_params, flops, float(f.info.get("relative_error", math.nan)))


def compress(
    model: nn.Module,
    method: str | Decomposition,
    rank: Any = None,
    *,
    eps: Any = None,
    ratio: Any = None,
    layers: LayerSelector = None,
    budget: Any = None,
    inplace: bool = False,
    input_size: Sequence[int] | None = None,
    must_save: SaveCriterion | None = None,
    progress: bool | None = None,
    **options: Any,
) -> nn.Module:
    """Replace the chosen ``nn.Conv2d`` layers of ``model`` by ``FactorizedConv2d``.

    Args:
        model: any module; it is deep-copied first unless ``inplace=True``.
        method: a registered name (``tnconv.available()``) or a ``Decomposition``.
        rank, eps, ratio: the per-layer spec, as for ``Decomposition.factorize``.
        layers: conv names, a predicate ``(name, module) -> bool``, or None for every conv.
        budget: instead of a per-layer spec, a global target: a share in (0, 1] of the selected
            layers' parameters, or ``("flops", share)`` / ``Budget(kind=..., share=...)``. Ranks
            are allocated across layers greedily by error saved per parameter (or FLOP): the sum
            over layers of ``-log(1 - e^2)`` (e: relative kernel error; the log of the energy
            share lost, ~e^2 for small e) is minimised under the budget.
        inplace: modify ``model`` itself instead of a copy.
        input_size: input (B, C, H, W) used to measure FLOPs; defaults to
            :func:`default_input_size`. Needed only for FLOP criteria; recorded on the result.
        must_save: a layer is replaced only if the factorization has fewer parameters
            ("params"), fewer FLOPs ("flops") or both ("both") than the dense layer; otherwise it
            stays dense and ``tnconv.summary`` says why. Default: "flops" when the method's
            options ask for ``objective="flops"``, else "params".
        progress: show a tqdm bar over layers (default: when there are 8 or more).
        **options: method options, as for ``factorize``.

    Returns:
        The compressed model (``model`` itself when ``inplace``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compress needs a torch.nn.Module; got {type(model).__name__}")
    decomposition = method if isinstance(method, Decomposition) else get(method)
    if must_save is None:
        must_save = "flops" if options.get("objective") == "flops" else "params"
    if must_save not in ("params", "flops", "both"):
        raise ValueError(f"must_save must be 'params', 'flops' or 'both'; got {must_save!r}")
    if budget is not None:
        if any(v is not None for v in (rank, eps, ratio)):
            raise RankSpecError("give either budget= or one of rank=, eps=, ratio=, not both")
        target_budget = _parse_budget(budget)
    else:
        parse_rank_spec(rank, eps, ratio)  # fail before any work
        target_budget = None
    # ranks and parameter counts may depend on an option (a semi-tensor factor t)
    decomposition = decomposition.bind(decomposition.parse_options(options))

    target = model if inplace else copy.deepcopy(model)
    chosen = select_convs(target, layers)
    need_flops = must_save != "params" or (
        target_budget is not None and target_budget.kind == "flops"
    )
    size = tuple(input_size) if input_size is not None else None
    shapes: dict[str, tuple[int, int, int, int]] = {}
    if need_flops or size is not None:
        size = size or default_input_size(target)
        shapes = conv_input_shapes(target, size)
    reasons: dict[str, str] = dict(getattr(target, DENSE_REASONS, {}))
    eligible = []
    for name, conv in chosen:
        if conv.groups != 1:
            reasons[name] = f"grouped convolution (groups={conv.groups}) is not supported"
        elif need_flops and name not in shapes:
            reasons[name] = f"not reached by a forward pass on input {size}: FLOPs unknown"
        else:
            eligible.append((name, conv))
    show = progress if progress is not None else len(eligible) >= 8
    bar = tqdm(eligible, desc=f"compress ({decomposition.name})", disable=not show, leave=False)

    if target_budget is None:
        for name, conv in bar:
            layer, reason = _factorize_layer(
                decomposition, conv, shapes.get(name), (rank, eps, ratio), options, must_save
            )
            if layer is None:
                reasons[name] = reason
                log.info("%s stays dense: %s", name, reason)
            else:
                reasons.pop(name, None)
                _set_module(target, name, layer)
    else:
        plan = _allocate(decomposition, eligible, shapes, target_budget, options, must_save, bar)
        for name, conv in eligible:
            cand, reason = plan[name]
            if cand.factorization is None:
                reasons[name] = reason
            else:
                reasons.pop(name, None)
                _set_module(target, name, _layer_from(conv, cand.factorization))
    setattr(target, DENSE_REASONS, reasons)
    if size is not None:
        setattr(target, INPUT_SIZE, tuple(size))
    return target


def _with_geometry(
    decomposition: Decomposition,
    conv: nn.Conv2d,
    shape: tuple[int, int, int, int] | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    """``options`` plus the layer's ``input_size`` (H, W) and ``stride``, for a method whose
    options have those fields (a FLOPs objective depends on them) and where the caller left them
    unset; other methods get ``options`` unchanged."""
    fields = getattr(decomposition.Options, "model_fields", {})
    extra: dict[str, Any] = {}
    if "stride" in fields and "stride" not in options:
        extra["stride"] = tuple(conv.stride)
    if "input_size" in fields and "input_size" not in options and shape is not None:
        extra["input_size"] = tuple(shape[2:])
    return {**options, **extra}


def _factorize_layer(
    decomposition: Decomposition,
    conv: nn.Conv2d,
    shape: tuple[int, int, int, int] | None,
    spec: tuple[Any, Any, Any],
    options: dict[str, Any],
    must_save: SaveCriterion,
) -> tuple[FactorizedConv2d | None, str]:
    rank, eps, ratio = spec
    options = _with_geometry(decomposition, conv, shape, options)
    try:
        f = decomposition.factorize(conv.weight.detach(), rank, eps=eps, ratio=ratio, **options)
    except (BudgetError, StructureError) as exc:
        return None, str(exc)
    layer = _layer_from(conv, f)
    dense = (conv.weight.numel(), dense_conv_flops(conv, shape) if shape else None)
    reason = _saves(_candidate(layer, f, shape, dense), dense[0], dense[1], must_save)
    if reason:
        return None, f"no saving at the requested accuracy: {reason}"
    return layer, ""


# ---------------------------------------------------------------------------------------------
# global budget allocation
# ---------------------------------------------------------------------------------------------
@dataclass
class _LayerOptions:
    """The candidates of one layer: by uniform rank level, plus eps-grid fits and dense."""

    by_level: dict[int, _Candidate]  # uniform rank r -> its fit, or the dense layer if no saving
    all: list[_Candidate]  # every distinct candidate that saves, plus the dense layer last


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


def _layer_candidates(
    decomposition: Decomposition,
    conv: nn.Conv2d,
    shape: tuple[int, int, int, int] | None,
    levels: list[int],
    options: dict[str, Any],
    must_save: SaveCriterion,
) -> _LayerOptions:
    weight = conv.weight.detach()
    dense_info = (weight.numel(), dense_conv_flops(conv, shape) if shape else None)
    dense = _Candidate(None, dense_info[0], dense_info[1] or 0, 0.0)
    specs: list[tuple[str, Any]] = [("rank", r) for r in levels]
    if decomposition.guarantees_eps:
        specs += [("eps", e) for e in _EPS_GRID]
    found: dict[tuple[int, ...], _Candidate] = {}
    by_level: dict[int, _Candidate] = {}
    for kind, value in specs:
        if kind == "rank":
            f = decomposition.factorize(weight, value, **options)
        else:
            f = decomposition.factorize(weight, eps=value, **options)
        cand = found.get(f.ranks)
        if cand is None:
            cand = _candidate(_layer_from(conv, f), f, shape, dense_info)
            if _saves(cand, dense_info[0], dense_info[1], must_save):
                cand = dense
            else:
                found[f.ranks] = cand
        if kind == "rank":
            by_level[value] = cand
    return _LayerOptions(by_level, [*found.values(), dense])


def _loss(c: _Candidate) -> float:
    """What the allocation minimises per layer: ``-log(1 - e^2)``, the log of the energy share a
    kernel loses (about ``e^2`` for small errors). It grows without bound as ``e -> 1``, so no
    layer is sacrificed to save parameters elsewhere, as a plain sum of ``e^2`` would allow."""
    return -math.log(max(1.0 - c.error**2, 1e-12))


def _hull(cands: list[_Candidate], cost: Callable[[_Candidate], int]) -> list[_Candidate]:
    """Lower convex hull of (cost, loss), cheapest first: the efficient upgrades."""
    pts = sorted(cands, key=lambda c: (cost(c), c.error))
    frontier: list[_Candidate] = []
    for c in pts:  # keep only candidates with strictly lower error than every cheaper one
        if not frontier or c.error < frontier[-1].error:
            frontier.append(c)
    hull: list[_Candidate] = []
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
    options: dict[str, _LayerOptions], cost: Callable[[_Candidate], int], allowed: float
) -> dict[str, _Candidate] | None:
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
            steps.append((gain / max(extra, 1), name, k))
    steps.sort(key=lambda s: -s[0])
    for _, name, k in steps:
        if choice[name] != k - 1:  # an earlier step of this layer did not fit
            continue
        extra = cost(hulls[name][k]) - cost(hulls[name][k - 1])
        if spent + extra <= allowed:
            choice[name], spent = k, spent + extra
    return {name: hulls[name][k] for name, k in choice.items()}


def _fill(
    picked: dict[str, _Candidate],
    options: dict[str, _LayerOptions],
    cost: Callable[[_Candidate], int],
    allowed: float,
) -> dict[str, _Candidate]:
    """Spend what is left: repeatedly take the single swap that saves the most loss per unit of
    extra cost and still fits."""
    picked = dict(picked)
    spent = sum(cost(c) for c in picked.values())
    while True:
        best: tuple[float, str, _Candidate] | None = None
        for name, o in options.items():
            cur = picked[name]
            for c in o.all:
                gain = _loss(cur) - _loss(c)
                extra = cost(c) - cost(cur)
                if gain <= 0 or spent + extra > allowed:
                    continue
                score = gain / max(extra, 1)
                if best is None or score > best[0]:
                    best = (score, name, c)
        if best is None:
            return picked
        _, name, c = best
        spent += cost(c) - cost(picked[name])
        picked[name] = c


def _allocate(
    decomposition: Decomposition,
    layers: list[tuple[str, nn.Conv2d]],
    shapes: dict[str, tuple[int, int, int, int]],
    budget: Budget,
    options: dict[str, Any],
    must_save: SaveCriterion,
    bar: Iterable[tuple[str, nn.Conv2d]],
) -> dict[str, tuple[_Candidate, str]]:
    """Choose one candidate per layer, minimising the summed :func:`_loss` under the budget:
    the better of a greedy climb of the layers' convex hulls and the best uniform rank, each
    then topped up with whatever budget is left."""

    def cost(c: _Candidate) -> int:
        return c.params if budget.kind == "params" else c.flops

    full = decomposition.parse_options(options)
    quick = decomposition.search_options(full)
    quick_options = {k: getattr(quick, k) for k in type(quick).model_fields}
    options_by_layer: dict[str, _LayerOptions] = {}
    levels_by_layer: dict[str, list[int]] = {}
    unfit: dict[str, str] = {}  # layers whose shape the network cannot take
    for name, conv in bar:
        kshape = tuple(conv.weight.shape)
        try:
            levels_by_layer[name] = _rank_levels(decomposition, kshape, conv.weight.numel())
        except StructureError as exc:
            unfit[name] = str(exc)
            continue
        options_by_layer[name] = _layer_candidates(
            decomposition,
            conv,
            shapes.get(name),
            levels_by_layer[name],
            _with_geometry(decomposition, conv, shapes.get(name), quick_options),
            must_save,
        )
    if not options_by_layer:
        return {name: (_Candidate(None, 0, 0, 0.0), reason) for name, reason in unfit.items()}
    dense_total = sum(cost(o.all[-1]) for o in options_by_layer.values())
    allowed = budget.share * dense_total

    def total_loss(p: dict[str, _Candidate]) -> float:
        return sum(_loss(c) for c in p.values())

    greedy = _greedy(options_by_layer, cost, allowed)
    uniform: list[dict[str, _Candidate]] = []
    for r in sorted({r for levels in levels_by_layer.values() for r in levels}):
        # a layer whose ladder stops below r stays dense at that level, as compress(rank=r) does
        level = {n: o.by_level.get(r, o.all[-1]) for n, o in options_by_layer.items()}
        if sum(cost(c) for c in level.values()) <= allowed:
            uniform.append(level)
    if greedy is None and not uniform:
        smallest = sum(min(cost(c) for c in o.all) for o in options_by_layer.values())
        raise BudgetError(
            f"budget {budget.share} of the selected layers' {budget.kind} allows {allowed:.0f}, "
            f"but the smallest {decomposition.name} factorizations need {smallest}"
        )
    filled = [_fill(p, options_by_layer, cost, allowed) for p in [greedy, *uniform] if p]
    # the search ran with the method's quick options; refit the finalists with the full ones
    # (the best found, and the largest uniform rank that fits, the natural baseline)
    finalists = [min(filled, key=total_loss)]
    if uniform:
        finalists.append(_fill(uniform[-1], options_by_layer, cost, allowed))
    convs = dict(layers)
    refitted: dict[tuple[str, tuple[int, ...]], _Candidate] = {}

    def refit(name: str, c: _Candidate) -> _Candidate:
        if c.factorization is None or quick == full:
            return c
        key = (name, c.factorization.ranks)
        if key not in refitted:
            conv = convs[name]
            opts = _with_geometry(decomposition, conv, shapes.get(name), options)
            f = decomposition.factorize(conv.weight.detach(), c.factorization.ranks, **opts)
            dense = (conv.weight.numel(), c.flops)
            better = _candidate(_layer_from(conv, f), f, shapes.get(name), dense)
            ok = better.error < c.error and cost(better) <= cost(c)
            refitted[key] = better if ok else c
        return refitted[key]

    finals = [{n: refit(n, c) for n, c in p.items()} for p in finalists]
    best = min(finals, key=total_loss)
    log.info(
        "budget %s of %s: spent %d of %.0f, summed loss %.4f",
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
    for name, reason in unfit.items():
        plan[name] = (_Candidate(None, 0, 0, 0.0), reason)
    return plan


def dense_reasons(model: nn.Module) -> dict[str, str]:
    """Why ``compress`` left some selected layers dense (layer name -> reason)."""
    return dict(getattr(model, DENSE_REASONS, {}))
