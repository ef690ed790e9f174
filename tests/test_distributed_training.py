"""Data-parallel training under ``torch.distributed``: 2 gloo processes give the 1-process weights.

One spawn of 2 processes runs every helper (``finetune``, distillation, ``ADMM.fit``,
quantization-aware ``finetune``, ``fit`` over a ``DistributedSampler``) on a tiny model and
generated data, each rank training on half of every global batch; the parent runs the same calls
in one process without a group, and the weights must agree to 1e-6 (relative). The same spawn
checks batch norm with and without ``sync_batchnorm`` and the error for ranks whose loaders differ,
and a last test runs
``tnconv admm`` under ``torchrun --nproc_per_node 2``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import tnconv
from tnconv import distributed as tdist
from tnconv.cli import main
from tnconv.errors import LoaderError, ProjectionError
from tnconv.training import fit

BATCH = 16  # global batch: each of the 2 ranks trains on 8 of it
N = 64


def _data(n: int = N, seed: int = 0) -> TensorDataset:
    """Four classes told apart by which quadrant of an 8x8 image is bright."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = 0.5 * torch.randn(n, 3, 8, 8, generator=gen)
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 1.0
    return TensorDataset(x, y)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 4),
    )


def _bn_net(seed: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),  # a bias before BN has no gradient
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8, momentum=None),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _loader(data: TensorDataset, seed: int = 0) -> DataLoader:
    """The global batches: shuffled by a seeded generator, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=BATCH, shuffle=True, generator=gen)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _runs(sampler_loader: DataLoader) -> dict[str, Any]:
    """Every helper, from the same seeds; with a process group each rank trains on its share."""
    data = _data()
    out: dict[str, Any] = {}

    small = tnconv.compress(_net(), "tucker", ratio=0.4, layers=["2"])
    out["finetune_history"] = tnconv.finetune(small, _loader(data), 2, lr=3e-3)
    out["finetune"] = _state(small)

    student = tnconv.compress(_net(), "cp", ratio=0.4, layers=["2"], n_init=1, max_iter=30)
    images = DataLoader(
        TensorDataset(data.tensors[0]),
        batch_size=BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(3),
    )
    tnconv.finetune(student, images, 1, teacher=_net(), optimizer="sgd", lr=0.01)
    out["distill"] = _state(student)

    dense = _net(1)
    admm = tnconv.ADMM(dense, "tucker", ratio=0.4, layers=["2"])
    out["admm_history"] = admm.fit(_loader(data, 1), 2, lr=0.02, step_every=2)
    out["admm"] = _state(dense)
    out["admm_Z"] = {n: z.clone() for n, z in admm.Z.items()}
    out["admm_U"] = {n: u.clone() for n, u in admm.U.items()}
    out["admm_distance"] = [h["max_distance"] for h in admm.history]

    calibration = [data.tensors[0][:32]]
    q = tnconv.quantize(
        tnconv.compress(_net(2), "tucker", ratio=0.4, layers=["2"]), 8, 8, calibration
    )
    tnconv.finetune(q, _loader(data, 2), 1, lr=1e-3)
    out["qat"] = _state(q)

    plain = _net(4)
    out["sampler_history"] = fit(plain, sampler_loader, 2, lr=0.02)
    out["sampler"] = _state(plain)

    # batch norm: the global batch's statistics with sync_batchnorm, each rank's share without
    for key, sync in (("syncbn", True), ("bn_per_rank", False)):
        bn = _bn_net()
        tnconv.finetune(bn, _loader(data, 6), 2, optimizer="sgd", sync_batchnorm=sync)
        out[key] = _state(bn)
        out[key + "_types"] = [type(m).__name__ for m in bn]

    # global batches of 15, 15, 15, 15, 4: shares of 8 and 7 (2 and 2), losses weighted
    uneven = _net(5)
    seen: list[int] = []
    uneven.register_forward_pre_hook(lambda _, args: seen.append(len(args[0])))
    gen = torch.Generator().manual_seed(5)
    fit(uneven, DataLoader(data, batch_size=15, shuffle=True, generator=gen), 1, lr=0.05)
    out["uneven"] = _state(uneven)
    out["uneven_sizes"] = seen
    return out


def _worker(rank: int, world: int, init: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        sharded = DataLoader(
            _data(),
            batch_size=BATCH // world,
            sampler=DistributedSampler(_data(), num_replicas=world, rank=rank, shuffle=False),
        )
        out = _runs(sharded)
        errors = {}
        try:  # each rank shuffles with its own seed: the batches differ
            fit(_net(), _loader(_data(), seed=10 + rank), 1)
        except LoaderError as exc:
            errors["unsynced"] = str(exc)
        admm = tnconv.ADMM(_net(), "tucker", ratio=0.4, layers=["2"], rho=1.0)
        if rank == 0:  # a projection that fails on rank 0 alone

            def broken(name: str, v: torch.Tensor) -> torch.Tensor:
                raise ProjectionError(f"layer {name!r} cannot be projected")

            admm._project = broken  # type: ignore[method-assign]
        try:
            admm.step()
        except ProjectionError as exc:
            errors["projection"] = str(exc)
        out["errors"] = errors
        out["world"] = (tdist.rank(), tdist.world_size(), tdist.is_main_process())
        torch.save(out, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    """(the 1-process results, the 2 ranks' results)."""
    folder = tmp_path_factory.mktemp("ddp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _runs(DataLoader(_data(), batch_size=BATCH))  # the same global batches
    finally:
        torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = "1"  # the children's
    try:
        mp.spawn(_worker, args=(2, f"tcp://127.0.0.1:{_free_port()}", str(folder)), nprocs=2)
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return single, ranks


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key].double(), b[key].double()
        scale = max(float(x.norm()), 1e-12)
        assert float((x - y).norm()) <= rtol * scale, key


@pytest.mark.parametrize(
    "case", ["finetune", "distill", "admm", "qat", "sampler", "uneven", "syncbn"]
)
def test_two_processes_give_the_one_process_weights(runs, case: str) -> None:
    single, ranks = runs
    # ADMM's projections (a Tucker fit of each weight every other step) amplify the rounding of
    # the gradients' reduction order: 1.1e-6 relative measured on one machine, 1e-6 elsewhere
    rtol = 1e-5 if case == "admm" else 1e-6
    for r in ranks:
        _close(r[case], single[case], rtol)
    # DDP keeps the ranks' weights identical to the bit
    for key, value in ranks[0][case].items():
        assert torch.equal(value, ranks[1][case][key]), key


def test_each_rank_trains_on_its_share_of_every_batch(runs) -> None:
    single, ranks = runs
    assert single["uneven_sizes"] == [15, 15, 15, 15, 4]
    assert ranks[0]["uneven_sizes"] == [8, 8, 8, 8, 2]
    assert ranks[1]["uneven_sizes"] == [7, 7, 7, 7, 2]


def test_without_sync_batchnorm_each_rank_normalises_its_share(runs) -> None:
    single, ranks = runs
    for r in ranks:  # the synchronised layers were swapped back
        assert r["syncbn_types"] == [type(m).__name__ for m in _bn_net()]
    x, y = single["bn_per_rank"]["0.weight"], ranks[0]["bn_per_rank"]["0.weight"]
    assert float((x - y).norm()) > 1e-4 * float(x.norm())
    assert torch.equal(ranks[0]["bn_per_rank"]["0.weight"], ranks[1]["bn_per_rank"]["0.weight"])


def test_the_reported_loss_is_the_global_batches_mean(runs) -> None:
    single, ranks = runs
    for key in ("finetune_history", "admm_history", "sampler_history"):
        for r in ranks:
            assert r[key] == pytest.approx(single[key], rel=1e-6), key


def test_admm_z_and_u_come_from_rank_0(runs) -> None:
    single, ranks = runs
    for store in ("admm_Z", "admm_U"):
        for name in ranks[0][store]:
            assert torch.equal(ranks[0][store][name], ranks[1][store][name])
        _close(ranks[0][store], single[store], rtol=1e-5)
    assert ranks[0]["admm_distance"] == ranks[1]["admm_distance"]
    assert len(ranks[0]["admm_distance"]) == len(single["admm_distance"]) == 1 + 2 * 4 // 2


def test_ranks_and_errors(runs) -> None:
    _, ranks = runs
    assert [r["world"] for r in ranks] == [(0, 2, True), (1, 2, False)]
    for r in ranks:
        assert "yield different batches" in r["errors"]["unsynced"]
    # rank 0's failure reaches rank 1 (which would otherwise wait for the broadcast forever)
    assert ranks[0]["errors"]["projection"] == "layer '2' cannot be projected"
    assert ranks[1]["errors"]["projection"] == "on rank 0: layer '2' cannot be projected"


def test_helpers_without_a_process_group() -> None:
    assert not tdist.is_distributed()
    assert (tdist.rank(), tdist.world_size(), tdist.is_main_process()) == (0, 1, True)
    model = _net()
    assert tdist.wrap_ddp(model) is model and tdist.unwrap(model) is model
    batch = (torch.arange(5), torch.arange(5))
    assert tdist.shard_batch(batch) is batch
    assert [t.tolist() for t in tdist.shard_batch(batch, 1, 2)] == [[3, 4], [3, 4]]
    assert tdist.shard_batch(torch.arange(5), 0, 2).tolist() == [0, 1, 2]
    with pytest.raises(LoaderError, match="cannot split"):
        tdist.shard_batch({"x": 1}, 0, 2)
    t = torch.ones(3)
    tdist.broadcast_tensors([t])
    assert t.tolist() == [1.0, 1.0, 1.0]
    assert tdist.broadcast_object({"a": 1}) == {"a": 1}
    assert tdist.all_reduce_sum([1, 2.5]) == [1.0, 2.5]
    assert tdist.check_same_batch(batch) == 5
    assert not tdist.is_sharded(_loader(_data()))
    with tdist.sync_batchnorm(model) as same:
        assert same is model
    assert not tdist.init_from_env() or "WORLD_SIZE" in os.environ


_ADMM_ARGS = [
    "admm",
    "-m",
    "tucker",
    "--ratio",
    "0.5",
    "--source",
    "sklearn",
    "--train-limit",
    "128",
    "--width",
    "4",
    "--dense-epochs",
    "1",
    "--epochs",
    "1",
    "--tune-epochs",
    "1",
    "--batch-size",
    "32",
    "--sync-batchnorm",
    "-q",
]


def test_tnconv_admm_under_torchrun_gives_the_one_process_model(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this python")
    port = str(_free_port())
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", port, "-m", "tnconv.cli"]
    out = tmp_path / "two.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(
        [*cmd, *_ADMM_ARGS, "-o", str(out)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 alone prints and writes
    assert done.stdout.count("admm step   2") == 1

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*_ADMM_ARGS, "-o", str(tmp_path / "one.safetensors")]) == 0
    finally:
        torch.set_num_threads(threads)
    one = tnconv.load(tmp_path / "one.safetensors").state_dict()
    two = tnconv.load(out).state_dict()
    # over all the weights as one vector: the run compresses twice, which amplifies rounding
    # (measured 3.5e-6; without --sync-batchnorm the ranks' batch norm ends 1.1e-2 away)
    keys = [k for k, v in one.items() if v.is_floating_point()]
    x = torch.cat([one[k].double().reshape(-1) for k in keys])
    y = torch.cat([two[k].double().reshape(-1) for k in keys])
    assert float((x - y).norm()) <= 1e-4 * float(x.norm())
