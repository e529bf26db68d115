"""OpenVINO stateful decode: each decode step is one ``infer()``, the key/value caches OpenVINO states.

For a decoder component that declares :class:`~uniopt.optimizer.steps.DecodeSteps`, each step
graph (the slow decoder's step, the fast decoder's codebook step) is converted from PyTorch with
explicit ``past_key_values.N.key/value`` inputs and ``present.N.key/value`` outputs, and then
made stateful (OpenVINO's ``MakeStateful``, as optimum-intel does): the caches stay inside the
infer request between calls, so a step copies no cache in or out. The caches are read through a
``beam_idx`` gather and start as empty states, the form in which the CPU plugin fuses each
layer's attention with its cache. The component's own loop runs unchanged, sampling included,
with its steps served by the infer requests.

Precision is explicit: f32, bf16 where the CPU computes it, and nncf weight compression (int8 per
output channel, or int4 in groups) with float activations. The converted IRs are cache entries:
a warm start compiles them (from OpenVINO's blob cache) without converting anything.
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import NotApplicable
from ..isolation import isolated_build
from ..optimizer.steps import DecodeSteps, FrameGraph, StepGraph, StepRunner, continued_length
from ..tiers.cpu import BF16_FLAGS
from .candidate import BuildContext, BuildStep, Candidate, Requirements, Stage
from .export import ExportError, quiet_loggers, rebuild_on_failure
from .hookspecs import hookimpl
from .memory_costs import file_bytes, memory_step, step_first_call_bytes
from .openvino_backend import compile_config, converted_model
from .openvino_step_options import compile_fastest
from .side_by_side import ChildBuild, EntryBuild, entry_writer, side_by_side
from .step_decode import StepDecode

__all__ = ["FrameRunner", "StatefulDecode", "StatefulStep"]

_EXTRA = "openvino"
#: The step models' input choosing each cache row (always ``[0]``: one sequence).
BEAM_INPUT = "beam_idx"
#: The layout of the step models; a new value is a new cache key (IRs of another layout are not loaded).
STEP_IR_LAYOUT = 3
#: Weight compression per variant: nncf mode name and group size (-1: one scale per output channel).
_COMPRESSION = {"int8": ("INT8_ASYM", -1), "int4": ("INT4_SYM", 128)}


class StatefulStep:
    """One step graph's infer request, its caches held as OpenVINO states (a :class:`StepRunner`)."""

    def __init__(self, compiled: Any, graph: StepGraph) -> None:
        self._compiled = compiled
        self._graph = graph
        self._request = compiled.create_infer_request()
        outputs = len(graph.output_names) - 2 * graph.layers
        self._outputs = [compiled.output(name) for name in graph.output_names[:outputs]]
        self._position = graph.input_names.index(graph.position_input)
        self._beam = [np.zeros(1, dtype=np.int32)]  # one sequence: the caches' row 0
        self._length = 0

    def fresh(self) -> StatefulStep:
        """A runner over the same compiled model with its own request and state."""
        return StatefulStep(self._compiled, self._graph)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        positions = inputs[self._position]
        length = continued_length(self._graph, positions, self._length)
        if int(positions[0]) == 0:
            self._request.reset_state()
        self._request.infer([*(t.detach().contiguous().numpy() for t in inputs), *self._beam])
        self._length = length
        return tuple(torch.from_numpy(self._request.get_tensor(port).data.copy()) for port in self._outputs)


class FrameRunner:
    """A frame graph's infer request: no state, one ``infer()`` a call."""

    def __init__(self, compiled: Any, graph: FrameGraph) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._outputs = [compiled.output(name) for name in graph.output_names]

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._request.infer([t.detach().contiguous().numpy() for t in inputs])
        return tuple(torch.from_numpy(self._request.get_tensor(port).data.copy()) for port in self._outputs)


class StatefulDecode(StepDecode):
    """:class:`StepDecode` over the compiled step models, each installation with its own infer requests."""

    def __init__(
        self, component: Any, steps: DecodeSteps, compiled: Mapping[str, Any], candidate: str, allowed: bool
    ) -> None:
        self._compiled = dict(compiled)
        super().__init__(component, steps, self._runners, candidate, allowed)

    def _runners(self) -> dict[str, StepRunner]:
        runners: dict[str, StepRunner] = {
            g.name: StatefulStep(self._compiled[g.name], g) for g in self._steps.graphs if g.name in self._compiled
        }
        frame = self._steps.frame
        if frame is not None and frame.name in self._compiled:
            runners[frame.name] = FrameRunner(self._compiled[frame.name], frame)
        return runners


