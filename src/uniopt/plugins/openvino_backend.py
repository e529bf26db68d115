"""OpenVINO candidates: f32 and bf16 with an explicit precision hint, and int8 through nncf.

OpenVINO silently runs bf16 on CPUs with avx512_bf16 (MEASURED.md), so every compiled model gets
``INFERENCE_PRECISION_HINT`` set explicitly. The IR is converted from the component's ONNX export
and kept in the artifact cache; OpenVINO's own compiled-blob cache (``CACHE_DIR``) for an IR lives
in that IR's entry (its ``runtime/`` folder), so it is counted, evicted and cleared with the IR,
and an IR rebuilt under the same path starts without blobs.
"""

from __future__ import annotations

import contextlib
import io
import threading
from pathlib import Path
from typing import Any

from ..errors import NotApplicable
from ..isolation import isolated_build
from ..tiers.cpu import BF16_FLAGS
from .candidate import BuildContext, BuildStep, Candidate, Requirements, Stage
from .export import exported_onnx, graph_stage_runner, quiet_loggers, rebuild_on_failure
from .hookspecs import hookimpl
from .memory_costs import file_bytes, memory_step

__all__ = ["compile_config"]

_EXTRA = "openvino"
_PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
_CONVOLUTIONS = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData")


def _device_for(profile: Any, precision: str) -> str:
    """The device to compile on: for f16 the first that computes FP16 (accelerators first), else CPU."""
    if precision != "fp16":
        return "CPU"
    devices = sorted(profile.backend("openvino").devices, key=lambda d: d[0] == "CPU")
    return next((name for name, caps in devices if "FP16" in caps), "CPU")


def _check_precision(compiled: Any, device: str, precision: str) -> None:
    """OpenVINO may quietly run another precision than asked (f16 becomes bf16 on CPUs without FP16)."""
    wanted = _PRECISION_HINTS[precision]
    actual = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
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


def _ir(component: Any, context: BuildContext, variant: str, loaded: list[str]) -> tuple[Path, bool, Any]:
    """The OpenVINO IR for ``variant`` (plain, int8 weights, static int8), cached."""
    import openvino as ov

    if variant in ("int8-static", "int8-matmul"):
        _calibration_arrays(component)  # not applicable without held-out calibration inputs
    export = exported_onnx(component, context, loaded)
    half_range = context.profile.cpu.int8_saturates and variant in ("int8-static", "int8-matmul")

    def build(directory: Path) -> dict[str, Any]:
        with memory_step("openvino-convert", component, context):
            model = ov.convert_model(str(export.path))
            if variant == "plain":
                ov.save_model(model, str(directory / "model.xml"), compress_to_fp16=False)
                return {"variant": variant, "half_range": half_range}
        step = "nncf-weights" if variant == "int8-weights" else "nncf-static"
        with memory_step(step, component, context):
            with contextlib.redirect_stdout(io.StringIO()), quiet_loggers("nncf"):
                model = _nncf_int8(model, component, variant, half_range)
            ov.save_model(model, str(directory / "model.xml"), compress_to_fp16=False)
        return {"variant": variant, "half_range": half_range}

    key = _ir_key(component, export.key, variant, half_range)
    entry, built = context.cache.get_or_build(
        key,
        isolated_build(build, context, f"OpenVINO {variant} IR of {component.name}"),
        kind=f"openvino-{variant}",
        description={"from": export.key[:16]},
    )
    if not built:
        loaded.append(key)
    return entry.path / "model.xml", not built and export.from_cache, export


def _float_precision(profile: Any) -> str:
    """The precision for what static int8 leaves in float: bf16 where the CPU computes it."""
    return "bf16" if profile.cpu.computes_bf16 else "fp32"


def _build(variant: str, precision: str, name: str) -> Any:
    """A builder for ``variant`` compiled with ``precision`` ("host-float": bf16 where the CPU has it)."""

    @rebuild_on_failure
    def build(component: Any, context: BuildContext, loaded: list[str]) -> Stage:
        import openvino as ov

        hint = _float_precision(context.profile) if precision == "host-float" else precision
        path, cached, export = _ir(component, context, variant, loaded)
        device = _device_for(context.profile, hint)
        ir_bytes = file_bytes(path, path.with_suffix(".bin"))
        with memory_step(f"openvino-compile-{_PRECISION_HINTS[hint]}", component, context, ir_bytes):
            compiled = ov.Core().compile_model(str(path), device, compile_config(context, hint, path))
        _check_precision(compiled, device, hint)
        request = compiled.create_infer_request()
        lock = threading.Lock()
        outputs = list(compiled.outputs)

        def run_arrays(arrays: list[Any]) -> list[Any]:
            with lock:  # one infer request per stage; stages are shared across threads
                request.infer(arrays)
                return [request.get_tensor(port).data.copy() for port in outputs]

        info = {
            "exporter": export.exporter,
            "from_cache": cached,
            "precision_hint": _PRECISION_HINTS[hint],
            "device": device,
        }
        return Stage(name, graph_stage_runner(component, run_arrays, context, name), info)

    return build


def _steps(variant: str, compile_step: str) -> tuple[BuildStep, ...]:
    """The memory-checked steps of :func:`_build` for ``variant``: export, convert, nncf, compile."""
    converted = (BuildStep("onnx-export"), BuildStep("openvino-convert"))
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
