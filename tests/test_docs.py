"""The README's quickstart and the example run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def test_readme_quickstart_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = python_blocks(quickstart)
    assert blocks, "no python block under ## Quickstart"
    for block in blocks:
        exec(compile(block, "README.md quickstart", "exec"), {})


def test_readme_whole_model_block_runs(tmp_path, monkeypatch) -> None:
    import torch
    from torch import nn

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Whole models", 1)[1].split("\n## ", 1)[0]
    (block,) = python_blocks(section)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    monkeypatch.chdir(tmp_path)
    import tnconv

    # the block follows the quickstart's imports; `loader` is the user's data
    scope = {"model": model, "tnconv": tnconv, "loader": [torch.randn(4, 3, 32, 32)]}
    exec(compile(block, "README.md whole models", "exec"), scope)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(scope["again"](x), scope["small"](x))
    assert (tmp_path / "study.csv").exists() and (tmp_path / "small.safetensors").exists()


def test_example_runs() -> None:
    # a subprocess: the example switches autograd off for its whole process
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "tucker" in done.stdout and "rsdtr" in done.stdout
