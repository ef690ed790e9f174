"""Argument handling shared by the experiment scripts: one-line usage errors, checkpoints."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from .. import registry

__all__ = ["Parser", "UsageError", "eps_value", "load_dense_checkpoint", "require_method"]

log = logging.getLogger(__name__)


class UsageError(Exception):
    """A problem with the command line or the files it names; scripts exit with code 2."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that raises :class:`UsageError` instead of printing the usage and
    exiting, so ``main(argv)`` can return 2 with a one-line message (and be called in-process)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def eps_value(text: str) -> float:
    """argparse type: a relative error bound in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"eps must be a number in (0, 1); got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"eps must be in (0, 1); got {text}")
    return value


def require_method(name: str) -> str:
    """``name`` if it is a registered decomposition, else a :class:`UsageError` listing them."""
    known = registry.available()
    if name not in known:
        what = (
            "method 'rsdtr' (the paper's) is not registered in this tnconv"
            if name == "rsdtr"
            else f"unknown method {name!r}"
        )
        raise UsageError(f"{what}; available: {', '.join(known)}")
    return name


def load_dense_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load dense weights into ``model`` (in place) from ``path``.

    Accepted: ``torch.save(model.state_dict(), path)`` (what the CIFAR script writes as
    ``dense.pt``), a dict holding it under ``"state_dict"`` (common training scripts, and
    ``tnconv.save`` of a dense model before format 3), a safetensors file of it (``tnconv.save``
    of a dense model); a ``module.`` prefix left by ``nn.DataParallel`` is
    removed. Only tensors are unpickled (``weights_only=True``).

    Raises:
        UsageError: the file is missing, unreadable, or its weights do not fit ``model``.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    from ..io import PREFIX, _is_safetensors

    payload: Any
    if _is_safetensors(path):  # a safetensors state dict, or a tnconv.save of a dense model
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as exc:
            raise UsageError(
                f"checkpoint {path}: corrupt safetensors file ({type(exc).__name__}: {exc})"
            ) from exc
        payload = {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}
    else:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UsageError(
                f"checkpoint {path} is not loadable with weights_only=True "
                f"({type(exc).__name__}); save it with torch.save(model.state_dict(), path)"
            ) from exc
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(k, str) for k in payload):
        raise UsageError(f"checkpoint {path} holds no state dict")
    if payload and all(k.startswith("module.") for k in payload):
        payload = {k.removeprefix("module."): v for k, v in payload.items()}
    try:
        model.load_state_dict(payload, strict=True)
    except RuntimeError as exc:
        own = set(model.state_dict())
        missing = sorted(own - set(payload))
        unexpected = sorted(set(payload) - own)
        parts = [
            f"{len(keys)} {kind} (e.g. {', '.join(keys[:2])})"
            for kind, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        detail = (
            ", ".join(parts)
            if parts
            else next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        )
        raise UsageError(
            f"checkpoint {path} does not fit {type(model).__name__}: {detail}"
        ) from exc
    log.info("loaded %d tensors from %s", len(payload), path)
