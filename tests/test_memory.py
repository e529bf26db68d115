"""Memory: measuring a step, the memory left under a cgroup limit, refusing before a kill, releasing losers."""

from __future__ import annotations

import dataclasses
import gc
import json
import mmap
import os
import subprocess
import sys
import time
import types
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from small_vm_script import small_vm
from test_selection import EAGER_SLEEP, SlowNet, _fake, _optimize, fake_plugins  # noqa: F401 - the fixture is used by name
from uniopt import UniversalOptimizer
from uniopt.cache import ArtifactCache
from uniopt.errors import MemoryBudgetError
from uniopt.memory import MemoryHeadroom, measure_memory, memory_headroom, module_bytes
from uniopt.optimizer import Component
from uniopt.plugins import Candidate, Requirements, Stage, candidates, memory_costs, plugin_manager
from uniopt.plugins.candidate import BuildStep
from uniopt.plugins.model_cache import model_cache
from uniopt.tiers import HostProfile, host_profile
from uniopt.tiers.cgroup import read_cgroup_memory

MiB = 2**20
LIMIT_1_5_GIB = 1610612736


# -- measuring -------------------------------------------------------------------------------------
def _resident_block(nbytes: int) -> mmap.mmap:
    """``nbytes`` of new, written pages (an anonymous mapping: never free heap that earlier tests left)."""
    block = mmap.mmap(-1, nbytes)
    block.write(b"\x01" * nbytes)
    return block


def test_measure_memory_sees_a_freed_peak_and_nests() -> None:
    with measure_memory() as outer:
        _resident_block(40 * MiB).close()
        with measure_memory() as inner:
            _resident_block(100 * MiB).close()
        kept = _resident_block(20 * MiB)
    assert inner.peak_increase_bytes >= 95 * MiB
    assert outer.peak_increase_bytes >= 95 * MiB, "the inner reset of VmHWM hid the outer peak"
    assert outer.resident_increase_bytes >= 19 * MiB
    assert outer.peak_increase_bytes < 400 * MiB
    kept.close()


