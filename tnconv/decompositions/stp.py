"""Semi-tensor Tucker (``sttucker``), semi-tensor train (``stt``) and semi-tensor ring (``str``).

Zhao, Liu, Huang, Zhu, "Semi-tensor Product-based Tensor Decomposition for Neural Network
Compression" (arXiv 2109.15200) connect the factors of Tucker / TT / TR with the left
semi-tensor product ``A ⋉ B = A (B ⊗ I_t)`` (``A`` m x tp, ``B`` p x q) instead of the matrix
product, so that the connected factor is t times smaller along the bond and along its mode. On a
kernel (T, S, kh, kw) the identity's index of size t must land in a mode that t divides, so it
lands in a channel mode (never in a 3x3 spatial mode); the structures (docs/stp.md) are:

* ``sttucker``: ``W = G ⋉_1 U_T ⋉_2 U_S`` (Tucker-2), ``U_T`` (T/t, R_T/t), ``U_S`` (S/t, R_S/t),
  core (R_T/t, R_S/t, kh, t, kw, t). Ranks ``(R_T, R_S)``; t divides both and T, S.
* ``stt``: the T-S bond is a left STP: ``G_T`` (T, r1/t, t) ⋉ ``G_S`` (r1/t, S/t, r2), then
  ``G_h`` (r2, kh, r3), ``G_w`` (r3, kw). Ranks ``(r1, r2, r3)``; t divides r1 and S.
* ``str``: the closing bond kw-T and the bond T-S are left STPs: ``G_T`` (r0/t, T/t, r1/t, t),
  ``G_S`` (r1/t, S/t, r2), ``G_h`` (r2, kh, r3), ``G_w`` (r3, kw, r0/t, t). Ranks
  ``(r0, r1, r2, r3)``; t divides r0, r1, T and S.

Where the identity's index sits in a channel mode (option ``identity``). The paper's left STP
(``B ⊗ I_t``) makes it the channel's inner part, c = j t + a ("inner"); "outer" takes the same
network on the channels in another order, c = a (C / t) + j (``I_t ⊗ B``): the feature map then
splits into t contiguous channel blocks, the groups a grouped convolution reads and writes, so
the layer runs its steps without the channel-regrouping copies the inner order needs (measured
at 64@56 channels-last: ``str`` 1.22 -> 0.69 ms at batch 1, ``stt`` 0.47 -> 0.35 ms;
docs/speed.md). A network of one order fits any kernel exactly as well as the other fits the
kernel with its channels permuted; channel order carries no meaning in a trained network, so
neither fits trained kernels better in general. Defaults: "outer" for ``stt`` and ``str``,
"inner" for ``sttucker`` (whose inner plans already run at their kernels' speed).

Fitting. Moving each identity index from the mode it lands in to the factor that carries it
(:func:`~tnconv.decompositions._stp.move_inner_factor`, a relabelling of entries) turns the
kernel W into a tensor V whose *classical* Tucker-2 / TT / TR at the ranks divided by t is
exactly the semi-tensor network of W, factor for factor, with the same parameters and the same
Frobenius error. So each method fits its classical twin to V (HOSVD + HOOI, TT-SVD + ALS,
TR-SVD + ALS) and reshapes the factors; every eps guarantee of the twin carries over, and at
t = 1 (V = W) the result is the classical decomposition itself.
"""

from __future__ import annotations

import copy
import math
from abc import abstractmethod
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import RankSpecError, StructureError
from ..factorization import MODE_NAMES, Factorization, KernelShape, validate_weight
from ..rank import ParamRatio, parse_rank_spec
from ..registry import register
from . import lifting
from ._linalg import cached
from ._stp import move_inner_factor
from .base import Decomposition
from .tr import TR, TROptions
from .tt import TT, TTOptions
from .tucker import Tucker, TuckerOptions

__all__ = ["STR", "STT", "STTucker"]

