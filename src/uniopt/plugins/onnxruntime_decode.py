"""ONNX Runtime decode steps: 8-bit ``MatMulNBits`` weights, the caches passed in and out of each step.

For a decoder component that declares :class:`~uniopt.optimizer.steps.DecodeSteps`, each step graph
(and the frame graph that replaces the fast decoder's codebook loop, where there is one) is exported
with the dynamo exporter at opset 23, a step graph with its length and its caches' length dynamic,
each graph in a child of its own (side by side where the memory left holds both). The graphs are
traced within :func:`~uniopt.optimizer.steps.onnx_ops`, so a step module that offers them computes
with ONNX Runtime's fused CPU ops (the TTS steps: one ``GroupQueryAttention`` per layer, RoPE and
the caches inside, and a ``SkipSimplifiedLayerNormalization`` per residual add and RMS norm):
about 15 nodes per layer instead of dozens. The weights the graphs compute from parameters (rows
reordered, projections fused) are then folded into constants, on the ONNX IR with the weights mapped
from the export's file, and every matmul by a constant becomes ONNX Runtime's ``MatMulNBits``: 8-bit
symmetric weights in blocks of 128, with int8 dot products (accuracy level 4: each call quantizes
the activations per block). On the Zen 4 host that kernel streams int8 weights faster than
OpenVINO's (``benchmarks/decoder_speed.py``); with float activations (accuracy level 1) the slow
step ran ~30x slower.

A step's session takes the caches as inputs and gives them back with the step appended (the
``present`` outputs); :class:`CachedStep` keeps them between calls, so the engine's own loop and
sampling run unchanged on top (:class:`~uniopt.plugins.step_decode.StepDecode`). The quantized
models are cache entries: a warm start loads them without exporting anything.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import NotApplicable
from ..optimizer.steps import FrameGraph, StepGraph, StepRunner, continued_length, onnx_ops
from .candidate import BuildContext, BuildStep, Candidate, Requirements, Stage
from .export import quiet_loggers, rebuild_on_failure
from .hookspecs import hookimpl
from .memory_costs import ORT_STEP_FIRST_CALL_FACTOR, estimate_step, file_bytes, memory_step, weight_bytes
from .side_by_side import ChildBuild, EntryBuild, entry_writer, side_by_side
from .step_decode import StepDecode

__all__ = ["CachedStep", "SessionRunner"]

NAME = "onnxruntime-steps-int8"
#: How the exported step models are made; a new value is a new cache key.
STEP_ONNX_LAYOUT = 4
#: Opset 23 has ``RMSNormalization``: one node where opset 18 spells out five.
OPSET = 23
#: ``MatMulNBits`` weights: bits, block size along the input dimension, accuracy level (4: int8 dot products).
BITS, BLOCK_SIZE, ACCURACY_LEVEL = 8, 128, 4
#: Folding limits (elements) high enough for every weight the graphs compute from parameters.
FOLD_LIMIT = 1 << 31


class SessionRunner:
    """A graph's session with no state, one ``run()`` a call: a frame graph's runner, and :class:`CachedStep`'s base."""

    def __init__(self, session: Any, graph: StepGraph | FrameGraph) -> None:
        self._session = session
        taken = {i.name for i in session.get_inputs()}  # the exporter drops inputs the graph does not read
        caches = graph.cache_names if isinstance(graph, StepGraph) else {}
        self._inputs = [(i, name) for i, name in enumerate(graph.input_names) if name in taken and name not in caches]
        self._outputs = list(graph.output_names)

    def _run(self, inputs: tuple[torch.Tensor, ...], past: dict[str, Any] | None = None) -> list[Any]:
        feeds = {name: inputs[i].detach().contiguous().numpy() for i, name in self._inputs}
        if past is not None:
            feeds.update(past)
        return list(self._session.run(self._outputs, feeds))

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(r) for r in self._run(inputs))


