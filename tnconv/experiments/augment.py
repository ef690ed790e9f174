"""CIFAR training augmentation on batched tensors (random crop with padding, horizontal flip).

The standard CIFAR recipe -- pad 4 pixels, crop a random 32x32 window, flip left-right with
probability 1/2 -- done per sample but vectorised over the batch with one gather, so it needs no
torchvision and costs little next to a forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from ..datasets import CIFAR10_MEAN, CIFAR10_STD

__all__ = ["CIFAR10_BLACK", "AugmentedLoader", "random_crop_flip"]

# a black pixel after normalisation with the CIFAR-10 statistics: torchvision pads the raw image
# with zeros before normalising, so this is the same padding for normalised tensors
CIFAR10_BLACK: tuple[float, ...] = tuple(
    -m / s for m, s in zip(CIFAR10_MEAN, CIFAR10_STD, strict=True)
)


def random_crop_flip(
    x: torch.Tensor,
    padding: int = 4,
    flip: bool = True,
    fill: float | Sequence[float] = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pad each image by ``padding`` with ``fill``, crop back to its size at a random offset and
    (if ``flip``) mirror it left-right with probability 1/2, independently per sample.

    Args:
        x: images (B, C, H, W).
        padding: pixels added on every side; offsets are uniform in [0, 2 * padding].
        flip: whether to flip horizontally at random.
        fill: the padding value, one number or one per channel (C,).
        generator: a CPU generator for the random offsets and flips.

    Returns:
        (B, C, H, W), a new tensor on ``x``'s device.
    """
    if x.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W); got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0; got {padding}")
    b, c, h, w = x.shape
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(-1)
    if fill_t.numel() not in (1, c):
        raise ValueError(f"fill needs 1 or {c} values; got {fill_t.numel()}")
    padded = fill_t.view(1, -1, 1, 1).expand(b, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding : padding + h, padding : padding + w] = x
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = top[:, None] + torch.arange(h)  # (B, H)
    cols = left[:, None] + torch.arange(w)  # (B, W)
    if flip:
        # a mirrored crop reads the same window's columns right to left
        mirrored = torch.rand(b, generator=generator) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    rows, cols = rows.to(x.device), cols.to(x.device)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


class AugmentedLoader:
    """Wrap an iterable of ``(images, labels)`` batches, augmenting the images of each batch
    with :func:`random_crop_flip`. ``len()`` is the wrapped loader's (OneCycle needs it)."""

    def __init__(
        self,
        loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
        padding: int = 4,
        flip: bool = True,
        fill: float | Sequence[float] = CIFAR10_BLACK,
        generator: torch.Generator | None = None,
    ) -> None:
        self.loader, self.padding, self.flip, self.fill = loader, padding, flip, fill
        self.generator = generator

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            yield (
                random_crop_flip(images, self.padding, self.flip, self.fill, self.generator),
                labels,
            )
