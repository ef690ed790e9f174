"""Data-aware compression: input statistics, output-aware factorization for every method (checked
against F.conv2d on the calibration inputs), BN folding, compress(calibration=)."""

from __future__ import annotations

import copy

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import tnconv
from tnconv.bn_folding import conv_bn_pairs, fold_batchnorm
from tnconv.statistics import CalibrationDataError, InputStatistics, calibrate_inputs, conv_patches

from .conftest import METHODS, supports

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"cp": {"n_init": 1, "max_iter": 60}, "cp-stable": {"n_init": 1, "max_iter": 60}}


def correlated_inputs(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Inputs whose channels mix a few sources and whose pixels are smoothed: the strongly
    non-white statistics of real feature maps."""
    gen = torch.Generator().manual_seed(seed)
    sources = torch.randn(n, max(2, channels // 4), size, size, generator=gen, dtype=torch.float64)
    mix = torch.randn(channels, sources.shape[1], generator=gen, dtype=torch.float64)
    x = torch.einsum("sc,bchw->bshw", mix, sources)
    x = x + 0.05 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    return F.avg_pool2d(x, 3, 1, 1)


def conv_output_error(conv: nn.Conv2d, kernel: torch.Tensor, x: torch.Tensor) -> float:
    """The oracle: relative error of the layer's outputs (bias excluded) on ``x``."""
    args = (conv.stride, conv.padding, conv.dilation)
    ref = F.conv2d(x, conv.weight.detach(), None, *args)
    out = F.conv2d(x, kernel.detach().to(x.dtype), None, *args)
    return float((out - ref).norm() / ref.norm())


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
@given(
    k=st.sampled_from([(1, 1), (3, 3), (3, 1), (2, 3)]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    seed=st.integers(0, 1000),
)
def test_output_error_from_statistics_equals_the_conv_oracle(
    k: tuple[int, int], stride: int, padding: int, dilation: int, seed: int
) -> None:
    """With the patch moment, the predicted output error of any kernel error is the one
    F.conv2d measures on the calibration inputs (streamed over two batches)."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(5, 4, k, stride=stride, padding=padding, dilation=dilation).double()
    x = correlated_inputs(6, 5, 9, seed)
    stats = calibrate_inputs(nn.Sequential(conv), [x[:3], (x[3:], None)])["0"]
    assert stats.count == conv_patches(conv, x).shape[0]
    other = conv.weight.detach() + 0.3 * torch.randn_like(conv.weight)
    predicted = stats.output_error(other - conv.weight.detach(), conv.weight.detach())
    assert predicted == pytest.approx(conv_output_error(conv, other, x), rel=1e-9)
    # the marginals are partial traces of the patch moment
    s, kh, kw = 5, *conv.kernel_size
    patch = stats.patch.reshape(s, kh, kw, s, kh, kw)
    channel, rows, cols = stats.marginals()
    n = stats.count
    assert torch.allclose(channel, torch.einsum("ahwbhw->ab", patch) / (n * kh * kw))
    assert torch.allclose(rows, torch.einsum("sawsbw->ab", patch) / (n * s * kw))
    assert torch.allclose(cols, torch.einsum("shashb->ab", patch) / (n * s * kh))


@given(
    k=st.sampled_from([(1, 1), (3, 3), (3, 1), (2, 3)]),
    stride=st.sampled_from([1, 2, (2, 1)]),
    padding=st.sampled_from([0, 1, 2, "same"]),
    dilation=st.integers(1, 2),
    mode=st.sampled_from(["zeros", "reflect", "circular"]),
    seed=st.integers(0, 1000),
)
def test_sampled_patches_are_the_unfolded_ones(
    k: tuple[int, int], stride: object, padding: object, dilation: int, mode: str, seed: int
) -> None:
    """Patches gathered at chosen positions equal F.unfold's at those positions, and statistics
    kept from a subsample equal the subsample of all patches (max_patches)."""
    if padding == "same" and stride != 1:
        return  # (nn.Conv2d refuses 'same' with strides)
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 4, k, stride=stride, padding=padding, dilation=dilation, padding_mode=mode)
    x = torch.randn(3, 3, 8, 7)
    every = conv_patches(conv, x)
    pick = torch.randperm(every.shape[0])[: max(1, every.shape[0] // 3)]
    assert torch.equal(conv_patches(conv, x, pick), every[pick])
    stats = calibrate_inputs(nn.Sequential(conv), [x, x.flip(0)], max_patches=5)["0"]
    oracle = InputStatistics(3, conv.kernel_size, max_patches=5)
    oracle.update(every)
    oracle.update(conv_patches(conv, x.flip(0)))
    assert stats.count == oracle.count == min(5, every.shape[0]) * 2
    assert torch.equal(stats.channel, oracle.channel)
    assert torch.equal(stats.patch, oracle.patch)


def test_calibrate_inputs_errors_and_leaves_the_model_alone() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    model.train()
    before = copy.deepcopy(model.state_dict())
    stats = calibrate_inputs(model, torch.randn(2, 3, 6, 6))
    assert set(stats) == {"0", "3"} and model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(CalibrationDataError, match="empty"):
        calibrate_inputs(model, [])
    with pytest.raises(CalibrationDataError, match=r"no nn\.Conv2d named"):
        calibrate_inputs(model, [torch.randn(1, 3, 6, 6)], layers=["nope"])
    with pytest.raises(CalibrationDataError, match="tensor"):
        calibrate_inputs(model, ["not a tensor"])
    big = calibrate_inputs(model, [torch.randn(1, 3, 6, 6)], patch_limit=4)
    assert big["0"].patch is None and big["3"].patch is not None
    with pytest.raises(CalibrationDataError, match="statistics of"):
        tnconv.get("tucker").factorize(torch.randn(4, 5, 3, 3), 2, statistics=stats["0"])


# ---------------------------------------------------------------------------------------------
# output-aware factorization, every method
# ---------------------------------------------------------------------------------------------
def _fit(method: str, w: torch.Tensor, spec: dict, stats: InputStatistics | None = None):
    options = FAST.get(method, {})
    return tnconv.get(method).factorize(w, **spec, statistics=stats, **options)


@pytest.mark.parametrize("spec", [{"rank": 4}, {"ratio": 0.4}])
def test_identity_statistics_give_the_weight_only_fit(method: str, spec: dict) -> None:
    shape = (8, 8, 3, 3)
    if not supports(method, shape, spec.get("rank", 10**9)):
        pytest.skip(f"{method} takes no rank {spec}")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    f = _fit(method, w, spec, InputStatistics.identity(8, (3, 3)))
    g = _fit(method, w, spec)
    assert f.ranks == g.ranks
    assert torch.allclose(f.to_tensor(), g.to_tensor(), rtol=1e-3, atol=1e-3 * float(w.abs().max()))
    assert f.info["relative_error"] == pytest.approx(g.info["relative_error"], rel=1e-3)


@settings(max_examples=10)
@given(
    method=st.sampled_from(METHODS), seed=st.integers(0, 10_000), ratio=st.sampled_from([0.2, 0.4])
)
def test_output_aware_is_never_worse_than_weight_only(method: str, seed: int, ratio: float) -> None:
    """On the calibration inputs, measured with F.conv2d: the output-aware fit's output error is
    at most the weight-only fit's at the same ranks, and the reported error is the measured one."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(8, 12, 3, padding=1).double()
    x = correlated_inputs(8, 8, 8, seed)
    stats = calibrate_inputs(nn.Sequential(conv), [x])["0"]
    w = conv.weight.detach()
    f = _fit(method, w, {"ratio": ratio}, stats)
    plain = _fit(method, w, {"rank": f.ranks})
    aware_error = conv_output_error(conv, f.to_tensor(), x)
    assert aware_error <= conv_output_error(conv, plain.to_tensor(), x) * (1 + 1e-6) + 1e-12
    assert f.info["relative_error"] == pytest.approx(aware_error, rel=1e-6)
    assert f.num_params <= ratio * w.numel()


def test_output_aware_is_much_better_on_correlated_inputs(method: str) -> None:
    """What the feature is for: on inputs with few effective channels, fitting the outputs
    instead of the kernel cuts the output error at the same size (every method)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1).double()
    x = correlated_inputs(16, 16, 8, 0)
    stats = calibrate_inputs(nn.Sequential(conv), [x])["0"]
    f = _fit(method, conv.weight.detach(), {"ratio": 0.25}, stats)
    g = _fit(method, conv.weight.detach(), {"ratio": 0.25})
    aware, plain = (conv_output_error(conv, h.to_tensor(), x) for h in (f, g))
    assert aware < 0.9 * plain, (aware, plain, f.info["output_aware"])


@pytest.mark.parametrize("method", ["tucker", "tt", "tr", "rsdtr", "tc"])
def test_eps_bounds_the_exact_output_error_with_the_patch_moment(method: str) -> None:
    """With the patch moment kept, eps holds on the output error F.conv2d measures."""
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 16, 3, padding=1).double()
    x = correlated_inputs(16, 12, 8, 3)
    stats = calibrate_inputs(nn.Sequential(conv), [x])["0"]
    for eps in (0.2, 0.375, 0.5):
        f = _fit(method, conv.weight.detach(), {"eps": eps}, stats)
        assert conv_output_error(conv, f.to_tensor(), x) <= eps + 1e-9, (method, eps)


def test_eps_bounds_the_modelled_output_error() -> None:
    """Without the patch moment, eps bounds the Kronecker-model output error (error-bounded
    methods), and the layer gets fewer parameters than the weight-only fit at that eps."""
    conv = nn.Conv2d(16, 16, 3, padding=1).double()
    x = correlated_inputs(16, 16, 8, 1)
    stats = calibrate_inputs(nn.Sequential(conv), [x], patch_limit=0)["0"]
    for method in ("tucker", "tt", "tr", "rsdtr"):
        f = _fit(method, conv.weight.detach(), {"eps": 0.3}, stats)
        g = _fit(method, conv.weight.detach(), {"eps": 0.3})
        assert f.info["relative_error"] <= 0.3 + 1e-9
        assert f.num_params < g.num_params, method


# ---------------------------------------------------------------------------------------------
# BN folding and compress(calibration=)
# ---------------------------------------------------------------------------------------------
class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)) + h)
        return self.head(h.mean(dim=(2, 3)))


class Dynamic(nn.Sequential):
    """Does not trace (data-dependent control flow): folding falls back to Sequential order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self:
            x = m(x)
        if float(x.sum()) > 1e9:
            x = x * 0
        return x


def _trained_bn(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.normal_(0, 0.2, generator=gen)
    return model.eval()


@pytest.mark.parametrize("make", [Residual, lambda: Dynamic(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))])
def test_folding_is_exact_in_eval_and_still_trains(make) -> None:
    model = _trained_bn(make())
    x = torch.randn(4, 3, 8, 8)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # untouched
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-5)
    folded.train()
    opt = torch.optim.SGD(folded.parameters(), lr=0.01)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = folded(x).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_folding_skips_a_conv_whose_output_is_shared() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    assert conv_bn_pairs(Shared()) == []
    assert conv_bn_pairs(_trained_bn(Residual())) == [("conv1", "bn1"), ("conv2", "bn2")]


def test_compress_folds_with_calibration_in_eval_only_by_default() -> None:
    model = _trained_bn(Residual())
    x = torch.randn(4, 3, 8, 8)
    small = tnconv.compress(model, "tucker", ratio=0.5, layers=["conv2"], calibration=[x])
    # only the chosen layers' BNs: the rest of the model keeps its structure
    assert isinstance(small.bn2, nn.Identity) and isinstance(small.bn1, nn.BatchNorm2d)
    with torch.no_grad():
        x = torch.randn(2, 3, 8, 8)
        assert torch.allclose(
            tnconv.compress(model, "tucker", rank=8, layers=["conv2"], fold_bn=True)(x),
            model(x),
            atol=1e-5,
        )
    trained = tnconv.compress(model.train(), "tucker", ratio=0.5, layers=["conv2"], calibration=[x])
    assert isinstance(trained.bn2, nn.BatchNorm2d)
    model.eval()
    kept = tnconv.compress(
        model, "tucker", ratio=0.5, layers=["conv2"], calibration=[x], fold_bn=False
    )
    assert isinstance(kept.bn2, nn.BatchNorm2d)
    assert isinstance(
        tnconv.compress(model, "tucker", ratio=0.5, layers=["conv2"]).bn2, nn.BatchNorm2d
    )
    assert isinstance(
        tnconv.compress(model, "tucker", ratio=0.5, layers=["conv2"], fold_bn=True).bn2, nn.Identity
    )


@pytest.mark.parametrize("method", ["tucker", "tt", "rsdtr"])
def test_compress_with_calibration_fits_the_outputs(method: str) -> None:
    """Same budget, same layers: the calibrated model's logits on the calibration inputs are
    closer to the dense model's, and the dense model is untouched."""
    torch.manual_seed(0)
    model = _trained_bn(Residual())
    x = correlated_inputs(16, 3, 8, 2).float()
    before = copy.deepcopy(model.state_dict())
    plain = tnconv.compress(model, method, budget=0.3, layers=["conv2"])
    aware = tnconv.compress(model, method, budget=0.3, layers=["conv2"], calibration=[x])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        ref = model(x)
        err = [float((m(x) - ref).norm() / ref.norm()) for m in (plain, aware)]
    assert err[1] < err[0], err
    layer = aware.conv2
    assert "kernel_error" in layer.info and layer.info["output_aware"]
    assert sum(m.num_params for m in [layer]) <= 0.3 * layer.dense_params
    by_output = tnconv.compress(
        model, method, budget=0.3, layers=["conv2"], calibration=[x], allocate_by="output"
    )
    assert by_output.conv2.num_params <= 0.3 * layer.dense_params
    assert by_output.conv2.info["kernel_error"] >= 0
    with pytest.raises(ValueError, match="allocate_by"):
        tnconv.compress(model, method, budget=0.3, calibration=[x], allocate_by="bogus")


@pytest.mark.parametrize("method", ["str", "tucker", "tr"])
def test_the_per_layer_route_polishes_each_fit_on_its_inputs(method: str, monkeypatch) -> None:
    """``sequential=False``: each installed fit is finished by the polish on its layer's own
    inputs: same equation and ranks, output error (F.conv2d on the calibration inputs) no
    higher than without the polish, the polish recorded in ``info``."""
    import tnconv.sequential_fit as sf

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1, bias=False)
    model = nn.Sequential(conv).eval()
    x = correlated_inputs(12, 8, 8, 3).float()
    opts = dict(ratio=0.3, calibration=[x], sequential=False)
    polished = tnconv.compress(model, method, **opts)[0]
    monkeypatch.setattr(sf, "POLISH_ITERATIONS", 0)
    plain = tnconv.compress(model, method, **opts)[0]
    assert polished.factorization.equation == plain.factorization.equation
    assert polished.factorization.ranks == plain.factorization.ranks
    assert "polish" not in plain.info
    before, after = (conv_output_error(conv, m.to_tensor(), x) for m in (plain, polished))
    assert after <= before * (1 + 1e-6), (before, after)
    if "polish" in polished.info:  # absent where the polish could not improve the fit
        assert polished.info["polish"]["after"] < polished.info["polish"]["before"]
        assert after < before
        # the recorded error is the polished layer's, as F.conv2d measures it on the inputs
        assert polished.info["relative_error"] == pytest.approx(after, rel=1e-4)
    if method == "str":  # the split channel mode's Kronecker-whitened fit gains the most
        assert after < 0.8 * before, (before, after)


