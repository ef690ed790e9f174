"""The ``tnconv`` command line."""

from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest
import torch
from torch import nn

import tnconv
from tnconv.cli import main

from .conftest import REAL_KERNELS


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 4),
    ).eval()


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "list")
    assert code == 0
    for name in tnconv.available():
        assert name in out


def test_compress_summary_roundtrip(tmp_path, capsys: pytest.CaptureFixture) -> None:
    model = small_model()
    src, dst, csv = tmp_path / "in.pt", tmp_path / "out.pt", tmp_path / "rows.csv"
    torch.save(model, src)
    code, out, err = run(
        capsys,
        "compress",
        str(src),
        "-m",
        "tt",
        "--ratio",
        "0.3",
        "--layers",
        "2",
        "--input-size",
        "1,3,16,16",
        "-o",
        str(dst),
        "-q",
    )
    assert code == 2 and "--trust-file" in err  # a pickled model is not opened untrusted
    code, out, err = run(
        capsys,
        "compress",
        str(src),
        "--trust-file",
        "-m",
        "tt",
        "--ratio",
        "0.3",
        "--layers",
        "2",
        "--input-size",
        "1,3,16,16",
        "-o",
        str(dst),
        "-q",
    )
    assert code == 0, err
    assert "layers total" in out and dst.exists()
    small = tnconv.load(dst, model_fn=small_model)
    assert isinstance(small[2], tnconv.FactorizedConv2d)
    x = torch.randn(2, 3, 16, 16)
    assert small(x).shape == model(x).shape
    code, out, err = run(
        capsys, "summary", str(dst), "--csv", str(csv), "--model", "tests.test_cli:small_model"
    )
    assert code == 0, err
    assert "(1, 3, 16, 16)" in out  # the size given to compress is remembered
    assert csv.read_text().startswith("name,")
    # a compressed file can be compressed again (e.g. other layers) and options pass through
    code, _, err = run(
        capsys,
        "compress",
        str(dst),
        "-m",
        "tr",
        "--rank",
        "2,2,2,2",
        "--layers",
        "4",
        "--option",
        "als_sweeps=0",
        "--trust-file",
        "-o",
        str(tmp_path / "o2.pt"),
    )
    assert code == 0, err
    twice = tnconv.load(tmp_path / "o2.pt", trusted=True)
    assert twice[2].method == "tt" and twice[4].method == "tr"


