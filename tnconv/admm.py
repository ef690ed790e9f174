"""ADMM-regularized training toward any registered decomposition (Yin et al., CVPR 2021).

Compressing a trained network by decomposing its kernels loses accuracy that fine-tuning must
win back. ADMM instead trains the network in its dense form while pulling each chosen kernel W
toward the set S of kernels the method can represent at the requested spec:

    min_W  loss(W)  s.t.  W in S        (split as  W = Z,  Z in S,  scaled dual U)

* W-step: the usual SGD on ``loss(W) + rho/2 * sum_l ||W_l - Z_l + U_l||^2`` (:meth:`ADMM.penalty`);
* Z-step: ``Z = P(W + U)``, the projection being "factorize at the spec with the method itself,
  then reconstruct" (:meth:`ADMM.step`);
* U-step: ``U += W - Z``.

When ``||W - Z|| / ||W||`` (:meth:`ADMM.distance`) is small the kernels are nearly in S, so the
decomposition (:meth:`ADMM.compress`, the same as :func:`tnconv.compress` at the same spec) is
nearly lossless. This module is model-level like :mod:`tnconv.compress`: it knows layers and asks
the registry for the method; the algebra is the method's own.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections.abc import Iterable
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import distributed as tdist
from ._modes import check_not_meta, plain_copy, plain_tensors
from .allocation import options_for_layer, parse_budget
from .compress import (
    Budget,
    LayerSelector,
    compress,
    conv_input_shapes,
    dense_reasons,
    is_depthwise,
    select_convs,
)
from .decompositions.admm import ADMMDecomposition
from .decompositions.base import Decomposition
from .errors import (
    ADMMError,
    BudgetError,
    NonFiniteWeightError,
    OptionError,
    ProjectionError,
    RankSpecError,
    StructureError,
    TnconvError,
)
from .layers import FactorizedConv2d
from .rank import parse_rank_spec
from .registry import get
from .training import fit

__all__ = ["ADMM", "ADMMSchedule"]

log = logging.getLogger(__name__)

_STATE_VERSION = 1

_FIT_LR: float = inspect.signature(fit).parameters["lr"].default
MANUAL_RHO = 1e-3  # the reference code's rho: a loop of one's own without plan() or rho=
PULL_START = 1.25  # lr * rho * steps per epoch in the first epoch of a derived schedule


class ADMMSchedule(BaseModel):
    """The penalty weight: ``rho`` at the start, multiplied by ``rho_growth`` after every
    :meth:`ADMM.step` and capped at ``rho_max`` (growth 1: constant, the reference's default;
    its CIFAR script multiplies rho by 5 late in training, the same idea in one jump)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rho: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 1e-3
    rho_growth: Annotated[float, Field(ge=1.0, allow_inf_nan=False)] = 1.0
    rho_max: Annotated[float | None, Field(gt=0.0, allow_inf_nan=False)] = None

    @model_validator(mode="after")
    def _cap_above_start(self) -> ADMMSchedule:
        if self.rho_max is not None and self.rho_max < self.rho:
            raise ValueError(f"rho_max={self.rho_max} is below rho={self.rho}")
        return self

    @classmethod
    def parse(cls, rho: Any, rho_growth: Any = 1.0, rho_max: Any = None) -> ADMMSchedule:
        """Validate a schedule; :class:`OptionError` (a ``ValueError``) names the bad field."""
        try:
            return cls(rho=rho, rho_growth=rho_growth, rho_max=rho_max)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'schedule'}: {e['msg']}"
                for e in exc.errors()
            )
            raise OptionError(f"bad ADMM schedule: {problems}") from exc

    @classmethod
    def given(
        cls, rho: Any = None, rho_growth: Any = None, rho_max: Any = None
    ) -> ADMMSchedule | None:
        """The schedule fixed by explicit arguments, as :class:`ADMM` reads them: ``rho`` given,
        the schedule (``rho_growth`` 1 unless given: constant); ``rho`` None, None (rho is
        derived later, :meth:`from_training`), after checking a given ``rho_growth`` /
        ``rho_max`` on their own. :class:`OptionError` names a bad field."""
        if rho is not None:
            return cls.parse(rho, 1.0 if rho_growth is None else rho_growth, rho_max)
        if rho_growth is not None or rho_max is not None:
            cls.parse(
                1e-3 if rho_max is None else rho_max,
                1.0 if rho_growth is None else rho_growth,
                rho_max,
            )
        return None

    def next(self, rho: float) -> float:
        """The rho after one more step."""
        grown = rho * self.rho_growth
        return grown if self.rho_max is None else min(grown, self.rho_max)

    @classmethod
    def from_training(
        cls,
        lr: float,
        steps_per_epoch: int,
        step_every: int | None = None,
        rho_growth: float | None = None,
        rho_max: float | None = None,
        project_first: bool = True,
    ) -> ADMMSchedule:
        """The default schedule for a run of SGD peaking at ``lr`` with ``steps_per_epoch``
        optimizer steps per epoch and a Z / U update every ``step_every`` steps (None: once per
        epoch).

        The penalty's gradient ``rho * (W - Z + U)`` moves W toward Z by about
        ``lr * rho * steps_per_epoch`` of the gap per epoch (the *pull per epoch*, see
        docs/admm.md): below ~0.5 the dual U accumulates faster than W follows. ``rho`` is set
        so that the first epoch pulls ``PULL_START`` (1.25, the schedule measured on the digits:
        rho 0.5 at lr 0.02 over 125 batches), doubled every epoch (``rho_growth`` is 2 per
        epoch, spread over the updates of an epoch) up to 16 times the start, and never above
        ``0.2 / lr`` (with momentum 0.9 a larger ``lr * rho`` overshoots Z). Explicit
        ``rho_growth`` / ``rho_max`` are kept. With ``project_first`` (a :meth:`ADMM.step`
        before training, which advances rho once) the start is divided by one growth factor,
        so the first epoch still trains at the derived rho.
        """
        if lr <= 0 or steps_per_epoch < 1:
            raise OptionError(
                f"cannot derive rho from lr={lr} and {steps_per_epoch} steps per epoch"
            )
        rho = PULL_START / (lr * steps_per_epoch)
        updates_per_epoch = steps_per_epoch / (step_every or steps_per_epoch)
        growth = rho_growth if rho_growth is not None else 2.0 ** (1.0 / updates_per_epoch)
        cap = rho_max if rho_max is not None else min(16.0 * rho, 0.2 / lr)
        start = min(rho, cap) / (growth if project_first else 1.0)
        return cls.parse(start, growth, cap)


