"""Peak memory of the tensors a forward pass creates (CPU tensors included)."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["PeakMemory"]


class PeakMemory(TorchDispatchMode):
    """Tracks the bytes of every storage created by an op inside the ``with`` block until the
    storage is freed; ``peak`` is the largest total alive at once (activations and temporaries,
    parameters and the input excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = id(storage)
                if key in self._sizes:
                    continue
                self._sizes[key] = storage.nbytes()
                self.live += self._sizes[key]
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key)
        return out
