"""compress(budget=, executor=): the allocation's per-layer candidate fits (and "auto"'s) on a
real Dask LocalCluster, a spawn process pool and a thread pool give the serial run's ranks,
parameters and outputs (params and FLOPs budgets, with calibration); bad arguments fail before
any work and a worker's failure names its layer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from torch import nn

import tnconv
from tnconv.allocation import shared_candidates
from tnconv.decompositions.tucker import Tucker

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = (2, 3, 8, 8)
X = torch.randn(SIZE, generator=torch.Generator().manual_seed(1))
CASES = [
    ("tucker", 0.3),
    ("tucker", ("flops", 0.4)),
    ("tt", 0.3),
    ("tt", ("flops", 0.4)),
    ("cp", 0.3),
    ("cp", ("flops", 0.4)),
    ("rsdtr", 0.3),
    ("rsdtr", ("flops", 0.4)),
]
AUTO = {"methods": ["tucker", "tt", "cp"]}  # compress(model, "auto"): the recommendation's fits


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 12, 1),
    ).eval()


def run(method: str, budget: Any, **kwargs: Any) -> nn.Module:
    args = {"input_size": SIZE, "progress": False} | kwargs
    return tnconv.compress(make_net(), method, budget=budget, **args)


def ranks(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        name: m.factorization.ranks
        for name, m in model.named_modules()
        if isinstance(m, tnconv.FactorizedConv2d)
    }


def same(got: nn.Module, want: nn.Module) -> None:
    """The same layers factorized at the same ranks, the same parameters and outputs."""
    assert ranks(got) == ranks(want) and ranks(want)
    assert sum(p.numel() for p in got.parameters()) == sum(p.numel() for p in want.parameters())
    with torch.no_grad():
        assert torch.equal(got(X), want(X))


@pytest.fixture(scope="module")
def serial(one_thread) -> dict[tuple[str, Any], nn.Module]:
    return {(m, str(b)): run(m, b) for m, b in CASES} | {("auto", "0.3"): run("auto", 0.3, **AUTO)}


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


def test_dask_local_cluster_gives_the_serial_models(serial, client) -> None:
    for method, budget in CASES:
        same(run(method, budget, executor=client), serial[method, str(budget)])
    same(run("auto", 0.3, executor=client, **AUTO), serial["auto", "0.3"])


def test_command_line_on_the_cluster_by_its_address(serial, client, tmp_path, capsys) -> None:
    from tnconv.cli import main

    saved, out = tmp_path / "net.safetensors", tmp_path / "small.safetensors"
    tnconv.save(make_net(), saved)
    argv = ["compress", str(saved), "-m", "tt", "--budget", "0.3", "--input-size", "2,3,8,8"]
    argv += ["--model", f"{__name__}:make_net", "-o", str(out), "-q"]
    code = main([*argv, "--scheduler", client.scheduler.address])
    assert code == 0, capsys.readouterr().err
    same(tnconv.load(out, model_fn=make_net).eval(), serial["tt", "0.3"])
    assert main([*argv, "--scheduler", "tcp://x:1", "--workers", "2"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main([*argv[:4], "--rank", "4", *argv[6:], "--workers", "2"]) == 2
    assert "of --budget" in capsys.readouterr().err


class Failing(Tucker):
    """tucker, except on the 16 -> 16 kernel (module level: workers unpickle it)."""

    def factorize_many(self, weight: Any, specs: Any, **kwargs: Any) -> Any:
        if tuple(weight.shape) == (16, 16, 3, 3):
            raise RuntimeError("fit broke")
        return super().factorize_many(weight, specs, **kwargs)


def test_a_worker_failure_is_raised_here_naming_its_layer(client) -> None:
    with pytest.raises(RuntimeError, match="fit broke") as info:
        run(Failing(), 0.3, executor=client)  # type: ignore[arg-type]
    assert any("layer '4'" in note for note in info.value.__notes__)
    with pytest.raises(RuntimeError, match="fit broke"):  # serially: the same error
        run(Failing(), 0.3)  # type: ignore[arg-type]


def test_process_pool_gives_the_serial_model(serial) -> None:
    same(run("tt", 0.3, executor="processes", workers=2), serial["tt", "0.3"])


class Counting(ThreadPoolExecutor):
    """A thread pool that keeps the tasks submitted to it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.tasks: list[Any] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.tasks.append(args[0])
        return super().submit(fn, *args, **kwargs)


def test_thread_pool_with_calibration_and_shared_candidates() -> None:
    batches = [torch.randn(SIZE, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    for by in ("kernel", "output"):
        want = run("tucker", 0.3, calibration=batches, allocate_by=by)
        with ThreadPoolExecutor(2) as pool:
            same(run("tucker", 0.3, calibration=batches, allocate_by=by, executor=pool), want)
    # a study's cache: the ladders fitted on the executor for one budget are not sent again
    # for the next, and the results stay the serial ones
    want = {b: run("tt", b) for b in (0.3, 0.5)}
    with shared_candidates(), Counting(2) as pool:
        for b in (0.3, 0.5):
            same(run("tt", b, executor=pool, worker_threads=1), want[b])
            steps = [s for t in pool.tasks for s in t.steps]
            ladders = [s for s in steps if not s.single and "rank" in s.specs[0]]
            assert len(ladders) == (4 if b == 0.3 else 0) and len(steps) > len(ladders)
            pool.tasks.clear()


def test_bad_arguments_fail_before_any_work() -> None:
    class Local(Tucker):  # a local class: cannot be pickled
        pass

    with pytest.raises(tnconv.NotPicklableError, match="options"):
        run("tucker", 0.3, executor="processes", init=lambda w: w)
    with pytest.raises(tnconv.NotPicklableError, match="method"):
        run(Local(), 0.3, executor="processes")  # type: ignore[arg-type]
    with pytest.raises(tnconv.StudyError, match="executor"):
        run("tucker", 0.3, executor="threads")
    with pytest.raises(tnconv.StudyError, match="workers"):
        run("tucker", 0.3, workers=2)
    with ThreadPoolExecutor(1) as pool, pytest.raises(tnconv.StudyError, match="workers"):
        run("tucker", 0.3, executor=pool, workers=2)
    with ThreadPoolExecutor(1) as pool, pytest.raises(tnconv.StudyError, match="budget"):
        tnconv.compress(make_net(), "tucker", rank=4, executor=pool)
