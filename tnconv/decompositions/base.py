"""The abstract :class:`Decomposition`: one rank-spec front door over a family's algebra.

A concrete decomposition implements only its algebra:

* :meth:`Decomposition.bond_ranks` -- expand an int / tuple rank into the family's bond tuple and
  cap it at what the modes can carry;
* :meth:`Decomposition.fit` -- fit factors at given ranks;
* :meth:`Decomposition.num_params_at` -- parameter count at given ranks (for budget searches);
* optionally :meth:`Decomposition.fit_eps` / :meth:`Decomposition.fit_ratio` when the family has
  something better than the generic searches here (SVD truncation with an error guarantee, say).

:meth:`Decomposition.factorize` does everything else: input validation, the rank / eps / ratio
choice, float64 arithmetic, casting back to the caller's dtype and checking promised bounds.
"""

from __future__ import annotations

import logging
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from .._modes import plain_tensors, tensor_version
from ..errors import (
    BudgetError,
    InvalidWeightError,
    KernelOrderError,
    OptionError,
    RankSpecError,
)
from ..factorization import MODE_NAMES, Factorization, KernelShape, validate_weight
from ..rank import (
    ErrorBound,
    FixedRank,
    ParamRatio,
    bisect_eps,
    largest_fitting,
    param_budget,
    parse_rank_spec,
)
from . import lifting, output_aware
from ._linalg import balance_scales, cached

if TYPE_CHECKING:
    from ..statistics import InputStatistics

__all__ = ["Decomposition", "NoOptions"]


def _float64(w: torch.Tensor) -> torch.Tensor:
    """``w`` (T, S, kh, kw) detached, in float64, as an ordinary tensor: a float64 inference
    tensor (returned as is by ``.to``) is cloned, so the spectra memoised on the copy
    (:func:`._linalg.cached`, keyed on the version counter) are kept for it too. Call it out of
    inference mode (:func:`tnconv._modes.plain_tensors`)."""
    w64 = w.detach().to(torch.float64)
    return w64.clone() if w64.is_inference() else w64


log = logging.getLogger(__name__)

# factorize's arguments that say how the kernel is laid out, not how the family fits it: callers
# passing a layer's options through (compress, budget allocation) keep them beside the method's
LAYOUT_KEYS = ("groups", "tensorize")


def _orders_of(name: str) -> tuple[int, ...]:
    from ..registry import get

    try:
        return get(name).kernel_orders
    except Exception:  # a broken plugin does not hide the others
        return ()


