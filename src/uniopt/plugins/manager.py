"""The plugin host: one pluggy PluginManager with the built-in and installed plugins.

Built-in plugins are the modules in :data:`DEFAULT_PLUGINS`; third-party plugins are found through
the ``uniopt.plugins`` entry-point group. Both go through the same registration. The
``UNIOPT_PLUGINS`` setting picks which load: unset loads all, a comma list loads those names,
an empty value loads none.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Iterable
from types import ModuleType

import pluggy

from ..errors import PluginError, SettingsError
from . import hookspecs
from .candidate import Candidate

__all__ = ["DEFAULT_PLUGINS", "ENTRY_POINT_GROUP", "candidates", "plugin_manager"]

ENTRY_POINT_GROUP = "uniopt.plugins"
log = logging.getLogger("uniopt")

#: Built-in plugins: (name, module).
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("build", "uniopt.plugins.build"),
    ("fallback", "uniopt.plugins.fallback"),
    ("warmup", "uniopt.plugins.warmup"),
    ("eager", "uniopt.plugins.eager"),
    ("torch_native", "uniopt.plugins.torch_native"),
    ("onnx_runtime", "uniopt.plugins.onnx_runtime"),
    ("onnxruntime_decode", "uniopt.plugins.onnxruntime_decode"),
    ("openvino", "uniopt.plugins.openvino_backend"),
    ("openvino_decode", "uniopt.plugins.openvino_decode"),
)


def _sources() -> list[tuple[str, str, object]]:
    """(name, origin, loader) for every plugin that could load, built-ins first."""
    found: list[tuple[str, str, object]] = [(name, "built-in", module) for name, module in DEFAULT_PLUGINS]
    builtin = {name for name, _ in DEFAULT_PLUGINS}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in builtin:
            log.warning("plugin entry point %r (%s) has a built-in plugin's name; it is not loaded", ep.name, ep.value)
            continue
        found.append((ep.name, f"entry point {ep.value}", ep))
    return found


def _load(loader: object) -> ModuleType | object:
    if isinstance(loader, str):
        return importlib.import_module(loader)
    return loader.load()  # type: ignore[attr-defined]


def plugin_origins() -> dict[str, str]:
    """Where each plugin that could load comes from: "built-in" or its entry point."""
    return {name: origin for name, origin, _ in _sources()}


def plugin_manager(selected: Iterable[str] | None = None) -> pluggy.PluginManager:
    """A fresh PluginManager with the selected plugins (None: every one found)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    sources = _sources()
    if selected is not None:
        selected = list(selected)
        missing = sorted(set(selected) - {name for name, _, _ in sources})
        if missing:
            names = ", ".join(name for name, _, _ in sources)
            raise SettingsError("UNIOPT_PLUGINS", ",".join(selected), f"names among: {names}")
    for name, origin, loader in sources:
        if selected is not None and name not in selected:
            continue
        try:
            plugin = _load(loader)
        except Exception as exc:
            raise PluginError(f"plugin {name!r} ({origin}) failed to load: {exc}") from exc
        pm.register(plugin, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from exc
    return pm


def candidates(pm: pluggy.PluginManager) -> dict[str, Candidate]:
    """Every candidate the loaded plugins register, by name; duplicates are an error."""
    found: dict[str, Candidate] = {}

    def register(candidate: Candidate) -> None:
        if not isinstance(candidate, Candidate):
            raise PluginError(f"register() takes a Candidate, got {type(candidate).__name__}")
        if candidate.name in found:
            raise PluginError(
                f"candidate {candidate.name!r} registered by both "
                f"{found[candidate.name].plugin!r} and {candidate.plugin!r}"
            )
        found[candidate.name] = candidate

    pm.hook.uniopt_register_candidates(register=register)
    return found
