"""Compressibility of dense conv kernels: cuts, spectra, entropies, truncation sweeps.

After Singh, Jahromi & Orús, "Tensor network compressibility of convolutional models": a kernel
``W`` of shape (T, S, kh, kw) = (OUT, IN, KH, KW) is bent into a matrix along a *cut* (a
bipartition of its four modes), and the matrix's singular values say how much of the kernel a
rank-k truncation along that cut keeps.

* Single-mode cuts ``OUT``, ``IN``, ``KH``, ``KW``: one mode against the other three (the HOSVD
  mode unfoldings).
* Two-mode cuts ``OUT,IN`` (T·S x kh·kw), ``OUT,KH`` (T·kh x S·kw), ``OUT,KW`` (T·kw x S·kh).
* ``CP``: a CP fit at a rank (:func:`truncate` / :func:`sweep` only; it is not a bipartition).

For a cut with singular values σ, ``p_i = σ_i² / Σσ²`` and the entanglement-like entropy is
``S = -Σ p_i log p_i`` (natural log); ``discarded[k] = sqrt(Σ_{i>=k} σ_i²) / ||W||`` is the
relative Frobenius norm lost keeping the top ``k`` (``discarded[0] = 1``, ``discarded[n] = 0``).
"Norm loss" everywhere in this module is that relative Frobenius error ``||W - W_k|| / ||W||``.

:func:`truncate` returns a new model whose selected kernels are truncated along a cut (the
layers stay dense ``nn.Conv2d``); :func:`sweep` tabulates norm loss against a caller's metric
before and after an optional re-training callback.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._modes import plain_copy
from .compress import LayerSelector, select_convs
from .factorization import validate_weight
from .registry import get

__all__ = [
    "CUTS",
    "Cut",
    "SweepResult",
    "SweepRow",
    "cuts",
    "entropy",
    "hosvd_spectra",
    "layer_table",
    "matricize",
    "plot_entropy",
    "plot_spectra",
    "plot_sweep",
    "sweep",
    "truncate",
    "truncate_kernel",
    "truncation_record",
    "write_csv",
]

log = logging.getLogger(__name__)

# cut name -> (row modes, column modes) of the matricisation, modes 0..3 = OUT, IN, KH, KW
_BIPARTITIONS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "OUT": ((0,), (1, 2, 3)),
    "IN": ((1,), (0, 2, 3)),
    "KH": ((2,), (0, 1, 3)),
    "KW": ((3,), (0, 1, 2)),
    "OUT,IN": ((0, 1), (2, 3)),
    "OUT,KH": ((0, 2), (1, 3)),
    "OUT,KW": ((0, 3), (1, 2)),
}
CUTS: tuple[str, ...] = tuple(_BIPARTITIONS)
CP_CUT = "CP"
MODE_NAMES = ("OUT", "IN", "KH", "KW")


def _cut_name(cut: str) -> str:
    if not isinstance(cut, str):
        raise TypeError(f"cut must be a string; got {type(cut).__name__}")
    key = cut.upper().replace(" ", "")
    if key not in _BIPARTITIONS and key != CP_CUT:
        raise ValueError(f"unknown cut {cut!r}; cuts: {', '.join(CUTS)}, {CP_CUT}")
    return key


def matricize(weight: torch.Tensor, cut: str) -> torch.Tensor:
    """The kernel bent into a matrix along ``cut``: rows are the cut's modes (row-major), columns
    the remaining modes. ``weight`` (T, S, kh, kw); e.g. ``"OUT,KH"`` gives (T·kh, S·kw)."""
    rows, cols = _BIPARTITIONS[_cut_name(cut)]
    w = weight.permute(*rows, *cols)
    return w.reshape(math.prod(weight.shape[m] for m in rows), -1)


def _unmatricize(mat: torch.Tensor, cut: str, shape: Sequence[int]) -> torch.Tensor:
    rows, cols = _BIPARTITIONS[_cut_name(cut)]
    order = (*rows, *cols)
    w = mat.reshape(*(shape[m] for m in order))
    return w.permute(*np.argsort(order).tolist())


def entropy(singular_values: Any) -> float:
    """``-Σ p log p`` with ``p = σ²/Σσ²`` (natural log; 0 log 0 = 0). A zero spectrum: 0."""
    s = np.asarray(singular_values, dtype=np.float64)
    energy = s * s
    total = energy.sum()
    if total <= 0:
        return 0.0
    p = energy[energy > 0] / total
    return float(-(p * np.log(p)).sum()) + 0.0  # + 0.0: no "-0.0" for a single term


@dataclass
class Cut:
    """One bipartition of a kernel's modes and its spectrum.

    Attributes:
        name: "OUT", "IN", "KH", "KW", "OUT,IN", "OUT,KH" or "OUT,KW".
        matrix_shape: (rows, cols) of the matricisation.
        singular_values: float64, descending, length ``min(rows, cols)``.
        entropy: ``-Σ p log p``, ``p = σ²/Σσ²``, natural log.
        discarded: float64 of length n + 1; ``discarded[k]`` is the relative norm lost keeping
            the top ``k`` singular values.
    """

    name: str
    matrix_shape: tuple[int, int]
    singular_values: np.ndarray
    entropy: float
    discarded: np.ndarray

    @property
    def max_entropy(self) -> float:
        """``log n``: the entropy of a flat spectrum of this length."""
        return math.log(len(self.singular_values))

    @property
    def effective_rank(self) -> float:
        """``exp(S)``: the number of equal singular values with the same entropy."""
        return math.exp(self.entropy)

    def rank_at(self, loss: float) -> int:
        """Smallest k whose truncation loses at most ``loss`` of the norm (``loss`` in [0, 1])."""
        if not 0.0 <= loss <= 1.0:
            raise ValueError(f"loss must be in [0, 1]; got {loss}")
        return int(np.flatnonzero(self.discarded <= loss + 1e-12)[0])


def _discarded(s: np.ndarray) -> np.ndarray:
    energy = s.astype(np.float64) ** 2
    total = energy.sum()
    # tail[k] = Σ_{i>=k} σ_i², summed from the small end so tiny tails stay accurate
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    return np.sqrt(tail / total) if total > 0 else np.zeros_like(tail)


def cuts(weight: Any) -> list[Cut]:
    """Every cut of a kernel (T, S, kh, kw) (torch or numpy), in the order of :data:`CUTS`.

    Raises :class:`~tnconv.errors.InvalidWeightError` for a kernel that is not 4-D, finite and
    floating point.
    """
    w = validate_weight(weight).detach().to(device="cpu", dtype=torch.float64)
    records = []
    for name in CUTS:
        mat = matricize(w, name)
        s = torch.linalg.svdvals(mat).numpy()
        records.append(
            Cut(name, (int(mat.shape[0]), int(mat.shape[1])), s, entropy(s), _discarded(s))
        )
    return records


def hosvd_spectra(weight: Any) -> dict[str, np.ndarray]:
    """The HOSVD mode spectra {"OUT", "IN", "KH", "KW"}: norms of the HOSVD core's slices.

    The core ``C = W ×_1 U_OUTᵀ ×_2 U_INᵀ ×_3 U_KHᵀ ×_4 U_KWᵀ`` (full orthonormal mode bases) is
    all-orthogonal, and the Frobenius norms of its slices along mode n, in order, are the mode-n
    singular values (the single-mode cuts' spectra); computed here through the core.
    """
    w = validate_weight(weight).detach().to(device="cpu", dtype=torch.float64)
    bases = [torch.linalg.svd(matricize(w, m), full_matrices=True)[0] for m in MODE_NAMES]
    core = torch.einsum("tshw,ta,sb,hc,wd->abcd", w, *bases)
    out = {}
    for n, mode in enumerate(MODE_NAMES):
        other = tuple(m for m in range(4) if m != n)
        norms = torch.sqrt((core * core).sum(dim=other))
        k = min(w.shape[n], math.prod(w.shape[m] for m in other))  # rank of the unfolding
        out[mode] = norms[:k].numpy()
    return out


# ---------------------------------------------------------------------------------------------
# truncation
# ---------------------------------------------------------------------------------------------
def _kept(keep: Any, n: int, what: str) -> int:
    """``keep``: an int (absolute rank, 1..n) or a float share in (0, 1] of n (rounded, >= 1)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float, np.integer, np.floating)):
        raise TypeError(f"keep must be an int rank or a float share in (0, 1]; got {keep!r}")
    if isinstance(keep, (int, np.integer)):
        if not 1 <= keep <= n:
            raise ValueError(f"keep={keep} is out of range for {what}: give a rank in 1..{n}")
        return int(keep)
    if not (0.0 < keep <= 1.0) or math.isnan(keep):
        raise ValueError(f"keep={keep} is not a share in (0, 1]")
    return max(1, round(keep * n))


