"""tnconv: compress convolutional networks with tensor-network decompositions.

Public API (see docs/): the registry (``available``, ``get``, ``register``), the
:class:`Decomposition` base class and its :class:`Factorization` result, the generic
:class:`FactorizedConv2d` layer that executes any registered decomposition, and whole-model
tools: ``compress``, ``summary``, ``save`` / ``load``, ``study``, ``quantize`` (quantized
factors and feature maps) and ``select_ranks`` (rank selection by a user metric); compressibility
analysis (``tnconv.analysis``: cuts, spectra, entropies, truncation sweeps) and the per-layer
method / rank ``recommend``ation behind ``compress(model, "auto", budget=...)``; :class:`ADMM`
(training toward a decomposition before compressing).
"""

from . import analysis
from .admm import ADMM
from .bn_folding import fold_batchnorm
from .compress import Budget, compress, dense_reasons
from .decompositions.base import Decomposition
from .errors import (
    ADMMError,
    BudgetError,
    EquationError,
    InvalidWeightError,
    LoaderError,
    LoadError,
    NonFiniteWeightError,
    NotPicklableError,
    OptionError,
    PluginLoadError,
    ProjectionError,
    RankSpecError,
    RegistrationError,
    StructureError,
    StudyError,
    TnconvError,
    UnknownMethodError,
    UntrustedFileError,
)
from .factorization import Factorization
from .io import load, save
from .layers import (
    FactorizedConv1d,
    FactorizedConv2d,
    FactorizedConv3d,
    FactorizedLayer,
    FactorizedLinear,
)
from .quantization import quantize
from .recommend import Recommendation, recommend
from .registry import (
    available,
    get,
    refresh,
    register,
    register_derived,
    unregister,
    unregister_derived,
)
from .selection import RankSelection, select_ranks
from .statistics import InputStatistics, calibrate_inputs
from .study import StudyResult, study
from .summary import Summary, summary
from .training import finetune

__version__ = "0.1.0"

__all__ = [
    "ADMM",
    "ADMMError",
    "Budget",
    "BudgetError",
    "Decomposition",
    "EquationError",
    "Factorization",
    "FactorizedConv1d",
    "FactorizedConv2d",
    "FactorizedConv3d",
    "FactorizedLayer",
    "FactorizedLinear",
    "InputStatistics",
    "InvalidWeightError",
    "LoadError",
    "LoaderError",
    "NonFiniteWeightError",
    "NotPicklableError",
    "OptionError",
    "PluginLoadError",
    "ProjectionError",
    "RankSelection",
    "RankSpecError",
    "Recommendation",
    "RegistrationError",
    "StructureError",
    "StudyError",
    "StudyResult",
    "Summary",
    "TnconvError",
    "UnknownMethodError",
    "UntrustedFileError",
    "__version__",
    "analysis",
    "available",
    "calibrate_inputs",
    "compress",
    "dense_reasons",
    "finetune",
    "fold_batchnorm",
    "get",
    "load",
    "quantize",
    "recommend",
    "refresh",
    "register",
    "register_derived",
    "save",
    "select_ranks",
    "study",
    "summary",
    "unregister",
    "unregister_derived",
]
