"""The host profile: one frozen, hashable description of this machine, read once per process."""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .backends import BackendInfo, GpuInfo, probe_backends, probe_gpus
from .cgroup import read_cgroup_limits
from .cpu import CpuInfo, process_affinity, read_cpu_info, usable_cpus

__all__ = ["HostProfile", "MemoryInfo", "host_profile", "read_host_profile"]


@dataclass(frozen=True)
class MemoryInfo:
    """Physical memory and the cgroup memory limit (None when there is none)."""

    total_bytes: int
    available_bytes: int
    limit_bytes: int | None

    @property
    def usable_bytes(self) -> int:
        """The memory this process can count on: the least of total and the limit."""
        return min(self.total_bytes, self.limit_bytes or self.total_bytes)


@dataclass(frozen=True)
class HostProfile:
    """Everything about the host that changes which optimization wins."""

    cpu: CpuInfo
    usable_cpus: float
    affinity_cpus: int | None
    cgroup_version: int | None
    cgroup_cpu_quota: float | None
    memory: MemoryInfo
    gpus: tuple[GpuInfo, ...]
    backends: tuple[BackendInfo, ...]
    os: str
    python: str

    def backend(self, name: str) -> BackendInfo:
        """The probe result for backend ``name`` (torch, onnxruntime, openvino, nncf)."""
        for info in self.backends:
            if info.name == name:
                return info
        return BackendInfo(name, False, reason="not probed")

    @property
    def fingerprint(self) -> str:
        """sha256 of the fields that change performance; part of every cache key."""
        facts = {
            "cpu": [self.cpu.model, self.cpu.architecture, self.cpu.physical_cores, self.cpu.flags],
            "usable_cpus": self.usable_cpus,
            "usable_memory_bytes": self.memory.usable_bytes,
            "gpus": [(g.kind, g.name) for g in self.gpus],
            "backends": [(b.name, b.available, b.version, b.providers) for b in self.backends],
        }
        blob = json.dumps(facts, sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data, in the schema ``optimize doctor --json`` prints."""
        return {
            "cpu": {
                "model": self.cpu.model,
                "vendor": self.cpu.vendor,
                "architecture": self.cpu.architecture,
                "physical_cores": self.cpu.physical_cores,
                "logical_cores": self.cpu.logical_cores,
                "affinity_cpus": self.affinity_cpus,
                "cgroup_cpu_quota": self.cgroup_cpu_quota,
                "usable_cpus": float(self.usable_cpus),
                "flags": dict(self.cpu.flags),
            },
            "memory": {
                "total_bytes": self.memory.total_bytes,
                "available_bytes": self.memory.available_bytes,
                "limit_bytes": self.memory.limit_bytes,
            },
            "cgroup_version": self.cgroup_version,
            "gpus": [asdict(g) for g in self.gpus],
            "backends": {
                b.name: {
                    "available": b.available,
                    "version": b.version,
                    "reason": b.reason,
                    "providers": list(b.providers),
                    "devices": {d: list(p) for d, p in b.devices},
                }
                for b in self.backends
            },
            "os": self.os,
            "python": self.python,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HostProfile:
        """The profile ``to_dict`` (``optimize doctor --json``) printed, for building on another machine.

        Raises ``ValueError`` when the data is not such a profile or its fingerprint does not match.
        """
        try:
            cpu, memory = data["cpu"], data["memory"]
            profile = cls(
                cpu=CpuInfo(
                    model=cpu["model"],
                    vendor=cpu["vendor"],
                    architecture=cpu["architecture"],
                    physical_cores=int(cpu["physical_cores"]),
                    logical_cores=int(cpu["logical_cores"]),
                    flags=tuple((str(k), bool(v)) for k, v in cpu["flags"].items()),
                ),
                usable_cpus=float(cpu["usable_cpus"]),
                affinity_cpus=cpu["affinity_cpus"],
                cgroup_version=data["cgroup_version"],
                cgroup_cpu_quota=cpu["cgroup_cpu_quota"],
                memory=MemoryInfo(int(memory["total_bytes"]), int(memory["available_bytes"]), memory["limit_bytes"]),
                gpus=tuple(GpuInfo(**g) for g in data["gpus"]),
                backends=tuple(
                    BackendInfo(
                        name,
                        bool(b["available"]),
                        b["version"],
                        b["reason"],
                        tuple(b["providers"]),
                        tuple((d, tuple(p)) for d, p in b["devices"].items()),
                    )
                    for name, b in data["backends"].items()
                ),
                os=data["os"],
                python=data["python"],
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"not a uniopt host profile (optimize doctor --json): {exc!r}") from exc
        if "fingerprint" in data and data["fingerprint"] != profile.fingerprint:
            raise ValueError("the profile's fingerprint does not match its facts (edited, or another uniopt version)")
        return profile


def read_host_profile(root: Path | str = "/", *, probe: bool = True) -> HostProfile:
    """Read the profile under ``root``; ``probe=False`` skips importing backends (for tests)."""
    import psutil

    cpu = read_cpu_info(root)
    limits = read_cgroup_limits(root)
    affinity = process_affinity() if Path(root) == Path("/") else None
    vm = psutil.virtual_memory()
    backends = probe_backends() if probe else ()
    return HostProfile(
        cpu=cpu,
        usable_cpus=usable_cpus(cpu.logical_cores, affinity, limits.cpu_quota),
        affinity_cpus=affinity,
        cgroup_version=limits.version,
        cgroup_cpu_quota=limits.cpu_quota,
        memory=MemoryInfo(vm.total, vm.available, limits.memory_limit_bytes),
        gpus=probe_gpus(backends) if probe else (),
        backends=backends,
        os=f"{platform.system()} {platform.release()}",
        python=sys.version.split()[0],
    )


@functools.cache
def host_profile() -> HostProfile:
    """This process's host profile, read once."""
    return read_host_profile()
