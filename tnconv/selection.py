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

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn
from tqdm.auto import tqdm

from ._modes import plain_copy
from .allocation import (
    Budget,
    dense_conv_flops,
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
from .errors import BudgetError
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


@dataclass
class _Search:
    """The working state shared by both strategies: one model copy whose layers are swapped."""

    work: nn.Module
    evaluate: Callable[[nn.Module], float]
    convs: dict[str, nn.Conv2d]
    candidates: dict[str, list[_Candidate]]  # cheapest first, the dense layer last
    bar: Any
    log: list[Evaluation] = field(default_factory=list)
    current: dict[str, _Candidate] = field(default_factory=dict)

    def set(self, name: str, cand: _Candidate) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.work.get_submodule(parent_name) if parent_name else self.work
        setattr(parent, child, self.convs[name] if cand.layer is None else cand.layer)
        self.current[name] = cand

    def measure(self, phase: str, layer: str | None) -> float:
        value = self.evaluate(self.work)
        try:
            metric = float(value)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"evaluate(model) must return a number; got {type(value).__name__}"
            ) from exc
        if not math.isfinite(metric):
            raise ValueError(f"evaluate(model) returned {metric}; it must be finite")
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
        **options: method options, as for ``factorize``.

    Returns:
        A :class:`RankSelection`: ``{layer name: ranks}`` (layers left dense are absent) plus the
        evaluation log; ``compress(model, method, spec=selection)`` builds the model.

    Raises:
        BudgetError: even the smallest candidates of every layer exceed the budget.
        ValueError / TypeError: a bad strategy, shares, budget or ``evaluate``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"select_ranks needs a torch.nn.Module; got {type(model).__name__}")
    if strategy not in ("one-step", "multi-step"):
        raise ValueError(f"strategy must be 'one-step' or 'multi-step'; got {strategy!r}")
    if not callable(evaluate):
        raise TypeError("evaluate must be a callable evaluate(model) -> float")
    shares = tuple(float(s) for s in shares)
    if not shares or not all(0.0 < s < 1.0 for s in shares):
        raise ValueError(f"shares must be floats in (0, 1); got {shares!r}")
    target = parse_budget(budget)
    decomposition = method if isinstance(method, Decomposition) else get(method)
    decomposition.parse_options(options)

    work = plain_copy(model)
    convs = dict((n, c) for n, c in select_convs(work, layers) if not is_depthwise(c))
    if not convs:
        raise ValueError("no Linear / conv layer (other than depthwise) selected")
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
    allowed = target.share * dense_total
    cheapest = sum(c[0].cost for c in candidates.values())
    if cheapest > allowed:
        raise BudgetError(
            f"budget {target.share} of the {target.kind} ({allowed:.0f}) is below the smallest "
            f"candidates of every layer ({cheapest}); lower the shares or raise the budget"
        )

    evaluations = (
        1 + sum(len(c) - 1 for c in candidates.values()) + 1 if strategy == "one-step" else None
    )
    bar = tqdm(total=evaluations, desc=f"select_ranks ({strategy})", disable=not progress)
    search = _Search(work, evaluate, convs, candidates, bar)
    for name in convs:
        search.current[name] = candidates[name][-1]  # dense
    try:
        baseline = search.measure("baseline", None)
        if strategy == "one-step":
            chosen = _one_step(search, baseline, allowed)
        else:
            chosen = _multi_step(search, allowed)
        for name, cand in chosen.items():
            search.set(name, cand)
        metric = search.measure("final", None)
    finally:
        bar.close()

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


def _one_step(search: _Search, baseline: float, allowed: float) -> dict[str, _Candidate]:
    """Sensitivity scan, then greedy upgrades by metric recovered per unit of cost."""
    drop: dict[tuple[str, int], float] = {}
    for name, cands in search.candidates.items():
        for k, cand in enumerate(cands[:-1]):
            search.set(name, cand)
            drop[name, k] = baseline - search.measure("scan", name)
        search.set(name, cands[-1])
        drop[name, len(cands) - 1] = 0.0

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
        for name, cands in search.candidates.items():
            k = level[name]
            if k == 0:
                continue
            search.set(name, cands[k - 1])
            trial = search.measure("step", name)
            search.set(name, cands[k])
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
