"""Components from a sample call: run the engine's own code once per sample and watch its modules.

Every ``nn.Module`` reachable from the engine gets a forward pre-hook and hook (``with_kwargs``)
for the duration of the samples. The outermost modules a call reaches (not their children) become
components: their recorded positional and keyword inputs are the example inputs, a call from
another sample the calibration input, the axes whose size differs between calls the dynamic axes,
and the outputs pick the metric. Each component remembers the engine method that called it.
"""

from __future__ import annotations

import copy
import inspect
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import UniOptError
from .component import Component, Metric

__all__ = ["FLOAT_METRIC", "LABEL_METRIC", "Call", "capture_components", "engine_modules"]

#: The metric of a component with float outputs (embeddings, logits, audio): cosine per row.
FLOAT_METRIC = Metric("cosine", 0.999)
#: The metric of a component whose outputs are all integers (labels, tokens): agreement.
LABEL_METRIC = Metric("argmax_agreement", 0.99)
#: How deep :func:`engine_modules` looks through attributes that are not modules.
MAX_DEPTH = 3

Sample = Callable[[Any], Any]
_TORCH_DIR = os.path.dirname(torch.__file__)


@dataclass
class Call:
    """One recorded call of an outermost module: its inputs as the forward's positional prefix, outputs."""

    inputs: tuple[Any, ...]
    outputs: Any
    sample: int
    method: str


@dataclass
class _Seen:
    path: str
    module: torch.nn.Module
    names: tuple[str, ...] = ()
    calls: list[Call] = field(default_factory=list)
    problem: str = ""
    stateful: bool = False


def engine_modules(engine: Any) -> dict[int, tuple[str, torch.nn.Module]]:
    """Every ``nn.Module`` reachable from ``engine``, by id, with its attribute path ("" for the engine)."""
    found: dict[int, tuple[str, torch.nn.Module]] = {}

    def add_module(prefix: str, module: torch.nn.Module) -> None:
        if isinstance(module, torch.jit.ScriptModule):  # its submodules run inside TorchScript
            found.setdefault(id(module), (prefix, module))
            return
        for name, sub in module.named_modules(remove_duplicate=True):
            if isinstance(sub, torch.jit.ScriptModule) and sub is not module:
                continue
            path = f"{prefix}.{name}".strip(".") if name else prefix
            found.setdefault(id(sub), (path, sub))

    def walk(prefix: str, obj: Any, depth: int) -> None:
        if isinstance(obj, torch.nn.Module):
            add_module(prefix, obj)
            return
        if depth >= MAX_DEPTH or not hasattr(obj, "__dict__") or isinstance(obj, type):
            return
        for name, value in vars(obj).items():
            if isinstance(value, torch.nn.Module) or (hasattr(value, "__dict__") and _plain_object(value)):
                walk(f"{prefix}.{name}".strip("."), value, depth + 1)

    walk("", engine, 0)
    return found


def _plain_object(value: Any) -> bool:
    module = type(value).__module__
    return not (callable(value) and not hasattr(value, "__dict__")) and module not in ("builtins", "typing")


def _caller(engine: Any) -> str:
    """The outermost method of ``engine`` on the stack (``embed_utterance``), or "" when none is."""
    frame = sys._getframe(2)
    method = ""
    while frame is not None:
        if frame.f_locals.get("self") is engine and not frame.f_code.co_filename.startswith(_TORCH_DIR):
            method = frame.f_code.co_name
        frame = frame.f_back  # type: ignore[assignment]
    return method


def _detached(value: Any) -> Any:
    return pytree.tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, value)


def _positional(
    module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], tuple[str, ...]] | str:
    """``(inputs, names)``: the call as the forward's positional prefix, or why it cannot be one."""
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        if not kwargs:
            return args, ()
        return f"its call does not bind to its forward's signature: {exc}"
    params = list(signature.parameters.values())
    positional_kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not kwargs:
        names = tuple(p.name for p in params[: len(args)] if p.kind in positional_kinds)
        return args, names if len(names) == len(args) else ()
    passed = [i for i, p in enumerate(params) if p.name in bound.arguments]
    prefix = params[: max(passed) + 1] if passed else []
    if any(p.kind not in positional_kinds for p in prefix):
        return "it is called with keyword arguments its forward takes as **kwargs"
    values = [bound.arguments[p.name] if p.name in bound.arguments else p.default for p in prefix]
    return tuple(values), tuple(p.name for p in prefix)


