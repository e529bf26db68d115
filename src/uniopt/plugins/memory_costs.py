"""What each kind of build step costs in memory, as data, and the check that runs before a step.

A step's peak is estimated as ``peak_factor`` times its base bytes plus ``fixed_bytes`` (runtime
libraries loaded, first-call buffers). The base is the component's weight bytes (parameters and
buffers) for the steps that start from the module, and the size of the model file for the steps
that load one (an int8 IR costs less to compile than its FP32 module weighs). The factors were
measured with ``python benchmarks/memory_factors.py`` on the wav2vec2-base encoder (95 M parameters)
and the TTS codec decoder, taking the larger of the two; ``tests/test_memory.py`` builds each kind
of step again and checks that the estimate covers the measured peak.

Before a step runs, :func:`memory_step` compares the estimate (times :data:`SAFETY_FACTOR`, plus
:data:`RESERVE_BYTES`) with the memory left under the host's or the cgroup's limit, and refuses with
a :class:`~uniopt.errors.MemoryBudgetError` when it does not fit: the candidate is then recorded
as refused and the next one is tried, instead of the process being killed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MemoryBudgetError
from ..memory import format_bytes, measure_memory, memory_headroom, module_bytes

__all__ = [
    "RESERVE_BYTES",
    "SAFETY_FACTOR",
    "STEP_COSTS",
    "StepCost",
    "estimate_step",
    "EAGER_RUNTIME_BYTES",
    "file_bytes",
    "memory_step",
    "required_bytes",
    "weight_bytes",
]

MiB = 2**20
log = logging.getLogger("uniopt")


@dataclass(frozen=True)
class StepCost:
    """A build step's peak RSS increase: ``peak_factor`` x base bytes + ``fixed_bytes``."""

    peak_factor: float
    fixed_bytes: int = 0
    description: str = ""


