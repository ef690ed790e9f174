"""tnconv.analysis: cuts, spectra, entropies against explicit numpy unfoldings; truncate; sweep."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import tnconv
from tnconv import analysis
from tnconv.cli import main
from tnconv.errors import InvalidWeightError

from .conftest import REAL_3D, decaying_kernel


def explicit_unfolding(w: np.ndarray, cut: str) -> np.ndarray:
    """The matricisations written out by hand (independent of tnconv.analysis.matricize)."""
    t, s, h, k = w.shape
    if cut == "OUT":
        return w.reshape(t, s * h * k)
    if cut == "IN":
        return np.transpose(w, (1, 0, 2, 3)).reshape(s, t * h * k)
    if cut == "KH":
        return np.transpose(w, (2, 0, 1, 3)).reshape(h, t * s * k)
    if cut == "KW":
        return np.transpose(w, (3, 0, 1, 2)).reshape(k, t * s * h)
    if cut == "OUT,IN":
        return w.reshape(t * s, h * k)
    if cut == "OUT,KH":
        return np.transpose(w, (0, 2, 1, 3)).reshape(t * h, s * k)
    assert cut == "OUT,KW"
    return np.transpose(w, (0, 3, 1, 2)).reshape(t * k, s * h)


def check_cuts(w: np.ndarray) -> None:
    records = analysis.cuts(w)
    assert [c.name for c in records] == ["OUT", "IN", "KH", "KW", "OUT,IN", "OUT,KH", "OUT,KW"]
    total = float(np.sum(w.astype(np.float64) ** 2))
    for c in records:
        mat = explicit_unfolding(w.astype(np.float64), c.name)
        sv = np.linalg.svd(mat, compute_uv=False)
        assert c.matrix_shape == mat.shape
        np.testing.assert_allclose(c.singular_values, sv, rtol=1e-10, atol=1e-12 * sv[0])
        p = sv**2 / np.sum(sv**2)
        p = p[p > 0]
        assert c.entropy == pytest.approx(-np.sum(p * np.log(p)), abs=1e-10)
        # discarded[k]: the relative error of the explicit rank-k truncation (Eckart-Young)
        u, s, vh = np.linalg.svd(mat, full_matrices=False)
        for k in range(len(s) + 1):
            approx = (u[:, :k] * s[:k]) @ vh[:k]
            lost = np.linalg.norm(mat - approx) / math.sqrt(total)
            assert c.discarded[k] == pytest.approx(lost, abs=1e-9)
        assert c.discarded[0] == pytest.approx(1.0) and c.discarded[-1] == 0.0


@pytest.mark.parametrize("name", sorted(REAL_3D))
def test_cuts_match_explicit_unfoldings_on_trained_kernels(name: str) -> None:
    check_cuts(REAL_3D[name])


@given(
    shape=st.tuples(*(st.integers(1, 6) for _ in range(4))),
    seed=st.integers(0, 2**16),
)
def test_cuts_match_explicit_unfoldings(shape: tuple[int, ...], seed: int) -> None:
    check_cuts(np.random.default_rng(seed).standard_normal(shape))


def test_entropy_of_known_spectra() -> None:
    assert analysis.entropy([1.0]) == 0.0
    assert analysis.entropy([2.0, 2.0, 2.0, 2.0]) == pytest.approx(math.log(4))
    assert analysis.entropy([1.0, 0.0]) == 0.0
    # a rank-1 kernel has zero entropy on every cut
    a, b, c, d = (np.arange(1, n + 1, dtype=float) for n in (4, 3, 2, 5))
    rank1 = np.einsum("t,s,h,w->tshw", a, b, c, d)
    assert all(cut.entropy == pytest.approx(0.0, abs=1e-9) for cut in analysis.cuts(rank1))


@given(seed=st.integers(0, 2**16), shape=st.tuples(*(st.integers(1, 5) for _ in range(4))))
def test_hosvd_spectra_equal_single_mode_cuts(seed: int, shape: tuple[int, ...]) -> None:
    w = np.random.default_rng(seed).standard_normal(shape)
    spectra = analysis.hosvd_spectra(w)
    by_name = {c.name: c.singular_values for c in analysis.cuts(w)}
    for mode in ("OUT", "IN", "KH", "KW"):
        np.testing.assert_allclose(spectra[mode], by_name[mode], rtol=1e-9, atol=1e-9)


def test_rank_at() -> None:
    (cut,) = [c for c in analysis.cuts(decaying_kernel((8, 6, 3, 3), 0)) if c.name == "OUT"]
    for loss in (0.0, 0.05, 0.3, 1.0):
        k = cut.rank_at(loss)
        assert cut.discarded[k] <= loss + 1e-12
        assert k == 0 or cut.discarded[k - 1] > loss
    with pytest.raises(ValueError, match="loss"):
        cut.rank_at(1.5)


def test_bad_weight_and_cut() -> None:
    with pytest.raises(InvalidWeightError):
        analysis.cuts(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="unknown cut"):
        analysis.truncate_kernel(torch.ones(2, 2, 3, 3), "SIDEWAYS", 1)


# -- truncation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cut", analysis.CUTS)
def test_truncate_kernel_is_the_svd_truncation(cut: str) -> None:
    w = decaying_kernel((8, 6, 3, 3), 1)
    record = {c.name: c for c in analysis.cuts(w)}[cut]
    n = len(record.singular_values)
    for keep in (1, n // 2 or 1, n, 0.5):
        new, k, loss = analysis.truncate_kernel(w, cut, keep)
        assert new.shape == w.shape and new.dtype == w.dtype
        assert k == (keep if isinstance(keep, int) else max(1, round(keep * n)))
        mat = explicit_unfolding(new.numpy(), cut)
        assert np.linalg.matrix_rank(mat, tol=1e-8 * record.singular_values[0]) == k
        assert loss == pytest.approx(record.discarded[k], abs=1e-10)
        assert loss == pytest.approx(float((w - new).norm() / w.norm()), abs=1e-10)


def test_truncate_kernel_cp_and_bad_keeps() -> None:
    w = decaying_kernel((6, 5, 3, 3), 2)
    _, k, loss = analysis.truncate_kernel(w, "cp", 4, max_iter=50, n_init=1)
    f = tnconv.get("cp").factorize(w, 4, max_iter=50, n_init=1)
    assert k == 4 and loss == pytest.approx(f.relative_error(w), rel=1e-6)
    _, k_share, _ = analysis.truncate_kernel(w, "CP", 0.5, max_iter=20, n_init=1)
    assert k_share == math.floor(0.5 * w.numel() / sum(w.shape))
    for bad in (0, 7, 0.0, 1.5, float("nan"), True, "3"):
        with pytest.raises((ValueError, TypeError)):
            analysis.truncate_kernel(w, "OUT", bad)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))).mean(dim=(2, 3)))


def tiny() -> Tiny:
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.a.weight.copy_(decaying_kernel((8, 3, 3, 3), 3).float())
        model.b.weight.copy_(decaying_kernel((6, 8, 3, 3), 4).float())
    return model


def test_truncate_model_changes_only_selected_layers() -> None:
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = analysis.truncate(model, "OUT,KH", 0.5, layers=["b"])
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k])
    assert torch.equal(small.a.weight, model.a.weight)
    expected, k, loss = analysis.truncate_kernel(model.b.weight, "OUT,KH", 0.5)
    assert torch.allclose(small.b.weight, expected)
    assert analysis.truncation_record(small) == {"b": (k, loss)}
    x = torch.randn(2, 3, 7, 7)
    hidden = torch.relu(model.a(x))
    ref = F.conv2d(hidden, expected, None, padding=1)  # the oracle: conv on the truncated kernel
    assert torch.allclose(small.b(hidden), ref, atol=1e-5)


def test_sweep_rows_and_retraining() -> None:
    model = tiny()
    x = torch.randn(4, 3, 6, 6)
    dense_out = model(x).detach()
    calls = []

    def evaluate(m: nn.Module) -> float:  # negative output distance to the dense model
        return -float((m(x).detach() - dense_out).norm())

    def retrain(m: nn.Module) -> None:
        calls.append(m)
        with torch.no_grad():
            m.head.bias.add_(1.0)

    result = analysis.sweep(
        model,
        evaluate,
        ["OUT", "OUT,IN"],
        [1.0, 0.5],
        retrain,
        retrain_if=lambda r: r.keep == 0.5,
    )
    assert result.dense_metric == 0.0
    assert len(result.rows) == 3 * 2 * 2  # (a, b, all) x cuts x keeps
    assert {r.layer for r in result.rows} == {"a", "b", "all"}
    assert len(calls) == 6 and all(m is not model for m in calls)
    for r in result.rows:
        if r.keep == 1.0:  # the full rank: nothing lost, same outputs
            assert r.norm_loss == pytest.approx(0.0, abs=1e-6)
            assert r.metric == pytest.approx(0.0, abs=1e-4)
            assert math.isnan(r.metric_retrained)
        else:
            assert r.norm_loss > 0 and r.metric < 0 and not math.isnan(r.metric_retrained)
    # "all" loses the norm of both layers together
    (all_row,) = [r for r in result.rows if r.layer == "all" and r.cut == "OUT" and r.keep == 0.5]
    la = analysis.truncate_kernel(model.a.weight, "OUT", 0.5)[2]
    lb = analysis.truncate_kernel(model.b.weight, "OUT", 0.5)[2]
    na, nb = float(model.a.weight.norm() ** 2), float(model.b.weight.norm() ** 2)
    expected = math.sqrt((la**2 * na + lb**2 * nb) / (na + nb))
    assert all_row.norm_loss == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        analysis.sweep(model, evaluate, ["OUT"], [0.5], per_layer=False, together=False)


def test_layer_table_ranks_match_cuts() -> None:
    model = tiny()
    rows = analysis.layer_table(model)
    assert len(rows) == 2 * 7
    for row in rows:
        w = dict(model.named_modules())[row["layer"]].weight
        (cut,) = [c for c in analysis.cuts(w) if c.name == row["cut"]]
        assert row["rank_10pct"] == cut.rank_at(0.1)
        assert row["entropy"] == pytest.approx(cut.entropy)


def test_cli_analyze(tmp_path) -> None:
    from tnconv.demo import DigitsNet

    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    tnconv.save(DigitsNet(width=4), path)  # a shipped architecture: opens without trust
    out = tmp_path / "out"
    args = ["analyze", str(path), "--out", str(out), "--data", "sklearn", "--cuts", "OUT:KH"]
    assert main([*args, "--keeps", "0.5", "-q"]) == 0
    lines = (out / "cuts.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 * 7 and "rank_30pct" in lines[0]
    assert len((out / "sweep.csv").read_text().splitlines()) == 1 + 5  # 4 layers and "all"
    for png in ("spectra.png", "entropy.png", "sweep.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert main(["analyze", str(path), "--out", str(out), "--layers", "nope"]) == 2
