"""Fit speed: tnconv's decompositions against TensorLy, and whole-model compression times.

One process, one thread, one round-robin run: for each kernel, ours and TensorLy's fit alternate
(``--repeats`` rounds, the median kept), so a busy machine inflates both sides alike and the
ratios stay meaningful. Kernels: PyTorch's default init (``nn.Conv2d``; random kernels do not
compress, which is the hard case for searches) and, where ``/work/shared/data`` exists, trained
kernels of the same size class (never needed; skipped otherwise).

Rows:

* fixed rank, ours vs TensorLy at the same ranks: ``tucker`` vs ``partial_tucker`` (Tucker-2),
  ``tt`` vs ``tensor_train``, ``cp`` vs ``parafac`` (both with an SVD start);
* ``eps=0.3`` searches of every method on the 512x512x3x3 kernel (target < 10 s);
* ``rsdtr``'s ``eps=0.3`` search at 512x512x3x3 on one and on two torch threads (target < 10 s
  each), wall and CPU time, on the default-init kernel and on one with a trained-like power-law
  spectrum (``/work/shared/data`` has no kernel above 96 channels);
* ``compress`` of a ResNet-18-shaped model (built here, default init) with every method at
  ``eps=0.3`` and ``budget=0.25`` (target < 2 min each on 2 cores), full preset only;
* the README's ``tnconv.study`` block on ResNet-20 (target < 5 min), full preset only.

Usage::

    python benchmarks/fit_speed.py --quick        # < 3 min: 256-channel fits, eps searches
    python benchmarks/fit_speed.py                # everything (tens of minutes on a busy box)
    python benchmarks/fit_speed.py --threads 2    # compress / study rows on 2 threads
    python benchmarks/fit_speed.py --sections rsdtr   # rsdtr eps=0.3, 512 channels, 1 and 2 threads

Prints one Markdown table; the ratio column is TensorLy time / ours (above 1: ours faster).
"""

from __future__ import annotations

import argparse
import glob
import logging
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

import tnconv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _models import resnet18_imagenet

Row = dict[str, Any]


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _rel(x: np.ndarray, approx: np.ndarray) -> float:
    return float(np.linalg.norm(x - approx) / np.linalg.norm(x))


# -- TensorLy references --------------------------------------------------------------------------
def _tl_tucker(x: np.ndarray, r: int) -> float:
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    (core, factors), _ = partial_tucker(x, rank=[r, r], modes=[0, 1], init="svd")
    return _rel(x, tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1]))


def _tl_tt(x: np.ndarray, ranks: tuple[int, ...]) -> float:
    import tensorly as tl
    from tensorly.decomposition import tensor_train

    return _rel(x, tl.tt_to_tensor(tensor_train(x, rank=[1, *ranks, 1])))


def _tl_cp(x: np.ndarray, r: int) -> float:
    import tensorly as tl
    from tensorly.decomposition import parafac

    return _rel(x, tl.cp_to_tensor(parafac(x, r, init="svd", random_state=0)))


