"""OpenVINO candidates: f32 and bf16 with an explicit precision hint, and int8 through nncf.

OpenVINO silently runs bf16 on CPUs with avx512_bf16 (MEASURED.md), so every compiled model gets
``INFERENCE_PRECISION_HINT`` set explicitly. The IR of a component the legacy exporter traces is
converted from its module (the ONNX export is the fallback), the IR of a dynamo-exported one from
its ONNX export (see :func:`_ir`); either is kept in the artifact cache under its own key.
OpenVINO's own compiled-blob cache (``CACHE_DIR``) for an IR lives in that IR's entry (its
``runtime/`` folder), so it is counted, evicted and cleared with the IR, and an IR rebuilt under
the same path starts without blobs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..cache.files import is_unwritable
from ..errors import MemoryBudgetError, NotApplicable, StepKilledError
from ..isolation import isolated_build
from ..optimizer.component import Metric
from ..tiers.cpu import BF16_FLAGS
from .candidate import TRIAL_PROCESS, BuildContext, BuildStep, Candidate, Requirements, Stage
from .export import (
    ExportError,
    exported_onnx,
    exporter,
    graph_stage_runner,
    quiet_loggers,
    rebuild_on_failure,
    tracer_warnings,
)
from .fallback import first_line
from .hookspecs import hookimpl
from .memory_costs import file_bytes, memory_step
from .openvino_trial import TrialProcess, TrialUnavailable, trial_wanted

__all__ = ["IrModel", "compile_config", "converted_model", "module_input_shapes", "module_model"]

log = logging.getLogger("uniopt")

_EXTRA = "openvino"
_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
#: Version of the checks an IR converted from the module passes before it is kept.
MODULE_CHECKS = 1
_CONVOLUTIONS = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData")


def _device_for(profile: Any, precision: str) -> str:
    """The device to compile on: for f16 the first that computes FP16 (accelerators first), else CPU."""
    if precision != "fp16":
        return "CPU"
    devices = sorted(profile.backend("openvino").devices, key=lambda d: d[0] == "CPU")
    return next((name for name, caps in devices if "FP16" in caps), "CPU")


def _check_precision(actual: str, device: str, precision: str) -> None:
    """OpenVINO may quietly run another precision than asked (f16 becomes bf16 on CPUs without FP16)."""
    wanted = _PRECISION_HINTS[precision]
    if actual != wanted:
        raise RuntimeError(f"OpenVINO {device} runs {actual} when asked for {wanted}")


def compile_config(context: BuildContext, precision: str, model: Path) -> dict[str, str]:
    """The ``compile_model`` properties for the IR ``model``: explicit precision, latency hint, threads, cache.

    ``CACHE_DIR`` is the runtime folder of the cache entry that holds ``model``
    (:meth:`~uniopt.cache.ArtifactCache.runtime_dir`); none for a model outside the cache.
    """
    config = {
        "INFERENCE_PRECISION_HINT": _PRECISION_HINTS[precision],
        "PERFORMANCE_HINT": "LATENCY",
        **context.threads.openvino_config(),
    }
    folder = None if context.cache is None else context.cache.runtime_dir(Path(model).parent)
    if folder is not None:
        config["CACHE_DIR"] = str(folder)
    return config


def _calibration_arrays(component: Any) -> list[list[Any]]:
    """The held-out calibration inputs as arrays: static int8 is never calibrated on what the guard checks."""
    sets = component.int8_calibration_inputs()
    if not sets:
        raise NotApplicable("static int8 needs calibration inputs besides the example and the first, which are checked")
    return [[t.detach().cpu().numpy() for t in inputs] for inputs in sets]


def _nncf_int8(model: Any, component: Any, variant: str, half_range: bool) -> Any:
    """Quantize with nncf; ``half_range`` keeps every weight to 7 bits (hosts where int8 saturates)."""
    import nncf

    if variant == "int8-weights":
        return nncf.compress_weights(model)
    names = [p.get_any_name() for p in model.inputs]
    samples = _calibration_arrays(component)
    dataset = nncf.Dataset(samples, lambda arrays: dict(zip(names, arrays, strict=True)))
    overflow_fix = nncf.OverflowFix.ENABLE if half_range else nncf.OverflowFix.FIRST_LAYER
    advanced = nncf.AdvancedQuantizationParameters(overflow_fix=overflow_fix)
    if variant == "int8-matmul":
        # nncf's transformer preset (SmoothQuant, float softmax/norms) with the convolutions left in
        # float: on wav2vec2 the quantized feature-extractor convolutions are what costs accuracy.
        return nncf.quantize(
            model,
            dataset,
            subset_size=len(samples),
            model_type=nncf.ModelType.TRANSFORMER,
            ignored_scope=nncf.IgnoredScope(types=list(_CONVOLUTIONS), validate=False),
            advanced_parameters=advanced,
        )
    return nncf.quantize(model, dataset, subset_size=len(samples), advanced_parameters=advanced)


def _port_types() -> dict[torch.dtype, Any]:
    import openvino as ov

    return {
        torch.float32: ov.Type.f32,
        torch.float16: ov.Type.f16,
        torch.bfloat16: ov.Type.bf16,
        torch.int64: ov.Type.i64,
        torch.int32: ov.Type.i32,
        torch.bool: ov.Type.boolean,
    }


_PORT_TYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool)


def module_input_shapes(component: Any) -> list[tuple[Any, Any]]:
    """Per input, its ``PartialShape`` (-1 on the declared dynamic axes) and element type, for ``convert_model``."""
    import openvino as ov

    types = _port_types()
    shapes = []
    for name, tensor in zip(component.input_names, component.example_inputs, strict=True):
        dynamic = {axis % tensor.dim() for axis in component.dynamic_axes.get(name, {})}
        dims = [-1 if i in dynamic else int(n) for i, n in enumerate(tensor.shape)]
        shapes.append((ov.PartialShape(dims), types[tensor.dtype]))
    return shapes


def _ir_key(component: Any, export_key: str, variant: str, half_range: bool) -> str:
    """The cache key of an IR: its export, variant, versions, and for static int8 the calibration data."""
    from ..cache import cache_key, library_versions

    calibrated = variant in ("int8-static", "int8-matmul")
    return cache_key(
        {
            "artifact": f"openvino-{variant}",
            "export": export_key,
            "versions": library_versions(),
            "half_range": half_range,
            "calibration": component.calibration_key() if calibrated else None,
            "calibrated_on": "held-out" if calibrated else None,
        }
    )


@dataclass(frozen=True)
class IrModel:
    """An IR in the cache and where it came from: ``source`` is "module" or the exporter of its ONNX file."""

    path: Path
    from_cache: bool
    source: str
    #: Why the IR was not converted from the module, when that was tried and failed.
    fallback: str = ""


def _save_ir(
    model: Any, component: Any, context: BuildContext, variant: str, half_range: bool, directory: Path
) -> dict[str, Any]:
    """Save ``model`` as the IR of ``variant``: as it is (plain), or compressed by nncf first."""
    import openvino as ov

    if variant != "plain":
        step = "nncf-weights" if variant == "int8-weights" else "nncf-static"
        with memory_step(step, component, context):
            with contextlib.redirect_stdout(io.StringIO()), quiet_loggers("nncf"):
                model = _nncf_int8(model, component, variant, half_range)
            ov.save_model(model, str(directory / "model.xml"), compress_to_fp16=False)
        return {"variant": variant, "half_range": half_range}
    ov.save_model(model, str(directory / "model.xml"), compress_to_fp16=False)
    return {"variant": variant, "half_range": half_range}


def _module_ir_key(component: Any, variant: str, half_range: bool) -> str:
    """The cache key of an IR converted from the module itself (no ONNX file in between)."""
    from ..cache import cache_key, library_versions

    calibrated = variant in ("int8-static", "int8-matmul")
    return cache_key(
        {
            "artifact": f"openvino-{variant}",
            "source": "module",
            "component": component.key(),
            "checks": MODULE_CHECKS,
            "versions": library_versions(),
            "half_range": half_range,
            "calibration": component.calibration_key() if calibrated else None,
            "calibrated_on": "held-out" if calibrated else None,
        }
    )


def _ir_from_module(
    component: Any, context: BuildContext, variant: str, half_range: bool, loaded: list[str]
) -> IrModel:
    """The IR of ``variant`` converted straight from the PyTorch module, cached."""

    def build(directory: Path) -> dict[str, Any]:
        import openvino as ov

        converted = directory / ("model.xml" if variant == "plain" else "converted.xml")
        with memory_step("openvino-convert-module", component, context):
            model, warned = module_model(component)
            ov.save_model(model, str(converted), compress_to_fp16=False)
            del model
        if warned and component.dynamic_axes:
            # Checked from the saved file once the converted model is freed: the check's compile and
            # calls never add to the conversion's peak.
            with memory_step("openvino-check-module", component, context, file_bytes(converted.with_suffix(".bin"))):
                _check_ir_sizes(component, converted, warned)
        if variant == "plain":
            return {"variant": variant, "half_range": half_range}
        extra = _save_ir(ov.Core().read_model(str(converted)), component, context, variant, half_range, directory)
        converted.unlink()
        converted.with_suffix(".bin").unlink()
        return extra

    key = _module_ir_key(component, variant, half_range)
    entry, built = context.cache.get_or_build(
        key,
        isolated_build(build, context, f"OpenVINO {variant} IR of {component.name} from the module"),
        kind=f"openvino-{variant}",
        description={"from": "module"},
    )
    if not built:
        loaded.append(key)
    return IrModel(entry.path / "model.xml", not built, "module")


def _ir_from_onnx(
    component: Any, context: BuildContext, variant: str, half_range: bool, loaded: list[str], fallback: str = ""
) -> IrModel:
    """The IR of ``variant`` converted from the component's ONNX export, cached."""
    import openvino as ov

    export = exported_onnx(component, context, loaded)

    def build(directory: Path) -> dict[str, Any]:
        with memory_step("openvino-convert", component, context):
            model = ov.convert_model(str(export.path))
            if variant == "plain":
                return _save_ir(model, component, context, variant, half_range, directory)
        return _save_ir(model, component, context, variant, half_range, directory)

    key = _ir_key(component, export.key, variant, half_range)
    entry, built = context.cache.get_or_build(
        key,
        isolated_build(build, context, f"OpenVINO {variant} IR of {component.name}"),
        kind=f"openvino-{variant}",
        description={"from": export.key[:16]},
    )
    if not built:
        loaded.append(key)
    return IrModel(entry.path / "model.xml", not built and export.from_cache, export.exporter, fallback)


