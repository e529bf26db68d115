"""The one fallback policy: a failing build becomes a recorded :class:`BuildFailure`.

With ``FALLBACK_ON_OPTIMIZATION_ERROR=false`` the failure is raised instead, as an
:class:`~uniopt.errors.OptimizationError` whose ``__cause__`` is the original exception. A step
refused for memory (:class:`~uniopt.errors.MemoryBudgetError`) is always recorded: nothing failed.
"""

from __future__ import annotations

import logging
from collections.abc import Generator
from typing import Any

from ..errors import MemoryBudgetError, OptimizationError, UniOptError
from .candidate import BuildFailure
from .hookspecs import hookimpl

log = logging.getLogger("uniopt")


@hookimpl(wrapper=True, tryfirst=True)
def uniopt_build_stage(candidate: Any, component: Any, context: Any) -> Generator[None, Any, Any]:
    try:
        return (yield)
    except Exception as exc:
        reason = str(exc) if isinstance(exc, UniOptError) else f"{type(exc).__name__}: {exc}"
        reason = reason.strip().splitlines()[0][:300] if reason.strip() else type(exc).__name__
        if not context.settings.fallback_on_optimization_error and not isinstance(exc, MemoryBudgetError):
            raise OptimizationError(component.name, candidate.name, reason) from exc
        log.info("%s for %s failed, keeping the previous stage: %s", candidate.name, component.name, reason)
        return BuildFailure(candidate.name, reason, exc)
