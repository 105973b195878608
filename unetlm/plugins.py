"""Plugin hooks (pluggy) and the process-wide registry they fill.

Third parties declare an entry point in the group ``unetlm`` whose module implements
:meth:`UnetlmSpec.unetlm_register`, marked with :data:`hookimpl`. The built-in components use
the very same path (``unetlm.builtins``), so the plugin machinery is exercised by every run.

Failure policy (docs/plugins.md): a plugin whose module cannot be imported, whose hook raises,
or that breaks the contract (unknown hook name, wrong hook arguments, no hook, a malformed
registration) is skipped and named in :data:`load_failures` (and on stderr), so recipes that
do not use it still load; a recipe naming a component nobody registered gets those failures
in its error. A component name that two plugins (or a plugin and a built-in) claim becomes
unusable: using it is an error naming both. :func:`register_plugin` (an explicit call)
raises :class:`PluginError` instead. Nothing here imports torch.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import sys

import pluggy

from unetlm.registry import NameTakenError, Registry, RegistryError

PROJECT = "unetlm"  # the pluggy project name and the entry-point group
BUILTINS = "unetlm.builtins"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class UnetlmSpec:
    """The hooks a plugin may implement."""

    @hookspec
    def unetlm_register(self, registry: Registry) -> None:
        """Register components with ``registry.add(kind, name, "module:Class", description)``.

        Do not import heavy modules here: the target is imported on first use.
        """


HOOKS = ("unetlm_register",)


class PluginError(RegistryError):
    """A plugin breaks the plugin contract; the message names the plugin."""


#: messages about plugins skipped by the most recent registry build
load_failures: list[str] = []

_registry: Registry | None = None
_manager: pluggy.PluginManager | None = None


def _make_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(UnetlmSpec)
    return manager


def _discover() -> list[tuple[str, object]]:
    """(origin, plugin module) for the entry-point group, built-ins first; import failures are reported."""
    builtins = None
    plugins: list[tuple[str, object]] = []
    eps = importlib.metadata.entry_points(group=PROJECT)
    found = [(ep.dist.name if ep.dist is not None else ep.name, ep) for ep in eps]
    for dist, ep in sorted(found, key=lambda item: (item[0], item[1].name)):
        if ep.value == BUILTINS:
            builtins = builtins or ep.load()
            continue
        origin = f"plugin {dist}"
        if any(o == origin for o, _ in plugins):  # a distribution with several entry points
            origin = f"{origin} ({ep.name})"
        try:
            plugins.append((origin, ep.load()))
        except Exception as exc:  # a broken plugin must not take the CLI down
            _report(f"{origin} (entry point {ep.name} = {ep.value}) failed to import: {exc!r}")
    if builtins is None:  # a source tree without installed metadata
        builtins = importlib.import_module(BUILTINS)
    return [("built-in", builtins), *plugins]


def _add_plugin(
    manager: pluggy.PluginManager, registry: Registry, plugin: object, origin: str, block_taken: bool = False
) -> None:
    """Register one plugin with pluggy, check its hooks, and run its ``unetlm_register``;
    ``block_taken``: a name it takes from another origin becomes unusable (:meth:`Registry.block`)."""
    if manager.is_registered(plugin):
        return
    try:
        manager.register(plugin, name=origin)
    except pluggy.PluginValidationError as exc:  # e.g. hook arguments not in the spec
        raise PluginError(f"{origin} has an invalid hook: {exc}") from None
    except ValueError as exc:  # a second plugin under the same origin name
        raise PluginError(f"{origin} cannot be registered: {exc}") from None
    try:
        manager.check_pending()
    except pluggy.PluginValidationError:
        unknown = [c.name for c in manager.get_hookcallers(plugin) or [] if not c.has_spec()]
        manager.unregister(plugin)
        raise PluginError(f"{origin} implements unknown hook(s) {_hook_hints(unknown)}") from None
    if not any(c.name in HOOKS for c in manager.get_hookcallers(plugin) or []):
        manager.unregister(plugin)
        raise PluginError(
            f"{origin} implements no hook: define `unetlm_register(registry)` in the entry-point "
            f"module and mark it with @unetlm.plugins.hookimpl"
        )
    others = [p for p in manager.get_plugins() if p is not plugin]
    call = manager.subset_hook_caller("unetlm_register", remove_plugins=others)
    registry.current_origin = origin
    try:
        call(registry=registry)
    except NameTakenError as exc:
        registry.drop_origin(origin)
        manager.unregister(plugin)
        if block_taken:
            registry.block(exc.kind, exc.name, str(exc))
        raise PluginError(str(exc)) from None
    except RegistryError as exc:  # a malformed registration
        registry.drop_origin(origin)
        manager.unregister(plugin)
        raise PluginError(str(exc)) from None
    except Exception as exc:
        registry.drop_origin(origin)
        manager.unregister(plugin)
        if origin == "built-in":
            raise
        _report(f"{origin} failed while registering its components: {exc!r}")
    finally:
        registry.current_origin = "built-in"


def _hook_hints(names: list[str]) -> str:
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, HOOKS, n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ", ".join(parts) + f"; the hooks are: {', '.join(HOOKS)}"


def _report(message: str) -> None:
    load_failures.append(message)
    print(f"unetlm: warning: {message}", file=sys.stderr)


def _build(extra_plugins: list[tuple[str, object]] | None) -> tuple[Registry, pluggy.PluginManager]:
    manager = _make_manager()
    registry = Registry()
    load_failures.clear()
    for origin, plugin in [*_discover(), *(extra_plugins or [])]:
        if origin == "built-in":
            _add_plugin(manager, registry, plugin, origin)
            continue
        try:
            _add_plugin(manager, registry, plugin, origin, block_taken=True)
        except PluginError as exc:  # recipes that do not use this plugin must still load
            _report(f"{exc} (not loaded)")
    registry.failures = list(load_failures)
    return registry, manager


def build_registry(extra_plugins: list[tuple[str, object]] | None = None) -> Registry:
    """A fresh registry from the entry-point group ``unetlm`` (built-ins first), then ``extra_plugins``
    given as (origin, plugin object) pairs. Skipped plugins are listed in :data:`load_failures`."""
    return _build(extra_plugins)[0]


def registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry, _manager
    if _registry is None:
        _registry, _manager = _build(None)
    return _registry


def register_plugin(plugin: object, origin: str | None = None) -> None:
    """Add a plugin (a module or object with a hookimpl) to the process-wide registry at run time.

    For scripts and tests that use a plugin without installing it; registering the same object
    again does nothing.
    """
    reg = registry()
    assert _manager is not None
    name = origin or f"plugin {getattr(plugin, '__name__', type(plugin).__name__)}"
    _add_plugin(_manager, reg, plugin, name)


def reset() -> None:
    """Forget the process-wide registry so that the next use reloads the entry points."""
    global _registry, _manager
    _registry = _manager = None
