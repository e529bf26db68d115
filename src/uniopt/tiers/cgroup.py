"""Read the CPU quota and memory limit of this process's cgroup (v1 and v2).

Every function takes ``root`` (the filesystem root, ``/`` in production) so tests can point it at
recorded files. A process in a child cgroup sees its own limit: the path comes from
``/proc/self/cgroup``, and the tightest limit on the way up to the mount point wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["CgroupLimits", "read_cgroup_limits", "read_cgroup_memory"]

#: cgroup v1 reports "no memory limit" as a huge page-aligned number; anything above this is none.
_V1_UNLIMITED_BYTES = 1 << 60


@dataclass(frozen=True)
class CgroupLimits:
    """The limits found: ``cpu_quota`` in CPUs (None = no quota), ``memory_limit_bytes``."""

    version: int | None
    cpu_quota: float | None
    memory_limit_bytes: int | None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """Return ({v1 controller: path}, v2 path) from the text of /proc/self/cgroup."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
            continue
        for controller in controllers.split(","):
            if controller:
                v1[controller] = path
    return v1, v2


def _candidate_dirs(mount: Path, cgroup_path: str) -> list[Path]:
    """The cgroup's own directory, then its parents up to the mount point."""
    parts = [p for p in cgroup_path.split("/") if p]
    dirs = [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    return [d for d in dirs if d.is_dir()]


def _v2_cpu(dirs: list[Path]) -> float | None:
    quotas = []
    for d in dirs:
        text = _read(d / "cpu.max")
        if not text:
            continue
        fields = text.split()
        if fields[0] != "max" and len(fields) == 2 and int(fields[1]) > 0:
            quotas.append(int(fields[0]) / int(fields[1]))
    return min(quotas) if quotas else None


def _v2_memory(dirs: list[Path]) -> int | None:
    limits = []
    for d in dirs:
        text = _read(d / "memory.max")
        if text and text != "max":
            limits.append(int(text))
    return min(limits) if limits else None


def _v1_cpu(dirs: list[Path]) -> float | None:
    quotas = []
    for d in dirs:
        quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
        if quota and period and int(quota) > 0 and int(period) > 0:
            quotas.append(int(quota) / int(period))
    return min(quotas) if quotas else None


def _v1_memory(dirs: list[Path]) -> int | None:
    limits = []
    for d in dirs:
        text = _read(d / "memory.limit_in_bytes")
        if text and int(text) < _V1_UNLIMITED_BYTES:
            limits.append(int(text))
    return min(limits) if limits else None


def _v1_dirs(root: Path, v1: dict[str, str], controller: str) -> list[Path]:
    path = v1.get(controller)
    if path is None:
        return []
    base = root / "sys/fs/cgroup"
    for mount_name in (controller, "cpu,cpuacct", "cpuacct,cpu"):
        mount = base / mount_name
        if mount.is_dir():
            return _candidate_dirs(mount, path)
    return []


def read_cgroup_limits(root: Path | str = "/") -> CgroupLimits:
    """Read this process's cgroup CPU quota and memory limit under ``root``."""
    root = Path(root)
    text = _read(root / "proc/self/cgroup")
    if text is None:
        return CgroupLimits(version=None, cpu_quota=None, memory_limit_bytes=None)
    v1, v2 = _parse_proc_cgroup(text)
    unified = root / "sys/fs/cgroup"
    if v2 is not None and (unified / "cgroup.controllers").exists():
        dirs = _candidate_dirs(unified, v2)
        return CgroupLimits(version=2, cpu_quota=_v2_cpu(dirs), memory_limit_bytes=_v2_memory(dirs))
    if v1:
        return CgroupLimits(
            version=1,
            cpu_quota=_v1_cpu(_v1_dirs(root, v1, "cpu")),
            memory_limit_bytes=_v1_memory(_v1_dirs(root, v1, "memory")),
        )
    return CgroupLimits(version=None, cpu_quota=None, memory_limit_bytes=None)


#: ``memory.stat`` fields per cgroup version: page cache on the file LRU lists, and the part of it
#: the kernel cannot drop at once (mapped into a process, dirty, under writeback).
_FILE_CACHE = {
    1: (("total_active_file", "total_inactive_file"), ("total_mapped_file", "total_dirty", "total_writeback")),
    2: (("active_file", "inactive_file"), ("file_mapped", "file_dirty", "file_writeback")),
}


def _working_set(directory: Path, usage_file: str, version: int) -> int | None:
    """Usage less the page cache the kernel drops before it kills: clean, unmapped file pages.

    Active file pages count too: model files read once to be hashed or loaded stay on the active
    list, yet the kernel reclaims them under the limit like inactive ones. Pages mapped by a process
    (an IR's weights during a compile) and dirty pages are counted as used. Shared memory (tmpfs,
    memfd) is on the anonymous lists and counted as used.
    """
    usage = _read(directory / usage_file)
    if not usage:
        return None
    stat: dict[str, int] = {}
    for line in (_read(directory / "memory.stat") or "").splitlines():
        name, _, value = line.partition(" ")
        if value.strip().isdigit():
            stat[name] = int(value)
    cache_fields, pinned_fields = _FILE_CACHE[version]
    cache = sum(stat.get(f, 0) for f in cache_fields)
    reclaimable = max(0, cache - sum(stat.get(f, 0) for f in pinned_fields))
    return max(0, int(usage) - reclaimable)


def read_cgroup_memory(root: Path | str = "/") -> tuple[int, int] | None:
    """``(limit, working set)`` of the limited cgroup on this process's path with the least room left.

    None when no cgroup on the way up has a memory limit. Read afresh on every call.
    """
    root = Path(root)
    text = _read(root / "proc/self/cgroup")
    if text is None:
        return None
    v1, v2 = _parse_proc_cgroup(text)
    unified = root / "sys/fs/cgroup"
    if v2 is not None and (unified / "cgroup.controllers").exists():
        dirs, limit_file, usage_file, version = _candidate_dirs(unified, v2), "memory.max", "memory.current", 2
    elif v1:
        dirs = _v1_dirs(root, v1, "memory")
        limit_file, usage_file, version = "memory.limit_in_bytes", "memory.usage_in_bytes", 1
    else:
        return None
    tightest: tuple[int, int] | None = None
    for d in dirs:
        text = _read(d / limit_file)
        if not text or text == "max" or int(text) >= _V1_UNLIMITED_BYTES:
            continue
        used = _working_set(d, usage_file, version)
        if used is None:
            continue
        if tightest is None or int(text) - used < tightest[0] - tightest[1]:
            tightest = (int(text), used)
    return tightest
