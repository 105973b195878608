"""Registries of named components, filled lazily by plugins.

An entry holds an import path ("package.module:Class"); the class is imported on first use,
so listing components or printing ``--help`` never imports torch-heavy modules. This module
imports neither torch nor numpy.
"""
from __future__ import annotations

import difflib
import importlib

import attrs

from unetlm.core.errors import UsageError

KINDS = ("splitter", "pooler", "upsampler", "mixer")

#: the class every component of a kind subclasses (checked when the component is loaded)
BASES = {
    "splitter": "unetlm.splitters.base:Splitter",
    "pooler": "unetlm.poolers.base:Pooler",
    "upsampler": "unetlm.upsamplers.base:Upsampler",
    "mixer": "unetlm.mixers.base:Mixer",
}


class RegistryError(UsageError):
    """A component name is unknown, duplicated, or its import path is broken."""


class NameTakenError(RegistryError):
    """A second registration of a (kind, name) pair."""

    def __init__(self, message: str, kind: str, name: str) -> None:
        super().__init__(message)
        self.kind, self.name = kind, name


def import_target(target: str) -> object:
    """The object named by ``"package.module:Attr"``."""
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


@attrs.define
class Entry:
    kind: str
    name: str
    target: str  # "package.module:Class"
    description: str
    origin: str  # "built-in" or "plugin <distribution>"

    def load(self) -> type:
        """Import the class and check that it is a component of this kind."""
        where = f"{self.kind} {self.name!r} from {self.origin}"
        try:
            cls = import_target(self.target)
        except (ImportError, AttributeError) as exc:
            raise RegistryError(f"{where} points at {self.target!r}, which cannot be imported: {exc}") from exc
        base = import_target(BASES[self.kind])
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise RegistryError(f"{where}: {self.target} is not a subclass of {BASES[self.kind].replace(':', '.')}")
        if not attrs.has(cls.Config):
            raise RegistryError(f"{where}: {self.target}.Config must be an attrs class (@attrs.define)")
        if not (isinstance(cls.examples, list) and cls.examples and all(isinstance(e, dict) for e in cls.examples)):
            raise RegistryError(f"{where}: {self.target}.examples must be a non-empty list of option tables")
        return cls


class Registry:
    """Maps (kind, name) to an :class:`Entry`. Plugins call :meth:`add` from their hook."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self.current_origin = "built-in"  # set by the plugin loader around each plugin's hook
        self._blocked: dict[tuple[str, str], str] = {}  # names two origins claimed -> why unusable
        self.failures: list[str] = []  # plugins that were not loaded (set by the plugin loader)
        self._trained_models: str | None = None  # "module:Class" of the reader of trained models
        self._trained_models_instance: object | None = None

    def add(self, kind: str, name: str, target: str, description: str) -> None:
        """Register component ``name`` of ``kind`` implemented at ``target`` ("module:Class")."""
        origin = self.current_origin
        if kind not in self._entries:
            raise RegistryError(f"{origin} registers {name!r} as unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise RegistryError(f"{origin} registers {kind} {name!r}: a name is a non-empty string without spaces")
        module_name, colon, attr = target.partition(":") if isinstance(target, str) else ("", "", "")
        if not (colon and module_name and attr):
            raise RegistryError(f"{origin} registers {kind} {name!r}: target {target!r} must look like 'module:Class'")
        existing = self._entries[kind].get(name)
        if existing is not None:
            raise NameTakenError(
                f"{kind} {name!r} is registered twice: by {existing.origin} ({existing.target}) "
                f"and by {origin} ({target}); uninstall one of them", kind, name,
            )
        self._entries[kind][name] = Entry(kind, name, target, str(description), origin)

    def set_trained_models(self, target: str) -> None:
        """Name the reader of trained models ("module:Class", with ``load(path, device)`` and
        ``files(path)``) that components needing a trained model (entropy splitters) use; the
        built-in registration sets it, once."""
        origin = self.current_origin
        if origin != "built-in" or self._trained_models is not None:
            raise RegistryError(f"{origin} sets the reader of trained models, which only the built-ins set, once")
        self._trained_models = target

    def trained_models(self) -> object:
        """The reader of trained models (imported and made on first use)."""
        if self._trained_models_instance is None:
            if self._trained_models is None:
                raise RegistryError("no reader of trained models is registered (the built-in registration sets it)")
            self._trained_models_instance = import_target(self._trained_models)()
        return self._trained_models_instance

    def drop_origin(self, origin: str) -> None:
        """Forget every entry ``origin`` added (a plugin whose hook failed half way)."""
        for table in self._entries.values():
            for name in [n for n, e in table.items() if e.origin == origin]:
                del table[name]

    def block(self, kind: str, name: str, reason: str) -> None:
        """Make ``name`` unusable: using it raises ``reason`` (two plugins claimed it, and picking
        one would silently change what a recipe gets)."""
        self._blocked[(kind, name)] = reason

    def blocked(self, kind: str, name: str) -> str | None:
        """Why ``name`` is unusable (two origins claimed it), or None."""
        return self._blocked.get((kind, name))

    def names(self, kind: str) -> list[str]:
        return sorted(self._table(kind))

    def entries(self, kind: str) -> list[Entry]:
        table = self._table(kind)
        return [table[n] for n in sorted(table)]

    def entry(self, kind: str, name: str) -> Entry:
        table = self._table(kind)
        if isinstance(name, str) and (kind, name) in self._blocked:
            raise RegistryError(self._blocked[(kind, name)])
        try:
            return table[name]
        except (KeyError, TypeError):
            message = unknown_name_message(kind, name, sorted(table))
            if self.failures:
                message += "; plugins that failed to load: " + "; ".join(self.failures)
            elif "did you mean" not in message:
                message += (f"; a {kind} that is not built in comes from a plugin: install the one "
                            f"that provides {name!r} (a checkpoint needs the plugins it was trained with)")
            raise RegistryError(message) from None

    def get(self, kind: str, name: str) -> type:
        """The component class (imported now, on first use)."""
        return self.entry(kind, name).load()

    def _table(self, kind: str) -> dict[str, Entry]:
        try:
            return self._entries[kind]
        except KeyError:
            raise RegistryError(f"unknown component kind {kind!r}; allowed: {', '.join(KINDS)}") from None


def unknown_name_message(kind: str, name: object, allowed: list[str]) -> str:
    close = difflib.get_close_matches(str(name), allowed, n=3)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"unknown {kind} {name!r}{hint} (registered: {', '.join(allowed) or 'none'})"