# -- kernels --------------------------------------------------------------------------------------
def _random_kernel(c: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return nn.Conv2d(c, c, 3).weight.detach().to(torch.float64)


def _power_law_kernel(c: int, seed: int = 1, decay: float = 0.7) -> torch.Tensor:
    """A (c, c, 3, 3) kernel whose (T | S kh kw) unfolding has singular values ``k**-decay``
    on random singular vectors: a trained-like spectrum at a size the shared data lacks."""
    gen = torch.Generator().manual_seed(seed)
    u, _, vh = torch.linalg.svd(
        torch.randn(c, c * 9, generator=gen, dtype=torch.float64), full_matrices=False
    )
    sv = torch.arange(1, c + 1, dtype=torch.float64) ** -decay
    return ((u * sv) @ vh).reshape(c, c, 3, 3)


def _trained_kernels(min_channels: int) -> dict[str, torch.Tensor]:
    """3x3 (or larger) trained kernels with at least ``min_channels`` on both channel modes."""
    found: dict[str, torch.Tensor] = {}
    for path in sorted(glob.glob("/work/shared/data/*.npz")):
        with np.load(path) as data:
            for name, arr in data.items():
                if arr.ndim == 4 and min(arr.shape[:2]) >= min_channels and arr.shape[2] > 1:
                    found[f"{os.path.basename(path)[:-4]}/{name}"] = torch.tensor(
                        arr, dtype=torch.float64
                    )
    return found


# -- rows -----------------------------------------------------------------------------------------
def fixed_rank_rows(kernels: dict[str, torch.Tensor], repeats: int, cp: bool) -> list[Row]:
    rows: list[Row] = []
    for label, w in kernels.items():
        x = w.numpy()
        c = min(w.shape[:2])
        cases: list[tuple[str, Any, Callable[[], float], Callable[[], float]]] = []
        r = max(1, c // 4)
        cases.append(
            (
                "tucker",
                (r, r),
                lambda w=w, r=r: tnconv.get("tucker").factorize(w, r).relative_error(w),
                lambda x=x, r=r: _tl_tucker(x, r),
            )
        )
        tt_ranks = tnconv.get("tt").bond_ranks((c // 4, 6, 3), tuple(w.shape))
        cases.append(
            (
                "tt",
                tt_ranks,
                lambda w=w, rk=tt_ranks: tnconv.get("tt").factorize(w, rk).relative_error(w),
                lambda x=x, rk=tt_ranks: _tl_tt(x, rk),
            )
        )
        cases.append(
            (
                "tt (als_sweeps=0: TT-SVD only)",
                tt_ranks,
                lambda w=w, rk=tt_ranks: (
                    tnconv.get("tt").factorize(w, rk, als_sweeps=0).relative_error(w)
                ),
                lambda x=x, rk=tt_ranks: _tl_tt(x, rk),
            )
        )
        if cp:
            rc = max(1, c // 8)
            cases.append(
                (
                    "cp",
                    (rc,),
                    lambda w=w, rc=rc: tnconv.get("cp").factorize(w, rc).relative_error(w),
                    lambda x=x, rc=rc: _tl_cp(x, rc),
                )
            )
        for method, ranks, ours, theirs in cases:
            t_ours, t_tl, e_ours, e_tl = [], [], math.nan, math.nan
            for _ in range(repeats):  # round robin: ours, then TensorLy, alternating
                dt, e_ours = _timed(ours)
                t_ours.append(dt)
                dt, e_tl = _timed(theirs)
                t_tl.append(dt)
            ours_s, tl_s = statistics.median(t_ours), statistics.median(t_tl)
            rows.append(
                {
                    "case": f"{method} rank {ranks}",
                    "kernel": label,
                    "ours_s": ours_s,
                    "tl_s": tl_s,
                    "ratio": tl_s / ours_s,
                    "ours_err": e_ours,
                    "tl_err": e_tl,
                    "target": "2x, err <=" if method != "cp" else "1x, err <=",
                }
            )
            _show(rows[-1])
    return rows


def eps_rows(w: torch.Tensor, label: str, methods: list[str], eps: float = 0.3) -> list[Row]:
    rows = []
    for m in methods:
        dt, f = _timed(lambda m=m: tnconv.get(m).factorize(w, eps=eps))
        rows.append(
            {
                "case": f"{m} eps={eps} (ranks {f.ranks})",
                "kernel": label,
                "ours_s": dt,
                "ours_err": f.relative_error(w),
                "target": "< 10 s",
            }
        )
        _show(rows[-1])
    return rows


def rsdtr_thread_rows(
    kernels: dict[str, torch.Tensor], threads: tuple[int, ...] = (1, 2), eps: float = 0.3
) -> list[Row]:
    """``rsdtr``'s eps search per kernel and torch thread count: wall and CPU seconds (CPU is
    what a busy shared machine distorts least; on two threads it counts both)."""
    rows = []
    before = torch.get_num_threads()
    for label, w in kernels.items():
        for n in threads:
            torch.set_num_threads(n)
            kernel = w.clone()  # a fresh tensor: no spectra memoised by an earlier row
            cpu = time.process_time()
            dt, f = _timed(lambda k=kernel: tnconv.get("rsdtr").factorize(k, eps=eps))
            cpu = time.process_time() - cpu
            rows.append(
                {
                    "case": f"rsdtr eps={eps} on {n} thread(s) (ranks {f.ranks}, "
                    f"{f.num_params} params)",
                    "kernel": label,
                    "ours_s": dt,
                    "cpu_s": cpu,
                    "ours_err": f.relative_error(w),
                    "target": "< 10 s",
                }
            )
            _show(rows[-1])
    torch.set_num_threads(before)
    return rows


def compress_rows(methods: list[str]) -> list[Row]:
    model = resnet18_imagenet()  # default init
    rows = []
    for m in methods:
        for kind, kwargs in (("eps=0.3", {"eps": 0.3}), ("budget=0.25", {"budget": 0.25})):
            dt, small = _timed(
                lambda m=m, kw=kwargs: tnconv.compress(model, m, progress=False, **kw)
            )
            dense = sum(c.weight.numel() for c in model.modules() if isinstance(c, nn.Conv2d))
            kept = sum(
                mod.num_params if isinstance(mod, tnconv.FactorizedConv2d) else mod.weight.numel()
                for mod in small.modules()
                if isinstance(mod, (nn.Conv2d, tnconv.FactorizedConv2d))
            )
            rows.append(
                {
                    "case": f"compress ResNet-18 {m} {kind} (params {kept / dense:.2f})",
                    "kernel": "resnet18 (default init)",
                    "ours_s": dt,
                    "target": "< 120 s",
                }
            )
            _show(rows[-1])
    return rows


def study_rows() -> list[Row]:
    from tnconv.models import resnet20

    torch.manual_seed(0)
    model = resnet20()
    dt, _ = _timed(
        lambda: tnconv.study(
            model, budgets=[0.1, 0.25, 0.5], input_size=(8, 3, 32, 32), progress=False
        )
    )
    row = {
        "case": "README study, ResNet-20, every method, 3 budgets",
        "kernel": "resnet20 (default init)",
        "ours_s": dt,
        "target": "< 300 s",
    }
    _show(row)
    return [row]


# -- output ---------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _show(row: Row) -> None:
    logging.getLogger("fit_speed").info("%s", {k: _fmt(v) for k, v in row.items()})


def table(rows: list[Row]) -> str:
    cols = ["case", "kernel", "ours_s", "cpu_s", "tl_s", "ratio", "ours_err", "tl_err", "target"]
    head = ["case", "kernel", "ours (s)", "ours CPU (s)", "TensorLy (s)", "TL / ours", "ours err"]
    head.append("TL err")
    head.append("target")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="256-channel fits + eps searches")
    parser.add_argument("--repeats", type=int, default=1, help="round-robin rounds per case")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every row")
    parser.add_argument(
        "--sections",
        default="fixed,eps,rsdtr,compress,study",
        help="comma-separated subset of fixed,eps,rsdtr,compress,study (the full preset runs all)",
    )
    parser.add_argument("--methods", default=None, help="comma-separated methods (default all)")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if args.quick:
        sections &= {"fixed", "eps"}
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    logging.getLogger("fit_speed").setLevel(logging.INFO)  # one line per row as it finishes
    warnings.filterwarnings("ignore")
    import tensorly as tl

    tl.set_backend("numpy")
    methods = args.methods.split(",") if args.methods else tnconv.available("base")
    rows: list[Row] = []
    if "fixed" in sections:
        sizes = (256,) if args.quick else (256, 512)
        kernels = {f"random {c}x{c}x3x3": _random_kernel(c) for c in sizes}
        if not args.quick:
            for name, w in list(_trained_kernels(128).items())[:2]:
                kernels[f"trained {name} {tuple(w.shape)}"] = w
        rows += fixed_rank_rows(kernels, args.repeats, cp="cp" in methods)
    if "eps" in sections:
        rows += eps_rows(_random_kernel(512), "random 512x512x3x3", methods)
    if "rsdtr" in sections and "rsdtr" in methods:
        rows += rsdtr_thread_rows(
            {
                "random 512x512x3x3": _random_kernel(512),
                "power-law 512x512x3x3": _power_law_kernel(512),
            }
        )
    if "compress" in sections:
        rows += compress_rows(methods)
    if "study" in sections:
        rows += study_rows()
    print(
        f"\nfit_speed: torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
