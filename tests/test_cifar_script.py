"""The CIFAR-10 fine-tuning script, end to end on a tiny pickle-format folder, and its pieces."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import tnconv
from tnconv.datasets import load_cifar10
from tnconv.experiments import cifar
from tnconv.experiments._common import UsageError, load_dense_checkpoint
from tnconv.experiments.augment import CIFAR10_BLACK, AugmentedLoader, random_crop_flip
from tnconv.models import block_convs, resnet20, resnet32
from tnconv.training import evaluate

from .test_training import write_fake_cifar

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# augmentation
# ---------------------------------------------------------------------------------------------
def test_random_crop_flip_is_a_padded_crop_or_its_mirror() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 8, 8, generator=gen)
    fill = (-1.0, -2.0, -3.0)
    y = random_crop_flip(x, padding=2, fill=fill, generator=torch.Generator().manual_seed(1))
    assert y.shape == x.shape
    padded = torch.tensor(fill).view(1, 3, 1, 1).expand(64, 3, 12, 12).clone()
    padded[:, :, 2:10, 2:10] = x
    seen = set()
    for b in range(64):
        matches = [
            (top, left, mirrored)
            for top in range(5)
            for left in range(5)
            for mirrored in (False, True)
            if torch.equal(
                y[b],
                padded[b, :, top : top + 8, left : left + 8].flip(-1)
                if mirrored
                else padded[b, :, top : top + 8, left : left + 8],
            )
        ]
        assert matches, f"sample {b} is not a crop of its padded image"
        seen.update(matches)
    assert {m for _, _, m in seen} == {False, True}  # both flips occur
    assert len({(t, u) for t, u, _ in seen}) > 10  # and many offsets
    # same generator seed, same augmentation
    again = random_crop_flip(x, padding=2, fill=fill, generator=torch.Generator().manual_seed(1))
    assert torch.equal(y, again)


def test_random_crop_flip_identity_and_errors() -> None:
    x = torch.randn(4, 3, 6, 6)
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)
    with pytest.raises(ValueError, match="B, C, H, W"):
        random_crop_flip(x[0])
    with pytest.raises(ValueError, match="fill"):
        random_crop_flip(x, fill=(0.0, 1.0))
    # the default fill of the loader is black after CIFAR-10 normalisation
    black = torch.zeros(1, 3, 1, 1)
    mean, std = (
        torch.tensor(tnconv.datasets.CIFAR10_MEAN),
        torch.tensor(tnconv.datasets.CIFAR10_STD),
    )
    torch.testing.assert_close(
        torch.tensor(CIFAR10_BLACK), ((black.flatten() - mean) / std).float()
    )


def test_augmented_loader_keeps_labels_and_length() -> None:
    data = TensorDataset(torch.randn(10, 3, 32, 32), torch.arange(10))
    base = DataLoader(data, batch_size=4)
    loader = AugmentedLoader(base, generator=torch.Generator().manual_seed(0))
    assert len(loader) == len(base) == 3
    batches = list(loader)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 32, 32)] * 2 + [(2, 3, 32, 32)]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(10))
    assert not torch.equal(batches[0][0], data.tensors[0][:4])


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def test_load_dense_checkpoint_formats(tmp_path) -> None:
    torch.manual_seed(0)
    source = resnet20()
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pt"
    torch.save(source.state_dict(), plain)
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3},
        wrapped,
    )
    saved = tmp_path / "dense.safetensors"  # tnconv.save of a dense model (format 3)
    tnconv.save(source, saved)
    for path in (plain, wrapped, saved):
        target = resnet20()
        load_dense_checkpoint(target, path)
        assert torch.equal(target.layer3[2].conv2.weight, source.layer3[2].conv2.weight)
    with pytest.raises(
        UsageError, match=r"does not fit CifarResNet: 72 missing \(e\.g\. layer1\.3\."
    ):
        load_dense_checkpoint(resnet32(), plain)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UsageError, match="weights_only"):
        load_dense_checkpoint(resnet20(), tmp_path / "junk.pt")
    with pytest.raises(UsageError, match="does not exist"):
        load_dense_checkpoint(resnet20(), tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------------------
# the script
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def cifar_dir(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    write_fake_cifar(root, n_per_batch=24, batches=2, seed=3)
    return root


def _args(data, out, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--out", str(out), "--model", "resnet20", "--method", "tt",
        "--eps", "0.5", "--batch-size", "16", "--limit", "32", "--no-progress", *extra,
    ]  # fmt: skip


def test_script_end_to_end(cifar_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run1"
    result = cifar.run(
        cifar.parse_args(_args(cifar_dir, out, "--pretrain-epochs", "1", "--epochs", "1"))
    )
    assert {p.name for p in out.iterdir()} == {
        "results.json",
        "compressed.pt",
        "layers.csv",
        "dense.pt",
    }
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(result.results))
    assert results["data"] == {"train_images": 32, "test_images": 24}  # --limit 32, 24 in test
    assert set(results["accuracy"]) == {"dense", "compressed", "finetuned"}
    assert all(0.0 <= a <= 1.0 for a in results["accuracy"].values())
    assert len(results["loss"]["pretrain"]) == 1 and len(results["loss"]["finetune"]) == 1
    assert results["config"]["lr"] == 0.01 and results["config"]["batch_size"] == 16
    assert results["config"]["weight_decay"] == 5e-4
    assert results["layers"]["selected"] == block_convs(resnet20())
    for key in ("load_data", "pretrain", "compress", "finetune", "evaluate", "total"):
        assert results["seconds"][key] >= 0

    # the saved model: same outputs whether unpickled or rebuilt from its specs in a fresh model
    test_x = load_cifar10(cifar_dir, train=False).tensors[0][:24]
    loaded = tnconv.load(out / "compressed.pt").eval()
    rebuilt = tnconv.load(out / "compressed.pt", model=resnet20()).eval()
    with torch.no_grad():
        expected = result.compressed.eval()(test_x)
        torch.testing.assert_close(loaded(test_x), expected, rtol=0, atol=0)
        torch.testing.assert_close(rebuilt(test_x), expected, rtol=1e-5, atol=1e-5)
    test_set = load_cifar10(cifar_dir, train=False)
    assert evaluate(rebuilt, DataLoader(test_set, 16)) == results["accuracy"]["finetuned"]

    # reported sizes are the saved model's
    red = results["reduction"]
    assert red["params"] == sum(p.numel() for p in rebuilt.parameters())
    assert red["params_dense"] == 269_722 and red["layers"] == 18
    rows = {r.name: r for r in tnconv.summary(rebuilt, (1, 3, 32, 32)).rows}
    # the stem stays dense because it was never selected, not for lack of a saving
    assert rows["conv1"].method == "dense" and "conv1" not in tnconv.dense_reasons(rebuilt)
    assert red["block_params"] == sum(rows[n].params for n in block_convs(rebuilt))
    kept = results["layers"]["kept_dense"]
    assert red["kept_dense"] == len(kept)
    assert all(rows[n].method == ("dense" if n in kept else "tt") for n in block_convs(rebuilt))

    # a second run from the dense checkpoint the first one wrote, through main()
    out2 = tmp_path / "run2"
    before = torch.get_num_threads()
    checkpoint = str(out / "dense.pt")
    code = cifar.main(
        _args(cifar_dir, out2, "--checkpoint", checkpoint, "--threads", "1", "--epochs", "1")
    )
    torch.set_num_threads(before)
    assert code == 0 and json.loads((out2 / "results.json").read_text())["config"]["threads"] == 1
    report = capsys.readouterr().out
    assert "accuracy" in report and "resnet20 + tt (eps 0.5)" in report
    second = json.loads((out2 / "results.json").read_text())
    assert second["accuracy"]["dense"] == results["accuracy"]["dense"]  # same dense weights
    assert second["loss"]["pretrain"] == [] and not (out2 / "dense.pt").exists()
    assert len(second["loss"]["finetune"]) == 1
    assert second["reduction"]["block_params"] == red["block_params"]  # same kernels, same ranks


def test_script_without_fine_tuning(cifar_dir, tmp_path) -> None:
    torch.manual_seed(0)
    dense = tmp_path / "dense.pt"
    torch.save(resnet20().state_dict(), dense)
    args = _args(cifar_dir, tmp_path / "out", "--checkpoint", str(dense), "--epochs", "0")
    result = cifar.run(cifar.parse_args([*args, "--no-augment"]))
    acc = result.results["accuracy"]
    assert acc["finetuned"] == acc["compressed"] and result.results["loss"]["finetune"] == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--data": "{tmp}/missing"}, "does not exist"),
        ({"--checkpoint": "{tmp}/missing.pt"}, "checkpoint"),
        ({"--method": "rsdtr-missing"}, "unknown method 'rsdtr-missing'; available: "),
        ({"--eps": "1.5"}, "eps must be in (0, 1)"),
        ({"--epochs": "-1"}, "must be >= 0"),
        ({"--threads": "0"}, "argument --threads: must be >= 1"),
        ({"--model": "resnet18"}, "invalid choice"),
        ({"--pretrain-epochs": None}, "give --checkpoint FILE or --pretrain-epochs K"),
        ({"--data": "{tmp}"}, "no data_batch"),
        ({"--checkpoint": "{tmp}/other.pt"}, "does not fit"),
    ],
)
def test_script_errors_are_one_line_with_code_2(
    cifar_dir, tmp_path, capsys, change, message
) -> None:
    torch.save(resnet32().state_dict(), tmp_path / "other.pt")
    options = {"--pretrain-epochs": "1", "--epochs": "1"}
    for key, value in change.items():
        if value is None:
            options.pop(key)
        else:
            options[key] = value.format(tmp=tmp_path)
    data = options.pop("--data", str(cifar_dir))
    argv = _args(data, tmp_path / "out", *[t for kv in options.items() for t in kv])
    assert cifar.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(cifar.PROG + ": error: ")
    assert message in err
    assert captured.out == ""
    assert not (tmp_path / "out" / "results.json").exists()


def test_script_help(capsys) -> None:
    assert cifar.main(["--help"]) == 0
    assert "--pretrain-epochs" in capsys.readouterr().out


def test_script_fine_tunes_with_the_published_schedule(cifar_dir, tmp_path, monkeypatch) -> None:
    calls = []
    real_fit = cifar.fit

    def recording_fit(model, loader, epochs, **kwargs):
        calls.append((loader, epochs, kwargs))
        return real_fit(model, loader, epochs, **kwargs)

    monkeypatch.setattr(cifar, "fit", recording_fit)
    args = _args(cifar_dir, tmp_path / "out", "--pretrain-epochs", "1", "--epochs", "2")
    cifar.run(cifar.parse_args(args))
    (pre_loader, pre_epochs, pre), (loader, epochs, tune) = calls
    assert pre_loader is loader  # one augmented loader for both phases
    assert pre_epochs == 1 and pre["lr"] == 0.1 and pre["schedule"] == "onecycle"
    assert epochs == 2 and tune["lr"] == 0.01 and tune["weight_decay"] == 5e-4
    assert tune["schedule"] == "onecycle"
    assert isinstance(loader, AugmentedLoader) and loader.padding == 4 and loader.flip
    assert len(loader) == 2  # 32 images in batches of 16
