"""Sequential output reconstruction: each layer fitted to the dense model's outputs from the
inputs it sees once the layers before it are compressed.

Fitting every layer on the *dense* model's inputs (:mod:`tnconv.statistics`) minimises
``||(W - W') x||``, but in the compressed model the layer sees ``x'``, the output of the
already-compressed layers before it, and the errors compound with depth. Zhang et al.
("Accelerating very deep convolutional networks for classification and detection", TPAMI 2016)
fit each layer, in forward order, to the *asymmetric* objective ``||W' x' - W x||``. With the
streamed moments of the patches of both models at the same positions,

    Sigma' = E[x' x'^T],   C = E[x' x^T],

that objective is ``tr((W' - W*) Sigma' (W' - W*)^T) + const`` with the corrected kernel

    W* = W + W (C^T - Sigma') (Sigma' + lambda I)^-1

(the least-squares map from ``x'`` to ``W x``, ridge-regularised towards W itself, so that
``x' = x`` gives ``W* = W`` exactly). So the asymmetric fit of any method is its output-aware fit
(:mod:`tnconv.decompositions.output_aware`) of ``W*`` on the statistics of ``x'``: nothing
method-specific. Where the patch moments are too large to keep (S kh kw above the statistics'
``patch_limit``) the correction is applied on the channel mode only, with the channel moments.
The bias, when the layer has one, is corrected for the shift of the means:
``b' = b + W mean(x) - W' mean(x')``.

:func:`fit_sequentially` drives it: one layer at a time in the order of the forward pass. The
dense model's inputs to every layer come from one pass; the compressed model's from one pass too,
each layer refitted by a pre-hook at its first call before the pass goes on through it (so the
cost is linear in depth). Where the dense inputs would not fit in memory, both models run up to
each layer again instead (a pre-hook stops them there).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from ._modes import plain_copy
from .convs import set_module
from .statistics import (
    DAMPING,
    MAX_PATCHES,
    PATCH_LIMIT,
    CalibrationDataError,
    InputStatistics,
    _first_input,
    _output_size,
    conv_patches,
    float_patches,
)

__all__ = ["SEQUENTIAL_SAMPLES", "PairedStatistics", "fit_sequentially", "forward_order"]

log = logging.getLogger(__name__)

# calibration inputs the sequential pass uses: it keeps them and runs both models up to every
# refitted layer on them (the digits CNN's 8 batches of 64: 32k patches per layer)
SEQUENTIAL_SAMPLES = 512

# the dense model's inputs to every refitted layer on those inputs are kept from one pass when
# they take at most this (ResNet-20 at 32x32: about 350 MB for 512 inputs), and the refits then
# happen in one pass of the compressed model over all of them; beyond it both models run up to
# every layer again (quadratic in depth)
DENSE_CACHE_BYTES = 1 << 29

# L-BFGS iterations finishing each refit on the exact patch-moment objective
# (:func:`tnconv.decompositions.output_aware.polish`; 0: none)
POLISH_ITERATIONS = 50

# a layer's refit: (corrected kernel (T, S, kh, kw), statistics of the inputs it sees) -> the
# factorized module (None: leave the layer as it is)
Refit = Callable[[torch.Tensor, InputStatistics], nn.Module | None]


@dataclass
class PairedStatistics:
    """Streamed moments of one conv's input patches in the compressed model (x') and in the
    dense model (x), taken at the same positions of the same inputs, for the dense kernel W.

    Attributes:
        kernel: the dense kernel W (T, S, kh, kw), float64.
        seen: the :class:`InputStatistics` of x' (what the refitted layer is whitened by).
        cross: sum of vec(x') vec(x)^T, (S kh kw, S kh kw), when that fits the patch limit.
        cross_channel: sum over positions and kernel offsets of x'_s x_r, (S, S).
        sum_seen, sum_dense: sums of vec(x') and vec(x), (S kh kw,).
        dense_energy: sum of ||W x||^2 (the dense layer's outputs, bias excluded).
    """

    kernel: torch.Tensor
    patch_limit: int = PATCH_LIMIT
    max_patches: int | None = MAX_PATCHES
    seen: InputStatistics = field(init=False)
    cross: torch.Tensor | None = None
    cross_channel: torch.Tensor | None = None
    sum_seen: torch.Tensor | None = None
    sum_dense: torch.Tensor | None = None
    dense_energy: float = 0.0

    def __post_init__(self) -> None:
        self.kernel = self.kernel.detach().to(torch.float64)
        _, s, kh, kw = self.kernel.shape
        self.seen = InputStatistics(s, (kh, kw), self.patch_limit, self.max_patches)

    @property
    def size(self) -> int:
        """S kh kw: the length of one patch."""
        return self.seen.size

    @property
    def count(self) -> int:
        """Patches used."""
        return self.seen.count

    def update(self, conv: nn.Conv2d, x_seen: torch.Tensor, x_dense: torch.Tensor) -> None:
        """Add the patches ``conv`` reads from ``x_seen`` and ``x_dense`` (both (B, S, H, W)),
        the same random subset of positions of both."""
        if x_seen.shape != x_dense.shape:
            raise CalibrationDataError(
                f"the compressed model's input {tuple(x_seen.shape)} and the dense model's "
                f"{tuple(x_dense.shape)} differ in shape"
            )
        out_h, out_w = _output_size(conv, x_seen)
        pick = self.seen.positions(x_seen.shape[0] * out_h * out_w)
        p_seen = float_patches(conv_patches(conv, x_seen, pick))
        p_dense = float_patches(conv_patches(conv, x_dense, pick))
        n = p_seen.shape[0]
        self.seen.update(p_seen)  # picked already: n <= max_patches, no second subset
        flat_seen, flat_dense = p_seen.reshape(n, -1), p_dense.reshape(n, -1)
        kernel = self.kernel.reshape(self.kernel.shape[0], -1).to(flat_dense)
        self.dense_energy += float((flat_dense @ kernel.T).double().square().sum())
        if self.size <= self.patch_limit:
            cross = (flat_seen.T @ flat_dense).double()
            s, (kh, kw) = self.seen.channels, self.seen.kernel_size
            full = cross.reshape(s, kh, kw, s, kh, kw)
            cross_channel = torch.einsum("ahwbhw->ab", full)  # its partial trace
        else:
            cross = None
            cross_channel = torch.einsum("nshw,nrhw->sr", p_seen, p_dense).double()
        sums = flat_seen.double().sum(0), flat_dense.double().sum(0)
        if self.cross_channel is None:
            self.cross, self.cross_channel = cross, cross_channel
            self.sum_seen, self.sum_dense = sums
        else:
            self.cross_channel += cross_channel
            if cross is not None:
                self.cross += cross  # type: ignore[operator]
            self.sum_seen += sums[0]  # type: ignore[operator]
            self.sum_dense += sums[1]  # type: ignore[operator]

    def _check(self) -> None:
        if self.count == 0 or self.cross_channel is None:
            raise CalibrationDataError("the paired statistics saw no input: no calibration batch")

    def target_kernel(self, damping: float = DAMPING) -> torch.Tensor:
        """``W*`` (module docstring): the kernel (T, S, kh, kw), float64, whose output-aware fit
        on ``seen`` minimises ``||W' x' - W x||``."""
        self._check()
        w = self.kernel
        t = w.shape[0]
        if self.cross is not None:
            assert self.seen.patch is not None
            fix = _ridge_map(self.seen.patch, self.cross, damping)  # (P, P)
            flat = w.reshape(t, -1)
            return (flat + flat @ fix.to(w.device)).reshape(w.shape)
        assert self.seen.channel is not None and self.cross_channel is not None
        fix = _ridge_map(self.seen.channel, self.cross_channel, damping)  # (S, S)
        return w + torch.einsum("tshw,sa->tahw", w, fix.to(w.device))

    def _means(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sum_seen / self.count, self.sum_dense / self.count  # type: ignore[operator]

    def target_bias(self, bias: torch.Tensor, fitted: torch.Tensor) -> torch.Tensor:
        """``b' = b + W mean(x) - W' mean(x')`` for the dense bias b (T,) and the fitted
        kernel W' (T, S, kh, kw): the bias that matches the output means. b's dtype."""
        self._check()
        t = self.kernel.shape[0]
        mean_seen, mean_dense = self._means()
        wf = fitted.detach().to(torch.float64).reshape(t, -1)
        shift = self.kernel.reshape(t, -1) @ mean_dense - wf @ mean_seen.to(wf.device)
        return (bias.detach().to(torch.float64) + shift.to(bias.device)).to(bias.dtype)

    def output_error(self, fitted: torch.Tensor, bias_shift: torch.Tensor | None = None) -> float:
        """``sqrt(E||W' x' + d - W x||^2 / E||W x||^2)``: the relative error of the fitted
        kernel W' (T, S, kh, kw) on the compressed model's inputs against the dense layer's
        outputs (``d``: the fitted bias minus the dense one, (T,); None for equal biases).
        Exact; NaN without the patch moments (layers beyond the patch limit)."""
        self._check()
        if self.cross is None or self.seen.patch is None:
            return math.nan
        t, n = self.kernel.shape[0], self.count
        w = self.kernel.reshape(t, -1)
        wf = fitted.detach().to(torch.float64).reshape(t, -1).to(w.device)
        sig_seen, cross = self.seen.patch.to(w.device) / n, self.cross.to(w.device) / n
        dense = self.dense_energy / n
        num = float(((wf @ sig_seen) * wf).sum()) - 2 * float(((wf @ cross) * w).sum()) + dense
        if bias_shift is not None:
            d = bias_shift.detach().to(torch.float64).to(w.device)
            mean_seen, mean_dense = self._means()
            num += 2 * float(d @ (wf @ mean_seen - w @ mean_dense)) + float(d @ d)
        if dense <= 0:
            return 0.0 if num <= 0 else math.inf
        return math.sqrt(max(num, 0.0) / dense)


def _ridge_map(sigma: torch.Tensor, cross: torch.Tensor, damping: float) -> torch.Tensor:
    """M = ``(C^T - Sigma')(Sigma' + lambda I)^-1``, so that ``W* = W + W M`` for a kernel's
    rows W; lambda = ``damping`` times the mean eigenvalue of Sigma'. Zero where the input
    never saw anything."""
    n = sigma.shape[0]
    mean = float(torch.trace(sigma)) / n
    if mean <= 0:
        return torch.zeros_like(sigma)
    sym = (sigma + sigma.T) / 2
    eye = torch.eye(n, dtype=sigma.dtype, device=sigma.device)
    # (Sigma' + lambda I) is symmetric: M^T = solve(Sigma' + lambda I, C - Sigma')
    return torch.linalg.solve(sym + damping * mean * eye, cross - sym).T


class _Reached(Exception):
    """Raised by a pre-hook to stop a forward pass at the layer it watches."""


def _input_at(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The input of ``model``'s submodule ``name`` when ``model`` runs on ``x`` (the forward
    pass stops there)."""
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        seen.append(args[0])
        raise _Reached

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        model(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not seen:
        raise CalibrationDataError(f"a calibration batch does not reach layer {name!r}")
    return seen[0]


def forward_order(model: nn.Module, names: Iterable[str], batch: torch.Tensor) -> list[str]:
    """``names`` in the order ``model``'s forward pass on ``batch`` first calls them; names the
    pass does not reach are left out."""
    wanted = set(names)
    order: list[str] = []
    handles = []
    for name in wanted:

        def hook(module: nn.Module, args: tuple, name: str = name) -> None:
            if name not in order:
                order.append(name)

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return order


class _EvalNoGrad:
    """Eval mode and no_grad for the block, the modules' modes restored after."""

    def __init__(self, *models: nn.Module) -> None:
        self.models = models
        self.modes: list[list[tuple[nn.Module, bool]]] = []
        self.grad = torch.no_grad()

    def __enter__(self) -> None:
        self.modes = [[(m, m.training) for m in model.modules()] for model in self.models]
        for model in self.models:
            model.eval()
        self.grad.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.grad.__exit__(*exc)
        for modes in self.modes:
            for m, training in modes:
                m.training = training


def paired_statistics(
    model: nn.Module,
    dense: nn.Module,
    name: str,
    batches: Sequence[torch.Tensor],
    *,
    patch_limit: int = PATCH_LIMIT,
    max_patches: int | None = MAX_PATCHES,
    dense_inputs: Sequence[torch.Tensor] | None = None,
) -> PairedStatistics:
    """The paired statistics of layer ``name``: its input patches in ``model`` (the layers
    before it compressed) and in ``dense``, over ``batches`` (input tensors).
    ``dense_inputs``: the layer's inputs in ``dense`` on each batch, when already known."""
    conv = _dense_conv(dense, name)
    paired = PairedStatistics(conv.weight, patch_limit, max_patches)
    with _EvalNoGrad(model, dense):
        for i, x in enumerate(batches):
            x_dense = dense_inputs[i] if dense_inputs is not None else _input_at(dense, name, x)
            paired.update(conv, _input_at(model, name, x), x_dense)
    return paired


def _dense_conv(dense: nn.Module, name: str) -> nn.Conv2d:
    """``dense``'s layer ``name``, which the paired statistics need as an ungrouped Conv2d."""
    conv = dense.get_submodule(name)
    if type(conv) is not nn.Conv2d or conv.groups != 1:
        raise CalibrationDataError(f"layer {name!r} of the dense model is not an ungrouped Conv2d")
    return conv


def _all_dense_inputs(
    dense: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor], limit: int
) -> dict[str, list[torch.Tensor]] | None:
    """Every layer of ``names``' inputs in ``dense`` on every batch, from one pass per batch,
    or None when they would take more than ``limit`` bytes (judged on the first batch)."""
    kept: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def hook(name: str) -> Callable[[nn.Module, tuple], None]:
        def record(module: nn.Module, args: tuple) -> None:
            if len(kept[name]) < seen[0]:  # the first call of the layer on this batch
                kept[name].append(args[0].detach().clone())  # later in-place ops must not reach

        return record

    seen = [0]
    handles = [dense.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with _EvalNoGrad(dense):
            for i, x in enumerate(batches):
                seen[0] = i + 1
                dense(x)
                if i == 0:
                    per_batch = sum(t[0].numel() * t[0].element_size() for t in kept.values() if t)
                    total = sum(b.shape[0] for b in batches) / max(1, batches[0].shape[0])
                    if per_batch * total > limit:
                        return None
    finally:
        for h in handles:
            h.remove()
    if any(len(v) != len(batches) for v in kept.values()):
        return None  # a layer some batch did not reach: recorded per layer instead
    return kept


def fit_sequentially(
    model: nn.Module,
    dense: nn.Module,
    refits: Mapping[str, Refit],
    batches: Iterable[Any],
    *,
    max_samples: int | None = SEQUENTIAL_SAMPLES,
) -> dict[str, dict[str, float]]:
    """Refit the layers of ``model`` named in ``refits``, in forward order, each to the dense
    layer's outputs in ``dense`` from the inputs it sees in ``model`` (module docstring).

    Args:
        model: the model being compressed (modified: each refitted layer is installed before
            the next layer's inputs are recorded).
        dense: the dense model with the same layer names (ungrouped ``nn.Conv2d`` there);
            not modified.
        refits: layer name -> ``(corrected kernel, statistics of x') -> module | None``.
        batches: calibration inputs: tensors (B, S, H, W) or ``(inputs, labels)`` pairs.
        max_samples: use at most this many inputs (the first ones, the last batch cut; None:
            all). They are kept in memory, and run through both models at once where the
            dense model's layer inputs fit ``DENSE_CACHE_BYTES``.

    Returns:
        ``{layer name: {"sequential_error": e, "dense_input_error": e0}}``: the layer's
        relative output error in the compressed model against the dense one (exact; NaN
        beyond the patch limit), after the refit and for the module it replaced. The installed
        module's ``info`` gains these, ``kernel_error`` (against the dense kernel),
        ``sequential`` (the refit, or the first fit kept) and, where exact,
        ``relative_error = sequential_error``.
    """
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    inputs: list[torch.Tensor] = []
    taken = 0
    for batch in batches:
        if max_samples is not None and taken >= max_samples:
            break
        x = _first_input(batch)
        if max_samples is not None:
            x = x[: max_samples - taken]
        inputs.append(x)
        taken += x.shape[0]
    if not inputs:
        raise CalibrationDataError("no calibration batch")
    with _EvalNoGrad(dense):
        order = forward_order(dense, refits, inputs[0])
    # the compressed model's inputs are recorded on a copy running each factorized layer as the
    # dense conv of its reconstructed kernel: the same outputs to rounding, without planning and
    # autotuning every layer for the calibration batches' shape
    shadow = _densified(model)
    # the dense model's inputs to every layer, from one pass, where they fit in memory
    cached = _all_dense_inputs(dense, order, inputs, DENSE_CACHE_BYTES)
    report: dict[str, dict[str, float]] = {}
    grad_enabled = torch.is_grad_enabled()

    def refit_layer(name: str, paired: PairedStatistics) -> nn.Module | None:
        """Refit layer ``name`` on ``paired`` and install it in ``model``; its dense equivalent
        (None: the layer is left as it is)."""
        with torch.set_grad_enabled(grad_enabled):  # a method's fit may differentiate
            done = _refit_layer(model, name, dense.get_submodule(name), paired, refits[name])
        if done is None:
            return None
        module, report[name] = done
        return _dense_equivalent(module)

    if cached is not None and _in_place_ready(shadow, order):
        _refit_in_one_pass(shadow, dense, order, inputs, cached, refit_layer)
    else:
        for name in order:
            paired = paired_statistics(
                shadow,
                dense,
                name,
                inputs,
                patch_limit=PATCH_LIMIT,
                max_patches=MAX_PATCHES,
                dense_inputs=cached.pop(name) if cached is not None else None,
            )
            replacement = refit_layer(name, paired)
            if replacement is not None:
                set_module(shadow, name, replacement)
    return report


def _refit_layer(
    model: nn.Module, name: str, conv: nn.Conv2d, paired: PairedStatistics, refit: Refit
) -> tuple[nn.Module, dict[str, float]] | None:
    """Refit ``model``'s layer ``name`` (dense original ``conv``) on ``paired``: the refit, or
    the layer as first fitted where that does better on these inputs (the refit is the method's
    approximate fit of W*), each with its bias corrected, installed in ``model``. The module
    and its errors; None where ``refit`` declines the layer."""
    current = model.get_submodule(name)
    before = _layer_error(paired, conv, current)
    refitted = refit(paired.target_kernel().to(conv.weight.dtype), paired.seen)
    if refitted is None:
        return None
    choices = [_with_corrected_bias(paired, conv, m) for m in (refitted, current)]
    pick = 1 if choices[1][2] < choices[0][2] else 0  # NaN errors: the refit
    module, (fitted, bias, after) = (refitted, current)[pick], choices[pick]
    if bias is not None:
        with torch.no_grad():
            module.bias.copy_(bias)  # type: ignore[union-attr,operator]
    errors = {"sequential_error": after, "dense_input_error": before}
    info = getattr(module, "info", None)
    if isinstance(info, dict):  # the refit's own errors are against W*, not W
        kernel_error = float((fitted.double() - paired.kernel).norm() / paired.kernel.norm())
        how = "refit" if pick == 0 else "first fit kept (lower error), bias corrected"
        info.update(errors, kernel_error=kernel_error, sequential=how)
        if math.isfinite(after):
            info["relative_error"] = after
    log.info(
        "sequential fit %s: output error %.4g (the layer fitted on dense inputs: %.4g; %s)",
        name,
        after,
        before,
        "refit" if pick == 0 else "first fit kept",
    )
    set_module(model, name, module)
    return module, errors


def _in_place_ready(shadow: nn.Module, names: Sequence[str]) -> bool:
    """Whether every layer of ``names`` in ``shadow`` is a plain ``nn.Conv2d`` whose weight and
    bias a refit's dense equivalent can be copied into during a pass."""
    return all(type(shadow.get_submodule(n)) is nn.Conv2d for n in names)


def _refit_in_one_pass(
    shadow: nn.Module,
    dense: nn.Module,
    order: Sequence[str],
    inputs: Sequence[torch.Tensor],
    dense_inputs: dict[str, list[torch.Tensor]],
    refit_layer: Callable[[str, PairedStatistics], nn.Module | None],
) -> None:
    """Every refit from one pass of ``shadow`` over all ``inputs`` at once: at a layer's first
    call a pre-hook takes its input, refits it and copies the refit's kernel and bias into the
    shadow's conv, so the pass goes on through the refitted layer and every later layer sees
    the inputs the multi-pass route (one pass per layer) would record. The statistics take the
    inputs batch by batch, as that route does: the same patches."""
    sizes = [x.shape[0] for x in inputs]
    done: set[str] = set()

    def hook(module: nn.Module, args: tuple, name: str) -> None:
        if name in done:
            return
        done.add(name)
        conv = _dense_conv(dense, name)
        paired = PairedStatistics(conv.weight, PATCH_LIMIT, MAX_PATCHES)
        for x_seen, x_dense in zip(args[0].split(sizes), dense_inputs[name], strict=True):
            paired.update(conv, x_seen, x_dense)
        replacement = refit_layer(name, paired)
        if replacement is None:
            return
        _copy_conv(module, replacement)

    handles = [
        shadow.get_submodule(n).register_forward_pre_hook(partial(hook, name=n)) for n in order
    ]
    try:
        with _EvalNoGrad(shadow):
            shadow(torch.cat(list(inputs)))
    finally:
        for h in handles:
            h.remove()


def _copy_conv(target: nn.Module, source: nn.Module) -> None:
    """``source``'s weight and bias into the conv ``target`` of the same shapes, in place."""
    with torch.no_grad():
        target.weight.copy_(source.weight)  # type: ignore[operator]
        if target.bias is not None:  # type: ignore[union-attr]
            target.bias.copy_(source.bias)  # type: ignore[union-attr,operator]


def _dense_equivalent(module: nn.Module) -> nn.Module:
    to_dense = getattr(module, "to_dense", None)
    return to_dense() if callable(to_dense) else module


def _densified(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose factorized layers are dense layers of their kernels."""
    shadow = plain_copy(model)
    for name, module in list(shadow.named_modules()):
        if name and callable(getattr(module, "to_dense", None)):
            set_module(shadow, name, _dense_equivalent(module))
    return shadow


def _kernel_of(module: nn.Module) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return module.weight.detach()
    to_tensor = getattr(module, "to_tensor", None)
    if to_tensor is None:
        raise TypeError(f"cannot read the kernel of a {type(module).__name__}")
    return to_tensor().detach()


def _with_corrected_bias(
    paired: PairedStatistics, conv: nn.Conv2d, module: nn.Module
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``module``'s kernel, its corrected bias (None where the dense conv or the module has
    none) and its error on the paired inputs with that bias."""
    fitted = _kernel_of(module)
    if conv.bias is None or getattr(module, "bias", None) is None:
        return fitted, None, paired.output_error(fitted)
    bias = paired.target_bias(conv.bias, fitted)
    return fitted, bias, paired.output_error(fitted, bias - conv.bias.detach())


def _layer_error(paired: PairedStatistics, conv: nn.Conv2d, module: nn.Module) -> float:
    fitted = _kernel_of(module)
    bias = getattr(module, "bias", None)
    shift = None
    if conv.bias is not None and bias is not None:
        shift = bias.detach() - conv.bias.detach()
    return paired.output_error(fitted, shift)
