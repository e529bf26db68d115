"""Diarization quality (DER per fixture, batch and streaming) and latency per 10 s window.

    python benchmarks/diarization_quality.py [--modes eager,auto] [--calls 30] [--cgroup] [--json FILE]

For each mode (``eager``: the plain :class:`Diarizer`; ``auto``/``tier``: wrapped by
``UniversalOptimizer``), without ``num_speakers``:

* DER (pyannote.metrics, collar 0.25 s) and speakers found on every fixture in
  ``tests/data/diarization/``, batch and streamed in 1 s chunks;
* latency of ``diarize`` on 10 s windows of the fixtures (every 5 s of each), ``--calls`` calls
  after two warm-up calls: p50 / p95 / p99, the median CPU time of a call (all threads; what
  other processes' load changes least), and where the time goes (median ms per call of
  segmentation, mel features, embedding network, unit building, clustering, aggregation).

``--cgroup`` runs the same inside a new cgroup limited to 1.3 CPUs and 1.5 GiB
(``scripts/small_vm.py``; root only, cgroup v1 or v2). The host, its load average before and
after, and the threads are printed with the figures: on a shared machine other processes' load
changes the absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "diarization"
FIXTURES = ("two_speakers", "three_speakers", "four_speakers")
SR = 16_000
STAGES = ("segmentation", "mel", "embedding", "units", "clustering", "aggregate")


def build(mode: str, cache_dir: str) -> tuple[Any, float, str]:
    """The engine for ``mode``, its set-up seconds, and what was chosen per component."""
    from uniopt import UniversalOptimizer
    from uniopt.engines.diarization import Diarizer

    started = time.perf_counter()
    if mode == "eager":
        return Diarizer(), time.perf_counter() - started, "eager"
    engine = UniversalOptimizer(Diarizer(), mode=mode, cache_dir=cache_dir)
    chosen = ", ".join(f"{c.component}={c.chosen}" for c in engine.report().components)
    return engine, time.perf_counter() - started, chosen


def quality(engine: Any) -> list[dict[str, Any]]:
    """DER, its parts and the speaker count per fixture, batch and in 1 s chunks."""
    from uniopt.engines.diarization.metrics import diarization_error, segments_from_json

    rows = []
    for name in FIXTURES:
        audio, _ = sf.read(DATA / f"{name}.wav", dtype="float32")
        reference, duration = segments_from_json(DATA / f"{name}.json")
        streamer = engine.stream()
        streamed = []
        for first in range(0, audio.size, SR):
            streamed += streamer.feed(audio[first : first + SR], SR)
        streamed += streamer.flush()
        for how, hypothesis in (("batch", engine.diarize(audio, SR)), ("stream 1 s", streamed)):
            score = diarization_error(reference, hypothesis, duration)
            rows.append({"fixture": name, "how": how, **score.__dict__})
    return rows


def _timed(record: dict[str, list[float]], stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            record[stage][-1] += time.perf_counter() - started

    return wrapper


def _hooked(record: dict[str, list[float]], stage: str, module: Any) -> list[Any]:
    """Forward pre-hook and hook adding each call's seconds of ``module`` to ``record[stage]``."""
    started: list[float] = []

    def before(*_: Any) -> None:
        started.append(time.perf_counter())

    def after(*_: Any) -> None:
        record[stage][-1] += time.perf_counter() - started.pop()

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after, always_call=True)]


def latency(engine: Any, calls: int) -> dict[str, Any]:
    """p50/p95/p99 ms of ``diarize`` on 10 s windows, and the median ms per stage."""
    import uniopt.engines.diarization.pipeline as pipeline

    diarizer = getattr(engine, "engine", engine)
    windows = []
    for name in FIXTURES:
        audio, _ = sf.read(DATA / f"{name}.wav", dtype="float32")
        windows += [audio[s : s + 10 * SR] for s in range(0, audio.size - 10 * SR + 1, 5 * SR)]
    record: dict[str, list[float]] = {stage: [0.0] for stage in STAGES}  # [0] collects the warm-up calls
    mel = pipeline.mel_spectrograms
    # The networks are timed by forward hooks, which run around an installed (optimized) forward
    # too; the pipeline's methods by instance attributes that shadow them (deleting them restores
    # the class's).
    handles = []
    for module, stage in ((diarizer.segmentation, "segmentation"), (diarizer.embedding, "embedding")):
        handles += _hooked(record, stage, module)
    patched = [
        (diarizer, "_units", "units"),
        (diarizer, "_cluster", "clustering"),
        (diarizer, "_aggregate", "aggregate"),
    ]
    if any(attr in vars(owner) for owner, attr, _ in patched):
        raise SystemExit("cannot time the stages: a stage method is already an instance attribute")
    for owner, attr, stage in patched:
        setattr(owner, attr, _timed(record, stage, getattr(owner, attr)))
    pipeline.mel_spectrograms = _timed(record, "mel", mel)
    try:
        for window in windows[:2]:
            engine.diarize(window, SR)
        totals, cpu = [], []
        for call in range(calls):
            for stage in STAGES:
                record[stage].append(0.0)
            started, cpu_started = time.perf_counter(), time.process_time()
            engine.diarize(windows[call % len(windows)], SR)
            totals.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
    finally:
        pipeline.mel_spectrograms = mel
        for owner, attr, _ in patched:
            delattr(owner, attr)
        for handle in handles:
            handle.remove()
    ms = np.asarray(totals) * 1e3
    stages = {stage: statistics.median(record[stage][1:]) * 1e3 for stage in STAGES}
    stages["other"] = float(np.median(ms)) - sum(stages.values())
    return {
        "windows": len(windows),
        "calls": calls,
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "max": float(ms.max()),
        "cpu_p50": float(np.median(cpu)) * 1e3,
        "stages_ms": stages,
    }


