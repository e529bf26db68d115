"""Decode steps: how step-level backends run an autoregressive decoder component.

A decoder component's module is a Python loop (prefill, then one step per token) over a model
whose key/value caches are updated in place. Exporting the loop unrolls it, so step-level backends
(a stateful OpenVINO model, say) work one step at a time instead. A component that offers this
declares :class:`DecodeSteps`: one :class:`StepGraph` per kind of step (the slow decoder over
time, the fast decoder over codebooks), each a module with explicit caches, and ``install``, which
gives a callable that runs the component's own loop with each step served by a
:class:`StepRunner`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..errors import UniOptError

__all__ = [
    "DecodeSteps",
    "FrameGraph",
    "StepGraph",
    "StepOrderError",
    "StepRunner",
    "continued_length",
    "onnx_ops",
    "onnx_ops_on",
    "past_names",
    "present_names",
]


class StepOrderError(UniOptError):
    """A step that neither starts a sequence (position 0) nor continues the one in the caches."""


_ONNX_OPS: ContextVar[bool] = ContextVar("uniopt_onnx_ops", default=False)


@contextmanager
def onnx_ops() -> Iterator[None]:
    """Within it, step graphs are traced for an ONNX export that runs on ONNX Runtime's fused ops.

    A step module may then compute with ``torch.onnx.ops`` (ONNX Runtime's ``GroupQueryAttention``
    with past and present caches, say), which the exporter writes as one node each; such a module
    is only traced within it, never run. Outside it, the same module computes with the plain
    PyTorch ops every other backend converts.
    """
    token = _ONNX_OPS.set(True)
    try:
        yield
    finally:
        _ONNX_OPS.reset(token)


def onnx_ops_on() -> bool:
    """Whether step graphs are being traced within :func:`onnx_ops`."""
    return _ONNX_OPS.get()


def past_names(layers: int) -> tuple[str, ...]:
    """``past_key_values.N.key`` / ``.value`` for every layer, as optimum-intel names cache inputs."""
    return tuple(f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value"))


def present_names(layers: int) -> tuple[str, ...]:
    """``present.N.key`` / ``.value`` for every layer: the caches with the new positions appended."""
    return tuple(f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value"))


@dataclass(frozen=True)
class StepGraph:
    """One kind of decode step as a module with explicit key/value caches.

    ``module(*inputs, *past) -> (*outputs, *present)``. ``past`` holds a key and a value tensor
    ``[1, kv_heads, P, head_dim]`` per layer (``P`` positions already decoded) and ``present`` the
    same with the step's positions appended, so feeding ``present`` back as the next ``past`` (or
    keeping it as a backend's state) continues the sequence. ``position_input`` names the input
    holding the absolute positions of the step's tokens: a step at position 0 starts a new
    sequence. ``example_inputs`` (without the caches) are traced with ``example_past`` positions in
    the caches; ``input_shapes`` give each input's shape with -1 on the axes that vary.
    """

    name: str
    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    position_input: str
    layers: int
    kv_heads: int
    head_dim: int
    max_positions: int
    example_past: int = 2

    @property
    def cache_names(self) -> dict[str, str]:
        """Each past input's name to the present output that continues it."""
        return dict(zip(past_names(self.layers), present_names(self.layers), strict=True))

    def example_caches(self) -> tuple[torch.Tensor, ...]:
        """Past caches holding ``example_past`` positions, for tracing."""
        shape = (1, self.kv_heads, self.example_past, self.head_dim)
        return tuple(torch.zeros(shape) for _ in range(2 * self.layers))

    def empty_caches(self) -> tuple[torch.Tensor, ...]:
        """Past caches holding no position: the start of a sequence."""
        shape = (1, self.kv_heads, 0, self.head_dim)
        return tuple(torch.zeros(shape) for _ in range(2 * self.layers))


def continued_length(graph: StepGraph, positions: torch.Tensor, decoded: int) -> int:
    """The positions decoded after a step of ``graph`` at ``positions``, with ``decoded`` before it.

    A step at position 0 starts a new sequence; any other must start at ``decoded`` and end before
    the caches' end, or :class:`StepOrderError` is raised.
    """
    first, last = int(positions[0]), int(positions[-1])
    if first not in (0, decoded):
        raise StepOrderError(f"{graph.name} step at position {first} does not continue the {decoded} decoded")
    if last >= graph.max_positions:
        raise StepOrderError(f"{graph.name} step at position {last} is past the caches' end")
    return last + 1


@dataclass(frozen=True)
class FrameGraph:
    """A module that runs a whole inner loop of one decode step (its caches inside, no state between calls).

    ``module(*example_inputs)`` returns the tensors named ``output_names``. ``replaces`` names the
    step graph whose every call the frame takes over when it serves: that graph is not built beside it.
    """

    name: str
    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    replaces: str | None = None


class StepRunner(Protocol):
    """Runs one kind of step with the caches kept inside: ``runner(*inputs) -> outputs``.

    A step whose first position is 0 starts a new sequence (the caches are emptied first); any
    other step must continue the last one (its first position is the number already decoded).
    """

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]: ...


@dataclass(frozen=True)
class DecodeSteps:
    """The step graphs of a decoder component and how to run its loop on step runners.

    ``install(runners)`` (runners by graph name) returns a callable taking the component's inputs
    and returning what its module returns, teacher forcing included. ``frame``, when given, may
    replace a step graph's inner loop: a runner for it under its name is used instead of the loop.
    """

    graphs: tuple[StepGraph, ...]
    install: Callable[[Mapping[str, StepRunner]], Callable[..., Any]] = field(compare=False)
    frame: FrameGraph | None = None

    def graph(self, name: str) -> StepGraph:
        """The step graph called ``name``."""
        for graph in self.graphs:
            if graph.name == name:
                return graph
        raise KeyError(name)
