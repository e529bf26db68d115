"""Regenerate ``src/uniopt/engines/diarization/speech.npz``, the speech of the diarizer's example inputs.

Eleven turns of the committed fixtures (``tests/data/diarization/``), each cut to its first
:data:`CUT_S` seconds (20 ms fade-out) and stored 8-bit mu-law at 16 kHz: ``codes`` (int8, all
turns back to back), ``lengths`` (samples per turn) and ``held_out`` (True for the turns of the
int8 calibration input, voices and sentences the guard never sees). Turns in a fixture's overlap
are left out, so every turn is one voice. :mod:`uniopt.engines.diarization.speech` reads the file
and mixes the turns into conversations with overlaps and pauses.

Usage: ``python scripts/make_segmentation_speech.py [fixture_dir] [output]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 16_000
CUT_S = 2.8
MU = 255
#: (fixture, index of the turn in its JSON, held out); voices alternate within each group.
TURNS = (
    ("two_speakers", 0, False),  # en-us
    ("two_speakers", 1, False),  # en+f4
    ("three_speakers", 0, False),  # klatt4
    ("three_speakers", 1, False),  # croak
    ("two_speakers", 2, False),
    ("two_speakers", 3, False),
    ("three_speakers", 3, False),
    ("four_speakers", 2, True),  # en-us+f5
    ("four_speakers", 3, True),  # whisper
    ("four_speakers", 6, True),
    ("four_speakers", 7, True),
)


def mu_law(audio: np.ndarray) -> np.ndarray:
    """8-bit mu-law codes (int8) of float samples in [-1, 1]; 0 stays 0."""
    scaled = np.sign(audio) * np.log1p(MU * np.abs(audio)) / np.log1p(MU)
    return np.round(scaled * 127).astype(np.int8)


def cut(fixture_dir: Path, name: str, index: int) -> np.ndarray:
    """The first ``CUT_S`` seconds of one turn of a fixture, faded out over 20 ms."""
    audio, rate = sf.read(fixture_dir / f"{name}.wav", dtype="float32")
    assert rate == SAMPLE_RATE
    turn = json.loads((fixture_dir / f"{name}.json").read_text())["segments"][index]
    start = round(turn["start_s"] * SAMPLE_RATE)
    stop = min(round(turn["end_s"] * SAMPLE_RATE), start + round(CUT_S * SAMPLE_RATE))
    piece = audio[start:stop].copy()
    fade = round(0.02 * SAMPLE_RATE)
    piece[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    return piece


def main(argv: list[str]) -> None:
    fixture_dir = Path(argv[0]) if argv else ROOT / "tests" / "data" / "diarization"
    output = Path(argv[1]) if len(argv) > 1 else ROOT / "src" / "uniopt" / "engines" / "diarization" / "speech.npz"
    pieces = [cut(fixture_dir, name, index) for name, index, _ in TURNS]
    np.savez_compressed(
        output,
        codes=mu_law(np.concatenate(pieces)),
        lengths=np.array([p.size for p in pieces], dtype=np.int64),
        held_out=np.array([held for *_, held in TURNS]),
    )
    seconds = sum(p.size for p in pieces) / SAMPLE_RATE
    print(f"{output}: {len(pieces)} turns, {seconds:.1f} s, {output.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
