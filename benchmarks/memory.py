"""Memory of optimizing each engine: eager RSS, optimized RSS, peak during optimization, on this host and a small VM.

    python benchmarks/memory.py [ENGINE ...] [--mode tier|auto ...] [--small-vm] [--host] [--json FILE]

Each (engine, mode, place) runs in a fresh process with an empty cache: it builds the engine, runs
its main method once eager (``extract_phonemes`` on 8 s, ``synthesize``, ``diarize`` on 30 s), wraps
it with ``UniversalOptimizer(mode=...)``, runs the main method again, and reports RSS figures.
``--small-vm`` runs inside a 1.3 CPU / 1.5 GiB cgroup (root; ``scripts/small_vm.py``). The row's
``fits`` says whether the optimized RSS is at most eager RSS + the chosen stages' own resident
size + 10%.
"""

from __future__ import annotations

import argparse
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
import os
from uniopt.cache import ArtifactCache
built = sorted({e.kind for e in ArtifactCache(os.environ["UNIOPT_CACHE_DIR"]).entries()})
print(json.dumps({"built": built, "eager_rss": eager_rss, "optimized_rss": rss_bytes(),
                  "peak": eager_rss + use.peak_increase_bytes, "stage_bytes": stage_bytes, "chosen": chosen,
                  "refused": refused, "setup_s": setup}))
"""


def _small_vm() -> object:
    spec = importlib.util.spec_from_file_location("small_vm", ROOT / "scripts" / "small_vm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(engine: str, mode: str, small_vm: bool) -> dict:
    fixture = ROOT / "tests" / "data" / "diarization" / "two_speakers.wav"
    argv = [sys.executable, "-c", WORKER, engine, mode, str(fixture)]
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "UNIOPT_CACHE_DIR": cache, "PYTHONPATH": str(ROOT / "src")}
        if small_vm:
            vm_module = _small_vm()
            with vm_module.small_vm() as vm:  # type: ignore[attr-defined]
                proc = subprocess.run(vm.command(argv), capture_output=True, text=True, env=env)
                oom = vm.oom_kills()
                limit = vm_module.LIMIT_1_5_GIB  # type: ignore[attr-defined]
        else:
            proc = subprocess.run(argv, capture_output=True, text=True, env=env)
            oom, limit = 0, None
    row = {"engine": engine, "mode": mode, "place": "1.3 CPU / 1.5 GiB cgroup" if small_vm else "host", "limit": limit}
    if proc.returncode != 0:
        row["error"] = "killed by the OOM killer" if oom else (proc.stderr.strip().splitlines() or ["?"])[-1]
        return row
    row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    row["fits"] = row["optimized_rss"] <= (row["eager_rss"] + row["stage_bytes"]) * 1.10
    return row


def _fmt(row: dict) -> str:
    limit = f"{row['limit'] / 2**30:.1f} GiB" if row["limit"] else "none"
    head = f"| {row['engine']} | {row['mode']} | {row['place']} | {limit} |"
    if "error" in row:
        return f"{head} {row['error']} | | | | |"
    chosen = ", ".join(f"{k}: {v}" for k, v in row["chosen"].items())
    return (
        f"{head} {row['eager_rss'] / MiB:.0f} | {row['optimized_rss'] / MiB:.0f} | {row['peak'] / MiB:.0f} | "
        f"{row['stage_bytes'] / MiB:.0f} | {'yes' if row['fits'] else 'no'} | {chosen} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("engines", nargs="*", default=["phoneme", "diarization", "tts"])
    parser.add_argument("--mode", action="append", choices=("tier", "auto"))
    parser.add_argument("--small-vm", action="store_true", help="run inside a 1.3 CPU / 1.5 GiB cgroup")
    parser.add_argument("--host", action="store_true", help="run on the host (the default without --small-vm)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    places = [p for p, on in (("host", args.host or not args.small_vm), ("vm", args.small_vm)) if on]
    print(
        "| engine | mode | where | limit | eager RSS MiB | optimized RSS MiB | peak MiB | chosen stages MiB "
        "| within eager + stages + 10% | chosen |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for place in places:
        for engine in args.engines:
            for mode in args.mode or ("tier", "auto"):
                row = run(engine, mode, place == "vm")
                rows.append(row)
                print(_fmt(row), flush=True)
                for reason in row.get("refused", []):
                    print(f"|   | refused | {reason} | | | | | | | |", flush=True)
                if "built" in row:
                    print(
                        f"|   | built in the cache | {', '.join(row['built']) or 'nothing'} | | | | | | | |", flush=True
                    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
