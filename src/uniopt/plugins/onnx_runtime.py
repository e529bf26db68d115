"""ONNX Runtime candidates: FP32 with full graph optimization, dynamic int8, and FP16 on CUDA.

The ORT-optimized model is saved in the artifact cache, so a second process loads it without
exporting or optimizing again. Threads come from the one budget; providers from what is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..isolation import run_isolated
from .candidate import BuildContext, BuildStep, Candidate, Requirements, Stage
from .export import exported_onnx, graph_stage_runner, quiet_loggers, rebuild_on_failure
from .hookspecs import hookimpl
from .memory_costs import file_bytes, memory_step

__all__ = ["providers_for"]

_EXTRA = "onnx"


def providers_for(available: list[str], want_cuda: bool = False) -> list[str]:
    """The execution providers to ask for, best first, among the ones installed."""
    order = ["CUDAExecutionProvider"] if want_cuda else []
    order.append("CPUExecutionProvider")
    return [p for p in order if p in available]


def _session(path: Path, context: BuildContext, *, optimized_out: Path | None = None, cuda: bool = False) -> Any:
    import onnxruntime as ort

    options = context.threads.onnxruntime_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if optimized_out is not None:
        options.optimized_model_filepath = str(optimized_out)
        # A source with external data (a dynamo export) would otherwise be referenced from the
        # optimized model by a relative path that does not exist next to it: its own file, here.
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", optimized_out.name + ".data"
        )
    return ort.InferenceSession(str(path), options, providers=providers_for(ort.get_available_providers(), cuda))


def _derived(
    component: Any, context: BuildContext, export: Any, variant: str, make: Any, loaded: list[str]
) -> tuple[Path, bool]:
    """A model derived from the export (ORT-optimized, int8), cached under its own key."""
    from ..cache import cache_key, library_versions

    key = cache_key(
        {
            "artifact": f"onnxruntime-{variant}",
            "export": export.key,
            "versions": library_versions(),
            "host": context.profile.fingerprint,
        }
    )
    step = _DERIVE_STEPS[variant]

    def build(directory: Path) -> None:
        with memory_step(step, component, context):
            if variant == "fp32":  # an ORT session writes it: here, as sessions hang in a forked child
                make(export.path, directory / "model.onnx")
            else:  # onnx and onnxruntime.quantization only: in a child, where they stay
                what = f"{step} of {component.name}"
                run_isolated(lambda: make(export.path, directory / "model.onnx"), what, enabled=isolate)

    isolate = context.settings.isolate_builds
    entry, built = context.cache.get_or_build(
        key,
        build,
        kind=f"onnxruntime-{variant}",
        description={"from": export.key[:16]},
    )
    if not built:
        loaded.append(key)
    return entry.path / "model.onnx", not built


#: The memory-measured step (see memory_costs) behind each derived model.
_DERIVE_STEPS = {
    "fp32": "onnxruntime-optimize",
    "int8": "onnxruntime-quantize",
    "int8-7bit": "onnxruntime-quantize",
    "fp16": "onnxruntime-fp16",
}


def _loaded_session(component: Any, path: Path, context: BuildContext, *, cuda: bool = False) -> Any:
    with memory_step("onnxruntime-session", component, context, file_bytes(*path.parent.iterdir())):
        return _session(path, context, cuda=cuda)


def _stage(name: str, component: Any, session: Any, info: dict[str, Any], context: BuildContext) -> Stage:
    output_names = [o.name for o in session.get_outputs()]
    input_names = [i.name for i in session.get_inputs()]

    def run_arrays(arrays: list[Any]) -> list[Any]:
        return session.run(output_names, dict(zip(input_names, arrays, strict=True)))

    return Stage(name, graph_stage_runner(component, run_arrays, context, name), info)


@rebuild_on_failure
def _build_fp32(component: Any, context: BuildContext, loaded: list[str]) -> Stage:
    export = exported_onnx(component, context, loaded)

    def optimize(source: Path, target: Path) -> None:
        _session(source, context, optimized_out=target)

    path, cached = _derived(component, context, export, "fp32", optimize, loaded)
    session = _loaded_session(component, path, context)
    info = {
        "exporter": export.exporter,
        "from_cache": cached and export.from_cache,
        "export_seconds": export.seconds,
    }
    return _stage("onnxruntime-fp32", component, session, info, context)


@rebuild_on_failure
def _build_int8(component: Any, context: BuildContext, loaded: list[str]) -> Stage:
    export = exported_onnx(component, context, loaded)
    reduce_range = context.profile.cpu.int8_saturates

    def quantize(source: Path, target: Path) -> None:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # The dynamo exporter's value_info can disagree with ORT's shape inference after
        # quantization ("Inferred shape and existing shape differ"); shapes are re-inferred anyway.
        model = onnx.load(str(source))
        del model.graph.value_info[:]
        plain = target.with_name("plain.onnx")
        onnx.save(model, str(plain))
        with quiet_loggers(""):  # onnxruntime.quantization logs advice on the root logger
            quantize_dynamic(str(plain), str(target), weight_type=QuantType.QInt8, reduce_range=reduce_range)
        plain.unlink()

    variant = "int8-7bit" if reduce_range else "int8"
    path, cached = _derived(component, context, export, variant, quantize, loaded)
    session = _loaded_session(component, path, context)
    info = {
        "exporter": export.exporter,
        "from_cache": cached and export.from_cache,
        "weight_bits": 7 if reduce_range else 8,
    }
    return _stage("onnxruntime-int8", component, session, info, context)


@rebuild_on_failure
def _build_fp16(component: Any, context: BuildContext, loaded: list[str]) -> Stage:
    """FP16 weights and activations (inputs and outputs stay FP32), on CUDA where installed."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    export = exported_onnx(component, context, loaded)

    def convert(source: Path, target: Path) -> None:
        model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        onnx.save(model, str(target))

    path, cached = _derived(component, context, export, "fp16", convert, loaded)
    session = _loaded_session(component, path, context, cuda=True)
    info = {
        "exporter": export.exporter,
        "from_cache": cached and export.from_cache,
        "providers": session.get_providers(),
    }
    return _stage("onnxruntime-fp16", component, session, info, context)


