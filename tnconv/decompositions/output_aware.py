"""Output-aware factorization for every method: a change of variables on the kernel's modes.

With input statistics (:class:`tnconv.statistics.InputStatistics`) the output error of a kernel
error dW is modelled as ``||dW x_S P_S x_h P_h x_w P_w||`` with P the symmetric square roots of
the input patches' (damped) mode-wise second moments. So a method fits the *whitened* kernel
``W~ = W x_S P_S x_h P_h x_w P_w`` by its own algebra (rank, eps and ratio searches included),
and each factor that carries a whitened index gets that mode's inverse ``P^-1`` back. This
needs nothing from a method but its equation: an index of the S / kh / kw modes sits in exactly
one factor, which absorbs the inverse, so the result has the method's own network and size.

* S mode as one index (cp, tucker, tt, tr, rsdtr, tc): the channel moment exactly.
* S mode split into two indices in different factors (the semi-tensor family's ``(j, a)``): the
  nearest Kronecker product ``C_S ~ C_j x C_a`` (Van Loan and Pitsianis) gives one matrix per
  index; three or more indices are left unwhitened (the spatial modes still are).
* The weight-only fit at the same ranks is computed too and kept when its output error (exact,
  with the patch moment when the statistics have it) is lower, so output-aware is never worse
  than weight-only at equal size.
* ``eps`` bounds the Kronecker model of the output error; where the statistics keep the patch
  moment the exact error is checked too and the model's bound tightened (up to four refits)
  until the exact output error meets ``eps``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Any

import torch

from ..factorization import Factorization, parse_equation
from ..rank import ErrorBound
from ..statistics import DAMPING, CalibrationDataError, InputStatistics, symmetric_sqrt, whiten

if TYPE_CHECKING:
    from .base import Decomposition

Whitening = dict[str, tuple[torch.Tensor, torch.Tensor]]  # output index -> (P, P^-1)
_EPS_RETRIES = 4  # tightened eps fits when the exact output error misses eps

__all__ = ["factorize", "polish"]

log = logging.getLogger(__name__)


def factorize(
    dec: Decomposition,
    w: torch.Tensor,
    w64: torch.Tensor,
    spec: Any,
    opts: Any,
    stats: InputStatistics,
    memo: dict[str, Any],
) -> Factorization:
    """The output-aware factorization of ``w`` (T, S, kh, kw) under ``spec`` (see the module
    docstring). ``memo``: a dict kept across calls on the same kernel and statistics (the
    whitened kernels, so their spectra are shared by every spec of a ladder)."""
    shape = tuple(int(n) for n in w.shape)
    if (stats.channels, *stats.kernel_size) != shape[1:]:
        raise CalibrationDataError(
            f"statistics of {stats.channels} channels and kernel {stats.kernel_size} for a "
            f"kernel of shape {shape}"
        )
    out = _factorize_once(dec, w, w64, spec, opts, stats, memo)
    if isinstance(spec, ErrorBound) and stats.patch is not None:
        # eps bounds the Kronecker model of the output error; with the patch moment the exact
        # error is known, so tighten the model's bound until the exact one holds too
        target = spec.eps
        for _ in range(_EPS_RETRIES):
            exact = out.info["relative_error"]
            if exact <= spec.eps:
                break
            target *= 0.98 * spec.eps / exact
            out = _factorize_once(dec, w, w64, ErrorBound(eps=target), opts, stats, memo)
        if out.info["relative_error"] > spec.eps:
            log.warning(
                "%s: output error %.4g above eps=%s after %d tightened fits",
                dec.name,
                out.info["relative_error"],
                spec.eps,
                _EPS_RETRIES,
            )
    return out


def _factorize_once(
    dec: Decomposition,
    w: torch.Tensor,
    w64: torch.Tensor,
    spec: Any,
    opts: Any,
    stats: InputStatistics,
    memo: dict[str, Any],
) -> Factorization:
    (ps, ps_inv), (ph, ph_inv), (pw, pw_inv) = _marginal_whitening(stats, memo)
    base: Whitening = {"S": (ps, ps_inv), "h": (ph, ph_inv), "w": (pw, pw_inv)}
    whitened = _fit_whitened(dec, w, w64, spec, opts, stats, memo, base, None)
    if whitened is None:  # the S mode is split across factors: one matrix per index
        probe = memo["probe"]
        whitened = _fit_whitened(dec, w, w64, spec, opts, stats, memo, base, probe)
    assert whitened is not None
    result, how = whitened
    # the weight-only fit at the same ranks, kept when its output error is lower
    plain = dec._finish(dec.fit(w64, result.ranks, opts), w, w64)
    errors = [_output_error(f, w64, stats, memo) for f in (result, plain)]
    out = result if errors[0] <= errors[1] else plain
    out.info = dict(out.info)
    out.info["kernel_error"] = out.info["relative_error"]  # what _finish measured
    out.info["relative_error"] = min(errors)
    out.info["weight_only_output_error"] = errors[1]
    out.info["output_aware"] = how if out is result else "weight-only fit had lower error"
    return out


def _marginal_whitening(
    stats: InputStatistics, memo: dict[str, Any]
) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    key = ("marginal", repr(stats))
    if key not in memo:
        memo[key] = stats.whitening()
    return memo[key]


def _fit_whitened(
    dec: Decomposition,
    w: torch.Tensor,
    w64: torch.Tensor,
    spec: Any,
    opts: Any,
    stats: InputStatistics,
    memo: dict[str, Any],
    base: Whitening,
    probe: Factorization | None,
) -> tuple[Factorization, str] | None:
    """Fit the whitened kernel and map the factors back; None when the S mode turned out split
    (``memo["probe"]`` then holds the fit that showed it)."""
    if probe is None:
        mats: Whitening = dict(base)
        how = "channel x rows x cols"
    else:
        mats, how = _split_whitening(probe, stats, base)
    key = ("kernel", repr(stats), tuple(sorted((k, tuple(v[0].shape)) for k, v in mats.items())))
    if key not in memo:
        memo[key] = _apply(w64, mats, probe)
    target64 = memo[key]
    fitted = dec._factorize(target64.to(w.dtype), target64, spec, opts)
    s_mode = fitted.modes[1] if fitted.modes is not None else "s"
    if probe is None and len(s_mode) != 1:
        memo["probe"] = fitted
        return None
    mapped = _unwhiten(fitted, mats, probe is not None)
    if mapped is None:
        return None
    result = dec._finish(mapped, w, w64)
    return result, how


def _split_whitening(
    probe: Factorization, stats: InputStatistics, base: Whitening
) -> tuple[Whitening, str]:
    """Per-index whitening of a split S mode: the nearest Kronecker product of two indices."""
    assert probe.modes is not None
    group = probe.modes[1]
    sizes = probe.index_sizes()
    mats: Whitening = {"h": base["h"], "w": base["w"]}
    if len(group) == 2:
        channel = stats.marginals()[0]
        left, right = _nearest_kronecker(channel, sizes[group[0]], sizes[group[1]])
        mats[group[0]] = symmetric_sqrt(left, DAMPING)
        mats[group[1]] = symmetric_sqrt(right, DAMPING)
        return mats, f"Kronecker channel ({group[0]} x {group[1]}) x rows x cols"
    return mats, "rows x cols (the channel mode is split in more than two indices)"


def _nearest_kronecker(c: torch.Tensor, n1: int, n2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A (n1, n1), B (n2, n2)`` minimising ``||C - A x B||`` (rank-one SVD of the
    rearrangement; Van Loan and Pitsianis 1993); both positive semi-definite for a PSD C."""
    r = c.reshape(n1, n2, n1, n2).permute(0, 2, 1, 3).reshape(n1 * n1, n2 * n2)
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    a = (u[:, 0] * math.sqrt(float(s[0]))).reshape(n1, n1)
    b = (vh[0] * math.sqrt(float(s[0]))).reshape(n2, n2)
    if float(torch.trace(a)) < 0:
        a, b = -a, -b
    return (a + a.T) / 2, (b + b.T) / 2