def truncate_kernel(
    weight: torch.Tensor, cut: str, keep: Any, **cp_options: Any
) -> tuple[torch.Tensor, int, float]:
    """Truncate one kernel (T, S, kh, kw) along ``cut``.

    For a bipartition, ``keep`` is the number of singular values kept (int) or their share
    (float in (0, 1], rounded, at least 1). For ``"CP"``, ``keep`` is the CP rank (int) or the
    share of the dense parameters the CP factors may use (float): rank = that share ·
    T·S·kh·kw / (T+S+kh+kw), at least 1; ``cp_options`` go to ``tnconv.get("cp").factorize``.

    Returns ``(truncated kernel of the same shape / dtype / device, rank kept, norm loss)`` with
    norm loss ``||W - W_k|| / ||W||``.
    """
    name = _cut_name(cut)
    w = validate_weight(weight).detach()
    w64 = w.to(torch.float64)
    norm = float(torch.linalg.vector_norm(w64))
    if name == CP_CUT:
        shape = tuple(w.shape)
        if isinstance(keep, (float, np.floating)):
            _kept(keep, 1, "CP")  # validates the share
            keep = max(1, math.floor(keep * math.prod(shape) / sum(shape)))
        k = _kept(keep, 10**9, "CP")
        approx = get("cp").factorize(w64, k, **cp_options).to_tensor()
    else:
        mat = matricize(w64, name)
        k = _kept(keep, min(mat.shape), f"cut {name} of a {tuple(w.shape)} kernel")
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        approx = _unmatricize((u[:, :k] * s[:k]) @ vh[:k], name, w.shape)
    loss = float(torch.linalg.vector_norm(w64 - approx)) / norm if norm > 0 else 0.0
    return approx.to(dtype=w.dtype, device=w.device), k, loss


