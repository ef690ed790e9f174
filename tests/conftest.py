"""Shared fixtures: real trained kernels, the registered methods, hypothesis profiles."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

import tnconv
from tnconv.errors import StructureError

DATA = Path(__file__).parent / "data"

# Plans must not depend on timings or on the user: the planner prices steps with the built-in
# cost tables (tests that need measured or custom tables set these themselves), whatever the
# environment says, and nothing is read from or cached in the user's ~/.cache/tnconv.
os.environ["TNCONV_CALIBRATION"] = "default"
os.environ["TNCONV_CACHE_DIR"] = tempfile.mkdtemp(prefix="tnconv-cache-")
# Under pytest-xdist (the README runs `-n 2`: one worker per core of the CI machine) each worker
# computes on one thread: two workers of two threads each would oversubscribe the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
# .ci/run re-runs the quantization tests on every quantized engine of the machine
if os.environ.get("TNCONV_TEST_QENGINE"):
    torch.backends.quantized.engine = os.environ["TNCONV_TEST_QENGINE"]

settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    # filter_too_much: cases a network cannot take (``supports``) are assumed away
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
    derandomize=True,
)
settings.register_profile(
    "thorough",
    max_examples=200,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# base methods only: a derived entry (admm-<base>) shares its base's algebra, so the whole suite
# would only run twice; tests/test_admm.py covers the derived entries
METHODS = tnconv.available(kind="base")
EPS_METHODS = [m for m in METHODS if tnconv.get(m).guarantees_eps]


def load_real_kernels() -> dict[str, np.ndarray]:
    """Trained conv kernels copied from ../shared/data (see tests/data/README.md)."""
    with np.load(DATA / "real_kernels.npz") as z:
        return {k: z[k] for k in z.files}


REAL_KERNELS = load_real_kernels()
# the kernels with a spatial extent and several input channels: the ones worth compressing
REAL_3D = {k: v for k, v in REAL_KERNELS.items() if v.shape[1] > 3 and v.shape[2] > 1}


def decaying_kernel(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A random float64 kernel with a decaying spectrum on every unfolding (like trained ones)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    for mode in range(4):
        n = shape[mode]
        decay = torch.exp(-torch.arange(n, dtype=torch.float64) / max(n / 3, 1))
        w = torch.movedim(torch.movedim(w, mode, -1) * decay, -1, mode)
    return w


def adam_losses(
    module: torch.nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    lr: float,
    steps: int = 30,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.nn.functional.mse_loss,
) -> list[float]:
    """Train ``module`` to map ``x`` to ``target`` (``loss_fn``, default MSE; Adam); the loss
    before each step."""
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(module(x), target)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def supports(method: str, shape: tuple[int, ...], rank: int | tuple[int, ...] = 10**9) -> bool:
    """False when ``method``'s network, at its default options, cannot be built for this kernel
    shape / rank (:class:`StructureError`: e.g. a semi-tensor factor t that does not divide a
    channel count or a rank). The default rank asks about the shape alone."""
    try:
        tnconv.get(method).bond_ranks(rank, tuple(shape))
    except StructureError:
        return False
    return True


def require_support(method: str, shape: tuple[int, ...], rank: int | tuple[int, ...] = 10**9):
    """Skip a fixed-input test whose kernel shape / rank the method's network cannot take."""
    if not supports(method, shape, rank):
        at = "" if rank == 10**9 else f" at rank {rank}"
        pytest.skip(f"{method} (default options) cannot build a {tuple(shape)} network{at}")


def uniform_ranks(method: str, shape: tuple[int, ...], upto: int = 200) -> list[int]:
    """The int ranks in 1..upto that ``method`` takes for ``shape`` (every one, for most)."""
    return [r for r in range(1, upto) if supports(method, shape, r)]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny SVDs and convs: with 2 threads on a shared 2-core machine OpenMP spin-waits cost 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=METHODS)
def method(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
