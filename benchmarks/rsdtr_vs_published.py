"""tnconv's RSDTR search against the published one, on real trained kernels.

For every conv kernel with more than one input channel in ``../shared/data/*.npz`` (falling back
to ``tests/data/real_kernels.npz``), at each eps, it runs

* **published**: ``published_rsdtr.py``, an independent re-implementation of the paper's search
  (TRcheckall: 4 shifts x every divisor of the first rank, eps/sqrt(3) per SVD against the current
  remainder, fewest parameters), and
* **ours**: ``tnconv.get("rsdtr").factorize(w, eps=eps)`` with default options (and, as
  ``fast``, with only the first phase of the SVD search and no refinement; and with
  ``objective="flops"`` for the FLOPs it reaches),

and reports per layer and in total: parameters, relative error, FLOPs of the paper's four-sublayer
pipeline at ``--size`` (batch 1, stride 1, padding k // 2), the FLOPs ``FactorizedConv2d``
executes for the same input (``torch.utils.flop_counter``), and the wall time of each search. It
also checks that tnconv's ``search="published"`` reproduces the re-implementation's ranks.

Kernels are grouped: spatial kernels (kh > 1) and pointwise (1x1) ones; depthwise kernels
(in = 1, grouped convolutions) are skipped, tnconv keeps them dense. Kernels are factorized in
float64. Both searches run in the same process, alternately per layer, with ``--threads``
intra-op threads (default 1: both are sequences of small LAPACK calls).

Run:  python benchmarks/rsdtr_vs_published.py [--eps 0.3 0.5] [--size 32] [--no-1x1]
          [--thorough] [--csv out.csv]
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import tnconv
from tnconv.decompositions.rsdtr import EQUATION, pipeline_flops

sys.path.insert(0, str(Path(__file__).parent))
from published_rsdtr import published_rsdtr, ring_dense

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FALLBACK = ROOT / "tests" / "data" / "real_kernels.npz"
FAST = {"refine": False, "search_max_gflop": 0.0}  # the SVD search's first phase only
THOROUGH = {"refine_seeds": 16, "als_max_gflop": 20.0}


@dataclass
class Row:
    group: str
    layer: str
    shape: str
    eps: float
    dense: int
    pub_params: int
    pub_ranks: str
    pub_error: float
    pub_flops: int
    pub_executed: int
    pub_ms: float
    ours_params: int
    ours_ranks: str
    ours_error: float
    ours_flops: int
    ours_executed: int
    ours_ms: float
    ratio: float
    published_mode_agrees: bool
    published_mode_ms: float
    fast_params: int
    fast_ms: float
    lean_params: int
    lean_flops: int
    lean_error: float
    thorough_params: int = 0
    thorough_ms: float = math.nan


def load_kernels() -> tuple[str, dict[str, np.ndarray]]:
    """Every kernel with more than one input channel, keyed ``file/layer``."""
    files = sorted(SHARED.glob("*.npz")) if SHARED.is_dir() else []
    source = str(SHARED) if files else str(FALLBACK)
    kernels = {}
    for path in files or [FALLBACK]:
        with np.load(path) as z:
            for key in z.files:
                w = z[key]
                if w.ndim == 4 and w.shape[1] > 1:
                    kernels[f"{path.stem}/{key}"] = w
    return source, kernels


def executed_flops(f: tnconv.Factorization, size: int) -> int:
    kh, kw = f.shape[2:]
    layer = tnconv.FactorizedConv2d(f, padding=(kh // 2, kw // 2))
    x = torch.zeros(1, f.shape[1], size, size, dtype=f.factors[0].dtype)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(x)
    return counter.get_total_flops()


def relative_error(w: torch.Tensor, dense: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(w - dense) / torch.linalg.vector_norm(w))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - start) * 1e3


def run_layer(name: str, w_np: np.ndarray, eps: float, size: int, thorough: bool) -> Row:
    w = torch.tensor(w_np, dtype=torch.float64)
    shape = tuple(w.shape)
    dec = tnconv.get("rsdtr")
    pub, pub_ms = timed(published_rsdtr, w, eps)
    ours, ours_ms = timed(dec.factorize, w, eps=eps, input_size=(size, size))
    mode, mode_ms = timed(dec.factorize, w, eps=eps, search="published")
    fast, fast_ms = timed(dec.factorize, w, eps=eps, **FAST)
    lean = dec.factorize(w, eps=eps, objective="flops", input_size=(size, size))
    pub_f = tnconv.Factorization(pub.cores, EQUATION, shape, pub.ranks, method="published")
    row = Row(
        group="kxk" if shape[2] * shape[3] > 1 else "1x1",
        layer=name,
        shape="x".join(map(str, shape)),
        eps=eps,
        dense=math.prod(shape),
        pub_params=pub.params,
        pub_ranks=str(pub.ranks),
        pub_error=relative_error(w, ring_dense(pub.cores)),
        pub_flops=pipeline_flops(shape, pub.ranks, (size, size)),
        pub_executed=executed_flops(pub_f, size),
        pub_ms=pub_ms,
        ours_params=ours.num_params,
        ours_ranks=str(ours.ranks),
        ours_error=ours.relative_error(w),
        ours_flops=pipeline_flops(shape, ours.ranks, (size, size)),
        ours_executed=executed_flops(ours, size),
        ours_ms=ours_ms,
        ratio=ours.num_params / pub.params,
        published_mode_agrees=mode.ranks == pub.ranks and mode.num_params == pub.params,
        published_mode_ms=mode_ms,
        fast_params=fast.num_params,
        fast_ms=fast_ms,
        lean_params=lean.num_params,
        lean_flops=pipeline_flops(shape, lean.ranks, (size, size)),
        lean_error=lean.relative_error(w),
    )
    if thorough:
        deep, row.thorough_ms = timed(dec.factorize, w, eps=eps, **THOROUGH)
        row.thorough_params = deep.num_params
    return row


def print_table(rows: list[Row], thorough: bool) -> None:
    head = (
        f"{'layer':44s} {'shape':>12s} {'eps':>4s} {'dense':>7s} | {'published':>9s} {'err':>5s} "
        f"{'MFLOP':>7s} {'ms':>6s} | {'ours':>7s} {'err':>5s} {'MFLOP':>7s} {'ms':>6s} | "
        f"{'ratio':>5s} | {'fast':>7s} {'ms':>5s}"
    )
    if thorough:
        head += f" | {'thorough':>8s} {'ms':>6s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        line = (
            f"{r.layer[-44:]:44s} {r.shape:>12s} {r.eps:4.2f} {r.dense:7d} | {r.pub_params:9d} "
            f"{r.pub_error:5.3f} {r.pub_flops / 1e6:7.2f} {r.pub_ms:6.0f} | {r.ours_params:7d} "
            f"{r.ours_error:5.3f} {r.ours_flops / 1e6:7.2f} {r.ours_ms:6.0f} | {r.ratio:5.3f} | "
            f"{r.fast_params:7d} {r.fast_ms:5.0f}"
        )
        if thorough:
            line += f" | {r.thorough_params:8d} {r.thorough_ms:6.0f}"
        print(line)


def summarize(rows: list[Row], thorough: bool) -> list[str]:
    lines = []
    for group in ("kxk", "1x1"):
        for eps in sorted({r.eps for r in rows}):
            sel = [r for r in rows if r.group == group and r.eps == eps]
            if not sel:
                continue

            def total(attr: str, sel: list[Row] = sel) -> float:
                return sum(getattr(r, attr) for r in sel)

            worse = sum(r.ours_params > r.pub_params for r in sel)
            line = (
                f"{group} eps={eps}: {len(sel)} layers, dense {total('dense'):.0f} | params "
                f"published {total('pub_params'):.0f} ours {total('ours_params'):.0f} "
                f"(x{total('ours_params') / total('pub_params'):.3f}; max per layer "
                f"x{max(r.ratio for r in sel):.3f}; layers with more: {worse}) | pipeline "
                f"MFLOP published {total('pub_flops') / 1e6:.1f} ours "
                f"{total('ours_flops') / 1e6:.1f} | executed MFLOP published "
                f"{total('pub_executed') / 1e6:.1f} ours {total('ours_executed') / 1e6:.1f} | "
                f"max error published {max(r.pub_error for r in sel):.4f} ours "
                f"{max(r.ours_error for r in sel):.4f} | time published "
                f"{total('pub_ms') / 1e3:.2f}s ours {total('ours_ms') / 1e3:.2f}s | "
                f"search='published' agrees on {sum(r.published_mode_agrees for r in sel)}/"
                f"{len(sel)} in {total('published_mode_ms') / 1e3:.2f}s | fast {FAST}: "
                f"{total('fast_params'):.0f} (x{total('fast_params') / total('pub_params'):.3f}, "
                f"max x{max(r.fast_params / r.pub_params for r in sel):.3f}) in "
                f"{total('fast_ms') / 1e3:.2f}s | objective='flops': pipeline MFLOP "
                f"{total('lean_flops') / 1e6:.1f}, params {total('lean_params'):.0f}, max error "
                f"{max(r.lean_error for r in sel):.4f}"
            )
            if thorough:
                line += (
                    f" | thorough {total('thorough_params'):.0f} "
                    f"(x{total('thorough_params') / total('pub_params'):.3f}, "
                    f"{total('thorough_ms') / 1e3:.1f}s)"
                )
            lines.append(line)
    return lines


def markdown(rows: list[Row]) -> list[str]:
    """The three tables of docs/rsdtr.md: totals, search times, spatial kernels one by one."""
    thorough = all(r.thorough_params for r in rows)
    out = [
        "| kernels | eps | dense | published | ours | ours / published (max per layer) "
        '| layers with more | fast | thorough | objective="flops" (MFLOP ours -> flops) |',
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = [(g, e) for g in ("kxk", "1x1") for e in sorted({r.eps for r in rows})]
    for group, eps in groups:
        sel = [r for r in rows if r.group == group and r.eps == eps]
        if not sel:
            continue
        pub = sum(r.pub_params for r in sel)
        ours = sum(r.ours_params for r in sel)
        deep = f"{sum(r.thorough_params for r in sel)}" if thorough else "-"
        out.append(
            f"| {len(sel)} {group} | {eps} | {sum(r.dense for r in sel)} | {pub} | {ours} | "
            f"{ours / pub:.3f} ({max(r.ratio for r in sel):.3f}) | "
            f"{sum(r.ours_params > r.pub_params for r in sel)} | "
            f"{sum(r.fast_params for r in sel)} | {deep} | "
            f"{sum(r.ours_flops for r in sel) / 1e6:.1f} -> "
            f"{sum(r.lean_flops for r in sel) / 1e6:.1f} |"
        )
    out += [
        "",
        '| kernels | eps | published | ours | search="published" (agrees) | fast | thorough |',
        "|---|---|---|---|---|---|---|",
    ]
    for group, eps in groups:
        sel = [r for r in rows if r.group == group and r.eps == eps]
        if not sel:
            continue

        def secs(attr: str, sel: list[Row] = sel) -> str:
            return f"{sum(getattr(r, attr) for r in sel) / 1e3:.2f} s"

        out.append(
            f"| {len(sel)} {group} | {eps} | {secs('pub_ms')} | {secs('ours_ms')} | "
            f"{secs('published_mode_ms')} ({sum(r.published_mode_agrees for r in sel)}/{len(sel)})"
            f" | {secs('fast_ms')} | {secs('thorough_ms') if thorough else '-'} |"
        )
    out += [
        "",
        "| layer | shape | eps | dense | published (ranks) | error | ours (ranks) | error "
        "| ours / published | pipeline MFLOP published / ours | executed MFLOP ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.group == "kxk":
            out.append(
                f"| {r.layer} | {r.shape} | {r.eps} | {r.dense} | {r.pub_params} {r.pub_ranks} | "
                f"{r.pub_error:.3f} | {r.ours_params} {r.ours_ranks} | {r.ours_error:.3f} | "
                f"{r.ratio:.3f} | {r.pub_flops / 1e6:.1f} / {r.ours_flops / 1e6:.1f} | "
                f"{r.ours_executed / 1e6:.1f} |"
            )
    return out


def read_csv(path: Path) -> list[Row]:
    """Rows written by ``--csv`` (to redo the tables without rerunning the searches)."""
    types = {f.name: f.type for f in fields(Row)}
    convert = {"int": int, "float": float, "str": str, "bool": lambda v: v == "True"}
    with path.open(newline="") as fh:
        return [
            Row(**{k: convert[types[k]](v) for k, v in rec.items()}) for rec in csv.DictReader(fh)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eps", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--size", type=int, default=32, help="input H = W for the FLOPs")
    parser.add_argument("--no-1x1", action="store_true", help="skip the pointwise kernels")
    parser.add_argument("--thorough", action="store_true", help=f"also run ours with {THOROUGH}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--csv", type=Path, help="write every row to this CSV file")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    parser.add_argument("--from-csv", type=Path, help="tables from an earlier --csv, no search")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.from_csv:
        print("\n".join(markdown(read_csv(args.from_csv))))
        return

    source, kernels = load_kernels()
    if args.no_1x1:
        kernels = {k: v for k, v in kernels.items() if v.shape[2] * v.shape[3] > 1}
    print(
        f"kernels: {len(kernels)} from {source} (in > 1; depthwise skipped); eps {args.eps}; "
        f"FLOPs at {args.size}x{args.size}, batch 1; torch threads {torch.get_num_threads()}"
    )
    rows = []
    for eps in args.eps:
        # spatial kernels first, then the pointwise ones
        for name, w in sorted(kernels.items(), key=lambda kv: (kv[1].shape[2] == 1, kv[0])):
            rows.append(run_layer(name, w, eps, args.size, args.thorough))
    print_table(rows, args.thorough)
    print()
    for line in summarize(rows, args.thorough):
        print(line)
    if args.csv:
        with args.csv.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
        print(f"wrote {args.csv}")
    if args.markdown:
        print("\n".join(markdown(rows)))


if __name__ == "__main__":
    main()
