"""Every hook a uniopt plugin can implement. Each spec's docstring is its documentation."""

from __future__ import annotations

from typing import Any

import pluggy

__all__ = ["PROJECT", "hookimpl", "hookspec"]

PROJECT = "uniopt"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def uniopt_register_candidates(register: Any) -> None:
    """Register the optimization candidates this plugin offers.

    Call ``register(candidate)`` once per :class:`uniopt.plugins.Candidate`. The host rejects a
    name registered twice with a :class:`uniopt.errors.PluginError`.
    """


@hookspec(firstresult=True)
def uniopt_build_stage(candidate: Any, component: Any, context: Any) -> Any:
    """Build the runnable stage of ``candidate`` for ``component``.

    The built-in implementation (``trylast``) calls ``candidate.build(component, context)``.
    A ``wrapper=True`` implementation may time, log or intercept every build.
    """


@hookspec
def uniopt_stage_ready(component: Any, stage: Any, context: Any) -> None:
    """Called once a stage has been built and validated, before it serves calls (warm-up)."""


@hookspec
def uniopt_doctor_advice(profile: Any, tier: Any, settings: Any, add: Any) -> None:
    """Add advice lines for ``optimize doctor``: call ``add(text)`` for each."""