class CachedStep(SessionRunner):
    """A step graph's session; the caches it returns are the next call's (a :class:`StepRunner`)."""

    def __init__(self, session: Any, graph: StepGraph) -> None:
        super().__init__(session, graph)
        self._graph = graph
        self._position = graph.input_names.index(graph.position_input)
        self._kept = len(graph.output_names) - 2 * graph.layers
        self._past_names = list(graph.cache_names)
        self._empty = [c.numpy() for c in graph.empty_caches()]
        self._past = self._empty
        self._length = 0

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        positions = inputs[self._position]
        length = continued_length(self._graph, positions, self._length)
        past = self._empty if int(positions[0]) == 0 else self._past
        results = self._run(inputs, dict(zip(self._past_names, past, strict=True)))
        self._past, self._length = results[self._kept :], length
        return tuple(torch.from_numpy(r) for r in results[: self._kept])


def _dynamic_shapes(graph: StepGraph) -> tuple[Any, ...]:
    """The step's varying axes (``-1`` in ``input_shapes``: its length) and its caches' length."""
    from torch.export import Dim

    length = Dim("length", min=1, max=graph.max_positions)
    past = Dim("past", min=0, max=graph.max_positions)
    inputs = tuple({axis: length for axis, n in enumerate(shape) if n == -1} or None for shape in graph.input_shapes)
    return (*inputs, tuple({2: past} for _ in range(2 * graph.layers)))