class ADMM:
    """ADMM training of ``model``'s convolutions toward ``method`` at a rank spec.

    Args:
        model: the network, trained in its dense form; ADMM never changes its weights itself
            (only the training loop does, through :meth:`penalty`'s gradient), and never touches
            layers outside ``layers``.
        method: any registered name (plugins and derived ``admm-<base>`` names included: the
            latter mean their base) or a :class:`Decomposition`.
        rank, eps, ratio: the per-layer spec, as for ``Decomposition.factorize``; or
        budget: a global share of the selected layers' parameters (or ``("flops", share)``),
            allocated by :func:`tnconv.compress` ONCE, on the first :meth:`step`, from the
            weights at that moment; every later step projects each layer at its fixed ranks and
            :meth:`compress` factorizes at them. Layers the allocation leaves dense leave the
            ADMM set (no penalty, no projection) and stay dense. So do, under rank / eps /
            ratio, layers the spec cannot factorize at all (``BudgetError`` /
            ``StructureError`` on the first step, e.g. ``ratio=0.1`` of a one-channel stem), as
            :func:`tnconv.compress` leaves them; if no layer can, the step raises.
        rho, rho_growth, rho_max: the penalty schedule (:class:`ADMMSchedule`). ``rho=None``
            (the default): derived from the training schedule when :meth:`fit` starts
            (:meth:`ADMMSchedule.from_training`: a pull of 1.25 per epoch in the first epoch,
            doubled every epoch); in a loop of your own call :meth:`plan` first. An explicit
            ``rho`` is used as given (``rho_growth`` defaults to 1 then: constant).
        layers: conv names or a predicate ``(name, module) -> bool`` (default: every
            ``nn.Conv2d``); a named module that is not an ``nn.Conv2d`` raises ``TypeError``.
        input_size: (B, C, H, W), passed on to :func:`tnconv.compress` (FLOP budgets, methods
            whose options take the layer's input size).
        progress: a tqdm bar over the layers in :meth:`step`.
        **options: method options, as for ``factorize``.

    State: ``Z`` and ``U`` per layer. As in the reference code, ``Z`` starts as a copy of the
    weights and ``U`` at zero, so the penalty is zero until the first :meth:`step`; call
    :meth:`step` once before training (:meth:`fit` does) so the first epoch already pulls
    toward the low-rank set.

    Raises:
        OptionError: rho <= 0, growth < 1, a cap below rho, or a bad method option.
        RankSpecError: none or several of rank / eps / ratio / budget, or a bad value.
        TypeError / KeyError: a chosen layer is not a (non-grouped) ``nn.Conv2d`` / no such name.
        ValueError: no layer selected.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str | Decomposition,
        rank: Any = None,
        *,
        eps: Any = None,
        ratio: Any = None,
        budget: Any = None,
        rho: float | None = None,
        rho_growth: float | None = None,
        rho_max: float | None = None,
        layers: LayerSelector = None,
        input_size: tuple[int, int, int, int] | None = None,
        progress: bool = False,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"ADMM needs a torch.nn.Module; got {type(model).__name__}")
        # rho=None: derived from the training schedule by fit() (or plan())
        self._growth_given, self._max_given = rho_growth, rho_max
        self.schedule: ADMMSchedule | None = ADMMSchedule.given(rho, rho_growth, rho_max)
        decomposition = method if isinstance(method, Decomposition) else get(method)
        if isinstance(decomposition, ADMMDecomposition):
            decomposition = decomposition.base  # admm-<base>: this trainer is its ADMM part
        self.decomposition = decomposition
        self.method = decomposition.name
        if budget is not None:
            if any(v is not None for v in (rank, eps, ratio)):
                raise RankSpecError("give either budget= or one of rank=, eps=, ratio=, not both")
            self.budget: Budget | None = parse_budget(budget)
            self.spec: dict[str, Any] = {}
        else:
            parse_rank_spec(rank, eps, ratio)
            self.budget = None
            self.spec = {k: v for k, v in (("rank", rank), ("eps", eps), ("ratio", ratio))}
        decomposition.parse_options(options)
        self.options = dict(options)
        self.input_size = tuple(input_size) if input_size is not None else None

        # depthwise convs (one input channel per group) stay out, as compress leaves them dense;
        # a budget still counts them (compress's Budget(pool="selected"))
        selected = select_convs(model, layers)
        chosen = [(n, c) for n, c in selected if not is_depthwise(c)]
        self._depthwise = [n for n, c in selected if is_depthwise(c)]
        for name, conv in chosen:
            check_not_meta(conv.weight, f"the weight of layer {name!r}")
        if not chosen:
            raise ValueError(
                "ADMM: no Linear / conv layer selected (layers= chose none, or only depthwise)"
            )
        self.model = model
        self._layers: dict[str, nn.Conv2d] = dict(chosen)
        with plain_tensors():  # ordinary tensors: step() updates them in place in any mode
            self.Z: dict[str, torch.Tensor] = {
                n: c.weight.detach().clone() for n, c in self._layers.items()
            }
            self.U: dict[str, torch.Tensor] = {
                n: torch.zeros_like(c.weight.detach()) for n, c in self._layers.items()
            }
        self.rho: float | None = None if self.schedule is None else self.schedule.rho
        self.steps = 0
        self.ranks: dict[str, tuple[int, ...]] = {}  # budget mode: fixed on the first step
        self.left_dense: dict[str, str] = {}  # layers the allocation / spec leaves dense
        self.history: list[dict[str, Any]] = []
        self.progress = progress
        self._shapes: dict[str, tuple[int, int, int, int]] | None = None

    # -- the three ADMM pieces ----------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        """The layers under ADMM (after a budget allocation: those it factorizes)."""
        return [n for n in self._layers if n not in self.left_dense]

    def penalty(self) -> torch.Tensor:
        """``rho/2 * sum_l ||W_l - Z_l + U_l||^2``, differentiable in the weights only.

        Raises :class:`NonFiniteWeightError` naming the layer when a weight is NaN / Inf.
        """
        rho = self._require_rho()
        terms = []
        for name in self.layer_names:
            w = self._layers[name].weight
            z, u = self._aligned(self.Z, name, w), self._aligned(self.U, name, w)
            terms.append((w - z + u).pow(2).sum())
        if not terms:
            return torch.zeros(())
        total = 0.5 * rho * torch.stack(terms).sum()
        if not bool(torch.isfinite(total.detach())):  # one check per call, not one per layer
            self._raise_non_finite()
        return total

    @plain_tensors()  # no_grad, and Z / U stay ordinary tensors under inference_mode
    def step(self) -> dict[str, float]:
        """One Z- and U-update: ``Z = P(W + U)``, ``U += W - Z``; then rho follows its schedule.

        Returns the per-layer distance ``||W - Z|| / ||W||`` after the update (also appended to
        :attr:`history`). On the first step under ``budget=`` the ranks are allocated.

        Under a ``torch.distributed`` process group the update (and a budget's allocation) is
        computed on rank 0 alone and broadcast: every rank ends the step with rank 0's Z, U,
        ranks and distances, however the method's projection would round elsewhere; an error
        on rank 0 is raised on every rank. Every rank must call it at the same point.

        Raises:
            NonFiniteWeightError: a weight is NaN / Inf (the layer is named).
            ProjectionError: the method failed to factorize a layer (the cause is chained).
        """
        self._require_rho()
        for name in self.layer_names:
            self._check_finite(name, self._layers[name].weight)
        distances = self._update_broadcast() if tdist.is_distributed() else self._update()
        self.steps += 1
        self.history.append(
            {
                "step": self.steps,
                "rho": self.rho,
                "distance": dict(distances),
                "max_distance": max(distances.values(), default=0.0),
            }
        )
        if tdist.is_main_process():
            log.info(
                "admm step %d (rho %.3g): max ||W-Z||/||W|| %.4f",
                self.steps,
                self.rho,
                self.history[-1]["max_distance"],
            )
        assert self.schedule is not None and self.rho is not None
        self.rho = self.schedule.next(self.rho)
        return distances

    def _update(self) -> dict[str, float]:
        """The Z- and U-updates (and a budget's allocation on the first step) in this process;
        returns the per-layer distances."""
        if self.budget is not None and not self.ranks:
            self._allocate()
        names = self.layer_names
        bar: Iterable[str] = tqdm(
            names, desc=f"admm projection ({self.method})", disable=not self.progress, leave=False
        )
        distances: dict[str, float] = {}
        unfit: ProjectionError | None = None
        for name in bar:
            w = self._layers[name].weight.detach()
            u = self._aligned(self.U, name, w)
            try:
                z = self._project(name, w + u).to(device=w.device, dtype=w.dtype)
            except ProjectionError as exc:
                # first step, per-layer spec: a layer the spec cannot factorize at all (its
                # shape, not its values: BudgetError / StructureError) stays dense, as
                # tnconv.compress leaves it; later steps never meet a new such layer
                if self.steps == 0 and isinstance(exc.__cause__, (BudgetError, StructureError)):
                    self.left_dense[name] = str(exc.__cause__)
                    unfit = unfit or exc
                    log.info("admm: %s stays dense: %s", name, exc.__cause__)
                    continue
                raise
            u.add_(w - z)
            self.Z[name], self.U[name] = z, u
            distances[name] = _relative(w, z)
        if not distances and unfit is not None:
            self.left_dense.clear()
            raise unfit  # no layer can take the spec: nothing to train toward
        return distances

    def _update_broadcast(self) -> dict[str, float]:
        """:meth:`_update` on rank 0, its result broadcast: the layers' fate (ranks, layers left
        dense) and distances as objects, then Z and U in place (one flat broadcast)."""
        failure: Exception | None = None
        distances: dict[str, float] = {}
        if tdist.rank() == 0:
            try:
                distances = self._update()
            except Exception as exc:  # every rank must leave the broadcast below
                failure = exc
        news = tdist.broadcast_object(
            {
                "error": None if failure is None else (type(failure), str(failure)),
                "distances": distances,
                "ranks": self.ranks,
                "left_dense": self.left_dense,
            }
        )
        if failure is not None:
            raise failure
        if news["error"] is not None:
            kind, message = news["error"]
            try:
                error = kind(f"on rank 0: {message}")
            except Exception:
                error = ADMMError(f"on rank 0: {kind.__name__}: {message}")
            raise error
        self.ranks, self.left_dense = dict(news["ranks"]), dict(news["left_dense"])
        tensors = []
        for name in self.layer_names:
            w = self._layers[name].weight.detach()
            tensors += [self._aligned(self.Z, name, w), self._aligned(self.U, name, w)]
        tdist.broadcast_tensors(tensors, src=0)
        return dict(news["distances"])

    def plan(
        self,
        steps_per_epoch: int,
        lr: float = 0.01,
        step_every: int | None = None,
        project_first: bool = True,
    ) -> ADMMSchedule:
        """Derive rho from the training schedule (when it was not given) and return the
        schedule: :meth:`ADMMSchedule.from_training` for SGD peaking at ``lr`` with
        ``steps_per_epoch`` optimizer steps per epoch and a :meth:`step` every ``step_every``
        of them (None: once per epoch). :meth:`fit` calls it; call it yourself before a
        training loop of your own. A schedule fixed already (an explicit ``rho``, or an
        earlier plan) is returned unchanged."""
        if self.schedule is None:
            self.schedule = ADMMSchedule.from_training(
                lr,
                steps_per_epoch,
                step_every,
                self._growth_given,
                self._max_given,
                project_first=project_first,
            )
            self.rho = self.schedule.rho
            if tdist.is_main_process():
                log.info(
                    "admm: rho %.3g (x%.3g per step, cap %.3g) derived from lr %g, %d steps/epoch",
                    self.schedule.rho,
                    self.schedule.rho_growth,
                    self.schedule.rho_max,
                    lr,
                    steps_per_epoch,
                )
        return self.schedule

    def _require_rho(self) -> float:
        """rho now; a manual loop that never planned gets the reference's constant 1e-3."""
        if self.rho is None:
            log.warning(
                "ADMM: rho was not given and no training schedule is known (fit() derives it; "
                "call plan(steps_per_epoch, lr) before a loop of your own, or pass rho=): "
                "using the reference's constant rho %g, which needs ~200 epochs to pull",
                MANUAL_RHO,
            )
            self.schedule = ADMMSchedule.parse(
                MANUAL_RHO,
                1.0 if self._growth_given is None else self._growth_given,
                self._max_given,
            )
            self.rho = self.schedule.rho
        return self.rho

    @torch.no_grad()
    def distance(self) -> dict[str, float]:
        """Per-layer ``||W - Z|| / ||W||`` with the current weights (the convergence signal;
        0 before the first step, since Z starts as a copy of the weights)."""
        out = {}
        for name in self.layer_names:
            w = self._layers[name].weight.detach()
            out[name] = _relative(w, self._aligned(self.Z, name, w))
        return out

    # -- the result -----------------------------------------------------------------------------
    def compress(self, **kwargs: Any) -> nn.Module:
        """The factorized model from the CURRENT weights (a new model; ``model`` is untouched).

        With rank / eps / ratio this is ``tnconv.compress(model, method, <spec>, layers=<the
        ADMM layers>, **options)``; with ``budget=`` each layer is factorized at the ranks fixed
        on the first step (``tnconv.compress(model, method, rank=ranks[l], layers=[l])`` layer by
        layer). ``kwargs`` go to :func:`tnconv.compress` (``must_save``, ``progress``...).

        Raises:
            ADMMError: before any :meth:`step` (the weights were never pulled toward the
                low-rank set, and under ``budget=`` no ranks exist yet): use
                :func:`tnconv.compress` for a direct decomposition.
            NonFiniteWeightError: a weight is NaN / Inf.
        """
        if self.steps == 0:
            raise ADMMError(
                "ADMM.compress() before any step(): the weights were never pulled toward the "
                f"{self.method} low-rank set (and a budget has no ranks yet). Call step() (or "
                "fit()) first, or use tnconv.compress(model, ...) for a direct decomposition"
            )
        for name in self.layer_names:
            self._check_finite(name, self._layers[name].weight)
        common = {"input_size": self.input_size, **kwargs, **self.options}
        if self.budget is None:
            return compress(
                self.model, self.decomposition, layers=self.layer_names, **self.spec, **common
            )
        small = plain_copy(self.model)
        for name in self.layer_names:
            compress(
                small, self.decomposition, self.ranks[name], layers=[name], inplace=True, **common
            )
        return small

    def fit(
        self,
        loader: DataLoader,
        epochs: int,
        *,
        step_every: int | None = None,
        project_first: bool = True,
        **fit_options: Any,
    ) -> list[float]:
        """Train ``model`` with the penalty (:func:`tnconv.training.fit`, SGD + OneCycle).

        ``step()`` runs after every epoch, or every ``step_every`` optimizer steps; with
        ``project_first`` once before training too (if no step was made yet). ``fit_options``
        go to ``training.fit`` (``lr``, ``progress``, ``schedule``...). Returns the epochs' mean
        cross-entropy (without the penalty).

        Without an explicit ``rho`` the schedule is derived here (:meth:`plan`) from
        ``len(loader)``, ``step_every`` and the peak ``lr`` (``training.fit``'s default 0.01
        when not given).
        """
        if step_every is not None and (not isinstance(step_every, int) or step_every < 1):
            raise ValueError(f"step_every must be a positive int or None; got {step_every!r}")
        if self.schedule is None:
            try:
                steps_per_epoch = len(loader)
            except TypeError as exc:
                raise OptionError(
                    "ADMM.fit derives rho from len(loader); give a sized loader or pass rho="
                ) from exc
            self.plan(
                steps_per_epoch,
                float(fit_options.get("lr", _FIT_LR)),
                step_every,
                project_first=project_first and self.steps == 0,
            )
        if project_first and self.steps == 0:
            self.step()

        def after_batch(k: int) -> None:
            if step_every is not None and k % step_every == 0:
                self.step()

        def after_epoch(e: int) -> None:
            if step_every is None:
                self.step()

        fit_options.setdefault("desc", f"admm ({self.method})")
        return fit(
            self.model,
            loader,
            epochs,
            penalty=self.penalty,
            after_batch=after_batch,
            after_epoch=after_epoch,
            **fit_options,
        )

    # -- persistence ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: Z, U, rho, steps, history, fixed ranks (tensors are
        detached clones on their current device)."""
        return {
            "version": _STATE_VERSION,
            "method": self.method,
            "layers": list(self._layers),
            "Z": {n: t.detach().clone() for n, t in self.Z.items()},
            "U": {n: t.detach().clone() for n, t in self.U.items()},
            "rho": self.rho,
            "steps": self.steps,
            "ranks": {n: list(r) for n, r in self.ranks.items()},
            "left_dense": dict(self.left_dense),
            "history": copy.deepcopy(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; tensors are moved to the weights' device and dtype.

        Raises :class:`ADMMError` when the state belongs to another method or other layers,
        or its tensors do not match the weights' shapes.
        """
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ADMMError("not an ADMM state_dict (missing or unknown 'version')")
        if state["method"] != self.method:
            raise ADMMError(
                f"state is for method {state['method']!r}, this ADMM is {self.method!r}"
            )
        if list(state["layers"]) != list(self._layers):
            raise ADMMError(
                f"state is for layers {state['layers']}, this ADMM has {list(self._layers)}"
            )
        z_new, u_new = {}, {}
        for name, conv in self._layers.items():
            w = conv.weight.detach()
            for key, target in (("Z", z_new), ("U", u_new)):
                t = state[key][name]
                if tuple(t.shape) != tuple(w.shape):
                    raise ADMMError(
                        f"state {key}[{name!r}] has shape {tuple(t.shape)}, the weight "
                        f"{tuple(w.shape)}"
                    )
                with plain_tensors():
                    target[name] = t.detach().to(device=w.device, dtype=w.dtype).clone()
        self.Z, self.U = z_new, u_new
        self.rho = None if state["rho"] is None else float(state["rho"])
        self.steps = int(state["steps"])
        self.ranks = {n: tuple(int(v) for v in r) for n, r in state["ranks"].items()}
        self.left_dense = dict(state["left_dense"])
        self.history = copy.deepcopy(state["history"])

    # -- internals --------------------------------------------------------------------------
    def _aligned(self, store: dict[str, torch.Tensor], name: str, w: torch.Tensor) -> torch.Tensor:
        """``store[name]`` on ``w``'s device and dtype (the model may have moved since)."""
        t = store[name]
        if t.device != w.device or t.dtype != w.dtype:
            t = t.to(device=w.device, dtype=w.dtype)
            store[name] = t
        return t

    def _options_for(self, name: str) -> dict[str, Any]:
        """The method options, plus the layer's stride / input size when the method's options
        take them and the caller left them unset (as tnconv.compress does)."""
        fields = getattr(self.decomposition.Options, "model_fields", {})
        shape = None
        if "input_size" in fields and "input_size" not in self.options and self.input_size:
            if self._shapes is None:
                self._shapes = conv_input_shapes(self.model, self.input_size)
            shape = self._shapes.get(name)
        return options_for_layer(self.decomposition, self._layers[name], shape, self.options)

    def _project(self, name: str, v: torch.Tensor) -> torch.Tensor:
        spec = {"rank": self.ranks[name]} if self.budget is not None else self.spec
        try:
            f = self.decomposition.factorize(v, **spec, **self._options_for(name))
            z = f.to_tensor()
        except Exception as exc:
            raise ProjectionError(
                f"ADMM projection of layer {name!r} onto {self.method} at "
                f"{_spec_text(spec)} failed: {type(exc).__name__}: {exc}"
            ) from exc
        if not bool(torch.isfinite(z).all()):
            raise ProjectionError(
                f"ADMM projection of layer {name!r} onto {self.method} at {_spec_text(spec)} "
                "returned NaN / Inf"
            )
        return z

    def _allocate(self) -> None:
        """Budget mode, first step: let tnconv.compress allocate, read the ranks it chose."""
        assert self.budget is not None
        try:
            allocated = compress(
                self.model,
                self.decomposition,
                budget=self.budget,
                layers=[*self._layers, *self._depthwise],
                input_size=self.input_size,
                progress=self.progress,
                **self.options,
            )
        except TnconvError:
            raise
        except Exception as exc:
            raise ProjectionError(
                f"ADMM budget allocation with {self.method} failed: {type(exc).__name__}: {exc}"
            ) from exc
        reasons = dense_reasons(allocated)
        for name in self._layers:
            layer = allocated.get_submodule(name)
            if isinstance(layer, FactorizedConv2d):
                self.ranks[name] = tuple(layer.ranks)
            else:
                self.left_dense[name] = reasons.get(name, "left dense by the budget allocation")
        if not self.ranks:
            raise ProjectionError(
                f"the {self.method} budget allocation at {self.budget} kept every layer dense; "
                "nothing to train toward"
            )
        log.info("admm budget ranks: %s; dense: %s", self.ranks, list(self.left_dense))

    def _check_finite(self, name: str, w: torch.Tensor) -> None:
        if not bool(torch.isfinite(w.detach()).all()):
            bad = int((~torch.isfinite(w.detach())).sum())
            raise NonFiniteWeightError(
                f"layer {name!r}: its weight has {bad} NaN / Inf value(s) after "
                f"{self.steps} ADMM step(s) (rho {self.rho}); lower the learning rate or rho"
            )

    def _raise_non_finite(self) -> None:
        for name in self.layer_names:
            w = self._layers[name].weight
            self._check_finite(name, w)
            for key, store in (("Z", self.Z), ("U", self.U)):
                if not bool(torch.isfinite(store[name]).all()):
                    raise NonFiniteWeightError(f"layer {name!r}: ADMM's {key} holds NaN / Inf")
        raise NonFiniteWeightError(
            f"the ADMM penalty overflowed (rho {self.rho}) although every weight is finite"
        )

    def __repr__(self) -> str:
        spec = _spec_text(self.spec) if self.budget is None else f"budget={self.budget.share}"
        rho = "auto" if self.rho is None else format(self.rho, ".3g")
        return (
            f"ADMM(method={self.method!r}, {spec}, rho={rho}, steps={self.steps}, "
            f"layers={self.layer_names})"
        )


def _relative(w: torch.Tensor, z: torch.Tensor) -> float:
    norm = float(torch.linalg.vector_norm(w))
    diff = float(torch.linalg.vector_norm(w - z))
    return diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)


def _spec_text(spec: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in spec.items() if v is not None)
