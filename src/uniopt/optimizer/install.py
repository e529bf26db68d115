"""Installing a stage in an engine's module: its own ``forward`` routes through the stage.

As accelerate's ``add_hook_to_module`` does, the module object stays (every attribute, method,
buffer and submodule); only its ``forward`` is replaced, by an :class:`Installation` that keeps
the original forward to fall back on and to put back (:meth:`Installation.remove`). Every path to
the module then uses the stage: ``module(x)``, ``module.forward(x)``, and any method of the module
or of the engine that calls either.

The stage is built from a :func:`twin` of the module (the same parameters and buffers, its own
object and unpatched ``forward``), so a stage that calls the module back (``torch.compile``, a graph
stage's eager fallback) never reaches the installed forward.
"""

from __future__ import annotations

import copy
import inspect
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from ..plugins import Stage
from ..plugins.fallback import ModuleFallback, RuntimeFallbacks

__all__ = ["Installation", "installation_of", "own_state", "twin"]

log = logging.getLogger("uniopt")

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


_LOCK = threading.Lock()  # installing and removing: one at a time, whatever the thread


def installation_of(module: torch.nn.Module) -> Installation | None:
    """The uniopt installation in ``module``'s forward, if there is one."""
    forward = module.__dict__.get("forward")
    return forward.installation if isinstance(forward, _Forward) else None


class _Forward:
    """The installed ``module.forward``: calls the installation; has the original's signature and name.

    A deep copy or a pickle of the module gets its class's own forward instead: the stage, and its
    state, stay with the module it was installed in.
    """

    def __init__(self, installation: Installation, original: Callable[..., Any]) -> None:
        self.installation = installation
        self.__wrapped__ = original
        self.__name__ = getattr(original, "__name__", "forward")
        self.__doc__ = getattr(original, "__doc__", None)
        try:
            self.__signature__: inspect.Signature | None = inspect.signature(original)
        except (TypeError, ValueError):
            self.__signature__ = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.installation.forward(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> _ClassForward:
        return _ClassForward(copy.deepcopy(self.installation.module, memo))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ClassForward, (self.installation.module,))


