"""The decomposition registry: ``register`` / ``get`` / ``available`` and plugin discovery.

Names are looked up lazily. The first query imports tnconv's built-in decomposition modules (whose
``@register`` decorators fill the table) and loads every entry point of the group
``tnconv.decompositions`` from installed distributions, so the answer never depends on which
modules a user happened to import first. An entry point may name a :class:`Decomposition`
subclass (``my-method = my_pkg.methods:MyMethod``, registered under the entry point's name) or a
module whose import registers its methods (``my_pkg = my_pkg.methods``).
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Iterable
from importlib import metadata
from types import ModuleType
from typing import Any, TypeVar

from .decompositions.base import Decomposition
from .errors import PluginLoadError, RegistrationError, UnknownMethodError

__all__ = [
    "ENTRY_POINT_GROUP",
    "Registry",
    "available",
    "get",
    "refresh",
    "register",
    "registry",
    "unregister",
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
)

_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")
# compress modes, not decompositions: compress(model, "auto") chooses a method per layer
RESERVED_NAMES = frozenset({"auto"})
D = TypeVar("D", bound=type[Decomposition])


class Registry:
    """A table of decomposition classes keyed by lower-case name, filled lazily."""

    def __init__(self, builtin_modules: Iterable[str], group: str) -> None:
        self._builtin_modules = tuple(builtin_modules)
        self._group = group
        self._classes: dict[str, type[Decomposition]] = {}
        self._broken: dict[str, PluginLoadError] = {}
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
            raise UnknownMethodError(self._unknown_message(name))
        del self._classes[key]

    # -- lookup ---------------------------------------------------------------------------------
    def available(self) -> list[str]:
        """Sorted names of every registered decomposition (built-ins and plugins)."""
        self._ensure_loaded()
        return sorted(self._classes)

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
        if key not in self._classes and key not in self._broken:
            self._load_entry_points()  # a plugin installed after the first lookup
        if key in self._broken:
            raise self._broken[key]
        if key not in self._classes:
            raise UnknownMethodError(self._unknown_message(name))
        instance = self._classes[key]()
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
        known = ", ".join(sorted(self._classes)) or "none"
        return f"unknown decomposition {name!r}; known: {known}"

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


def _qualname(cls: type) -> str:
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


def available() -> list[str]:
    """Sorted names of every registered decomposition."""
    return registry.available()


def get(name: str) -> Decomposition:
    """The decomposition registered as ``name``; unknown names raise a ``KeyError`` listing all."""
    return registry.get(name)


def refresh() -> None:
    """Re-scan installed plugins (after installing one into a running interpreter)."""
    registry.refresh()
