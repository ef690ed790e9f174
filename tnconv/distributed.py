"""``torch.distributed`` support for the training helpers (``torchrun --nproc_per_node N``).

When a process group is initialised (``torch.distributed.init_process_group``, which
:func:`init_from_env` does for ``torchrun``), :func:`tnconv.finetune`, :func:`tnconv.training.fit`
(so :meth:`tnconv.ADMM.fit` and quantization-aware fine-tuning) train data-parallel: the model is
wrapped in ``DistributedDataParallel``, only rank 0 shows progress bars and logs epochs, the
reported loss is the mean over every rank's samples, and ADMM's Z / U update is computed on rank 0
and broadcast. Without a process group nothing changes: the helpers run exactly as before.

How a loader is split (docs/scale.md, "torch.distributed / torchrun"):

* a ``DataLoader`` whose sampler is a ``DistributedSampler`` is already sharded: each rank trains
  on its own batches as they come, and the sampler's epoch is set before every epoch;
* any other loader is taken as the *global* batches: every rank must iterate the same batches
  (give each rank's loader the same seeded ``generator``), and each rank trains on its
  contiguous share of every batch (:func:`shard_batch`; shares differ by at most one sample, and
  each rank's loss is weighted by its share so the averaged gradient is the global batch's mean
  gradient). The run is then the 1-process run with the same batches, to rounding. Every batch's
  fingerprint is compared across ranks (one small all-reduce), so a loader that yields other
  batches on another rank raises :class:`~tnconv.errors.LoaderError` instead of training on
  overlapping data.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from .errors import LoaderError, OptionError

__all__ = [
    "GlobalBatchNorm",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "broadcast_tensors",
    "check_same_batch",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "is_sharded",
    "rank",
    "set_epoch",
    "shard_batch",
    "sync_batchnorm",
    "unwrap",
    "world_size",
    "wrap_ddp",
]

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised (any world size)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group; 0 without one."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes in the default group; 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 and in a process without a group: the one that logs, prints and writes."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if is_distributed():
        dist.barrier()


def init_from_env(timeout_s: float = 1800.0) -> bool:
    """Initialise the default process group from ``torchrun``'s environment, if there is one.

    ``torchrun`` (and ``torch.distributed.launch``) set ``WORLD_SIZE``, ``RANK`` and
    ``MASTER_ADDR`` / ``MASTER_PORT``; this starts the group with the ``env://`` method, on NCCL
    when CUDA is available and gloo otherwise (``TNCONV_DIST_BACKEND`` overrides), and pins the
    process to ``cuda:LOCAL_RANK``. Returns whether a group is initialised afterwards (False when
    the process was not started by a launcher; a group initialised already is kept).
    """
    if is_distributed():
        return True
    if not dist.is_available() or "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return False
    backend = os.environ.get("TNCONV_DIST_BACKEND") or (
        "nccl" if torch.cuda.is_available() else "gloo"
    )
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    log.info("torch.distributed: rank %d of %d (%s)", rank(), world_size(), backend)
    return True


# -- models -----------------------------------------------------------------------------------
def wrap_ddp(model: nn.Module, **ddp_options: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` under a process group; ``model`` itself otherwise.

    Wrapping broadcasts rank 0's parameters and buffers to every rank. CUDA models get
    ``device_ids=[their device]`` unless given. ``ddp_options`` go to DDP (e.g.
    ``find_unused_parameters=True`` for a model some of whose parameters a forward skips).
    """
    if not is_distributed():
        return model
    if not any(p.requires_grad for p in model.parameters()):
        raise OptionError("DistributedDataParallel needs a model with a trainable parameter")
    param = next(model.parameters())
    if param.device.type == "cuda" and "device_ids" not in ddp_options:
        ddp_options["device_ids"] = [param.device]
    return nn.parallel.DistributedDataParallel(model, **ddp_options)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (``model`` if not wrapped)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _accumulator(x: torch.Tensor) -> torch.dtype:
    """float64 for the per-channel sums where the device has it (CPU, CUDA)."""
    return torch.float64 if x.device.type in ("cpu", "cuda") else torch.float32