def _apply(w64: torch.Tensor, mats: Whitening, probe: Factorization | None) -> torch.Tensor:
    """The kernel with every mode / index of ``mats`` multiplied by its P."""
    t, s, kh, kw = w64.shape
    if probe is None:
        return whiten(w64, mats["S"][0], mats["h"][0], mats["w"][0]).contiguous()
    assert probe.modes is not None
    group = probe.modes[1]
    sizes = probe.index_sizes()
    x = w64.reshape(t, *[sizes[c] for c in group], kh, kw)
    axes = {c: 1 + k for k, c in enumerate(group)}
    axes["h"], axes["w"] = 1 + len(group), 2 + len(group)
    for index, (p, _) in mats.items():
        axis = axes[index]
        x = torch.movedim(torch.tensordot(x, p, dims=([axis], [0])), -1, axis)
    return x.reshape(t, s, kh, kw).contiguous()


def _unwhiten(f: Factorization, mats: Whitening, split: bool) -> Factorization | None:
    """``f`` with each whitened index's holder factor multiplied by P^-1 on that index."""
    inputs, _ = parse_equation(f.equation)
    assert f.modes is not None
    if not split:
        names = {f.modes[1]: mats["S"], f.modes[2]: mats["h"], f.modes[3]: mats["w"]}
    else:
        names = {
            **{c: v for c, v in mats.items() if c not in ("h", "w")},
            f.modes[2]: mats["h"],
            f.modes[3]: mats["w"],
        }
    factors = [x.detach().to(torch.float64) for x in f.factors]
    for index, (_, inverse) in names.items():
        holders = [k for k, term in enumerate(inputs) if index in term]
        if len(holders) != 1:
            return None
        k = holders[0]
        axis = inputs[k].index(index)
        factors[k] = torch.movedim(
            torch.tensordot(factors[k], inverse.to(factors[k].device), dims=([axis], [0])),
            -1,
            axis,
        )
    out = f.with_factors(factors)
    out.info = dict(f.info)
    return out


