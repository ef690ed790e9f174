"""The decomposition registry: ``register`` / ``get`` / ``available`` and plugin discovery.

Names are looked up lazily. The first query imports tnconv's built-in decomposition modules (whose
``@register`` decorators fill the table) and loads every entry point of the group
``tnconv.decompositions`` from installed distributions, so the answer never depends on which
modules a user happened to import first. An entry point may name a :class:`Decomposition`
subclass (``my-method = my_pkg.methods:MyMethod``, registered under the entry point's name) or a
module whose import registers its methods (``my_pkg = my_pkg.methods``).

Derived families: :func:`register_derived` adds a prefix (``"admm"``) and a factory that turns a
base method's class into a new :class:`Decomposition`; ``<prefix>-<base>`` then exists for every
base method, plugins included, whenever they are registered. Derived classes are built on first
lookup and cached per base class. ``available(kind=...)`` lists base methods, derived ones or all.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Iterable
from importlib import metadata
from types import ModuleType
from typing import Any, Literal, TypeVar

from .decompositions.base import Decomposition
from .errors import PluginLoadError, RegistrationError, UnknownMethodError

__all__ = [
    "ENTRY_POINT_GROUP",
    "Registry",
    "available",
    "get",
    "refresh",
    "register",
    "register_derived",
    "registry",
    "unregister",
    "unregister_derived",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "tnconv.decompositions"

BUILTIN_MODULES: tuple[str, ...] = (
    "tnconv.decompositions.cp",
    "tnconv.decompositions.tucker",
    "tnconv.decompositions.tt",
    "tnconv.decompositions.tr",
    "tnconv.decompositions.rsdtr",
    "tnconv.decompositions.stp",
    "tnconv.decompositions.tc",
    "tnconv.decompositions.admm",  # derived family: admm-<base> for every base method
)

_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")
_PREFIX = re.compile(r"^[a-z][a-z0-9_]*$")  # no '-': "<prefix>-<base>" splits at the first one
# compress modes, not decompositions: compress(model, "auto") chooses a method per layer
RESERVED_NAMES = frozenset({"auto"})
D = TypeVar("D", bound=type[Decomposition])
# a derived family's factory: (base name, base class) -> the derived Decomposition subclass
DerivedFactory = Callable[[str, type[Decomposition]], type[Decomposition]]
Kind = Literal["all", "base", "derived"]


class Registry:
    """A table of decomposition classes keyed by lower-case name, filled lazily."""

    def __init__(self, builtin_modules: Iterable[str], group: str) -> None:
        self._builtin_modules = tuple(builtin_modules)
        self._group = group
        self._classes: dict[str, type[Decomposition]] = {}
        self._broken: dict[str, PluginLoadError] = {}
        self._derived: dict[str, DerivedFactory] = {}
        self._derived_classes: dict[tuple[str, type[Decomposition]], type[Decomposition]] = {}
        self._loaded = False

    # -- registration -------------------------------------------------------------------------
    def register(
        self, name: str, cls: type[Decomposition] | None = None, *, override: bool = False
    ) -> Any:
        """Register ``cls`` under ``name``; usable as ``@register("name")`` on a class.

        Re-registering the same class under the same name is a no-op; another class under a
        taken name raises :class:`RegistrationError` unless ``override=True``.
        """
        key = self._check_name(name)
        prefix = key.partition("-")[0]
        if "-" in key and prefix in self._derived:
            raise RegistrationError(
                f"cannot register {key!r}: names '{prefix}-...' belong to the derived family "
                f"{prefix!r} ({prefix}-<base> exists for every base method)"
            )

        def decorate(klass: D) -> D:
            if not (isinstance(klass, type) and issubclass(klass, Decomposition)):
                raise RegistrationError(
                    f"cannot register {klass!r} as {key!r}: not a tnconv.Decomposition subclass"
                )
            if getattr(klass, "__abstractmethods__", None):
                missing = ", ".join(sorted(klass.__abstractmethods__))
                raise RegistrationError(
                    f"cannot register {key!r}: {klass.__name__} lacks {missing}"
                )
            current = self._classes.get(key)
            if current is not None and current is not klass and not override:
                if _same_class(current, klass):  # a reloaded module re-registers its class
                    current = None
                else:
                    raise RegistrationError(
                        f"{key!r} is already registered to {_qualname(current)}; "
                        "pass override=True to replace it"
                    )
            if not klass.__dict__.get("name"):
                klass.name = key
            self._classes[key] = klass
            self._broken.pop(key, None)
            return klass

        return decorate if cls is None else decorate(cls)  # type: ignore[arg-type]

    def unregister(self, name: str) -> None:
        """Remove ``name`` (e.g. a test plugin). Unknown names raise :class:`UnknownMethodError`."""
        key = name.lower()
        self._ensure_loaded()
        if key not in self._classes:
            if self._split_derived(key) is not None:
                raise RegistrationError(
                    f"{key!r} is derived from the base method {self._split_derived(key)[1]!r}; "
                    "unregister the base method or the family (unregister_derived)"
                )
            raise UnknownMethodError(self._unknown_message(name))
        del self._classes[key]

    def register_derived(
        self, prefix: str, factory: DerivedFactory, *, override: bool = False
    ) -> None:
        """Make ``<prefix>-<base>`` available for every base method, present and future.

        ``factory(base_name, base_class)`` returns the derived :class:`Decomposition` subclass;
        it is called on the first lookup of each derived name and cached per base class.
        Raises :class:`RegistrationError` for a bad prefix (letters, digits, '_'), a prefix taken
        by another factory (unless ``override``), or one that a base method's name already uses.
        """
        key = prefix.lower() if isinstance(prefix, str) else prefix
        if not isinstance(key, str) or not _PREFIX.match(key):
            raise RegistrationError(
                f"bad derived prefix {prefix!r}: use letters, digits or '_', starting with a letter"
            )
        if not callable(factory):
            raise RegistrationError(f"derived family {key!r}: factory {factory!r} is not callable")
        current = self._derived.get(key)
        reloaded = current is not None and _same_class(current, factory)  # type: ignore[arg-type]
        if current is not None and current is not factory and not override and not reloaded:
            raise RegistrationError(
                f"derived prefix {key!r} is already registered; pass override=True to replace it"
            )
        clash = sorted(n for n in self._classes if n.startswith(key + "-"))
        if clash:
            raise RegistrationError(
                f"derived prefix {key!r} clashes with registered method(s) {', '.join(clash)}"
            )
        self._derived[key] = factory
        self._derived_classes = {k: v for k, v in self._derived_classes.items() if k[0] != key}

    def unregister_derived(self, prefix: str) -> None:
        """Remove a derived family; unknown prefixes raise :class:`UnknownMethodError`."""
        key = prefix.lower()
        if key not in self._derived:
            raise UnknownMethodError(f"no derived family {prefix!r}; known: {self.prefixes()}")
        del self._derived[key]
        self._derived_classes = {k: v for k, v in self._derived_classes.items() if k[0] != key}

    # -- lookup ---------------------------------------------------------------------------------
    def prefixes(self) -> list[str]:
        """The registered derived-family prefixes."""
        self._ensure_loaded()
        return sorted(self._derived)

    def available(self, kind: Kind = "all") -> list[str]:
        """Sorted names of the registered decompositions (built-ins and plugins).

        ``kind="all"`` (default): base methods and every derived ``<prefix>-<base>``;
        ``"base"``: only methods registered themselves (what a test over "every algebra" or a
        comparison of methods iterates); ``"derived"``: only the derived names.
        """
        if kind not in ("all", "base", "derived"):
            raise ValueError(f"kind must be 'all', 'base' or 'derived'; got {kind!r}")
        self._ensure_loaded()
        base = sorted(self._classes)
        derived = [f"{p}-{b}" for p in sorted(self._derived) for b in base]
        if kind == "base":
            return base
        if kind == "derived":
            return sorted(derived)
        return sorted(base + derived)

    def get(self, name: str) -> Decomposition:
        """A new instance of the decomposition registered as ``name`` (case-insensitive).

        Raises :class:`UnknownMethodError` (a ``KeyError``) listing the known names, or
        :class:`PluginLoadError` when a plugin of that name exists but failed to load.
        """
        if not isinstance(name, str):
            raise UnknownMethodError(
                f"method name must be a string; got {type(name).__name__}. "
                f"Known: {', '.join(self.available())}"
            )
        key = name.lower()
        self._ensure_loaded()
        base_key = key
        prefix, sep, rest = key.partition("-")
        if sep and prefix in self._derived:
            base_key = rest  # "<prefix>-<base>": look the base up like any name
        if base_key not in self._classes and base_key not in self._broken:
            self._load_entry_points()  # a plugin installed after the first lookup
        if base_key in self._broken:
            raise self._broken[base_key]
        if base_key not in self._classes:
            raise UnknownMethodError(self._unknown_message(name))
        cls = self._classes[key] if base_key == key else self._derived_class(prefix, base_key)
        instance = cls()
        instance.name = key
        return instance

    def refresh(self) -> None:
        """Scan the installed distributions' entry points again."""
        self._ensure_loaded()
        self._load_entry_points()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self.available()

    # -- internals --------------------------------------------------------------------------
    def _check_name(self, name: Any) -> str:
        if not isinstance(name, str) or not _NAME.match(name.lower()):
            raise RegistrationError(
                f"bad decomposition name {name!r}: use letters, digits, '-' or '_', "
                "starting with a letter"
            )
        if name.lower() in RESERVED_NAMES:
            raise RegistrationError(
                f"{name!r} is reserved: compress(model, {name.lower()!r}) chooses a method per "
                "layer; register the decomposition under another name"
            )
        return name.lower()

    def _unknown_message(self, name: str) -> str:
        known = ", ".join(self.available("base")) or "none"
        derived = self.available("derived")
        more = f"; derived: {', '.join(derived)}" if derived else ""
        return f"unknown decomposition {name!r}; known: {known}{more}"

    def _split_derived(self, key: str) -> tuple[str, str] | None:
        prefix, sep, base = key.partition("-")
        if sep and prefix in self._derived and base in self._classes:
            return prefix, base
        return None

    def _derived_class(self, prefix: str, base: str) -> type[Decomposition]:
        base_cls = self._classes[base]
        cached = self._derived_classes.get((prefix, base_cls))
        if cached is not None:
            return cached
        name = f"{prefix}-{base}"
        try:
            cls = self._derived[prefix](base, base_cls)
        except Exception as exc:
            raise RegistrationError(
                f"derived family {prefix!r} could not build {name!r}: {type(exc).__name__}: {exc}"
            ) from exc
        if not (isinstance(cls, type) and issubclass(cls, Decomposition)):
            raise RegistrationError(
                f"derived family {prefix!r} returned {cls!r} for {name!r}, not a Decomposition "
                "subclass"
            )
        if getattr(cls, "__abstractmethods__", None):
            missing = ", ".join(sorted(cls.__abstractmethods__))
            raise RegistrationError(f"derived {name!r}: {cls.__name__} lacks {missing}")
        self._derived_classes[(prefix, base_cls)] = cls
        return cls

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self._builtin_modules:
            importlib.import_module(module)
        self._load_entry_points()

    def _load_entry_points(self) -> None:
        for ep in metadata.entry_points(group=self._group):
            key = ep.name.lower()
            if key in self._classes:
                continue
            try:
                obj = ep.load()
                if isinstance(obj, type):
                    self.register(key, obj)
                elif not isinstance(obj, ModuleType):
                    raise RegistrationError(
                        f"entry point points to {type(obj).__name__}, not a Decomposition "
                        "subclass or a module"
                    )
                if key not in self._classes:
                    raise RegistrationError(f"loading {ep.value!r} registered nothing as {key!r}")
            except Exception as exc:
                error = PluginLoadError(
                    f"decomposition plugin {key!r} (entry point {ep.value!r} in group "
                    f"{self._group!r}) failed to load: {type(exc).__name__}: {exc}"
                )
                error.__cause__ = exc
                self._broken[key] = error
                log.warning("%s", error)


