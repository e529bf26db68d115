"""Engines from PyPI, wrapped as their users would wrap them: their own methods, eager vs optimized.

    flock /tmp/uniopt-measure.lock python benchmarks/real_engines.py [--rounds 9] [--json]

Each engine is wrapped in auto mode and its users' own call is timed on an eager copy and on the
optimized one, taking turns in the same run (uniopt's interleaved timer); the medians, their
ratio, how close the outputs are, and the host are printed.

- resemblyzer's ``VoiceEncoder`` (trained weights shipped in its wheel), wrapped with ``sample=``
  (two utterances of the committed fixture): ``embed_utterance`` on another 5 s utterance, and the
  forward alone (its batch of partial-utterance mels).
- silero-vad's packaged model (trained weights in its wheel) through ``SileroVadAdapter``:
  ``get_speech_timestamps`` over the 30 s fixture (one network call per 32 ms chunk).
- a transformers ``pipeline("automatic-speech-recognition")`` over a ``Wav2Vec2ForCTC`` of
  wav2vec2-base's size (its default config, random weights, saved to a local directory), wrapped
  with ``sample=`` (4 s and 6 s clips): the pipeline on a 10 s clip.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from uniopt import UniversalOptimizer, host_profile
from uniopt.optimizer.timing import measure_rounds

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
    timings = measure_rounds(calls, rounds)
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
        "embed_utterance (5 s)": _ratio(method["eager"], method["optimized"]),
        "forward": _ratio(forward_only["eager"], forward_only["optimized"]),
        "cosine": round(float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))), 6),
        "stage_calls": fast.get_performance_info()["components"]["module"],
    }


def _ratio(eager: float, optimized: float) -> dict[str, Any]:
    return {"eager_ms": round(eager * 1e3, 2), "optimized_ms": round(optimized * 1e3, 2),
            "speedup": round(eager / optimized, 2)}  # fmt: skip


def silero(rounds: int) -> dict[str, Any]:
    with warnings.catch_warnings():  # torch.jit.load is deprecated upstream
        warnings.simplefilter("ignore", DeprecationWarning)
        from silero_vad import get_speech_timestamps, load_silero_vad
    from uniopt.engines.silero_vad import SileroVadAdapter

    audio = torch.from_numpy(sf.read(FIXTURE, dtype="float32")[0])
    eager = load_silero_vad()
    started = time.perf_counter()
    fast = UniversalOptimizer(SileroVadAdapter(load_silero_vad()))
    setup = time.perf_counter() - started
    method = timed(
        {"eager": lambda: get_speech_timestamps(audio, eager), "optimized": lambda: get_speech_timestamps(audio, fast)},
        rounds,
    )
    expected, got = get_speech_timestamps(audio, eager), get_speech_timestamps(audio, fast)
    return {
        "engine": "silero-vad (SileroVadAdapter)",
        "chosen": fast.report().component("network").chosen,
        "setup_seconds": round(setup, 1),
        "get_speech_timestamps (30 s)": _ratio(method["eager"], method["optimized"]),
        "same_timestamps": got == expected,
        "segments": len(expected),
    }


def asr_pipeline(rounds: int) -> dict[str, Any]:
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, pipeline

    audio = sf.read(FIXTURE, dtype="float32")[0]
    directory = Path(tempfile.mkdtemp(prefix="uniopt-asr-"))
    vocab = {
        "<pad>": 0,
        "<s>": 1,
        "</s>": 2,
        "<unk>": 3,
        "|": 4,
        **{c: i + 5 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")},
    }
    (directory / "vocab.json").write_text(json.dumps(vocab))
    torch.manual_seed(0)
    Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=len(vocab), pad_token_id=0)).eval().save_pretrained(directory)
    Wav2Vec2CTCTokenizer(str(directory / "vocab.json")).save_pretrained(directory)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, return_attention_mask=False).save_pretrained(
        directory
    )
    eager = pipeline("automatic-speech-recognition", model=str(directory), device="cpu")
    asr = pipeline("automatic-speech-recognition", model=str(directory), device="cpu")
    started = time.perf_counter()
    fast = UniversalOptimizer(asr, sample=[lambda p: p(audio[:64_000]), lambda p: p(audio[:96_000])])
    setup = time.perf_counter() - started
    clip = audio[160_000:320_000]
    method = timed({"eager": lambda: eager(clip), "optimized": lambda: fast(clip)}, rounds)
    with torch.no_grad():
        inputs = torch.from_numpy(clip)[None]
        a, b = eager.model(inputs).logits, asr.model(inputs).logits
    return {
        "engine": "transformers ASR pipeline (Wav2Vec2ForCTC, wav2vec2-base size)",
        "chosen": fast.report().component("model").chosen,
        "found_by": fast.report().component("model").found_by,
        "setup_seconds": round(setup, 1),
        "pipeline (10 s)": _ratio(method["eager"], method["optimized"]),
        "same_transcription": eager(clip)["text"] == fast(clip)["text"],
        "logits_argmax_agreement": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4),
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
    parser.add_argument("--engine", action="append", choices=("resemblyzer", "silero", "asr"), help="default: all")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    runs = {"resemblyzer": resemblyzer, "silero": silero, "asr": asr_pipeline}
    results = [runs[name](args.rounds) for name in args.engine or runs]
    if args.json:
        print(json.dumps({"host": host_line(), "engines": results}, indent=1))
        return
    print(f"host: {host_line()}")
    for result in results:
        print(f"{result['engine']}: chosen {result['chosen']}, set-up {result['setup_seconds']} s")
        for key, value in result.items():
            if key in ("engine", "chosen", "setup_seconds"):
                continue
            if isinstance(value, dict) and "speedup" in value:
                print(f"  {key:30s} eager {value['eager_ms']:9.2f} ms  optimized {value['optimized_ms']:9.2f} ms"
                      f"  x{value['speedup']}")  # fmt: skip
            else:
                print(f"  {key}: {value}")


if __name__ == "__main__":
    main()
