"""The conv-aware opt_einsum path optimizer: an exact subset DP that prices every step touching
the feature map at its true resolution (:class:`ConvPathOptimizer`)."""

from __future__ import annotations

import math
from typing import Any

from opt_einsum.paths import PathOptimizer, ssa_to_linear

from .cost import MEMORY_WEIGHT, CostTable, step_seconds
from .network import ConvNetwork

__all__ = ["FOLD_WEIGHT", "ConvPathOptimizer"]

# the cost of a frozen plan's weights-only multiply-add, relative to one executed per forward
# (seconds with a cost table, multiply-adds without): a tie-breaker, never a reason to run more
# per forward
FOLD_WEIGHT = 1e-18


class ConvPathOptimizer(PathOptimizer):
    """opt_einsum path optimizer for a conv-einsum whose operand 0 is the feature map.

    Exact dynamic programming over subsets (a conv kernel has few factors). A step that touches
    the feature map multiplies ``B * H_out * W_out`` times the channel sizes it multiplies (at
    the resolution before the factor carrying ``h`` / ``w`` and after it, per axis). With a
    :class:`~tnconv.contraction.cost.CostTable` a step is priced in predicted seconds (its kind's
    call overhead, multiply-adds and elements moved, the cheaper of batch-folding and grouping
    its fold indices, see :func:`step_seconds`); factor-only steps cost an einsum call each, or
    nothing when ``frozen`` (folded once and reused). Without a table a step costs its
    multiply-adds plus ``memory_weight`` x the elements it moves.
    """

    def __init__(
        self,
        network: ConvNetwork,
        in_hw: tuple[int, ...],
        out_hw: tuple[int, ...],
        memory_weight: float = MEMORY_WEIGHT,
        table: CostTable | None = None,
        frozen: bool = False,
    ) -> None:
        self.network = network
        self.in_hw = in_hw
        self.out_hw = out_hw
        self.memory_weight = memory_weight
        self.table = table
        self.frozen = frozen
        self.cost: float = math.nan  # cost of the last path found

    def __call__(
        self,
        inputs: list[frozenset[str]],
        output: frozenset[str],
        size_dict: dict[str, int],
        memory_limit: int | None = None,
    ) -> list[tuple[int, ...]]:
        net = self.network
        n = len(inputs)
        letters = sorted(set().union(*inputs) | set(output))
        bit = {c: 1 << i for i, c in enumerate(letters)}
        sizes = {c: size_dict[c] for c in letters}

        def mask_of(chars: Any) -> int:
            m = 0
            for c in chars:
                m |= bit[c]
            return m

        op_mask = [mask_of(t) for t in inputs]
        out_mask = mask_of(output)
        skip = mask_of((net.batch, *net.axes))  # the feature map's own axes
        # per executor axis: the kernel index's bit and the operand carrying it (none: -1)
        axis_bits = [0 if c is None else bit[c] for c in net.spatial]
        coupled = mask_of(net.coupled)  # live until the data step that consumes them
        owners = [next(i for i, m in enumerate(op_mask) if m & b) if b else -1 for b in axis_bits]
        batch = size_dict[net.batch]
        full = (1 << n) - 1

        union: dict[int, int] = {}

        def indices(s: int) -> int:
            if s not in union:
                m, k = 0, 0
                while s >> k:
                    if s >> k & 1:
                        m |= op_mask[k]
                    k += 1
                union[s] = m
            return union[s]

        def open_of(s: int) -> int:
            return indices(s) & (indices(full & ~s) | out_mask | coupled)

        prod_cache: dict[int, int] = {}

        def prod(m: int) -> int:
            if m not in prod_cache:
                p = 1
                for c in letters:
                    if m & bit[c]:
                        p *= sizes[c]
                prod_cache[m] = p
            return prod_cache[m]

        table = self.table

        def factor_step_cost(a: int, b: int) -> float:
            macs = prod(open_of(a) | open_of(b))
            if self.frozen:
                # contracted once, reused by every forward: nearly free, but among orders of
                # equal per-forward cost the cheapest folding wins (an arbitrary one folded a
                # TT-matrix through an 8-GFLOP outer product)
                return FOLD_WEIGHT * macs
            if table is None:
                return macs
            return table.einsum + table.pointwise.mac * macs

        # factor-only sub-networks: classic subset DP on contraction counts
        factor_ids = list(range(1, n))
        fcost: dict[int, float] = {}
        fsplit: dict[int, tuple[int, int]] = {}
        for k in factor_ids:
            fcost[1 << k] = 0.0
        subsets = sorted(range(1, 1 << n), key=lambda s: bin(s).count("1"))
        for s in subsets:
            if s & 1 or s in fcost:
                continue
            low = s & -s
            best = math.inf
            sub = (s - 1) & s
            while sub:
                if sub & low:  # each unordered split once
                    rest = s & ~sub
                    c = fcost[sub] + fcost[rest] + factor_step_cost(sub, rest)
                    if c < best:
                        best, fsplit[s] = c, (sub, rest)
                sub = (sub - 1) & s
            fcost[s] = best

        def data_step_cost(t: int, u: int) -> float:
            d = open_of(t) & ~skip & ~coupled
            fi = open_of(u)
            need = open_of(t | u) & ~skip & ~coupled
            contracted = d & fi & ~need
            grouped = d & fi & need
            new = fi & ~d & ~coupled
            fold = d & ~fi
            extent = before = after = 1
            for a, (b, o) in enumerate(zip(axis_bits, owners, strict=True)):
                if fi & b:
                    extent *= sizes[net.spatial[a]]  # type: ignore[index]
                done_before = o >= 0 and t >> o & 1
                done_after = o >= 0 and (t | u) >> o & 1
                before *= self.out_hw[a] if done_before else self.in_hw[a]
                after *= self.out_hw[a] if done_after else self.in_hw[a]
            out_elems = batch * prod(fold) * prod(grouped) * prod(new) * after
            macs = out_elems * prod(contracted) * extent
            in_elems = batch * prod(d) * before
            if table is not None:
                spatial = extent > 1
                return step_seconds(
                    table,
                    prod(fold),
                    prod(grouped),
                    spatial,
                    macs,
                    in_elems,
                    out_elems,
                    channels=(prod(contracted), prod(new)),
                )[0]
            return macs + self.memory_weight * (in_elems + out_elems)

        dcost: dict[int, float] = {1: 0.0}
        dchoice: dict[int, tuple[int, int]] = {}
        for s in subsets:
            if not s & 1 or s == 1:
                continue
            factors = s & ~1
            best = math.inf
            sub = factors
            while sub:
                prev = s & ~sub
                c = dcost[prev] + fcost[sub] + data_step_cost(prev, sub)
                if c < best:
                    best, dchoice[s] = c, (prev, sub)
                sub = (sub - 1) & factors
            dcost[s] = best
        self.cost = dcost[full]

        # rebuild the order as an SSA path, then as opt_einsum's linear path
        ssa: list[tuple[int, int]] = []
        next_id = [n]

        def emit_factors(s: int) -> int:
            if s & (s - 1) == 0:
                return s.bit_length() - 1
            a, b = fsplit[s]
            ia, ib = emit_factors(a), emit_factors(b)
            ssa.append((ia, ib))
            next_id[0] += 1
            return next_id[0] - 1

        def emit_data(s: int) -> int:
            if s == 1:
                return 0
            prev, sub = dchoice[s]
            i_prev = emit_data(prev)
            i_sub = emit_factors(sub)
            ssa.append((i_prev, i_sub))
            next_id[0] += 1
            return next_id[0] - 1

        emit_data(full)
        return ssa_to_linear(ssa)
