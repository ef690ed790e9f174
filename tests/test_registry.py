"""The registry: lookup, registration rules and entry-point plugins."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import tnconv
from tnconv.errors import PluginLoadError, RegistrationError, UnknownMethodError
from tnconv.registry import ENTRY_POINT_GROUP


def test_builtins_are_available() -> None:
    names = tnconv.available()
    assert names == sorted(names)
    assert {"cp", "tucker", "tt", "tr"} <= set(names)


def test_get_returns_fresh_named_instances(method: str) -> None:
    a, b = tnconv.get(method), tnconv.get(method.upper())
    assert isinstance(a, tnconv.Decomposition)
    assert a is not b and type(a) is type(b)
    assert a.name == method


@pytest.mark.parametrize(
    "prelude",
    [
        "from tnconv.registry import available",
        "import tnconv.decompositions.tt; from tnconv import available",
        "from tnconv.decompositions.tr import TR; from tnconv.registry import available",
    ],
)
def test_available_does_not_depend_on_import_order(prelude: str) -> None:
    code = f"{prelude}; print(','.join(available()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().split(",") == tnconv.available()


class _Scaled(tnconv.Decomposition):
    """A trivial method for registration tests: the kernel itself as a single factor."""

    rank_order = "(1,)"

    def bond_ranks(self, rank, shape):
        return (1,)

    def num_params_at(self, shape, ranks):
        return shape[0] * shape[1] * shape[2] * shape[3]

    def fit(self, weight, ranks, options):
        return self.make([weight.clone()], "tshw->tshw", tuple(weight.shape), (1,))


@pytest.fixture
def registered() -> Iterator[str]:
    tnconv.register("test-dense", _Scaled)
    yield "test-dense"
    tnconv.unregister("test-dense")


def test_register_and_use(registered: str) -> None:
    assert registered in tnconv.available()
    w = torch.randn(4, 3, 3, 3)
    f = tnconv.get(registered).factorize(w, 1)
    assert f.method == registered
    assert f.relative_error(w) == 0.0
    tnconv.register(registered, _Scaled)  # same class again: no-op


def test_register_rules(registered: str) -> None:
    class Other(_Scaled):
        pass

    with pytest.raises(RegistrationError, match="already registered"):
        tnconv.register(registered, Other)
    tnconv.register(registered, Other, override=True)
    assert type(tnconv.get(registered)) is Other
    with pytest.raises(RegistrationError, match=r"not a tnconv\.Decomposition"):
        tnconv.register("not-a-method", int)
    with pytest.raises(RegistrationError, match="bad decomposition name"):
        tnconv.register("has space", _Scaled)

    class Incomplete(tnconv.Decomposition):
        pass

    with pytest.raises(RegistrationError, match="lacks"):
        tnconv.register("incomplete", Incomplete)
    with pytest.raises(UnknownMethodError):
        tnconv.unregister("never-registered")


def test_decorator_form() -> None:
    @tnconv.register("test-decorated")
    class Decorated(_Scaled):
        pass

    try:
        assert type(tnconv.get("test-decorated")) is Decorated
        assert Decorated.name == "test-decorated"
    finally:
        tnconv.unregister("test-decorated")


def _make_distribution(root: Path, dist: str, module: str, source: str, entry: str) -> None:
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry}\n")
    (info / "RECORD").write_text("")


PLUGIN_SOURCE = """
    import torch
    import tnconv

    class Rank1(tnconv.Decomposition):
        '''Best rank-1 approximation of the (T, S*kh*kw) unfolding, as two factors.'''

        rank_order = "(1,)"

        def bond_ranks(self, rank, shape):
            return (1,)

        def num_params_at(self, shape, ranks):
            return shape[0] + shape[1] * shape[2] * shape[3]

        def fit(self, weight, ranks, options):
            t, s, kh, kw = weight.shape
            u, sv, vh = torch.linalg.svd(weight.reshape(t, -1), full_matrices=False)
            a = u[:, :1] * sv[:1]
            b = vh[:1].reshape(1, s, kh, kw)
            return self.make([a, b], "tr,rshw->tshw", (t, s, kh, kw), (1,))
"""


@pytest.fixture
def plugin_path(tmp_path: Path) -> Iterator[Path]:
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    sys.path.remove(str(tmp_path))
    importlib.invalidate_caches()
    for name in ("rank-one", "broken-plugin"):
        if name in tnconv.registry.registry._classes:
            tnconv.unregister(name)
        tnconv.registry.registry._broken.pop(name, None)
    for mod in ("tnconv_test_plugin", "tnconv_broken_plugin"):
        sys.modules.pop(mod, None)


def test_entry_point_plugin_is_discovered(plugin_path: Path) -> None:
    _make_distribution(
        plugin_path,
        "tnconv_test_plugin",
        "tnconv_test_plugin",
        PLUGIN_SOURCE,
        "rank-one = tnconv_test_plugin:Rank1",
    )
    # nobody imports the plugin: `get` finds it through the entry point
    assert "tnconv_test_plugin" not in sys.modules
    dec = tnconv.get("rank-one")
    assert "rank-one" in tnconv.available()
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    f = dec.factorize(w, 1)
    assert f.method == "rank-one"
    layer = tnconv.FactorizedConv2d(f, padding=1)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), torch.nn.functional.conv2d(x, f.to_tensor(), padding=1))


def test_entry_point_plugin_gets_derived_entries(plugin_path: Path) -> None:
    _make_distribution(
        plugin_path,
        "tnconv_test_plugin",
        "tnconv_test_plugin",
        PLUGIN_SOURCE,
        "rank-one = tnconv_test_plugin:Rank1",
    )
    # the first lookup of the derived name finds the base through its entry point
    assert "tnconv_test_plugin" not in sys.modules
    dec = tnconv.get("admm-rank-one")
    assert dec.training_time and "admm-rank-one" in tnconv.available(kind="derived")
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(
        dec.factorize(w, 1).to_tensor(), tnconv.get("rank-one").factorize(w, 1).to_tensor()
    )


def test_broken_plugin_is_reported_not_fatal(plugin_path: Path) -> None:
    _make_distribution(
        plugin_path,
        "tnconv_broken_plugin",
        "tnconv_broken_plugin",
        "raise RuntimeError('boom')\n",
        "broken-plugin = tnconv_broken_plugin:Nothing",
    )
    tnconv.refresh()
    assert "cp" in tnconv.available()  # the others still work
    with pytest.raises(PluginLoadError, match="boom"):
        tnconv.get("broken-plugin")
