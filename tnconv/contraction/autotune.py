"""Choosing among a layer's candidate plans by timing them (as ``cudnn.benchmark`` does).

The cost tables price each step with a linear model fitted on a few dozen timings; where the
model is off (thin convolutions on large NCHW maps, conversions on small maps, 1x1 products
against oneDNN's 1x1 convolutions, permuting copies against expanded steps) the cheapest
predicted plan is not the fastest. For frozen (inference) plans, :func:`fastest_plan` runs the
few plans that differ in the choices the tables decide -- for NCHW inputs the native and the
converting plan, each with the tables' 1x1 choices and with every 1x1 step as a conv; in both
layouts the plan without permuting copies -- on a random input of the layer's shape,
round-robin, and keeps the fastest. Every candidate computes the same convolution (the
executor is exact for any plan).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence

import torch

from ..timing import time_round_robin
from .cost import CostTable, KindCost
from .execute import _CHANNELS_LAST
from .geometry import ConvGeometry
from .network import ConvNetwork
from .plan import ConvPlan, plan_conv
from .steps import DataStep, FactorStep

__all__ = [
    "AUTOTUNE_REPEATS",
    "AUTOTUNE_SECONDS",
    "autotune_enabled",
    "candidate_plans",
    "fastest_plan",
]

log = logging.getLogger(__name__)

# round-robin repeats per candidate: the choice is between plans that differ by 5-50%
AUTOTUNE_REPEATS = 5
# and at least this much wall time of rounds: five rounds of batch-1 layers (0.2-0.5 ms) picked
# each of three plans within 10% of each other in three tries (tt 128@28 NCHW, 2 threads)
AUTOTUNE_SECONDS = 0.05
_NEVER = KindCost(1.0, 1.0, 1.0)  # a product priced out of every choice
_DEAR_COPY = 1e-6  # seconds per element: a permuting copy priced out where a step can avoid it


def autotune_enabled(tables: Mapping[str, CostTable]) -> bool:
    """Timing candidates is on with measured tables (not the built-in ones the test suite and
    ``TNCONV_CALIBRATION=default`` use: plans stay deterministic there) unless
    ``TNCONV_AUTOTUNE=0``."""
    if os.environ.get("TNCONV_AUTOTUNE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return all(t.source != "default" for t in tables.values())


def candidate_plans(
    network: ConvNetwork,
    geometry: ConvGeometry,
    shape: tuple[int, ...],
    layout: str,
    tables: Mapping[str, CostTable],
) -> list[ConvPlan]:
    """The frozen plans worth timing for inputs of ``shape`` in ``layout``: the tables' choice
    first, then (deduplicated) for NCHW inputs the native and the converting plan, each with the
    tables' 1x1 choices and with every 1x1 step as a conv, and for both layouts the plan with
    every permuting copy priced out (its steps expanded with identity blocks where the copies
    were, within :data:`~tnconv.contraction.cost.EXPAND_SLACK`). Each is a complete, exact plan.

    Channels-last inputs otherwise keep the tables' choices: timing their one other alternative
    (every 1x1 step as a conv) gained nothing over four layer shapes (the channels-last 1x1
    rules of :func:`~tnconv.contraction.cost.pointwise_seconds` already settle it), while for
    NCHW inputs the native-or-convert decision was mispriced by up to 2x (a thin 3x3 conv on a
    56x56 NCHW map). Copies against identity blocks is a trade the linear model prices poorly
    too (a semi-tensor Tucker-2 layer predicted 15% slower expanded, measured faster)."""
    plans: list[ConvPlan] = []
    seen: set[tuple] = set()
    no_copies = {k: dataclasses.replace(t, copy=_DEAR_COPY) for k, t in tables.items()}
    converts: tuple[bool | None, ...] = (None,)
    variants: list[tuple[Mapping[str, CostTable], bool | None]] = [(tables, None)]
    if layout == "nchw":
        converts = (False, True)
        no_products = {k: dataclasses.replace(t, matmul=_NEVER) for k, t in tables.items()}
        variants += [(t, c) for t in (tables, no_products) for c in converts]
    variants += [(no_copies, c) for c in converts]
    for tabs, convert in variants:
        plan = plan_conv(
            network, geometry, shape, layout=layout, tables=tabs, frozen=True, convert=convert
        )
        key = (plan.convert, tuple(_unpriced(s) for s in plan.steps), plan.final_perm)
        if key not in seen:
            seen.add(key)
            plans.append(plan)
    return plans


def _unpriced(step: DataStep | FactorStep) -> DataStep | FactorStep:
    """A step without its predicted seconds (plans differing only in pricing are one plan)."""
    return dataclasses.replace(step, seconds=0.0) if isinstance(step, DataStep) else step


def fastest_plan(
    plans: Sequence[ConvPlan],
    factors: Sequence[torch.Tensor],
    layout: str,
    repeats: int = AUTOTUNE_REPEATS,
    min_seconds: float = AUTOTUNE_SECONDS,
) -> ConvPlan:
    """The plan of ``plans`` (for one input shape) that runs fastest here, timed round-robin on a
    random input with ``factors`` folded for each (inference: no gradient; ``repeats`` rounds
    and ``min_seconds`` of them at least). Ties and a single plan return the first."""
    if len(plans) < 2:
        return plans[0]
    first = plans[0]
    nhwc = layout == "nhwc"
    with torch.no_grad():
        factors = [f.detach() for f in factors]
        x = torch.randn(first.input_shape, dtype=factors[0].dtype, device=factors[0].device)
        if nhwc:
            x = x.contiguous(memory_format=_CHANNELS_LAST[x.dim()])
        fns = {}
        for i, plan in enumerate(plans):
            folded = plan.fold_factors(factors)
            run = plan.runner(nhwc)
            fns[str(i)] = lambda run=run, folded=folded: run(x, factors, None, folded, None)
        ms = time_round_robin(fns, repeats, min_seconds=min_seconds)
    best = min(range(len(plans)), key=lambda i: (ms[str(i)], i))
    if best:
        log.debug(
            "autotune %s %s: candidate %d of %d (%.3f ms) over the tables' choice (%.3f ms)",
            first.input_shape,
            layout,
            best,
            len(plans),
            ms[str(best)],
            ms["0"],
        )
    if not math.isfinite(ms[str(best)]):
        return first
    return plans[best]
