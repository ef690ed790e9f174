"""Batch-norm folding: a conv followed by BatchNorm2d becomes the one conv it computes in eval.

In eval mode ``BN(conv(x)) = g (W * x + b - mu) / sqrt(var + eps) + beta`` is a conv with kernel
``W g / sigma`` (per output channel) and bias ``(b - mu) g / sigma + beta``. Factorizing that
kernel fits what the layer pair computes (AIMET folds before compressing for this reason); the
folded model equals the original in eval mode and trains like any model without BN.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Collection

import torch
from torch import fx, nn

from ._modes import plain_copy, plain_tensors

__all__ = ["FOLDED_BN", "conv_bn_pairs", "fold_batchnorm", "remove_folded"]

# attribute of a model with folded BNs: {bn name: conv name}, so a saved model can be rebuilt
# from its dense architecture (tnconv.load(path, model=dense) removes the same BNs)
FOLDED_BN = "_tnconv_folded_bn"

log = logging.getLogger(__name__)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, bn name)`` for every ``nn.Conv2d`` whose output feeds only a
    ``BatchNorm2d`` of its channel count, found by tracing the model (torch.fx); models that do
    not trace fall back to adjacent modules of ``nn.Sequential`` containers."""
    modules = dict(model.named_modules())
    pairs: list[tuple[str, str]] = []
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # dynamic control flow: no graph, use Sequential adjacency
        log.info("BN folding: the model does not trace (%s); using nn.Sequential order", exc)
        for name, module in modules.items():
            if isinstance(module, nn.Sequential):
                children = list(module.named_children())
                for (a, conv), (b, bn) in itertools.pairwise(children):
                    prefix = f"{name}." if name else ""
                    if _foldable(conv, bn):
                        pairs.append((prefix + a, prefix + b))
        return pairs
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if (
            isinstance(source, fx.Node)
            and source.op == "call_module"
            and len(source.users) == 1
            and _foldable(modules.get(source.target), modules[node.target])
        ):
            pairs.append((str(source.target), str(node.target)))
    return pairs


def _foldable(conv: nn.Module | None, bn: nn.Module | None) -> bool:
    return (
        type(conv) is nn.Conv2d
        and isinstance(bn, nn.BatchNorm2d)
        and bn.num_features == conv.out_channels
        and bn.track_running_stats
        and bn.running_mean is not None
    )


def fold_batchnorm(
    model: nn.Module, inplace: bool = False, convs: Collection[str] | None = None
) -> nn.Module:
    """``model`` (a copy unless ``inplace``) with every conv -> BN pair (or those whose conv is
    named in ``convs``) folded into the conv and the BN replaced by ``nn.Identity``. Equal to
    ``model`` in eval mode.

    Works under ``torch.inference_mode``, ``torch.no_grad`` and plain autograd, and on models
    whose weights are inference tensors: in place, such a conv's weight and bias are replaced by
    ordinary parameters (ordinary ones are updated in place), so the folded conv can be trained."""
    target = model if inplace else plain_copy(model)
    pairs = conv_bn_pairs(target)
    if convs is not None:
        wanted = set(convs)
        pairs = [(c, b) for c, b in pairs if c in wanted]
    modules = dict(target.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        # no_grad, out of inference mode: new parameters are ordinary tensors whatever the mode
        with plain_tensors():
            sigma = torch.sqrt(bn.running_var.to(torch.float64) + bn.eps)  # type: ignore[union-attr]
            gamma = bn.weight.to(torch.float64) if bn.weight is not None else torch.ones_like(sigma)
            beta = bn.bias.to(torch.float64) if bn.bias is not None else torch.zeros_like(sigma)
            scale = gamma / sigma
            w = conv.weight.to(torch.float64) * scale.view(-1, 1, 1, 1)
            b = conv.bias.to(torch.float64) if conv.bias is not None else torch.zeros_like(sigma)
            bias = (b - bn.running_mean.to(torch.float64)) * scale + beta  # type: ignore[union-attr]
            _assign(conv, "weight", w)
            _assign(conv, "bias", bias)
        _replace(target, bn_name, nn.Identity())
        log.info("folded %s into %s", bn_name, conv_name)
    if pairs:
        folded = dict(getattr(target, FOLDED_BN, {}))
        folded.update({bn: conv for conv, bn in pairs})
        setattr(target, FOLDED_BN, folded)
    return target


def _assign(conv: nn.Conv2d, name: str, value: torch.Tensor) -> None:
    """Set ``conv.<name>`` (``weight`` or ``bias``, float64 ``value`` of its shape) to ``value``.

    An ordinary parameter is updated in place (an optimizer holding it keeps working); a missing
    bias, or a parameter that is an inference tensor (model built or loaded under
    ``torch.inference_mode``, which cannot be modified in place outside it) is replaced by a new
    ordinary ``nn.Parameter`` of the layer's dtype and device, keeping ``requires_grad``, so the
    folded conv can be trained. Call inside :func:`plain_tensors`.
    """
    old: torch.Tensor | None = getattr(conv, name)
    if old is not None and not old.is_inference():
        old.copy_(value.to(old.dtype))
        return
    like = conv.weight
    requires_grad = old.requires_grad if old is not None else like.requires_grad
    fresh = value.to(dtype=like.dtype, device=like.device).clone()
    setattr(conv, name, nn.Parameter(fresh, requires_grad=requires_grad))


def remove_folded(model: nn.Module, folded: dict[str, str]) -> None:
    """Give ``model`` (a dense model of the saved architecture) the structure folding left:
    each BN of ``folded`` ({bn name: conv name}) replaced by ``nn.Identity`` and its conv given a
    bias (its values come from the saved weights)."""
    for bn_name, conv_name in folded.items():
        conv = model.get_submodule(conv_name)
        if isinstance(conv, nn.Conv2d) and conv.bias is None:
            conv.bias = nn.Parameter(
                torch.zeros(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device)
            )
        _replace(model, bn_name, nn.Identity())
    if folded:
        setattr(model, FOLDED_BN, dict(folded))


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