#: Measured per kind of step (see the module docstring); keys are the step names builders use.
#: wav2vec2-base (360 MiB of weights), peak / base measured: legacy export 3.96 with autograd, 3.36
#: without (what runs); dynamo export 3.13 through program.save, 0.36 (128 MiB) when the exporter
#: writes the file with external data itself (what runs; 183 MiB on the codec's 32 MiB); ORT
#: optimize 2.10 (legacy graph) and 2.88 (dynamo graph); ORT quantize 4.01; ORT session 0.32 of the
#: file; OpenVINO convert 1.21-1.93 of the ONNX file, 0.52 (186 MiB) converting the module itself
#: and 2.17 (782 MiB) for that IR's check after the tracer warned (an f32 compile and a 1 s call);
#: compile 2.10 of the file in f32 and 1.08 in bf16 here, but 1.92 in bf16 in a 1.5 GiB cgroup (the
#: IR's pages count there); a bf16 torch copy 0.26 and int8 Linear 0.22 (freed heap reused), but
#: int8 Linear 0.72 on the TTS decoder (795 MiB; its embeddings are copied and its tied projection
#: untied). Weight-only int8 Linear 0.23, and 0.61 on the TTS decoder (the same copies; the untied
#: projection is a float copy until it is quantized). A stage's first calls are estimated from the
#: peak of the eager reference calls (the base of "first-calls"). The TTS decoder (771 MiB), in a
#: child forked from the engine: converting its decode step 194 MiB (0.25), its frame graph 360 MiB;
#: nncf int8 weights on the step's IR 1011 MiB, of which ~770 are the IR file's mapped pages.
#: The same decoder's slow step exported for ONNX Runtime, folded (on the IR, weights mapped) and
#: quantized to 8-bit MatMulNBits in a child: 1275 MiB (1.60); its frame graph 419 MiB (0.53); traced
#: on ONNX's attention ops, 1254 and 412 MiB; on ONNX Runtime's fused ops and quantized on the IR one
#: weight at a time (the folded model no longer loaded whole), 605 and 292 MiB
#: (``python benchmarks/memory_factors.py --component decoder --candidate onnxruntime-steps-int8``); in
#: the 1.5 GiB cgroup, with the decoder's weights parked, the slow step's export peaked at 1070 MiB:
#: the parked weights it reads back count there as a file's pages (``benchmarks/memory.py tts``).
#: Pages of a file (a mapped IR, parked weights: :mod:`uniopt.parked`) count in a step's peak but
#: not against the limit: the kernel drops them before it kills.
STEP_COSTS: dict[str, StepCost] = {
    "onnx-export-legacy": StepCost(3.5, 96 * MiB, "torch.onnx.export, TorchScript tracer, without autograd"),
    "onnx-export-dynamo": StepCost(
        0.5, 192 * MiB, "torch.onnx.export(dynamo=True) writing the weights to model.onnx.data itself"
    ),
    "onnxruntime-optimize": StepCost(3.0, 96 * MiB, "ORT_ENABLE_ALL session writing the optimized model"),
    "onnxruntime-quantize": StepCost(4.2, 96 * MiB, "onnxruntime.quantization.quantize_dynamic"),
    "onnxruntime-fp16": StepCost(3.0, 96 * MiB, "onnxruntime.transformers float16 conversion"),
    "onnxruntime-step-export": StepCost(
        0.75, 192 * MiB, "a decode step graph exported (dynamo), its computed weights folded, MatMulNBits weights"
    ),
    "onnxruntime-frame-export": StepCost(
        0.25, 192 * MiB, "a frame graph (the codebooks unrolled) exported (dynamo), folded, MatMulNBits weights"
    ),
    "onnxruntime-session": StepCost(0.5, 96 * MiB, "loading the model file into an InferenceSession"),
    "openvino-convert": StepCost(2.0, 160 * MiB, "openvino.convert_model of the ONNX file and save_model"),
    "openvino-convert-module": StepCost(0.8, 192 * MiB, "openvino.convert_model of the module itself, save_model"),
    "openvino-check-module": StepCost(
        2.5, 192 * MiB, "an IR converted from the module, compiled in f32 and run at other sizes (tracer warned)"
    ),
    "openvino-convert-step": StepCost(0.5, 160 * MiB, "openvino.convert_model of a decode step module, save_model"),
    "openvino-convert-frame": StepCost(
        0.6, 192 * MiB, "openvino.convert_model of a frame graph (the fast decoder's codebooks unrolled), save_model"
    ),
    "nncf-weights": StepCost(1.0, 96 * MiB, "nncf.compress_weights on an IR file, whose pages it maps"),
    "nncf-static": StepCost(3.2, 192 * MiB, "nncf.quantize: statistics over the calibration inputs"),
    "openvino-compile-f32": StepCost(2.3, 160 * MiB, "compile_model of the IR file in f32"),
    "openvino-compile-bf16": StepCost(2.3, 160 * MiB, "compile_model of the IR file in bf16"),
    "openvino-compile-f16": StepCost(2.3, 160 * MiB, "compile_model of the IR file in f16"),
    "openvino-trial-f32": StepCost(2.3, 224 * MiB, "compile_model in f32 in a trial process of its own"),
    "openvino-trial-bf16": StepCost(2.3, 224 * MiB, "compile_model in bf16 in a trial process of its own"),
    "openvino-trial-f16": StepCost(2.3, 224 * MiB, "compile_model in f16 in a trial process of its own"),
    "first-calls": StepCost(1.0, 32 * MiB, "validating a stage: its first calls, on the reference calls' peak"),
    "torch-copy": StepCost(0.7, 32 * MiB, "a copy of the module in bf16"),
    "torch-int8": StepCost(0.8, 48 * MiB, "dynamic int8 Linear: non-Linear weights copied, Linear packed"),
    "torch-int8-weights": StepCost(0.7, 48 * MiB, "weight-only int8 Linear: non-Linear weights copied"),
    "torch-compile": StepCost(2.0, 512 * MiB, "torch.compile and its first call (inductor)"),
}

#: What a compiled decode step's first calls add, per byte of its model file ("compressed" weights
#: or "float"): OpenVINO's CPU plugin lays out the weights of a model with a varying sequence length
#: at its first call of each input shape (a prompt's prefill, then single steps). Measured anonymous
#: memory on the TTS decoder's slow step: int8 weights 313 MiB on the 180 MiB file (174 at a
#: 20-position prefill, 139 at the first single step; with dynamic quantization on 174 in all);
#: f32 290 MiB on the 719 MiB file. A frame graph's first call added nothing measurable.
STEP_FIRST_CALL_FACTORS = {"compressed": 1.75, "float": 0.4}
#: What compressed weights add at the first calls besides, when the step was loaded from its compiled
#: blob (a warm start, or a race's winner): their layout is then made there, not at the compile.
#: Measured on the same slow step: 492 MiB instead of 319 with dynamic quantization off, 354
#: instead of 182 with it on, a file's worth more each time; its f32 model 300 MiB either way.
STEP_BLOB_FIRST_CALL_FACTOR = 1.0


