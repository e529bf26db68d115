"""``optimize doctor``: the JSON schema, the tables, bad settings, the console script, and advice."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from uniopt.advice import host_advice
from uniopt.cli import app
from uniopt.errors import MemoryBudgetError
from uniopt.plugins import DEFAULT_PLUGINS
from uniopt.settings import Settings
from uniopt.threads import thread_budget
from uniopt.tiers import BackendInfo, bandwidth, tier_by_name

OPTIMIZE = Path(sys.executable).with_name("optimize")
GiB = 2**30
BUILTIN = [name for name, _module in DEFAULT_PLUGINS]
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx")


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps tables and lines at the terminal width
    return CliRunner()


def flat(text: str) -> str:
    return " ".join(text.split())


def check_doctor_json(data: dict) -> None:
    cpu, memory = data["cpu"], data["memory"]
    assert type(cpu["physical_cores"]) is int and cpu["physical_cores"] >= 1
    assert type(cpu["logical_cores"]) is int and cpu["logical_cores"] >= cpu["physical_cores"]
    assert type(cpu["usable_cpus"]) is float and 0 < cpu["usable_cpus"] <= cpu["logical_cores"]
    for flag in FLAGS:
        assert type(cpu["flags"][flag]) is bool, flag
    assert type(memory["total_bytes"]) is int and memory["total_bytes"] > 0
    assert type(memory["available_bytes"]) is int and 0 < memory["available_bytes"] <= memory["total_bytes"]
    assert memory["limit_bytes"] is None or type(memory["limit_bytes"]) is int
    assert isinstance(data["gpus"], list)
    assert set(data["backends"]) == {"torch", "onnxruntime", "openvino", "nncf"}
    for name, info in data["backends"].items():
        assert type(info["available"]) is bool, name
        assert "version" in info
        assert info["available"] or info["reason"], name  # unavailable always says why
    assert data["backends"]["torch"]["available"] is True and data["backends"]["torch"]["version"]
    assert data["tier"]["name"] in {t for t in ("cuda-gpu", "low-resource", "cpu-avx512", "cpu-avx2", "cpu-basic")}
    assert data["tier"]["reason"]
    assert re.fullmatch(r"[0-9a-f]{64}", data["fingerprint"])
    probe = memory["read_bandwidth"]
    assert 0.5e9 < probe["read_bytes_per_s"] < 2e12 and type(probe["from_cache"]) is bool
    assert probe["threads"] == data["threads"]["intra_op"] and probe["buffer_bytes"] > 0


def test_doctor_json(runner: CliRunner) -> None:
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    check_doctor_json(data)
    assert data["threads"]["intra_op"] == max(1, int(data["cpu"]["usable_cpus"]))
    assert data["settings"]["plugins"] == {"value": BUILTIN, "source": "environment"}
    assert sorted(p["name"] for p in data["plugins"]) == sorted(BUILTIN)
    eager = next(row for row in data["candidates"] if row["name"] == "eager")
    assert eager["available"] is True and eager["precision"] == "fp32"
    rows = {row["name"]: row for row in data["engines"]}
    assert list(rows) == ["phoneme", "diarization", "tts"]
    for name, row in rows.items():
        assert row["error"] is None, (name, row["error"])
        assert type(row["weight_bytes"]) is int and 0 < row["weight_bytes"] < row["eager_bytes"], name
        assert 0 <= row["parked_bytes"] <= row["weight_bytes"], name
        assert row["build_bytes"] == row["available_bytes"] - row["eager_bytes"] + row["parked_bytes"]
        assert type(row["fits"]) is bool and row["verdict"], name
        if row["least_bytes"] is not None:
            assert 0 < row["least_bytes"] <= row["full_bytes"], name
            assert row["least"]["required_bytes"] == row["least_bytes"] and row["least"]["candidate"], name
            assert row["fits"] == (row["full_bytes"] <= row["build_bytes"]), name
    assert [c["name"] for c in rows["tts"]["components"]] == ["decoder", "codec"]
    assert rows["tts"]["weight_bytes"] > rows["phoneme"]["weight_bytes"] > rows["diarization"]["weight_bytes"]


def test_doctor_json_follows_the_settings(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIOPT_TIER", "cpu-basic")
    monkeypatch.setenv("UNIOPT_THREADS", "3")
    data = json.loads(runner.invoke(app, ["doctor", "--json"]).stdout)
    assert data["tier"]["name"] == "cpu-basic" and data["tier"]["reason"] == "set by UNIOPT_TIER=cpu-basic"
    assert data["threads"] == {"intra_op": 3, "inter_op": 1}
    assert data["settings"]["threads"] == {"value": 3, "source": "environment"}


def test_doctor_tables(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIOPT_TIER", "low-resource")  # so the small-host advice is certain
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert "Tier: low-resource — set by UNIOPT_TIER=low-resource" in out
    assert "Candidates on this host" in out
    assert re.search(r"eager\s*│\s*eager\s*│\s*fp32\s*│\s*yes", result.output)
    assert "Backends" in out and "Threads per backend:" in out
    assert "Settings not at their default" in out and "tier" in out
    assert "Advice" in out
    assert "• Small host: UNIOPT_MODE=tier skips the timing search" in out
    assert "Memory to optimize each engine here" in out
    assert re.search(r"phoneme\s*│\s*\d+\s*│\s*\d+\s*│", result.output)
    assert re.search(r"│\s*decoder\s*│", result.output) and re.search(r"│\s*codec\s*│", result.output)
    assert not out.lstrip().startswith("{")


def test_doctor_with_little_memory_says_what_stays_eager() -> None:
    from uniopt.doctor import doctor_report

    report = doctor_report({"tier": "low-resource"}, available_bytes=256 * 2**20)
    assert [e.verdict for e in report.engines] == ["does not fit: stays eager"] * 3
    line = next(a for a in report.advice if a.startswith("Not every candidate fits the memory here"))
    assert "phoneme: does not fit: stays eager" in line and "optimize prepare" in line
    roomy = doctor_report({"tier": "low-resource"}, available_bytes=64 * 2**30)
    assert all(e.fits for e in roomy.engines), [e.verdict for e in roomy.engines]
    assert not any(a.startswith("Not every candidate fits") for a in roomy.advice)


def test_doctor_measures_the_bandwidth_once(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    first = json.loads(runner.invoke(app, ["doctor", "--json"]).stdout)["memory"]["read_bandwidth"]
    assert first["from_cache"] is False

    def fail(threads: int, buffer_bytes: int | None = None) -> None:
        raise AssertionError("measured instead of reading the cache")

    monkeypatch.setattr(bandwidth, "measure_bandwidth", fail)
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    threads = first["threads"]
    expected = (
        f"{first['read_bytes_per_s'] / 1e9:.1f} GB/s at {threads} thread{'s' * (threads != 1)} (cached, measured "
    )
    assert re.search(r"memory read bandwidth\s*│\s*" + re.escape(expected), result.output)
    assert json.loads(runner.invoke(app, ["doctor", "--json"]).stdout)["memory"]["read_bandwidth"] == {
        **first,
        "from_cache": True,
    }


def test_doctor_without_room_for_the_bandwidth_probe(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(threads: int, buffer_bytes: int | None = None) -> None:
        raise MemoryBudgetError("the memory bandwidth probe", 256 * 2**20, "40 MiB available on this host")

    monkeypatch.setattr(bandwidth, "measure_bandwidth", refuse)
    memory = json.loads(runner.invoke(app, ["doctor", "--json"]).stdout)["memory"]
    assert memory["read_bandwidth"] is None
    assert (
        memory["read_bandwidth_problem"] == "the memory bandwidth probe needs ~256 MiB, 40 MiB available on this host"
    )
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "memory read bandwidth │ not measured: the memory bandwidth probe needs ~256 MiB" in flat(result.output)


def test_bad_setting_exits_with_code_2(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIOPT_MODE", "fast")
    result = runner.invoke(app, ["doctor", "--json"])
    assert result.exit_code == 2
    out = flat(result.output)
    assert "UNIOPT_MODE" in out and "'fast'" in out and "auto or tier or off" in out
    assert "Traceback" not in result.output


def test_no_arguments_shows_help(runner: CliRunner) -> None:
    result = runner.invoke(app, [])
    assert "doctor" in result.output and result.exit_code in (0, 2)


def test_console_script() -> None:
    # A first run on a host measures the memory bandwidth and builds the engines' structure on meta.
    proc = subprocess.run([str(OPTIMIZE), "doctor", "--json"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    check_doctor_json(json.loads(proc.stdout))


# -- host_advice ---------------------------------------------------------------------------------


def advice(profile, tier="cpu-avx512", **settings) -> str:
    values = Settings(**settings) if settings else Settings()
    return "\n".join(host_advice(profile, tier_by_name(tier), values, thread_budget(profile.usable_cpus)))


def test_no_vnni_means_no_int8(make_profile) -> None:
    assert "int8 is unlikely to pay off" in advice(make_profile("avx2"), "cpu-avx2")
    assert "int8" not in advice(make_profile("avx512"))  # VNNI
    assert "int8 is unlikely" not in advice(make_profile("amx"))
    assert "VNNI" not in advice(make_profile("arm"), "cpu-basic")  # not an x86 question


def test_small_memory_mentions_torch_compile(make_profile) -> None:
    small = make_profile("avx512", limit_bytes=1610612736)
    text = advice(small, "low-resource")
    assert "1.5 GiB usable memory is below the ~4 GiB torch.compile needs" in text
    assert "torch.compile is off" in text
    assert "torch.compile is ON" in advice(small, "cpu-avx512")  # the user forced a tier with compile
    assert "torch.compile" not in advice(make_profile("avx512"))


def test_bf16_with_openvino(make_profile) -> None:
    text = advice(make_profile("avx512"))
    assert "INFERENCE_PRECISION_HINT" in text and "bf16" in text
    without_openvino = make_profile(
        "avx512",
        backends=(BackendInfo("torch", True, "2.5"), BackendInfo("openvino", False, reason="not installed")),
    )
    text = advice(without_openvino)
    assert "INFERENCE_PRECISION_HINT" not in text
    assert "computes bf16 natively" in text
    assert "bf16" not in advice(make_profile("avx2"), "cpu-avx2")


def test_missing_backend_names_the_extra(make_profile) -> None:
    backends = (
        BackendInfo("torch", True, "2.5"),
        BackendInfo("onnxruntime", True, "1.20"),
        BackendInfo("openvino", True, "2024.5"),
        BackendInfo("nncf", False, None, "not installed"),
    )
    lines = host_advice(make_profile(backends=backends), tier_by_name("cpu-avx512"), Settings(), thread_budget(8))
    nncf = [line for line in lines if line.startswith("nncf")]
    assert nncf == [
        "nncf is not available (not installed), so OpenVINO int8 weight compression and static int8 are "
        "skipped: pip install 'uniopt[nncf]'."
    ]
    assert not any(line.startswith(("onnxruntime", "openvino")) for line in lines)


def test_cpu_limit_advice(make_profile) -> None:
    profile = make_profile("amx", usable_cpus=1.3)  # 4 logical CPUs
    assert "This process may use 1.3 of 4 CPUs (affinity or cgroup quota); every backend gets 1 thread(s)." in advice(
        profile, "low-resource"
    )
    assert "may use" not in advice(make_profile("amx", usable_cpus=4))


def test_small_host_advice_depends_on_mode(make_profile) -> None:
    profile = make_profile(usable_cpus=1.3)
    assert "UNIOPT_MODE=tier" in advice(profile, "low-resource")
    assert "UNIOPT_MODE=tier" not in advice(profile, "low-resource", mode="tier")


def test_doctor_measures_the_bandwidth_again_when_asked(runner: CliRunner) -> None:
    first = json.loads(runner.invoke(app, ["doctor", "--json"]).stdout)["memory"]["read_bandwidth"]
    again = json.loads(runner.invoke(app, ["doctor", "--json", "--measure-bandwidth"]).stdout)["memory"]
    assert again["read_bandwidth"]["from_cache"] is False
    assert again["read_bandwidth"]["measured_at"] > first["measured_at"]
    cached = json.loads(runner.invoke(app, ["doctor", "--json"]).stdout)["memory"]["read_bandwidth"]
    assert cached == {**again["read_bandwidth"], "from_cache": True}  # the new measurement replaced the old
