"""Semi-tensor decompositions against their classical twins (docs/stp.md).

a. Error against parameters on trained kernels (tests/data, ../shared/data when present, and the
   3x3 convs of the digits CNN trained in part b): stt vs tt, str vs tr, sttucker vs tucker, at
   t in {1, 2, 4}: mean relative error at a share of the dense parameters (``ratio=``) and mean
   compression at an error bound (``eps=``).
b. On the demo's digits CNN (tnconv.demo.DigitsNet), the largest compression factor of the 3x3
   convs (all but the stem) that each method reaches within 2 accuracy points of the dense
   network, (i) compressing the trained CNN and fine-tuning one epoch (the demo's recipe) and
   (ii) training the factorized network (same ranks, ``FactorizedConv2d.from_scratch``) from
   scratch for as many epochs as the dense one. Compression levels are global parameter budgets
   (``compress(budget=...)``); a track stops at its first level outside the band.

Single thread by default. Prints Markdown tables (the ones in docs/stp.md) and writes a JSON.

    python benchmarks/stp_study.py                 # both parts, sklearn digits
    python benchmarks/stp_study.py --part a
    python benchmarks/stp_study.py --part a --ts 2,4 --orders inner,outer
    python benchmarks/stp_study.py --part b --methods stt,tt --shares 0.3,0.1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import tnconv
from tnconv.datasets import digits
from tnconv.demo import DemoConfig, DigitsNet, compressible
from tnconv.errors import StructureError
from tnconv.training import evaluate, fit

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [("tt", "stt"), ("tr", "str"), ("tucker", "sttucker")]
# the paper's figures at 2% accuracy loss (abstract of arXiv 2109.15200)
PAPER = {"tt": "3x (TT-RN, rank 14)", "stt": "9x (STT-RN, rank 14)",
         "tr": "99x (TR-WRN, rank 16)", "str": "179x (STR-WRN, rank 16)"}  # fmt: skip


def configs(ts: list[int]) -> list[tuple[str, int | None]]:
    """(method, t) pairs: each classical twin, then its semi-tensor version at every t."""
    out: list[tuple[str, int | None]] = []
    for classical, semi in PAIRS:
        out.append((classical, None))
        out += [(semi, t) for t in ts]
    return out


def label(method: str, t: int | None) -> str:
    return method if t is None else f"{method} t={t}"


def options(t: int | None) -> dict[str, Any]:
    return {} if t is None else {"t": t}


# -- part a -------------------------------------------------------------------------------------
def trained_kernels(data_dir: Path | None, extra: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Kernels with a spatial extent and more than 3 input channels, channels divisible by 4."""
    found: dict[str, np.ndarray] = {}
    sources = [ROOT / "tests" / "data" / "real_kernels.npz"]
    if data_dir is not None and data_dir.is_dir():
        sources += sorted(data_dir.glob("*.npz"))
    for path in sources:
        with np.load(path) as z:
            for k in z.files:
                found.setdefault(f"{path.stem}:{k}".replace("real_kernels:", ""), z[k])
    found.update(extra)
    keep = {}
    seen: set[bytes] = set()
    for name, w in found.items():
        t, s, kh, kw = w.shape
        digest = np.ascontiguousarray(w, dtype=np.float32).tobytes()
        if kh * kw > 1 and s > 3 and t % 4 == 0 and s % 4 == 0 and digest not in seen:
            seen.add(digest)  # tests/data copies some shared kernels
            keep[name] = w
    return keep