def test_module_bytes_counts_tied_weights_once() -> None:
    emb = torch.nn.Embedding(1000, 64)
    head = torch.nn.Linear(64, 1000, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    model.register_buffer("scale", torch.ones(10))
    assert module_bytes(model) == 1000 * 64 * 4 + 10 * 4


# -- the memory left under a cgroup limit -------------------------------------------------------------
def _cgroup_root(
    tmp_path: Path, version: int, limit: str, usage: int, inactive: int, active: int = 0, mapped: int = 0
) -> Path:
    root = tmp_path / f"v{version}"
    if version == 1:
        (root / "proc/self").mkdir(parents=True)
        (root / "proc/self/cgroup").write_text("4:memory:/vm\n1:cpu:/\n")
        d = root / "sys/fs/cgroup/memory/vm"
        d.mkdir(parents=True)
        (d / "memory.limit_in_bytes").write_text(limit)
        (d / "memory.usage_in_bytes").write_text(str(usage))
        (d / "memory.stat").write_text(
            f"cache 5\ntotal_inactive_file {inactive}\ntotal_active_file {active}\ntotal_mapped_file {mapped}\n"
        )
    else:
        (root / "proc/self").mkdir(parents=True)
        (root / "proc/self/cgroup").write_text("0::/app/vm\n")
        (root / "sys/fs/cgroup").mkdir(parents=True)
        (root / "sys/fs/cgroup/cgroup.controllers").write_text("cpu memory\n")
        d = root / "sys/fs/cgroup/app/vm"
        d.mkdir(parents=True)
        (root / "sys/fs/cgroup/app/memory.max").write_text("max\n")
        (d / "memory.max").write_text(limit)
        (d / "memory.current").write_text(str(usage))
        (d / "memory.stat").write_text(
            f"anon 1\ninactive_file {inactive}\nactive_file {active}\nfile_mapped {mapped}\n"
        )
    return root


@pytest.mark.parametrize("version", [1, 2])
def test_cgroup_working_set_leaves_out_reclaimable_cache(tmp_path: Path, version: int) -> None:
    root = _cgroup_root(tmp_path, version, str(LIMIT_1_5_GIB), usage=900 * MiB, inactive=200 * MiB)
    assert read_cgroup_memory(root) == (LIMIT_1_5_GIB, 700 * MiB)
    room = memory_headroom(root)
    assert room.limit_bytes == LIMIT_1_5_GIB and room.available_bytes == LIMIT_1_5_GIB - 700 * MiB
    assert room.describe() == "836 MiB available under the 1.5 GiB limit"


@pytest.mark.parametrize("version", [1, 2])
def test_active_page_cache_is_reclaimable_unless_mapped(tmp_path: Path, version: int) -> None:
    """Files read once (a bundle hashed and loaded) sit on the active list; only mapped pages stay."""
    root = _cgroup_root(
        tmp_path, version, str(LIMIT_1_5_GIB), 1200 * MiB, 100 * MiB, active=400 * MiB, mapped=150 * MiB
    )
    assert read_cgroup_memory(root) == (LIMIT_1_5_GIB, 1200 * MiB - (500 - 150) * MiB)


@pytest.mark.cgroup
def test_page_cache_read_in_a_real_cgroup_leaves_the_memory_left_as_it_was(tmp_path: Path) -> None:
    """A 1.5 GiB cgroup: reading a 200 MiB file twice (active page cache) takes nothing from what is left."""
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(200 * MiB))
    fd = os.open(blob, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read in again from inside the cgroup
    os.close(fd)
    script = (
        "import sys; sys.path[:0] = sys.argv[2:]; from uniopt.memory import memory_headroom\n"
        "before = memory_headroom().available_bytes\n"
        "for _ in range(2):\n"
        "    with open(sys.argv[1], 'rb') as f:\n"
        "        while f.read(2**20): pass\n"
        "print(before, memory_headroom().available_bytes)"
    )
    try:
        with small_vm.small_vm() as vm:
            proc = subprocess.run(
                vm.command([sys.executable, "-c", script, str(blob), *sys.path]), capture_output=True, text=True
            )
    except small_vm.Unavailable as exc:
        pytest.skip(str(exc))
    assert proc.returncode == 0, proc.stderr
    before, after = map(int, proc.stdout.split())
    assert before - after < 40 * MiB, (before / MiB, after / MiB)


def test_no_cgroup_limit_means_host_memory(tmp_path: Path) -> None:
    root = _cgroup_root(tmp_path, 2, "max", usage=1, inactive=0)
    assert read_cgroup_memory(root) is None
    assert memory_headroom(root).limit_bytes is None


# -- refusing a step that would not fit ------------------------------------------------------------
def _squeeze(monkeypatch: pytest.MonkeyPatch, available: int) -> None:
    """The memory left is what a 1.5 GiB cgroup with ``available`` bytes free would report."""
    room = MemoryHeadroom(available, LIMIT_1_5_GIB, LIMIT_1_5_GIB - available)
    monkeypatch.setattr(memory_costs, "memory_headroom", lambda: room)


def _wide_mlp() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)).eval()
    return model, torch.randn(4, 256)


def test_an_export_that_does_not_fit_is_refused_before_it_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model, x = _wide_mlp()
    _squeeze(monkeypatch, 64 * MiB)
    opt = UniversalOptimizer(
        model,
        (x,),
        mode="auto",
        tier="cpu-avx512",
        allow=("eager", "onnxruntime-fp32"),
        cache_dir=str(tmp_path),
        fallback_on_optimization_error=False,  # a refusal is not a failure: nothing raises
        model_warmup_runs=1,
    )
    report = opt.report().component("module")
    refused = report.candidate("onnxruntime-fp32")
    assert not refused.accepted
    assert refused.reason.startswith("refused for memory: onnx-export-")
    assert "MiB, 64 MiB available under the 1.5 GiB limit" in refused.reason
    assert report.chosen == "eager"
    assert not [e for e in ArtifactCache(tmp_path).entries() if e.kind == "onnx-export"], "the export ran anyway"


def test_with_room_the_same_candidate_builds_and_its_memory_is_reported(tmp_path: Path) -> None:
    model, x = _wide_mlp()
    opt = UniversalOptimizer(
        model, (x,), mode="tier", tier="low-resource", allow=("eager", "onnxruntime-fp32"), cache_dir=str(tmp_path)
    )
    result = opt.report().component("module").candidate("onnxruntime-fp32")
    assert result.accepted
    steps = [s["step"] for s in result.memory_steps]
    assert steps[0].startswith("onnx-export-")
    assert steps[1:] == ["onnxruntime-optimize", "onnxruntime-session", "first-calls"]
    assert result.peak_memory_bytes is not None and result.peak_memory_bytes > 0
    assert result.estimated_peak_bytes == max(s["estimated_bytes"] for s in result.memory_steps)
    assert json.loads(json.dumps(opt.report().to_dict()))["components"][0]["candidates"]


