"""What a conv layer sees: second moments of its input patches, for output-aware factorization.

A factorized layer's loss of accuracy follows the error of its *outputs* on real inputs, not of
its kernel. For a conv with kernel W (T, S, kh, kw) and input patches x (S, kh, kw) (im2col with
the layer's padding, stride and dilation), the mean squared output error of a kernel error dW is

    E ||dW x||^2 = sum_t vec(dW_t)^T Sigma vec(dW_t),   Sigma = E[vec(x) vec(x)^T],

a (S kh kw)^2 matrix. :class:`InputStatistics` streams, over calibration batches:

* the marginal second moments of the three patch modes, ``channel`` (S, S), ``rows`` (kh, kh)
  and ``cols`` (kw, kw), whose Kronecker product ``channel x rows x cols`` (scaled) models Sigma:
  it is what the factorization whitens against, one matrix per kernel mode, so the whitening
  can be absorbed into the factor that carries each mode, for every method;
* ``patch``: Sigma itself when S kh kw <= ``patch_limit`` (exact output errors for reporting and
  for choosing between the output-aware and the weight-only fit).

:func:`calibrate_inputs` records them for the convolutions of a model in one pass with hooks;
memory does not grow with the number of batches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TnconvError

__all__ = ["CalibrationDataError", "InputStatistics", "calibrate_inputs"]

log = logging.getLogger(__name__)

PATCH_LIMIT = 1152  # largest S*kh*kw whose full patch moment is kept (10 MB in float64)
DAMPING = 1e-2  # ridge added to each marginal moment, relative to its mean eigenvalue
MAX_PATCHES = 4096  # patches per batch used (a random subset beyond): cost, not accuracy, bound


class CalibrationDataError(TnconvError, ValueError):
    """Calibration batches that cannot be used: empty, not reaching a layer, not tensors."""


@dataclass
class InputStatistics:
    """Streamed second moments of one conv layer's input patches (see the module docstring).

    Attributes:
        kernel_size: (kh, kw) of the layer; ``channels``: S.
        count: number of patches used (output positions times batch; at most ``max_patches``
            per batch, a random subset beyond that).
        channel, rows, cols: sums of the marginal outer products (float64); means are these
            divided by ``count * kh * kw``, ``count * S * kw`` and ``count * S * kh``.
        patch: the sum of vec(x) vec(x)^T over patches, (S kh kw, S kh kw), or None when larger
            than ``patch_limit``.
    """

    channels: int
    kernel_size: tuple[int, int]
    patch_limit: int = PATCH_LIMIT
    max_patches: int | None = MAX_PATCHES
    count: int = 0
    channel: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    patch: torch.Tensor | None = None
    _id: int = field(default=0, repr=False)

    _next_id = 0

    def __post_init__(self) -> None:
        InputStatistics._next_id += 1
        self._id = InputStatistics._next_id

    def __repr__(self) -> str:
        # stable and distinct per object: options keys of shared candidate fits include it
        kh, kw = self.kernel_size
        return f"InputStatistics(#{self._id}, S={self.channels}, k={kh}x{kw}, n={self.count})"

    @property
    def size(self) -> int:
        """S kh kw: the length of one patch."""
        return self.channels * self.kernel_size[0] * self.kernel_size[1]

    def positions(self, n: int) -> torch.Tensor | None:
        """Which of the next ``n`` patches :meth:`update` keeps: an unbiased random subset of
        ``max_patches`` (fixed seed per batch: reproducible statistics), None for all."""
        if self.max_patches is None or n <= self.max_patches:
            return None
        gen = torch.Generator(device="cpu").manual_seed(self.count)
        return torch.randperm(n, generator=gen)[: self.max_patches]

    def update(self, patches: torch.Tensor) -> None:
        """Add patches of shape (N, S, kh, kw) (any float dtype; accumulated in float64)."""
        n, s, kh, kw = patches.shape
        if (s, kh, kw) != (self.channels, *self.kernel_size):
            raise CalibrationDataError(
                f"patches of shape {(s, kh, kw)} for statistics of {self.channels} channels and "
                f"kernel {self.kernel_size}"
            )
        # products in the patches' precision (float32 for float models: the moments cost
        # 81 N S^2 flops per batch for a 3x3 layer), sums across batches in float64
        p = float_patches(patches.detach())
        pick = self.positions(n)
        if pick is not None:
            p, n = p[pick.to(p.device)], len(pick)
        if self.size <= self.patch_limit:
            flat = p.reshape(n, -1)
            patch = (flat.T @ flat).double()
            # the marginals are partial traces of the patch moment: no second pass
            full = patch.reshape(s, kh, kw, s, kh, kw)
            channel = torch.einsum("ahwbhw->ab", full)
            rows = torch.einsum("sawsbw->ab", full)
            cols = torch.einsum("shashb->ab", full)
        else:
            patch = None
            channel = torch.einsum("nshw,nrhw->sr", p, p).double()
            rows = torch.einsum("nshw,nsgw->hg", p, p).double()
            cols = torch.einsum("nshw,nshv->wv", p, p).double()
        if self.count == 0:
            self.channel, self.rows, self.cols, self.patch = channel, rows, cols, patch
        else:
            self.channel += channel  # type: ignore[operator]
            self.rows += rows  # type: ignore[operator]
            self.cols += cols  # type: ignore[operator]
            if patch is not None:
                self.patch += patch  # type: ignore[operator]
        self.count += n

    @classmethod
    def identity(cls, channels: int, kernel_size: tuple[int, int]) -> InputStatistics:
        """White inputs (Sigma = I): output-aware factorization then equals the weight-only one."""
        stats = cls(channels, tuple(kernel_size))  # type: ignore[arg-type]
        kh, kw = stats.kernel_size
        stats.count = 1
        stats.channel = torch.eye(channels, dtype=torch.float64) * (kh * kw)
        stats.rows = torch.eye(kh, dtype=torch.float64) * (channels * kw)
        stats.cols = torch.eye(kw, dtype=torch.float64) * (channels * kh)
        stats.patch = torch.eye(stats.size, dtype=torch.float64)
        return stats

    def _check(self) -> None:
        if self.count == 0 or self.channel is None:
            raise CalibrationDataError("the statistics saw no input: no calibration batch")

    def marginals(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mean second moments of the channel, row and column modes of a patch."""
        self._check()
        s, (kh, kw) = self.channels, self.kernel_size
        n = self.count
        return (
            self.channel / (n * kh * kw),  # type: ignore[operator]
            self.rows / (n * s * kw),  # type: ignore[operator]
            self.cols / (n * s * kh),  # type: ignore[operator]
        )

    def whitening(self, damping: float = DAMPING) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """``((P, P^-1), ...)`` for the channel, row and column modes: P the symmetric square
        root of the mode's damped, trace-normalised second moment. Whitening the kernel with
        them (``W x_S P_S x_h P_h x_w P_w``) turns the Kronecker model of the output error into
        the Frobenius error."""
        return tuple(symmetric_sqrt(m, damping) for m in self.marginals())

    def output_error(self, delta: torch.Tensor, kernel: torch.Tensor) -> float:
        """Relative output error ``sqrt(E||dW x||^2 / E||W x||^2)`` of a kernel error ``delta``
        for a kernel ``kernel`` (both (T, S, kh, kw)): exact with the patch moment, else in the
        Kronecker model."""
        self._check()
        d = delta.detach().to(torch.float64).reshape(delta.shape[0], -1)
        k = kernel.detach().to(torch.float64).reshape(kernel.shape[0], -1)
        if self.patch is not None:
            sigma = self.patch.to(d.device)
            num = float(((d @ sigma) * d).sum())
            den = float(((k @ sigma) * k).sum())
        else:
            (ps, _), (ph, _), (pw, _) = self.whitening(damping=0.0)
            num = float(whiten(delta.to(torch.float64), ps, ph, pw).square().sum())
            den = float(whiten(kernel.to(torch.float64), ps, ph, pw).square().sum())
        if den <= 0:
            return 0.0 if num <= 0 else math.inf
        return math.sqrt(max(num, 0.0) / den)


