"""The on-disk artifact cache end to end: separate processes export, reuse, repair and share it.

Every run is a fresh ``tests/optimize_worker.py`` process with an isolated environment (its own
``UNIOPT_CACHE_DIR``, the built-in plugins only, no uniopt setting inherited from this process).
One cold run fills a cache; each scenario copies it, damages or changes something, and runs a
worker on the copy; the scenarios run two at a time.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from optimize_worker import worker_env
from uniopt.cache import ArtifactCache, CacheEntry

WORKER = Path(__file__).parent / "optimize_worker.py"
BASE: dict[str, Any] = {"mode": "auto", "tier": "cpu-avx512", "model_warmup_runs": 1, "search_budget_s": 120}
COLD_ALLOW = ["eager", "onnxruntime-fp32", "openvino-f32"]
ORT_ONLY = ["eager", "onnxruntime-fp32"]
OV_ONLY = ["eager", "openvino-f32"]
TIMEOUT = 300


def spec(allow: list[str], *, seed: int = 0, layers: int = 2, start_file: Path | None = None, **settings: Any) -> str:
    data: dict[str, Any] = {"seed": seed, "layers": layers, "settings": {**BASE, "allow": allow, **settings}}
    if start_file is not None:
        data["start_file"] = str(start_file)
    return json.dumps(data)


def start(cache: Path, worker_spec: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), worker_spec],
        env=worker_env(cache),
        cwd=cache.parent,  # no .env file there
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@dataclass
class Run:
    """A finished worker: its exit code, report, check line and wall time."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)
    check: dict[str, Any] = field(default_factory=dict)

    def ok(self) -> Run:
        assert self.returncode == 0, f"exit {self.returncode}\n{self.stderr[-4000:]}"
        return self

    @property
    def component(self) -> dict[str, Any]:
        (component,) = self.report["components"]
        return component

    def candidate(self, name: str) -> dict[str, Any]:
        return next(c for c in self.component["candidates"] if c["name"] == name)

    def built(self, kind: str) -> list[bool]:
        """For each look-up of an entry of ``kind``: whether this process built it."""
        return [b["built"] for b in self.check["builds"] if b["kind"] == kind]


def finish(proc: subprocess.Popen[str], started: float) -> Run:
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    run = Run(proc.returncode, stdout, stderr, time.monotonic() - started)
    lines = stdout.strip().splitlines()
    if proc.returncode == 0:
        run.report = json.loads(lines[-1])
        run.check = json.loads(next(line for line in lines if line.startswith("check ")).removeprefix("check "))
    return run


def run_worker(cache: Path, worker_spec: str) -> Run:
    started = time.monotonic()
    return finish(start(cache, worker_spec), started)


def entries(cache: Path) -> dict[str, CacheEntry]:
    return {e.key: e for e in ArtifactCache(cache).entries()}


def entry_of(cache: Path, kind: str) -> CacheEntry:
    (entry,) = [e for e in ArtifactCache(cache).entries() if e.kind == kind]
    return entry


def intact(cache: Path) -> None:
    """Every entry passes the full check (size and sha256) and nothing else is in entries/."""
    problems = [(e.kind, problem) for e, problem in ArtifactCache(cache).verify() if problem is not None]
    assert not problems, problems


# -- one cold run and one warm run in the same directory -------------------------------------------
@dataclass
class ColdWarm:
    cache: Path
    cold: Run
    warm: Run
    before_warm: dict[str, CacheEntry]
    after_warm: dict[str, CacheEntry]


@pytest.fixture(scope="module")
def cold_warm(tmp_path_factory: pytest.TempPathFactory) -> ColdWarm:
    cache = tmp_path_factory.mktemp("cold-warm") / "cache"
    cold = run_worker(cache, spec(COLD_ALLOW)).ok()
    before = entries(cache)
    warm = run_worker(cache, spec(COLD_ALLOW)).ok()
    return ColdWarm(cache, cold, warm, before, entries(cache))


