"""Typed errors raised by tnconv.

Every error a user can trigger with bad input derives from one of the built-in exception types a
caller would expect (``ValueError`` for bad values, ``KeyError`` for unknown names, ``TypeError``
for wrong types), so ``except ValueError`` keeps working, while the subclasses let callers tell
tnconv's complaints apart.
"""

from __future__ import annotations


class TnconvError(Exception):
    """Base class of every error tnconv raises on purpose."""


class InvalidWeightError(TnconvError, ValueError):
    """The kernel handed to ``factorize`` is not a finite, non-empty floating tensor of 2 to 5
    modes (T, S, *k), or its shape does not fit the request (e.g. groups)."""


class KernelOrderError(InvalidWeightError):
    """The method has no meaning for a kernel of this order (number of modes); names the
    methods that have one."""


class RankSpecError(TnconvError, ValueError):
    """A rank / eps / ratio specification is missing, ambiguous or out of range."""


class StructureError(RankSpecError):
    """The method's network cannot take these ranks / this kernel shape at these options (e.g. a
    semi-tensor factor t that does not divide a rank or a channel count); names what works."""


class OptionError(TnconvError, ValueError):
    """A decomposition option is unknown or has a bad value."""


class LoaderError(TnconvError, TypeError):
    """A training loader is not a sized iterable of ``(inputs, labels)`` tensor batches, or is
    empty (``tnconv.finetune``)."""


class BudgetError(TnconvError, ValueError):
    """No factorization of the requested family fits the requested parameter budget."""


class UnknownMethodError(TnconvError, KeyError):
    """No decomposition is registered under the requested name."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly instead
        return str(self.args[0]) if self.args else ""


class RegistrationError(TnconvError, ValueError):
    """A decomposition could not be registered (bad name, clash, not a Decomposition)."""


class EquationError(TnconvError, ValueError):
    """A factorization's einsum equation does not describe a valid conv-kernel network."""


class PluginLoadError(TnconvError, ImportError):
    """A decomposition plugin's entry point was found but could not be loaded."""


class InputShapeError(TnconvError, ValueError, RuntimeError):
    """A layer's input has the wrong number of dimensions or channels.

    ``torch.nn.Conv2d`` raises ``RuntimeError`` for these; this error is both that and a
    ``ValueError``, so either ``except`` clause catches it.
    """


class ADMMError(TnconvError, RuntimeError):
    """An ADMM trainer was used out of order (``compress()`` before any ``step()``) or given a
    state that does not match its model."""


class ProjectionError(ADMMError):
    """ADMM's projection (factorize at the spec, then reconstruct) failed for a layer."""


class NonFiniteWeightError(ADMMError, FloatingPointError):
    """A weight (or ADMM's Z / U for it) became NaN or Inf during training; names the layer."""


class LoadError(TnconvError, ValueError):
    """A file is not a tnconv save (or is truncated, corrupt, or of an unknown format version),
    or does not fit the model it is loaded into; names the file and the problem."""


class UntrustedFileError(LoadError):
    """Loading this file would unpickle Python objects it carries (its saved architecture, or a
    whole pickled model), which can run arbitrary code; tnconv does that only when told the file
    is trusted (``trusted=True``, CLI ``--trust-file``). Passing the architecture instead
    (``model=``, ``model_fn=``, CLI ``--model module:function``) needs no trust."""


class NotPicklableError(TnconvError, TypeError):
    """Something a parallel study must send to worker processes (``evaluate``, ``fine_tune``,
    the model or its factory) cannot be pickled; names it."""


class StudyError(TnconvError, ValueError):
    """A study's executor, workers or resume file is unusable (an unknown executor, a resume CSV
    written for another model or grid)."""