def conv2d_layers(model: nn.Module, layers: LayerSelector) -> list[tuple[str, nn.Module]]:
    """The chosen layers that are ``nn.Conv2d``: the cuts here are those of a 4-D kernel. Every
    Conv2d when ``layers`` is None; a named Linear / Conv1d / Conv3d raises ``TypeError``."""
    chosen = select_convs(model, layers)
    if layers is None:
        return [(n, c) for n, c in chosen if isinstance(c, nn.Conv2d)]
    for name, c in chosen:
        if not isinstance(c, nn.Conv2d):
            raise TypeError(f"layer {name!r} is a {type(c).__name__}; the analysis takes Conv2d")
    return chosen


def truncate(
    model: nn.Module,
    cut: str,
    keep: Any,
    layers: LayerSelector = None,
    **cp_options: Any,
) -> nn.Module:
    """A copy of ``model`` whose selected ``nn.Conv2d`` kernels are truncated along ``cut``.

    Args:
        model: any module; never modified.
        cut: one of :data:`CUTS` or ``"CP"``.
        keep: int rank or float share, as in :func:`truncate_kernel` (the same for every layer).
        layers: conv names, a predicate ``(name, module) -> bool``, or None for every
            ``nn.Conv2d``.
        **cp_options: options of the CP fit when ``cut="CP"``.

    Returns:
        The new model; its layers stay dense ``nn.Conv2d``. The per-layer ranks kept and norm
        losses are on ``model._tnconv_truncation`` as ``{layer: (rank, norm loss)}``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"truncate needs a torch.nn.Module; got {type(model).__name__}")
    _cut_name(cut)
    target = plain_copy(model)
    chosen = conv2d_layers(target, layers)
    if not chosen:
        raise ValueError("no nn.Conv2d layer selected")
    record = {}
    for name, conv in chosen:
        if conv.groups != 1:
            raise ValueError(f"layer {name!r} is a grouped convolution (groups={conv.groups})")
        new, k, loss = truncate_kernel(conv.weight, cut, keep, **cp_options)
        with torch.no_grad():
            conv.weight.copy_(new)
        record[name] = (k, loss)
    target._tnconv_truncation = record  # type: ignore[assignment]
    return target


def truncation_record(model: nn.Module) -> dict[str, tuple[int, float]]:
    """``{layer: (rank kept, norm loss)}`` of a model made by :func:`truncate` (else empty)."""
    return dict(getattr(model, "_tnconv_truncation", {}))


def _overall_loss(model: nn.Module, record: dict[str, tuple[int, float]]) -> float:
    """Relative norm lost over all truncated kernels together: sqrt(Σ lost² / Σ ||W||²)."""
    modules = dict(model.named_modules())
    lost = total = 0.0
    for name, (_, loss) in record.items():
        sq = float(modules[name].weight.detach().double().pow(2).sum())
        lost, total = lost + loss * loss * sq, total + sq
    return math.sqrt(lost / total) if total > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# sweeps
# ---------------------------------------------------------------------------------------------
@dataclass
class SweepRow:
    """One truncation: ``layer`` is a conv name or "all" (every selected layer at once).

    ``norm_loss`` is the relative Frobenius norm lost (for "all", over the selected kernels
    together); ``ranks`` the rank kept per layer ("name:k" joined by spaces); ``metric`` the
    caller's metric right after truncation, ``metric_retrained`` after ``retrain`` (NaN without).
    """

    layer: str
    cut: str
    keep: float
    ranks: str
    norm_loss: float
    metric: float
    metric_retrained: float = math.nan


@dataclass
class SweepResult:
    """Rows of :func:`sweep` plus the dense model's metric."""

    rows: list[SweepRow]
    dense_metric: float

    def to_dicts(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=[*SweepRow.__dataclass_fields__, "dense"])
            writer.writeheader()
            for row in self.to_dicts():
                writer.writerow(row | {"dense": self.dense_metric})
        return path

    def __str__(self) -> str:
        lines = [f"dense metric {self.dense_metric:.4f}"]
        lines.append(
            f"{'layer':24s} {'cut':7s} {'keep':>6s} {'loss':>6s} {'metric':>7s} {'tuned':>7s}"
        )
        for r in self.rows:
            lines.append(
                f"{r.layer:24s} {r.cut:7s} {r.keep:6.3g} {r.norm_loss:6.3f} {r.metric:7.4f} "
                f"{r.metric_retrained:7.4f}"
            )
        return "\n".join(lines)


