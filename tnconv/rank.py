"""Rank specifications: parsing, validation and the searches that turn a budget into ranks.

A caller asks for a factorization in exactly one of three ways:

* ``rank``  -- an int (every bond), a tuple (one value per bond, in the method's documented
  order) or a float in (0, 1) which means the same as ``ratio``;
* ``eps``   -- a bound on the relative Frobenius error, in (0, 1);
* ``ratio`` -- a share of the dense kernel's parameters, in (0, 1]: the factorization with the
  smallest error whose factors fit in it.

``parse_rank_spec`` validates that choice with pydantic models and returns one of
:class:`FixedRank`, :class:`ErrorBound` or :class:`ParamRatio`. The search helpers at the end are
shared by the decompositions; they know nothing about any particular algebra.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import RankSpecError

__all__ = [
    "ErrorBound",
    "FixedRank",
    "ParamRatio",
    "RankSpec",
    "bisect_eps",
    "largest_fitting",
    "parse_rank_spec",
]

PositiveInt = Annotated[int, Field(gt=0, strict=True)]
T = TypeVar("T")


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FixedRank(_Spec):
    """Explicit ranks: one int for every bond, or one int per bond."""

    kind: Literal["rank"] = "rank"
    ranks: PositiveInt | tuple[PositiveInt, ...]


class ErrorBound(_Spec):
    """Smallest factorization whose relative Frobenius error is at most ``eps``."""

    kind: Literal["eps"] = "eps"
    eps: Annotated[float, Field(gt=0.0, lt=1.0, allow_inf_nan=False)]


class ParamRatio(_Spec):
    """Smallest error among factorizations with at most ``ratio`` x dense parameters."""

    kind: Literal["ratio"] = "ratio"
    ratio: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]


RankSpec = FixedRank | ErrorBound | ParamRatio


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integral(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _validated(model: type[_Spec], field: str, value: Any, allowed: str) -> RankSpec:
    try:
        return model.model_validate({field: value})  # type: ignore[return-value]
    except ValidationError as exc:
        raise RankSpecError(f"{field}={value!r} is invalid: {field} must be {allowed}") from exc


_RANK_ALLOWED = (
    "a positive int (every bond), a tuple of positive ints (one per bond) "
    "or a float in (0, 1) meaning a share of the dense parameters"
)


def _parse_rank(rank: Any) -> RankSpec:
    if _is_integral(rank):
        return _validated(FixedRank, "ranks", int(rank), _RANK_ALLOWED)
    if _is_real(rank):
        value = float(rank)
        if math.isfinite(value) and 0.0 < value < 1.0:
            return ParamRatio(ratio=value)
        raise RankSpecError(f"rank={rank!r} is invalid: rank must be {_RANK_ALLOWED}")
    if isinstance(rank, Sequence) and not isinstance(rank, (str, bytes)):
        if len(rank) == 0:
            raise RankSpecError("rank=() is invalid: a rank tuple needs at least one value")
        if not all(_is_integral(r) for r in rank):
            raise RankSpecError(
                f"rank={tuple(rank)!r} is invalid: every entry must be a positive int"
            )
        return _validated(FixedRank, "ranks", tuple(int(r) for r in rank), _RANK_ALLOWED)
    raise RankSpecError(
        f"rank={rank!r} (type {type(rank).__name__}) is invalid: rank must be {_RANK_ALLOWED}"
    )


def parse_rank_spec(rank: Any = None, eps: Any = None, ratio: Any = None) -> RankSpec:
    """Validate a rank / eps / ratio request and return its model.

    Exactly one of the three must be given. Raises :class:`RankSpecError` (a ``ValueError``)
    naming the offending field and its allowed range.
    """
    given = [name for name, v in (("rank", rank), ("eps", eps), ("ratio", ratio)) if v is not None]
    if len(given) != 1:
        if not given:
            raise RankSpecError("give exactly one of rank=, eps= or ratio= (none was given)")
        raise RankSpecError(f"give exactly one of rank=, eps= or ratio= (got {', '.join(given)})")
    if rank is not None:
        return _parse_rank(rank)
    if eps is not None:
        if not _is_real(eps):
            raise RankSpecError(f"eps={eps!r} is invalid: eps must be a real number in (0, 1)")
        return _validated(ErrorBound, "eps", float(eps), "a real number in (0, 1)")
    if not _is_real(ratio):
        raise RankSpecError(f"ratio={ratio!r} is invalid: ratio must be a real number in (0, 1]")
    return _validated(ParamRatio, "ratio", float(ratio), "a real number in (0, 1]")


def param_budget(ratio: float, dense_params: int) -> int:
    """Largest parameter count allowed by ``ratio`` of a dense kernel with ``dense_params``."""
    # The tiny slack keeps ratio=0.25 of 400 at 100 despite float rounding.
    return math.floor(ratio * dense_params * (1.0 + 1e-12))


def largest_fitting(lo: int, hi: int, fits: Callable[[int], bool]) -> int | None:
    """Largest ``n`` in ``[lo, hi]`` with ``fits(n)``, for a monotone ``fits`` (True, then False).

    Returns ``None`` when even ``lo`` does not fit.
    """
    if hi < lo or not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def bisect_eps(
    fit: Callable[[float], T],
    size: Callable[[T], int],
    error: Callable[[T], float],
    budget: int,
    *,
    lo: float = 1e-7,
    hi: float = 1.0 - 1e-9,
    steps: int = 30,
) -> T | None:
    """Lowest-error result of ``fit(eps)`` whose ``size`` fits ``budget``, searched over eps.

    ``fit`` is an error-bounded fitter whose size shrinks (roughly monotonically) as eps grows.
    Bisection on log(eps) finds the smallest eps that fits; since sequential truncation is not
    exactly monotone, every fitting candidate seen is kept and the one with the lowest measured
    error is returned. ``None`` if even the loosest eps does not fit.
    """
    best: T | None = None
    best_err = math.inf

    def consider(candidate: T) -> bool:
        nonlocal best, best_err
        if size(candidate) > budget:
            return False
        err = error(candidate)
        if err < best_err:
            best, best_err = candidate, err
        return True

    if consider(fit(lo)):
        return best
    if not consider(fit(hi)):
        return None
    log_lo, log_hi = math.log(lo), math.log(hi)
    for _ in range(steps):
        mid = 0.5 * (log_lo + log_hi)
        if consider(fit(math.exp(mid))):
            log_hi = mid
        else:
            log_lo = mid
        if log_hi - log_lo < 1e-4:
            break
    return best
