"""Layers that execute factorizations."""

from .conv import FactorizedConv2d

__all__ = ["FactorizedConv2d"]
