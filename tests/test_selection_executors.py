"""tnconv.select_ranks on an executor: a thread pool and a spawn process pool give the serial
run's choice, numbers and log; unpicklable callables fail before any work, naming themselves."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import tnconv
from tnconv.selection import RankSelection

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = ["a", "b"]
STRATEGIES = ["one-step", "multi-step"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 12, 3, padding=1)
        self.a = nn.Conv2d(12, 24, 3, padding=1)
        self.b = nn.Conv2d(24, 24, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(torch.relu(self.stem(x)))))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


X = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    REF = make_net()(X)  # made at import, here and in every worker process (same seed)


def fidelity(model: nn.Module, scale: float = 1.0) -> float:
    """A deterministic score: minus the output's distance to the dense net's on fixed inputs
    (no global RNG: threads of a pool call it at once)."""
    with torch.no_grad():
        return -scale * float((model(X) - REF).norm() / REF.norm())


def failing(model: nn.Module) -> float:
    raise RuntimeError("evaluate broke")


def select(strategy: str, **kwargs) -> RankSelection:
    args = {"evaluate": functools.partial(fidelity, scale=2.0)} | kwargs
    return tnconv.select_ranks(
        make_net(),
        "tucker",
        args.pop("evaluate"),
        0.3,
        strategy=strategy,  # type: ignore[arg-type]
        layers=LAYERS,
        progress=False,
        **args,
    )


def same(got: RankSelection, want: RankSelection) -> None:
    assert dict(got) == dict(want)
    assert (got.metric, got.baseline, got.cost) == (want.metric, want.baseline, want.cost)
    assert got.log == want.log  # every evaluation: phase, layer, ranks, cost, metric (exact)
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(got.model(x), want.model(x))


@pytest.fixture(scope="module")
def serial(one_thread) -> dict[str, RankSelection]:
    return {s: select(s) for s in STRATEGIES}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_thread_pool_gives_the_serial_result(serial, strategy: str) -> None:
    want = serial[strategy]
    assert want.evaluations > 4 and want.log[-1].phase == "final"
    with ThreadPoolExecutor(2) as pool:
        same(select(strategy, executor=pool), want)
        # the model as factory + state_dict instead of the pickled module
        same(select(strategy, executor=pool, model_factory=make_net), want)
        with pytest.raises(RuntimeError, match="evaluate broke"):
            select(strategy, executor=pool, evaluate=failing)


def test_process_pool_gives_the_serial_result(serial) -> None:
    for strategy in STRATEGIES:
        same(select(strategy, executor="processes", workers=2), serial[strategy])


def test_unpicklable_callables_and_bad_executors_fail_before_any_work() -> None:
    calls: list[nn.Module] = []

    def local(model: nn.Module) -> float:  # a closure: cannot be pickled
        calls.append(model)
        return 0.0

    with pytest.raises(tnconv.NotPicklableError, match="evaluate"):
        select("one-step", executor="processes", evaluate=local)
    with pytest.raises(tnconv.NotPicklableError, match="model_factory"):
        select("one-step", executor="processes", model_factory=lambda: make_net())
    assert calls == []
    with pytest.raises(tnconv.StudyError, match="executor"):
        select("one-step", executor="threads")
    with pytest.raises(tnconv.StudyError, match="workers"):
        select("one-step", workers=2)
    with ThreadPoolExecutor(1) as pool, pytest.raises(tnconv.StudyError, match="workers"):
        select("one-step", executor=pool, workers=2)
