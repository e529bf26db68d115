"""Memory of optimizing each engine: eager RSS, optimized RSS, peak during optimization, on this host and a small VM.

    python benchmarks/memory.py [ENGINE ...] [--mode tier|auto ...] [--small-vm] [--host] [--bundle] [--json FILE]

Each (engine, mode, place) runs in a fresh process with an empty cache: it builds the engine, runs
its main method once eager (``extract_phonemes`` on 8 s, ``synthesize``, ``diarize`` on 30 s), wraps
it with ``UniversalOptimizer(mode=...)``, runs the main method again, and reports RSS figures.
``--small-vm`` runs inside a 1.3 CPU / 1.5 GiB cgroup (root; ``scripts/small_vm.py``). ``--bundle``
adds rows where the cgroup's processes load a bundle: ``optimize doctor --json`` run in the
cgroup gives its profile, ``optimize prepare ENGINE --for`` that profile builds the bundle on this
host, and both the cold and the warm process run with ``UNIOPT_CACHE_BUNDLE`` set to it (and
their own empty ``UNIOPT_CACHE_DIR``).

The chosen stages' own size is what they add to a process that runs the engine: a second fresh
process on the cache the first one filled (a warm start, which builds and exports nothing) does
the same, and its optimized RSS less its eager RSS is the stages' size, with the runtimes they
need (OpenVINO's CPU plugin, an ONNX Runtime session). Weights parked in a file
(:mod:`uniopt.parked`, where memory is short) leave the eager RSS once paged out: ``parked`` is
added back to that difference. The row's ``fits`` says whether the cold process's optimized RSS
is at most eager RSS - parked + that size + 10%. ``in-process`` is the resident increase the
report measured while each chosen stage was built, for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20

WORKER = r"""
import json, sys, time
import numpy as np
from uniopt import UniversalOptimizer
from uniopt.memory import measure_memory, release_memory, rss_bytes
from uniopt.engines.audio import speech_like_audio
name, mode = sys.argv[1], sys.argv[2]