def sweep(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    cuts: Sequence[str] = CUTS,
    keeps: Sequence[Any] = (0.5, 0.25, 0.1),
    retrain: Callable[[nn.Module], Any] | None = None,
    *,
    layers: LayerSelector = None,
    per_layer: bool = True,
    together: bool = True,
    progress: bool = False,
    retrain_if: Callable[[SweepRow], bool] | None = None,
    **cp_options: Any,
) -> SweepResult:
    """Truncate along every cut at every keep and measure.

    Args:
        model: the dense model (never modified).
        evaluate: ``model -> metric`` (e.g. test accuracy).
        cuts: names from :data:`CUTS` and/or ``"CP"``.
        keeps: int ranks or float shares (see :func:`truncate_kernel`).
        retrain: optional ``model -> None`` that re-trains a truncated model in place (e.g. one
            epoch); its metric is then measured again. The model re-trains as a dense model
            (the question is whether truncation moved it to a worse minimum, not whether the
            truncated structure can be trained).
        layers: which convs (names, predicate, None = all).
        per_layer: a row per (selected layer, cut, keep), the other layers left dense.
        together: a row "all" per (cut, keep), every selected layer truncated at once.
        progress: a tqdm bar over the truncations.
        retrain_if: re-train only the rows for which it is true (default: every row).
        **cp_options: options of the CP fits for ``"CP"``.

    Returns:
        :class:`SweepResult`.
    """
    if not per_layer and not together:
        raise ValueError("sweep needs per_layer or together (or both)")
    names = [_cut_name(c) for c in cuts]
    if not names or not list(keeps):
        raise ValueError("sweep needs at least one cut and one keep")
    selected = [n for n, c in conv2d_layers(model, layers)]
    for name, conv in select_convs(model, selected):
        if conv.groups != 1:
            raise ValueError(f"layer {name!r} is a grouped convolution (groups={conv.groups})")
    if not selected:
        raise ValueError("no nn.Conv2d layer selected")
    scopes = ([[n] for n in selected] if per_layer else []) + ([selected] if together else [])
    jobs = [(scope, c, k) for scope in scopes for c in names for k in keeps]
    dense_metric = float(evaluate(model))
    convs = dict(select_convs(model, selected))
    cache: dict[tuple[str, str, Any], tuple[torch.Tensor, int, float]] = {}

    def truncated(name: str, cut: str, keep: Any) -> tuple[torch.Tensor, int, float]:
        # a kernel's truncation is shared by its one-layer and all-layer rows (CP fits cost)
        key = (name, cut, keep)
        if key not in cache:
            cache[key] = truncate_kernel(convs[name].weight, cut, keep, **cp_options)
        return cache[key]

    rows = []
    for scope, cut, keep in tqdm(jobs, desc="truncation sweep", disable=not progress, leave=False):
        small = plain_copy(model)
        modules = dict(small.named_modules())
        record = {}
        for name in scope:
            new, k, loss = truncated(name, cut, keep)
            with torch.no_grad():
                modules[name].weight.copy_(new)
            record[name] = (k, loss)
        row = SweepRow(
            layer="all" if scope is selected else scope[0],
            cut=cut,
            keep=float(keep),
            ranks=" ".join(f"{n}:{k}" for n, (k, _) in record.items()),
            norm_loss=_overall_loss(model, record),
            metric=float(evaluate(small)),
        )
        if retrain is not None and (retrain_if is None or retrain_if(row)):
            retrain(small)
            row.metric_retrained = float(evaluate(small))
        log.info(
            "%s %s keep %s: loss %.3f metric %.4f", row.layer, cut, keep, row.norm_loss, row.metric
        )
        rows.append(row)
    return SweepResult(rows, dense_metric)


