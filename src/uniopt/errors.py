"""Errors raised by uniopt.

Every error derives from :class:`UniOptError`, so ``except UniOptError`` catches them all::

    UniOptError
    ├── SettingsError          a setting has a value that is not allowed
    ├── InputError             bad input to an engine (dtype, shape, sample rate, NaN, empty audio)
    ├── PluginError            a plugin is broken: bad registration, duplicate name, unknown hook
    ├── BackendUnavailable     an optional backend (onnxruntime, openvino, nncf) is not installed
    ├── MemoryBudgetError      a build step would need more memory than the limit leaves
    │   └── StepKilledError    a build step's child process was killed (out of memory)
    ├── NotApplicable          a candidate does not apply to a component (no LSTM to quantize, no export)
    ├── OptimizationError      a candidate stage failed to build, load or run on this host
    │   └── ValidationError    a stage ran but disagrees with the FP32 reference
    └── CacheError             the artifact cache cannot be used (unwritable directory, ...)

A user's mistake raises with a message that says what to do. A plugin's failure on this host is
recorded as a fallback in the report; it is raised only when ``FALLBACK_ON_OPTIMIZATION_ERROR``
is false, as an :class:`OptimizationError` whose ``__cause__`` is the original exception. A
candidate that does not apply (:class:`NotApplicable`) is recorded whatever that setting says.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BackendUnavailable",
    "CacheError",
    "InputError",
    "MemoryBudgetError",
    "NotApplicable",
    "OptimizationError",
    "PluginError",
    "SettingsError",
    "StepKilledError",
    "UniOptError",
    "ValidationError",
]


class UniOptError(Exception):
    """Base class of every error uniopt raises."""


class SettingsError(UniOptError, ValueError):
    """A setting has a value that is not allowed; the message names the variable and the choices."""

    def __init__(self, variable: str, value: object, allowed: str, origin: str = "") -> None:
        self.variable = variable
        self.value = value
        self.allowed = allowed
        self.origin = origin
        where = f" (from {origin})" if origin else ""
        super().__init__(f"{variable}={value!r}{where} is not allowed: expected {allowed}")


class InputError(UniOptError, ValueError):
    """Input to an engine or component is malformed (dtype, shape, sample rate, NaN, empty)."""


class PluginError(UniOptError):
    """A plugin is malformed: duplicate candidate name, unknown hook, bad registration."""


class BackendUnavailable(UniOptError, ImportError):
    """An optional backend is not installed; the message names the pip extra that provides it."""

    def __init__(self, backend: str, extra: str, reason: str = "") -> None:
        self.backend = backend
        self.extra = extra
        detail = f" ({reason})" if reason else ""
        super().__init__(f"{backend} is not available{detail}; install it with: pip install 'uniopt[{extra}]'")


class MemoryBudgetError(UniOptError, MemoryError):
    """A build step was refused before it ran: its estimated peak does not fit the memory left.

    Recorded in the report as the candidate's reason (never raised to the engine's caller), so a
    small VM ends with another candidate or eager instead of a process killed by the OOM killer.
    """

    def __init__(self, step: str, needed_bytes: int, available: str) -> None:
        from .memory import format_bytes

        self.step = step
        self.needed_bytes = needed_bytes
        self.available = available
        super().__init__(f"{step} needs ~{format_bytes(needed_bytes)}, {available}")

    def __reduce__(self) -> Any:  # pickled back from a build step's child process (uniopt.isolation)
        return (type(self), (self.step, self.needed_bytes, self.available))


class StepKilledError(MemoryBudgetError):
    """A build step's child process was killed by the kernel (SIGKILL: the OOM killer under the limit)."""

    def __init__(self, step: str) -> None:
        self.step = step
        self.needed_bytes = 0
        self.available = ""
        UniOptError.__init__(self, f"{step} was killed by the kernel (SIGKILL), most likely out of memory")

    def __reduce__(self) -> Any:
        return (type(self), (self.step,))


class NotApplicable(UniOptError):
    """A candidate does not apply to this component; recorded as such, never raised to the caller."""


class OptimizationError(UniOptError):
    """A candidate stage failed to build, load or run; ``__cause__`` holds the original error."""

    def __init__(self, component: str, candidate: str, reason: str) -> None:
        self.component = component
        self.candidate = candidate
        self.reason = reason
        super().__init__(f"{candidate} failed for component {component!r}: {reason}")


class ValidationError(OptimizationError):
    """A stage ran but its outputs disagree with the FP32 reference beyond the guard."""


class CacheError(UniOptError, OSError):
    """The artifact cache cannot be used (for example its directory is not writable)."""