def test_a_stage_whose_own_first_calls_do_not_fit_is_refused_before_they_run(
    fake_plugins: Any,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A stage's ``first_call_bytes`` (a decode step laying its weights out again) counts in its first-calls check."""
    ran: list[str] = []

    def laying_out(name: str, first_call_bytes: int) -> Candidate:
        def build(component: Any, context: Any) -> Stage:
            def run(x: torch.Tensor) -> torch.Tensor:
                ran.append(name)
                with torch.no_grad():
                    return component.module.linear(x)

            return Stage(name, run, {"first_call_bytes": first_call_bytes})

        return Candidate(name, "fake", f"fake {name}", build, Requirements())

    fake_plugins(laying_out("lays-out-2-gib", 2 * 2**30), laying_out("lays-out-nothing", 0))
    _squeeze(monkeypatch, 512 * MiB)
    report = _optimize(SlowNet(), tmp_path, min_speedup=0.01).report().component("module")
    refused = report.candidate("lays-out-2-gib")
    assert refused.reason.startswith("refused for memory: first-calls"), refused.reason
    assert "lays-out-2-gib" not in ran
    assert report.candidate("lays-out-nothing").accepted and "lays-out-nothing" in ran


# -- holding only what can still win ----------------------------------------------------------------
class _Tracked:
    alive: weakref.WeakSet[Any] = weakref.WeakSet()
    most = 0


def _tracked(name: str, seconds: float) -> Candidate:
    inner = _fake(name, seconds)

    def build(component: Any, context: Any) -> Stage:
        stage = inner.build(component, context)
        _Tracked.alive.add(stage)
        gc.collect()
        _Tracked.most = max(_Tracked.most, len(_Tracked.alive))
        return stage

    return Candidate(name, "fake", f"tracked {name}", build, Requirements())


def test_auto_mode_keeps_at_most_two_built_stages_alive(fake_plugins: Any, tmp_path: Any) -> None:  # noqa: F811
    fake_plugins(*[_tracked(f"c{i}", 0.001 * (5 - i)) for i in range(5)])
    opt = _optimize(SlowNet(), tmp_path, search_budget_s=60)
    report = opt.report().component("module")
    assert report.chosen == "c4"  # the fastest, found though only two were ever held
    assert _Tracked.most == 2
    assert all(report.candidate(f"c{i}").speedup for i in range(5)), "every survivor was timed against eager"
    gc.collect()
    assert len(_Tracked.alive) == 1, "losers are released once the search is over"


class _BuildLog:
    """Fake candidates that record, for each build, which other stages were alive beside it."""

    def __init__(self) -> None:
        self.alive: weakref.WeakSet[Any] = weakref.WeakSet()
        self.built_beside: list[tuple[str, list[str]]] = []

    def candidate(self, name: str, seconds: float, step: str, holds: int = 0) -> Candidate:
        """A fake whose build declares ``step`` and whose stage holds ``holds`` bytes of fresh pages."""
        inner = _fake(name, seconds)

        def build(component: Any, context: Any) -> Stage:
            gc.collect()
            self.built_beside.append((name, sorted(s.candidate for s in self.alive)))
            stage = inner.build(component, context)
            if holds:
                stage.info["weights"] = _resident_block(holds)
            self.alive.add(stage)
            return stage

        return Candidate(name, "fake", f"logged {name}", build, Requirements(), steps=(BuildStep(step),))


def test_a_build_larger_than_the_best_runs_with_the_best_released(fake_plugins: Any, tmp_path: Any) -> None:  # noqa: F811
    """A challenger whose build needs more than the best holds is built alone and compared by speed-up over eager."""
    log = _BuildLog()
    built_beside = log.built_beside

    def large(name: str, seconds: float) -> Candidate:
        # torch-compile's estimate (512 MiB and more) is far above what these stages hold.
        return log.candidate(name, seconds, "torch-compile")

    fake_plugins(large("c0", 0.004), large("c1", 0.002), large("c2", 0.001))
    opt = _optimize(SlowNet(), tmp_path, search_budget_s=60)
    report = opt.report().component("module")
    assert report.chosen == "c2"
    assert all(report.candidate(f"c{i}").speedup for i in range(3)), "every survivor was timed"
    # Each challenger was built with no other stage alive, and beat the one set aside by its speed-up.
    assert built_beside == [("c0", []), ("c1", []), ("c2", [])]
    log, again = _BuildLog(), "torch-compile"
    model_cache.clear()
    fake_plugins(
        log.candidate("d0", 0.001, again), log.candidate("d1", 0.004, again), log.candidate("d2", 0.002, again)
    )
    report = _optimize(SlowNet(), tmp_path / "again", search_budget_s=60).report().component("module")
    assert report.chosen == "d0"
    # d0 stayed the best while set aside; it is rebuilt once, alone, when the search ends.
    assert log.built_beside == [("d0", []), ("d1", []), ("d2", []), ("d0", [])]


class _PagedNet(SlowNet):
    """Eager slows down tenfold while a stage of the named candidate is alive (its weights paged out)."""

    def __init__(self, log: _BuildLog, hog: str) -> None:
        super().__init__()
        self.log, self.hog = log, hog

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s.candidate == self.hog for s in self.log.alive):
            time.sleep(9 * EAGER_SLEEP)
        return super().forward(x)