def test_study_on_kernels(tmp_path, capsys: pytest.CaptureFixture) -> None:
    kernels = tmp_path / "k.npz"
    np.savez(kernels, a=REAL_KERNELS["dlib_mmod/conv02"], b=np.zeros((8, 1, 3, 3)))
    code, _out, err = run(
        capsys,
        "study",
        str(kernels),
        "--methods",
        "tucker,tt",
        "--budgets",
        "0.2,0.5",
        "--repeats",
        "2",
        "--out",
        str(tmp_path / "s"),
        "-q",
    )
    assert code == 0, err
    rows = (tmp_path / "s" / "study.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2  # the depthwise kernel b is skipped
    assert (tmp_path / "s" / "study.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compress", "{missing}", "-m", "tt", "--eps", "0.3", "-o", "{out}"], "no such file"),
        (["compress", "{state}", "-m", "tt", "--eps", "0.3", "-o", "{out}"], "state_dict"),
        (["compress", "{model}", "-m", "nope", "--eps", "0.3", "-o", "{out}"], "known: cp"),
        (["compress", "{model}", "-m", "tt", "--eps", "1.5", "-o", "{out}"], "eps"),
        (["compress", "{model}", "-m", "tt", "--rank", "a,b", "-o", "{out}"], "--rank"),
        (["compress", "{model}", "-m", "tt", "-o", "{out}"], "one of --rank"),
        (
            [
                "compress",
                "{model}",
                "-m",
                "tt",
                "--eps",
                "0.3",
                "--eps",
                "0.2",
                "--ratio",
                "0.1",
                "-o",
                "{out}",
            ],
            "not allowed",
        ),
        (
            ["compress", "{model}", "-m", "tt", "--eps", "0.3", "--layers", "9", "-o", "{out}"],
            "no module named",
        ),
        (
            [
                "compress",
                "{model}",
                "-m",
                "tt",
                "--eps",
                "0.3",
                "--option",
                "bogus=1",
                "-o",
                "{out}",
            ],
            "bogus",
        ),
        (["summary", "{model}", "--input-size", "1,3"], "input_size|input size"),
        (["summary", "{pickled}"], "--trust-file"),
        (["study", "{missing}.npz", "--out", "{out}"], "no such file"),
        (["study", "{model}", "--out", "{out}", "--workers", "0"], "--workers must be"),
        (
            ["study", "{model}", "--out", "{out}", "--workers", "2", "--scheduler", "tcp://h:1"],
            "exclude each other",
        ),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_errors_are_one_line_with_status_2(
    tmp_path, capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    torch.save(small_model(), tmp_path / "model.pt")
    torch.save(small_model().state_dict(), tmp_path / "state.pt")
    paths = {
        "missing": tmp_path / "missing.pt",
        "state": tmp_path / "state.pt",
        "model": tmp_path / "model.pt",
        "pickled": tmp_path / "model.pt",
        "out": tmp_path / "out.pt",
    }
    if "{model}" in argv:  # a pickled whole model opens only with --trust-file
        argv = [*argv, "--trust-file"]
    code, _out, err = run(capsys, *(a.format(**paths) for a in argv))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tnconv: error:")
    assert __import__("re").search(message, lines[0]), lines[0]


def test_console_script_is_declared() -> None:
    try:
        dist = metadata.distribution("tnconv")
    except metadata.PackageNotFoundError:
        pytest.skip("tnconv is not installed")
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts.get("tnconv") == "tnconv.cli:main"


def test_experiment_scripts_are_reachable(tmp_path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "cifar", "--data", str(tmp_path / "none"), "--out", str(tmp_path))
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run(capsys, "reduction", "--help")
    assert code == 0 and "--model" in out


@pytest.mark.parametrize("suffix", [".npy", ".safetensors", ".pt"])
def test_compress_with_calibration_inputs_from_a_file(tmp_path, capsys, suffix: str) -> None:
    """--calibration FILE: the same model as compress(calibration=) on those inputs in batches
    of 64; unreadable or non-float files are a one-line error."""
    from safetensors.torch import save_file

    model = small_model()
    src, dst = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    tnconv.save(model, src)
    x = torch.randn(80, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    data = tmp_path / f"inputs{suffix}"
    if suffix == ".npy":
        np.save(data, x.numpy())
    elif suffix == ".safetensors":
        save_file({"inputs": x}, str(data))
    else:
        torch.save(x, data)
    args = ["compress", str(src), "--model", "tests.test_cli:small_model", "-m", "tucker"]
    args += ["--budget", "0.3", "--layers", "2,4", "--input-size", "1,3,16,16", "-q"]
    code, _, err = run(capsys, *args, "--calibration", str(data), "-o", str(dst))
    assert code == 0, err
    small = tnconv.load(dst, model_fn=small_model)
    same = tnconv.compress(
        model,
        "tucker",
        budget=0.3,
        layers=["2", "4"],
        input_size=(1, 3, 16, 16),
        calibration=[x[:64], x[64:]],
    )
    for name in ("2", "4"):
        assert torch.equal(
            small.get_submodule(name).to_tensor(), same.get_submodule(name).to_tensor()
        )
    labels = tmp_path / "labels.pt"
    torch.save(torch.arange(10), labels)
    code, _, err = run(capsys, *args, "--calibration", str(labels), "-o", str(dst))
    assert code == 2 and "float tensor" in err
    code, _, err = run(capsys, *args, "--allocate-by", "logits", "-o", str(dst))
    assert code == 2 and "--calibration" in err