class _ClassForward:
    """A copied module's forward: its class's own."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)


def twin(module: torch.nn.Module) -> torch.nn.Module:
    """A second module object over the same parameters, buffers and submodules, with the class's forward.

    It has no hooks of its own (the user's hooks run once, around the installed forward).
    """
    clone = shallow_copy(module)
    if isinstance(clone.__dict__.get("forward"), (_Forward, _ClassForward)):
        del clone.__dict__["forward"]
    for name in _HOOK_DICTS:
        if name in module.__dict__:
            clone.__dict__[name] = type(module.__dict__[name])()
    return clone


def shallow_copy(module: torch.nn.Module) -> torch.nn.Module:
    """``copy.copy`` of a module, also of one with parametrizations (weight norm), which refuse pickling."""
    new = module.__class__.__new__(module.__class__)
    new.__dict__.update(module.__dict__)
    return new


def own_state(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` that shares its parameters and packed weights but owns its state.

    Buffers and tensor attributes are cloned, so a stage installed in two engines with equal
    weights keeps two states (a KV cache, a running statistic); parameters and opaque objects
    (packed int8 weights) are shared, as they are not changed by a forward.
    """
    memo: dict[int, torch.nn.Module] = {}

    def clone(node: torch.nn.Module) -> torch.nn.Module:
        if id(node) in memo:
            return memo[id(node)]
        new = shallow_copy(node)
        memo[id(node)] = new
        for key, value in node.__dict__.items():
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                new.__dict__[key] = value.clone()
        new.__dict__["_parameters"] = dict(node._parameters)
        new.__dict__["_buffers"] = {k: None if b is None else b.clone() for k, b in node._buffers.items()}
        new.__dict__["_modules"] = {k: None if m is None else clone(m) for k, m in node._modules.items()}
        return new

    return clone(module)


def _compiled_for(run: Any, module: torch.nn.Module) -> Any:
    """A ``torch.compile`` stage over ``module``: the same compiler settings on this engine's module."""
    from torch._dynamo.eval_frame import OptimizedModule

    if run._orig_mod is module:
        return run
    return OptimizedModule(module, run.dynamo_ctx)


def _is_compiled(run: Any) -> bool:
    return type(run).__name__ == "OptimizedModule" and hasattr(run, "_orig_mod")


class Installation:
    """One stage installed as ``module.forward``; counts its calls and the ones that ran eager.

    ``stage`` is ``None`` to keep the module's own forward (with performance logging, to time it).
    A stage that is an ``nn.Module`` takes any call the module takes; other stages take the
    component's ``input_count`` inputs, positionally or by the forward's parameter names; any other
    call (other keywords, a module put back in training mode) runs the original forward, counted in
    ``eager_reasons``. A module stage's call that raises runs the original forward through the
    run-time policy (:class:`~uniopt.plugins.fallback.ModuleFallback`; ``fallback`` is the
    ``FALLBACK_ON_OPTIMIZATION_ERROR`` setting).
    """

    def __init__(
        self,
        name: str,
        module: torch.nn.Module,
        stage: Stage | None,
        *,
        source: torch.nn.Module,
        input_count: int,
        timer: Callable[[str, float], None] | None = None,
        fallback: bool = True,
    ) -> None:
        self.name = name
        self.module = module
        self.candidate = "eager" if stage is None else stage.candidate
        self.calls = 0
        self.eager_reasons: Counter[str] = Counter()
        self._timer = timer
        self._input_count = input_count
        self._lock = threading.Lock()
        with _LOCK:
            previous = installation_of(module)
            if previous is not None:
                del module.__dict__["forward"]
            self._original: Callable[..., Any] = module.forward
            self._run, self._takes_keywords = self._runner(stage, source, fallback)
            forward = _Forward(self, self._original)
            self._signature = forward.__signature__
            module.__dict__["forward"] = forward

    def _runner(
        self, stage: Stage | None, source: torch.nn.Module, fallback: bool
    ) -> tuple[Callable[..., Any] | None, bool]:
        if stage is None or stage.run is source:
            return None, True
        run = stage.run
        if _is_compiled(run):
            return ModuleFallback(self.name, _compiled_for(run, source), self._original, self.candidate, fallback), True
        if isinstance(run, torch.nn.Module):
            return ModuleFallback(self.name, own_state(run), self._original, self.candidate, fallback), True
        own = getattr(run, "with_own_state", None)
        if callable(own):  # a stage keeping state outside PyTorch: its own copy of that state
            return own(), True
        return run, False

    @property
    def installed(self) -> bool:
        """Whether ``module.forward`` still routes through this installation."""
        return installation_of(self.module) is self

    @property
    def eager_calls(self) -> int:
        """Calls that ran the module's original forward although a stage is installed."""
        return sum(self.eager_reasons.values())

    def remove(self) -> None:
        """Put the module's original forward back (nothing happens if another one replaced it)."""
        with _LOCK:
            if self.installed:
                del self.module.__dict__["forward"]

    @property
    def fallbacks(self) -> RuntimeFallbacks | None:
        """The calls the stage could not take and ran eager instead, when the stage can refuse calls."""
        found = getattr(self._run, "fallbacks", None)
        return found if isinstance(found, RuntimeFallbacks) else None

    def stats(self) -> dict[str, Any]:
        """The stage, the calls it served, the ones that ran eager by reason, and the ones it could not take."""
        fallbacks = self.fallbacks
        return {
            "stage": self.candidate,
            "installed": self.installed,
            "calls": self.calls,
            "eager_calls": self.eager_calls,
            "eager_reasons": dict(self.eager_reasons),
            "fallback_calls": 0 if fallbacks is None else fallbacks.calls,
            "fallback_reason": "" if fallbacks is None else fallbacks.last_reason,
        }

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The module's forward, through the stage."""
        with self._lock:
            self.calls += 1
        if self._timer is None:
            return self._route(args, kwargs)
        started = time.perf_counter()
        try:
            return self._route(args, kwargs)
        finally:
            self._timer(self.name, time.perf_counter() - started)

    def _route(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._run is None:
            return self._original(*args, **kwargs)
        if self.module.training:
            return self._eager("module in training mode", args, kwargs)
        if self._takes_keywords:
            return self._run(*args, **kwargs)
        positional = self._positional(args, kwargs)
        if positional is None:
            return self._eager(f"call not in the stage's {self._input_count} inputs", args, kwargs)
        return self._run(*positional)

    def _positional(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
        """The call as the stage's positional inputs, or None when it passes anything else."""
        if not kwargs:
            return args if len(args) == self._input_count else None
        if self._signature is None:
            return None
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError:
            return None
        names = list(self._signature.parameters)[: self._input_count]
        if list(bound.arguments) != names:
            return None
        return tuple(bound.arguments[n] for n in names)

    def _eager(self, reason: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self._lock:
            first = reason not in self.eager_reasons
            self.eager_reasons[reason] += 1
        if first:
            log.warning("%s: %s; running its own forward (%s)", self.name, reason, self.candidate)
        return self._original(*args, **kwargs)
