"""CPU facts: model, vendor, cores, usable CPUs, and the instruction sets that matter for inference."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BF16_FLAGS", "FLAG_NAMES", "CpuInfo", "flags_from", "parse_proc_cpuinfo", "read_cpu_info", "usable_cpus"]

#: The instruction-set flags uniopt reports, and the /proc/cpuinfo flags that imply each.
FLAG_SOURCES: dict[str, tuple[str, ...]] = {
    "avx2": ("avx2",),
    "avx512f": ("avx512f",),
    "avx512_vnni": ("avx512_vnni",),
    "avx512_bf16": ("avx512_bf16",),
    "avx_vnni": ("avx_vnni",),
    "amx_tile": ("amx_tile",),
    "amx_int8": ("amx_int8",),
    "amx_bf16": ("amx_bf16",),
    "neon": ("asimd", "neon"),
    "sve": ("sve",),
}
FLAG_NAMES: tuple[str, ...] = (*FLAG_SOURCES, "amx")
#: Flags that mean the CPU computes bf16 natively (either is enough).
BF16_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    """What /proc/cpuinfo (or py-cpuinfo elsewhere) says about the processor."""

    model: str
    vendor: str
    architecture: str
    physical_cores: int
    logical_cores: int
    flags: tuple[tuple[str, bool], ...]

    def has(self, flag: str) -> bool:
        """Whether the CPU has ``flag`` (one of :data:`FLAG_NAMES`)."""
        return dict(self.flags)[flag]

    @property
    def is_x86(self) -> bool:
        """Whether this is an x86 processor."""
        return self.architecture in ("x86_64", "AMD64", "i686")

    @property
    def computes_bf16(self) -> bool:
        """Whether the CPU has bf16 instructions (one of :data:`BF16_FLAGS`)."""
        return any(self.has(flag) for flag in BF16_FLAGS)

    @property
    def int8_saturates(self) -> bool:
        """x86 without VNNI or AMX: int8 products are summed in int16 (``VPMADDUBSW``) and can saturate.

        Kernels that multiply unsigned 8-bit activations by signed 8-bit weights then need one of the
        two kept to 7 bits (ONNX Runtime's ``reduce_range``; PyTorch's fbgemm does it on activations).
        """
        return self.is_x86 and not (self.has("avx512_vnni") or self.has("avx_vnni") or self.has("amx"))


def flags_from(raw_flags: Iterable[str]) -> tuple[tuple[str, bool], ...]:
    """Map raw CPU flag names to uniopt's flag set; ``amx`` means tile + int8 or bf16."""
    raw = {f.lower() for f in raw_flags}
    flags = {name: any(src in raw for src in sources) for name, sources in FLAG_SOURCES.items()}
    flags["amx"] = flags["amx_tile"] and (flags["amx_int8"] or flags["amx_bf16"])
    return tuple(sorted(flags.items()))


def parse_proc_cpuinfo(text: str, architecture: str = "x86_64") -> CpuInfo:
    """Parse the text of /proc/cpuinfo (x86 or ARM)."""
    processors: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                processors.append(current)
                current = {}
            continue
        key, _, value = line.partition(":")
        current[key.strip()] = value.strip()
    if current:
        processors.append(current)
    processors = [p for p in processors if "processor" in p]
    first = processors[0] if processors else {}
    raw_flags = (first.get("flags") or first.get("Features") or "").split()
    cores = {(p.get("physical id", "0"), p.get("core id", p["processor"])) for p in processors}
    model = first.get("model name") or first.get("Processor") or first.get("CPU part", "unknown")
    vendor = first.get("vendor_id") or first.get("CPU implementer", "unknown")
    logical = max(len(processors), 1)
    return CpuInfo(
        model=model,
        vendor=vendor,
        architecture=architecture,
        physical_cores=max(len(cores), 1),
        logical_cores=logical,
        flags=flags_from(raw_flags),
    )


def _read_with_py_cpuinfo() -> CpuInfo:
    import cpuinfo  # py-cpuinfo: portable, but slow (it may start a subprocess)

    info = cpuinfo.get_cpu_info()
    logical = os.cpu_count() or 1
    return CpuInfo(
        model=info.get("brand_raw", "unknown"),
        vendor=info.get("vendor_id_raw", "unknown"),
        architecture=info.get("arch_string_raw", platform.machine()),
        physical_cores=_psutil_physical_cores() or logical,
        logical_cores=logical,
        flags=flags_from(info.get("flags", [])),
    )


def _psutil_physical_cores() -> int | None:
    import psutil

    return psutil.cpu_count(logical=False)


def read_cpu_info(root: Path | str = "/") -> CpuInfo:
    """Read the CPU facts: /proc/cpuinfo on Linux, py-cpuinfo elsewhere."""
    path = Path(root) / "proc/cpuinfo"
    if path.exists():
        return parse_proc_cpuinfo(path.read_text(), architecture=platform.machine())
    return _read_with_py_cpuinfo()


def usable_cpus(logical_cores: int, affinity: int | None, cgroup_quota: float | None) -> float:
    """CPUs this process can really use: the least of cores, affinity and cgroup quota."""
    limits: list[float] = [float(logical_cores)]
    if affinity:
        limits.append(float(affinity))
    if cgroup_quota:
        limits.append(cgroup_quota)
    return round(min(limits), 2)


def process_affinity() -> int | None:
    """How many CPUs this process may be scheduled on, or None where the OS cannot say."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return None
