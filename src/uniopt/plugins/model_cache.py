"""The process-wide model cache: a stage in use is built once per process.

Wrapping the same model twice, or from several threads, shares the built stage. Each key has its
own lock; the registry is re-checked once the lock is held, so two threads never build twice.
The registry holds stages weakly: a stage lives as long as an engine (or a report) uses it, and
a rejected candidate or a loser is freed as soon as the search lets go of it, instead of staying
resident until the process ends. The optimizer goes through :data:`model_cache` around every
``uniopt_build_stage`` call.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

from .candidate import Stage

__all__ = ["ModelCache", "model_cache", "stage_key"]


class ModelCache:
    """A thread-safe registry of the built stages still in use, keyed by component key and candidate settings."""

    def __init__(self) -> None:
        self._stages: weakref.WeakValueDictionary[str, Stage] = weakref.WeakValueDictionary()
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.builds = 0

    def lock_for(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def get_or_build(self, key: str, build: Callable[[], Any]) -> Any:
        """The stage under ``key``, built by ``build()`` once; a failed build is not kept."""
        stage = self._stages.get(key)
        if stage is not None:
            return stage
        with self.lock_for(key):
            stage = self._stages.get(key)
            if stage is not None:
                return stage
            result = build()
            if isinstance(result, Stage):
                self._stages[key] = result
                self.builds += 1
            return result

    def discard(self, key: str) -> None:
        """Forget the stage under ``key`` (its cached artifacts turned out to be corrupt)."""
        with self._guard:
            self._stages.pop(key, None)

    def clear(self) -> None:
        with self._guard:
            self._stages.clear()
            self._locks.clear()
            self.builds = 0

    def __len__(self) -> int:
        return len(self._stages)


#: The singleton.
model_cache = ModelCache()


def stage_key(candidate: Any, component: Any, context: Any) -> str:
    """What makes two builds the same: component, candidate, tier, threads, tolerances, compile mode, trial."""
    s = context.settings
    parts = [
        component.key(),
        candidate.name,
        context.tier.name,
        str(context.threads.intra_op),
        str(s.atol),
        str(s.rtol),
        s.compile_mode,
    ]
    if getattr(context, "trial", False):
        parts.append("trial")
    return "|".join(parts)