@rebuild_on_failure
def _build_cuda(component: Any, context: BuildContext, loaded: list[str]) -> Stage:
    export = exported_onnx(component, context, loaded)
    session = _loaded_session(component, export.path, context, cuda=True)
    if "CUDAExecutionProvider" not in session.get_providers():
        raise RuntimeError("ONNX Runtime did not start its CUDA provider")
    info = {"exporter": export.exporter, "from_cache": export.from_cache}
    return _stage("onnxruntime-cuda", component, session, info, context)


_EXPORT = BuildStep("onnx-export")
_SESSION = BuildStep("onnxruntime-session")


@hookimpl
def uniopt_register_candidates(register: Any) -> None:
    needs = ("onnxruntime", "onnx")
    register(
        Candidate(
            "onnxruntime-fp32",
            "onnx_runtime",
            "ONNX Runtime FP32, all graph optimizations",
            _build_fp32,
            Requirements(packages=needs, extra=_EXTRA),
            (_EXPORT, BuildStep("onnxruntime-optimize"), _SESSION),
        )
    )
    register(
        Candidate(
            "onnxruntime-int8",
            "onnx_runtime",
            "ONNX Runtime dynamic int8 (quantize_dynamic on the ONNX graph; 7-bit weights without VNNI/AMX)",
            _build_int8,
            Requirements(packages=needs, extra=_EXTRA, precision="int8", setting="use_model_quantization"),
            (_EXPORT, BuildStep("onnxruntime-quantize"), BuildStep("onnxruntime-session", "int8-file")),
        )
    )
    register(
        Candidate(
            "onnxruntime-cuda",
            "onnx_runtime",
            "ONNX Runtime on the CUDA execution provider",
            _build_cuda,
            Requirements(packages=needs, extra=_EXTRA, providers=("CUDAExecutionProvider",)),
            (_EXPORT, _SESSION),
        )
    )
    register(
        Candidate(
            "onnxruntime-fp16",
            "onnx_runtime",
            "ONNX Runtime with an FP16 graph on the CUDA execution provider",
            _build_fp16,
            Requirements(packages=needs, extra=_EXTRA, providers=("CUDAExecutionProvider",), precision="fp16"),
            (_EXPORT, BuildStep("onnxruntime-fp16"), _SESSION),
        )
    )