class NoOptions(BaseModel):
    """Options model of a decomposition without options; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Decomposition(ABC):
    """A tensor-network family for conv kernels (T, S, kh, kw).

    Subclasses set ``rank_order`` (documentation of the bond tuple), ``guarantees_eps`` (True when
    ``fit_eps`` provably meets ``relative_error <= eps``), ``Options`` (a pydantic model of the
    keyword options ``factorize`` accepts) and, for training-time methods, ``training_time``.
    """

    name: ClassVar[str] = ""
    rank_order: ClassVar[str] = ""
    guarantees_eps: ClassVar[bool] = False
    Options: ClassVar[type[BaseModel]] = NoOptions
    # True for methods whose real work happens while the network trains (``admm-<base>``): their
    # ``factorize`` is the base method's, and ``tnconv list`` marks them
    training_time: ClassVar[bool] = False
    # the kernel orders the family has a meaning for: 2 (Linear), 3 (Conv1d), 4 (Conv2d),
    # 5 (Conv3d); the family's algebra is written for 4 and :mod:`.lifting` states what it
    # does with the others. A family without a meaning for an order leaves it out.
    kernel_orders: ClassVar[tuple[int, ...]] = (2, 3, 4, 5)

    # -- the public entry point -------------------------------------------------------------
    def factorize(
        self,
        weight: Any,
        rank: Any = None,
        *,
        eps: Any = None,
        ratio: Any = None,
        statistics: InputStatistics | None = None,
        groups: int = 1,
        tensorize: Any = None,
        **options: Any,
    ) -> Factorization:
        """Factorize a kernel.

        Args:
            weight: kernel of shape (T, S, kh, kw) (a Conv2d's); also (T, S) (Linear),
                (T, S, k) (Conv1d) or (T, S, kd, kh, kw) (Conv3d), see :mod:`.lifting`; with
                ``groups`` > 1 a grouped conv's (T, S / groups, *k). Torch tensor or numpy
                array, floating point.
            rank: int (every bond), tuple (one per bond, in ``rank_order``), or a float in (0, 1)
                meaning ``ratio``.
            eps: relative Frobenius error bound in (0, 1): the smallest factorization meeting it.
            ratio: share of the dense parameters in (0, 1]: the lowest error within it.
            statistics: the layer's input statistics (:func:`tnconv.calibrate_inputs`): fit
                the layer's outputs on those inputs instead of its kernel (see
                :mod:`tnconv.decompositions.output_aware`); ``eps`` / ``ratio`` then bound and
                rank the output error *in the mode-wise (Kronecker) model of the input moments*;
                ``info["relative_error"]`` reports the exact output error where the statistics
                keep the patch moment, and ``eps`` is then checked on it too (the kernel error
                is in ``info["kernel_error"]``).
            groups: the number of groups of a grouped conv: each group's kernel is fitted with
                the spec, at ranks common to all groups, and the network carries a group index
                (``Factorization.group``); ``eps`` / ``ratio`` hold per group, hence overall.
            tensorize: split the channel modes before fitting: ``((t_1, ..., t_d), (s_1, ...,
                s_d))`` (products T and S, per group) or ``"auto"``; the family then fits the
                pairs (t_i, s_i) and the spatial modes as its four modes (a TT-matrix for
                ``tt``, a TR-matrix for ``tr`` / ``rsdtr``: :class:`.lifting.Lifting`), and the
                network's channel modes are the index groups (t_1..t_d), (s_1..s_d).
            **options: method-specific options, validated by ``self.Options``.

        Returns:
            A :class:`Factorization` whose factors have the weight's dtype and device.

        Raises:
            InvalidWeightError: weight not 2- to 5-D, empty mode, NaN/Inf, not floating point,
                or ``groups`` not dividing T (``KernelOrderError``: an order the method has no
                meaning for).
            RankSpecError: none or several of rank/eps/ratio, or a value out of range.
            OptionError: an unknown option or a bad option value.
            BudgetError: ``ratio`` leaves fewer parameters than the smallest factorization needs.
        """
        w = self._validate(weight, groups, statistics, tensorize)
        spec = parse_rank_spec(rank, eps, ratio)
        opts = self.parse_options(options)

        def fit(kernel: torch.Tensor, ranks: tuple[int, ...] | None) -> Factorization:
            lift = lifting.Lifting.of(tuple(kernel.shape), tensorize)
            w4 = lift.to_fit(kernel)
            at = spec if ranks is None else FixedRank(ranks=ranks)
            if not bool(w4.any()):
                f = self._zero_kernel(w4, at, opts)
            elif statistics is not None:
                f = output_aware.factorize(self, w4, _float64(w4), at, opts, statistics, {})
            else:
                f = self._factorize(w4, _float64(w4), at, opts)
            return lift.from_fit(f)

        # out of inference mode: the fit's tensors (and the spectra memoised on its float64
        # copy) are ordinary tensors whatever mode the caller is in, and so are the factors
        with plain_tensors():
            if groups == 1:
                return fit(w, None)
            return lifting.stack_groups(w, groups, fit, self.name)

    def _validate(
        self,
        weight: Any,
        groups: Any,
        statistics: InputStatistics | None,
        tensorize: Any = None,
    ) -> torch.Tensor:
        """The checked kernel; typed errors for an order the method has no meaning for, bad
        ``groups``, and statistics on a kernel they do not describe."""
        w = validate_weight(weight, tuple(MODE_NAMES))
        if w.ndim not in self.kernel_orders:
            from ..registry import available  # only to name the alternatives

            others = [m for m in available() if w.ndim in _orders_of(m)]
            raise KernelOrderError(
                f"{self.name} has no meaning for a kernel of order {w.ndim} "
                f"{MODE_NAMES[w.ndim]}; methods that take it: {', '.join(others) or 'none'}"
            )
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise OptionError(f"groups must be a positive int; got {groups!r}")
        if w.shape[0] % groups:
            raise InvalidWeightError(
                f"groups={groups} does not divide the {w.shape[0]} output channels of the "
                f"kernel {tuple(w.shape)}"
            )
        if statistics is not None and (w.ndim != 4 or groups != 1 or tensorize is not None):
            raise OptionError(
                "statistics (output-aware fitting) describe the inputs of an ungrouped, "
                f"untensorized 2-D convolution; this kernel is {tuple(w.shape)} with "
                f"groups={groups}, tensorize={tensorize!r}"
            )
        t, s, *k = w.shape
        lifting.Lifting.of((t // groups, s, *k), tensorize)  # a bad tensorize fails here
        return w

    def factorize_many(
        self,
        weight: Any,
        specs: Sequence[Mapping[str, Any]],
        *,
        until: Callable[[int, Factorization], bool] | None = None,
        reuse: dict[str, Any] | None = None,
        statistics: InputStatistics | None = None,
        **options: Any,
    ) -> list[Factorization]:
        """``[factorize(weight, **spec, **options) for spec in specs]``, sharing the work.

        Every fit runs on one float64 copy of the kernel, so the spectra a family computes once
        per kernel (HOSVD bases, first SVD of a train or ring, RSDTR's shifted SVDs) are shared
        by all the candidates: one decomposition, many truncations. ``specs`` are dicts with
        exactly one of ``rank`` / ``eps`` / ``ratio``. Used by budget allocation.

        ``until(i, f)``: the specs are fitted in order, and none after the first one for which
        it returns True (the list returned is then shorter than ``specs``): a caller walking a
        ladder stops where the candidates stop being useful.

        ``reuse``: a dict the caller keeps between calls on the same (unmodified) kernel; the
        float64 copy is made once and kept in it, and with it every spectrum cached on that
        copy, so a ladder fitted in several calls costs what one call would.
        """
        groups = int(options.pop("groups", 1))
        tensorize = options.pop("tensorize", None)
        w = self._validate(weight, groups, statistics, tensorize)
        if groups != 1:
            # grouped kernels: one fit per spec (nothing shared between specs yet)
            fits: list[Factorization] = []
            for i, spec in enumerate(specs):
                fits.append(
                    self.factorize(w, **dict(spec), groups=groups, tensorize=tensorize, **options)
                )
                if until is not None and until(i, fits[-1]):
                    break
            return fits
        lift = lifting.Lifting.of(tuple(w.shape), tensorize)
        w4 = lift.to_fit(w)  # other orders, tensorized channels: the 4-D kernel fitted
        parsed = [parse_rank_spec(**dict(spec)) for spec in specs]
        opts = self.parse_options(options)
        with plain_tensors():
            zero = not bool(w4.any())
            w64 = self._reused_float64(w4, reuse, source=w)
            fitted: list[Factorization] = []
            whitened: dict[str, Any] = reuse.setdefault("whitened", {}) if reuse is not None else {}
            for i, spec in enumerate(parsed):
                if zero:
                    f = self._zero_kernel(w4, spec, opts)
                elif statistics is not None:
                    f = output_aware.factorize(self, w4, w64, spec, opts, statistics, whitened)
                else:
                    f = self._factorize(w4, w64, spec, opts)
                f = lift.from_fit(f)
                fitted.append(f)
                if until is not None and until(i, f):
                    break
        return fitted

    @staticmethod
    def _reused_float64(
        w: torch.Tensor, reuse: dict[str, Any] | None, source: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The float64 copy of ``w`` (T, S, kh, kw) kept in ``reuse`` while ``w`` (or the
        ``source`` it is a view of) is the same, unmodified tensor, else a fresh one (stored in
        ``reuse``).

        An ordinary tensor is recognised by identity and version counter. An inference tensor has
        no version counter (and may be changed in place inside ``inference_mode``), so its copy is
        reused only while its values still equal the copy's: one comparison per call, against a
        private float64 clone that nothing else can modify.
        """
        source = w if source is None else source
        version = tensor_version(source)
        key = (id(source), version)
        if reuse is not None and reuse.get("kernel") == key:
            w64 = reuse["float64"]
            if version is not None or torch.equal(w64, w.detach().to(torch.float64)):
                return w64
        w64 = _float64(w)
        if reuse is not None:
            reuse.update(kernel=key, float64=w64)
        return w64

    def _factorize(
        self, w: torch.Tensor, w64: torch.Tensor, spec: Any, opts: BaseModel
    ) -> Factorization:
        shape: KernelShape = tuple(int(n) for n in w.shape)  # type: ignore[assignment]
        if isinstance(spec, FixedRank):
            ranks = self.bond_ranks(spec.ranks, shape)
            result = self.fit(w64, ranks, opts)
            return self._finish(result, w, w64)
        if isinstance(spec, ErrorBound):
            return self._factorize_eps(w, w64, spec.eps, opts)
        budget = param_budget(spec.ratio, math.prod(shape))
        smallest = self.num_params_at(shape, self.min_ranks(shape))
        if smallest > budget:
            raise BudgetError(
                f"ratio={spec.ratio} allows {budget} parameters, but the smallest {self.name} "
                f"factorization of a {shape} kernel needs {smallest}"
            )
        result = self.fit_ratio(w64, budget, opts)
        return self._finish(result, w, w64)

    def random(
        self,
        shape: tuple[int, ...],
        rank: Any,
        *,
        std: float | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
        **options: Any,
    ) -> Factorization:
        """A randomly initialised factorization of a (T, S, kh, kw) kernel at ``rank``.

        Generic for every method (plugins included): the network (equation, factor shapes,
        modes, ranks) is the one :meth:`factorize` builds at ``rank`` and ``options`` (made
        cheaper by :meth:`search_options`) for a Gaussian kernel of ``shape``; its factors are
        then redrawn iid ``N(0, s^2)``. For
        independent zero-mean factors the terms of the einsum are uncorrelated, so every
        reconstructed entry has variance ``N * s^(2K)`` (N: the number of assignments of the
        summed indices, K: the number of factors); s is chosen to make that ``std**2`` exactly.

        Args:
            shape: kernel shape (T, S, *k) (with ``groups``: (T, S / groups, *k)).
            rank: as in :meth:`factorize` (int, tuple, or a float share of the parameters).
            std: standard deviation of the reconstructed entries; default that of
                ``nn.Conv2d``'s initialisation, uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
                fan_in = S kh kw, i.e. ``1 / sqrt(3 fan_in)``.
            generator / seed: source of randomness (``seed`` makes a fresh generator).
            dtype, device: of the returned factors.
            groups (an option): the number of groups of a grouped kernel.
        """
        if len(shape) not in MODE_NAMES or any(int(n) < 1 for n in shape):
            raise ValueError(f"shape must be 2 to 5 positive sizes (T, S, *k); got {tuple(shape)}")
        shape = tuple(int(n) for n in shape)
        if std is None:
            std = 1.0 / math.sqrt(3.0 * math.prod(shape[1:]))
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std must be a positive finite number; got {std}")
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(seed if seed is not None else torch.seed())
        # the structure only: fitted with the method's cheaper search options
        groups = options.pop("groups", 1)
        tensorize = options.pop("tensorize", None)
        quick = self.search_options(self.parse_options(options)).model_dump()
        template = self.factorize(
            torch.randn(shape, generator=generator, dtype=torch.float64),
            rank,
            groups=groups,
            tensorize=tensorize,
            **quick,
        )
        out = template.equation.split("->")[1]
        sizes = template.index_sizes()
        summed = math.prod(n for c, n in sizes.items() if c not in out)
        k = len(template.factors)
        scale = (std * std / summed) ** (1.0 / (2 * k))
        factors = [
            (torch.randn(f.shape, generator=generator, dtype=torch.float64) * scale).to(
                device=device, dtype=dtype
            )
            for f in template.factors
        ]
        result = template.with_factors(factors)
        result.info = {"init": "random", "std": std}
        return result

    def parse_options(self, options: dict[str, Any]) -> BaseModel:
        """Validate ``options`` with the method's pydantic ``Options`` model. The layout
        arguments of :meth:`factorize` (:data:`LAYOUT_KEYS`: ``groups``, ``tensorize``) are not
        method options and are left out."""
        options = {k: v for k, v in options.items() if k not in LAYOUT_KEYS}
        try:
            return self.Options.model_validate(options)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}"
                for e in exc.errors()
            )
            known = ", ".join(self.Options.model_fields) or "none"
            raise OptionError(
                f"bad option for {self.name or type(self).__name__}: {problems} "
                f"(known options: {known})"
            ) from exc

    # -- what a family implements ------------------------------------------------------------
    @abstractmethod
    def bond_ranks(self, rank: int | tuple[int, ...], shape: KernelShape) -> tuple[int, ...]:
        """Expand ``rank`` (int = every bond) into the bond tuple and cap it at ``shape``'s limits.

        Raises :class:`RankSpecError` for a tuple of the wrong length.
        """

    def bind(self, options: BaseModel) -> Decomposition:
        """An instance whose structure queries (``bond_ranks``, ``num_params_at``,
        ``min_ranks``) follow the parsed ``options``; ``self`` for the methods whose network
        does not depend on an option (a semi-tensor factor t does)."""
        return self

    def min_ranks(self, shape: KernelShape) -> tuple[int, ...]:
        """The smallest bond tuple the network takes (default: every bond 1)."""
        return self.bond_ranks(1, shape)

    @abstractmethod
    def fit(self, weight: torch.Tensor, ranks: tuple[int, ...], options: Any) -> Factorization:
        """Fit factors at ``ranks`` (already capped) to a float64 ``weight`` (T, S, kh, kw)."""

    @abstractmethod
    def num_params_at(self, shape: KernelShape, ranks: tuple[int, ...]) -> int:
        """Number of parameters of a factorization of ``shape`` at (capped) ``ranks``."""

    def fit_eps(self, weight: torch.Tensor, eps: float, options: Any) -> Factorization:
        """Smallest factorization with relative error <= ``eps``.

        Generic version: bisection over a uniform rank with :meth:`search_options` fits, then a
        full fit at the rank found. Families with an error-bounded algorithm override it (and
        set ``guarantees_eps``).
        """
        shape: KernelShape = tuple(weight.shape)  # type: ignore[assignment]
        top = max(self.bond_ranks(10**9, shape))
        quick = self.search_options(options)
        cache: dict[int, float] = {}

        def misses(r: int) -> bool:
            if r not in cache:
                f = self.fit(weight, self.bond_ranks(r, shape), quick)
                # a fit that measured its own error on this (float64) weight saves a rebuild
                known = f.info.get("fit_error")
                cache[r] = float(known) if known is not None else f.relative_error(weight)
            return cache[r] > eps

        # Ranks whose factors outgrow the dense kernel are searched no further: when even the
        # largest rank as small as the kernel misses eps, the top rank (the best fit there is)
        # is returned at once. Fits at those ranks were the cost of a search on kernels that do
        # not compress (CP on a random 512x512x3x3 kernel: thousands of rank-one terms each).
        dense = math.prod(shape)
        cap = largest_fitting(
            1, top, lambda r: self.num_params_at(shape, self.bond_ranks(r, shape)) <= dense
        )
        if cap is not None and cap < top and misses(cap):
            log.info(
                "%s: no factorization smaller than the %s kernel meets eps=%s",
                self.name,
                shape,
                eps,
            )
            r = top
        else:
            # the largest rank that still misses eps; one above it is the smallest that meets it
            missing = largest_fitting(1, top if cap is None else cap, misses)
            r = 1 if missing is None else min(missing + 1, top)
        result = self.fit(weight, self.bond_ranks(r, shape), options)
        if result.relative_error(weight) > eps:
            warnings.warn(
                f"{self.name}: eps={eps} not reached even at rank {r}; "
                f"returning error {result.relative_error(weight):.4g}",
                RuntimeWarning,
                stacklevel=3,
            )
        return result

    def fit_ratio(self, weight: torch.Tensor, budget: int, options: Any) -> Factorization:
        """Lowest-error factorization with at most ``budget`` parameters.

        Generic version: the better of (a) the eps-bisection when the family is error-bounded and
        (b) the largest uniform rank that fits, each grown bond by bond while it fits and helps.
        The search runs with :meth:`search_options` (cheaper); the candidates are refitted with
        ``options`` and the lowest error wins.
        """
        shape: KernelShape = tuple(weight.shape)  # type: ignore[assignment]
        quick = self.search_options(options)
        candidates: list[Factorization] = []
        if self.guarantees_eps:
            found = bisect_eps(
                lambda e: self.fit_eps(weight, e, quick),
                lambda f: f.num_params,
                lambda f: f.relative_error(weight),
                budget,
            )
            if found is not None:
                candidates.append(found)
        top = max(self.bond_ranks(10**9, shape))
        r = largest_fitting(
            1, top, lambda r: self.num_params_at(shape, self.bond_ranks(r, shape)) <= budget
        )
        if r is not None:
            candidates.append(self.fit(weight, self.bond_ranks(r, shape), quick))
        if not candidates:
            raise BudgetError(f"no {self.name} factorization of {shape} fits {budget} parameters")
        candidates += [self.grow_within_budget(weight, c, budget, quick) for c in candidates]
        if quick != options:
            # quick errors do not rank the final fits reliably: refit every distinct candidate
            distinct = {c.ranks: c for c in candidates}
            candidates = [self.fit(weight, ranks, options) for ranks in distinct]
        return min(candidates, key=lambda f: f.relative_error(weight))

    def search_options(self, options: Any) -> Any:
        """Cheaper options used while searching ranks (default: the same options)."""
        return options

    def grow_within_budget(
        self, weight: torch.Tensor, start: Factorization, budget: int, options: Any
    ) -> Factorization:
        """Greedily raise single bonds while the budget allows and the error falls."""
        shape: KernelShape = tuple(weight.shape)  # type: ignore[assignment]
        best, best_err = start, start.relative_error(weight)
        improved = True
        while improved:
            improved = False
            for k in range(len(best.ranks)):
                ranks = list(best.ranks)
                ranks[k] += 1
                grown = self.bond_ranks(tuple(ranks), shape)
                if grown == best.ranks or self.num_params_at(shape, grown) > budget:
                    continue
                trial = self.fit(weight, grown, options)
                err = trial.relative_error(weight)
                if err < best_err * (1 - 1e-9) and trial.num_params <= budget:
                    best, best_err, improved = trial, err, True
        return best

    # -- helpers for subclasses ---------------------------------------------------------------
    def expand_ranks(self, rank: int | tuple[int, ...], n_bonds: int) -> tuple[int, ...]:
        """``rank`` as an ``n_bonds`` tuple: an int is repeated, a tuple must have that length."""
        if isinstance(rank, int):
            return (rank,) * n_bonds
        if len(rank) != n_bonds:
            raise RankSpecError(
                f"{self.name} takes {n_bonds} ranks {self.rank_order}; got {len(rank)}: {rank}"
            )
        return tuple(rank)

    def log_capped(self, asked: tuple[int, ...], capped: tuple[int, ...]) -> tuple[int, ...]:
        """Log (INFO) when ranks were lowered to what the modes can carry; return ``capped``."""
        if asked != capped:
            log.info(
                "%s: ranks %s capped to %s (the most the modes can carry)", self.name, asked, capped
            )
        return capped

    def make(
        self,
        factors: list[torch.Tensor],
        equation: str,
        shape: KernelShape,
        ranks: tuple[int, ...],
        **info: Any,
    ) -> Factorization:
        """Build a :class:`Factorization` tagged with this method's name."""
        return Factorization(factors, equation, shape, ranks, method=self.name, info=info)

    # -- internals ----------------------------------------------------------------------------
    def _factorize_eps(
        self, w: torch.Tensor, w64: torch.Tensor, eps: float, opts: BaseModel
    ) -> Factorization:
        if not self.guarantees_eps:
            return self._finish(self.fit_eps(w64, eps, opts), w, w64)
        # The bound holds in float64; casting the factors to the weight's dtype adds rounding, so
        # aim a little below eps and tighten if the cast result still misses.
        unit = torch.finfo(w.dtype).eps
        result = None
        for attempt in range(4):
            target = eps * (1.0 - 8.0 * unit * 4.0**attempt)
            if target <= 0:
                break
            result = self._finish(self.fit_eps(w64, target, opts), w, w64)
            if result.info["relative_error"] <= eps:  # (measured by _finish, in w's dtype)
                return result
        assert result is not None
        warnings.warn(
            f"{self.name}: eps={eps} cannot be met in {w.dtype} (rounding); got "
            f"{result.relative_error(w):.4g}",
            RuntimeWarning,
            stacklevel=3,
        )
        return result

    def _zero_kernel(self, w: torch.Tensor, spec: Any, opts: BaseModel) -> Factorization:
        """An all-zero kernel: zero factors at the requested ranks (rank spec) or at the smallest
        ranks (eps / ratio: any ranks are exact). The factor shapes come from a fit of the
        all-ones kernel (rank one for every family), so this needs nothing method-specific."""
        shape: KernelShape = tuple(int(n) for n in w.shape)  # type: ignore[assignment]
        if isinstance(spec, FixedRank):
            ranks = self.bond_ranks(spec.ranks, shape)
        else:
            ranks = self.min_ranks(shape)
            if isinstance(spec, ParamRatio):
                budget = param_budget(spec.ratio, math.prod(shape))
                if self.num_params_at(shape, ranks) > budget:
                    raise BudgetError(
                        f"ratio={spec.ratio} allows {budget} parameters, but the smallest "
                        f"{self.name} factorization of a {shape} kernel needs "
                        f"{self.num_params_at(shape, ranks)}"
                    )
        ones = torch.ones(shape, dtype=torch.float64, device=w.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shaped = self.fit(ones, ranks, opts)
        log.info(
            "%s: the kernel %s is all zeros; zero factors at ranks %s", self.name, shape, ranks
        )
        result = shaped.with_factors([torch.zeros_like(f) for f in shaped.factors])
        result.info = {}
        return self._finish(result, w)

    def _finish(
        self, result: Factorization, w: torch.Tensor, w64: torch.Tensor | None = None
    ) -> Factorization:
        # the scalar gauge is free: factors whose norms are far apart are evened out before
        # the cast to the weight's dtype could flush the small ones to zero
        balanced = balance_scales(result.factors)
        if balanced is not result.factors:
            result = result.with_factors(balanced)
            if "sensitivity" in result.info:  # it depends on the gauge
                result.info["sensitivity"] = result.sensitivity()
        out = result.to(device=w.device, dtype=w.dtype).detach()
        out.method = self.name
        if w64 is None:
            out.info["relative_error"] = out.relative_error(w)
        else:
            # the same number as out.relative_error(w) (w64 is w in float64), without re-checking
            # and re-casting the weight for every candidate of a search
            approx = out.to_tensor().detach().to(device=w64.device, dtype=torch.float64)
            norm = cached(w64, "norm", lambda: float(torch.linalg.vector_norm(w64)))
            diff = float(torch.linalg.vector_norm(w64 - approx))
            out.info["relative_error"] = (
                diff / norm if norm > 0 else (0.0 if diff == 0.0 else math.inf)
            )
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
