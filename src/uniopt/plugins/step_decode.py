"""A decoder component's own loop over step runners, under the one run-time fallback policy.

Step-level backends (stateful OpenVINO models, ONNX Runtime sessions with the caches as inputs and
outputs) serve the steps of :class:`~uniopt.optimizer.steps.DecodeSteps`; :class:`StepDecode` is
the stage that runs the component's loop on them, whichever backend made the runners.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import UniOptError
from ..optimizer.steps import DecodeSteps, StepOrderError, StepRunner
from .fallback import EagerFallback, first_line

__all__ = ["StepDecode"]


class StepDecode(EagerFallback):
    """The component's decode loop over the runners ``make_runners()`` gives (by graph name).

    A call that fails inside (a step out of order, a backend error) runs the eager module for the
    whole call, counted in ``fallbacks``; inside :meth:`strict` (the guard) it raises. Each
    installation gets its own runners (:meth:`with_own_state`): two engines never share caches.
    """

    fixed_shapes = False

    def __init__(
        self,
        component: Any,
        steps: DecodeSteps,
        make_runners: Callable[[], Mapping[str, StepRunner]],
        candidate: str,
        allowed: bool,
    ) -> None:
        super().__init__(component.name, component.module, candidate, allowed)
        self._component = component
        self._steps = steps
        self._make_runners = make_runners
        self._loop = steps.install(make_runners())
        self._lock = threading.Lock()

    def with_own_state(self) -> StepDecode:
        """The same models with new runners (their own caches)."""
        allowed = self.fallbacks.allowed
        return StepDecode(self._component, self._steps, self._make_runners, self.fallbacks.candidate, allowed)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            with self._lock:  # one set of caches: calls of one installation run one at a time
                return self._loop(*args, **kwargs)
        except StepOrderError as exc:
            return self.eager_instead(str(exc), exc, *args, **kwargs)
        except UniOptError:
            raise  # the engine's own input errors reach its caller as they would from eager
        except Exception as exc:  # the backends' errors are many; none reaches the engine's caller
            return self.eager_instead(f"backend error: {first_line(exc)}", exc, *args, **kwargs)
