"""Regenerate the two-speaker diarization fixture in ``tests/data/diarization/``.

Two clearly distinct espeak-ng voices (a low, slow male ``en-us`` and a high, faster female
``en+f4``) take alternating turns of 3-6 s with 0.3-0.8 s pauses and no overlap. Each utterance is
synthesised separately, resampled to 16 kHz and trimmed to its first and last sample above an
amplitude threshold, so the ground truth (``two_speakers.json``) is tight and exact: it comes from
the sample positions where each utterance was placed. The audio is written as 16 kHz mono 16-bit
PCM (``two_speakers.wav``).

Usage: ``python scripts/make_diarization_fixture.py [output_dir]``. Needs ``espeak-ng`` on PATH.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

__all__ = ["SAMPLE_RATE", "TURNS", "VOICES", "build_fixture", "main", "synthesize"]

SAMPLE_RATE = 16_000
#: espeak-ng arguments per speaker: voice, pitch (0-99), speed (words per minute).
VOICES: dict[str, tuple[str, ...]] = {
    "A": ("-v", "en-us", "-p", "30", "-s", "150"),
    "B": ("-v", "en+f4", "-p", "75", "-s", "175"),
}
#: (speaker, text, pause in seconds after the turn)
TURNS: tuple[tuple[str, str, float], ...] = (
    ("A", "Good morning everyone, thank you for joining the weekly planning meeting today.", 0.5),
    ("B", "Thanks. I have a short update about the release schedule and the testing plan.", 0.4),
    ("A", "Please go ahead, we have plenty of time before the next session starts.", 0.7),
    ("B", "The build is stable now, and the remaining bugs are small ones in the user interface.", 0.3),
    ("A", "That is great news. Do we still expect to ship at the end of the month?", 0.6),
    ("B", "Yes, if the final review goes well on Thursday, we will ship on time.", 0.5),
)
AMPLITUDE_THRESHOLD = 0.01
LEAD_IN_S = 0.4


def synthesize(text: str, voice_args: tuple[str, ...]) -> np.ndarray:
    """One espeak-ng utterance as float32 16 kHz mono, trimmed to its first/last loud sample."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("espeak-ng is not installed (apt-get install espeak-ng)")
    wav_bytes = subprocess.run([espeak, *voice_args, "--stdout", text], check=True, capture_output=True).stdout
    audio, rate = sf.read(io.BytesIO(wav_bytes), dtype="float32")
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    from math import gcd

    divisor = gcd(rate, SAMPLE_RATE)
    audio = resample_poly(audio, SAMPLE_RATE // divisor, rate // divisor).astype(np.float32)
    loud = np.flatnonzero(np.abs(audio) > AMPLITUDE_THRESHOLD)
    if loud.size == 0:
        raise SystemExit(f"espeak-ng produced silence for {text!r}")
    return audio[loud[0] : loud[-1] + 1]


def build_fixture() -> tuple[np.ndarray, list[dict[str, float | str]]]:
    """The mixed recording and its ground-truth segments (start_s, end_s, speaker)."""
    pieces: list[np.ndarray] = [np.zeros(int(LEAD_IN_S * SAMPLE_RATE), dtype=np.float32)]
    position = pieces[0].size
    truth: list[dict[str, float | str]] = []
    for speaker, text, pause in TURNS:
        utterance = synthesize(text, VOICES[speaker])
        # Scale each voice to the same peak so loudness does not tell the speakers apart.
        utterance = 0.5 * utterance / np.abs(utterance).max()
        truth.append(
            {
                "start_s": round(position / SAMPLE_RATE, 4),
                "end_s": round((position + utterance.size) / SAMPLE_RATE, 4),
                "speaker": speaker,
            }
        )
        gap = np.zeros(int(pause * SAMPLE_RATE), dtype=np.float32)
        pieces += [utterance, gap]
        position += utterance.size + gap.size
    return np.concatenate(pieces), truth


def main(argv: list[str] | None = None) -> int:
    """Write ``two_speakers.wav`` and ``two_speakers.json`` to the output directory."""
    args = sys.argv[1:] if argv is None else argv
    root = Path(__file__).resolve().parents[1]
    out_dir = Path(args[0]) if args else root / "tests" / "data" / "diarization"
    out_dir.mkdir(parents=True, exist_ok=True)
    audio, truth = build_fixture()
    sf.write(out_dir / "two_speakers.wav", audio, SAMPLE_RATE, subtype="PCM_16")
    meta = {"sample_rate": SAMPLE_RATE, "duration_s": round(audio.size / SAMPLE_RATE, 4), "segments": truth}
    (out_dir / "two_speakers.json").write_text(json.dumps(meta, indent=1) + "\n")
    turns = [round(t["end_s"] - t["start_s"], 2) for t in truth]  # type: ignore[operator]
    print(f"wrote {out_dir}: {audio.size / SAMPLE_RATE:.2f} s, turns {turns}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