def _named_model(
    module: torch.nn.Module, example: tuple[Any, ...], input_names: Any, output_names: Any, what: str
) -> Any:
    """``module`` converted to OpenVINO at ``example`` with its ports named; refused if the tracer fixed a value.

    ``what`` names the graph in errors ("slow step", "frame graph").
    """
    model, fixed = converted_model(module, example, input_names, output_names, what=what)
    if fixed:  # a value turned into a constant is wrong at every other position, length or frame
        raise ExportError(f"{what}: the tracer fixed a value that changes between calls: {fixed[0]}")
    return model


def _convert(graph: StepGraph) -> Any:
    """The step graph as a stateful OpenVINO model: named ports, cache shapes, caches as states."""
    import openvino as ov
    from openvino import passes

    example = (*graph.example_inputs, *graph.example_caches())
    model = _named_model(graph.module, example, graph.input_names, graph.output_names, f"{graph.name} step")
    cache_shape = ov.PartialShape([1, graph.kv_heads, -1, graph.head_dim])
    inputs = model.inputs[: len(graph.input_shapes)]
    shapes = {port: ov.PartialShape(list(shape)) for port, shape in zip(inputs, graph.input_shapes, strict=True)}
    shapes.update({port: cache_shape for port in model.inputs[len(graph.input_shapes) :]})
    model.reshape(shapes)
    _gather_caches_by_beam(model, graph)
    manager = passes.Manager()
    manager.register_pass(passes.MakeStateful(graph.cache_names))
    manager.run_passes(model)
    if len(model.get_sinks()) != 2 * graph.layers:
        raise RuntimeError(f"{graph.name} step: {len(model.get_sinks())} cache states, expected {2 * graph.layers}")
    _start_states_empty(model)
    return model


def _gather_caches_by_beam(model: Any, graph: StepGraph) -> None:
    """Read every cache through ``Gather(cache, beam_idx, axis 0)``, as optimum-intel's decoders do.

    With one sequence ``beam_idx`` is always ``[0]``; the gather is what OpenVINO's CPU plugin
    matches (state, gather, concat, attention) to fuse the attention with its cache: the cache is
    then appended in place and read by one attention kernel, with no concat or broadcast per layer.
    """
    import openvino as ov
    import openvino.opset13 as ops

    beam = ops.parameter(ov.PartialShape([1]), ov.Type.i32, name=BEAM_INPUT)
    beam.output(0).get_tensor().set_names({BEAM_INPUT})
    model.add_parameters([beam])
    for port in model.inputs:
        if port.get_any_name() in graph.cache_names:
            readers = list(port.get_target_inputs())
            gathered = ops.gather(port, beam, ops.constant(0))
            for reader in readers:
                reader.replace_source_output(gathered.output(0))
    model.validate_nodes_and_infer_types()


def _start_states_empty(model: Any) -> None:
    """Give every cache state an initial value with no positions (the CPU plugin's fused attention reads it)."""
    import openvino.opset13 as ops

    for op in model.get_ops():
        if op.get_type_name() == "ReadValue":
            dims = [d.get_min_length() for d in op.get_output_partial_shape(0)]
            zero = ops.constant(0.0, dtype=op.get_output_element_type(0))
            op.set_arguments([ops.broadcast(zero, ops.constant(np.array(dims, dtype=np.int64)))])
    model.validate_nodes_and_infer_types()


def _convert_frame(graph: FrameGraph) -> Any:
    """The frame graph as an OpenVINO model with named ports (nothing made stateful: it keeps no state)."""
    return _named_model(
        graph.module, graph.example_inputs, graph.input_names, graph.output_names, f"{graph.name} graph"
    )


def _compress(model: Any, variant: str) -> Any:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    mode, group = _COMPRESSION[variant]
    with contextlib.redirect_stdout(io.StringIO()), quiet_loggers("nncf"):
        if group < 0:
            return nncf.compress_weights(model, mode=getattr(nncf.CompressWeightsMode, mode))
        # A layer whose width the group size does not divide gets the largest power of two that does.
        fallback = AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST)
        return nncf.compress_weights(
            model,
            mode=getattr(nncf.CompressWeightsMode, mode),
            group_size=group,
            ratio=1.0,
            advanced_parameters=fallback,
        )


def _ir_key(graph: StepGraph | FrameGraph, component: Any, kind: str) -> str:
    from ..cache import cache_key, library_versions

    spec = {
        "artifact": kind,
        "layout": STEP_IR_LAYOUT,
        "component": component.key(),
        "graph": graph.name,
        "versions": library_versions(),
    }
    return cache_key(spec)


