"""The one fallback policy, at build time and at run time.

A failing build becomes a recorded :class:`BuildFailure`; a candidate that does not apply to the
component (:class:`~uniopt.errors.NotApplicable`) is recorded as "not applicable" whatever the
settings say. A call an installed stage cannot take (an input outside its graph, a backend error)
runs eager for that call, is counted in the stage's :class:`RuntimeFallbacks` and logged once.
With ``FALLBACK_ON_OPTIMIZATION_ERROR=false`` both are raised instead, as an
:class:`~uniopt.errors.OptimizationError` whose ``__cause__`` is the original exception. A step
refused for memory (:class:`~uniopt.errors.MemoryBudgetError`) is always recorded: nothing failed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import MemoryBudgetError, NotApplicable, OptimizationError, UniOptError
from .candidate import BuildFailure
from .hookspecs import hookimpl

__all__ = ["NOT_APPLICABLE", "EagerFallback", "RuntimeFallbacks", "runtime_fallbacks"]

log = logging.getLogger("uniopt")

#: How a :class:`BuildFailure` for a candidate that does not apply starts its reason.
NOT_APPLICABLE = "not applicable"


@dataclass
class RuntimeFallbacks:
    """The calls a stage could not take and ran eager instead: how many, and the last reason."""

    component: str
    candidate: str
    allowed: bool = True
    calls: int = 0
    last_reason: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, reason: str, error: BaseException | None) -> None:
        """Count one call that runs eager; raise instead when fallback is off."""
        if not self.allowed:
            raise OptimizationError(self.component, self.candidate, f"at run time: {reason}") from error
        with self._lock:
            self.calls += 1
            self.last_reason = reason
            first = self.calls == 1
        if first:
            log.warning("%s: %s cannot take a call (%s); running eager", self.component, self.candidate, reason)

    def to_dict(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "candidate": self.candidate,
            "calls": self.calls,
            "reason": self.last_reason,
        }


class EagerFallback:
    """A stage's calls that run the eager module instead: counted in ``fallbacks``, raised inside :meth:`strict`.

    Stages that can refuse a call at run time (a graph, stateful decode steps) derive from it and
    call :meth:`eager_instead` with the reason.
    """

    def __init__(self, component: Any, candidate: str, allowed: bool) -> None:
        self.component_name: str = component.name
        self.fallbacks = RuntimeFallbacks(component.name, candidate, allowed)
        self._eager = component.module
        self._local = threading.local()

    @contextlib.contextmanager
    def strict(self) -> Iterator[None]:
        """Raise :class:`~uniopt.errors.OptimizationError` instead of running eager (this thread only)."""
        before = getattr(self._local, "strict", False)
        self._local.strict = True
        try:
            yield
        finally:
            self._local.strict = before

    def eager_instead(self, reason: str, error: BaseException | None, *args: Any, **kwargs: Any) -> Any:
        """Run the eager module for this call (counted; raised when fallback is off or inside :meth:`strict`)."""
        if getattr(self._local, "strict", False):
            raise OptimizationError(self.component_name, self.fallbacks.candidate, reason) from error
        self.fallbacks.record(reason, error)
        return self._eager(*args, **kwargs)


def runtime_fallbacks(stage: Any) -> RuntimeFallbacks | None:
    """The run-time fallback counter of ``stage`` (a :class:`~uniopt.plugins.Stage`), if it keeps one."""
    found = getattr(getattr(stage, "run", None), "fallbacks", None)
    return found if isinstance(found, RuntimeFallbacks) else None


@hookimpl(wrapper=True, tryfirst=True)
def uniopt_build_stage(candidate: Any, component: Any, context: Any) -> Generator[None, Any, Any]:
    try:
        return (yield)
    except NotApplicable as exc:
        log.debug("%s does not apply to %s: %s", candidate.name, component.name, exc)
        return BuildFailure(candidate.name, f"{NOT_APPLICABLE}: {exc}", exc)
    except Exception as exc:
        reason = str(exc) if isinstance(exc, UniOptError) else f"{type(exc).__name__}: {exc}"
        reason = reason.strip().splitlines()[0][:300] if reason.strip() else type(exc).__name__
        if not context.settings.fallback_on_optimization_error and not isinstance(exc, MemoryBudgetError):
            raise OptimizationError(component.name, candidate.name, reason) from exc
        log.info("%s for %s failed, keeping the previous stage: %s", candidate.name, component.name, reason)
        return BuildFailure(candidate.name, reason, exc)
