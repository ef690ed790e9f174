"""Studies on a process pool and a real Dask LocalCluster give the serial study's rows; failed
cells are rows; an interrupted study resumes from its CSV."""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import tnconv
from tnconv.study import StudyRow

METHODS = ["tucker", "tt"]
BUDGETS = [0.3, 0.6]
SIZE = (2, 3, 8, 8)
TIMING = {"latency_ms", "dense_latency_ms", "fit_seconds"}


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 4),
    ).eval()


def evaluate(model: nn.Module, scale: float = 1.0) -> float:
    """A deterministic score of the model on fixed inputs."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return float(scale * model(torch.randn(SIZE, generator=gen)).abs().mean())


def fine_tune(model: nn.Module) -> None:
    """Two SGD steps on batches drawn from the global RNG (the cell's seed fixes them)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(SIZE)).pow(2).mean().backward()
        opt.step()
    model.eval()


def run(**kwargs) -> tnconv.StudyResult:
    args = {
        "input_size": SIZE,
        "evaluate": functools.partial(evaluate, scale=2.0),
        "fine_tune": fine_tune,
        "latency_repeats": 1,
        "progress": False,
    } | kwargs
    return tnconv.study(tiny_net(), args.pop("methods", METHODS), BUDGETS, **args)


def values(rows: list[StudyRow]) -> list[tuple]:
    """Everything but the timing columns; NaN made comparable."""
    out = []
    for r in rows:
        d = {k: v for k, v in vars(r).items() if k not in TIMING}
        out.append(
            tuple((k, "nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items())
        )
    return out


@pytest.fixture(scope="module")
def serial(one_thread) -> tnconv.StudyResult:
    return run()


def test_serial_reference_is_complete(serial) -> None:
    assert [(r.method, r.budget) for r in serial.rows] == [("dense", 1.0)] + [
        (m, b) for m in METHODS for b in BUDGETS
    ]
    for r in serial.rows[1:]:
        assert r.note == "" and 0 < r.error < 1 and r.params <= r.budget * r.dense_params
        assert r.accuracy != r.accuracy_tuned  # fine_tune changed the model


def test_process_pool_gives_the_serial_rows(serial) -> None:
    result = run(executor="processes", workers=2)
    assert values(result.rows) == values(serial.rows)


def test_dask_local_cluster_gives_the_serial_rows(serial, tmp_path, capsys) -> None:
    distributed = pytest.importorskip("distributed")
    from tnconv.cli import main

    saved = tmp_path / "net.safetensors"
    tnconv.save(tiny_net(), saved)
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        result = run(executor=client)
        # a failing cell (an option the method rejects) is a row; the others are unaffected
        failing = run(executor=client, options={"tt": {"no_such_option": 1}})
        # the command line on the same cluster, by its address
        argv = ["study", str(saved), "--methods", ",".join(METHODS), "--budgets", "0.3,0.6"]
        argv += ["--model", f"{__name__}:tiny_net", "--input-size", "2,3,8,8", "--repeats", "1"]
        argv += ["--out", str(tmp_path / "s")]
        code = main([*argv, "--scheduler", cluster.scheduler_address, "--resume", "-q"])
        assert code == 0, capsys.readouterr().err
    assert values(result.rows) == values(serial.rows)
    for got, want in zip(failing.rows, serial.rows, strict=True):
        if got.method == "tt":
            assert got.note.startswith("failed: OptionError") and "no_such_option" in got.note
            assert math.isnan(got.error) and got.params == 0
        else:
            assert values([got]) == values([want])
    lines = (tmp_path / "s" / "study.csv").read_text().splitlines()
    cli_rows = [r.split(",")[:8] for r in lines[1:]]
    assert cli_rows == [
        [
            str(v)
            for v in (
                r.target,
                r.method,
                r.budget,
                r.params,
                r.dense_params,
                r.flops,
                r.dense_flops,
                r.error,
            )
        ]
        for r in serial.rows
    ]


def test_a_concurrent_futures_executor_works_and_callables_must_pickle(serial) -> None:
    # one thread: threads share torch's global RNG, which fine_tune draws from
    with ThreadPoolExecutor(1) as pool:
        result = run(executor=pool)
    assert values(result.rows) == values(serial.rows)
    with pytest.raises(tnconv.NotPicklableError, match="evaluate"):
        run(executor="processes", evaluate=lambda m: 0.0)
    with pytest.raises(tnconv.StudyError, match="executor"):
        run(executor="threads")
    with pytest.raises(tnconv.StudyError, match="workers"):
        run(workers=2)
    # the model as factory + state_dict instead of the pickled module
    with ThreadPoolExecutor(1) as pool:
        by_state = run(executor=pool, model_factory=tiny_net)
    assert values(by_state.rows) == values(serial.rows)
    with pytest.raises(tnconv.NotPicklableError, match="model_factory"):
        run(executor="processes", model_factory=lambda: tiny_net())


def test_an_interrupted_study_resumes_from_its_csv(serial, tmp_path) -> None:
    path = tmp_path / "study.csv"
    calls: list[int] = []

    def interrupting(model: nn.Module) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        fine_tune(model)

    with pytest.raises(KeyboardInterrupt):
        run(fine_tune=interrupting, resume=path)
    assert len(path.read_text().splitlines()) == 1 + 3  # header, dense, two finished cells

    evaluated: list[int] = []

    def counting(model: nn.Module) -> float:
        evaluated.append(1)
        return evaluate(model, 2.0)

    resumed = run(evaluate=counting, resume=path)
    assert len(evaluated) == 2 * 2  # only the two unfinished cells, before and after tuning
    assert values(resumed.rows) == values(serial.rows)
    # the CSV now holds the whole study in grid order; resuming again computes nothing
    again = run(evaluate=counting, resume=path)
    assert len(evaluated) == 4 and values(again.rows) == values(serial.rows)
    # a smaller grid on the same file: its rows come back, the other cells' rows stay in the file
    part = run(methods=["tucker"], evaluate=counting, resume=path)
    assert len(evaluated) == 4 and values(part.rows) == values(serial.rows[:3])
    assert len(path.read_text().splitlines()) == 1 + len(serial.rows)
    with pytest.raises(tnconv.StudyError, match="another model"):
        tnconv.study(
            nn.Sequential(nn.Conv2d(3, 5, 3)),
            METHODS,
            BUDGETS,
            input_size=SIZE,
            progress=False,
            resume=path,
        )