def test_cold_run_exports_and_decides(cold_warm: ColdWarm) -> None:
    cold = cold_warm.cold
    assert not cold.component["decision_from_cache"]
    for name in ("onnxruntime-fp32", "openvino-f32"):
        r = cold.candidate(name)
        assert r["accepted"], r["reason"]
        assert r["from_cache"] is False
    # Exported once, then reused: by the second candidate, and when the first is rebuilt to be timed
    # against it (auto mode releases the best so far while a larger build runs).
    exports = cold.built("onnx-export")
    assert exports[0] is True and len(exports) >= 2 and not any(exports[1:]), exports
    kinds = sorted(e.kind for e in cold_warm.before_warm.values())
    # Two sets of reference outputs: the guarded inputs, and the other sizes graph stages are checked at.
    assert kinds == ["decision", "onnx-export", "onnxruntime-fp32", "openvino-plain", "reference", "reference"]
    assert cold.check["max_diff"] <= 1e-4
    intact(cold_warm.cache)


def test_warm_run_applies_the_stored_decision(cold_warm: ColdWarm) -> None:
    cold, warm = cold_warm.cold, cold_warm.warm
    assert warm.component["decision_from_cache"] is True
    assert warm.component["chosen"] == cold.component["chosen"]
    chosen = warm.component["chosen"]
    if chosen != "eager":
        assert warm.candidate(chosen)["accepted"] and warm.candidate(chosen)["from_cache"] is True
    assert not any(b["built"] for b in warm.check["builds"]), warm.check["builds"]
    assert set(cold_warm.after_warm) == set(cold_warm.before_warm), "no new cache entries"
    assert warm.report["setup_seconds"] < cold.report["setup_seconds"]
    assert warm.check["max_diff"] <= 1e-4


# -- scenarios on copies of the cold cache, two at a time ------------------------------------------
def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _flip(start_at: Callable[[int], int], count: int) -> Callable[[Path], None]:
    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        begin = start_at(len(data))
        for i in range(begin, begin + count):
            data[i] ^= 0xFF
        with open(path, "r+b") as f:  # in place, same size
            f.write(bytes(data))

    return flip


def _delete(path: Path) -> None:
    path.unlink()


