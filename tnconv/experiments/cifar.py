"""Compress a CIFAR-10 model's block convs and fine-tune it, on a local CIFAR-10 folder.

The RSDTR paper's CIFAR-10 protocol: take a trained dense model, compress every conv inside its
blocks at a relative error bound eps (the stem and classifier stay dense), then fine-tune the
whole network with SGD and a OneCycle schedule peaking at lr 0.01. ::

    python -m tnconv.experiments.cifar --data cifar-10-batches-py --model resnet20 \\
        --method tr --eps 0.5 --checkpoint dense.pt --epochs 160 --out runs/r20-tr-0.5

``--data`` is the python-pickle folder (``data_batch_1`` ... ``data_batch_5``, ``test_batch``).
Without ``--checkpoint`` the dense model is first trained for ``--pretrain-epochs`` and saved as
``OUT/dense.pt`` (a state dict, reusable with ``--checkpoint``). The run writes

* ``OUT/results.json``: accuracies (dense, compressed, fine-tuned), parameters and FLOPs of the
  whole model and of the block convs before and after, reductions, layers kept dense and why,
  loss per epoch, timings and the configuration;
* ``OUT/compressed.pt``: the fine-tuned compressed model (``tnconv.load``);
* ``OUT/layers.csv``: ``tnconv.summary`` of it, one row per conv.

Training batches get the standard augmentation (4-pixel padding, random 32x32 crop, horizontal
flip). ``main(argv)`` returns the exit code: 0, or 2 with a one-line message for a bad argument
or a missing / unreadable file.

Under ``torchrun --nproc_per_node N`` (``python -m torch.distributed.run ... -m
tnconv.experiments.cifar ...``) the pretraining and fine-tuning run data-parallel: every rank
reads the same shuffled, augmented global batches (same seeds) and trains on its share of each
(:mod:`tnconv.distributed`), ``--sync-batchnorm`` makes batch statistics global, and rank 0
alone writes the files and prints the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from .. import __version__
from .. import distributed as tdist
from ..compress import compress, dense_reasons
from ..datasets import load_cifar10
from ..io import save
from ..models import MODELS, block_convs, create
from ..summary import summary
from ..training import evaluate, fit
from ._common import Parser, UsageError, eps_value, load_dense_checkpoint, require_method
from .augment import AugmentedLoader
from .reduction import CIFAR_INPUT, measure

__all__ = ["CifarRun", "build_parser", "format_report", "main", "parse_args", "run"]

log = logging.getLogger(__name__)

PROG = "python -m tnconv.experiments.cifar"


def _int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}; got {value}")
        return value

    return parse


def _float_from(low: float, inclusive: bool) -> Callable[[str], float]:
    """argparse type: a finite number > ``low`` (>= when ``inclusive``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {'>=' if inclusive else '>'} {low:g}; got {text}"
            )
        return value

    return parse


_positive_float = _float_from(0.0, inclusive=False)
_non_negative_float = _float_from(0.0, inclusive=True)