# ---------------------------------------------------------------------------------------------
# per-layer tables and plots (``tnconv analyze``)
# ---------------------------------------------------------------------------------------------
LOSS_LEVELS = (0.01, 0.05, 0.1, 0.3)


def layer_table(
    model: nn.Module, layers: LayerSelector = None, progress: bool = False
) -> list[dict[str, Any]]:
    """One row per (selected conv, cut): depth (index among the selected convs), shape,
    matrix shape, full rank, entropy, entropy / log n, effective rank exp(S), the ranks at 1 /
    5 / 10 / 30% norm loss (and as shares of the full rank), σ_max, σ_min, and the energy share
    of the top singular value. Grouped convolutions are skipped."""
    rows = []
    chosen = [(n, c) for n, c in conv2d_layers(model, layers) if c.groups == 1]
    for depth, (name, conv) in enumerate(
        tqdm(chosen, desc="spectra", disable=not progress, leave=False)
    ):
        for cut in cuts(conv.weight):
            s = cut.singular_values
            n = len(s)
            row: dict[str, Any] = {
                "layer": name,
                "depth": depth,
                "shape": "x".join(str(int(d)) for d in conv.weight.shape),
                "cut": cut.name,
                "matrix": f"{cut.matrix_shape[0]}x{cut.matrix_shape[1]}",
                "full_rank": n,
                "entropy": cut.entropy,
                "entropy_norm": cut.entropy / cut.max_entropy if n > 1 else 0.0,
                "effective_rank": cut.effective_rank,
            }
            for loss in LOSS_LEVELS:
                k = cut.rank_at(loss)
                row[f"rank_{round(100 * loss)}pct"] = k
                row[f"share_{round(100 * loss)}pct"] = k / n
            energy = s * s
            row |= {
                "sigma_max": float(s[0]),
                "sigma_min": float(s[-1]),
                "top1_energy": float(energy[0] / energy.sum()) if energy.sum() > 0 else 0.0,
            }
            rows.append(row)
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Rows (dicts with the same keys) to a CSV file."""
    path = Path(path)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["layer"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'tnconv[plot]'") from exc
    return plt


def plot_spectra(
    weights: Mapping[str, Any], path: str | Path, title: str = "", normalize: bool = True
) -> Path:
    """Singular values of every cut, one panel per kernel in ``weights`` ({label: kernel}),
    against the index as a share of the cut's full rank (σ / σ_max when ``normalize``)."""
    plt = _pyplot()
    n = len(weights)
    if n == 0:
        raise ValueError("no kernel to plot")
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    for ax, (label, w) in zip(axes[0], weights.items(), strict=True):
        for cut in cuts(w):
            s = cut.singular_values
            s = s / s[0] if normalize and s[0] > 0 else s
            x = (np.arange(len(s)) + 1) / len(s)
            ax.semilogy(x, np.maximum(s, 1e-12), label=f"{cut.name} (S={cut.entropy:.2f})")
        ax.set_title(f"{label} {tuple(int(d) for d in np.shape(w))}", fontsize=9)
        ax.set_xlabel("k / full rank")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("σ_k / σ_1" if normalize else "σ_k")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_entropy(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Normalised entropy S / log n of every cut against layer depth (rows of
    :func:`layer_table`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for cut in CUTS:
        pts = sorted((r["depth"], r["entropy_norm"]) for r in rows if r["cut"] == cut)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=cut)
    names = sorted({(r["depth"], r["layer"]) for r in rows})
    ax.set_xticks([d for d, _ in names])
    ax.set_xticklabels([n for _, n in names], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("entropy / log(full rank)")
    ax.set_xlabel("layer (by depth)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_sweep(result: SweepResult, path: str | Path, title: str = "") -> Path:
    """Metric against norm loss, one marker per cut, per scope ("all" filled, single layers
    hollow); re-trained metrics (when present) as crosses joined to their truncated point."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cut_names = sorted({r.cut for r in result.rows})
    colors = {c: f"C{i}" for i, c in enumerate(cut_names)}
    for r in result.rows:
        face = colors[r.cut] if r.layer == "all" else "none"
        ax.scatter(r.norm_loss, r.metric, edgecolors=colors[r.cut], facecolors=face, s=28)
        if not math.isnan(r.metric_retrained):
            ax.plot([r.norm_loss] * 2, [r.metric, r.metric_retrained], color=colors[r.cut], lw=0.8)
            ax.scatter(r.norm_loss, r.metric_retrained, color=colors[r.cut], marker="x", s=30)
    for c in cut_names:
        ax.scatter([], [], color=colors[c], label=c)
    ax.axhline(result.dense_metric, color="grey", linestyle="--", lw=0.8, label="dense")
    ax.set_xlabel("relative norm loss ||W - W_k|| / ||W||")
    ax.set_ylabel("metric (filled: all layers, hollow: one layer, x: re-trained)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
