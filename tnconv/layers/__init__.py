"""Layers that execute factorizations: one executor, the dimension as data."""

from .base import FactorizedLayer
from .conv import FactorizedConv1d, FactorizedConv2d, FactorizedConv3d
from .linear import FactorizedLinear

__all__ = [
    "FactorizedConv1d",
    "FactorizedConv2d",
    "FactorizedConv3d",
    "FactorizedLayer",
    "FactorizedLinear",
]
