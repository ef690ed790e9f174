"""tnconv: compress convolutional networks with tensor-network decompositions.

Public API (see docs/): the registry (``available``, ``get``, ``register``), the
:class:`Decomposition` base class and its :class:`Factorization` result, and the generic
:class:`FactorizedConv2d` layer that executes any registered decomposition.
"""

from .decompositions.base import Decomposition
from .errors import (
    BudgetError,
    EquationError,
    InvalidWeightError,
    OptionError,
    PluginLoadError,
    RankSpecError,
    RegistrationError,
    TnconvError,
    UnknownMethodError,
)
from .factorization import Factorization
from .layers import FactorizedConv2d
from .registry import available, get, refresh, register, unregister

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "Decomposition",
    "EquationError",
    "Factorization",
    "FactorizedConv2d",
    "InvalidWeightError",
    "OptionError",
    "PluginLoadError",
    "RankSpecError",
    "RegistrationError",
    "TnconvError",
    "UnknownMethodError",
    "__version__",
    "available",
    "get",
    "refresh",
    "register",
    "unregister",
]