def host() -> dict[str, Any]:
    import torch

    from uniopt.tiers.profile import host_profile

    profile = host_profile()
    return {
        "cpu": profile.cpu.model,
        "usable_cpus": profile.usable_cpus,
        "cgroup_cpu_quota": profile.cgroup_cpu_quota,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


def run(modes: list[str], calls: int) -> dict[str, Any]:
    result: dict[str, Any] = {"host": host(), "modes": {}}
    cache_dir = tempfile.mkdtemp(prefix="uniopt-diar-bench-")
    for mode in modes:
        engine, setup_s, chosen = build(mode, cache_dir)
        result["modes"][mode] = {
            "setup_s": setup_s,
            "chosen": chosen,
            "quality": quality(engine),
            "latency": latency(engine, calls),
        }
    result["load_average_after"] = os.getloadavg()
    return result


def print_tables(result: dict[str, Any]) -> None:
    h = result["host"]
    print(
        f"host: {h['cpu']}, usable CPUs {h['usable_cpus']}, torch threads {h['torch_threads']}; "
        f"load average before {tuple(round(x, 1) for x in h['load_average'])}, "
        f"after {tuple(round(x, 1) for x in result['load_average_after'])}"
    )
    print("\n| mode | fixture | how | speakers (true) | DER | missed | false alarm | confusion |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, data in result["modes"].items():
        for r in data["quality"]:
            print(
                f"| {mode} | {r['fixture']} | {r['how']} | {r['speakers']} ({r['reference_speakers']}) | "
                f"{r['der']:.1%} | {r['missed']:.1%} | {r['false_alarm']:.1%} | {r['confusion']:.1%} |"
            )
    columns = (*STAGES, "other")
    print(
        "\n| mode | chosen | calls | p50 ms | p95 ms | p99 ms | CPU ms p50 | "
        + " | ".join(f"{s} ms" for s in columns)
        + " |"
    )
    print("|---|---|---|---|---|---|---|" + "---|" * len(columns))
    for mode, data in result["modes"].items():
        lat = data["latency"]
        stages = " | ".join(f"{lat['stages_ms'][s]:.1f}" for s in columns)
        times = " | ".join(f"{lat[key]:.0f}" for key in ("p50", "p95", "p99", "cpu_p50"))
        print(f"| {mode} | {data['chosen']} | {lat['calls']} | {times} | {stages} |")


def _small_vm() -> Any:
    """``scripts/small_vm.py`` as a module (the one place that makes the 1.3 CPU / 1.5 GiB cgroup)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("small_vm", ROOT / "scripts" / "small_vm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def in_cgroup(argv: list[str]) -> int:
    """Re-run this script with ``argv`` inside a new 1.3 CPU / 1.5 GiB cgroup, removed after."""
    vm_module = _small_vm()
    try:
        with vm_module.small_vm() as vm:
            return subprocess.run(vm.command([sys.executable, __file__, *argv])).returncode
    except vm_module.Unavailable as exc:
        raise SystemExit(f"--cgroup: {exc}") from exc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="eager,auto", help="comma-separated: eager, tier, auto")
    parser.add_argument("--calls", type=int, default=30, help="timed 10 s windows per mode")
    parser.add_argument("--cgroup", action="store_true", help="run inside a 1.3 CPU / 1.5 GiB cgroup")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.cgroup:
        return in_cgroup([a for a in sys.argv[1:] if a != "--cgroup"])
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("eager", "tier", "auto") for m in modes) or args.calls < 1:
        raise SystemExit("--modes takes eager, tier, auto; --calls at least 1")
    result = run(modes, args.calls)
    print_tables(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