def part_a(
    kernels: dict[str, np.ndarray],
    ts: list[int],
    ratios: list[float],
    epss: list[float],
    orders: list[str] | None = None,
) -> list[dict[str, Any]]:
    """``orders``: for the semi-tensor methods at t > 1, fit with each of these places of the
    identity's index (``identity=``); None: the method's default only."""
    rows = []
    runs: list[tuple[str, int | None, str | None]] = []
    for method, t in configs(ts):
        places = orders if orders and t is not None and t > 1 else [None]
        runs += [(method, t, place) for place in places]
    for method, t, place in runs:
        dec = tnconv.get(method)
        opts = options(t) | ({"identity": place} if place else {})
        errs: dict[float, list[float]] = {r: [] for r in ratios}
        comps: dict[float, list[float]] = {e: [] for e in epss}
        started = time.perf_counter()
        for w_np in kernels.values():
            w = torch.tensor(w_np, dtype=torch.float64)
            for r in ratios:
                errs[r].append(dec.factorize(w, ratio=r, **opts).relative_error(w))
            for e in epss:
                comps[e].append(dec.factorize(w, eps=e, **opts).compression)
        name = label(method, t) + (f" {place}" if place else "")
        row = {"method": name, "kernels": len(kernels)}
        row |= {f"err@ratio={r}": float(np.mean(v)) for r, v in errs.items()}
        # geometric mean: compression factors multiply
        row |= {f"x@eps={e}": float(np.exp(np.mean(np.log(v)))) for e, v in comps.items()}
        row["seconds"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(row, flush=True)
    return rows


# -- part b -------------------------------------------------------------------------------------
def conv_params(model: nn.Module) -> int:
    """Parameters of the compressible 3x3 convs' kernels (factorized or dense)."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, tnconv.FactorizedConv2d):
            total += m.num_params
        elif compressible(name, m):
            total += m.weight.numel()
    return total


def scratch_twin(small: nn.Module, method: str, t: int | None, width: int, seed: int) -> nn.Module:
    """A freshly initialised DigitsNet whose factorized convs have ``small``'s ranks."""
    torch.manual_seed(seed)
    fresh = DigitsNet(width=width)
    gen = torch.Generator().manual_seed(seed)
    for name, m in small.named_modules():
        if isinstance(m, tnconv.FactorizedConv2d):
            layer = tnconv.FactorizedConv2d.from_scratch(
                method,
                m.in_channels,
                m.out_channels,
                m.kernel_size,
                m.ranks,
                stride=m.stride,
                padding=m.padding,
                dilation=m.dilation,
                bias=m.bias is not None,
                generator=gen,
                **options(t),
            )
            parent, _, leaf = name.rpartition(".")
            setattr(fresh.get_submodule(parent) if parent else fresh, leaf, layer)
    return fresh


def part_b(args: argparse.Namespace, ts: list[int]) -> dict[str, Any]:
    cfg = DemoConfig()
    torch.manual_seed(args.seed)
    train, test = digits(args.source, seed=args.seed)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=gen)
    tune_loader = DataLoader(
        train, batch_size=cfg.fine_tune_batch_size, shuffle=True, generator=gen
    )
    test_loader = DataLoader(test, batch_size=256)
    started = time.perf_counter()
    dense = DigitsNet(width=args.width)
    fit(dense, loader, args.epochs, lr=cfg.lr)
    dense_acc = evaluate(dense, test_loader)
    dense_params = conv_params(dense)
    print(f"dense: accuracy {dense_acc:.4f}, 3x3 conv params {dense_params}, "
          f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    kernels = {
        f"digits:{n}": m.weight.detach().numpy().copy()
        for n, m in dense.named_modules()
        if compressible(n, m)
    }
    levels: list[dict[str, Any]] = []
    best: dict[str, dict[str, float]] = {}
    methods = set(args.methods.split(",")) if args.methods else None
    for method, t in configs(ts):
        if methods is not None and method not in methods:
            continue
        name = label(method, t)
        alive = {"finetune": True, "scratch": True}
        best[name] = {"finetune": 1.0, "scratch": 1.0}
        for share in args.shares:
            if not any(alive.values()):
                break
            tick = time.perf_counter()
            small = tnconv.compress(dense, method, budget=share, layers=compressible, **options(t))
            factor = dense_params / conv_params(small)
            row: dict[str, Any] = {"method": name, "budget": share, "factor": factor}
            if alive["finetune"]:
                row["compressed"] = evaluate(small, test_loader)
                fit(small, tune_loader, cfg.fine_tune_epochs, lr=0.005)  # SGD + OneCycle
                row["finetune"] = evaluate(small, test_loader)
            if alive["scratch"]:
                try:
                    net = scratch_twin(small, method, t, args.width, args.seed + 1)
                except StructureError as exc:  # cannot happen for compress's own ranks
                    raise RuntimeError(exc) from exc
                fit(net, loader, args.epochs, lr=cfg.lr)
                row["scratch"] = evaluate(net, test_loader)
            for track in ("finetune", "scratch"):
                if track in row:
                    if row[track] >= dense_acc - 0.02:
                        best[name][track] = max(best[name][track], factor)
                    else:
                        alive[track] = False
            row["seconds"] = round(time.perf_counter() - tick, 1)
            levels.append(row)
            print(row, flush=True)
    return {
        "dense_accuracy": dense_acc,
        "dense_conv_params": dense_params,
        "levels": levels,
        "best": best,
        "kernels": kernels,
    }


# -- output -------------------------------------------------------------------------------------
def markdown(rows: list[dict[str, Any]], columns: list[str], fmt: dict[str, str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    lines = []
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(format(v, fmt.get(c, "")) if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["a", "b", "all"], default="all")
    parser.add_argument("--ts", default="1,2,4", help="semi-tensor factors t (part a)")
    parser.add_argument("--ts-b", default="2,4", help="semi-tensor factors t (part b)")
    parser.add_argument("--ratios", default="0.05,0.1,0.25")
    parser.add_argument("--eps", default="0.3,0.5")
    parser.add_argument("--source", default="sklearn", choices=["sklearn", "mnist"])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=6, help="dense (and from-scratch) epochs")
    parser.add_argument("--shares", default="0.25,0.12,0.06,0.03,0.015,0.008")
    parser.add_argument("--methods", default="", help="comma list (part b); default all")
    parser.add_argument(
        "--orders",
        default="",
        help="part a: fit the semi-tensor methods at t > 1 with each of these identity places "
        "(e.g. inner,outer); default: each method's own",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--json", type=Path, default=Path("stp_study.json"))
    args = parser.parse_args()
    args.shares = [float(s) for s in args.shares.split(",")]
    torch.set_num_threads(args.threads)
    if not args.data_dir.is_dir() and (ROOT.parents[1] / "shared" / "data").is_dir():
        args.data_dir = ROOT.parents[1] / "shared" / "data"  # a worktree one level deeper
    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    extra: dict[str, np.ndarray] = {}
    if args.part in ("b", "all"):
        b = part_b(args, [int(t) for t in args.ts_b.split(",")])
        extra = b.pop("kernels")
        out["b"] = b
    if args.part in ("a", "all"):
        kernels = trained_kernels(args.data_dir, extra)
        print("kernels:", {k: tuple(v.shape) for k, v in kernels.items()}, flush=True)
        ratios = [float(r) for r in args.ratios.split(",")]
        epss = [float(e) for e in args.eps.split(",")]
        orders = args.orders.split(",") if args.orders else None
        rows = part_a(kernels, [int(t) for t in args.ts.split(",")], ratios, epss, orders)
        out["a"] = {"kernels": {k: list(v.shape) for k, v in kernels.items()}, "rows": rows}
        cols = ["method", "kernels", *[f"err@ratio={r}" for r in ratios]]
        cols += [f"x@eps={e}" for e in epss]
        fmt = {c: ".3f" for c in cols if c.startswith("err")} | {
            c: ".2f" for c in cols if c.startswith("x@")
        }
        print("\n### a. error against parameters (trained kernels)\n")
        print(markdown(rows, cols, fmt))
    if "b" in out:
        b = out["b"]
        print(f"\n### b. digits CNN: dense accuracy {b['dense_accuracy']:.4f}, "
              f"3x3 conv params {b['dense_conv_params']}\n")  # fmt: skip
        level_fmt = {"factor": ".1f", "compressed": ".3f", "finetune": ".3f", "scratch": ".3f"}
        level_cols = ["method", "budget", "factor", "compressed", "finetune", "scratch"]
        print(markdown(b["levels"], level_cols, level_fmt))
        best_rows = [
            {
                "method": name,
                "finetune": v["finetune"],
                "scratch": v["scratch"],
                "paper": PAPER.get(name.split()[0], "")
                if " t=2" in name or " " not in name
                else "",
            }
            for name, v in b["best"].items()
        ]
        print("\nLargest compression factor of the 3x3 convs within 2 points of dense:\n")
        print(markdown(best_rows, ["method", "finetune", "scratch", "paper"],
                       {"finetune": ".1f", "scratch": ".1f"}))  # fmt: skip
    args.json.write_text(json.dumps(out, indent=1, default=str))
    seconds = sum(r.get("seconds", 0) for r in out.get("a", {}).get("rows", []))
    seconds += sum(r.get("seconds", 0) for r in out.get("b", {}).get("levels", []))
    print(f"\nwrote {args.json}; {seconds:.0f} s in the timed loops")


if __name__ == "__main__":
    main()