def test_a_challenger_must_beat_the_best_set_aside_by_its_own_time_too(
    fake_plugins: Any,  # noqa: F811
    tmp_path: Any,
) -> None:
    """Compared by speed-up over eager alone, a slower challenger that slows eager down would win."""
    log, large = _BuildLog(), "torch-compile"
    fake_plugins(log.candidate("fast", 0.002, large), log.candidate("hog", 0.006, large))
    report = _optimize(_PagedNet(log, "hog"), tmp_path, search_budget_s=60).report().component("module")
    fast, hog = report.candidate("fast"), report.candidate("hog")
    assert hog.speedup > fast.speedup and hog.p50_ms > fast.p50_ms, (hog, fast)  # eager was slow beside it
    assert report.chosen == "fast"


def test_a_challenger_refused_for_memory_beside_the_best_is_built_again_without_it(
    fake_plugins: Any,  # noqa: F811
    tmp_path: Any,
) -> None:
    """The estimates said it fits beside the best, the build step said no: it is tried once more, alone."""
    log = _BuildLog()
    challenger = log.candidate("f1", 0.001, "torch-copy")

    def build(component: Any, context: Any) -> Stage:
        gc.collect()
        if len(log.alive):
            log.built_beside.append(("f1", sorted(s.candidate for s in log.alive)))
            raise MemoryBudgetError("torch-copy", 900 * MiB, "100 MiB available under the 1.5 GiB limit")
        return challenger.build(component, context)

    fake_plugins(log.candidate("f0", 0.004, "torch-copy", 64 * MiB), dataclasses.replace(challenger, build=build))
    report = _optimize(SlowNet(), tmp_path, search_budget_s=60).report().component("module")
    assert log.built_beside == [("f0", []), ("f1", ["f0"]), ("f1", [])]
    assert report.chosen == "f1"
    assert [r.name for r in report.candidates].count("f1") == 1, "one result per candidate"
    assert report.candidate("f1").accepted and report.candidate("f0").speedup


# -- host profiles for another machine -------------------------------------------------------------
def test_a_doctor_profile_round_trips_and_a_changed_one_is_refused() -> None:
    data = json.loads(json.dumps(host_profile().to_dict()))
    assert HostProfile.from_dict(data) == host_profile()
    data["cpu"]["usable_cpus"] = 64.0
    with pytest.raises(ValueError, match="fingerprint"):
        HostProfile.from_dict(data)
    with pytest.raises(ValueError, match="not a uniopt host profile"):
        HostProfile.from_dict({"cpu": {}})


class CheckedBranch(torch.nn.Module):
    """A Python branch on a tensor (as wav2vec2's attention has): the tracer warns, the graph is right anyway."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(torch.isfinite(x).all()):
            return self.model(x)
        return torch.zeros_like(x)


def test_openvino_conversion_from_the_module_stays_within_its_estimate(tmp_path: Path) -> None:
    """A legacy-exported component's IR, converted from the 25 MiB module and checked at another length."""
    torch.manual_seed(5)
    layers: list[torch.nn.Module] = []
    for _ in range(6):
        layers += [torch.nn.Linear(1024, 1024), torch.nn.GELU()]
    model = CheckedBranch(torch.nn.Sequential(*layers)).eval()
    x = torch.randn(2, 16, 1024)
    component = Component(
        "model",
        model,
        (x,),
        input_names=("x",),
        dynamic_axes={"x": {1: "frames"}},
        exporter="legacy",
        validation_inputs=[(x[:, :8],), (x.repeat(1, 2, 1),)],
    )
    engine = types.SimpleNamespace(model=model, uniopt_components=lambda: [component])
    opt = UniversalOptimizer(
        engine,
        mode="auto",
        allow=("eager", "openvino-f32"),
        cache_dir=str(tmp_path),
        model_warmup_runs=1,
        trial_processes=False,  # compiled here (the trial process's step is checked below)
    )
    result = opt.report().component("model").candidate("openvino-f32")
    assert result.accepted, result.reason
    steps = {step["step"]: step for step in result.memory_steps}
    assert {"openvino-convert-module", "openvino-check-module", "openvino-compile-f32"} <= set(steps), steps
    assert not [s for s in steps if s.startswith("onnx-export")], "the IR was converted from an ONNX export"
    for name in ("openvino-convert-module", "openvino-check-module", "openvino-compile-f32"):
        assert steps[name]["peak_bytes"] <= steps[name]["estimated_bytes"], steps[name]
    opt.restore()


