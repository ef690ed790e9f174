"""Stability of CP and TC, unstabilised against stabilised, on trained kernels and on digits.

Part 1 (kernels): every spatial conv kernel with more than 3 input and output channels in
``../shared/data/*.npz`` (fallback ``tests/data/real_kernels.npz``), at one parameter budget
(``--ratio`` of the dense kernel): for ``cp`` (largest rank within the budget; ALS, then
``stabilize=True``) and ``tc`` (largest uniform rank; TR-SVD + ALS, then the default
stabilisation) the relative error, the sensitivity (``Factorization.sensitivity()``) and the
largest component's norm over the kernel's norm (CP: a rank-one term; TC: a Tucker-2 block of the
shared-core BTD). ``cp`` also gets a row with only the sensitivity-minimising rescaling of its
terms (no refit), to separate what the scaling alone buys. Tucker-2 and ``tc`` / ``cp`` at the
same budget (``ratio=``) give the compactness comparison.

Part 2 (digits): the demo's ``DigitsNet`` trained on scikit-learn's 8x8 digits (ships with
scikit-learn; the demo's MNIST run is slower), its 3x3 convolutions (but the stem) compressed to
``--digits-ratio`` each by cp, cp stabilised, tc unstabilised, tc stabilised and Tucker-2; accuracy
before and after one epoch of the demo's fine-tuning (OneCycle, peak ``--lr``, batch 32, over
``--tune-seeds`` batch orders); then ``--seeds``
fine-tuning runs per method at each deliberately high constant learning rate ``--high-lr`` (plain
SGD with momentum, batch 32, one epoch, the seed shuffles the batches) counting divergences: a NaN
loss, or a mean loss over the last 20 steps above the loss of the first step.

Run:  python benchmarks/stability.py [--ratio 0.1] [--digits-ratio 0.25] [--seeds 5]
          [--tune-seeds 3] [--high-lr 0.02 0.05] [--threads 1] [--skip-kernels] [--skip-digits]
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import tnconv
from tnconv.datasets import digits
from tnconv.decompositions.cp import min_sensitivity_scaling
from tnconv.demo import DigitsNet, compressible
from tnconv.training import evaluate, fit

ROOT = Path(__file__).resolve().parents[1]
SHARED = [ROOT.parent / "shared" / "data", ROOT.parents[1] / "shared" / "data"]
FALLBACK = ROOT / "tests" / "data" / "real_kernels.npz"
CP_FAST = {"n_init": 1, "max_iter": 200}


def load_kernels() -> tuple[dict[str, np.ndarray], str]:
    for folder in SHARED:
        files = sorted(folder.glob("*.npz")) if folder.is_dir() else []
        if files:
            out = {}
            for path in files:
                with np.load(path) as z:
                    out.update({f"{path.stem}/{k}": z[k] for k in z.files})
            return out, str(folder)
    with np.load(FALLBACK) as z:
        return {k: z[k] for k in z.files}, str(FALLBACK)


def max_component(f: tnconv.Factorization) -> float:
    """Largest component norm / kernel norm (CP: rank-one terms; TC: shared-core BTD blocks)."""
    norm = float(torch.linalg.vector_norm(f.to_tensor()))
    if f.method == "cp":
        comps = math.prod(torch.linalg.vector_norm(a, dim=0) for a in f.factors)
        return float(comps.max()) / norm
    a, g, b = f.factors
    blocks = [torch.einsum("bhwc,tb,sc->tshw", g, a[k], b[:, :, k].T) for k in range(a.shape[0])]
    return max(float(torch.linalg.vector_norm(x)) for x in blocks) / norm


def kernel_part(ratio: float) -> None:
    kernels, source = load_kernels()
    chosen = {
        k: v
        for k, v in kernels.items()
        if v.ndim == 4 and v.shape[0] > 3 and v.shape[1] > 3 and v.shape[2] > 1
    }
    print(f"## Trained kernels ({len(chosen)} from {source}), budget {ratio} of dense\n")
    print("| kernel | shape | method | params | rel. error | sensitivity | max comp. / ‖W‖ |")
    print("|---|---|---|---:|---:|---:|---:|")
    ratios: dict[str, list[tuple[float, float]]] = {"cp": [], "tc": []}
    scale_only: list[float] = []
    compact: list[tuple[float, float, float]] = []
    times: dict[str, float] = {}
    for name, arr in sorted(chosen.items()):
        w = torch.tensor(arr, dtype=torch.float64)
        shape = tuple(w.shape)
        budget = int(ratio * w.numel())
        cp, tc = tnconv.get("cp"), tnconv.get("tc")
        r_cp = max(1, budget // sum(shape))
        r_tc = max(
            r
            for r in range(1, 64)
            if tc.num_params_at(shape, tc.bond_ranks(r, shape)) <= budget or r == 1
        )
        runs: list[tuple[str, tnconv.Factorization]] = []
        for label, method, rank, opts in (
            ("cp ALS", cp, r_cp, dict(CP_FAST)),
            ("cp stabilised", cp, r_cp, {**CP_FAST, "stabilize": True}),
            ("tc unstabilised", tc, r_tc, {"stabilize": False}),
            ("tc stabilised", tc, r_tc, {}),
        ):
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                f = method.factorize(w, rank, **opts)
            times[label] = times.get(label, 0.0) + time.perf_counter() - start
            runs.append((label, f))
            if label == "cp ALS":
                runs.append(
                    (
                        "cp ALS + rescaling",
                        f.with_factors(min_sensitivity_scaling([x.clone() for x in f.factors])),
                    )
                )
        tucker = tnconv.get("tucker").factorize(
            w, ratio=max(runs[3][1].num_params / w.numel(), 1e-6)
        )
        runs.append(("tucker-2", tucker))
        res = {}
        for label, f in runs:
            err, ss = f.relative_error(w), f.sensitivity()
            res[label] = (err, ss)
            comp = max_component(f) if f.method in ("cp", "tc") else math.nan
            print(
                f"| {name} | {'x'.join(map(str, shape))} | {label} | {f.num_params} | {err:.4f} | "
                f"{ss:.3g} | {comp:.3g} |"
            )
        for m, plain, stab in (
            ("cp", "cp ALS", "cp stabilised"),
            ("tc", "tc unstabilised", "tc stabilised"),
        ):
            ratios[m].append((res[stab][0] / res[plain][0], res[plain][1] / res[stab][1]))
        scale_only.append(res["cp ALS"][1] / res["cp ALS + rescaling"][1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cp_at_tc = cp.factorize(w, max(1, runs[3][1].num_params // sum(shape)), **CP_FAST)
        compact.append((res["tc stabilised"][0], res["tucker-2"][0], cp_at_tc.relative_error(w)))
    print(
        "\n| method | error stabilised / unstabilised (median, max) "
        "| sensitivity drop (median, min) |"
    )
    print("|---|---:|---:|")
    for m, pairs in ratios.items():
        e = np.array([p[0] for p in pairs])
        s = np.array([p[1] for p in pairs])
        print(f"| {m} | {np.median(e):.3f}, {e.max():.3f} | {np.median(s):.1f}x, {s.min():.1f}x |")
    print(f"\ncp rescaling alone (no refit): sensitivity drop median {np.median(scale_only):.2f}x")
    c = np.array(compact)
    wins_t = int(np.sum(c[:, 0] < c[:, 1]))
    wins_c = int(np.sum(c[:, 0] < c[:, 2]))
    print(
        f"\nAt tc's parameter count: tc error lower than Tucker-2 on {wins_t}/{len(c)} kernels, "
        f"than cp on {wins_c}/{len(c)}; median errors tc {np.median(c[:, 0]):.4f}, "
        f"Tucker-2 {np.median(c[:, 1]):.4f}, cp {np.median(c[:, 2]):.4f}"
    )
    print(
        "\nFit seconds (all kernels): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()) + "\n"
    )


def high_lr_run(
    model: nn.Module, data: torch.utils.data.Dataset, lr: float, seed: int
) -> tuple[bool, float, float]:
    """One epoch of SGD (momentum 0.9) at a constant ``lr``; (diverged, first loss, last loss)."""
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=32, shuffle=True, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    losses = []
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
        loss.backward()
        opt.step()
    model.eval()
    tail = float(np.mean(losses[-20:]))
    diverged = not all(math.isfinite(v) for v in losses) or tail > losses[0]
    return diverged, losses[0], tail


def digits_part(
    ratio: float, seeds: int, lr: float, high_lrs: list[float], tune_seeds: int
) -> None:
    torch.manual_seed(0)
    train, test = digits("sklearn", seed=0)
    gen = torch.Generator().manual_seed(0)
    model = DigitsNet(width=32)
    fit(model, DataLoader(train, batch_size=64, shuffle=True, generator=gen), 12, lr=0.05)
    test_loader = DataLoader(test, batch_size=256)
    dense_acc = evaluate(model, test_loader)
    print(
        f"## Digits (scikit-learn 8x8, {len(train)} train / {len(test)} test), DigitsNet width 32, "
        f"dense accuracy {dense_acc:.4f}; 3x3 convs but the stem at ratio {ratio} each\n"
    )
    variants = {
        "cp (ALS)": ("cp", dict(CP_FAST)),
        "cp stabilised": ("cp", {**CP_FAST, "stabilize": True}),
        "tc unstabilised": ("tc", {"stabilize": False}),
        "tc stabilised": ("tc", {}),
        "tucker-2": ("tucker", {}),
    }
    lr_cols = " | ".join(f"diverged at lr {h}" for h in high_lrs)
    print(
        "| method | conv params | mean kernel error | sum sensitivity | acc. before "
        f"| acc. after 1 epoch, mean of {tune_seeds} seeds (min-max) | {lr_cols} |"
    )
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(high_lrs))

    def divergence(net: nn.Module) -> str:
        cells = []
        for high in high_lrs:
            runs = [high_lr_run(copy.deepcopy(net), train, high, s) for s in range(seeds)]
            growth = np.median([b / a if math.isfinite(b) else math.inf for _, a, b in runs])
            cells.append(f"{sum(d for d, _, _ in runs)}/{seeds} (x{growth:.2g})")
        return " | ".join(cells)

    dense_params = sum(m.weight.numel() for n, m in model.named_modules() if compressible(n, m))
    notes: list[str] = []
    print(f"| dense | {dense_params} | 0 | - | {dense_acc:.4f} | - | {divergence(model)} |")
    for label, (method, opts) in variants.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small = tnconv.compress(model, method, ratio=ratio, layers=compressible, **opts)
        layers = [m for m in small.modules() if isinstance(m, tnconv.FactorizedConv2d)]
        params = sum(m.num_params for m in layers)
        err = float(np.mean([m.info["relative_error"] for m in layers]))
        sens = sum(m.factorization.sensitivity() for m in layers)
        notes.append(
            f"{label}: ranks "
            + ", ".join("x".join(map(str, m.ranks)) for m in layers)
            + (
                "; stabilisation sweeps "
                + ", ".join(str(m.info.get("stabilize_sweeps", "-")) for m in layers)
                if method == "tc"
                else ""
            )
        )
        before = evaluate(small, test_loader)
        after = []
        for seed in range(tune_seeds):
            tuned = copy.deepcopy(small)
            tune_gen = torch.Generator().manual_seed(seed)
            loader = DataLoader(train, batch_size=32, shuffle=True, generator=tune_gen)
            fit(tuned, loader, 1, lr=lr)
            after.append(evaluate(tuned, test_loader))
        print(
            f"| {label} | {params} | {err:.4f} | {sens:.3g} | {before:.4f} | "
            f"{np.mean(after):.4f} ({min(after):.4f}-{max(after):.4f}) | {divergence(small)} |"
        )
    print(
        "\nDiverged: a NaN loss, or the mean of the last 20 losses above the first step's loss, "
        "in one epoch of constant-lr SGD (momentum 0.9, batch 32) per seed; (xG): median ratio "
        "of that mean to the first loss.\n"
    )
    print("\n".join(f"- {n}" for n in notes) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.1, help="kernels: share of dense")
    parser.add_argument("--digits-ratio", type=float, default=0.25, help="digits: per layer")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.005, help="fine-tuning OneCycle peak")
    parser.add_argument("--tune-seeds", type=int, default=3, help="fine-tuning runs at --lr")
    parser.add_argument("--high-lr", type=float, nargs="+", default=[0.02, 0.05])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if not args.skip_kernels:
        kernel_part(args.ratio)
    if not args.skip_digits:
        digits_part(args.digits_ratio, args.seeds, args.lr, args.high_lr, args.tune_seeds)
    print(
        f"total {time.perf_counter() - start:.0f} s, torch {torch.__version__}, "
        f"{args.threads} thread(s)"
    )


if __name__ == "__main__":
    main()
