"""Which inference backends and accelerators this host has, probed once per process."""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass

__all__ = ["BackendInfo", "GpuInfo", "probe_backends", "probe_gpus"]


@dataclass(frozen=True)
class BackendInfo:
    """One backend: installed and importable or not (with the reason), and what it offers here."""

    name: str
    available: bool
    version: str | None = None
    reason: str = ""
    providers: tuple[str, ...] = ()
    devices: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (device, supported precisions)


@dataclass(frozen=True)
class GpuInfo:
    """One accelerator: CUDA device, Intel GPU/NPU seen by OpenVINO, or Apple MPS."""

    kind: str
    name: str
    memory_bytes: int | None = None
    compute_capability: str | None = None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import(name: str) -> tuple[object | None, str]:
    try:
        return importlib.import_module(name), ""
    except ImportError as exc:  # absent, or broken on this host: both mean "not available"
        return None, f"import {name} failed: {exc}"
    except Exception as exc:  # a backend whose native library fails to load raises other errors
        return None, f"import {name} failed: {type(exc).__name__}: {exc}"


def _probe_torch() -> BackendInfo:
    torch, reason = _import("torch")
    if torch is None:
        return BackendInfo("torch", False, _version("torch"), reason)
    return BackendInfo("torch", True, torch.__version__)  # type: ignore[attr-defined]


def _probe_onnxruntime() -> BackendInfo:
    ort, reason = _import("onnxruntime")
    if ort is None:
        return BackendInfo("onnxruntime", False, _version("onnxruntime"), reason)
    providers = tuple(ort.get_available_providers())  # type: ignore[attr-defined]
    return BackendInfo("onnxruntime", True, ort.__version__, providers=providers)  # type: ignore[attr-defined]


def _probe_openvino() -> BackendInfo:
    ov, reason = _import("openvino")
    if ov is None:
        return BackendInfo("openvino", False, _version("openvino"), reason)
    core = ov.Core()  # type: ignore[attr-defined]
    devices = []
    for device in core.available_devices:
        try:
            caps = tuple(str(p) for p in core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
        except Exception:  # an accelerator plugin may refuse the query; its device still counts
            caps = ()
        devices.append((device, caps))
    return BackendInfo("openvino", True, ov.__version__, devices=tuple(devices))  # type: ignore[attr-defined]


def _probe_nncf() -> BackendInfo:
    # nncf's import is slow and prints; its presence is what matters for the doctor.
    version = _version("nncf")
    spec = importlib.util.find_spec("nncf")
    if spec is None:
        return BackendInfo("nncf", False, version, "not installed")
    return BackendInfo("nncf", True, version)


def probe_backends() -> tuple[BackendInfo, ...]:
    """torch, onnxruntime, openvino and nncf: each available or not, with the reason."""
    return (_probe_torch(), _probe_onnxruntime(), _probe_openvino(), _probe_nncf())


def probe_gpus(backends: tuple[BackendInfo, ...]) -> tuple[GpuInfo, ...]:
    """CUDA devices through torch, Intel GPU/NPU through OpenVINO's device list, Apple MPS."""
    gpus: list[GpuInfo] = []
    by_name = {b.name: b for b in backends}
    if by_name["torch"].available:
        import torch

        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(index)
                gpus.append(GpuInfo("cuda", props.name, props.total_memory, f"{props.major}.{props.minor}"))
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            gpus.append(GpuInfo("mps", "Apple MPS"))
    for device, _caps in by_name["openvino"].devices:
        if device.startswith(("GPU", "NPU")):
            gpus.append(GpuInfo(f"openvino-{device.split('.')[0].lower()}", device))
    return tuple(gpus)