def _output_error(
    f: Factorization, w64: torch.Tensor, stats: InputStatistics, memo: dict[str, Any]
) -> float:
    """The relative output error of ``f`` (exact with the patch moment); the kernel's own
    output energy is computed once per kernel and statistics."""
    delta = f.to_tensor().detach().to(torch.float64) - w64
    if stats.patch is None:
        return stats.output_error(delta, w64)
    key = ("output energy", repr(stats), id(w64))
    if key not in memo:
        k = w64.reshape(w64.shape[0], -1)
        sigma = stats.patch.to(k.device)
        memo[key] = (float(((k @ sigma) * k).sum()), sigma)
    energy, sigma = memo[key]
    d = delta.reshape(delta.shape[0], -1)
    num = max(float(((d @ sigma) * d).sum()), 0.0)
    return math.sqrt(num / energy) if energy > 0 else (0.0 if num <= 0 else math.inf)


def polish(
    f: Factorization,
    target: torch.Tensor,
    moment: torch.Tensor,
    *,
    iterations: int = 50,
    damping: float = DAMPING,
) -> Factorization:
    """``f`` with its factors moved, by L-BFGS from where they are, to a lower exact output
    error ``tr((W' - W) M (W' - W)^T)`` against the kernel ``target`` W (T, S, kh, kw) under
    the patch moment ``moment`` M (S kh kw, S kh kw).

    The whitened fit weights the modes by a Kronecker product of marginal moments (and for a
    split channel mode by a nearest-Kronecker approximation of it); the full patch moment
    couples channels with positions, so a few quasi-Newton steps on the exact quadratic finish
    the fit. Generic: only the equation is differentiated. The result is never worse than
    ``f`` on this objective (``f`` itself is returned otherwise); ``info["polish"]`` holds the
    relative output error before and after.
    """
    if iterations <= 0:
        return f
    # ordinary tensors with autograd on, whatever the caller's mode (compress may run inside
    # inference_mode): the copies below are the only tensors the optimisation touches
    with torch.inference_mode(False), torch.enable_grad():
        result = _lbfgs_on_output_error(f, target, moment, iterations, damping)
    if result is None:
        return f
    factors, start, end = result
    out = dataclasses.replace(f, factors=[x.to(f.dtype) for x in factors], info=dict(f.info))
    out.info["polish"] = {"before": math.sqrt(max(start, 0.0)), "after": math.sqrt(max(end, 0.0))}
    return out


def _lbfgs_on_output_error(
    f: Factorization, target: torch.Tensor, moment: torch.Tensor, iterations: int, damping: float
) -> tuple[list[torch.Tensor], float, float] | None:
    """:func:`polish`'s optimisation: the factors, the objective before and after (relative
    to the target's own energy); None when it did not improve."""
    t = int(target.shape[0])
    goal = target.detach().to(torch.float64).reshape(t, -1).clone()
    m = moment.detach().to(torch.float64).clone()
    m = (m + m.T) / 2
    # damped as the whitening is: directions the calibration inputs barely reach keep W's
    # weight there instead of being fitted to noise
    m = m + damping * float(torch.trace(m)) / m.shape[0] * torch.eye(m.shape[0], dtype=m.dtype)
    scale = float(((goal @ m) * goal).sum())
    if not scale > 0:
        return None
    factors = [
        x.detach().to(torch.float64).clone(memory_format=torch.contiguous_format).requires_grad_()
        for x in f.factors
    ]

    def loss() -> torch.Tensor:
        gap = torch.einsum(f.equation, *factors).reshape(t, -1) - goal
        return ((gap @ m) * gap).sum() / scale

    with torch.no_grad():
        start = loss().item()
    opt = torch.optim.LBFGS(
        factors,
        max_iter=iterations,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        end = loss().item()
    if not math.isfinite(end) or end >= start:
        return None
    return [x.detach() for x in factors], start, end
