"""Parameter and FLOP reductions of a model compressed at several error bounds (eps).

:func:`reduction_table` compresses a model once per eps (by default only its block convs, see
:func:`tnconv.models.block_convs`) and measures, for the whole model and for the compressed convs,
the parameters and the FLOPs of one forward pass before and after. Every number is measured on
the models themselves. The result prints as a text table and writes CSV or Markdown.

Command line (one table per model)::

    python -m tnconv.experiments.reduction --model resnet20 vgg19_bn --method tt --eps 0.3 0.5

FLOPs are counted as ``torch.utils.flop_counter`` counts them: 2 per multiply-add of the
convolutions and matrix products actually executed (batch norm, activations and pooling are not
counted), at batch 1 and 32x32 input unless told otherwise.
"""

from __future__ import annotations

import csv
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..compress import LayerSelector, SaveCriterion, compress, dense_reasons, select_convs
from ..decompositions.base import Decomposition
from ..summary import summary

__all__ = [
    "CIFAR_INPUT",
    "ReductionRow",
    "ReductionTable",
    "measure",
    "model_flops",
    "reduction_table",
]

log = logging.getLogger(__name__)

CIFAR_INPUT: tuple[int, int, int, int] = (1, 3, 32, 32)


def model_flops(model: nn.Module, input_size: Sequence[int] = CIFAR_INPUT) -> int:
    """FLOPs of one forward pass of ``model`` on zeros of ``input_size`` (B, C, H, W), as
    ``torch.utils.flop_counter`` counts them. The model's train / eval mode is restored."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(tuple(input_size), device=device, dtype=dtype))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def _ratio(before: int, after: int) -> float:
    return before / after if after else float("nan")


@dataclass(frozen=True)
class ReductionRow:
    """What compression at one eps did to a model.

    ``params*`` count every parameter of the model (kernels, BN, classifier); ``block_params*``
    only the kernels of the layers selected for compression (dense kernels, or the factors that
    replaced them). ``flops*`` are the whole model's forward FLOPs and ``block_flops*`` those of
    the selected layers, at the table's input size. ``kept_dense`` of the ``layers`` selected
    were left dense by ``compress`` because factorizing them would not have saved anything.
    """

    eps: float
    params_dense: int
    params: int
    block_params_dense: int
    block_params: int
    flops_dense: int
    flops: int
    block_flops_dense: int
    block_flops: int
    layers: int
    kept_dense: int
    seconds: float  # time spent compressing

    @property
    def params_reduction(self) -> float:
        return _ratio(self.params_dense, self.params)

    @property
    def block_params_reduction(self) -> float:
        return _ratio(self.block_params_dense, self.block_params)

    @property
    def flops_reduction(self) -> float:
        return _ratio(self.flops_dense, self.flops)

    @property
    def block_flops_reduction(self) -> float:
        return _ratio(self.block_flops_dense, self.block_flops)

    def to_dict(self) -> dict[str, Any]:
        """The fields plus the four reductions (dense / compressed)."""
        return {
            **asdict(self),
            "params_reduction": self.params_reduction,
            "block_params_reduction": self.block_params_reduction,
            "flops_reduction": self.flops_reduction,
            "block_flops_reduction": self.block_flops_reduction,
        }


def measure(
    dense: nn.Module,
    compressed: nn.Module,
    layers: Sequence[str],
    *,
    eps: float,
    input_size: Sequence[int] = CIFAR_INPUT,
    seconds: float = 0.0,
) -> ReductionRow:
    """Compare ``compressed`` with the ``dense`` model it was made from.

    ``layers`` are the names of the layers that were selected for compression (dense or
    factorized now); ``eps`` and ``seconds`` are recorded as given.
    """
    chosen = set(layers)
    before = {r.name: r for r in summary(dense, input_size).rows}
    after = {r.name: r for r in summary(compressed, input_size).rows}
    missing = sorted(chosen - set(before) | chosen - set(after))
    if missing:
        raise KeyError(f"layers not found as convolutions in both models: {missing[:4]}")
    reasons = dense_reasons(compressed)
    return ReductionRow(
        eps=eps,
        params_dense=sum(p.numel() for p in dense.parameters()),
        params=sum(p.numel() for p in compressed.parameters()),
        block_params_dense=sum(before[n].params for n in chosen),
        block_params=sum(after[n].params for n in chosen),
        flops_dense=model_flops(dense, input_size),
        flops=model_flops(compressed, input_size),
        block_flops_dense=sum(before[n].dense_flops for n in chosen),
        block_flops=sum(after[n].flops for n in chosen),
        layers=len(chosen),
        kept_dense=sum(1 for n in chosen if n in reasons),
        seconds=seconds,
    )


_HEADER = (
    "eps",
    "params",
    "params x",
    "block params",
    "block params x",
    "MFLOPs",
    "FLOPs x",
    "kept dense",
    "seconds",
)


@dataclass
class ReductionTable:
    """Rows of :class:`ReductionRow` for one model and method; ``str()`` is a text table."""

    model: str
    method: str
    input_size: tuple[int, ...]
    rows: list[ReductionRow] = field(default_factory=list)

    def cells(self, row: ReductionRow) -> list[str]:
        """One row as display strings, in the order of :meth:`header`."""
        return [
            f"{row.eps:g}",
            f"{row.params_dense:,} -> {row.params:,}",
            f"{row.params_reduction:.2f}",
            f"{row.block_params_dense:,} -> {row.block_params:,}",
            f"{row.block_params_reduction:.2f}",
            f"{row.flops_dense / 1e6:.2f} -> {row.flops / 1e6:.2f}",
            f"{row.flops_reduction:.2f}",
            f"{row.kept_dense}/{row.layers}",
            f"{row.seconds:.1f}",
        ]

    @staticmethod
    def header() -> list[str]:
        return list(_HEADER)

    def title(self) -> str:
        b, c, h, w = self.input_size
        return f"{self.model}, {self.method}, FLOPs at {c}x{h}x{w} (batch {b})"

    def __str__(self) -> str:
        table = [self.header(), *(self.cells(r) for r in self.rows)]
        widths = [max(len(line[k]) for line in table) for k in range(len(table[0]))]
        lines = [self.title()]
        for k, line in enumerate(table):
            lines.append(
                "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
            )
            if k == 0:
                lines.append("  ".join("-" * width for width in widths))
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """A GitHub Markdown table (params and FLOPs as dense -> compressed, reductions as x)."""
        lines = [
            "| " + " | ".join(self.header()) + " |",
            "|" + "---:|" * len(_HEADER),
        ]
        for row in self.rows:
            cells = [c.replace("->", "→") for c in self.cells(row)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_dicts(self) -> list[dict[str, Any]]:
        return [{"model": self.model, "method": self.method, **row.to_dict()} for row in self.rows]

    def to_csv(self, path: str | Path, append: bool = False) -> None:
        """Write the rows (model, method, every field and reduction) as CSV; ``append`` adds them
        to an existing file without repeating the header."""
        dicts = self.to_dicts()
        fields = list(dicts[0]) if dicts else ["model", "method"]
        path = Path(path)
        header = not (append and path.exists() and path.stat().st_size > 0)
        with open(path, "a" if append else "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            if header:
                writer.writeheader()
            writer.writerows(dicts)


def reduction_table(
    model: nn.Module,
    method: str | Decomposition,
    eps: Sequence[float],
    *,
    layers: LayerSelector = None,
    input_size: Sequence[int] = CIFAR_INPUT,
    must_save: SaveCriterion = "params",
    name: str | None = None,
    progress: bool | None = None,
    **options: Any,
) -> ReductionTable:
    """Compress ``model`` with ``method`` at every eps and measure each result.

    Args:
        model: the dense model (left untouched); use trained weights -- reductions at a given eps
            depend on the kernels' spectra, and freshly initialised kernels compress least.
        method: a registered decomposition name or instance.
        eps: relative error bounds, each in (0, 1); one row per value, in the order given.
        layers: what to compress (names or a predicate, as for ``tnconv.compress``); default
            :func:`tnconv.models.block_convs` of the model.
        input_size: (B, C, H, W) for the FLOP counts; CIFAR's (1, 3, 32, 32) by default.
        must_save: passed to ``compress`` (which layers are worth replacing).
        name: the model's name in the table (default: its class name).
        progress: passed to ``compress``.
        **options: method options, passed to ``compress``.
    """
    if layers is None:
        from ..models import block_convs

        layers = block_convs(model)
    names = [n for n, _ in select_convs(model, layers)]
    if not names:
        raise ValueError("no convolution selected for compression")
    method_name = method.name if isinstance(method, Decomposition) else str(method)
    table = ReductionTable(name or type(model).__name__, method_name, tuple(input_size))
    for value in eps:
        start = time.perf_counter()
        compressed = compress(
            model,
            method,
            eps=value,
            layers=names,
            input_size=input_size,
            must_save=must_save,
            progress=progress,
            **options,
        )
        seconds = time.perf_counter() - start
        row = measure(model, compressed, names, eps=value, input_size=input_size, seconds=seconds)
        log.info(
            "%s eps %g: params x%.2f, FLOPs x%.2f",
            method_name,
            value,
            row.params_reduction,
            row.flops_reduction,
        )
        table.rows.append(row)
    return table


def format_reduction(table: ReductionTable, seconds: float, markdown: bool = False) -> str:
    """The report of one model's table: the table (plain or Markdown) and the time it took."""
    body = f"**{table.title()}**\n\n{table.to_markdown()}" if markdown else str(table)
    return f"{body}\n\n({table.model}: {seconds:.1f} s)\n\n"


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """The command: reduction tables for models of :mod:`tnconv.models`, written to ``out``
    (default stdout; usage errors to ``err``, default stderr); returns the exit code."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    from ..models import MODELS, create
    from ._common import Parser, UsageError, eps_value, load_dense_checkpoint, require_method

    parser = Parser(
        prog="python -m tnconv.experiments.reduction",
        description="Parameter and FLOP reductions of the block convs compressed at each eps.",
    )
    parser.add_argument("--model", nargs="+", default=["resnet20"], choices=sorted(MODELS))
    parser.add_argument(
        "--method", default="rsdtr", help="registered decomposition (default rsdtr, the paper's)"
    )
    parser.add_argument("--eps", nargs="+", type=eps_value, default=[0.3, 0.5])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="dense state dict to compress (one model only); default: freshly initialised",
    )
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--csv", type=Path, help="write every row to this CSV file")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help
            return int(exc.code or 0)
        require_method(args.method)
        if args.checkpoint is not None and len(args.model) > 1:
            raise UsageError("--checkpoint needs exactly one --model")
        if args.threads is not None:
            if args.threads < 1:
                raise UsageError(f"--threads must be >= 1; got {args.threads}")
            torch.set_num_threads(args.threads)
        if args.csv is not None and not args.csv.parent.is_dir():
            raise UsageError(f"folder {args.csv.parent} for --csv does not exist")
        for k, model_name in enumerate(args.model):
            torch.manual_seed(args.seed)
            model = create(model_name)
            if args.checkpoint is not None:
                load_dense_checkpoint(model, args.checkpoint)
            start = time.perf_counter()
            table = reduction_table(model, args.method, args.eps, name=model_name)
            took = time.perf_counter() - start
            out.write(format_reduction(table, took, args.markdown))
            if args.csv is not None:
                table.to_csv(args.csv, append=k > 0)
    except UsageError as exc:
        err.write(f"{parser.prog}: error: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
