"""Safe files: ``tnconv.save`` writes safetensors + a JSON header; ``tnconv.load`` and the CLI
never unpickle what a file carries unless told to trust it (issue 21, item 2)."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import tnconv
from tnconv.cli import main
from tnconv.demo import DigitsNet
from tnconv.errors import LoadError, UntrustedFileError
from tnconv.io import _header_of, _weightless, read_header
from tnconv.models import CifarVGG, resnet20

# layer -> method: several methods in one compressed model
SPEC = {
    "body.0": {"rank": 3, "method": "tucker"},
    "body.2": {"rank": 3, "method": "tt"},
    "body.4": {"rank": 3, "method": "tr"},
    "body.6": {"rank": 3, "method": "cp"},
}
RESNET_SPEC = {
    "layer1.0.conv1": {"rank": 4, "method": "tucker"},
    "layer1.1.conv2": {"rank": 4, "method": "tt"},
    "layer2.0.conv2": {"rank": 4, "method": "tr"},
    "layer3.2.conv1": {"rank": 4, "method": "rsdtr"},
    "layer3.0.conv1": {"rank": 4, "method": "cp"},
}


class Net(nn.Module):
    """A user's own architecture (not shipped by tnconv): (B, 3, H, W) -> (B, 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 12, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(12, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.Conv2d(16, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, (3, 1), padding=(1, 0)),
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


def make_net() -> nn.Module:
    """The factory named as ``tests.test_safe_files:make_net``."""
    return Net()


def _compressed() -> nn.Module:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():  # non-trivial BN statistics
        net.body[3].running_mean.uniform_(-0.5, 0.5)
        net.body[3].running_var.uniform_(0.5, 2.0)
    # BN kept (not folded into body.2) so the file carries BN buffers too
    return tnconv.compress(net, None, spec=SPEC, input_size=(1, 3, 12, 12), fold_bn=False).eval()