def main_call(engine):
    if name == "phoneme":
        return engine.extract_phonemes(speech_like_audio(8.0, seed=7), 16000)
    if name == "tts":
        return engine.synthesize("Hello from a small machine.")
    import soundfile
    wav, rate = soundfile.read(sys.argv[3], dtype="float32")
    wav = np.concatenate([wav] * (int(30 * rate) // len(wav) + 1))[: int(30 * rate)]
    return engine.diarize(wav, rate)

from uniopt.engines.registry import load_engine
import os
from uniopt.cache import ArtifactCache
known = {e.key for e in ArtifactCache(os.environ["UNIOPT_CACHE_DIR"]).entries()}
engine, example = load_engine(name)
main_call(engine)
release_memory()
eager_rss = rss_bytes()
started = time.perf_counter()
with measure_memory() as use:
    opt = UniversalOptimizer(engine, example, mode=mode)
release_memory()
setup = time.perf_counter() - started
main_call(opt)
release_memory()
report = opt.report()
chosen = {c.component: c.chosen for c in report.components}
stage_bytes = sum(
    max(0, c.candidate(c.chosen).resident_memory_bytes or 0) for c in report.components if c.chosen != "eager"
)
refused = [f"{c.component}/{r.name}: {r.reason}" for c in report.components for r in c.candidates
           if r.reason.startswith("refused for memory")]
over = [f"{c.component}/{r.name}: {m['step']} estimated {m['estimated_bytes'] >> 20} MiB, "
        f"peak {m['peak_bytes'] >> 20} MiB"
        for c in report.components for r in c.candidates for m in r.memory_steps
        if m["peak_bytes"] > m["estimated_bytes"]]
entries = ArtifactCache(os.environ["UNIOPT_CACHE_DIR"]).entries()
built = sorted({e.kind for e in entries})
built_now = sorted({e.kind for e in entries if e.key not in known})
parked = sum(c.parked_bytes for c in report.components)
print(json.dumps({"built": built, "built_now": built_now, "eager_rss": eager_rss, "optimized_rss": rss_bytes(),
                  "peak": eager_rss + use.peak_increase_bytes, "stage_bytes": stage_bytes, "chosen": chosen,
                  "refused": refused, "over_estimate": over, "setup_s": setup, "parked": parked}))
"""


def _small_vm() -> object:
    spec = importlib.util.spec_from_file_location("small_vm", ROOT / "scripts" / "small_vm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _failure(proc: subprocess.CompletedProcess, oom: int) -> str:
    return "killed by the OOM killer" if oom else (proc.stderr.strip().splitlines() or ["?"])[-1]


def _optimize_cli() -> list[str]:
    return [sys.executable, "-c", "from uniopt.cli import main; main()"]


def prepare_bundle(engine: str, out: Path) -> None:
    """A bundle for ``engine`` built on this host for the small VM's profile (its doctor run inside the cgroup)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with _small_vm().small_vm() as vm:  # type: ignore[attr-defined]
        doctor = subprocess.run(
            vm.command([*_optimize_cli(), "doctor", "--json"]), capture_output=True, text=True, env=env, check=True
        )
    profile = out.with_suffix(".json")
    profile.write_text(doctor.stdout)
    subprocess.run(
        [*_optimize_cli(), "prepare", engine, "--for", str(profile), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )


def run(engine: str, mode: str, small_vm: bool, bundle: Path | None = None) -> dict:
    """A cold process on an empty cache, then a warm one on what it left (see the module docstring)."""
    fixture = ROOT / "tests" / "data" / "diarization" / "two_speakers.wav"
    argv = [sys.executable, "-c", WORKER, engine, mode, str(fixture)]
    place = ("1.3 CPU / 1.5 GiB cgroup" if small_vm else "host") + (", bundle" if bundle else "")
    row = {"engine": engine, "mode": mode, "place": place, "limit": None}
    with tempfile.TemporaryDirectory() as cache, contextlib.ExitStack() as stack:
        env = {**os.environ, "UNIOPT_CACHE_DIR": cache, "PYTHONPATH": str(ROOT / "src")}
        if bundle is not None:
            env["UNIOPT_CACHE_BUNDLE"] = str(bundle)
        command, oom_kills = argv, lambda: 0
        if small_vm:
            vm_module = _small_vm()
            vm = stack.enter_context(vm_module.small_vm())  # type: ignore[attr-defined]
            command, oom_kills = vm.command(argv), vm.oom_kills
            row["limit"] = vm_module.LIMIT_1_5_GIB  # type: ignore[attr-defined]
        cold = subprocess.run(command, capture_output=True, text=True, env=env)
        if cold.returncode != 0:
            row["error"] = _failure(cold, oom_kills())
            return row
        warm = subprocess.run(command, capture_output=True, text=True, env=env)
        if warm.returncode != 0:
            row["error"] = "warm start: " + _failure(warm, oom_kills())
            return row
    row.update(json.loads(cold.stdout.strip().splitlines()[-1]))
    again = json.loads(warm.stdout.strip().splitlines()[-1])
    row["warm_rss"] = again["optimized_rss"]
    row["warm_chosen"] = again["chosen"]
    row["warm_built"] = again["built_now"]
    # Parked weights leave the eager RSS (paged out once the stages run): they come off both sides.
    row["stages_warm"] = max(0, again["optimized_rss"] - again["eager_rss"] + again["parked"])
    row["fits"] = row["optimized_rss"] <= (row["eager_rss"] - row["parked"] + row["stages_warm"]) * 1.10
    return row


def _fmt(row: dict) -> str:
    limit = f"{row['limit'] / 2**30:.1f} GiB" if row["limit"] else "none"
    head = f"| {row['engine']} | {row['mode']} | {row['place']} | {limit} |"
    if "error" in row:
        return f"{head} {row['error']} |" + " |" * 8
    chosen = ", ".join(f"{k}: {v}" for k, v in row["chosen"].items())
    return (
        f"{head} {row['eager_rss'] / MiB:.0f} | {row['optimized_rss'] / MiB:.0f} | {row['peak'] / MiB:.0f} | "
        f"{row['warm_rss'] / MiB:.0f} | {row['stages_warm'] / MiB:.0f} | {row['stage_bytes'] / MiB:.0f} | "
        f"{row['parked'] / MiB:.0f} | {'yes' if row['fits'] else 'no'} | {chosen} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engines", nargs="*", default=["phoneme", "diarization", "tts"])
    parser.add_argument("--mode", action="append", choices=("tier", "auto"))
    parser.add_argument("--small-vm", action="store_true", help="run inside a 1.3 CPU / 1.5 GiB cgroup")
    parser.add_argument("--host", action="store_true", help="run on the host (the default without --small-vm)")
    parser.add_argument("--bundle", action="store_true", help="add cgroup rows that load a bundle made on this host")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    places = [p for p, on in (("host", args.host or not args.small_vm), ("vm", args.small_vm)) if on]
    print(
        "| engine | mode | where | limit | eager RSS MiB | optimized RSS MiB | peak MiB | warm start RSS MiB "
        "| chosen stages MiB (warm) | (in-process) | parked MiB | within eager - parked + stages + 10% | chosen |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    bundles = tempfile.TemporaryDirectory()
    if args.bundle:
        places.append("vm+bundle")
    for place in places:
        for engine in args.engines:
            bundle = None
            if place == "vm+bundle":
                bundle = Path(bundles.name) / engine
                prepare_bundle(engine, bundle)
            for mode in args.mode or ("tier", "auto"):
                row = run(engine, mode, place != "host", bundle)
                rows.append(row)
                print(_fmt(row), flush=True)
                for reason in row.get("refused", []):
                    print(f"|   | refused | {reason} |" + " |" * 10, flush=True)
                for step in row.get("over_estimate", []):
                    print(f"|   | over its estimate | {step} |" + " |" * 10, flush=True)
                if "built" in row:
                    built, again = ", ".join(row["built"]) or "nothing", ", ".join(row["warm_built"]) or "nothing"
                    line = f"|   | built in the cache | {built}; warm start built {again} |"
                    print(line + " |" * 10, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
