"""A small calibration of the current machine for the conv-einsum planner.

The planner chooses between equivalent executions of a factorized convolution (fold a bond into
the batch or run it as conv groups with the weight repeated, 1-D kernels or a folded 2-D kernel,
which step first, whether to convert an NCHW input to channels-last). Which is faster depends on
the machine, the memory layout and the thread count, so the planner prices each step with a
:class:`CostTable` measured here rather than with one constant:

    seconds(step) = call + mac * multiply-adds + elem * (elements read + written)

fitted separately for 1x1 convolutions, convolutions with a spatial kernel, grouped
convolutions and layout-changing copies, per memory layout, on a few dozen tiny timings (a few
seconds). Tables are cached on disk and keyed by torch version, thread count, layout and
machine, so each machine measures once.

* cache directory: ``$TNCONV_CACHE_DIR``, else ``$XDG_CACHE_HOME/tnconv``, else
  ``~/.cache/tnconv`` (file ``calibration.json``);
* reset: :func:`reset` or ``tnconv calibrate --reset``; measure now: :func:`calibrate` or
  ``tnconv calibrate``;
* ``TNCONV_CALIBRATION=default`` uses the built-in :data:`DEFAULT_TABLES` (no timing, no disk;
  the test suite sets it so that plans are deterministic), ``TNCONV_CALIBRATION=<file.json>``
  reads tables from that file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .contraction.cost import CostTable, KindCost, effective_macs
from .contraction.execute import pointwise_conv_input, pointwise_matmul  # timed as executed

__all__ = [
    "DEFAULT_TABLES",
    "CostTable",
    "KindCost",
    "Layout",
    "cache_dir",
    "cache_file",
    "cached",
    "calibrate",
    "cost_table",
    "effective_macs",
    "machine_key",
    "reset",
]

log = logging.getLogger(__name__)

Layout = Literal["nchw", "nhwc"]
LAYOUTS: tuple[Layout, ...] = ("nchw", "nhwc")
_FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
_VERSION = 4  # bump when the measured quantities change: old caches are then ignored


def _default(layout: Layout) -> CostTable:
    # Rounded from a one-thread calibration of a 2-core x86 machine: what a deterministic
    # planner uses when measuring is switched off (TNCONV_CALIBRATION=default).
    nhwc = layout == "nhwc"
    return CostTable(
        layout=layout,
        threads=1,
        pointwise=KindCost(9e-6 if nhwc else 5e-6, 1.2e-11 if nhwc else 1.5e-11, 6e-11),
        spatial=KindCost(5e-5, 9e-12 if nhwc else 1.2e-11, 7e-10 if nhwc else 4.5e-10),
        grouped=KindCost(4e-5 if nhwc else 6e-5, 1e-11, 3e-10 if nhwc else 5.5e-10),
        matmul=KindCost(
            1.2e-5 if not nhwc else 1.1e-5,
            1.4e-11 if not nhwc else 1.2e-11,
            6e-11 if nhwc else 3e-11,
        ),
        copy=3.5e-10 if nhwc else 1.5e-10,
        einsum=1.6e-5,
        source="default",
    )


DEFAULT_TABLES: dict[str, CostTable] = {layout: _default(layout) for layout in LAYOUTS}


def _simd_width() -> int:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return 8
    if "avx512f" in flags:
        return 16
    if "avx2" in flags or "avx" in flags:
        return 8
    return 4


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where calibrations are stored (``$TNCONV_CACHE_DIR``, ``$XDG_CACHE_HOME/tnconv`` or
    ``~/.cache/tnconv``)."""
    explicit = os.environ.get("TNCONV_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "tnconv"


def cache_file() -> Path:
    return cache_dir() / "calibration.json"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown-cpu"


def machine_key(layout: str, threads: int | None = None) -> str:
    """Cache key: format version, torch version, thread count, layout, CPU and core count."""
    n = threads if threads is not None else torch.get_num_threads()
    return (
        f"v{_VERSION}|torch={torch.__version__}|threads={n}|layout={layout}|"
        f"{platform.machine()}|{_cpu_name()}|cpus={os.cpu_count()}"
    )


def _read_cache(path: Path) -> dict[str, dict]:
    try:
        with open(path) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, entries: dict[str, dict]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            json.dump(entries, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: concurrent processes never read half a file
    except OSError as exc:  # a read-only home must not break inference
        log.warning("could not write the tnconv calibration cache %s: %s", path, exc)


def cached() -> dict[str, dict]:
    """The cached tables as stored (cache key -> table fields)."""
    return _read_cache(cache_file())


def reset() -> list[Path]:
    """Delete the cached calibration; the next plan measures again. Returns what was removed."""
    _MEMO.clear()
    path = cache_file()
    if path.exists():
        path.unlink()
        return [path]
    return []


# in-process memo (the file is read once per key); keyed like the file, so it never goes stale
_MEMO: dict[str, CostTable] = {}


def cost_table(layout: str, threads: int | None = None) -> CostTable:
    """The cost table for ``layout`` ("nchw" or "nhwc") at ``threads`` (default: torch's
    current thread count): from ``TNCONV_CALIBRATION`` if set, else the disk cache, else
    measured now (both layouts at once, a few seconds) and cached."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'nchw' or 'nhwc'; got {layout!r}")
    mode = os.environ.get("TNCONV_CALIBRATION", "")
    if mode == "default":
        return DEFAULT_TABLES[layout]
    if mode:
        data = _read_cache(Path(mode))
        if layout not in data:
            raise ValueError(
                f"TNCONV_CALIBRATION={mode!r} must name a JSON file with a table per layout "
                f"('nchw', 'nhwc'); it has {sorted(data)}"
            )
        return CostTable.from_json(data[layout])
    key = machine_key(layout, threads)
    if key in _MEMO:
        return _MEMO[key]
    entry = _read_cache(cache_file()).get(key)
    if entry is not None:
        try:
            _MEMO[key] = CostTable.from_json(entry)
            return _MEMO[key]
        except (KeyError, TypeError, ValueError):
            log.warning("ignoring a malformed calibration entry for %s", key)
    return calibrate(threads)[layout]


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
# (batch, in channels, out channels, size, kh, kw, groups)
_CONVS: dict[str, list[tuple[int, int, int, int, int, int, int]]] = {
    "pointwise": [
        (8, 64, 64, 14, 1, 1, 1),
        (8, 256, 48, 14, 1, 1, 1),
        (8, 48, 256, 14, 1, 1, 1),
        (8, 16, 16, 28, 1, 1, 1),
        (64, 8, 8, 14, 1, 1, 1),
        (1, 256, 256, 7, 1, 1, 1),
        (1, 32, 32, 14, 1, 1, 1),
        (1, 256, 64, 14, 1, 1, 1),
        (1, 128, 128, 14, 1, 1, 1),
        (1, 64, 256, 14, 1, 1, 1),
        (1, 64, 32, 56, 1, 1, 1),
    ],
    "spatial": [
        (8, 64, 64, 14, 3, 3, 1),
        (8, 16, 16, 14, 3, 3, 1),
        (8, 128, 32, 14, 3, 3, 1),
        (8, 32, 32, 14, 3, 1, 1),
        (64, 8, 8, 14, 1, 3, 1),
        (1, 64, 64, 7, 3, 3, 1),
    ],
    "grouped": [
        (8, 128, 128, 14, 3, 3, 128),
        (8, 128, 128, 14, 3, 1, 128),
        (8, 96, 96, 14, 3, 1, 8),
        (8, 121, 121, 14, 1, 3, 11),
        (8, 64, 64, 14, 3, 3, 4),
        (1, 256, 256, 7, 3, 3, 256),
        (4, 243, 27, 14, 3, 3, 27),
        (8, 64, 64, 14, 3, 3, 32),
    ],
}


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    # the fastest of the repeats: other processes only ever add time, so the minimum is the
    # most repeatable estimate of what the op itself costs on a busy machine
    fn()
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return min(samples)


# a kind whose timings no linear model fits within this (relative) is not used: measured under
# load, one such table priced every call at 15 ms and made plans fold whole networks into one op
MAX_MISFIT = 0.5


def _fit(rows: list[tuple[float, float, float]], default: KindCost, kind: str) -> KindCost:
    """Non-negative least squares of ``call + mac*x + elem*y`` on relative error; ``default``
    (with a warning) when the timings fit no such model within :data:`MAX_MISFIT`."""
    from scipy.optimize import nnls

    a = np.array([[1.0, m, e] for m, e, _ in rows])
    t = np.array([s for _, _, s in rows])
    scale = np.where(a.max(axis=0) > 0, a.max(axis=0), 1.0)  # (a column of zeros: no term)
    coef, _ = nnls((a / scale) / t[:, None], np.ones(len(rows)))
    call, mac, elem = (coef / scale).tolist()
    misfit = float(np.max(np.abs(a @ (coef / scale) / t - 1.0)))
    if misfit > MAX_MISFIT:
        # timings this far from any linear model: other processes competing for the cores, or
        # (seen on a quiet 2-core VM: channels-last products) an op kind whose cost here is not
        # linear in its multiply-adds and elements
        log.warning(
            "tnconv calibration: no linear cost model fits the %s op timings (a fit is off by "
            "%.0f%%): the machine may be busy, or this kind's cost is not linear here. Using the "
            "built-in %s costs; if the machine was busy, re-run `tnconv calibrate --reset` when "
            "it is quiet.",
            kind,
            100 * misfit,
            kind,
        )
        return default
    return KindCost(call, mac, elem)


def _measure(layout: Layout, repeats: int) -> CostTable:
    fmt = _FORMATS[layout]
    simd = _simd_width()
    padding = dataclasses.replace(DEFAULT_TABLES[layout], simd=simd)
    gen = torch.Generator().manual_seed(0)
    fits: dict[str, KindCost] = {}
    matmul_rows: list[tuple[float, float, float]] = []
    with torch.no_grad():
        for kind, convs in _CONVS.items():
            rows = []
            for b, cin, cout, size, kh, kw, groups in convs:
                x = torch.randn(b, cin, size, size, generator=gen).contiguous(memory_format=fmt)
                w = torch.randn(cout, cin // groups, kh, kw, generator=gen)
                pad = (kh // 2, kw // 2)
                out = b * cout * size * size
                macs = out * (cin // groups) * kh * kw
                elems = float(b * cin * size * size + out)
                if kind == "pointwise":
                    # both executions of a 1x1 step, as the executor runs them
                    seconds = _best_seconds(lambda x=x, w=w: pointwise_matmul(x, w), repeats)
                    matmul_rows.append((float(macs), elems, seconds))
                    x = pointwise_conv_input(x, layout == "nhwc")
                seconds = _best_seconds(
                    lambda x=x, w=w, pad=pad, g=groups: F.conv2d(x, w, None, 1, pad, 1, g),
                    repeats,
                )
                macs = effective_macs(padding, macs, groups, cin // groups, cout // groups)
                rows.append((float(macs), elems, seconds))
            fits[kind] = _fit(rows, getattr(DEFAULT_TABLES[layout], kind), kind)
        fits["matmul"] = _fit(matmul_rows, DEFAULT_TABLES[layout].matmul, "matmul")
        copies = []
        for b, c, size in ((8, 64, 14), (32, 121, 14), (4, 32, 28)):
            x = torch.randn(b, c, size, size, generator=gen).contiguous(memory_format=fmt)
            split = 11 if c % 11 == 0 else 2
            xv = x.view(b, split, c // split, size, size)
            seconds = _best_seconds(lambda xv=xv: xv.permute(0, 2, 1, 3, 4).contiguous(), repeats)
            copies.append(seconds / (2 * x.numel()))
        a = torch.randn(11, 3, 11, generator=gen)
        c = torch.randn(11, 3, 11, generator=gen)
        einsum = _best_seconds(lambda: torch.einsum("ahb,bwc->ahwc", a, c), repeats)
        conversions: dict[str, list[tuple[float, float, float]]] = {"to_nhwc": [], "to_nchw": []}
        for b, c, size in ((1, 512, 7), (1, 128, 28), (8, 64, 28), (16, 256, 14)):
            x = torch.randn(b, c, size, size, generator=gen)
            y = x.contiguous(memory_format=torch.channels_last)
            n = float(x.numel())
            to_last = _best_seconds(
                lambda x=x: x.contiguous(memory_format=torch.channels_last), repeats
            )
            conversions["to_nhwc"].append((0.0, n, to_last))
            conversions["to_nchw"].append((0.0, n, _best_seconds(y.contiguous, repeats)))
        converts = {
            k: _fit(rows, getattr(DEFAULT_TABLES[layout], k), k) for k, rows in conversions.items()
        }
    return CostTable(
        layout=layout,
        threads=torch.get_num_threads(),
        copy=statistics.median(copies),
        einsum=einsum,
        source="measured",
        simd=simd,
        **converts,
        **fits,
    )


def calibrate(threads: int | None = None, repeats: int = 7) -> dict[str, CostTable]:
    """Measure both layouts now at ``threads`` (default: current), cache and return them."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        tables = {layout: _measure(layout, repeats) for layout in LAYOUTS}
        log.info(
            "tnconv calibrated the planner for %d threads in %.1f s (cached in %s)",
            torch.get_num_threads(),
            time.perf_counter() - start,
            cache_file(),
        )
        n = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    path = cache_file()
    entries = _read_cache(path)
    for layout, table in tables.items():
        key = machine_key(layout, n)
        entries[key] = table.to_json()
        _MEMO[key] = table
    _write_cache(path, entries)
    return tables