def test_each_kind_of_build_step_stays_within_its_estimate(tmp_path: Path) -> None:
    """Every kind of step, built for real on a 25 MiB model: the measured peak is within the estimate.

    The factors themselves were measured on real-size models (benchmarks/memory_factors.py).
    """
    torch.manual_seed(4)
    layers: list[torch.nn.Module] = []
    for _ in range(6):
        layers += [torch.nn.Linear(1024, 1024), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers).eval()
    names = (
        "torch-int8",
        "torch-int8-weights",
        "torch-bf16",
        "onnxruntime-fp32",
        "onnxruntime-int8",
        "openvino-f32",
        "openvino-bf16",
        "openvino-int8-weights",
        "openvino-int8-static",
    )
    # Static int8 is calibrated on calibration inputs the guard does not check: two of them.
    engine = types.SimpleNamespace(model=model)
    inputs = [(torch.randn(2, 16, 1024),) for _ in range(3)]
    engine.uniopt_components = lambda: [Component("model", model, inputs[0], calibration_inputs=inputs[1:])]
    opt = UniversalOptimizer(
        engine,
        mode="auto",
        tier="cpu-avx512",
        allow=("eager", *names),
        cache_dir=str(tmp_path),
        search_budget_s=600,
        model_warmup_runs=1,
    )
    report = opt.report().component("model")
    ran: set[str] = set()
    exporter = Component("probe", model, inputs[0]).exporter  # the component's, as the doctor resolves it
    declared = {
        c.name: {step for s in c.steps for step in s.resolved(exporter)} for c in candidates(plugin_manager()).values()
    }
    for name in names:
        result = report.candidate(name)
        if result.reason.startswith("not available"):  # bf16 on a CPU without it
            continue
        assert result.memory_steps, (name, result.reason)
        # optimize doctor estimates from the steps a candidate declares (an export cached by another is skipped).
        # A compile in a trial process is the compile step's other form (not declared: it may not run).
        steps = {m["step"].replace("openvino-trial-", "openvino-compile-") for m in result.memory_steps}
        assert steps - {"first-calls"} <= declared[name], (name, steps, declared[name])
        for step in result.memory_steps:
            compiled = step["step"].startswith(("openvino-compile", "openvino-trial"))
            ran.add(step["step"].rsplit("-", 1)[0] if compiled else step["step"])
            assert step["peak_bytes"] <= step["estimated_bytes"], (name, step)
    expected = {"torch-int8", "onnxruntime-optimize", "onnxruntime-quantize", "onnxruntime-session"}
    expected |= {"torch-int8-weights", "openvino-convert", "nncf-weights", "nncf-static", "openvino-trial"}
    assert expected <= ran, expected - ran
    assert any(s.startswith("onnx-export-") for s in ran)


@pytest.mark.parametrize(("left_mib", "beside"), [(90, False), (400, True)])
def test_a_build_that_fits_only_without_the_best_runs_with_the_best_released(
    fake_plugins: Any,  # noqa: F811
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    left_mib: int,
    beside: bool,
) -> None:
    """The best holds 64 MiB, the challenger's build needs ~100 MiB with margins: built beside it only if that fits."""
    from uniopt.optimizer import selection

    log = _BuildLog()
    monkeypatch.setattr(selection, "memory_headroom", lambda: MemoryHeadroom(left_mib * MiB, None, None))
    fake_plugins(log.candidate("e0", 0.001, "torch-copy", 64 * MiB), log.candidate("e1", 0.004, "torch-copy", 64 * MiB))
    report = _optimize(SlowNet(), tmp_path, search_budget_s=60).report().component("module")
    assert report.chosen == "e0"
    assert log.built_beside[:2] == [("e0", []), ("e1", ["e0"] if beside else [])]