def _ir(component: Any, context: BuildContext, variant: str, loaded: list[str]) -> IrModel:
    """The OpenVINO IR for ``variant`` (plain, int8 weights, static int8), cached.

    A component traced by the legacy exporter is converted from its module: on wav2vec2-base
    ``benchmarks/export_memory.py`` measured 285 MiB peak against 1223 MiB for the legacy ONNX
    export and its conversion, with the same outputs at three lengths. When that conversion fails
    or differs from eager at another size, the IR is converted from the ONNX export instead (and
    an IR of that kind already in the cache is used without trying the module again). A
    dynamo-exported component keeps its ONNX export, which writes its weights straight to disk:
    on the TTS codec that export and its conversion peak at 249 MiB, the conversion from the
    module at 420 MiB. Static int8 is quantized on the IR converted from the ONNX export: nncf's
    static int8 of the wav2vec2 IR converted from the module failed the guard in ``optimize bench
    phoneme`` (ctc_agreement 0.933 < 0.98).
    """
    if variant in ("int8-static", "int8-matmul"):
        _calibration_arrays(component)  # not applicable without held-out calibration inputs
    half_range = context.profile.cpu.int8_saturates and variant in ("int8-static", "int8-matmul")
    if component.exporter != "legacy" or not _converts_from_module(component) or variant in _STATIC_INT8:
        return _ir_from_onnx(component, context, variant, half_range, loaded)
    if context.cache.get(_module_ir_key(component, variant, half_range)) is None and _onnx_ir_cached(
        component, context, variant, half_range
    ):
        return _ir_from_onnx(component, context, variant, half_range, loaded, "converted from ONNX before")
    try:
        return _ir_from_module(component, context, variant, half_range, loaded)
    except MemoryBudgetError:
        raise
    except Exception as exc:  # the PyTorch frontend's failures are many; the ONNX path may work
        if is_unwritable(exc):
            raise
        reason = f"{type(exc).__name__}: {first_line(exc)}"
        log.info(
            "%s: OpenVINO conversion from the module failed (%s); converting the ONNX export", component.name, reason
        )
        return _ir_from_onnx(component, context, variant, half_range, loaded, reason)