def _plain_kind(graph: StepGraph | FrameGraph) -> str:
    return "openvino-frame" if isinstance(graph, FrameGraph) else "openvino-stateful"


def _convert_step_name(graph: StepGraph | FrameGraph) -> str:
    return "openvino-convert-frame" if isinstance(graph, FrameGraph) else "openvino-convert-step"


def _write_plain(
    graph: StepGraph | FrameGraph, component: Any, context: BuildContext, directory: Path
) -> dict[str, Any]:
    """Convert ``graph`` and write its float IR into ``directory``."""
    import openvino as ov

    with memory_step(_convert_step_name(graph), component, context):
        model = _convert_frame(graph) if isinstance(graph, FrameGraph) else _convert(graph)
        ov.save_model(model, str(directory / "model.xml"), compress_to_fp16=False)
    return {"graph": graph.name}


def _conversions(graphs: list[StepGraph | FrameGraph], component: Any, context: BuildContext) -> list[EntryBuild]:
    """Each graph's float IR as an entry to build (its conversion is mostly one thread: they go side by side)."""
    from .memory_costs import estimate_step, weight_bytes

    return [
        EntryBuild(
            g.name,
            _ir_key(g, component, _plain_kind(g)),
            functools.partial(_write_plain, g, component, context),
            f"OpenVINO conversion of {g.name}",
            estimate_step(_convert_step_name(g), weight_bytes(component)),
        )
        for g in graphs
    ]


def _step_ir(
    graph: StepGraph | FrameGraph,
    conversion: EntryBuild,
    component: Any,
    context: BuildContext,
    variant: str,
    loaded: list[str],
    converted: ChildBuild | None = None,
) -> tuple[Path, bool]:
    """The IR of ``graph`` (float, or with ``variant`` weight compression), from the cache or made now.

    A step graph is made stateful; a frame graph (kind ``openvino-frame``) is converted as it is.
    ``conversion`` is its float IR's entry (:func:`_conversions`); ``converted`` that conversion run
    already (:func:`~uniopt.plugins.side_by_side.side_by_side`).
    """
    import openvino as ov

    base = _plain_kind(graph)
    build = entry_writer(conversion, context, converted)
    plain, plain_built = context.cache.get_or_build(conversion.key, build, kind=base, description={"graph": graph.name})
    if not plain_built:
        loaded.append(conversion.key)
    if variant == "float":
        return plain.path / "model.xml", not plain_built

    def build_compressed(directory: Path) -> dict[str, Any]:
        source = plain.path / "model.xml"
        with memory_step("nncf-weights", component, context, file_bytes(source, source.with_suffix(".bin"))):
            model = _compress(ov.Core().read_model(str(source)), variant)
            ov.save_model(model, str(directory / "model.xml"), compress_to_fp16=False)
        return {"graph": graph.name, "variant": variant}

    kind = f"{base}-{variant}"
    key = _ir_key(graph, component, kind)
    entry, built = context.cache.get_or_build(
        key,
        isolated_build(build_compressed, context, f"{variant} compression of {graph.name}"),
        kind=kind,
        description={"graph": graph.name},
    )
    if not built:
        loaded.append(key)
    return entry.path / "model.xml", not built and not plain_built


