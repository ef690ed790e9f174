"""The error at a model's outputs (logits) after replacing one layer: what a layer's error costs.

A layer's own relative output error does not weigh layers by their effect on the network's
output: the same error in the last conv before the classifier and in an early conv costs
different accuracy. :class:`LogitProbe` measures, on calibration batches, the relative error of
the model's outputs when one layer is replaced by a candidate module and every other layer is
left dense:

    e = ||f(x; layer -> candidate) - f(x)||_F / ||f(x)||_F   over the calibration inputs x.

It stays affordable by running the model's prefix once per layer: the model is traced
(``torch.fx``) and split at the layer's call into a prefix, which yields the layer's input and
every other value the rest of the model reads (a residual branch's input), and a suffix, which
takes the layer's output and those values; the prefix's results are cached on the calibration
batches, so a candidate costs one run of itself on the cached inputs and one run of the suffix.
Models that do not trace, or call the layer more than once, fall back to running the whole
model with the layer's output replaced by a forward hook (same numbers, more time). At most
``max_samples`` calibration inputs are used.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from .statistics import CalibrationDataError, _first_input

__all__ = ["LOGIT_SAMPLES", "LogitProbe"]

log = logging.getLogger(__name__)

# calibration inputs used for the logit errors: each candidate of each layer runs the model's
# suffix on them, so this bounds the allocation's cost (128 digits x 10 logits rank candidates
# the same way as 512 did on the digits CNN)
LOGIT_SAMPLES = 128


def _leaves(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, or tuples / lists / dicts of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _leaves(item)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in _leaves(item)]
    return []


class LogitProbe:
    """Relative output error of ``model`` with one layer replaced (see the module docstring).

    Args:
        model: the dense model (run in eval mode under ``no_grad``; its mode is restored).
            The probe keeps a reference: it must not be modified while the probe is used.
        batches: calibration inputs: tensors (B, ...) or ``(inputs, labels)`` pairs.
        max_samples: use at most this many inputs (the first ones, the last batch cut).

    Raises:
        CalibrationDataError: no input, or a model output with no tensor in it.
    """

    def __init__(
        self, model: nn.Module, batches: Iterable[Any], max_samples: int = LOGIT_SAMPLES
    ) -> None:
        if max_samples < 1:
            raise CalibrationDataError(f"max_samples must be >= 1; got {max_samples}")
        self.model = model
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else None
        if isinstance(batches, torch.Tensor):
            batches = [batches]
        inputs: list[torch.Tensor] = []
        taken = 0
        for batch in batches:
            if taken >= max_samples:
                break
            x = _first_input(batch)[: max_samples - taken]
            inputs.append(x.to(self.device) if self.device is not None else x)
            taken += x.shape[0]
        if not inputs:
            raise CalibrationDataError("the calibration set is empty: give at least one batch")
        self.inputs = inputs
        with self._eval(), torch.no_grad():
            self.reference = [self._outputs(self.model(x)) for x in inputs]
        self.energy = sum(float(r.square().sum()) for r in self.reference)
        if not self.energy > 0:
            raise CalibrationDataError("the model's outputs on the calibration inputs are zero")
        try:
            self.graph: fx.GraphModule | None = fx.symbolic_trace(model)
        except Exception as exc:  # dynamic control flow: run the whole model with a hook
            log.info("logit errors: the model does not trace (%s); running it whole", exc)
            self.graph = None
        self._cached: tuple[str, Any] | None = None  # one layer's split and prefix results
        self.evaluations = 0  # candidates scored (for logging and tests)

    def _eval(self) -> _EvalMode:
        return _EvalMode(self.model)

    def _outputs(self, out: Any) -> torch.Tensor:
        """The model's output tensors as one float64 (N, outputs) matrix."""
        leaves = _leaves(out)
        if not leaves:
            raise CalibrationDataError(
                f"the model's output ({type(out).__name__}) holds no tensor to compare"
            )
        return torch.cat([t.detach().reshape(t.shape[0], -1).double() for t in leaves], dim=1)

    def _split(self, name: str) -> tuple[fx.GraphModule, fx.GraphModule] | None:
        """(prefix, suffix) of the traced model around its one call of ``name``: prefix(x) ->
        (layer input, *saved values); suffix(layer output, *saved values) -> model output.
        None when the layer is not called exactly once with one positional input."""
        if self.graph is None:
            return None
        nodes = list(self.graph.graph.nodes)
        calls = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == name]
        if len(calls) != 1:
            return None
        k = calls[0]
        layer = nodes[k]
        if len(layer.args) != 1 or layer.kwargs or not isinstance(layer.args[0], fx.Node):
            return None
        before, after = nodes[:k], nodes[k + 1 :]
        later = set(after)
        saved = [n for n in before if any(u in later for u in n.users)]
        prefix = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in before:
            env[n] = prefix.node_copy(n, lambda a: env[a])
        prefix.output((env[layer.args[0]], *(env[n] for n in saved)))
        suffix = fx.Graph()
        env2: dict[fx.Node, fx.Node] = {layer: suffix.placeholder("layer_output")}
        for i, n in enumerate(saved):
            env2[n] = suffix.placeholder(f"saved_{i}")
        for n in after:
            env2[n] = suffix.node_copy(n, lambda a: env2[a])
        return fx.GraphModule(self.graph, prefix), fx.GraphModule(self.graph, suffix)

    def _prefix(self, name: str) -> Any:
        """The suffix and the cached prefix results of ``name`` (one layer cached at a time),
        or None for the whole-model fallback."""
        if self._cached is not None and self._cached[0] == name:
            return self._cached[1]
        split = self._split(name)
        if split is None:
            log.info("logit errors of %s: the whole model runs per candidate", name)
            cached = None
        else:
            prefix, suffix = split
            with self._eval(), torch.no_grad():
                cached = (suffix, [tuple(prefix(x)) for x in self.inputs])
        self._cached = (name, cached)
        return cached

    def error(self, name: str, module: nn.Module) -> float:
        """The relative error of the model's outputs on the calibration inputs with the layer
        ``name`` replaced by ``module`` (every other layer as in the model)."""
        try:
            self.model.get_submodule(name)
        except AttributeError as exc:
            raise CalibrationDataError(f"no layer named {name!r} in the model") from exc
        cached = self._prefix(name)
        num = 0.0
        was_training = module.training
        module.eval()
        try:
            with self._eval(), torch.no_grad():
                if cached is not None:
                    suffix, saved = cached
                    for (x, *rest), ref in zip(saved, self.reference, strict=True):
                        out = self._outputs(suffix(module(x), *rest))
                        num += float((out - ref).square().sum())
                else:
                    target = self.model.get_submodule(name)
                    if module is target:  # the dense layer itself: no replacement
                        return 0.0
                    handle = target.register_forward_hook(lambda _m, args, _o: module(*args))
                    try:
                        for x, ref in zip(self.inputs, self.reference, strict=True):
                            out = self._outputs(self.model(x))
                            num += float((out - ref).square().sum())
                    finally:
                        handle.remove()
        finally:
            module.train(was_training)
        self.evaluations += 1
        return (num / self.energy) ** 0.5

    def scorers(self, names: Sequence[str]) -> dict[str, Any]:
        """``{name: module -> relative output error}`` for the layers ``names``."""
        return {name: (lambda module, name=name: self.error(name, module)) for name in names}


class _EvalMode:
    """Context: the model in eval mode (its mode restored on exit)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.was_training = model.training

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)