def _quantized_onnx(graph: StepGraph | FrameGraph, directory: Path) -> None:
    """Export ``graph``, fold its computed weights and write it with 8-bit ``MatMulNBits`` weights (in a child)."""
    import onnxscript.optimizer
    from onnxscript import ir

    plain = directory / "plain.onnx"
    if isinstance(graph, StepGraph):
        example, dynamic = (*graph.example_inputs, *graph.example_caches()), _dynamic_shapes(graph)
    else:
        example, dynamic = graph.example_inputs, None
    with torch.no_grad(), onnx_ops(), quiet_loggers("torch", "onnxscript", "onnx_ir"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation and axis-naming notes
        try:
            torch.onnx.export(
                graph.module.eval(),
                example,
                str(plain),
                input_names=list(graph.input_names),
                output_names=list(graph.output_names),
                dynamic_shapes=dynamic,
                dynamo=True,
                opset_version=OPSET,
                external_data=True,
                verbose=False,
            )
        except Exception as error:
            refusal = _refusal(error)
            if refusal is None:
                raise
            raise refusal from None
    # Folded and quantized on the IR, whose weights stay mapped from the export's file, one weight at a
    # time: on the TTS decoder's slow step (795 MiB of weights) quantizing the folded model loaded
    # whole (onnxruntime's MatMulNBitsQuantizer) had added 1.1 GiB; the folded weights alone add 0.5.
    model = ir.load(str(plain))
    with quiet_loggers("onnxscript", "onnx_ir"):
        onnxscript.optimizer.fold_constants(model, input_size_limit=FOLD_LIMIT, output_size_limit=FOLD_LIMIT)
        onnxscript.optimizer.remove_unused_nodes(model)
    _give_attention_its_present_outputs(model)
    if not _to_matmul_nbits(model):
        raise RuntimeError(f"{graph.name}: no matmul by a constant weight to quantize")
    ir.save(model, str(directory / "model.onnx"), external_data="model.onnx.data")
    for leftover in directory.glob("plain.onnx*"):
        leftover.unlink()


def _to_matmul_nbits(model: Any) -> int:
    """Turn each ``MatMul`` by a 2-D float initializer into ONNX Runtime's ``MatMulNBits`` (8-bit symmetric
    blocks, int8 dot products), one weight at a time with onnxruntime's own block quantizer; returns how
    many. A weight several matmuls share (a frame graph's passes) is quantized once; each float weight
    leaves the graph, and memory, once nothing reads it."""
    import numpy as np
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )
    from onnxscript import ir

    config = DefaultWeightOnlyQuantConfig(
        block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL, bits=BITS
    )
    quantizer = DefaultWeightOnlyQuantizer(config)
    quantized: dict[str, tuple[Any, Any, int, int]] = {}
    replaced = 0
    for node in list(model.graph):
        weight = node.inputs[1] if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") else None
        if weight is None or not weight.is_initializer() or weight.const_value is None:
            continue
        if weight.name not in quantized:
            array = weight.const_value.numpy()
            if array.ndim != 2 or array.dtype != np.float32:
                continue
            packed, scales, _ = quantizer.qbits_block_quant(np.ascontiguousarray(array))
            blocks = ir.Value(name=f"{weight.name}_Q{BITS}", const_value=ir.tensor(packed))
            scale = ir.Value(name=f"{weight.name}_scales", const_value=ir.tensor(scales))
            model.graph.register_initializer(blocks)
            model.graph.register_initializer(scale)
            quantized[weight.name] = (blocks, scale, *array.shape)
        blocks, scale, k, n = quantized[weight.name]
        attributes = {"K": k, "N": n, "bits": BITS, "block_size": BLOCK_SIZE, "accuracy_level": ACCURACY_LEVEL}
        matmul = ir.Node(
            "com.microsoft",
            "MatMulNBits",
            [node.inputs[0], blocks, scale],
            [ir.AttrInt64(name, value) for name, value in attributes.items()],
            num_outputs=1,
        )
        model.graph.insert_before(node, matmul)
        name = node.outputs[0].name  # kept: it may be a graph output's
        ir.convenience.replace_all_uses_with(node.outputs, matmul.outputs, replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
        matmul.outputs[0].name = name
        if not weight.uses():
            del model.graph.initializers[weight.name]
        replaced += 1
    if replaced:
        model.opset_imports.setdefault("com.microsoft", 1)
    return replaced


def _refusal(error: BaseException) -> NotApplicable | None:
    """The :class:`NotApplicable` a step module raised while traced, under the exporter's own errors."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, NotApplicable):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _give_attention_its_present_outputs(model: Any) -> None:
    """Give every ``GroupQueryAttention`` fed past caches its present outputs, where the exporter dropped them.

    ONNX Runtime's CPU kernel refuses past caches without present outputs; in a frame graph the
    last pass's presents are read by nothing, so the exporter leaves them out.
    """
    from onnxscript import ir

    for node in list(model.graph):
        attention = node.domain == "com.microsoft" and node.op_type == "GroupQueryAttention"
        has_past = attention and len(node.inputs) > 3 and node.inputs[3] is not None  # input 3: the past key
        if not has_past or len(node.outputs) >= 3:
            continue
        full = ir.Node(
            node.domain, node.op_type, node.inputs, node.attributes.values(), num_outputs=3, version=node.version
        )
        model.graph.insert_before(node, full)
        kept = list(node.outputs)
        ir.convenience.replace_all_uses_with(kept, full.outputs[: len(kept)], replace_graph_outputs=True)
        model.graph.remove(node, safe=True)


def _model_key(graph: StepGraph | FrameGraph, component: Any) -> str:
    from ..cache import cache_key, library_versions

    spec = {
        "artifact": "onnxruntime-step-int8",
        "layout": STEP_ONNX_LAYOUT,
        "component": component.key(),
        "graph": graph.name,
        "weights": [BITS, BLOCK_SIZE, ACCURACY_LEVEL],
        "versions": library_versions(),
    }
    return cache_key(spec)


def _export_step_name(graph: StepGraph | FrameGraph) -> str:
    return "onnxruntime-frame-export" if isinstance(graph, FrameGraph) else "onnxruntime-step-export"


def _write(graph: StepGraph | FrameGraph, component: Any, context: BuildContext, directory: Path) -> dict[str, Any]:
    with memory_step(_export_step_name(graph), component, context):
        _quantized_onnx(graph, directory)
    return {"graph": graph.name}


def _exports(graphs: list[StepGraph | FrameGraph], component: Any, context: BuildContext) -> list[EntryBuild]:
    """Each graph's quantized model as an entry to build (the exporter is mostly one thread: they go side by side)."""
    return [
        EntryBuild(
            g.name,
            _model_key(g, component),
            functools.partial(_write, g, component, context),
            f"ONNX export and 8-bit weights of {g.name}",
            estimate_step(_export_step_name(g), weight_bytes(component)),
        )
        for g in graphs
    ]


def _step_model(build: EntryBuild, context: BuildContext, loaded: list[str], started: ChildBuild | None = None) -> Path:
    """The quantized model of ``build``'s graph, from the cache, from ``started``, or made now in a child."""
    write = entry_writer(build, context, started)
    description = {"graph": build.name}
    entry, built = context.cache.get_or_build(build.key, write, kind="onnxruntime-step", description=description)
    if not built:
        loaded.append(build.key)
    return entry.path / "model.onnx"


def _model_bytes(path: Path) -> int:
    """The size of a quantized model: its graph file and its weights' file."""
    return file_bytes(path, path.with_name(path.name + ".data"))


def _session(path: Path, component: Any, context: BuildContext) -> Any:
    """A session over ``path`` whose workers spin inside a run and stop at its end.

    Spinning saves waking a worker at each of a step's hundreds of small ops; stopping at the end
    of a run keeps one step's workers from spinning through the next step's run (the slow step's
    and the frame's sessions have pools of their own): on the Zen 4 host 16 ms a frame, against 20
    without spinning and 30 with spinning that does not stop.
    """
    import onnxruntime as ort

    options = context.threads.onnxruntime_options(spinning=True)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    with memory_step("onnxruntime-session", component, context, _model_bytes(path)):
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@rebuild_on_failure
def _build(component: Any, context: BuildContext, loaded: list[str]) -> Stage:
    steps = component.decode_steps
    if steps is None:
        raise NotApplicable(f"component {component.name!r} declares no decode steps")
    graphs: list[StepGraph | FrameGraph] = [*steps.graphs]
    if steps.frame is not None:  # the frame serves in place of the graph it replaces
        graphs = [*(g for g in graphs if g.name != steps.frame.replaces), steps.frame]
    builds = _exports(graphs, component, context)
    with side_by_side(builds, context) as started:
        paths = {b.name: _step_model(b, context, loaded, started.get(b.name)) for b in builds}
    from_cache = len(loaded) == len(graphs)  # every model loaded from its entry
    sessions = {name: _session(path, component, context) for name, path in paths.items()}

    def runners() -> dict[str, StepRunner]:
        return {
            g.name: CachedStep(sessions[g.name], g) if isinstance(g, StepGraph) else SessionRunner(sessions[g.name], g)
            for g in graphs
        }

    files = sum(_model_bytes(path) for path in paths.values())
    info = {
        "from_cache": from_cache,
        "weights": f"int{BITS}",
        "block_size": BLOCK_SIZE,
        "device": "CPU",
        "first_call_bytes": int(ORT_STEP_FIRST_CALL_FACTOR * files),
    }
    allowed = context.settings.fallback_on_optimization_error
    return Stage(NAME, StepDecode(component, steps, runners, NAME, allowed), info)


@hookimpl
def uniopt_register_candidates(register: Any) -> None:
    register(
        Candidate(
            NAME,
            "onnxruntime_decode",
            "ONNX Runtime decode steps (caches in and out), the codebook loop as one call per frame, "
            "8-bit MatMulNBits weights with int8 dot products",
            _build,
            Requirements(
                packages=("onnxruntime", "onnx", "onnxscript"),
                extra="onnx",
                precision="int8",
                setting="use_model_quantization",
            ),
            (
                BuildStep("onnxruntime-step-export"),
                BuildStep("onnxruntime-frame-export"),
                BuildStep("onnxruntime-session", "int8-file"),
            ),
        )
    )
