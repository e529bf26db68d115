"""Run a command inside a cgroup the size of the small VM uniopt exists for (root only).

    python scripts/small_vm.py [--cpus 1.3] [--memory-mib 1536] -- COMMAND [ARG ...]

Creates a child cgroup of this process's own (v1: cpu + memory hierarchies; v2: one child with
``cpu.max`` and ``memory.max``), runs COMMAND in it, then prints one JSON line on stderr:
the exit code, whether the OOM killer struck, and the cgroup's peak memory. Tests and benchmarks
import :func:`small_vm` for the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
LIMIT_1_5_GIB = 1610612736


class Unavailable(RuntimeError):
    """No cgroup of that size can be made here (not root, no controller, read-only cgroupfs)."""


@dataclass
class SmallVm:
    """A created cgroup: ``prefix`` runs a command inside it; ``peak_bytes``/``oom_kills`` read it afterwards."""

    version: int
    dirs: list[Path]
    memory_dir: Path
    created: list[Path] = field(default_factory=list)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run through ``sh`` after the shell has joined this cgroup."""
        join = " && ".join(f"echo $$ > {d / 'cgroup.procs'}" for d in self.dirs)
        return ["sh", "-c", f'{join} && exec "$@"', "small_vm", *argv]

    def peak_bytes(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.memory_dir / name).read_text())
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            for line in (self.memory_dir / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0


def _own_cgroups() -> tuple[dict[str, str], str | None]:
    v1: dict[str, str] = {}
    v2 = None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            v2 = path
        for controller in controllers.split(","):
            v1[controller] = path
    return v1, v2


def _mkdir(path: Path, created: list[Path]) -> Path:
    try:
        path.mkdir()
    except OSError as exc:
        raise Unavailable(f"cannot create cgroup {path}: {exc}") from exc
    created.append(path)
    return path


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise Unavailable(f"cannot write {value!r} to {path}: {exc}") from exc


def _rmdir(path: Path) -> None:
    for _ in range(50):  # the child's exit may take a moment to leave the cgroup
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    path.rmdir()


def _v1(name: str, cpus: float, memory_bytes: int, created: list[Path]) -> SmallVm:
    v1, _ = _own_cgroups()
    dirs = []
    for controller, mounts in (("cpu", ("cpu", "cpu,cpuacct", "cpuacct,cpu")), ("memory", ("memory",))):
        mount = next((CGROUP_ROOT / m for m in mounts if (CGROUP_ROOT / m / "cgroup.procs").exists()), None)
        if mount is None or controller not in v1:
            raise Unavailable(f"no cgroup v1 {controller} hierarchy mounted under {CGROUP_ROOT}")
        dirs.append(_mkdir(mount / v1[controller].lstrip("/") / name, created))
    cpu, memory = dirs
    _write(cpu / "cpu.cfs_period_us", "100000")
    _write(cpu / "cpu.cfs_quota_us", str(round(cpus * 100000)))
    _write(memory / "memory.limit_in_bytes", str(memory_bytes))
    return SmallVm(1, dirs, memory, created)


def _v2(name: str, cpus: float, memory_bytes: int, created: list[Path], restore: list[tuple[Path, str]]) -> SmallVm:
    _, own = _own_cgroups()
    if own is None:
        raise Unavailable("cgroup v2 is mounted but /proc/self/cgroup has no 0:: line")
    parent = CGROUP_ROOT / own.lstrip("/")
    control = parent / "cgroup.subtree_control"
    missing = {"cpu", "memory"} - set(control.read_text().split())
    if missing:
        try:
            control.write_text(" ".join(f"+{c}" for c in sorted(missing)))
        except OSError as exc:
            raise Unavailable(
                f"cannot enable {', '.join(sorted(missing))} for children of {parent} ({exc}); "
                "a cgroup v2 that holds processes cannot delegate controllers"
            ) from exc
        restore.append((control, " ".join(f"-{c}" for c in sorted(missing))))
    child = _mkdir(parent / name, created)
    _write(child / "cpu.max", f"{round(cpus * 100000)} 100000")
    _write(child / "memory.max", str(memory_bytes))
    if (child / "memory.swap.max").exists():
        _write(child / "memory.swap.max", "0")
    return SmallVm(2, [child], child, created)


@contextmanager
def small_vm(cpus: float = 1.3, memory_bytes: int = LIMIT_1_5_GIB) -> Iterator[SmallVm]:
    """A fresh child cgroup limited to ``cpus`` and ``memory_bytes``; removed afterwards."""
    if os.geteuid() != 0:
        raise Unavailable("creating cgroups needs root")
    name = f"uniopt-small-vm-{os.getpid()}-{time.monotonic_ns()}"
    created: list[Path] = []
    restore: list[tuple[Path, str]] = []
    try:
        if (CGROUP_ROOT / "cgroup.controllers").exists():
            vm = _v2(name, cpus, memory_bytes, created, restore)
        elif (CGROUP_ROOT / "cpu").is_dir() or (CGROUP_ROOT / "cpu,cpuacct").is_dir():
            vm = _v1(name, cpus, memory_bytes, created)
        else:
            raise Unavailable(f"no cgroup filesystem under {CGROUP_ROOT}")
        yield vm
    finally:
        for path in reversed(created):
            _rmdir(path)
        for control, value in restore:
            control.write_text(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=float, default=1.3)
    parser.add_argument("--memory-mib", type=float, default=LIMIT_1_5_GIB / 2**20)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        parser.error("give a command after --")
    with small_vm(args.cpus, int(args.memory_mib * 2**20)) as vm:
        code = subprocess.call(vm.command(argv))
        summary = {"returncode": code, "oom_kills": vm.oom_kills(), "cgroup_peak_mib": (vm.peak_bytes() or 0) / 2**20}
    print(json.dumps(summary), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