def _converts_from_module(component: Any) -> bool:
    """Whether every input is a tensor of a type the IR's input ports can declare."""
    return all(isinstance(t, torch.Tensor) and t.dtype in _PORT_TYPES for t in component.example_inputs)


def _onnx_ir_cached(component: Any, context: BuildContext, variant: str, half_range: bool) -> bool:
    from ..cache import cache_key
    from .export import export_key

    key = _ir_key(component, cache_key(export_key(component)), variant, half_range)
    return context.cache.get(key) is not None


def module_model(component: Any) -> tuple[Any, list[str]]:
    """The component's module converted by OpenVINO's PyTorch frontend, its ports named as the component's.

    Also returns the tracer's warnings (values it fixed: the model is then checked at other sizes).
    Raises :class:`~uniopt.plugins.export.ExportError` when the ports do not match the component's.
    """
    return converted_model(
        component.module.eval(),
        tuple(component.example_inputs),
        list(component.input_names),
        list(component.output_names),
        input_shapes=module_input_shapes(component),
    )


def converted_model(
    module: torch.nn.Module,
    example: tuple[Any, ...],
    input_names: list[str] | tuple[str, ...],
    output_names: list[str] | tuple[str, ...],
    *,
    what: str = "",
    input_shapes: Any = None,
) -> tuple[Any, list[str]]:
    """``module`` converted by OpenVINO's PyTorch frontend at ``example``, its ports named; and the tracer's warnings.

    No ``output_names`` leaves the outputs unnamed, of any number. ``what`` names the graph in errors.
    """
    import openvino as ov
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    names, outputs = list(input_names), list(output_names)
    shapes = {} if input_shapes is None else {"input": input_shapes}
    with (
        torch.no_grad(),
        contextlib.redirect_stdout(io.StringIO()),
        quiet_loggers("openvino", "torch"),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        # The tracer's own check traces the module a second time on the same example (1.5-2 s of a
        # TTS decode step's conversion) and cannot see a value fixed by it: the guard runs the stage.
        traced = TorchScriptPythonDecoder(module, example_input=example, trace_kwargs={"check_trace": False})
        model = ov.convert_model(traced, example_input=example, **shapes)
    if len(model.inputs) != len(names) or (outputs and len(model.outputs) != len(outputs)):
        raise ExportError(
            f"{what + ' ' if what else ''}converted to {len(model.inputs)} inputs / {len(model.outputs)} outputs, "
            f"expected {len(names)} / {len(outputs) or 'any'}"
        )
    for port, name in zip(model.inputs, names, strict=True):
        port.get_tensor().set_names({name})
    for port, name in zip(model.outputs, outputs, strict=False):
        port.get_tensor().set_names({name})
    return model, tracer_warnings(caught)


def _elements(inputs: Any) -> int:
    return sum(t.numel() for t in inputs if isinstance(t, torch.Tensor))


def _smaller_variants(variants: list[Any], example: Any) -> list[Any]:
    """The variants no larger than the example (else the smallest one).

    A value the tracer fixed is wrong at every other size; a smaller one shows it without the
    activations of the largest input (on wav2vec2-base a 20 s chunk adds ~600 MiB to the check).
    The guard runs the stage at every variant afterwards.
    """
    smaller = [v for v in variants if _elements(v) <= _elements(example)]
    return smaller or sorted(variants, key=_elements)[:1]


def _check_ir_sizes(component: Any, path: Path, warned: list[str]) -> None:
    """Run the IR in f32 at other sizes (:func:`_smaller_variants`); raise :class:`ExportError` where it differs."""
    import openvino as ov

    from ..optimizer.guard import check_outputs, flatten_outputs, run_reference
    from ..optimizer.shapes import shape_variants

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for inputs in _smaller_variants(shape_variants(component), component.example_inputs):
        try:
            expected = run_reference(component.module, inputs)
        except Exception:  # not a size this module takes: nothing to compare
            continue
        shape = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
        try:
            result = compiled([t.detach().cpu().numpy() for t in inputs])
        except Exception as exc:
            raise ExportError(f"the IR fails at input shape {shape} ({warned[0]}): {first_line(exc)}") from exc
        leaves, spec = flatten_outputs(expected)
        arrays = [result[port] for port in compiled.outputs]
        got = pytree.tree_unflatten([torch.from_numpy(a) for a in arrays], spec)
        verdict = check_outputs(
            expected,
            got,
            precision="fp32",
            metric=Metric("allclose", 0.0),
            atol=exporter.SHAPE_ATOL,
            rtol=exporter.SHAPE_RTOL,
        )
        if not verdict.passed:
            raise ExportError(f"the IR is wrong at input shape {shape} ({warned[0]}): {verdict.reason}")


def _in_process(
    path: Path, device: str, hint: str, config: dict[str, str], ir_bytes: int, component: Any, context: BuildContext
) -> Any:
    """``run_arrays`` of the IR at ``path`` compiled in this process."""
    import openvino as ov

    with memory_step(f"openvino-compile-{_PRECISION_HINTS[hint]}", component, context, ir_bytes):
        compiled = ov.Core().compile_model(str(path), device, config)
    _check_precision(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(), device, hint)
    request = compiled.create_infer_request()
    lock = threading.Lock()
    outputs = list(compiled.outputs)

    def run_arrays(arrays: list[Any]) -> list[Any]:
        with lock:  # one infer request per stage; stages are shared across threads
            request.infer(arrays)
            return [request.get_tensor(port).data.copy() for port in outputs]

    return run_arrays


def _float_precision(profile: Any) -> str:
    """The precision for what static int8 leaves in float: bf16 where the CPU computes it."""
    return "bf16" if profile.cpu.computes_bf16 else "fp32"


def _build(variant: str, precision: str, name: str) -> Any:
    """A builder for ``variant`` compiled with ``precision`` ("host-float": bf16 where the CPU has it)."""

    @rebuild_on_failure
    def build(component: Any, context: BuildContext, loaded: list[str]) -> Stage:
        hint = _float_precision(context.profile) if precision == "host-float" else precision
        ir = _ir(component, context, variant, loaded)
        path, cached = ir.path, ir.from_cache
        device = _device_for(context.profile, hint)
        ir_bytes = file_bytes(path, path.with_suffix(".bin"))
        config = compile_config(context, hint, path)
        run_arrays, trial = None, None
        if trial_wanted(context):
            try:
                with memory_step(f"openvino-trial-{_PRECISION_HINTS[hint]}", component, context, ir_bytes):
                    trial = TrialProcess(path, device, config, f"{name} of {component.name}")
                run_arrays = trial.run_arrays
            except StepKilledError:
                raise
            except (MemoryBudgetError, TrialUnavailable) as exc:  # compiled in this process instead
                log.info("%s: %s in the engine's process (%s)", component.name, name, exc)
        if trial is not None:
            try:
                _check_precision(trial.precision, device, hint)
            except BaseException:
                trial.close()
                raise
        if run_arrays is None:
            run_arrays = _in_process(path, device, hint, config, ir_bytes, component, context)

        info: dict[str, Any] = {
            "exporter": ir.source,
            "converted_from": "module" if ir.source == "module" else "onnx",
            "from_cache": cached,
            "precision_hint": _PRECISION_HINTS[hint],
            "device": device,
        }
        if trial is not None:
            info[TRIAL_PROCESS] = trial
        if ir.fallback:
            info["module_conversion_failed"] = ir.fallback
        return Stage(name, graph_stage_runner(component, run_arrays, context, name), info)

    return build


#: Variants quantized with calibration data; their IR is always converted from the ONNX export.
_STATIC_INT8 = ("int8-static", "int8-matmul")


def _steps(variant: str, compile_step: str) -> tuple[BuildStep, ...]:
    """The memory-checked steps of :func:`_build` for ``variant``: conversion (see :func:`_ir`), nncf, compile.

    Auto mode's compile in a trial process (``openvino-trial-*``) is not declared: where it does not
    fit, the model is compiled in the engine's process, so the compile step is what a build needs.
    """
    static = variant in _STATIC_INT8
    converted = (BuildStep("onnx-export"), BuildStep("openvino-convert")) if static else (BuildStep("openvino-ir"),)
    if variant == "plain":
        return (*converted, BuildStep(compile_step))
    nncf = BuildStep("nncf-weights" if variant == "int8-weights" else "nncf-static")
    return (*converted, nncf, BuildStep(compile_step, "int8-file"))


@hookimpl
def uniopt_register_candidates(register: Any) -> None:
    needs = ("openvino", "onnx")
    register(
        Candidate(
            "openvino-f32",
            "openvino",
            "OpenVINO CPU, f32 forced",
            _build("plain", "fp32", "openvino-f32"),
            Requirements(packages=needs, extra=_EXTRA),
            _steps("plain", "openvino-compile-f32"),
        )
    )
    register(
        Candidate(
            "openvino-bf16",
            "openvino",
            "OpenVINO CPU, bf16 inference precision",
            _build("plain", "bf16", "openvino-bf16"),
            Requirements(packages=needs, extra=_EXTRA, cpu_flags_any=BF16_FLAGS, precision="bf16"),
            _steps("plain", "openvino-compile-bf16"),
        )
    )
    register(
        Candidate(
            "openvino-f16",
            "openvino",
            "OpenVINO f16 inference precision, on a device that computes FP16 (GPU, NPU, or such a CPU)",
            _build("plain", "fp16", "openvino-f16"),
            Requirements(packages=needs, extra=_EXTRA, openvino_capability="FP16", precision="fp16"),
            _steps("plain", "openvino-compile-f16"),
        )
    )
    register(
        Candidate(
            "openvino-int8-weights",
            "openvino",
            "OpenVINO with nncf int8 weight compression (data-free)",
            _build("int8-weights", "int8", "openvino-int8-weights"),
            Requirements(
                packages=(*needs, "nncf"), extra="openvino,nncf", precision="int8", setting="use_model_quantization"
            ),
            _steps("int8-weights", "openvino-compile-f32"),
        )
    )
    register(
        Candidate(
            "openvino-int8-static",
            "openvino",
            "OpenVINO with nncf static int8, calibrated on held-out calibration inputs",
            _build("int8-static", "int8", "openvino-int8-static"),
            Requirements(
                packages=(*needs, "nncf"), extra="openvino,nncf", precision="int8", setting="use_model_quantization"
            ),
            _steps("int8-static", "openvino-compile-f32"),
        )
    )
    register(
        Candidate(
            "openvino-int8-matmul",
            "openvino",
            "OpenVINO with nncf static int8 on the matmuls (transformer preset), convolutions and the rest"
            " in bf16 where the CPU has it, else f32",
            _build("int8-matmul", "host-float", "openvino-int8-matmul"),
            Requirements(
                packages=(*needs, "nncf"), extra="openvino,nncf", precision="int8", setting="use_model_quantization"
            ),
            _steps("int8-matmul", "openvino-compile-bf16"),  # bf16 and f32 compiles cost the same
        )
    )
