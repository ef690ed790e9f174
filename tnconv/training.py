"""Small, explicit training and evaluation loops (fine-tuning compressed models, demos).

Nothing here knows about tensor networks: a compressed model trains like any other, its factors
being ordinary parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

__all__ = ["evaluate", "fit"]

log = logging.getLogger(__name__)


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def fit(
    model: nn.Module,
    loader: DataLoader,
    epochs: int = 1,
    *,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: Literal["onecycle", "constant"] = "onecycle",
    progress: bool = False,
    desc: str = "train",
    penalty: Callable[[], torch.Tensor] | None = None,
    after_batch: Callable[[int], None] | None = None,
    after_epoch: Callable[[int], None] | None = None,
    memory_format: torch.memory_format = torch.preserve_format,
) -> list[float]:
    """Train ``model`` in place with SGD (Nesterov-free momentum) and cross-entropy.

    ``schedule="onecycle"`` is ``torch.optim.lr_scheduler.OneCycleLR`` peaking at ``lr`` (the
    RSDTR paper's fine-tuning schedule: SGD, OneCycle, lr 0.01) with torch's defaults, as in the
    paper's code: the learning rate warms up from ``lr / 25`` over the first 30% of the steps and
    anneals to ``lr / 25e4``, and SGD's momentum is cycled 0.95 -> 0.85 -> 0.95 against it, so
    ``momentum`` only takes effect with ``schedule="constant"``. Returns the mean loss of each
    epoch. Batches are ``(inputs, integer labels)``.

    Hooks (e.g. ADMM, :class:`tnconv.ADMM`): ``penalty()`` is added to every batch's loss (the
    returned history is the cross-entropy alone); ``after_batch(k)`` runs after the k-th
    optimizer step (counted from 1 over the whole run) and ``after_epoch(e)`` after epoch e
    (from 1), both under ``torch.no_grad``.

    ``memory_format=torch.channels_last`` converts every batch (and the model's 4-D
    parameters) to NHWC, which the CPU convolutions run faster: one training step of the demo's
    CNN at batch 32 took 53 ms instead of 70 ms on two cores.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1; got {epochs}")
    device = _device_of(model)
    if memory_format is not torch.preserve_format:
        model.to(memory_format=memory_format)  # before the optimizer holds its parameters
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    scheduler = None
    if schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=epochs * len(loader)
        )
    elif schedule != "constant":
        raise ValueError(f"schedule must be 'onecycle' or 'constant'; got {schedule!r}")
    model.train()
    history = []
    step = 0
    for epoch in range(epochs):
        total, count = 0.0, 0
        batches: Iterable = tqdm(
            loader, desc=f"{desc} {epoch + 1}/{epochs}", disable=not progress, leave=False
        )
        for inputs, labels in batches:
            inputs = inputs.to(device, memory_format=memory_format)
            labels = labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(inputs), labels)
            objective = loss if penalty is None else loss + penalty()
            objective.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += float(loss.detach()) * len(labels)
            count += len(labels)
            step += 1
            if after_batch is not None:
                with torch.no_grad():
                    after_batch(step)
        history.append(total / max(count, 1))
        if after_epoch is not None:
            with torch.no_grad():
                after_epoch(epoch + 1)
        log.info("%s epoch %d: loss %.4f", desc, epoch + 1, history[-1])
    model.eval()
    return history


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    memory_format: torch.memory_format = torch.preserve_format,
) -> float:
    """Top-1 accuracy of ``model`` on ``loader``, in [0, 1]; the model's mode is restored.

    ``memory_format`` converts each batch (e.g. ``torch.channels_last``); the model is left as
    it is.
    """
    device = _device_of(model)
    was_training = model.training
    model.eval()
    correct, count = 0, 0
    for inputs, labels in loader:
        logits = model(inputs.to(device, memory_format=memory_format))
        correct += int((logits.argmax(dim=1) == labels.to(device)).sum())
        count += len(labels)
    model.train(was_training)
    return correct / max(count, 1)
