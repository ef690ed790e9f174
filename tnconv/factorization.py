"""Factorization: the factors of a decomposed kernel, the einsum tying them, and its metadata.

A kernel has the modes (T, S, *k): out channels, in channels and 0 to 3 spatial modes (a Linear
layer's (T, S), a Conv1d's (T, S, k), a Conv2d's (T, S, kh, kw), a Conv3d's (T, S, kd, kh, kw)).
A factorization describes it as an einsum network: ``equation`` lists one index string per
factor and, after ``->``, the kernel indices. ``modes`` groups the output indices into the kernel
modes; by default each mode is one index, in order (``"atb,bsc,chd,dwa->tshw"`` has modes
``("t", "s", "h", "w")``). A channel mode may be a group of several indices (a tensorised channel,
e.g. ``("tu", "s", "h", "w")``, row-major), the spatial modes are always single indices, each
carried by exactly one factor.

A grouped convolution's kernel (T, S / G, *k) is a network whose ``group`` index (of size G)
leads the T mode and is carried by every factor: one network per group, sharing its structure,
with the group as a batch-like index. The layer feeds it the input channels as (G, S / G).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import opt_einsum
import torch

from ._modes import check_not_meta
from .errors import EquationError, InvalidWeightError

__all__ = ["Factorization", "contract_contiguous", "parse_equation", "validate_weight"]

KernelShape = tuple[int, ...]

MODE_NAMES = {2: "(T, S)", 3: "(T, S, k)", 4: "(T, S, kh, kw)", 5: "(T, S, kd, kh, kw)"}


def parse_equation(equation: str) -> tuple[list[str], str]:
    """Split ``"ab,bc->ac"`` into ``(["ab", "bc"], "ac")``; requires an explicit ``->``."""
    if not isinstance(equation, str) or "->" not in equation:
        raise EquationError(f"equation {equation!r} must be an explicit einsum 'in,...->out'")
    lhs, out = equation.replace(" ", "").split("->")
    inputs = lhs.split(",")
    for term in [*inputs, out]:
        if not all(c.isalpha() for c in term):
            raise EquationError(f"equation {equation!r}: indices must be letters (got {term!r})")
    return inputs, out


@functools.lru_cache(maxsize=256)
def _contraction_path(equation: str, shapes: tuple[tuple[int, ...], ...]) -> list[tuple[int, ...]]:
    path, _ = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize="auto")
    return [tuple(p) for p in path]


def contract_contiguous(equation: str, operands: Sequence[torch.Tensor]) -> torch.Tensor:
    """``einsum(equation, *operands)`` as a contiguous tensor, in opt_einsum's pairwise order.

    A plain contraction usually ends in a transposed layout (the last tensordot lays out its
    operands' free indices in their order, then permutes), and copying a kernel-sized tensor
    out of such a layout cost 3-6x the contraction itself (measured on 256x256x3x3 kernels).
    The last pairwise step here is a matmul whose operands are permuted instead (they are
    smaller than its output), so the result is written in the requested order directly.
    """
    inputs, out = parse_equation(equation)
    path = _contraction_path(equation, tuple(tuple(op.shape) for op in operands))
    ops, terms = list(operands), list(inputs)
    for step, positions in enumerate(path):
        picked = sorted(positions, reverse=True)
        xs = [ops.pop(p) for p in picked][::-1]
        ts = [terms.pop(p) for p in picked][::-1]
        if step == len(path) - 1:
            return _last_contraction(ts, xs, out)
        needed = set(out).union(*terms)
        term = "".join(dict.fromkeys(c for t in ts for c in t if c in needed))
        ops.append(torch.einsum(",".join(ts) + "->" + term, *xs))
        terms.append(term)
    return torch.einsum(equation, *operands).contiguous()  # no pairwise step (one operand)


def _last_contraction(terms: list[str], ops: list[torch.Tensor], out: str) -> torch.Tensor:
    """The final step: one matmul laid out as ``out`` when the indices allow, else einsum."""
    if len(terms) == 2:
        pair = list(zip(terms, ops, strict=True))
        for (tx, x), (ty, y) in (pair, pair[::-1]):  # out may list either operand's indices first
            shared = [c for c in tx if c in ty]
            fx = [c for c in out if c in tx]
            fy = [c for c in out if c in ty]
            whole = set(tx) == set(fx) | set(shared) and set(ty) == set(fy) | set(shared)
            if whole and not set(shared) & set(out) and list(out) == fx + fy:
                sizes = dict(zip(tx, x.shape, strict=True)) | dict(zip(ty, y.shape, strict=True))
                k = math.prod(sizes[c] for c in shared)
                left = x.permute([tx.index(c) for c in fx + shared]).reshape(-1, k)
                right = y.permute([ty.index(c) for c in shared + fy]).reshape(k, -1)
                return (left @ right).reshape([sizes[c] for c in out])
    return torch.einsum(",".join(terms) + "->" + out, *ops).contiguous()


def validate_weight(weight: Any, orders: Sequence[int] = (4,)) -> torch.Tensor:
    """Check a kernel and return it as a torch tensor (numpy arrays are accepted).

    Raises :class:`InvalidWeightError` for anything that is not a finite, non-empty floating
    tensor of one of ``orders`` (4: (T, S, kh, kw); 2, 3 and 5 for Linear, 1-D and 3-D kernels),
    and for a tensor on the meta device (no values). Inference tensors (made under
    ``torch.inference_mode``) are accepted as they are.
    """
    if not isinstance(weight, torch.Tensor):
        try:
            weight = torch.as_tensor(weight)
        except Exception as exc:
            raise InvalidWeightError(
                f"weight of type {type(weight).__name__} cannot be converted to a tensor"
            ) from exc
    if weight.ndim not in orders:
        expected = " or ".join(f"{k}-D {MODE_NAMES.get(k, '')}".strip() for k in orders)
        raise InvalidWeightError(
            f"weight must be {expected}; got {weight.ndim}-D shape {tuple(weight.shape)}"
        )
    if any(n == 0 for n in weight.shape):
        raise InvalidWeightError(f"weight has a zero-sized mode: shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise InvalidWeightError(f"weight must be floating point; got dtype {weight.dtype}")
    check_not_meta(weight, "weight")
    # min and max propagate NaN and are finite exactly when every entry is: one reduction
    # without a boolean temporary of the kernel's size (4x cheaper than isfinite().all())
    low, high = torch.aminmax(weight.detach())
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        bad = int((~torch.isfinite(weight)).sum())
        raise InvalidWeightError(f"weight contains {bad} NaN or Inf value(s)")
    return weight


@dataclass
class Factorization:
    """Factors of a kernel and the einsum equation that rebuilds it.

    Attributes:
        factors: the factor tensors, in the order of the equation's operands.
        equation: einsum over the factors whose output is the kernel's indices.
        shape: kernel shape (T, S, *k) with 0 to 3 spatial modes; (T, S / G, *k) when grouped.
        ranks: the bond sizes, in the method's documented order.
        method: registry name of the decomposition that produced it ("" if built by hand).
        modes: index groups of the kernel modes; defaults to one output index per mode.
        info: free-form facts from the fit (achieved error, chosen shift, ...), JSON-friendly.
        group: the group index of a grouped kernel ("" if not grouped): the first index of the
            T mode, carried by every factor; its size is the number of groups G.
    """

    factors: list[torch.Tensor]
    equation: str
    shape: KernelShape
    ranks: tuple[int, ...]
    method: str = ""
    modes: tuple[str, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    group: str = ""

    def __post_init__(self) -> None:
        self.factors = list(self.factors)
        self.shape = tuple(int(n) for n in self.shape)  # type: ignore[assignment]
        self.ranks = tuple(int(r) for r in self.ranks)
        inputs, out = parse_equation(self.equation)
        if self.modes is None:
            if len(out) != len(self.shape):
                raise EquationError(
                    f"equation {self.equation!r} has {len(out)} output indices for a kernel of "
                    f"{len(self.shape)} modes; give `modes` to group them into the kernel modes"
                )
            self.modes = tuple(out)
        self.modes = tuple(self.modes)  # type: ignore[assignment]
        self._check(inputs, out)

    # -- validation -------------------------------------------------------------------------
    def _check(self, inputs: list[str], out: str) -> None:
        eq = self.equation
        order = len(self.shape)
        if order not in MODE_NAMES:
            raise EquationError(
                f"shape must have 2 to 5 modes (T, S and 0 to 3 spatial); got {self.shape}"
            )
        if len(inputs) != len(self.factors):
            raise EquationError(
                f"equation {eq!r} has {len(inputs)} operands but {len(self.factors)} factors given"
            )
        if len(set(out)) != len(out):
            raise EquationError(f"equation {eq!r}: output indices must be distinct")
        modes = self.modes
        assert modes is not None
        if len(modes) != order or "".join(modes) != out or any(len(m) == 0 for m in modes):
            raise EquationError(f"modes {modes} must split the output {out!r} into {order} groups")
        if any(len(m) != 1 for m in modes[2:]):
            raise EquationError(f"spatial modes must be single indices; got {modes[2:]}")
        if self.group and (len(self.group) != 1 or not modes[0].startswith(self.group)):
            raise EquationError(
                f"group index {self.group!r} must be one index leading the T mode {modes[0]!r}"
            )
        if self.group and len(modes[0]) < 2:
            raise EquationError(f"grouped T mode {modes[0]!r} needs indices besides the group")
        sizes: dict[str, int] = {}
        for term, factor in zip(inputs, self.factors, strict=True):
            if not isinstance(factor, torch.Tensor):
                raise EquationError(f"factor for {term!r} is {type(factor).__name__}, not a tensor")
            if factor.ndim != len(term) or len(set(term)) != len(term):
                raise EquationError(
                    f"operand {term!r} does not match factor of shape {tuple(factor.shape)}"
                )
            for c, n in zip(term, factor.shape, strict=True):
                if sizes.setdefault(c, int(n)) != n:
                    raise EquationError(f"index {c!r} has sizes {sizes[c]} and {n} in {eq!r}")
        counts = Counter(c for term in inputs for c in term)
        for c in out:
            if c not in sizes:
                raise EquationError(f"output index {c!r} of {eq!r} is in no factor")
        for c, k in counts.items():
            if c not in out and k < 2:
                raise EquationError(f"index {c!r} of {eq!r} is summed inside one factor only")
        if self.group and any(self.group not in term for term in inputs):
            raise EquationError(f"group index {self.group!r} of {eq!r} must be in every factor")
        for c in modes[2:]:
            if counts[c] != 1:
                raise EquationError(f"spatial index {c!r} of {eq!r} must be in exactly one factor")
        for mode, n in zip(modes, self.shape, strict=True):
            if math.prod(sizes[c] for c in mode) != n:
                raise EquationError(
                    f"mode {mode!r} has size {math.prod(sizes[c] for c in mode)}, shape says {n}"
                )

    # -- derived quantities ------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        """Total number of entries of the factors."""
        return sum(int(f.numel()) for f in self.factors)

    @property
    def dense_params(self) -> int:
        """Number of entries of the dense kernel (T * S * kh * kw for a 2-D conv)."""
        return math.prod(self.shape)

    @property
    def spatial_dims(self) -> int:
        """Number of spatial modes: 0 (Linear), 1, 2 or 3."""
        return len(self.shape) - 2

    @property
    def groups(self) -> int:
        """Number of groups G (1 unless grouped)."""
        return self.index_sizes()[self.group] if self.group else 1

    @property
    def compression(self) -> float:
        """dense_params / num_params (above 1 means smaller than the dense kernel)."""
        return self.dense_params / self.num_params

    @property
    def dtype(self) -> torch.dtype:
        return self.factors[0].dtype

    def index_sizes(self) -> dict[str, int]:
        """Size of every index of the equation."""
        inputs, _ = parse_equation(self.equation)
        return {
            c: int(n)
            for t, f in zip(inputs, self.factors, strict=True)
            for c, n in zip(t, f.shape, strict=True)
        }

    def to_tensor(self) -> torch.Tensor:
        """The dense kernel (T, S, *k) this factorization represents (differentiable)."""
        return contract_contiguous(self.equation, self.factors).reshape(self.shape)

    def relative_error(self, weight: Any) -> float:
        """||weight - to_tensor()||_F / ||weight||_F, computed in float64.

        For an all-zero ``weight`` it is 0 when the factorization is zero too (0 vs 0) and
        ``inf`` otherwise, never NaN.
        """
        w = validate_weight(weight, (len(self.shape),))
        if tuple(w.shape) != self.shape:
            raise InvalidWeightError(f"weight shape {tuple(w.shape)} differs from {self.shape}")
        w64 = w.detach().to(torch.float64)
        approx = self.to_tensor().detach().to(device=w64.device, dtype=torch.float64)
        diff = float(torch.linalg.vector_norm(w64 - approx))
        norm = float(torch.linalg.vector_norm(w64))
        if norm == 0.0:
            return 0.0 if diff == 0.0 else math.inf
        return diff / norm

    def sensitivity(self) -> float:
        """First-order noise gain of the factors: ``sum_n ||dW/dG_n||_F^2``
        (the sum of :meth:`environment_norms`).

        iid noise of variance ``sigma^2`` on every factor entry changes the kernel by
        ``E ||dW||_F^2 ~= sigma^2 * sensitivity()`` (to first order in sigma). For CP it is the
        ``ss = sum_n I_n ||G_{!=n}||_F^2`` of Phan et al. (ECCV 2020); here it is computed from the
        equation alone, for any network linear in each factor (hyperedges and grouped modes
        included): ``||dW/dG_n||^2`` is the squared norm of G_n's environment (the network with
        G_n removed, keeping G_n's indices open), contracted with itself as one scalar einsum
        so the environment is never materialised; an index only G_n carries contributes its size.
        Computed in float64.
        """
        return float(sum(self.environment_norms()))

    def environment_norms(self) -> list[float]:
        """``||dW/dG_n||_F^2`` for every factor G_n, in order (float64): the squared Frobenius
        norm of the kernel's Jacobian with respect to one factor, which for a network linear in
        each factor is G_n's environment (the network without G_n, its indices left open)."""
        inputs, out = parse_equation(self.equation)
        sizes = self.index_sizes()
        factors = [f.detach().to(torch.float64) for f in self.factors]
        norms: list[float] = []
        for n, term in enumerate(inputs):
            others = [m for m in range(len(inputs)) if m != n]
            carried = {c for m in others for c in inputs[m]}
            kept = (set(out) | set(term)) & carried  # the environment's open indices
            alone = math.prod(sizes[c] for c in term if c not in carried)
            if not others:
                norms.append(float(alone))
                continue
            # the environment twice: summed indices get fresh (primed) names in the copy
            fresh = iter(
                opt_einsum.get_symbol(k)
                for k in range(len(sizes) + 1000)
                if opt_einsum.get_symbol(k) not in sizes
            )
            primed = {c: next(fresh) for c in sorted(carried - kept)}
            terms = [inputs[m] for m in others]
            terms += ["".join(primed.get(c, c) for c in inputs[m]) for m in others]
            operands = [factors[m] for m in others] * 2
            norm_sq = opt_einsum.contract(
                ",".join(terms) + "->", *operands, backend="torch", optimize="auto"
            )
            norms.append(alone * float(norm_sq))
        return norms

    def with_factors(self, factors: Sequence[torch.Tensor]) -> Factorization:
        """The same network (equation, shape, ranks, method, modes, info, group) with other
        factors."""
        return Factorization(
            list(factors),
            self.equation,
            self.shape,
            self.ranks,
            self.method,
            self.modes,
            dict(self.info),
            self.group,
        )

    def to(self, *args: Any, **kwargs: Any) -> Factorization:
        """Copy with every factor moved / cast by ``Tensor.to(*args, **kwargs)``."""
        return self.with_factors([f.to(*args, **kwargs) for f in self.factors])

    def detach(self) -> Factorization:
        """Copy whose factors are detached clones (no autograd history, no shared storage)."""
        return self.with_factors([f.detach().clone() for f in self.factors])

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(f.shape)) for f in self.factors)
        group = f", group={self.group!r}" if self.group else ""
        return (
            f"Factorization(method={self.method!r}, shape={self.shape}, ranks={self.ranks}, "
            f"equation={self.equation!r}, factors=[{shapes}], params={self.num_params}/"
            f"{self.dense_params}{group})"
        )


def factor_shapes(factors: Sequence[torch.Tensor]) -> list[tuple[int, ...]]:
    """Shapes of ``factors`` as tuples (handy for logging and specs)."""
    return [tuple(int(n) for n in f.shape) for f in factors]
