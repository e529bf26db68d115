"""A component: one ``nn.Module`` of an engine, with what uniopt needs to optimize it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .steps import DecodeSteps

__all__ = ["Component", "Metric"]

#: Accuracy metrics a component can declare; the guard knows how to compute each.
METRICS = ("allclose", "cosine", "argmax_agreement", "ctc_agreement", "snr_db", "token_agreement")


@dataclass(frozen=True)
class Metric:
    """How a reduced-precision stage is judged against the FP32 reference.

    ``name`` is one of :data:`METRICS`; ``threshold`` is the worst value accepted
    (a minimum for cosine, agreement and SNR).
    """

    name: str = "cosine"
    threshold: float = 0.999

    def __post_init__(self) -> None:
        if self.name not in METRICS:
            raise ValueError(f"unknown metric {self.name!r}; expected one of {', '.join(METRICS)}")


def as_inputs(inputs: Any) -> tuple[Any, ...]:
    """Positional inputs as a tuple: a tuple as it is, a list's items, anything else as one input."""
    if isinstance(inputs, tuple):
        return inputs
    if isinstance(inputs, list):
        return tuple(inputs)
    return (inputs,)


@dataclass
class Component:
    """One optimizable part of an engine.

    ``module`` is called as ``module(*example_inputs)``. ``input_names`` name the positional
    inputs (used for ONNX export); ``dynamic_axes`` maps an input or output name to
    ``{axis: symbolic_name}`` for the axes whose size varies between calls.
    ``kind`` hints the tier's default chain ("encoder", "decoder", "embedding",
    "segmentation", "codec", "generic"). ``exporter`` prefers "dynamo" or "legacy"
    for ONNX export (the other is tried when the first fails); "none" rules out every graph
    backend, for modules no exporter can capture faithfully (a Python decode loop over an
    in-place KV cache, say). ``calibration_inputs`` are more
    representative inputs (another length, another speaker): the guard checks the first of them
    (with the example), and static int8 is calibrated on the others only, never on what it is
    checked on (:meth:`guarded_inputs`, :meth:`int8_calibration_inputs`). ``validation_inputs``
    are inputs at the other sizes the engine really calls the module with (its chunk length, its
    batch sizes): graph stages, whose
    shapes are fixed at export, are checked on each of them; without them the guard derives
    inputs at half and double the example's size along each dynamic axis. ``audio_seconds`` is
    how much audio the example input stands for, for real-time factors. Inputs may be given as a
    tuple, a list or a single tensor.

    ``teacher_forcing(inputs, reference_outputs)`` is for autoregressive modules, whose free-running
    outputs part ways for good at the first different choice: it returns inputs under which the
    module replays the reference's own outputs and returns the scores (logits) behind each choice.
    The guard then judges a stage by those scores, step by step, against the reference's.
    ``free_run_with_scores(module, *inputs) -> (outputs, scores)``, optional beside it, gives both
    in one call (what the module returns for ``inputs``, and what it returns for
    ``teacher_forcing(inputs, outputs)``): the reference then decodes each input set once, not twice.
    ``decode_steps`` (:class:`~uniopt.optimizer.steps.DecodeSteps`) lets step-level backends run
    such a module's loop one step at a time, with the caches kept by the backend.

    ``state_buffers`` names (qualified, as in ``named_buffers()``) buffers of ``module`` that hold
    running state which every call overwrites; their values are left out of :meth:`key`, as are
    those of buffers named ``k_cache``/``v_cache`` and those a submodule lists in its
    ``uniopt_state_buffers`` attribute (see :func:`uniopt.cache.hash_module`).
    """

    name: str
    module: torch.nn.Module
    example_inputs: tuple[Any, ...]
    input_names: Sequence[str] = ()
    output_names: Sequence[str] = ()
    dynamic_axes: Mapping[str, Mapping[int, str]] = field(default_factory=dict)
    metric: Metric = field(default_factory=Metric)
    kind: str = "generic"
    exporter: str = "dynamo"
    calibration_inputs: Sequence[tuple[Any, ...]] = ()
    validation_inputs: Sequence[tuple[Any, ...]] = ()
    audio_seconds: float | None = None
    teacher_forcing: Callable[[tuple[Any, ...], Any], tuple[Any, ...]] | None = None
    free_run_with_scores: Callable[..., tuple[Any, Any]] | None = None
    decode_steps: DecodeSteps | None = None
    state_buffers: Sequence[str] = ()

    def key(self) -> str:
        """sha256 of the module (see :func:`~uniopt.cache.hash_module`), the inputs' signature and the export spec.

        Computed once per component object; build a new Component after changing weights.
        The inputs' values are not: artifacts calibrated on them add :meth:`calibration_key`.
        """
        cached = self.__dict__.get("_key")
        if cached is None:
            from ..cache import cache_key, hash_module, input_signature

            cached = cache_key(
                {
                    "module": hash_module(self.module, state_buffers=self.state_buffers),
                    "inputs": input_signature(self.example_inputs),
                    "input_names": list(self.input_names),
                    "output_names": list(self.output_names),
                    "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in self.dynamic_axes.items()},
                    "exporter": self.exporter,
                    "teacher_forcing": self.teacher_forcing is not None,
                    "decode_steps": [g.name for g in self.decode_steps.graphs] if self.decode_steps else None,
                }
            )
            self.__dict__["_key"] = cached
        return cached

    def guarded_inputs(self) -> list[tuple[Any, ...]]:
        """The inputs every candidate is checked on: the example and the first calibration input."""
        return [self.example_inputs, *self.calibration_inputs[:1]]

    def int8_calibration_inputs(self) -> list[tuple[Any, ...]]:
        """The inputs static int8 is calibrated on: the calibration inputs the guard does not check on."""
        return list(self.calibration_inputs[1:])

    def calibration_key(self) -> str:
        """sha256 of the values of the example and calibration inputs (those calibration sees among them).

        Part of the key of every artifact calibrated on them; computed once per component object.
        """
        cached = self.__dict__.get("_calibration_key")
        if cached is None:
            from ..cache.keys import hash_inputs

            cached = hash_inputs([self.example_inputs, *self.calibration_inputs])
            self.__dict__["_calibration_key"] = cached
        return cached

    def __post_init__(self) -> None:
        if not isinstance(self.module, torch.nn.Module):
            raise TypeError(f"component {self.name!r}: module must be a torch.nn.Module")
        if self.exporter not in ("dynamo", "legacy", "none"):
            raise ValueError(f"component {self.name!r}: exporter must be dynamo, legacy or none")
        self.example_inputs = as_inputs(self.example_inputs)
        self.calibration_inputs = [as_inputs(inputs) for inputs in self.calibration_inputs]
        self.validation_inputs = [as_inputs(inputs) for inputs in self.validation_inputs]
        self.state_buffers = tuple(self.state_buffers)
        if not self.input_names:
            self.input_names = tuple(f"input_{i}" for i in range(len(self.example_inputs)))
        if len(self.input_names) != len(self.example_inputs):
            raise ValueError(
                f"component {self.name!r}: {len(self.input_names)} input names "
                f"for {len(self.example_inputs)} example inputs"
            )