def float_patches(p: torch.Tensor) -> torch.Tensor:
    """``p`` in the precision its moments are multiplied in: float32 for integer and half
    inputs, else its own."""
    if not p.is_floating_point() or p.dtype in (torch.float16, torch.bfloat16):
        return p.float()
    return p


def symmetric_sqrt(m: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, P^-1)`` with P the symmetric square root of ``m`` (a second moment) normalised to
    mean eigenvalue 1, plus ``damping`` on its eigenvalues; the identity for an all-zero ``m``."""
    n = m.shape[0]
    mean = float(torch.trace(m)) / n
    if mean <= 0:  # a mode that never saw a non-zero input: nothing to weight
        eye = torch.eye(n, dtype=m.dtype, device=m.device)
        return eye, eye
    vals, vecs = torch.linalg.eigh((m + m.T) / 2 / mean)
    vals = vals.clamp(min=0.0) + damping
    if damping == 0.0:
        vals = vals.clamp(min=1e-12)
    root = (vecs * vals.sqrt()) @ vecs.T
    inverse = (vecs * vals.rsqrt()) @ vecs.T
    return root, inverse


def whiten(
    kernel: torch.Tensor, ps: torch.Tensor, ph: torch.Tensor, pw: torch.Tensor
) -> torch.Tensor:
    """``kernel x_S ps x_h ph x_w pw``: (T, S, kh, kw) -> (T, S, kh, kw)."""
    return torch.einsum("tshw,sa,hb,wc->tabc", kernel, ps, ph, pw)


# ---------------------------------------------------------------------------------------------
# recording them
# ---------------------------------------------------------------------------------------------
def conv_patches(
    conv: nn.Conv2d, x: torch.Tensor, pick: torch.Tensor | None = None
) -> torch.Tensor:
    """The im2col patches of ``x`` (B, S, H, W) as ``conv`` sees them: (B*L, S, kh, kw), or
    only those at the flat indices ``pick`` (into b * L + position), in that order: (len(pick),
    S, kh, kw), gathered without forming the others."""
    if x.ndim == 3:
        x = x.unsqueeze(0)
    kh, kw = conv.kernel_size
    out_h, out_w = _output_size(conv, x)
    # the layer's own padding (any mode, 'same' included), then a padding-free unfold
    x = F.pad(x, conv._reversed_padding_repeated_twice, mode=_pad_mode(conv.padding_mode))
    if pick is not None:
        (sh, sw), (dh, dw) = conv.stride, conv.dilation
        out_hw = out_h * out_w
        pick = pick.to(x.device)
        b, pos = pick // out_hw, pick % out_hw
        rows = (pos // out_w * sh)[:, None, None] + (torch.arange(kh, device=x.device) * dh)[
            None, :, None
        ]
        cols = (pos % out_w * sw)[:, None, None] + (torch.arange(kw, device=x.device) * dw)[
            None, None, :
        ]
        # advanced indices split by a slice: their broadcast dims (m, kh, kw) come first
        return x[b[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    cols = F.unfold(x, (kh, kw), dilation=conv.dilation, stride=conv.stride)  # (B, S*kh*kw, L)
    b, _, positions = cols.shape
    return cols.transpose(1, 2).reshape(b * positions, conv.in_channels, kh, kw)


def _output_size(conv: nn.Conv2d, x: torch.Tensor) -> tuple[int, int]:
    """(H', W'): ``conv``'s output size on ``x`` (B, S, H, W) or (S, H, W)."""
    h, w = x.shape[-2:]
    pads = conv._reversed_padding_repeated_twice  # (left, right, top, bottom)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    out_h = (h + pads[2] + pads[3] - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + pads[0] + pads[1] - dw * (kw - 1) - 1) // sw + 1
    return out_h, out_w


