"""Plugin hooks (pluggy) and the process-wide registry they fill.

Third parties declare an entry point in the group ``unetlm`` whose module implements
:func:`UnetlmSpec.unetlm_register`. The built-in components use the very same path
(``unetlm.builtins``), so the plugin machinery is exercised by every run.
"""
from __future__ import annotations

import importlib.metadata
import sys
from types import ModuleType

import pluggy

from unetlm.registry import Registry, RegistryError

PROJECT = "unetlm"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class UnetlmSpec:
    """The hooks a plugin may implement."""

    @hookspec
    def unetlm_register(self, registry: Registry) -> None:
        """Register components with ``registry.add(kind, name, "module:Class", description)``.

        Do not import heavy modules here: the target is imported on first use.
        """


class PluginLoadError(RuntimeError):
    pass


_registry: Registry | None = None
load_failures: list[str] = []


def _make_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(UnetlmSpec)
    return manager


def _register_plugin(manager: pluggy.PluginManager, registry: Registry, plugin: object, origin: str) -> None:
    """Register one plugin object and run its hook, attributing entries to ``origin``."""
    manager.register(plugin, name=origin)
    manager.check_pending()  # a misspelled hook name is an error, not silently ignored
    registry.current_origin = origin
    try:
        hook = getattr(plugin, "unetlm_register", None)
        if hook is None:
            raise PluginLoadError(f"plugin {origin} defines no unetlm_register hook")
        hook(registry=registry)
    finally:
        registry.current_origin = "built-in"


def build_registry(extra_plugins: list[tuple[str, object]] | None = None) -> Registry:
    """Load the entry-point group ``unetlm`` (built-ins included) and return a fresh registry.

    A plugin that fails to load is reported by name in :data:`load_failures` and on stderr,
    and the others still load. Two plugins claiming one component name is an error.
    """
    manager = _make_manager()
    registry = Registry()
    load_failures.clear()
    plugins: list[tuple[str, object]] = []
    eps = importlib.metadata.entry_points(group=PROJECT)
    seen_builtins = False
    for ep in sorted(eps, key=lambda e: (e.value != "unetlm.builtins", e.name)):
        if ep.value == "unetlm.builtins":
            if seen_builtins:
                continue
            seen_builtins = True
            plugins.append(("built-in", importlib.import_module("unetlm.builtins")))
            continue
        dist = ep.dist.name if ep.dist is not None else ep.name
        try:
            plugins.append((f"plugin {dist}", ep.load()))
        except Exception as exc:  # a broken plugin must not take the CLI down
            _report_failure(f"plugin {dist} (entry point {ep.name} = {ep.value}) failed to load: {exc!r}")
    if not seen_builtins:  # running from a source tree without installed metadata
        plugins.insert(0, ("built-in", importlib.import_module("unetlm.builtins")))
    plugins.extend(extra_plugins or [])
    for origin, plugin in plugins:
        try:
            _register_plugin(manager, registry, plugin, origin)
        except RegistryError:
            raise
        except pluggy.PluginValidationError as exc:
            _report_failure(f"{origin} is invalid: {exc}")
            manager.unregister(name=origin)
        except Exception as exc:
            _report_failure(f"{origin} failed while registering: {exc!r}")
    return registry


def _report_failure(message: str) -> None:
    load_failures.append(message)
    print(f"unetlm: warning: {message}", file=sys.stderr)


def registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    if _registry is None:
        _registry = build_registry()
    return _registry


def register_plugin(plugin: ModuleType | object, origin: str | None = None) -> None:
    """Add a plugin object at run time (for scripts and tests) to the process-wide registry."""
    reg = registry()
    name = origin or f"plugin {getattr(plugin, '__name__', type(plugin).__name__)}"
    manager = _make_manager()
    _register_plugin(manager, reg, plugin, name)


def reset() -> None:
    """Forget the process-wide registry so that the next use reloads the entry points."""
    global _registry
    _registry = None
