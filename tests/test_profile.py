"""The host profile: /proc/cpuinfo, cgroup limits, usable CPUs, the profile itself and its fingerprint."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from small_vm_script import small_vm
from uniopt.tiers import BackendInfo, host_profile, read_host_profile, select_tier
from uniopt.tiers.cgroup import CgroupLimits, read_cgroup_limits
from uniopt.tiers.cpu import FLAG_NAMES, flags_from, parse_proc_cpuinfo, usable_cpus

HOST_DATA = Path(__file__).parent / "data" / "host"
OPTIMIZE = Path(sys.executable).with_name("optimize")
GiB = 2**30
LIMIT_1_5_GIB = 1610612736


def recorded_cpuinfo(file: str) -> str:
    return (HOST_DATA / "cpuinfo" / file).read_text()


def flag_dict(**on: bool) -> dict[str, bool]:
    """Every uniopt flag False except the ones given."""
    flags = dict.fromkeys(FLAG_NAMES, False)
    flags.update(on)
    return flags


# -- /proc/cpuinfo ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "arch", "model", "vendor", "physical", "logical", "flags"),
    [
        pytest.param(
            "x86_avx512_vnni_bf16.txt",
            "x86_64",
            "AMD EPYC",
            "AuthenticAMD",
            2,
            2,
            flag_dict(avx2=True, avx512f=True, avx512_vnni=True, avx512_bf16=True),
            id="avx512-vnni-bf16",
        ),
        pytest.param(
            "x86_avx2_ht.txt",
            "x86_64",
            "Intel(R) Core(TM) i7-7567U CPU @ 3.50GHz",
            "GenuineIntel",
            2,
            4,
            flag_dict(avx2=True),
            id="avx2-hyperthreading",
        ),
        pytest.param(
            "x86_amx_spr.txt",
            "x86_64",
            "Intel(R) Xeon(R) Platinum 8480+",
            "GenuineIntel",
            4,
            4,
            flag_dict(
                avx2=True,
                avx512f=True,
                avx512_vnni=True,
                avx512_bf16=True,
                avx_vnni=True,
                amx_tile=True,
                amx_int8=True,
                amx_bf16=True,
                amx=True,
            ),
            id="sapphire-rapids-amx",
        ),
        pytest.param(
            "arm_graviton3_sve.txt",
            "aarch64",
            "0xd40",
            "0x41",
            2,
            2,
            flag_dict(neon=True, sve=True),
            id="arm-sve",
        ),
    ],
)
def test_parse_proc_cpuinfo(file, arch, model, vendor, physical, logical, flags) -> None:
    info = parse_proc_cpuinfo(recorded_cpuinfo(file), architecture=arch)
    assert info.model == model
    assert info.vendor == vendor
    assert info.architecture == arch
    assert (info.physical_cores, info.logical_cores) == (physical, logical)
    assert dict(info.flags) == flags
    for name, on in flags.items():
        assert info.has(name) is on


def test_physical_cores_count_distinct_socket_and_core_pairs() -> None:
    # Two sockets of the hyper-threaded laptop CPU: core ids repeat per socket, so 4 cores, 8 CPUs.
    one_socket = recorded_cpuinfo("x86_avx2_ht.txt")
    second = one_socket.replace("physical id\t: 0", "physical id\t: 1")
    for i in range(4):
        second = second.replace(f"processor\t: {i}\n", f"processor\t: {i + 4}\n")
    info = parse_proc_cpuinfo(one_socket + "\n" + second)
    assert (info.physical_cores, info.logical_cores) == (4, 8)


def test_parse_empty_cpuinfo_still_reports_one_core() -> None:
    info = parse_proc_cpuinfo("")
    assert (info.physical_cores, info.logical_cores) == (1, 1)
    assert not any(on for _, on in info.flags)


@pytest.mark.parametrize(
    ("raw", "amx"),
    [
        (["amx_tile", "amx_int8"], True),
        (["AMX_TILE", "AMX_BF16"], True),
        (["amx_tile"], False),  # tiles without an int8 or bf16 unit do not compute anything
        (["amx_int8", "amx_bf16"], False),  # no tile support
        ([], False),
    ],
)
def test_amx_needs_tiles_and_a_compute_unit(raw: list[str], amx: bool) -> None:
    assert dict(flags_from(raw))["amx"] is amx


def test_neon_from_either_arm_name() -> None:
    assert dict(flags_from(["neon"]))["neon"] and dict(flags_from(["asimd"]))["neon"]


@pytest.mark.parametrize(("recorded", "saturates"), [("avx2", True), ("avx512", False), ("amx", False), ("arm", False)])
def test_int8_saturates_on_x86_without_vnni(make_profile, recorded: str, saturates: bool) -> None:
    assert make_profile(recorded).cpu.int8_saturates is saturates


@pytest.mark.parametrize(("recorded", "bf16"), [("avx2", False), ("avx512", True), ("amx", True), ("arm", False)])
def test_computes_bf16_from_either_flag(make_profile, recorded: str, bf16: bool) -> None:
    assert make_profile(recorded).cpu.computes_bf16 is bf16


# -- cgroup limits -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("proc_cgroup", "cgroup", "expected"),
    [
        pytest.param("v1", "v1-limits", CgroupLimits(1, 1.3, LIMIT_1_5_GIB), id="v1-quota-and-limit"),
        pytest.param("v1", "v1-unlimited", CgroupLimits(1, None, None), id="v1-no-limits"),
        pytest.param("v2", "v2-limits", CgroupLimits(2, 1.3, LIMIT_1_5_GIB), id="v2-quota-and-limit"),
        pytest.param("v2", "v2-unlimited", CgroupLimits(2, None, None), id="v2-max"),
        pytest.param("v2", "v2-parent-tighter", CgroupLimits(2, 1.0, GiB), id="v2-parent-tighter-wins"),
        pytest.param("v2", "v2-child-own", CgroupLimits(2, 1.3, LIMIT_1_5_GIB), id="v2-own-cgroup-not-sibling"),
        pytest.param(None, "v1-limits", CgroupLimits(None, None, None), id="no-proc-self-cgroup"),
        pytest.param("v2", None, CgroupLimits(None, None, None), id="v2-path-but-no-unified-mount"),
    ],
)
def test_read_cgroup_limits(recorded_host, proc_cgroup, cgroup, expected: CgroupLimits) -> None:
    root = recorded_host(proc_cgroup=proc_cgroup, cgroup=cgroup)
    assert read_cgroup_limits(root) == expected


def test_v1_memory_limit_is_read_from_the_process_own_cgroup(recorded_host) -> None:
    # The recorded /proc/self/cgroup puts memory in /process_api/<id>; the limit lives only there.
    root = recorded_host(cgroup="v1-limits")
    own = root / "sys/fs/cgroup/memory/process_api/e988fb7832fe9a744cca2d44899e4ab0/memory.limit_in_bytes"
    own.write_text("9223372036854771712\n")
    assert read_cgroup_limits(root).memory_limit_bytes is None
    own.write_text("805306368\n")
    assert read_cgroup_limits(root).memory_limit_bytes == 805306368


def test_v1_combined_cpu_cpuacct_mount(recorded_host) -> None:
    root = recorded_host(cgroup="v1-limits")
    cgroups = root / "sys/fs/cgroup"
    (cgroups / "cpu").rename(cgroups / "cpu,cpuacct")
    proc = root / "proc/self/cgroup"
    proc.write_text(proc.read_text().replace("2:cpuacct:/\n1:cpu:/\n", "1:cpu,cpuacct:/\n"))
    assert read_cgroup_limits(root).cpu_quota == 1.3


def test_v2_nested_deeper_than_the_limit(recorded_host) -> None:
    # A process in a grand-child without its own cpu.max is bound by the ancestor's quota.
    root = recorded_host(proc_cgroup="v2", cgroup="v2-limits")
    (root / "proc/self/cgroup").write_text("0::/user.slice/app.scope/worker-1\n")
    (root / "sys/fs/cgroup/user.slice/app.scope/worker-1").mkdir()
    assert read_cgroup_limits(root) == CgroupLimits(2, 1.3, LIMIT_1_5_GIB)


@pytest.mark.parametrize(
    ("logical", "affinity", "quota", "expected"),
    [
        (2, 2, None, 2.0),
        (2, 2, 1.3, 1.3),
        (8, 1, 1.3, 1.0),
        (8, 4, 6.0, 4.0),
        (2, 2, 4.0, 2.0),
        (16, None, None, 16.0),
        (4, None, 0.5, 0.5),
        (4, 4, 1 / 3, 0.33),
    ],
)
def test_usable_cpus_is_the_least_limit(logical: int, affinity, quota, expected: float) -> None:
    assert usable_cpus(logical, affinity, quota) == expected


# -- the profile ---------------------------------------------------------------------------------


def test_read_host_profile_from_recorded_files(recorded_host) -> None:
    profile = read_host_profile(recorded_host("avx512", "v1", "v1-limits"), probe=False)
    assert profile.cpu.model == "AMD EPYC"
    assert (profile.cpu.physical_cores, profile.cpu.logical_cores) == (2, 2)
    assert profile.cpu.has("avx512_vnni") and profile.cpu.has("avx512_bf16") and not profile.cpu.has("amx")
    assert profile.affinity_cpus is None  # affinity is only this process's, under the real root
    assert (profile.cgroup_version, profile.cgroup_cpu_quota, profile.usable_cpus) == (1, 1.3, 1.3)
    assert profile.memory.limit_bytes == LIMIT_1_5_GIB
    assert profile.memory.total_bytes == psutil.virtual_memory().total
    assert profile.memory.usable_bytes == min(LIMIT_1_5_GIB, profile.memory.total_bytes)
    assert profile.backends == () and profile.gpus == ()
    assert profile.backend("openvino") == BackendInfo("openvino", False, reason="not probed")
    assert select_tier(profile).tier.name == "low-resource"


def test_read_host_profile_v2_hyperthreaded(recorded_host) -> None:
    profile = read_host_profile(recorded_host("avx2", "v2", "v2-parent-tighter"), probe=False)
    assert (profile.cpu.physical_cores, profile.cpu.logical_cores) == (2, 4)
    assert (profile.cgroup_version, profile.usable_cpus, profile.memory.limit_bytes) == (2, 1.0, GiB)


def test_read_host_profile_without_cgroups(recorded_host) -> None:
    profile = read_host_profile(recorded_host("amx", None, None), probe=False)
    assert profile.cgroup_version is None and profile.memory.limit_bytes is None
    assert profile.usable_cpus == 4.0 and profile.cpu.has("amx")


def test_profile_is_frozen_and_hashable(recorded_host) -> None:
    root = recorded_host()
    first, second = read_host_profile(root, probe=False), read_host_profile(root, probe=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.usable_cpus = 64.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.cpu.logical_cores = 64  # type: ignore[misc]
    fixed = dataclasses.replace(second, memory=first.memory)  # available_bytes moves between reads
    assert hash(first) == hash(fixed) and first == fixed
    assert {first: "cached"}[fixed] == "cached"


def test_real_host_profile_is_hashable_and_cached() -> None:
    profile = host_profile()
    assert host_profile() is profile
    assert isinstance(hash(profile), int)  # backends carry device tuples: still hashable
    assert {b.name for b in profile.backends} == {"torch", "onnxruntime", "openvino", "nncf"}
    assert profile.backend("torch").available


def test_fingerprint_is_sha256_and_stable(recorded_host) -> None:
    root = recorded_host()
    first, second = read_host_profile(root, probe=False), read_host_profile(root, probe=False)
    assert re.fullmatch(r"[0-9a-f]{64}", first.fingerprint)
    assert first.fingerprint == second.fingerprint


def test_fingerprint_changes_with_what_changes_performance(recorded_host) -> None:
    base = read_host_profile(recorded_host(), probe=False)
    torch_backend = BackendInfo("torch", True, "2.5.0")
    changed = {
        "usable_cpus": dataclasses.replace(base, usable_cpus=2.0),
        "cpu flags": dataclasses.replace(base, cpu=dataclasses.replace(base.cpu, flags=flags_from(["avx2"]))),
        "cpu model": dataclasses.replace(base, cpu=dataclasses.replace(base.cpu, model="AMD EPYC 9R14")),
        "memory limit": dataclasses.replace(base, memory=dataclasses.replace(base.memory, limit_bytes=8 * GiB)),
        "backend": dataclasses.replace(base, backends=(torch_backend,)),
        "backend version": dataclasses.replace(base, backends=(dataclasses.replace(torch_backend, version="2.6.0"),)),
    }
    prints = {name: p.fingerprint for name, p in changed.items()}
    assert base.fingerprint not in prints.values()
    assert len(set(prints.values())) == len(prints)


def test_fingerprint_ignores_what_does_not_change_performance(recorded_host) -> None:
    base = read_host_profile(recorded_host(), probe=False)
    same = [
        dataclasses.replace(base, memory=dataclasses.replace(base.memory, available_bytes=12345)),
        dataclasses.replace(base, os="Linux 7.0.0", python="3.13.1"),
    ]
    assert {p.fingerprint for p in same} == {base.fingerprint}


def test_fingerprint_separates_hosts_in_different_tiers(recorded_host) -> None:
    base = dataclasses.replace(read_host_profile(recorded_host(), probe=False), usable_cpus=8.0)
    small = dataclasses.replace(base, memory=dataclasses.replace(base.memory, limit_bytes=int(3.6 * GiB)))
    large = dataclasses.replace(base, memory=dataclasses.replace(base.memory, limit_bytes=int(4.4 * GiB)))
    assert select_tier(small).tier.name != select_tier(large).tier.name
    assert small.fingerprint != large.fingerprint


def test_to_dict_schema(recorded_host) -> None:
    profile = dataclasses.replace(
        read_host_profile(recorded_host(), probe=False),
        backends=(BackendInfo("openvino", True, "2024.5", devices=(("CPU", ("FP32", "BF16")),)),),
    )
    data = json.loads(json.dumps(profile.to_dict()))
    assert set(data) == {"cpu", "memory", "cgroup_version", "gpus", "backends", "os", "python", "fingerprint"}
    assert set(data["cpu"]) == {
        "model",
        "vendor",
        "architecture",
        "physical_cores",
        "logical_cores",
        "affinity_cpus",
        "cgroup_cpu_quota",
        "usable_cpus",
        "flags",
    }
    assert data["cpu"]["usable_cpus"] == 1.3 and isinstance(data["cpu"]["usable_cpus"], float)
    assert set(data["cpu"]["flags"]) == set(FLAG_NAMES)
    assert data["memory"]["limit_bytes"] == LIMIT_1_5_GIB
    assert data["cgroup_version"] == 1
    assert data["backends"] == {
        "openvino": {
            "available": True,
            "version": "2024.5",
            "reason": "",
            "providers": [],
            "devices": {"CPU": ["FP32", "BF16"]},
        }
    }
    assert data["fingerprint"] == profile.fingerprint


# -- the real host, in child processes -----------------------------------------------------------


def run_doctor_json(*prefix: str, timeout: float = 60) -> dict:
    proc = subprocess.run([*prefix, str(OPTIMIZE), "doctor", "--json"], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed")
def test_affinity_limits_usable_cpus() -> None:
    data = run_doctor_json("taskset", "-c", "0")
    assert data["cpu"]["affinity_cpus"] == 1
    assert data["cpu"]["usable_cpus"] == 1.0
    assert data["threads"]["intra_op"] == 1
    assert data["tier"]["name"] == "low-resource"


def test_missing_optional_backend_is_reported_not_raised() -> None:
    pytest.importorskip("onnxruntime")
    snippet = textwrap.dedent(
        """
        import json, sys
        sys.modules["openvino"] = None  # as if openvino were not installed
        from uniopt.tiers import read_host_profile
        print(json.dumps(read_host_profile().to_dict()["backends"]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    backends = json.loads(proc.stdout)
    assert backends["openvino"]["available"] is False
    assert "openvino" in backends["openvino"]["reason"] and "failed" in backends["openvino"]["reason"]
    assert backends["onnxruntime"]["available"] is True and backends["onnxruntime"]["version"]
    assert backends["torch"]["available"] is True and backends["torch"]["version"]


# -- a real cgroup -------------------------------------------------------------------------------


@pytest.mark.cgroup
def test_doctor_in_a_real_cgroup() -> None:
    try:
        with small_vm.small_vm(1.3, LIMIT_1_5_GIB) as vm:
            proc = subprocess.run(
                vm.command([str(OPTIMIZE), "doctor", "--json"]), capture_output=True, text=True, timeout=60
            )
    except small_vm.Unavailable as exc:
        pytest.skip(str(exc))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["cpu"]["cgroup_cpu_quota"] == 1.3
    assert data["cpu"]["usable_cpus"] == 1.3
    assert data["memory"]["limit_bytes"] == LIMIT_1_5_GIB
    assert data["memory"]["headroom"]["available_bytes"] < LIMIT_1_5_GIB
    assert data["tier"]["name"] == "low-resource"
    assert "usable_cpus = 1.3" in data["tier"]["reason"]
    assert data["threads"]["intra_op"] == 1