def _pad_mode(mode: str) -> str:
    return "constant" if mode == "zeros" else mode


def _first_input(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("input", "inputs", "x", "image", "images"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise CalibrationDataError(
        f"a calibration batch must be a tensor or an (inputs, labels) pair; got "
        f"{type(batch).__name__}"
    )


def calibrate_inputs(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Sequence[str] | Callable[[str, nn.Module], bool] | None = None,
    *,
    max_batches: int | None = None,
    patch_limit: int = PATCH_LIMIT,
    max_patches: int | None = MAX_PATCHES,
) -> dict[str, InputStatistics]:
    """Second moments of the input patches of ``model``'s ``nn.Conv2d`` layers.

    Args:
        model: any module; run in eval mode under ``torch.no_grad`` (its mode is restored, its
            parameters and buffers are not touched).
        batches: input tensors (B, C, H, W) or ``(inputs, labels)`` pairs, e.g. a DataLoader.
        layers: conv names, a predicate ``(name, module) -> bool``, or None for every conv with
            ``groups=1``.
        max_batches: stop after this many batches.
        patch_limit: keep the full patch moment for layers with S kh kw up to this.
        max_patches: use at most this many patches (positions x batch) of each batch, a random
            subset (None: all).

    Returns:
        ``{layer name: InputStatistics}``.

    Raises:
        CalibrationDataError: no batch, or a batch that does not reach a chosen layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate_inputs needs a torch.nn.Module; got {type(model).__name__}")
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    chosen: dict[str, nn.Conv2d] = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Conv2d:
            continue
        if layers is None:
            keep = module.groups == 1
        elif callable(layers):
            keep = bool(layers(name, module))
        else:
            keep = name in set(layers)
        if keep:
            chosen[name] = module
    if layers is not None and not callable(layers):
        missing = sorted(set(layers) - set(chosen))
        if missing:
            raise CalibrationDataError(f"no nn.Conv2d named {missing} in the model")
    stats = {
        name: InputStatistics(
            c.in_channels,
            tuple(c.kernel_size),  # type: ignore[arg-type]
            patch_limit,
            max_patches,
        )
        for name, c in chosen.items()
    }

    def hook(name: str) -> Callable[[nn.Module, tuple], None]:
        def record(module: nn.Module, args: tuple) -> None:
            x, st = args[0], stats[name]
            # the kept positions first: forming every patch of a batch cost more than the moments
            n = math.prod(_output_size(module, x)) * (x.shape[0] if x.ndim == 4 else 1)
            st.update(conv_patches(module, x, st.positions(n)))  # type: ignore[arg-type]

        return record

    handles = [c.register_forward_pre_hook(hook(n)) for n, c in chosen.items()]
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    seen = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                x = _first_input(batch)
                model(x.to(device) if device is not None else x)
                seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise CalibrationDataError("the calibration set is empty: give at least one batch")
    unseen = sorted(n for n, s in stats.items() if s.count == 0)
    if unseen:
        raise CalibrationDataError(f"the calibration batches never reached {unseen}")
    log.info("calibrated the inputs of %d conv layers on %d batches", len(stats), seen)
    return stats