#: name -> (kind of the damaged entry, its file, how it is damaged, the candidates the next run allows)
DAMAGE: dict[str, tuple[str, str, Callable[[Path], None], list[str]]] = {
    "truncated-export": ("onnx-export", "model.onnx", _truncate, ORT_ONLY),
    "truncated-ort-model": ("onnxruntime-fp32", "model.onnx", _truncate, ORT_ONLY),
    "truncated-openvino-bin": ("openvino-plain", "model.bin", _truncate, OV_ONLY),
    "flipped-ort-header": ("onnxruntime-fp32", "model.onnx", _flip(lambda n: 0, 16), ORT_ONLY),
    "flipped-openvino-weights": ("openvino-plain", "model.bin", _flip(lambda n: n // 3, 64), OV_ONLY),
    "deleted-export-manifest": ("onnx-export", "manifest.json", _delete, ORT_ONLY),
}
CHANGES: dict[str, str] = {
    "min-speedup": spec(COLD_ALLOW, min_speedup=1.01),
    "new-seed": spec(COLD_ALLOW, seed=1),
}


@dataclass
class Scenario:
    cache: Path
    run: Run
    before: dict[str, CacheEntry]
    original: bytes = b""  # the damaged file as the cold run wrote it


@pytest.fixture(scope="module")
def scenarios(cold_warm: ColdWarm, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Scenario]:
    prepared: dict[str, tuple[Path, str, dict[str, CacheEntry], bytes]] = {}
    for name in [*DAMAGE, *CHANGES]:
        cache = tmp_path_factory.mktemp(name) / "cache"
        shutil.copytree(cold_warm.cache, cache)
        original = b""
        if name in DAMAGE:
            kind, filename, damage, allow = DAMAGE[name]
            target = entry_of(cache, kind).path / filename
            original = target.read_bytes()
            damage(target)
            worker_spec = spec(allow)
        else:
            worker_spec = CHANGES[name]
        prepared[name] = (cache, worker_spec, entries(cache), original)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {
            name: pool.submit(run_worker, cache, worker_spec) for name, (cache, worker_spec, _, _) in prepared.items()
        }
        runs = {name: future.result() for name, future in futures.items()}
    return {
        name: Scenario(cache, runs[name], before, original) for name, (cache, _, before, original) in prepared.items()
    }


def _repaired(scenario: Scenario, kind: str, filename: str, candidate: str) -> CacheEntry:
    """The run succeeded, the candidate was accepted, and the damaged entry is whole again."""
    run = scenario.run.ok()
    r = run.candidate(candidate)
    assert r["accepted"], r["reason"]
    assert run.check["max_diff"] <= 1e-4
    assert True in run.built(kind), f"the {kind} entry was not rebuilt: {run.check['builds']}"
    entry = entry_of(scenario.cache, kind)
    assert entry.valid, entry.problem
    intact(scenario.cache)
    assert (entry.path / filename).stat().st_size == len(scenario.original), "its file size is restored"
    return entry


def test_truncated_export_is_rebuilt(scenarios: dict[str, Scenario]) -> None:
    s = scenarios["truncated-export"]
    _repaired(s, "onnx-export", "model.onnx", "onnxruntime-fp32")
    assert s.run.built("onnxruntime-fp32") == [False], "the derived ORT model was intact and is reused"


def test_truncated_onnxruntime_model_is_rebuilt(scenarios: dict[str, Scenario]) -> None:
    s = scenarios["truncated-ort-model"]
    _repaired(s, "onnxruntime-fp32", "model.onnx", "onnxruntime-fp32")
    assert s.run.built("onnx-export") == [False], "the export was intact and is reused"


def test_truncated_openvino_weights_are_rebuilt(scenarios: dict[str, Scenario]) -> None:
    s = scenarios["truncated-openvino-bin"]
    _repaired(s, "openvino-plain", "model.bin", "openvino-f32")


def test_flipped_bytes_that_break_loading_are_rebuilt(scenarios: dict[str, Scenario]) -> None:
    """Same size, so the cheap check passes; ONNX Runtime cannot parse it; rebuild_on_failure repairs it."""
    s = scenarios["flipped-ort-header"]
    entry = _repaired(s, "onnxruntime-fp32", "model.onnx", "onnxruntime-fp32")
    assert (entry.path / "model.onnx").read_bytes() == s.original
    assert "corrupt" in s.run.stderr or "rebuil" in s.run.stderr, "the repair is logged"


def test_flipped_weights_caught_by_the_guard_are_rebuilt(scenarios: dict[str, Scenario]) -> None:
    s = scenarios["flipped-openvino-weights"]
    entry = _repaired(s, "openvino-plain", "model.bin", "openvino-f32")
    assert (entry.path / "model.bin").read_bytes() == s.original


def test_flipped_weights_never_serve(scenarios: dict[str, Scenario]) -> None:
    """Whatever happens to the corrupt entry, its wrong outputs must not be installed."""
    run = scenarios["flipped-openvino-weights"].run.ok()
    r = run.candidate("openvino-f32")
    assert r["accepted"] or r["reason"].startswith("guard: "), r
    assert run.check["max_diff"] <= 1e-4


def test_missing_manifest_is_rebuilt(scenarios: dict[str, Scenario]) -> None:
    s = scenarios["deleted-export-manifest"]
    run = s.run.ok()
    assert run.candidate("onnxruntime-fp32")["accepted"], run.candidate("onnxruntime-fp32")["reason"]
    assert run.built("onnx-export") == [True]
    entry = entry_of(s.cache, "onnx-export")
    assert (entry.path / "manifest.json").is_file() and entry.valid
    intact(s.cache)


def test_changed_setting_decides_again_from_cached_artifacts(scenarios: dict[str, Scenario]) -> None:
    s = scenarios["min-speedup"]
    run = s.run.ok()
    assert run.component["decision_from_cache"] is False
    accepted = [c for c in run.component["candidates"] if c["accepted"] and c["name"] != "eager"]
    assert sorted(c["name"] for c in accepted) == ["onnxruntime-fp32", "openvino-f32"]
    for c in accepted:
        assert c["from_cache"] is True, c
    new = {key: e.kind for key, e in entries(s.cache).items() if key not in s.before}
    assert list(new.values()) == ["decision"], "only the new decision was written"
    assert [b["kind"] for b in run.check["builds"] if b["built"]] == ["decision"]


def test_changed_weights_export_again(scenarios: dict[str, Scenario]) -> None:
    s = scenarios["new-seed"]
    run = s.run.ok()
    assert run.component["decision_from_cache"] is False
    for name in ("onnxruntime-fp32", "openvino-f32"):
        r = run.candidate(name)
        assert r["accepted"], r["reason"]
        assert r["from_cache"] is False
    assert True in run.built("onnx-export")
    assert sum(e.kind == "onnx-export" for e in entries(s.cache).values()) == 2
    assert run.check["max_diff"] <= 1e-4


# -- a process killed in the middle of an export ---------------------------------------------------
def test_killed_during_export_leaves_a_usable_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    layers = 8  # a deeper model: its dynamo export takes seconds
    proc = start(cache, spec(ORT_ONLY, layers=layers))
    try:
        deadline = time.monotonic() + 180
        temporary = None
        while temporary is None:
            assert proc.poll() is None, f"the worker ended before exporting:\n{proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "no build started in the cache's tmp/ directory"
            if (cache / "tmp").is_dir():
                temporary = next(
                    (p for p in (cache / "tmp").iterdir() if p.is_dir() and f".{proc.pid}." in p.name), None
                )
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    assert not [e for e in ArtifactCache(cache).entries() if e.kind == "onnx-export"], "it was killed mid-export"

    run = run_worker(cache, spec(ORT_ONLY, layers=layers)).ok()
    r = run.candidate("onnxruntime-fp32")
    assert r["accepted"], r["reason"]
    assert run.built("onnx-export") == [True]
    assert run.check["max_diff"] <= 1e-4
    assert entry_of(cache, "onnx-export").valid
    intact(cache)


# -- two processes at once -------------------------------------------------------------------------
def run_together(cache: Path, go: Path, worker_spec: str) -> list[Run]:
    """Two workers on one cache, started at the same moment."""
    procs = [start(cache, worker_spec) for _ in range(2)]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")
        started = time.monotonic()
        go.touch()
        return [finish(proc, started).ok() for proc in procs]
    finally:
        for proc in procs:
            proc.kill()


def test_two_cold_processes_measure_once(tmp_path: Path) -> None:
    """One process searches; the other waits for its decision and applies it, building nothing."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    runs = run_together(cache, go, spec(ORT_ONLY, start_file=go))
    measured = [run for run in runs if not run.component["decision_from_cache"]]
    applied = [run for run in runs if run.component["decision_from_cache"]]
    assert len(measured) == len(applied) == 1, [run.component["decision_from_cache"] for run in runs]
    (searcher,), (waiter,) = measured, applied
    assert waiter.component["chosen"] == searcher.component["chosen"]
    assert not any(b["built"] for b in waiter.check["builds"]), waiter.check["builds"]
    assert searcher.built("decision") == [True] and waiter.built("decision") == []
    for run in runs:
        assert run.check["max_diff"] <= 1e-4
    assert sum(e.kind == "decision" for e in ArtifactCache(cache).entries()) == 1
    intact(cache)


def test_two_processes_export_once(tmp_path: Path) -> None:
    """Both search (decisions not reused): the per-key artifact locks still build each artifact once."""
    cache = tmp_path / "cache"
    go = tmp_path / "go"
    runs = run_together(cache, go, spec(ORT_ONLY, start_file=go, reuse_decisions=False))

    for run in runs:
        assert run.candidate("onnxruntime-fp32")["accepted"], run.candidate("onnxruntime-fp32")["reason"]
        assert run.check["max_diff"] <= 1e-4
    # The per-key lock and the re-check once it is held: each artifact is built by exactly one process.
    for kind in ("onnx-export", "onnxruntime-fp32"):
        built = [run.built(kind) for run in runs]
        assert sorted(b for bs in built for b in bs) == [False, True], (kind, built)
    # A process that built nothing reports the candidate from cache; one that built something does not.
    for run in runs:
        built_any = any(run.built("onnx-export") + run.built("onnxruntime-fp32"))
        assert run.candidate("onnxruntime-fp32")["from_cache"] is (not built_any)
    if any(run.built("onnx-export") == run.built("onnxruntime-fp32") == [True] for run in runs):
        assert sorted(run.candidate("onnxruntime-fp32")["from_cache"] for run in runs) == [False, True]
    assert sum(e.kind == "onnx-export" for e in ArtifactCache(cache).entries()) == 1
    intact(cache)
