"""Shared fixtures: isolation from the machine, recorded hosts, and hand-built host profiles."""

from __future__ import annotations

import dataclasses
import itertools
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from uniopt.plugins import DEFAULT_PLUGINS
from uniopt.settings import Settings
from uniopt.tiers import BackendInfo, GpuInfo, HostProfile, MemoryInfo
from uniopt.tiers.cpu import parse_proc_cpuinfo

HOST_DATA = Path(__file__).parent / "data" / "host"
GiB = 2**30

#: Recorded /proc/cpuinfo files: name -> (file, the architecture the machine reported).
CPUINFO = {
    "avx512": ("x86_avx512_vnni_bf16.txt", "x86_64"),  # this machine: AMD EPYC (Zen 4), 2 vCPUs
    "avx2": ("x86_avx2_ht.txt", "x86_64"),  # Intel Kaby Lake, 2 cores x 2 hyper-threads
    "amx": ("x86_amx_spr.txt", "x86_64"),  # Intel Sapphire Rapids VM, 4 vCPUs
    "arm": ("arm_graviton3_sve.txt", "aarch64"),  # AWS Graviton3 (Neoverse V1), 2 vCPUs
}

#: Backends as the probe reports them on a host with every optional backend installed.
ALL_BACKENDS = (
    BackendInfo("torch", True, "2.5.0"),
    BackendInfo("onnxruntime", True, "1.20.0", providers=("CPUExecutionProvider",)),
    BackendInfo("openvino", True, "2024.5.0", devices=(("CPU", ("FP32", "BF16", "INT8")),)),
    BackendInfo("nncf", True, "2.14.0"),
)


@pytest.fixture(autouse=True)
def _isolated(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Keep every test away from this machine's settings, .env files, plugins and cache.

    Only the built-in plugins load (never third-party plugins installed here), no setting comes
    from the environment, the working directory is the test's tmp_path (so ``.env`` is the test's
    own), and the artifact cache is a fresh directory outside tmp_path.
    """
    for _field, env, _help, _default in Settings.describe():
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("UNIOPT_PLUGINS", ",".join(name for name, _module in DEFAULT_PLUGINS))
    monkeypatch.setenv("UNIOPT_CACHE_DIR", str(tmp_path_factory.mktemp("uniopt-cache")))
    monkeypatch.chdir(tmp_path)
    yield


def cpu_info(name: str):
    """The CpuInfo parsed from the recorded cpuinfo ``name`` (a key of :data:`CPUINFO`)."""
    file, arch = CPUINFO[name]
    return parse_proc_cpuinfo((HOST_DATA / "cpuinfo" / file).read_text(), architecture=arch)


@pytest.fixture
def recorded_host(tmp_path: Path) -> Callable[..., Path]:
    """Build a fake filesystem root from recorded files; returns the root.

    ``cpuinfo`` is a key of CPUINFO (or None: no /proc/cpuinfo), ``proc_cgroup`` the name of a
    /proc/self/cgroup sample (``v1``, ``v2``; None: no file), ``cgroup`` a recorded cgroup tree
    under data/host/cgroup (``v1-limits``, ``v2-parent-tighter``, ...; None: no cgroup files).
    """
    counter = itertools.count()

    def build(cpuinfo: str | None = "avx512", proc_cgroup: str | None = "v1", cgroup: str | None = "v1-limits") -> Path:
        root = tmp_path / f"root{next(counter)}"
        (root / "proc" / "self").mkdir(parents=True)
        if cpuinfo is not None:
            shutil.copyfile(HOST_DATA / "cpuinfo" / CPUINFO[cpuinfo][0], root / "proc" / "cpuinfo")
        if proc_cgroup is not None:
            shutil.copyfile(HOST_DATA / "proc_self_cgroup" / f"{proc_cgroup}.txt", root / "proc" / "self" / "cgroup")
        if cgroup is not None:
            shutil.copytree(HOST_DATA / "cgroup" / cgroup, root, dirs_exist_ok=True)
        return root

    return build


@pytest.fixture
def make_profile() -> Callable[..., HostProfile]:
    """Build a HostProfile by hand: ``make_profile("avx2", usable_cpus=8, limit_bytes=2 * GiB)``."""

    def build(
        cpu: str = "avx512",
        *,
        usable_cpus: float = 8.0,
        total_bytes: int = 16 * GiB,
        limit_bytes: int | None = None,
        gpus: tuple[GpuInfo, ...] = (),
        backends: tuple[BackendInfo, ...] = ALL_BACKENDS,
    ) -> HostProfile:
        info = cpu_info(cpu)
        if usable_cpus > info.logical_cores:  # the same CPU model, on a bigger machine
            cores = math.ceil(usable_cpus)
            info = dataclasses.replace(info, physical_cores=cores, logical_cores=cores)
        return HostProfile(
            cpu=info,
            usable_cpus=usable_cpus,
            affinity_cpus=info.logical_cores,
            cgroup_version=None,
            cgroup_cpu_quota=None,
            memory=MemoryInfo(total_bytes, total_bytes // 2, limit_bytes),
            gpus=gpus,
            backends=backends,
            os="Linux 6.8.0",
            python="3.11.7",
        )

    return build
