"""Registries of named components, filled lazily by plugins.

An entry holds an import path ("package.module:Class"); the class is imported on first use,
so listing components or printing ``--help`` never imports torch-heavy modules. This module
imports neither torch nor numpy.
"""
from __future__ import annotations

import difflib
import importlib

import attrs

KINDS = ("splitter", "pooler", "upsampler", "mixer")

#: the class every component of a kind subclasses (checked when the component is loaded)
BASES = {
    "splitter": "unetlm.splitters.base:Splitter",
    "pooler": "unetlm.poolers.base:Pooler",
    "upsampler": "unetlm.upsamplers.base:Upsampler",
    "mixer": "unetlm.mixers.base:Mixer",
}


class RegistryError(ValueError):
    """A component name is unknown, duplicated, or its import path is broken."""


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
            raise RegistryError(
                f"{kind} {name!r} is registered twice: by {existing.origin} ({existing.target}) "
                f"and by {origin} ({target}); uninstall one of them"
            )
        self._entries[kind][name] = Entry(kind, name, target, str(description), origin)

    def drop_origin(self, origin: str) -> None:
        """Forget every entry ``origin`` added (a plugin whose hook failed half way)."""
        for table in self._entries.values():
            for name in [n for n, e in table.items() if e.origin == origin]:
                del table[name]

    def names(self, kind: str) -> list[str]:
        return sorted(self._table(kind))

    def entries(self, kind: str) -> list[Entry]:
        table = self._table(kind)
        return [table[n] for n in sorted(table)]

    def entry(self, kind: str, name: str) -> Entry:
        table = self._table(kind)
        try:
            return table[name]
        except (KeyError, TypeError):
            raise RegistryError(unknown_name_message(kind, name, sorted(table))) from None

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