class _GlobalBatchNormFunction(torch.autograd.Function):
    """Batch norm over every rank's samples: one all-reduce forward, one backward.

    Forward: each rank's per-channel count, mean and biased variance (``torch.var_mean``) are
    combined in float64 with one all-reduce of ``(n_r m_r, n_r (v_r + m_r^2), n_r)`` (Chan et
    al.'s pairwise combination), then torch's fused batch norm normalises with the global
    statistics; it returns ``(y, mean, biased variance, global count)``, the last three without
    gradient. Backward: torch's batch-norm backward gives the local ``sum(dy)`` and
    ``sum(dy * xhat)`` (the bias and weight gradients, returned local: DDP averages them); their
    all-reduced sums give each rank's input gradient as the global batch's times the world size
    (DDP's averaging undoes the factor)::

        dx = w * invstd * (dy - sum(dy) / N - xhat * sum(dy * xhat) / N)
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        c = x.shape[1]
        dims = [d for d in range(x.ndim) if d != 1]
        acc = _accumulator(x)
        local_var, local_mean = torch.var_mean(x, dim=dims, correction=0)
        n_local = float(x.numel() // c)
        m = local_mean.to(acc)
        count = torch.full((1,), n_local, dtype=acc, device=x.device)
        stats = torch.cat([n_local * m, n_local * (local_var.to(acc) + m * m), count])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        n = float(stats[-1])
        mean_acc = stats[:c] / n
        var_acc = (stats[c : 2 * c] / n - mean_acc * mean_acc).clamp(min=0.0)
        mean, var = mean_acc.to(x.dtype), var_acc.to(x.dtype)
        invstd = torch.rsqrt(var + eps)
        y = torch.nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.n, ctx.eps = n, eps
        total = stats[-1].clone()
        ctx.mark_non_differentiable(mean, var, total)
        return y, mean, var, total

    @staticmethod
    def backward(
        ctx: Any, dy: torch.Tensor, *_: Any
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, mean, invstd = ctx.saved_tensors
        c = x.shape[1]
        shape = [1, -1] + [1] * (x.ndim - 2)
        dy = dy.contiguous()
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, None, None, mean, invstd, True, ctx.eps, [False, True, True]
        )
        both = torch.cat([sum_dy, sum_dy_xhat]).to(_accumulator(x))
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
        total_dy, total_dy_xhat = (both[:c] / ctx.n).to(x.dtype), (both[c:] / ctx.n).to(x.dtype)
        k = invstd if weight is None else weight * invstd
        # dx = k dy + b x + a, per channel
        b = -k * invstd * total_dy_xhat
        a = -k * total_dy - b * mean
        dx = torch.addcmul(torch.addcmul(a.view(shape), x, b.view(shape)), dy, k.view(shape))
        grad_w = sum_dy_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_dy if ctx.needs_input_grad[2] else None
        return dx, grad_w, grad_b, None


class GlobalBatchNorm(nn.Module):
    """A batch-norm layer whose training-mode statistics are those of the global batch, on any
    device and backend (torch's ``nn.SyncBatchNorm`` runs only on CUDA).

    Wraps ``bn`` (any ``nn.modules.batchnorm._BatchNorm``; inputs (B, C, ...)) and shares its
    parameters and running buffers. In training mode the per-channel mean and biased variance
    of every rank's samples together normalise the input, with one all-reduce forward and one
    backward per layer and step (:class:`_GlobalBatchNormFunction`); the running statistics
    are updated with them as ``bn`` would (the unbiased variance, ``momentum`` or the
    cumulative average). In eval mode it is ``bn`` itself.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if not bn.training or not is_distributed():
            return bn(x)
        y, mean, var, count = _GlobalBatchNormFunction.apply(x, bn.weight, bn.bias, bn.eps)
        if bn.track_running_stats:
            with torch.no_grad():
                assert bn.num_batches_tracked is not None
                assert bn.running_mean is not None and bn.running_var is not None
                bn.num_batches_tracked.add_(1)
                factor = (
                    1.0 / float(bn.num_batches_tracked)
                    if bn.momentum is None
                    else float(bn.momentum)
                )
                n = float(count)
                bn.running_mean.mul_(1 - factor).add_(factor * mean)
                bn.running_var.mul_(1 - factor).add_(factor * var * (n / max(n - 1.0, 1.0)))
        return y


@contextlib.contextmanager
def sync_batchnorm(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Swap ``model``'s batch-norm layers for synchronised ones while the block runs.

    Under a process group, training-mode batch statistics are then those of the global batch
    (as in a 1-process run) instead of each rank's share: ``nn.SyncBatchNorm`` for layers on
    CUDA, :class:`GlobalBatchNorm` elsewhere (torch's runs only on CUDA). The swapped layers
    share the original layers' parameters and running buffers, so training updates the
    originals, which are put back on exit: the caller's model keeps its ``BatchNorm2d`` types.
    A no-op without a process group or with ``enabled=False``. The root module itself is never
    swapped (only children).
    """
    if not enabled or not is_distributed():
        yield model
        return
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(
                child, nn.SyncBatchNorm
            ):
                swaps.append((parent, name, child))
    try:
        for parent, name, bn in swaps:
            on_cuda = any(t.device.type == "cuda" for t in [*bn.parameters(), *bn.buffers()])
            setattr(
                parent,
                name,
                nn.SyncBatchNorm.convert_sync_batchnorm(bn) if on_cuda else GlobalBatchNorm(bn),
            )
        yield model
    finally:
        for parent, name, bn in swaps:
            setattr(parent, name, bn)


# -- loaders ----------------------------------------------------------------------------------
def is_sharded(loader: Any) -> bool:
    """Whether ``loader`` is a ``DataLoader`` with a ``DistributedSampler`` (its own shard)."""
    if not isinstance(loader, DataLoader):
        return False
    sampler = loader.sampler
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    return isinstance(sampler, DistributedSampler) or isinstance(inner, DistributedSampler)


def set_epoch(loader: Any, epoch: int) -> None:
    """``sampler.set_epoch(epoch)`` for a ``DistributedSampler`` loader (its shuffle then
    differs per epoch, as in a 1-process run); nothing for other loaders."""
    if not isinstance(loader, DataLoader):
        return
    for sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)


def _split(t: torch.Tensor, index: int, parts: int) -> torch.Tensor:
    return torch.tensor_split(t, parts, dim=0)[index]


def shard_batch(batch: Any, index: int | None = None, parts: int | None = None) -> Any:
    """This rank's contiguous share of a global batch: every tensor in ``batch`` (a tensor, or a
    tuple / list of them) is split along dim 0 into ``parts`` (default: the world size) pieces
    whose sizes differ by at most one, and piece ``index`` (default: this rank) is returned.
    Without a process group the batch is returned unchanged."""
    parts = world_size() if parts is None else parts
    index = rank() if index is None else index
    if parts == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        return _split(batch, index, parts)
    if isinstance(batch, (tuple, list)):
        return type(batch)(
            _split(t, index, parts) if isinstance(t, torch.Tensor) else t for t in batch
        )
    raise LoaderError(
        f"cannot split a batch of type {type(batch).__name__} across processes; give a tensor "
        "or a tuple of tensors, or a DataLoader with a DistributedSampler"
    )


def _fingerprint(batch: Any) -> list[float]:
    """Position-weighted sums of a batch's tensors (in float64): equal on two ranks only if
    their batches very probably hold the same samples in the same order."""
    tensors = [batch] if isinstance(batch, torch.Tensor) else list(batch)
    out: list[float] = []
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        n = t.shape[0] if t.ndim else 1
        rows = t.detach().reshape(n, -1).to(torch.float64)
        weights = torch.arange(1, n + 1, dtype=torch.float64, device=rows.device)
        out += [float(n), float((rows.sum(dim=1) * weights).sum())]
    return out


def check_same_batch(batch: Any) -> int:
    """Check that every rank holds the same global ``batch``; returns its size (dim 0).

    One all-reduce of a few numbers. Raises :class:`~tnconv.errors.LoaderError` on every rank
    when they differ (their loaders shuffle or augment with different random numbers), and when
    the batch has fewer samples than there are ranks (a rank would get none).
    """
    tensors = [batch] if isinstance(batch, torch.Tensor) else list(batch)
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None:
        raise LoaderError(f"a batch holds no tensor: {type(batch).__name__}")
    size = int(first.shape[0])
    if not is_distributed():
        return size
    prints = torch.tensor(_fingerprint(batch), dtype=torch.float64)
    both = torch.cat([prints, -prints])
    if dist.get_backend() == "nccl":
        both = both.cuda()
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    high, low = both[: len(prints)], -both[len(prints) :]
    if not bool(torch.equal(high, low)):
        raise LoaderError(
            "the ranks' loaders yield different batches: with a loader that is not sharded, "
            "every rank must iterate the same global batches (seed each rank's DataLoader "
            "generator and augmentation identically), or give the loader a DistributedSampler"
        )
    if size < world_size():
        raise LoaderError(
            f"a batch of {size} sample(s) cannot be split over {world_size()} processes; use a "
            "batch size of at least the world size and drop_last=True for a short last batch"
        )
    return size


# -- collectives --------------------------------------------------------------------------------
def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (nothing without a group).

    Tensors are packed into one flat buffer per (device, dtype), so a whole model's worth costs
    one broadcast per kind. Every rank must pass tensors of the same shapes, in the same order.
    """
    if not is_distributed() or not tensors:
        return
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src=src)
        offset = 0
        with torch.no_grad():
            for t in group:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself without a group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """The element-wise sums of ``values`` over the ranks, in float64 (``values`` without a
    group)."""
    if not is_distributed():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.cpu()]
