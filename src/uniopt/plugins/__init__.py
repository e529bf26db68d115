"""The plugin host and the built-in plugins."""

from .candidate import BuildContext, BuildFailure, BuildStep, Candidate, Requirements, Stage, availability
from .hookspecs import hookimpl, hookspec
from .manager import DEFAULT_PLUGINS, ENTRY_POINT_GROUP, candidates, plugin_manager

__all__ = [
    "DEFAULT_PLUGINS",
    "ENTRY_POINT_GROUP",
    "BuildContext",
    "BuildFailure",
    "BuildStep",
    "Candidate",
    "Requirements",
    "Stage",
    "availability",
    "candidates",
    "hookimpl",
    "hookspec",
    "plugin_manager",
]