def build_parser() -> Parser:
    """The script's argument parser (raises :class:`UsageError` on bad arguments)."""
    p = Parser(
        prog=PROG,
        description="Compress the block convs of a CIFAR-10 model with a tensor network and "
        "fine-tune it (SGD, OneCycle to lr 0.01), on a local python-pickle CIFAR-10 folder.",
    )
    p.add_argument("--data", type=Path, required=True, help="CIFAR-10 folder (python pickle)")
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--model", choices=sorted(MODELS), default="resnet20")
    p.add_argument(
        "--method",
        default="rsdtr",
        help="registered decomposition (tnconv.available()); default rsdtr, the paper's",
    )
    p.add_argument("--eps", type=eps_value, default=0.5, help="relative error bound per layer")
    p.add_argument(
        "--must-save",
        choices=("params", "flops", "both"),
        default="params",
        help="keep a layer dense unless its factorization saves this (default params)",
    )
    p.add_argument(
        "--checkpoint", type=Path, help="dense weights: a state dict (torch.save) or dense.pt"
    )
    p.add_argument(
        "--pretrain-epochs",
        type=_int_at_least(1),
        help="train the dense model this long first (needed without --checkpoint)",
    )
    p.add_argument("--pretrain-lr", type=_positive_float, default=0.1, help="OneCycle peak")
    p.add_argument("--pretrain-weight-decay", type=_non_negative_float, default=1e-4)
    p.add_argument(
        "--epochs", type=_int_at_least(0), default=160, help="fine-tuning epochs (0: none)"
    )
    p.add_argument("--lr", type=_positive_float, default=0.01, help="fine-tuning OneCycle peak")
    p.add_argument("--weight-decay", type=_non_negative_float, default=5e-4)
    p.add_argument("--batch-size", type=_int_at_least(1), default=128)
    p.add_argument(
        "--limit", type=_int_at_least(1), help="use only the first N train and N test images"
    )
    p.add_argument("--no-augment", action="store_true", help="train without crop / flip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument(
        "--threads",
        type=_int_at_least(1),
        help="CPU threads for torch (default: torch's choice; 1 is fastest on busy small CPUs)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument(
        "--sync-batchnorm",
        action="store_true",
        help="under torchrun: batch-norm statistics over the global batch (the 1-process run)",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the arguments; raises :class:`UsageError` with a one-line message."""
    args = build_parser().parse_args(argv)
    require_method(args.method)
    if not args.data.is_dir():
        raise UsageError(f"CIFAR-10 folder {args.data} does not exist")
    if args.checkpoint is None and args.pretrain_epochs is None:
        raise UsageError("no dense model: give --checkpoint FILE or --pretrain-epochs K")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise UsageError(f"checkpoint {args.checkpoint} does not exist")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise UsageError(f"bad --device {args.device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda requested but CUDA is not available")
    return args


@dataclass
class CifarRun:
    """What :func:`run` produced: the models (on the run's device) and the results dict that was
    written to ``out / "results.json"``."""

    dense: nn.Module
    compressed: nn.Module
    results: dict[str, Any]
    out: Path


def _load_split(root: Path, train: bool, limit: int | None) -> TensorDataset | Subset:
    try:
        data = load_cifar10(root, train=train, normalize=True)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise UsageError(str(exc).splitlines()[0]) from exc
    except Exception as exc:  # a corrupt pickle raises whatever the unpickler hits
        raise UsageError(f"cannot read CIFAR-10 from {root}: {type(exc).__name__}: {exc}") from exc
    if limit is not None and limit < len(data):
        return Subset(data, range(limit))
    return data


def run(args: argparse.Namespace) -> CifarRun:
    """Pretrain or load, evaluate, compress, evaluate, fine-tune, evaluate; write the outputs.

    ``args`` comes from :func:`parse_args`. Raises :class:`UsageError` for unreadable inputs.
    """
    clock = time.perf_counter()
    seconds: dict[str, float] = {}
    progress = not args.no_progress
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out {args.out}: {exc.strerror or exc}") from exc
    # the checkpoint first: a wrong one should fail before the data is read
    model = create(args.model)
    if args.checkpoint is not None:
        load_dense_checkpoint(model, args.checkpoint)
    model.to(device)

    start = time.perf_counter()
    train_set = _load_split(args.data, True, args.limit)
    test_set = _load_split(args.data, False, args.limit)
    shuffle = torch.Generator().manual_seed(args.seed)
    batches = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=shuffle)
    train_loader: Any = (
        batches
        if args.no_augment
        else AugmentedLoader(batches, generator=torch.Generator().manual_seed(args.seed + 1))
    )
    test_loader = DataLoader(test_set, batch_size=args.batch_size)
    seconds["load_data"] = time.perf_counter() - start

    pretrain_loss: list[float] = []
    start = time.perf_counter()
    if args.checkpoint is None:
        pretrain_loss = fit(
            model,
            train_loader,
            args.pretrain_epochs,
            lr=args.pretrain_lr,
            weight_decay=args.pretrain_weight_decay,
            schedule="onecycle",
            progress=progress,
            desc="pretrain",
            sync_batchnorm=args.sync_batchnorm,
        )
        if tdist.is_main_process():
            torch.save(model.state_dict(), args.out / "dense.pt")
    seconds["pretrain"] = time.perf_counter() - start

    start = time.perf_counter()
    acc_dense = evaluate(model, test_loader)
    seconds["evaluate"] = time.perf_counter() - start

    layers = block_convs(model)
    start = time.perf_counter()
    compressed = compress(
        model,
        args.method,
        eps=args.eps,
        layers=layers,
        input_size=CIFAR_INPUT,
        must_save=args.must_save,
        progress=progress,
    )
    seconds["compress"] = time.perf_counter() - start
    reduction = measure(
        model, compressed, layers, eps=args.eps, input_size=CIFAR_INPUT, seconds=seconds["compress"]
    )

    start = time.perf_counter()
    acc_compressed = evaluate(compressed, test_loader)
    seconds["evaluate"] += time.perf_counter() - start

    start = time.perf_counter()
    finetune_loss = (
        fit(
            compressed,
            train_loader,
            args.epochs,
            lr=args.lr,
            weight_decay=args.weight_decay,
            schedule="onecycle",
            progress=progress,
            desc="fine-tune",
            sync_batchnorm=args.sync_batchnorm,
        )
        if args.epochs > 0
        else []
    )
    seconds["finetune"] = time.perf_counter() - start

    start = time.perf_counter()
    acc_finetuned = evaluate(compressed, test_loader) if args.epochs > 0 else acc_compressed
    seconds["evaluate"] += time.perf_counter() - start

    files = {
        "results": args.out / "results.json",
        "model": args.out / "compressed.pt",
        "layers": args.out / "layers.csv",
    }
    if args.checkpoint is None:
        files["dense"] = args.out / "dense.pt"
    if tdist.is_main_process():
        save(compressed, files["model"])
        summary(compressed, CIFAR_INPUT).to_csv(files["layers"])
    seconds["total"] = time.perf_counter() - clock

    reasons = dense_reasons(compressed)
    results: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {"train_images": len(train_set), "test_images": len(test_set)},
        "schedule": {
            "optimizer": "SGD",
            "lr": "OneCycleLR (torch defaults): lr/25 -> lr over 30% of the steps -> lr/25e4",
            "momentum": "cycled 0.95 -> 0.85 -> 0.95 by OneCycleLR",
            "augmentation": "none" if args.no_augment else "4-pixel pad, random crop, h-flip",
        },
        "accuracy": {
            "dense": acc_dense,
            "compressed": acc_compressed,
            "finetuned": acc_finetuned,
        },
        "reduction": reduction.to_dict(),
        "input_size": list(CIFAR_INPUT),
        "layers": {
            "selected": layers,
            "kept_dense": {name: reasons[name] for name in layers if name in reasons},
        },
        "loss": {"pretrain": pretrain_loss, "finetune": finetune_loss},
        "seconds": seconds,
        "files": {k: str(v) for k, v in files.items()},
        "versions": {
            "tnconv": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "device": str(device),
        "processes": tdist.world_size(),
    }
    if tdist.is_main_process():
        files["results"].write_text(json.dumps(results, indent=2) + "\n")
    tdist.barrier()  # every rank returns once the files exist
    return CifarRun(model, compressed, results, args.out)


def format_report(results: dict[str, Any]) -> str:
    """A few lines summarising a run's results dict."""
    cfg, acc, red, sec = (
        results["config"],
        results["accuracy"],
        results["reduction"],
        results["seconds"],
    )
    data = results["data"]
    kept = results["layers"]["kept_dense"]
    return "\n".join(
        [
            f"{cfg['model']} + {cfg['method']} (eps {cfg['eps']:g}) on {data['train_images']} / "
            f"{data['test_images']} CIFAR-10 train / test images, device {results['device']}",
            f"accuracy     dense {acc['dense']:.2%}   compressed {acc['compressed']:.2%}   "
            f"fine-tuned {acc['finetuned']:.2%} ({cfg['epochs']} epochs)",
            f"params       {red['params_dense']:,} -> {red['params']:,} "
            f"(x{red['params_reduction']:.2f}); block convs {red['block_params_dense']:,} -> "
            f"{red['block_params']:,} (x{red['block_params_reduction']:.2f})",
            f"FLOPs        {red['flops_dense'] / 1e6:.2f}M -> {red['flops'] / 1e6:.2f}M "
            f"(x{red['flops_reduction']:.2f}) at 32x32",
            f"layers       {red['layers'] - len(kept)} of {red['layers']} block convs "
            f"compressed, {len(kept)} kept dense",
            f"time         pretrain {sec['pretrain']:.1f}s, compress {sec['compress']:.1f}s, "
            f"fine-tune {sec['finetune']:.1f}s, total {sec['total']:.1f}s",
            f"wrote        {', '.join(results['files'].values())}",
        ]
    )


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the script with ``argv`` (default ``sys.argv[1:]``); the report goes to ``out``
    (default stdout) on the main process. Returns the exit code: 0 on success, 2 with a
    one-line message on ``err`` (default stderr) for bad arguments or missing files."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        try:
            args = parse_args(argv)
        except SystemExit as exc:  # --help and --version print and exit
            return int(exc.code or 0)
        started = tdist.init_from_env()
        main_rank = tdist.is_main_process()
        try:
            result = run(args)
        finally:
            if started:
                torch.distributed.destroy_process_group()
    except UsageError as exc:
        err.write(f"{PROG}: error: {exc}\n")
        return 2
    if main_rank:
        out.write(format_report(result.results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