def _qualname(cls: Any) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _same_class(a: type, b: type) -> bool:
    return _qualname(a) == _qualname(b)


registry = Registry(BUILTIN_MODULES, ENTRY_POINT_GROUP)


def register(
    name: str, cls: type[Decomposition] | None = None, *, override: bool = False
) -> Callable[[D], D] | Any:
    """Register a :class:`Decomposition` subclass under ``name`` (decorator or direct call)."""
    return registry.register(name, cls, override=override)


def unregister(name: str) -> None:
    """Remove a registered decomposition."""
    registry.unregister(name)


def available(kind: Kind = "all") -> list[str]:
    """Sorted names of the registered decompositions: ``kind`` "all" (default), "base" (methods
    registered themselves) or "derived" (``<prefix>-<base>`` names of derived families)."""
    return registry.available(kind)


def register_derived(prefix: str, factory: DerivedFactory, *, override: bool = False) -> None:
    """Add a derived family: ``<prefix>-<base>`` for every base method (see the module doc)."""
    registry.register_derived(prefix, factory, override=override)


def unregister_derived(prefix: str) -> None:
    """Remove a derived family."""
    registry.unregister_derived(prefix)


def get(name: str) -> Decomposition:
    """The decomposition registered as ``name``; unknown names raise a ``KeyError`` listing all."""
    return registry.get(name)


def refresh() -> None:
    """Re-scan installed plugins (after installing one into a running interpreter)."""
    registry.refresh()