def test_a_folded_model_saves_and_loads_from_its_dense_architecture(tmp_path) -> None:
    model = _trained_bn(Residual())
    small = tnconv.compress(model, "tt", ratio=0.5, layers=["conv1", "conv2"], fold_bn=True)
    assert isinstance(small.bn1, nn.Identity) and small.conv1.bias is not None
    tnconv.save(small, tmp_path / "small.safetensors")
    back = tnconv.load(tmp_path / "small.safetensors", model=Residual()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(back(x), small(x))


def test_label_free_distillation_moves_the_student_to_the_teacher() -> None:
    """finetune(teacher=) on inputs alone (no labels anywhere): the compressed model's logits
    come closer to the dense model's; without a teacher, inputs alone are a typed error."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    teacher = _trained_bn(Residual())
    x = correlated_inputs(64, 3, 8, 5).float()
    student = tnconv.compress(teacher, "tt", ratio=0.2, layers=["conv1", "conv2"], fold_bn=True)
    loader = DataLoader(TensorDataset(x), batch_size=16)
    with torch.no_grad():
        before = float((student.eval()(x) - teacher(x)).norm())
    tnconv.finetune(student, loader, epochs=3, teacher=teacher, progress=False)
    with torch.no_grad():
        after = float((student.eval()(x) - teacher(x)).norm())
    assert after < 0.8 * before, (before, after)
    with pytest.raises(tnconv.LoaderError):
        tnconv.finetune(student, loader, epochs=1, progress=False)


def test_feature_map_hints_pull_each_layer_to_the_teachers() -> None:
    """finetune(teacher=, feature_maps=True): the factorized layers' outputs move closer to the
    teacher's (its BN folded where the student's was: equal in eval) than with the logits alone;
    hints need a teacher and layers both models have."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    teacher = _trained_bn(Residual())
    x = correlated_inputs(64, 3, 8, 5).float()
    student = tnconv.compress(teacher, "tt", ratio=0.2, layers=["conv1", "conv2"], fold_bn=True)
    reference = fold_batchnorm(teacher, convs=["conv1", "conv2"]).eval()
    loader = DataLoader(TensorDataset(x), batch_size=16)

    def gap(model: nn.Module) -> float:
        """Relative error of conv2's outputs against the folded teacher's, on x."""
        seen = {}
        hooks = [
            m.conv2.register_forward_hook(lambda mod, a, out, k=k: seen.__setitem__(k, out))
            for k, m in (("s", model), ("t", reference))
        ]
        with torch.no_grad():
            model.eval()(x), reference(x)
        for h in hooks:
            h.remove()
        return float((seen["s"] - seen["t"]).norm() / seen["t"].norm())

    runs = {}
    for hinted in (False, True):
        torch.manual_seed(1)
        s = copy.deepcopy(student)
        tnconv.finetune(s, loader, epochs=3, teacher=teacher, feature_maps=hinted, progress=False)
        runs[hinted] = gap(s)
    assert runs[True] < runs[False] and runs[True] < gap(student), (gap(student), runs)
    with pytest.raises(tnconv.OptionError, match="teacher"):
        tnconv.finetune(copy.deepcopy(student), loader, feature_maps=True, progress=False)
    with pytest.raises(tnconv.OptionError, match="not in both"):
        tnconv.finetune(
            copy.deepcopy(student), loader, teacher=teacher, feature_maps=["nope"], progress=False
        )