TFactor = Annotated[int, Field(gt=0, le=1024, strict=True)]
# where the identity's index of size t sits in each channel mode it lands in (module docstring)
Identity = Literal["inner", "outer"]
# the options a semi-tensor method adds to its classical twin's
_OWN_OPTIONS = frozenset({"t", "identity"})


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class _SemiTensor(Decomposition):
    """Shared machinery: W -> V, the classical twin on V, factors reshaped back.

    Subclasses define the twin, which channel modes t must divide, which bonds are semi-tensor
    (t must divide them), the relabelling W -> V and the factors' reshaping.
    """

    guarantees_eps = True
    twin: ClassVar[type[Decomposition]]
    # kernel modes (0 = T, 1 = S) whose size t must divide
    channel_modes: ClassVar[tuple[int, ...]]
    # positions in the rank tuple of the bonds that are left STPs (sizes t times the twin's)
    stp_bonds: ClassVar[tuple[int, ...]]
    t: int = 2  # bound per call by factorize (from the options); the default is the option's
    identity: str = "inner"  # bound likewise

    # -- the STP factor t ----------------------------------------------------------------------
    def factorize(
        self,
        weight: Any,
        rank: Any = None,
        *,
        eps: Any = None,
        ratio: Any = None,
        statistics: Any = None,
        groups: int = 1,
        tensorize: Any = None,
        **options: Any,
    ) -> Factorization:
        """As :meth:`Decomposition.factorize`, with the option ``t`` (positive int, default 2).

        Raises :class:`~tnconv.errors.StructureError` (a ``RankSpecError``) when t does not
        divide a channel count or a rank it must divide; the message names what would work.
        """
        w = validate_weight(weight, tuple(MODE_NAMES))
        spec = parse_rank_spec(rank, eps, ratio)
        opts = self.parse_options(options)
        bound = self.bind(opts)
        if isinstance(spec, ParamRatio) and isinstance(groups, int) and groups > 0:
            t, s_, *k = w.shape
            lift = lifting.Lifting.of((t // groups, s_, *k), tensorize)
            bound.check_shape(lift.fit_shape)  # type: ignore[attr-defined]
        return Decomposition.factorize(
            bound,
            w,
            rank,
            eps=eps,
            ratio=ratio,
            statistics=statistics,
            groups=groups,
            tensorize=tensorize,
            **options,
        )

    def bind(self, options: BaseModel) -> _SemiTensor:
        """A copy whose ranks, parameter counts and channel order use ``options.t`` and
        ``options.identity``."""
        bound = copy.copy(self)
        bound.t = options.t  # type: ignore[attr-defined]
        bound.identity = options.identity  # type: ignore[attr-defined]
        return bound

    def min_ranks(self, shape: KernelShape) -> tuple[int, ...]:
        """The twin's smallest network on V: t on the semi-tensor bonds, 1 elsewhere."""
        vshape = self.v_shape(shape)
        return self.from_twin_ranks(self.twin().bond_ranks(1, vshape))

    def check_shape(self, shape: KernelShape) -> None:
        """Raise :class:`StructureError` unless t divides the channel modes it lands in."""
        bad = [("T", "S")[m] for m in self.channel_modes if shape[m] % self.t]
        if bad:
            sizes = [shape[m] for m in self.channel_modes]
            ok = _divisors(math.gcd(*sizes))
            raise StructureError(
                f"{self.name}: t={self.t} must divide the channel mode(s) "
                f"{', '.join(bad)} of the {tuple(shape)} kernel; t that work here: {ok}"
            )

    def v_shape(self, shape: KernelShape) -> KernelShape:
        """Shape of the relabelled tensor V the twin decomposes."""
        self.check_shape(shape)
        return tuple(self.to_v(torch.empty(shape, device="meta")).shape)  # type: ignore[return-value]

    def to_twin_ranks(self, ranks: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(r // self.t if k in self.stp_bonds else r for k, r in enumerate(ranks))

    def from_twin_ranks(self, ranks: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(r * self.t if k in self.stp_bonds else r for k, r in enumerate(ranks))

    # -- Decomposition interface ---------------------------------------------------------------
    def bond_ranks(self, rank: int | tuple[int, ...], shape: KernelShape) -> tuple[int, ...]:
        """Expand and cap like the twin on V; t must divide the semi-tensor bonds.

        A bond above what the network can carry is capped (to a multiple of t); a bond within
        that limit must be a multiple of t, else :class:`StructureError` names the nearest ones.
        """
        asked = self.expand_ranks(rank, self.n_bonds) if isinstance(rank, int) else tuple(rank)
        if len(asked) != self.n_bonds:
            raise RankSpecError(
                f"{self.name} takes {self.n_bonds} ranks {self.rank_order}; got {len(asked)}: "
                f"{rank}"
            )
        vshape = self.v_shape(shape)
        t = self.t
        twin_asked = tuple(-(-r // t) if k in self.stp_bonds else r for k, r in enumerate(asked))
        twin_capped = self.twin().bond_ranks(twin_asked, vshape)
        bad = [
            k
            for k in self.stp_bonds
            if asked[k] % t and twin_capped[k] == twin_asked[k]  # not capped: must be divisible
        ]
        if bad:
            hints = "; ".join(
                f"bond {k}: {asked[k]} -> {', '.join(str(r) for r in self._near(asked[k]))}"
                for k in bad
            )
            raise StructureError(
                f"{self.name}: t={t} must divide the rank(s) of the semi-tensor bond(s) "
                f"{[k for k in self.stp_bonds]} of {self.rank_order}; ranks that work: {hints}"
            )
        return self.log_capped(asked, self.from_twin_ranks(twin_capped))

    def _near(self, r: int) -> list[int]:
        below = (r // self.t) * self.t
        return [x for x in (below, below + self.t) if x > 0]

    @property
    def n_bonds(self) -> int:
        return len(self.stp_bonds) + self.n_plain_bonds

    n_plain_bonds: ClassVar[int] = 0

    def num_params_at(self, shape: KernelShape, ranks: tuple[int, ...]) -> int:
        return self.twin().num_params_at(self.v_shape(shape), self.to_twin_ranks(ranks))

    def twin_options(self, options: BaseModel) -> BaseModel:
        return self.twin.Options.model_validate(options.model_dump(exclude=_OWN_OPTIONS))

    def fit(self, weight: torch.Tensor, ranks: tuple[int, ...], options: Any) -> Factorization:
        v = self._v(weight, options)
        twin = self.twin().fit(v, self.to_twin_ranks(ranks), self.twin_options(options))
        return self._wrap(twin, tuple(weight.shape))

    def fit_eps(self, weight: torch.Tensor, eps: float, options: Any) -> Factorization:
        v = self._v(weight, options)
        return self._wrap(
            self.twin().fit_eps(v, eps, self.twin_options(options)), tuple(weight.shape)
        )

    def fit_ratio(self, weight: torch.Tensor, budget: int, options: Any) -> Factorization:
        v = self._v(weight, options)
        return self._wrap(
            self.twin().fit_ratio(v, budget, self.twin_options(options)), tuple(weight.shape)
        )

    def _v(self, weight: torch.Tensor, options: Any) -> torch.Tensor:
        self.t, self.identity = options.t, options.identity
        self.check_shape(tuple(weight.shape))  # type: ignore[arg-type]
        # one V per kernel, t and order, so the twin's per-kernel spectra (cached on the tensor
        # it is given) are shared by every candidate of a search: a new V per fit recomputed them
        return cached(
            weight,
            ("stp-v", self.name, self.t, self.identity),
            lambda: self.to_v(self._inner_order(weight)),
        )

    def _inner_order(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` with each channel mode the identity lands in taken in the inner order:
        channel ``j t + a`` of the result is channel ``a (C / t) + j`` of an "outer" kernel."""
        if self.identity == "inner":
            return weight
        for mode in self.channel_modes:
            size = weight.shape[mode]
            blocks = weight.unflatten(mode, (self.t, size // self.t)).transpose(mode, mode + 1)
            weight = blocks.flatten(mode, mode + 1)
        return weight

    def search_options(self, options: Any) -> Any:
        quick = self.twin().search_options(self.twin_options(options))
        return self.Options.model_validate(
            {**quick.model_dump(), **options.model_dump(include=_OWN_OPTIONS)}
        )

    def _wrap(self, twin: Factorization, shape: KernelShape) -> Factorization:
        factors, equation, modes = self.from_twin(twin.factors, shape)
        if self.identity == "outer":
            # the same factors; each channel mode's identity index (the inner one of the two
            # in ``from_twin``'s modes) becomes its outer one
            modes = tuple(m[::-1] if k in self.channel_modes else m for k, m in enumerate(modes))
            equation = f"{equation.split('->')[0]}->{''.join(modes)}"
        info = {k: v for k, v in twin.info.items() if k != "relative_error"}
        return Factorization(
            factors,
            equation,
            shape,
            self.from_twin_ranks(twin.ranks),
            method=self.name,
            modes=modes,
            info={
                **info,
                "t": self.t,
                "identity": self.identity,
                "twin": twin.method,
                "twin_ranks": list(twin.ranks),
            },
        )

    # -- what each structure defines -----------------------------------------------------------
    @abstractmethod
    def to_v(self, weight: torch.Tensor) -> torch.Tensor:
        """Relabel W (T, S, kh, kw) into the tensor V the classical twin decomposes."""

    @abstractmethod
    def from_twin(
        self, factors: list[torch.Tensor], shape: KernelShape
    ) -> tuple[list[torch.Tensor], str, tuple[str, str, str, str]]:
        """The twin's factors on V as the semi-tensor factors of W, their equation and modes."""


# ---------------------------------------------------------------------------------------------
class STTuckerOptions(BaseModel):
    """Options of ``sttucker`` (those of ``tucker``'s Tucker-2, plus t and the identity's
    place)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    t: TFactor = 2
    identity: Identity = "inner"
    # tucker's own defaults, so that t = 1 is exactly the classical Tucker-2
    max_iter: Annotated[int, Field(ge=0, le=10_000)] = TuckerOptions.model_fields[
        "max_iter"
    ].default
    tol: Annotated[float, Field(ge=0.0, lt=1.0)] = TuckerOptions.model_fields["tol"].default
    shrink: bool = TuckerOptions.model_fields["shrink"].default


@register("sttucker")
class STTucker(_SemiTensor):
    """Semi-tensor Tucker-2: ``W = G ⋉_1 U_T ⋉_2 U_S``. Ranks (R_T, R_S), both multiples of t.

    Factors ``[G (R_T/t, R_S/t, kh, t, kw, t), U_T (T/t, R_T/t), U_S (S/t, R_S/t)]``, equation
    ``"rqhawb,ir,jq->iajbhw"`` with T = (i, a), S = (j, b) (the default ``identity="inner"``;
    ``"...->aibjhw"``, T = (a, i), S = (b, j), with "outer"). Params
    ``R_T R_S kh kw + (T R_T + S R_S) / t^2``.
    """

    rank_order = "(R_T, R_S): the output- and input-channel ranks (Tucker-2), multiples of t"
    Options = STTuckerOptions
    twin = Tucker
    channel_modes = (0, 1)
    stp_bonds = (0, 1)

    def twin_options(self, options: BaseModel) -> BaseModel:
        fields = options.model_dump(exclude=_OWN_OPTIONS)
        return TuckerOptions.model_validate({**fields, "full": False})

    def search_options(self, options: Any) -> Any:
        # as tucker's: the twin is Tucker-2 on V, whose HOSVD truncations of one cached set of
        # bases have exact errors; 5 HOOI sweeps per candidate made sttucker's budget searches
        # the slowest of all (ResNet-50: 221 s against tucker's 43 s)
        return options.model_copy(update={"max_iter": 0, "shrink": False})

    def to_v(self, weight: torch.Tensor) -> torch.Tensor:
        # T = (i, a) -> a joins kh;  S = (j, b) -> b joins kw:  V (T/t, S/t, t kh, t kw)
        return move_inner_factor(move_inner_factor(weight, 0, 2, self.t), 1, 3, self.t)

    def from_twin(
        self, factors: list[torch.Tensor], shape: KernelShape
    ) -> tuple[list[torch.Tensor], str, tuple[str, str, str, str]]:
        core, u_t, u_s = factors
        t, (_, _, kh, kw) = self.t, shape
        # V's modes t*kh and t*kw are (h, a) and (w, b), the moved index inner
        g = core.reshape(core.shape[0], core.shape[1], kh, t, kw, t)
        return [g, u_t, u_s], "rqhawb,ir,jq->iajbhw", ("ia", "jb", "h", "w")


# ---------------------------------------------------------------------------------------------
class STTOptions(TTOptions):
    """Options of ``stt`` (those of ``tt``, plus t and the identity's place)."""

    t: TFactor = 2
    identity: Identity = "outer"


@register("stt")
class STT(_SemiTensor):
    """Semi-tensor train: ``G_T ⋉ G_S`` on the T-S bond, then ``G_h``, ``G_w`` as in TT.

    Factors ``[G_T (T, r1/t, t), G_S (r1/t, S/t, r2), G_h (r2, kh, r3), G_w (r3, kw)]``,
    equation ``"tpa,pjb,bhc,cw->tajhw"`` with S = (a, j) (the default ``identity="outer"``;
    ``"...->tjahw"``, S = (j, a), with "inner"). Params
    ``T r1 + r1 S r2 / t^2 + r2 kh r3 + r3 kw``.
    """

    rank_order = "(r1, r2, r3): the bonds T-S (a multiple of t), S-kh, kh-kw"
    Options = STTOptions
    twin = TT
    channel_modes = (1,)
    stp_bonds = (0,)
    n_plain_bonds = 2

    def to_v(self, weight: torch.Tensor) -> torch.Tensor:
        # S = (j, a) -> a joins T: V (T t, S/t, kh, kw), the twin's first core G_T as (T t, r1/t)
        return move_inner_factor(weight, 1, 0, self.t)

    def from_twin(
        self, factors: list[torch.Tensor], shape: KernelShape
    ) -> tuple[list[torch.Tensor], str, tuple[str, str, str, str]]:
        g_t, g_s, g_h, g_w = factors
        g_t = g_t.reshape(shape[0], self.t, g_t.shape[1]).permute(0, 2, 1).contiguous()
        return [g_t, g_s, g_h, g_w], "tpa,pjb,bhc,cw->tjahw", ("t", "ja", "h", "w")


# ---------------------------------------------------------------------------------------------
class STROptions(TROptions):
    """Options of ``str`` (those of ``tr``, plus t and the identity's place)."""

    t: TFactor = 2
    identity: Identity = "outer"


@register("str")
class STR(_SemiTensor):
    """Semi-tensor ring: the closing bond kw-T and the bond T-S are left STPs.

    Factors ``[G_T (r0/t, T/t, r1/t, t), G_S (r1/t, S/t, r2), G_h (r2, kh, r3),
    G_w (r3, kw, r0/t, t)]``, equation ``"piqa,qjb,bhc,cwpd->diajhw"`` with T = (d, i),
    S = (a, j) (the default ``identity="outer"``; ``"...->idjahw"``, T = (i, d), S = (j, a),
    with "inner"). Params ``r0 T r1 / t^2 + r1 S r2 / t^2 + r2 kh r3 + r3 kw r0``.
    """

    rank_order = "(r0, r1, r2, r3): the bonds kw-T (closing) and T-S (multiples of t), S-kh, kh-kw"
    Options = STROptions
    twin = TR
    channel_modes = (0, 1)
    stp_bonds = (0, 1)
    n_plain_bonds = 2

    def to_v(self, weight: torch.Tensor) -> torch.Tensor:
        # T = (i, d) -> d joins kw; then S = (j, a) -> a joins T: V (T, S/t, kh, kw t)
        return move_inner_factor(move_inner_factor(weight, 0, 3, self.t), 1, 0, self.t)

    def from_twin(
        self, factors: list[torch.Tensor], shape: KernelShape
    ) -> tuple[list[torch.Tensor], str, tuple[str, str, str, str]]:
        g_t, g_s, g_h, g_w = factors
        t = self.t
        p, _, q = g_t.shape
        g_t = g_t.reshape(p, shape[0] // t, t, q).permute(0, 1, 3, 2).contiguous()
        c, _, p2 = g_w.shape
        g_w = g_w.reshape(c, shape[3], t, p2).permute(0, 1, 3, 2).contiguous()
        return [g_t, g_s, g_h, g_w], "piqa,qjb,bhc,cwpd->idjahw", ("id", "ja", "h", "w")
