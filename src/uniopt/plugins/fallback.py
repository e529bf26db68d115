"""The one fallback policy, at build time and at run time.

A failing build becomes a recorded :class:`BuildFailure`; a candidate that does not apply to the
component (:class:`~uniopt.errors.NotApplicable`) is recorded as "not applicable" whatever the
settings say. A call an installed stage cannot take (an input outside its graph, a backend error)
runs eager for that call, is counted in the stage's :class:`RuntimeFallbacks` and logged once.
With ``FALLBACK_ON_OPTIMIZATION_ERROR=false`` both are raised instead, as an
:class:`~uniopt.errors.OptimizationError` whose ``__cause__`` is the original exception. A step
refused for memory (:class:`~uniopt.errors.MemoryBudgetError`) is always recorded: nothing failed.
A call that raises in a torch module stage and in the eager module alike is the caller's: the eager
module's error is raised, and nothing is counted.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import MemoryBudgetError, NotApplicable, OptimizationError, UniOptError
from .candidate import BuildFailure
from .hookspecs import hookimpl

__all__ = ["NOT_APPLICABLE", "EagerFallback", "ModuleFallback", "RuntimeFallbacks", "first_line", "runtime_fallbacks"]

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


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type's name when empty), at most 200 characters."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


class EagerFallback:
    """A stage's calls that run ``eager`` instead: counted in ``fallbacks``, raised inside :meth:`strict`.

    Stages that can refuse a call at run time (a graph, stateful decode steps, a torch module
    stage) derive from it and call :meth:`eager_instead` with the reason, or :meth:`eager_after`
    with the error the stage raised.
    """

    def __init__(self, name: str, eager: Callable[..., Any], candidate: str, allowed: bool) -> None:
        self.component_name = name
        self.fallbacks = RuntimeFallbacks(name, candidate, allowed)
        self._eager = eager
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

    def eager_after(self, error: Exception, *args: Any, **kwargs: Any) -> Any:
        """The eager module's output for a call the stage raised ``error`` on.

        When the eager module raises too, the call is the caller's (no module takes it): its error
        reaches the caller and nothing is counted. Otherwise the call is counted, or raised as
        :class:`~uniopt.errors.OptimizationError` when fallback is off; inside :meth:`strict` it is
        raised without running eager.
        """
        reason = f"{type(error).__name__}: {first_line(error)}"
        if getattr(self._local, "strict", False):
            raise OptimizationError(self.component_name, self.fallbacks.candidate, reason) from error
        outputs = self._eager(*args, **kwargs)
        self.fallbacks.record(reason, error)
        return outputs


class ModuleFallback(EagerFallback):
    """A torch module stage (int8, bf16, compiled) under the run-time policy.

    A call that raises inside ``module`` runs ``eager`` instead (:meth:`EagerFallback.eager_after`);
    uniopt's own errors (an engine's input checks) reach the caller as they would from eager.
    """

    def __init__(
        self, name: str, module: Callable[..., Any], eager: Callable[..., Any], candidate: str, allowed: bool
    ) -> None:
        super().__init__(name, eager, candidate, allowed)
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.module(*args, **kwargs)
        except UniOptError:
            raise
        except Exception as exc:  # a backend's errors are many; none reaches the engine's caller
            error = exc
        return self.eager_after(error, *args, **kwargs)  # outside the handler: eager's error stands alone


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
