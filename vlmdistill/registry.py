"""Plugin registry: explicit registration plus discovery through the `vlmdistill.plugins` entry points.

A third-party package adds a plugin by declaring, in its own pyproject.toml,

    [project.entry-points."vlmdistill.plugins"]
    myplugin = "mypackage.distill:MyPlugin"

where `MyPlugin` subclasses `vlmdistill.DistillationPlugin`.
"""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points

from .errors import UnknownPluginError

ENTRY_POINT_GROUP = "vlmdistill.plugins"

_registry: dict[str, type] = {}
_broken: dict[str, str] = {}  # entry-point name -> why it failed to load
_discovered = False


def register_plugin(plugin_class: type | None = None, *, name: str | None = None, overwrite: bool = False):
    """Register a `DistillationPlugin` subclass. Usable as `register_plugin(Cls)` or as a decorator."""

    def _register(cls: type) -> type:
        from .plugin import DistillationPlugin

        if not (isinstance(cls, type) and issubclass(cls, DistillationPlugin)):
            raise TypeError(f"{cls!r} is not a subclass of vlmdistill.DistillationPlugin")
        key = name or cls.name
        if not key:
            raise ValueError(f"{cls.__name__} has no `name`; pass register_plugin(..., name=...)")
        if key in _registry and _registry[key] is not cls and not overwrite:
            raise ValueError(f"a plugin named {key!r} is already registered ({_registry[key].__module__}); "
                             "pass overwrite=True to replace it")
        _registry[key] = cls
        return cls

    return _register(plugin_class) if plugin_class is not None else _register


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _registry:
            continue
        try:
            register_plugin(ep.load(), name=ep.name)
        except Exception as exc:  # a broken third-party plugin must not break the others
            _broken[ep.name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"vlmdistill plugin {ep.name!r} ({ep.value}) failed to load: {exc}", stacklevel=2)


def list_plugins() -> list[str]:
    """Names of all installed plugins, sorted."""
    _discover()
    return sorted(_registry)


def get_plugin(name: str) -> type:
    _discover()
    if name not in _registry:
        installed = ", ".join(sorted(_registry)) or "(none)"
        hint = f" It is installed but failed to load: {_broken[name]}." if name in _broken else ""
        raise UnknownPluginError(f"unknown plugin {name!r}.{hint} Installed plugins: {installed}")
    return _registry[name]
