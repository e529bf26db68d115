"""Advice lines that follow from the host profile, the tier and the settings."""

from __future__ import annotations

from .settings import Settings
from .threads import ThreadBudget
from .tiers import HostProfile, Tier

__all__ = ["COMPILE_MIN_MEMORY_BYTES", "host_advice"]

#: Optional backends: (name, pip extra, what is lost without it).
_OPTIONAL_BACKENDS = (
    ("onnxruntime", "onnx", "ONNX Runtime candidates"),
    ("openvino", "openvino", "OpenVINO candidates"),
    ("nncf", "nncf", "OpenVINO int8 weight compression and static int8"),
)

#: Below this much usable memory torch.compile (inductor) tends to be killed or to swap.
COMPILE_MIN_MEMORY_BYTES = 4 * 2**30


def host_advice(profile: HostProfile, tier: Tier, settings: Settings, threads: ThreadBudget) -> list[str]:
    """What a practitioner should know about this host before optimizing on it."""
    lines: list[str] = []
    cpu = profile.cpu
    if cpu.int8_saturates:
        lines.append(
            "No VNNI or AMX: int8 matmuls have no fast path here, so int8 is unlikely to pay off "
            "(ONNX Runtime and OpenVINO static int8 keep weights to 7 bits here to avoid int16 saturation)."
        )
    if cpu.computes_bf16:
        if profile.backend("openvino").available:
            lines.append(
                "OpenVINO silently runs bf16 on this CPU unless told otherwise; uniopt always sets "
                "INFERENCE_PRECISION_HINT and validates bf16 against the FP32 reference."
            )
        lines.append("The CPU computes bf16 natively: bf16 candidates are worth measuring.")
    usable_memory = profile.memory.usable_bytes
    if usable_memory < COMPILE_MIN_MEMORY_BYTES:
        state = "off" if not settings.use_model_compilation or "torch-compile" in tier.denied else "ON"
        lines.append(
            f"{usable_memory / 2**30:.1f} GiB usable memory is below the ~4 GiB torch.compile needs; "
            f"torch.compile is {state} (USE_MODEL_COMPILATION)."
        )
    if profile.memory.limit_bytes is not None or usable_memory < COMPILE_MIN_MEMORY_BYTES:
        lines.append(_export_advice(usable_memory))
    if profile.usable_cpus < profile.cpu.logical_cores:
        lines.append(
            f"This process may use {profile.usable_cpus:g} of {profile.cpu.logical_cores} CPUs "
            f"(affinity or cgroup quota); every backend gets {threads.intra_op} thread(s)."
        )
    for name, extra, use in _OPTIONAL_BACKENDS:
        info = profile.backend(name)
        if not info.available:
            lines.append(
                f"{name} is not available ({info.reason}), so {use} are skipped: pip install 'uniopt[{extra}]'."
            )
    if tier.name == "low-resource" and settings.mode == "auto":
        lines.append("Small host: UNIOPT_MODE=tier skips the timing search for a faster first start.")
    return lines


def _export_advice(usable_memory: int) -> str:
    """How large a model this host can export itself, from the measured step costs."""
    from .memory import format_bytes
    from .plugins.memory_costs import RESERVE_BYTES, SAFETY_FACTOR, STEP_COSTS

    exports = (STEP_COSTS["onnx-export-legacy"], STEP_COSTS["onnx-export-dynamo"])
    export = max(exports, key=lambda c: c.peak_factor)
    largest = max(0, int(((usable_memory - RESERVE_BYTES) / SAFETY_FACTOR - export.fixed_bytes) / export.peak_factor))
    return (
        f"An ONNX export needs about {export.peak_factor:g}x the model's weights on top of the engine, so with "
        f"{format_bytes(usable_memory)} this host exports models below ~{format_bytes(largest)} of weights at most "
        "(less the engine itself): larger exports are refused, not killed. Build them elsewhere with "
        "`optimize prepare ENGINE --for doctor.json --out DIR` and set UNIOPT_CACHE_BUNDLE=DIR here."
    )