def _builder(variant: str, precision: str, name: str, frame: bool = False) -> Callable[..., Stage]:
    """A builder of ``name``: weights ``variant`` ("float", "int8", "int4"), computing in ``precision``;
    with ``frame``, the decode steps' frame graph serves each frame's inner loop in one call."""

    @rebuild_on_failure
    def build(component: Any, context: BuildContext, loaded: list[str]) -> Stage:
        import openvino as ov

        steps = component.decode_steps
        if steps is None:
            raise NotApplicable(f"component {component.name!r} declares no decode steps")
        if frame and steps.frame is None:
            raise NotApplicable(f"component {component.name!r} declares no frame graph")
        core = ov.Core()
        compiled, cached, options, first_call_bytes = {}, [], {}, 0
        graphs: list[StepGraph | FrameGraph] = [*steps.graphs]
        if frame and steps.frame is not None:  # the frame serves in place of the graph it replaces
            graphs = [*(g for g in graphs if g.name != steps.frame.replaces), steps.frame]
        conversions = _conversions(graphs, component, context)
        with side_by_side(conversions, context) as converted:
            irs = [
                _step_ir(g, c, component, context, variant, loaded, converted.get(g.name))
                for g, c in zip(graphs, conversions, strict=True)
            ]
        for graph, (path, from_cache) in zip(graphs, irs, strict=True):
            cached.append(from_cache)
            hint = "f32" if precision == "fp32" else "bf16"
            config = compile_config(context, precision, path)
            if isinstance(graph, StepGraph):
                config["KV_CACHE_PRECISION"] = hint  # the caches in the precision the step computes in
            step = f"openvino-compile-{hint}"
            if variant == "float":  # dynamic quantization applies to compressed weights only: nothing to race
                with memory_step(step, component, context, file_bytes(path, path.with_suffix(".bin"))):
                    compiled[graph.name] = core.compile_model(str(path), "CPU", config)
            else:
                compiled[graph.name], choice = compile_fastest(core, path, config, graph, component, context, step)
                options[graph.name] = choice.to_info()
            if isinstance(graph, StepGraph):  # its weights are laid out again at its first calls (of each shape)
                from_blob = bool(compiled[graph.name].get_property("LOADED_FROM_CACHE"))
                weights = file_bytes(path.with_suffix(".bin"))
                first_call_bytes += step_first_call_bytes(weights, variant != "float", from_blob)
        allowed = context.settings.fallback_on_optimization_error
        info = {
            "from_cache": all(cached),
            "precision_hint": precision,
            "weights": variant,
            "device": "CPU",
            "first_call_bytes": first_call_bytes,
        }
        if options:
            info["compile_options"] = options
        return Stage(name, StatefulDecode(component, steps, compiled, name, allowed), info)

    return build


def _steps(variant: str, hint: str, frame: bool = False) -> tuple[BuildStep, ...]:
    """The memory-checked steps of :func:`_builder`, for one graph (each graph runs the same ones)."""
    convert = (BuildStep("openvino-convert-step"), *((BuildStep("openvino-convert-frame"),) if frame else ()))
    if variant == "float":
        return (*convert, BuildStep(f"openvino-compile-{hint}"))
    return (*convert, BuildStep("nncf-weights"), BuildStep(f"openvino-compile-{hint}", "int8-file"))


def _candidates() -> list[Candidate]:
    needs = ("openvino",)
    quantized = Requirements(
        packages=(*needs, "nncf"), extra="openvino,nncf", precision="int8", setting="use_model_quantization"
    )
    return [
        Candidate(
            "openvino-stateful-f32",
            "openvino",
            "OpenVINO stateful decode steps (caches as states), f32",
            _builder("float", "fp32", "openvino-stateful-f32"),
            Requirements(packages=needs, extra=_EXTRA),
            _steps("float", "f32"),
        ),
        Candidate(
            "openvino-stateful-bf16",
            "openvino",
            "OpenVINO stateful decode steps, bf16 inference precision",
            _builder("float", "bf16", "openvino-stateful-bf16"),
            Requirements(packages=needs, extra=_EXTRA, cpu_flags_any=BF16_FLAGS, precision="bf16"),
            _steps("float", "bf16"),
        ),
        Candidate(
            "openvino-stateful-int8",
            "openvino",
            "OpenVINO stateful decode steps, nncf int8 weights (one scale per output channel), f32 activations",
            _builder("int8", "fp32", "openvino-stateful-int8"),
            quantized,
            _steps("int8", "f32"),
        ),
        Candidate(
            "openvino-stateful-int4",
            "openvino",
            "OpenVINO stateful decode steps, nncf int4 weights (groups of 128), f32 activations",
            _builder("int4", "fp32", "openvino-stateful-int4"),
            quantized,
            _steps("int4", "f32"),  # an int4 file is smaller still: the int8 one bounds it
        ),
        Candidate(
            "openvino-stateful-frame-int8",
            "openvino",
            "OpenVINO stateful slow step, the fast decoder's codebook loop as one call per frame, nncf int8 weights",
            _builder("int8", "fp32", "openvino-stateful-frame-int8", frame=True),
            quantized,
            _steps("int8", "f32", frame=True),
        ),
        Candidate(
            "openvino-stateful-frame-int4",
            "openvino",
            "OpenVINO stateful slow step, the codebook loop as one call per frame, nncf int4 weights (groups of 128)",
            _builder("int4", "fp32", "openvino-stateful-frame-int4", frame=True),
            quantized,
            _steps("int4", "f32", frame=True),
        ),
    ]


@hookimpl
def uniopt_register_candidates(register: Any) -> None:
    for candidate in _candidates():
        register(candidate)
