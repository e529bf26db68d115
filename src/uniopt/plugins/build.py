"""The default build step: ask the candidate to build itself. Wrappers may surround it."""

from __future__ import annotations

from typing import Any

from .hookspecs import hookimpl


@hookimpl(trylast=True)
def uniopt_build_stage(candidate: Any, component: Any, context: Any) -> Any:
    return candidate.build(component, context)
