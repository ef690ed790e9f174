"""Layers that execute factorizations: one executor, the dimension as data."""

from typing import Any

from torch import nn

from .base import FactorizedLayer
from .conv import FactorizedConv1d, FactorizedConv2d, FactorizedConv3d
from .linear import FactorizedLinear

# the dense layer each factorized layer replaces
FACTORIZED_TYPES: dict[type[nn.Module], type[FactorizedLayer]] = {
    nn.Linear: FactorizedLinear,
    nn.Conv1d: FactorizedConv1d,
    nn.Conv2d: FactorizedConv2d,
    nn.Conv3d: FactorizedConv3d,
}
# the dense layers tnconv factorizes
DENSE_TYPES: tuple[type[nn.Module], ...] = tuple(FACTORIZED_TYPES)


def factorized_type(module: nn.Module) -> type[FactorizedLayer]:
    """The factorized layer class that replaces ``module`` (an ``nn.Linear`` / ``nn.ConvNd``,
    or a subclass of one)."""
    for dense, factorized in FACTORIZED_TYPES.items():
        if isinstance(module, dense):
            return factorized
    raise TypeError(
        f"tnconv factorizes nn.Linear, nn.Conv1d, nn.Conv2d and nn.Conv3d layers; got "
        f"{type(module).__name__}"
    )


def kernel_fit_shape(module: nn.Module, tensorize: Any = None) -> tuple[int, ...]:
    """The 4-D kernel one group of ``module``'s weight is fitted as, channels tensorized as
    asked (see :class:`tnconv.decompositions.lifting.Lifting`): what structure queries
    (``bond_ranks``, ``num_params_at``) of a family take."""
    from ..decompositions.lifting import Lifting

    groups = int(getattr(module, "groups", 1))
    t, s, *k = module.weight.shape
    return Lifting.of((t // groups, s, *k), tensorize).fit_shape


__all__ = [
    "DENSE_TYPES",
    "FACTORIZED_TYPES",
    "FactorizedConv1d",
    "FactorizedConv2d",
    "FactorizedConv3d",
    "FactorizedLayer",
    "FactorizedLinear",
    "factorized_type",
    "kernel_fit_shape",
]
