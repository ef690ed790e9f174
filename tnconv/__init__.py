"""tnconv: compress convolutional networks with tensor-network decompositions.

Public API (see docs/): the registry (``available``, ``get``, ``register``), the
:class:`Decomposition` base class and its :class:`Factorization` result, the generic
:class:`FactorizedConv2d` layer that executes any registered decomposition, and whole-model
tools: ``compress``, ``summary``, ``save`` / ``load``, ``study``, and :class:`ADMM` (training
toward a decomposition before compressing).
"""

from .admm import ADMM
from .compress import Budget, compress, dense_reasons
from .decompositions.base import Decomposition
from .errors import (
    ADMMError,
    BudgetError,
    EquationError,
    InvalidWeightError,
    NonFiniteWeightError,
    OptionError,
    PluginLoadError,
    ProjectionError,
    RankSpecError,
    RegistrationError,
    TnconvError,
    UnknownMethodError,
)
from .factorization import Factorization
from .io import load, save
from .layers import FactorizedConv2d
from .registry import (
    available,
    get,
    refresh,
    register,
    register_derived,
    unregister,
    unregister_derived,
)
from .study import StudyResult, study
from .summary import Summary, summary

__version__ = "0.1.0"

__all__ = [
    "ADMM",
    "ADMMError",
    "Budget",
    "BudgetError",
    "Decomposition",
    "EquationError",
    "Factorization",
    "FactorizedConv2d",
    "InvalidWeightError",
    "NonFiniteWeightError",
    "OptionError",
    "PluginLoadError",
    "ProjectionError",
    "RankSpecError",
    "RegistrationError",
    "StudyResult",
    "Summary",
    "TnconvError",
    "UnknownMethodError",
    "__version__",
    "available",
    "compress",
    "dense_reasons",
    "get",
    "load",
    "refresh",
    "register",
    "register_derived",
    "save",
    "study",
    "summary",
    "unregister",
    "unregister_derived",
]