class Payload:
    """Unpickling this writes ``marker``: stands for any code a hostile file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _payload_bytes(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    return buffer.getvalue()


def test_the_payload_is_real(tmp_path: Path) -> None:
    """Control: the payload the other tests use does run when unpickled without restriction."""
    marker = tmp_path / "ran"
    torch.load(io.BytesIO(_payload_bytes(marker)), weights_only=False)
    assert marker.read_text() == "ran"
    marker.unlink()
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def _save_v2(model: nn.Module, path: Path, architecture: bytes | None = None) -> None:
    """A file exactly as tnconv wrote it before format 3 (torch archive, pickled module)."""
    header = _header_of(model, tnconv.__version__).model_dump(mode="json")
    header["version"] = 2
    header.pop("architecture")
    if architecture is None:
        buffer = io.BytesIO()
        torch.save(_weightless(model), buffer)
        architecture = buffer.getvalue()
    payload = {
        "tnconv": header,
        "state_dict": model.state_dict(),
        "quantized_weights": {},
        "architecture": architecture,
    }
    torch.save(payload, path)


def _hostile_v3(tmp_path: Path, marker: Path) -> Path:
    """A format-3 file of a user model whose pickled architecture is the payload."""
    good = tmp_path / "good.tnconv"
    tnconv.save(_compressed(), good)
    with safe_open(str(good), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["__tnconv__.architecture"] = torch.frombuffer(
        bytearray(_payload_bytes(marker)), dtype=torch.uint8
    )
    path = tmp_path / "hostile.tnconv"
    save_file(tensors, str(path), metadata=metadata)
    return path


# -- hostile files are refused unexecuted ---------------------------------------------------------
def test_load_refuses_a_pickled_architecture_payload(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hostile = _hostile_v3(tmp_path, marker)
    with pytest.raises(UntrustedFileError, match="trusted=True"):
        tnconv.load(hostile)
    legacy = tmp_path / "hostile_v2.pt"
    _save_v2(_compressed(), legacy, architecture=_payload_bytes(marker))
    with pytest.raises(UntrustedFileError, match="trusted=True"):
        tnconv.load(legacy)
    assert not marker.exists()
    # the architecture given in the call is used; the file's pickle is never touched
    x = torch.randn(2, 3, 12, 12)
    for path in (hostile, legacy):
        again = tnconv.load(path, model=Net()).eval()
        assert torch.equal(again(x), _compressed()(x))
    assert not marker.exists()


def test_load_refuses_a_torch_file_whose_pickle_is_a_payload(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    whole = tmp_path / "whole.pt"
    whole.write_bytes(_payload_bytes(marker))
    header = _header_of(_compressed(), tnconv.__version__).model_dump(mode="json")
    header["version"] = 2
    header.pop("architecture")
    inner = tmp_path / "inner.pt"  # a tnconv-looking archive with the payload among its values
    torch.save({"tnconv": header, "state_dict": {}, "extra": Payload(marker)}, inner)
    for path in (whole, inner):
        with pytest.raises(LoadError, match="weights_only"):
            tnconv.load(path, model=Net())
        with pytest.raises(LoadError):
            tnconv.load(path, trusted=True)  # trust covers the architecture, not the archive
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["whole", "v3", "v2"])
def test_summary_cli_refuses_payloads(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "ran"
    if kind == "whole":
        path = tmp_path / "model.pt"
        path.write_bytes(_payload_bytes(marker))
    elif kind == "v3":
        path = _hostile_v3(tmp_path, marker)
    else:
        path = tmp_path / "hostile_v2.pt"
        _save_v2(_compressed(), path, architecture=_payload_bytes(marker))
    for command in (["summary", str(path)], ["compress", str(path), "-m", "tt", "--rank", "2"]):
        code = main([*command, "-o", str(tmp_path / "o")] if command[0] == "compress" else command)
        err = capsys.readouterr().err
        assert code == 2 and "--trust-file" in err
        assert len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_summary_cli_trust_file_means_what_it_says(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``--trust-file`` unpickles: documented as running the file's code, and it does."""
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    path.write_bytes(_payload_bytes(marker))
    assert main(["summary", str(path), "--trust-file"]) == 2  # not a module, after running
    assert marker.exists()
    assert "not a torch.nn.Module" in capsys.readouterr().err


# -- broken files are LoadErrors ------------------------------------------------------------------
def _good(tmp_path: Path) -> Path:
    path = tmp_path / "good.tnconv"
    tnconv.save(_compressed(), path)
    return path


