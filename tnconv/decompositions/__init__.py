"""Decomposition families, one module each. They register themselves with :mod:`tnconv.registry`;
look them up with ``tnconv.get(name)`` rather than importing these modules."""

from .base import Decomposition, NoOptions

__all__ = ["Decomposition", "NoOptions"]
