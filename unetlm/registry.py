"""Registries of named components, filled lazily by plugins.

An entry holds an import path ("package.module:Class"); the class is imported on first use,
so listing components or printing ``--help`` never imports torch-heavy modules.
"""
from __future__ import annotations

import difflib
import importlib

import attrs

KINDS = ("splitter", "pooler", "upsampler", "mixer")


class RegistryError(ValueError):
    """A component name is unknown, duplicated, or its import path is broken."""


@attrs.define
class Entry:
    kind: str
    name: str
    target: str
    description: str
    origin: str

    def load(self) -> type:
        module_name, _, attr = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
            return getattr(module, attr)
        except (ImportError, AttributeError) as exc:
            raise RegistryError(
                f"{self.kind} {self.name!r} from {self.origin} points at {self.target!r}, "
                f"which cannot be imported: {exc}"
            ) from exc


class Registry:
    """Maps (kind, name) to an :class:`Entry`. Plugins call :meth:`add` from their hook."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self.current_origin = "built-in"

    def add(self, kind: str, name: str, target: str, description: str) -> None:
        """Register component ``name`` of ``kind`` implemented at ``target`` ("module:Class")."""
        if kind not in self._entries:
            raise RegistryError(f"unknown component kind {kind!r}; allowed: {', '.join(KINDS)}")
        if ":" not in target:
            raise RegistryError(f"{kind} {name!r}: target {target!r} must look like 'module:Class'")
        existing = self._entries[kind].get(name)
        if existing is not None:
            raise RegistryError(
                f"{kind} {name!r} is registered twice: by {existing.origin} ({existing.target}) "
                f"and by {self.current_origin} ({target})"
            )
        self._entries[kind][name] = Entry(kind, name, target, description, self.current_origin)

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def entries(self, kind: str) -> list[Entry]:
        return [self._entries[kind][n] for n in self.names(kind)]

    def entry(self, kind: str, name: str) -> Entry:
        try:
            return self._entries[kind][name]
        except KeyError:
            raise RegistryError(unknown_name_message(kind, name, self.names(kind))) from None

    def get(self, kind: str, name: str) -> type:
        return self.entry(kind, name).load()


def unknown_name_message(kind: str, name: object, allowed: list[str]) -> str:
    close = difflib.get_close_matches(str(name), allowed, n=3)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return f"unknown {kind} {name!r}{hint} (registered: {', '.join(allowed) or 'none'})"
