"""The derived family ``admm-<base>``: a base method's algebra, trained with ADMM first.

ADMM-regularized compression (Yin et al., CVPR 2021) changes how the network is *trained*, not
the tensor network: the kernels are pulled toward the base method's low-rank set while training
in dense form (:class:`tnconv.ADMM`), then factorized by the base method itself. So
``tnconv.get("admm-tt").factorize(w, r)`` is exactly ``tnconv.get("tt").factorize(w, r)`` (same
factors, ranks, equation and ``method`` tag ``"tt"``), and :meth:`ADMMDecomposition.trainer`
hands out the trainer. The classes are made by :func:`make_admm` for every base method, plugins
included, through :func:`tnconv.registry.register_derived`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..factorization import Factorization, KernelShape
from ..registry import register_derived
from .base import Decomposition

if TYPE_CHECKING:  # the trainer is model-level; imported only when handed out
    from torch import nn

    from ..admm import ADMM

__all__ = ["ADMMDecomposition", "make_admm"]


class ADMMDecomposition(Decomposition):
    """``admm-<base>``: every algebraic call delegates to the base method; see the module doc."""

    base_name: ClassVar[str] = ""
    base_class: ClassVar[type[Decomposition]]
    training_time: ClassVar[bool] = True

    def __init__(self) -> None:
        self.base = self.base_class()
        self.base.name = self.base_name

    def factorize(
        self, weight: Any, rank: Any = None, *, eps: Any = None, ratio: Any = None, **options: Any
    ) -> Factorization:
        """The base method's factorization (the ADMM part happens during training: see
        :meth:`trainer`). Same arguments, result and errors as the base's ``factorize``."""
        return self.base.factorize(weight, rank, eps=eps, ratio=ratio, **options)

    def parse_options(self, options: dict[str, Any]) -> Any:
        return self.base.parse_options(options)

    def bond_ranks(self, rank: int | tuple[int, ...], shape: KernelShape) -> tuple[int, ...]:
        return self.base.bond_ranks(rank, shape)

    def fit(self, weight: torch.Tensor, ranks: tuple[int, ...], options: Any) -> Factorization:
        return self.base.fit(weight, ranks, options)

    def num_params_at(self, shape: KernelShape, ranks: tuple[int, ...]) -> int:
        return self.base.num_params_at(shape, ranks)

    def fit_eps(self, weight: torch.Tensor, eps: float, options: Any) -> Factorization:
        return self.base.fit_eps(weight, eps, options)

    def fit_ratio(self, weight: torch.Tensor, budget: int, options: Any) -> Factorization:
        return self.base.fit_ratio(weight, budget, options)

    def search_options(self, options: Any) -> Any:
        return self.base.search_options(options)

    def trainer(
        self,
        model: nn.Module,
        rank: Any = None,
        *,
        eps: Any = None,
        ratio: Any = None,
        budget: Any = None,
        rho: float | None = None,
        **kwargs: Any,
    ) -> ADMM:
        """``tnconv.ADMM(model, <base>, ...)``: the trainer that does this method's work."""
        from ..admm import ADMM  # model-level; the algebra module only hands it out

        return ADMM(
            model, self.base_name, rank, eps=eps, ratio=ratio, budget=budget, rho=rho, **kwargs
        )


def make_admm(base_name: str, base_class: type[Decomposition]) -> type[ADMMDecomposition]:
    """The ``admm-<base_name>`` class: the base's options, rank order and eps guarantee."""
    return type(
        f"ADMM{base_class.__name__}",
        (ADMMDecomposition,),
        {
            "__doc__": f"admm-{base_name}: {base_name}'s algebra after ADMM training "
            "(tnconv.ADMM); factorize equals the base method's.",
            "__module__": __name__,
            "name": f"admm-{base_name}",
            "base_name": base_name,
            "base_class": base_class,
            "rank_order": base_class.rank_order,
            "guarantees_eps": base_class.guarantees_eps,
            "Options": base_class.Options,
        },
    )


register_derived("admm", make_admm)