def test_truncated_files(tmp_path: Path) -> None:
    good = _good(tmp_path)
    data = good.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    for n in (0, 5, 8, 9, header_end // 2, header_end, header_end + 10, len(data) - 1):
        cut = tmp_path / f"cut{n}"
        cut.write_bytes(data[:n])
        for kwargs in ({}, {"model": Net()}, {"trusted": True}):
            with pytest.raises(LoadError):
                tnconv.load(cut, **kwargs)
    legacy = tmp_path / "v2.pt"
    _save_v2(_compressed(), legacy)
    raw = legacy.read_bytes()
    for n in (10, len(raw) // 2, len(raw) - 20):
        cut = tmp_path / f"v2cut{n}"
        cut.write_bytes(raw[:n])
        with pytest.raises(LoadError):
            tnconv.load(cut, model=Net())


def _rewrite(src: Path, dst: Path, edit: object) -> Path:
    with safe_open(str(src), "pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    header = json.loads(metadata["tnconv"])
    edit(header, tensors)  # type: ignore[operator]
    metadata["tnconv"] = json.dumps(header)
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def _set(key: str, value: object) -> object:
    def edit(header: dict, tensors: dict) -> None:
        header[key] = value

    return edit


def test_corrupt_files(tmp_path: Path) -> None:
    good = _good(tmp_path)
    data = good.read_bytes()
    garbage = tmp_path / "garbage"
    garbage.write_bytes(bytes(range(256)) * 8)
    flipped = tmp_path / "flipped"  # a broken JSON header, same length
    flipped.write_bytes(data[:8] + b"[" + data[9:])
    renamed = tmp_path / "renamed"  # valid JSON, a field renamed inside the tnconv header
    text = data.replace(b'\\"layers\\"', b'\\"layerz\\"', 1)
    assert text != data
    renamed.write_bytes(text)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for path in (garbage, flipped, renamed, empty):
        with pytest.raises(LoadError):
            tnconv.load(path, model=Net())

    def bad_dtype(header: dict, tensors: dict) -> None:
        header["layers"][0]["dtype"] = "load"  # getattr(torch, ...) must not reach a function

    def bad_equation(header: dict, tensors: dict) -> None:
        header["layers"][0]["equation"] = "ab,bc->zz"

    def wrong_shape(header: dict, tensors: dict) -> None:
        tensors["head.weight"] = torch.zeros(5, 17)

    def stray_tensor(header: dict, tensors: dict) -> None:
        tensors["__tnconv__.something"] = torch.zeros(1)

    def hostile_architecture(header: dict, tensors: dict) -> None:
        header["architecture"] = {"name": "os", "kwargs": {}}

    def huge_architecture(header: dict, tensors: dict) -> None:
        header["architecture"] = {
            "name": "CifarResNet",
            "kwargs": {"blocks_per_stage": 10**9, "num_classes": 10, "widths": [16, 32, 64]},
        }

    def big_factors(header: dict, tensors: dict) -> None:  # 4 TB if built before checking
        header["layers"][0]["factor_shapes"][0] = [1 << 20, 1 << 20]

    edits = {
        "big_factors": big_factors,
        "dtype": bad_dtype,
        "equation": bad_equation,
        "shape": wrong_shape,
        "stray": stray_tensor,
        "hostile_arch": hostile_architecture,
        "huge_arch": huge_architecture,
        "extra_field": _set("evil", "x"),
        "no_layers": _set("layers", "x"),
    }
    for name, edit in edits.items():
        path = _rewrite(good, tmp_path / f"{name}.tnconv", edit)
        with pytest.raises(LoadError):
            tnconv.load(path, model=Net())
        if name.endswith("_arch"):
            with pytest.raises(LoadError):
                tnconv.load(path)
    plain = tmp_path / "weights.safetensors"  # safetensors, but no tnconv header
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(LoadError, match="not a tnconv save"):
        tnconv.load(plain, model=Net())


def test_a_recorded_architecture_larger_than_the_file_is_not_built(tmp_path: Path) -> None:
    """A valid header naming a shipped architecture far bigger than the tensors the file holds
    (here 64 GB of weights) is refused after a meta-device build, before any allocation."""
    path = tmp_path / "digits.tnconv"
    tnconv.save(DigitsNet(width=4), path, pickle_architecture=False)

    def wider(header: dict, tensors: dict) -> None:
        header["architecture"]["kwargs"]["width"] = 60000

    big = _rewrite(path, tmp_path / "big.tnconv", wider)
    with pytest.raises(LoadError, match="shape"):
        tnconv.load(big)
    assert tnconv.load(big, model=DigitsNet(width=4))  # model= makes the record moot


def test_wrong_versions(tmp_path: Path) -> None:
    good = _good(tmp_path)
    for version in (99, 2, 1, 0, "3", None):
        path = _rewrite(good, tmp_path / f"v{version}.tnconv", _set("version", version))
        with pytest.raises(LoadError, match="version"):
            tnconv.load(path, model=Net())
        with pytest.raises(LoadError, match="version"):
            read_header(path)
    header = _header_of(_compressed(), tnconv.__version__).model_dump(mode="json")
    for version in (3, 99):  # torch archives are versions 1 and 2 only
        legacy = tmp_path / f"legacy{version}.pt"
        torch.save({"tnconv": dict(header, version=version), "state_dict": {}}, legacy)
        with pytest.raises(LoadError, match="version"):
            tnconv.load(legacy, model=Net())


# -- round trips ----------------------------------------------------------------------------------
def test_round_trip_with_model_and_factories(tmp_path: Path) -> None:
    small = _compressed()
    methods = {m.method for m in small.modules() if isinstance(m, tnconv.FactorizedConv2d)}
    assert methods == {"tucker", "tt", "tr", "cp"}
    path = tmp_path / "small.tnconv"
    tnconv.save(small, path)
    x = torch.randn(3, 3, 12, 12)
    expected = small(x)
    fresh = Net()
    loaded = [
        tnconv.load(path, model=fresh),
        tnconv.load(path, model_fn=make_net),
        tnconv.load(path, model_fn="tests.test_safe_files:make_net"),
        tnconv.load(path, trusted=True),  # unpickles the architecture this test wrote
    ]
    for again in loaded:
        assert torch.equal(again.eval()(x), expected)
        assert tnconv.dense_reasons(again) == tnconv.dense_reasons(small)
        assert tnconv.summary(again).input_size == (1, 3, 12, 12)
    assert isinstance(fresh.body[0], nn.Conv2d)  # model= is not modified
    assert read_header(path).architecture is None  # not a shipped architecture
    with pytest.raises(UntrustedFileError):
        tnconv.load(path)
    # the file is plain safetensors: the weights are readable by any safetensors reader
    weights = load_file(str(path))
    assert torch.equal(weights["head.weight"], small.head.weight)
    assert torch.equal(weights["body.3.running_var"], small.body[3].running_var)


def test_factory_errors(tmp_path: Path) -> None:
    path = _good(tmp_path)
    for spec in ("no_colon", "tests.test_safe_files:missing", "no.such.module:f", ":f"):
        with pytest.raises(LoadError, match="model_fn"):
            tnconv.load(path, model_fn=spec)
    with pytest.raises(LoadError, match=r"not an nn\.Module"):
        tnconv.load(path, model_fn=lambda: 3)
    with pytest.raises(LoadError, match="not both"):
        tnconv.load(path, model=Net(), model_fn=make_net)
    with pytest.raises(LoadError, match="no module"):
        tnconv.load(path, model_fn=lambda: nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_without_pickled_architecture(tmp_path: Path) -> None:
    path = tmp_path / "lean.tnconv"
    tnconv.save(_compressed(), path, pickle_architecture=False)
    with safe_open(str(path), "pt") as f:
        assert "__tnconv__.architecture" not in set(f.keys())
    with pytest.raises(LoadError, match="model_fn") as info:
        tnconv.load(path, trusted=True)
    assert not isinstance(info.value, UntrustedFileError)
    x = torch.randn(1, 3, 12, 12)
    assert torch.equal(tnconv.load(path, model_fn=make_net).eval()(x), _compressed()(x))


@pytest.mark.parametrize(
    "build",
    [resnet20, lambda: DigitsNet(num_classes=7, width=8), lambda: CifarVGG((8, "M", 16, 16), 3)],
    ids=["resnet20", "digits", "vgg"],
)
def test_shipped_architectures_load_without_model(build, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build().eval()
    if isinstance(model, DigitsNet):
        spec = {"features.3": {"rank": 3, "method": "tt"}, "features.7": {"rank": 3}}
        x = torch.randn(2, 1, 12, 12)
    elif isinstance(model, CifarVGG):
        spec = {"features.4": {"rank": 3, "method": "tr"}, "features.7": {"rank": 3}}
        x = torch.randn(2, 3, 16, 16)
    else:
        spec = RESNET_SPEC
        x = torch.randn(2, 3, 32, 32)
    small = tnconv.compress(model, "tucker", spec=spec).eval()
    path = tmp_path / "shipped.tnconv"
    tnconv.save(small, path, pickle_architecture=False)
    header = read_header(path)
    assert header.architecture is not None
    assert header.architecture.name == type(model).__name__
    again = tnconv.load(path).eval()  # no model, no factory, no trust
    assert type(again) is type(model)
    assert torch.equal(again(x), small(x))


def test_a_modified_shipped_model_is_not_recorded(tmp_path: Path) -> None:
    model = resnet20()
    model.linear = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    path = tmp_path / "changed.tnconv"
    tnconv.save(model, path)
    assert read_header(path).architecture is None
    with pytest.raises(UntrustedFileError):
        tnconv.load(path)
    model.double()  # same modules, other dtype: rebuilding would silently cast
    tnconv.save(model, path)
    assert read_header(path).architecture is None


def test_quantized_shipped_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    small = tnconv.compress(resnet20().eval(), "tucker", spec=RESNET_SPEC).eval()
    x = torch.randn(2, 3, 32, 32)
    q = tnconv.quantize(small, 4, 8, calibration=[x]).eval()
    path = tmp_path / "q.tnconv"
    tnconv.save(q, path, pickle_architecture=False)
    assert read_header(path).architecture is not None
    assert torch.equal(tnconv.load(path).eval()(x), q(x))


def test_legacy_files_still_load(tmp_path: Path) -> None:
    small = _compressed()
    path = tmp_path / "old.pt"
    _save_v2(small, path)
    x = torch.randn(2, 3, 12, 12)
    with pytest.raises(UntrustedFileError, match="trusted=True"):
        tnconv.load(path)
    assert torch.equal(tnconv.load(path, trusted=True).eval()(x), small(x))
    assert torch.equal(tnconv.load(path, model=Net()).eval()(x), small(x))
    assert torch.equal(tnconv.load(path, model_fn=make_net).eval()(x), small(x))
    assert read_header(path).version == 2


# -- the command line -----------------------------------------------------------------------------
def test_cli_reads_safe_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    shipped = tmp_path / "resnet.tnconv"
    tnconv.save(tnconv.compress(resnet20(), "tt", spec=RESNET_SPEC), shipped)
    assert main(["summary", str(shipped), "--input-size", "1,3,32,32"]) == 0
    assert "layer2.0.conv2" in capsys.readouterr().out
    own = _good(tmp_path)
    assert main(["summary", str(own)]) == 2
    assert "--trust-file" in capsys.readouterr().err
    assert main(["summary", str(own), "--model", "tests.test_safe_files:make_net"]) == 0
    assert "body.4" in capsys.readouterr().out
    state = tmp_path / "state.safetensors"  # weights only, architecture from --model
    save_file(dict(Net().state_dict()), str(state))
    assert main(["summary", str(state)]) == 2
    assert "--model" in capsys.readouterr().err
    args = ["summary", str(state), "--model", "tests.test_safe_files:make_net"]
    assert main([*args, "--input-size", "1,3,12,12"]) == 0
    assert "body.0" in capsys.readouterr().out


def test_shared_and_strided_tensors_save(tmp_path: Path) -> None:
    """safetensors refuses tensors sharing memory: tied weights and views are written as copies
    and load back tied (into the given model) with the same values."""

    def tied() -> nn.Module:
        net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
        net[1].weight = net[0].weight
        return net

    model = tied()
    model.register_buffer("view", torch.arange(12.0).reshape(3, 4).t())  # non-contiguous
    path = tmp_path / "tied.tnconv"
    tnconv.save(model, path, pickle_architecture=False)

    def fresh() -> nn.Module:
        net = tied()
        net.register_buffer("view", torch.zeros(4, 3))
        return net

    again = tnconv.load(path, model_fn=fresh)
    assert again[1].weight is again[0].weight
    assert torch.equal(again[0].weight, model[0].weight)
    assert torch.equal(again.view, model.view)
