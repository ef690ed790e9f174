"""Autograd-mode helpers: tnconv's entry points behave the same under ``torch.inference_mode``,
``torch.no_grad`` and plain autograd, and accept inference tensors as inputs.

Inference tensors (made inside ``torch.inference_mode``) carry no version counter, cannot be
modified in place outside inference mode and cannot be saved for backward. tnconv computes its
factorizations and builds its layers out of inference mode (:func:`plain_tensors`), so the tensors
it returns are ordinary ones: a layer compressed inside ``inference_mode`` can still be trained.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

from .errors import InvalidWeightError

__all__ = ["check_not_meta", "plain_copy", "plain_tensors", "tensor_version"]

M = TypeVar("M")


@contextmanager
def plain_tensors() -> Iterator[None]:
    """Run the block out of inference mode and without gradient tracking.

    Tensors made inside are ordinary tensors (with version counters, usable in autograd later)
    even when the caller is in ``torch.inference_mode``; inference tensors given as inputs can be
    read (not modified in place). ``torch.inference_mode(False)`` alone would turn gradient
    tracking on, hence the ``no_grad`` inside it.
    """
    with torch.inference_mode(False), torch.no_grad():
        yield


def tensor_version(tensor: torch.Tensor) -> int | None:
    """``tensor._version`` (bumped by every in-place change), or None for an inference tensor,
    which has no version counter: a cache keyed on it cannot tell whether it changed."""
    if tensor.is_inference():
        return None
    return int(tensor._version)


def check_not_meta(tensor: torch.Tensor, what: str) -> None:
    """Raise :class:`InvalidWeightError` if ``tensor`` is on the meta device (a shape without
    values, e.g. a model built under ``torch.device("meta")``): nothing can be computed from it.
    ``what`` names the tensor in the message."""
    if tensor.is_meta:
        raise InvalidWeightError(
            f"{what} is on the meta device: it has a shape {tuple(tensor.shape)} but no values, "
            "so it cannot be factorized or measured; materialise the model first (e.g. "
            "model.to_empty(device='cpu') and load_state_dict(...))"
        )


def plain_copy(module: M) -> M:
    """``copy.deepcopy(module)`` whose parameters and buffers are ordinary tensors (requires_grad
    kept), even when ``module`` holds inference tensors or the caller is in inference mode: the
    copies tnconv hands back (compressed, quantized, truncated models) can be trained."""
    with plain_tensors():
        return copy.deepcopy(module)
