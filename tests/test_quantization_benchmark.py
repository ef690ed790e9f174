"""The quantization benchmark end to end in its tiny form (sklearn digits), and its size count."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tnconv.quantization import quantize

pytestmark = pytest.mark.usefixtures("one_thread")

BENCH = Path(__file__).parent.parent / "benchmarks" / "quantization.py"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("quant_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCH.parent))


def test_size_in_bits_counts_codes_scales_and_float_parameters(bench) -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 3))
    assert bench.size_bits(model) == 32 * sum(p.numel() for p in model.parameters())
    q = quantize(model, 4, None, input_size=(1, 2, 3, 3))
    # conv: 72 weights at 4 bits + 4 scales, bias 4 floats; bn 8 floats; linear 12 at 4 bits +
    # 3 scales, bias 3 floats
    expected = 72 * 4 + 4 * 32 + 4 * 32 + 8 * 32 + 12 * 4 + 3 * 32 + 3 * 32
    assert bench.size_bits(q) == expected


def test_quick_benchmark_runs_and_reports_every_table(bench, capsys) -> None:
    result = bench.main(["--quick", "--epochs", "1", "--repeats", "1"])
    rows = {r["model"]: r for r in result["accuracy_vs_size"]}
    other = result["best_other_method"]
    assert set(rows) == {
        "dense fp32",
        "dense w8a8",
        "tucker fp32",
        "tucker w8a8",
        "tucker w4a8",
        "tucker w4a4",
        f"{other} fp32",
        f"{other} w8a8",
        f"{other} w4a8",
        f"{other} w4a4",
    }
    for name in ("tucker", other):  # fewer bits, smaller model
        assert rows[f"{name} w4a8"]["size_kbit"] < rows[f"{name} w8a8"]["size_kbit"]
        assert rows[f"{name} w4a4"]["size_kbit"] == rows[f"{name} w4a8"]["size_kbit"]
    assert rows["tucker w8a8"]["size_kbit"] < rows["tucker fp32"]["size_kbit"]
    assert rows["dense w8a8"]["size_kbit"] < rows["dense fp32"]["size_kbit"]
    selection = {r["selection"]: r for r in result["selection"]}
    assert set(selection) == {"error-based budget=", "one-step", "multi-step"}
    allowed = result["config"]["budget"] * result["compressed_dense_params"]
    assert all(r["params"] <= allowed for r in selection.values())
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in selection.values())
    assert result["int8_top1_agreement_with_simulated"] > 0.9
    out = capsys.readouterr().out
    assert "| selection |" in out and "| tucker int8 |" in out
    assert torch.backends.quantized.engine == result["engine"]