#: What ONNX Runtime decode steps' first calls add, per byte of their model files (the sessions'
#: buffers for the steps' activations and caches). Measured on the TTS decoder's slow step and frame
#: graph with 8-bit ``MatMulNBits`` weights (324 MiB of files): 70 MiB over the reference calls' peak
#: (``python benchmarks/memory_factors.py --component decoder --candidate onnxruntime-steps-int8``).
ORT_STEP_FIRST_CALL_FACTOR = 0.25


def step_first_call_bytes(weights_bytes: int, compressed: bool, from_blob: bool) -> int:
    """What a compiled decode step's first calls add, for its model file's ``weights_bytes``."""
    factor = STEP_FIRST_CALL_FACTORS["compressed" if compressed else "float"]
    if compressed and from_blob:
        factor += STEP_BLOB_FIRST_CALL_FACTOR
    return int(factor * weights_bytes)


#: Estimates are scaled by this before comparing with the memory left (they are measured, not bounds).
SAFETY_FACTOR = 1.15
#: Kept free for the engine's own work (activations of a call, Python objects).
RESERVE_BYTES = 64 * MiB
#: What an engine's process holds besides its weights: Python, torch and the engine's libraries, and
#: a call's buffers. The eager RSS ``python benchmarks/memory.py`` measured on the 2-vCPU Zen 4 host
#: (README, "Memory on small machines") less each engine's weight bytes: 304 MiB (tts), 333 MiB
#: (diarization), 452 MiB (phoneme, with transformers).
EAGER_RUNTIME_BYTES = 320 * MiB


def weight_bytes(component: Any) -> int:
    """The component module's parameter and buffer bytes (computed once per component)."""
    cached = component.__dict__.get("_weight_bytes")
    if cached is None:
        cached = module_bytes(component.module)
        component.__dict__["_weight_bytes"] = cached
    return int(cached)


def estimate_step(step: str, base_bytes: int) -> int:
    """The estimated peak RSS increase of ``step`` on ``base_bytes`` of weights or model file, in bytes."""
    cost = STEP_COSTS[step]
    return int(cost.peak_factor * base_bytes + cost.fixed_bytes)


def required_bytes(estimated_bytes: int) -> int:
    """The memory left a step of that estimate needs to run: times :data:`SAFETY_FACTOR`, plus :data:`RESERVE_BYTES`."""
    return int(estimated_bytes * SAFETY_FACTOR + RESERVE_BYTES)


def file_bytes(*paths: Path) -> int:
    """The size of a model on disk: each file, and for a folder every file in it."""
    total = 0
    for path in paths:
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        total += sum(p.stat().st_size for p in files if p.exists())
    return total


@contextmanager
def memory_step(
    step: str, component: Any, context: Any, base_bytes: int | None = None, copies: int = 1
) -> Iterator[None]:
    """Refuse ``step`` when its estimate does not fit the memory left; measure it when it runs.

    ``base_bytes`` defaults to the component's weight bytes; ``copies`` runs of the step at once
    need that many estimates. Each step that runs is appended to ``context.memory_steps`` as
    ``{"step", "base_bytes", "estimated_bytes", "peak_bytes"}``.
    """
    base = weight_bytes(component) if base_bytes is None else base_bytes
    needed = copies * estimate_step(step, base)
    headroom = memory_headroom()
    if required_bytes(needed) > headroom.available_bytes:
        raise MemoryBudgetError(step, needed, headroom.describe())
    log.debug("%s for %s: needs ~%s, %s", step, component.name, format_bytes(needed), headroom.describe())
    with measure_memory() as use:
        yield
    log.debug("%s for %s: peak %s", step, component.name, format_bytes(use.peak_increase_bytes))
    steps = getattr(context, "memory_steps", None)
    if steps is not None:
        steps.append(
            {"step": step, "base_bytes": base, "estimated_bytes": needed, "peak_bytes": use.peak_increase_bytes}
        )