@dataclass
class _Recorder:
    engine: Any
    modules: dict[int, tuple[str, torch.nn.Module]]
    seen: dict[int, _Seen] = field(default_factory=dict)
    depth: int = 0
    sample: int = 0
    stack: list[tuple[int, tuple[Any, ...], str] | None] = field(default_factory=list)

    def before(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.depth == 0:
            entry = self.seen.setdefault(id(module), _Seen(self.modules[id(module)][0], module))
            positional = _positional(module, args, kwargs)
            if isinstance(positional, str):
                entry.problem = entry.problem or positional
                self.stack.append(None)
            else:
                inputs, names = positional
                entry.names = entry.names or names
                self.stack.append((id(module), copy.deepcopy(inputs), _caller(self.engine)))
        self.depth += 1

    def after(self, module: torch.nn.Module, args: Any, kwargs: Any, outputs: Any) -> None:
        self.depth -= 1
        if self.depth == 0:
            top = self.stack.pop()
            if top is not None:
                key, inputs, method = top
                self.seen[key].calls.append(Call(inputs, _detached(outputs), self.sample, method))


def _watched(recorder: _Recorder, module: torch.nn.Module) -> Callable[..., Any]:
    """``module``'s forward, reporting to ``recorder`` as the hooks do."""
    forward = type(module).forward.__get__(module) if "forward" not in module.__dict__ else module.__dict__["forward"]
    forward = getattr(module._c, "forward", forward) if hasattr(module, "_c") else forward

    def watched(*args: Any, **kwargs: Any) -> Any:
        recorder.before(module, args, kwargs)
        outputs = None
        try:
            outputs = forward(*args, **kwargs)
            return outputs
        finally:
            recorder.after(module, args, kwargs, outputs)

    return watched


def _record(engine: Any, samples: Sequence[Sample]) -> list[_Seen]:
    modules = engine_modules(engine)
    if not modules:
        raise UniOptError(f"{type(engine).__name__} has no nn.Module among its attributes: nothing to optimize")
    recorder = _Recorder(engine, modules)
    handles: list[Any] = []
    patched: list[torch.nn.Module] = []
    try:
        for _, module in modules.values():
            if isinstance(module, torch.jit.ScriptModule):  # no hooks on ScriptModules: watch its forward
                module.__dict__["forward"] = _watched(recorder, module)
                patched.append(module)
                continue
            handles.append(module.register_forward_pre_hook(recorder.before, with_kwargs=True))
            handles.append(module.register_forward_hook(recorder.after, with_kwargs=True, always_call=True))
        for index, sample in enumerate(samples):
            recorder.sample = index
            with torch.no_grad():
                sample(engine)
    finally:
        for handle in handles:
            handle.remove()
        for module in patched:
            del module.__dict__["forward"]
    found = [s for s in recorder.seen.values() if s.calls or s.problem]
    for seen in found:  # ordinary tensors, even where the engine ran under inference_mode
        for call in seen.calls:
            call.inputs, call.outputs = _detached(call.inputs), _detached(call.outputs)
        if seen.calls and not seen.problem and not _replays(seen.module, seen.calls[0]):
            seen.stateful = True
    return found


def _replays(module: torch.nn.Module, call: Call) -> bool:
    """Whether ``module`` gives the recorded outputs again for the recorded inputs (no hidden state)."""
    with torch.no_grad():
        again = module(*copy.deepcopy(call.inputs))
    old, new = pytree.tree_leaves(call.outputs), pytree.tree_leaves(again)
    if len(old) != len(new):
        return False
    for a, b in zip(old, new, strict=True):
        if isinstance(a, torch.Tensor):
            if not isinstance(b, torch.Tensor) or a.shape != b.shape or not torch.allclose(a, b, atol=1e-6, rtol=1e-5):
                return False
        elif a != b:
            return False
    return True


def _sizes(calls: Sequence[Call]) -> list[list[tuple[int, ...] | None]]:
    """Per call, the shape of each input and output leaf (None where it is not a tensor)."""
    rows = []
    for call in calls:
        leaves = [*call.inputs, *pytree.tree_leaves(call.outputs)]
        rows.append([tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in leaves])
    return rows


def _dynamic_axes(seen: _Seen, names: Sequence[str], outputs: Sequence[str]) -> dict[str, dict[int, str]]:
    rows = _sizes(seen.calls)
    axes: dict[str, dict[int, str]] = {}
    for index, name in enumerate([*names, *outputs]):
        shapes = [row[index] if index < len(row) else None for row in rows]
        concrete = [s for s in shapes if s is not None]
        if len(concrete) != len(shapes) or len({len(s) for s in concrete}) != 1:
            continue
        varying = [axis for axis in range(len(concrete[0])) if len({s[axis] for s in concrete}) > 1]
        if varying:
            axes[name] = {axis: f"{name}_{axis}" for axis in varying}
    return axes


def metric_for(outputs: Any) -> Metric:
    """Cosine for float outputs, agreement when every output is an integer tensor."""
    tensors = [t for t in pytree.tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    if tensors and not any(t.is_floating_point() for t in tensors):
        return LABEL_METRIC
    return FLOAT_METRIC


def _component(seen: _Seen, overrides: Mapping[str, Any]) -> Component:
    calls = seen.calls
    first = calls[0]
    names = seen.names or tuple(f"input_{i}" for i in range(len(first.inputs)))
    leaves = pytree.tree_leaves(first.outputs)
    outputs = tuple(f"output_{i}" for i in range(len(leaves)))
    axes = _dynamic_axes(seen, names, outputs)
    other = next((c for c in calls if c.sample != first.sample), None)
    if other is None and len(calls) == 1 and not seen.stateful:
        raise UniOptError(
            f"component {seen.path or 'module'!r} was called once, by one sample: uniopt cannot tell which input "
            "sizes vary between calls; pass two or more samples of different sizes (sample=[a, b]), or the "
            "same one twice if the sizes never change"
        )
    calibration = [other.inputs] if other is not None else [c.inputs for c in calls[1:2]]
    options: dict[str, Any] = {
        "input_names": names,
        "output_names": outputs,
        "dynamic_axes": axes,
        "metric": metric_for(first.outputs),
        "calibration_inputs": calibration,
    }
    options.update(overrides)
    return Component(seen.path or "module", seen.module, first.inputs, **options)


#: Why a module whose outputs depend on its earlier calls is left eager.
STATEFUL = (
    "its outputs depend on its earlier calls (state kept in the module), which a stage built from a copy "
    "would keep apart from the engine's own resets; left eager"
)


@dataclass(frozen=True)
class Captured:
    """A component found by sampling, the engine method that called it, and why it stays eager ("": it need not)."""

    component: Component
    method: str
    calls: int
    eager_reason: str = ""


def capture_components(
    engine: Any, sample: Sample | Sequence[Sample], overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> list[Captured]:
    """The outermost modules that ``sample(engine)`` reaches, as components (see the module docstring).

    ``overrides`` maps a component's path to fields of :class:`Component` to set (``metric``, ``kind``).
    """
    samples = [sample] if callable(sample) else list(sample)
    if not samples or not all(callable(s) for s in samples):
        raise UniOptError("sample= takes a function of the engine (lambda e: e.transcribe(wav)) or a list of them")
    overrides = dict(overrides or {})
    found = _record(engine, samples)
    if not found:
        raise UniOptError("the sample calls reached no nn.Module of the engine: nothing to optimize")
    unknown = set(overrides) - {s.path or "module" for s in found}
    if unknown:
        raise UniOptError(f"overrides for {', '.join(sorted(unknown))}: no such component was found by the samples")
    captured = []
    for seen in found:
        if seen.problem:
            raise UniOptError(f"module {seen.path or 'module'!r}: {seen.problem}; declare it with uniopt_components()")
        component = _component(seen, overrides.get(seen.path or "module", {}))
        method = next((c.method for c in seen.calls if c.method), "")
        captured.append(
            Captured(component, method, len(seen.calls), _stateful_reason(seen.module) if seen.stateful else "")
        )
    return captured


def _stateful_reason(module: torch.nn.Module) -> str:
    """:data:`STATEFUL`, naming the adapter that serves a stateful module uniopt knows."""
    if getattr(module, "original_name", "") == "VADRNNJITMerge":  # silero-vad's packaged TorchScript model
        return f"{STATEFUL}; wrap it as uniopt.engines.silero_vad.SileroVadAdapter(model) to optimize its network"
    return STATEFUL
