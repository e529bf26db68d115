"""Engines from PyPI, wrapped as their users would wrap them: their own methods, eager vs optimized.

    flock /tmp/uniopt-measure.lock python benchmarks/real_engines.py [--rounds 9] [--json]

resemblyzer's ``VoiceEncoder`` (trained weights shipped in its wheel) is wrapped in auto mode with
``sample=`` (two utterances of the committed fixture). Then ``embed_utterance`` on another 5 s
utterance and the forward alone (its batch of partial-utterance mels) are timed on an eager
encoder and on the optimized one, taking turns in the same run (uniopt's interleaved timer); the
medians, their ratio, the embeddings' cosine, and the host are printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from uniopt import UniversalOptimizer, host_profile
from uniopt.optimizer.timing import measure_interleaved

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "data" / "diarization" / "two_speakers.wav"


def host_line() -> str:
    """The host as ``optimize doctor`` sees it, in one line."""
    p = host_profile()
    flags = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if p.cpu.has(f))
    return (
        f"{p.cpu.model}, {p.usable_cpus:g} usable CPUs ({flags}), torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def timed(calls: dict[str, Any], rounds: int) -> dict[str, float]:
    """Median seconds per call, the calls taking turns, ``rounds`` rounds."""
    timings = measure_interleaved(
        calls, budget_s=3600, min_rounds=rounds, max_rounds=rounds, stable_rounds=rounds, prune_factor=None
    )
    return {name: t.p50 for name, t in timings.items()}


def resemblyzer(rounds: int) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from resemblyzer import VoiceEncoder

    audio, _ = sf.read(FIXTURE, dtype="float32")
    short, longer, test = audio[8_000:56_000], audio[8_000:88_000], audio[160_000:240_000]
    eager = VoiceEncoder(device="cpu", verbose=False)
    started = time.perf_counter()
    encoder = VoiceEncoder(device="cpu", verbose=False)
    fast = UniversalOptimizer(encoder, sample=[lambda e: e.embed_utterance(short), lambda e: e.embed_utterance(longer)])
    setup = time.perf_counter() - started
    _, partials, _ = eager.embed_utterance(test, return_partials=True)
    mels = torch.from_numpy(_mels(eager, test))

    def forward(model: Any) -> Any:
        def run() -> Any:
            with torch.no_grad():
                return model(mels)

        return run

    method = timed(
        {"eager": lambda: eager.embed_utterance(test), "optimized": lambda: fast.embed_utterance(test)}, rounds
    )
    forward_only = timed({"eager": forward(eager), "optimized": forward(encoder)}, rounds)
    a, b = eager.embed_utterance(test), fast.embed_utterance(test)
    report = fast.report().component("module")
    return {
        "engine": "resemblyzer VoiceEncoder",
        "chosen": report.chosen,
        "found_by": report.found_by,
        "setup_seconds": round(setup, 1),
        "partials": int(len(partials)),
        "embed_utterance_ms": {k: round(v * 1e3, 2) for k, v in method.items()},
        "embed_utterance_speedup": round(method["eager"] / method["optimized"], 2),
        "forward_ms": {k: round(v * 1e3, 2) for k, v in forward_only.items()},
        "forward_speedup": round(forward_only["eager"] / forward_only["optimized"], 2),
        "cosine": round(float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))), 6),
        "stage_calls": fast.get_performance_info()["components"]["module"],
    }


def _mels(encoder: Any, wav: np.ndarray) -> np.ndarray:
    """The batch of partial-utterance mels ``embed_utterance`` gives the model for ``wav``."""
    from resemblyzer import audio

    wav_slices, mel_slices = encoder.compute_partial_slices(len(wav), 1.3, 0.75)
    wav = np.pad(wav, (0, max(0, wav_slices[-1].stop - len(wav))))
    mel = audio.wav_to_mel_spectrogram(wav)
    return np.array([mel[s] for s in mel_slices])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per timing (median)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    result = resemblyzer(args.rounds)
    result["host"] = host_line()
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"host: {result['host']}")
    r = result
    print(f"{r['engine']}: chosen {r['chosen']}, found by {r['found_by']}, set-up {r['setup_seconds']} s")
    for what in ("embed_utterance", "forward"):
        ms = result[f"{what}_ms"]
        ratio = result[f"{what}_speedup"]
        print(f"  {what:16s} eager {ms['eager']:8.2f} ms  optimized {ms['optimized']:8.2f} ms  x{ratio}")
    print(
        f"  {result['partials']} partial utterances; embedding cosine {result['cosine']}; stage {result['stage_calls']}"
    )


if __name__ == "__main__":
    main()
