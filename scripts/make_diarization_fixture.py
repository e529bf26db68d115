"""Regenerate the diarization fixtures in ``tests/data/diarization/``.

``two_speakers``: two clearly distinct espeak-ng voices (a low, slow male ``en-us`` and a high, faster female
``en+f4``) take alternating turns of 3-6 s with 0.3-0.8 s pauses and no overlap. Each utterance is
synthesised separately, resampled to 16 kHz and trimmed to its first and last sample above an
amplitude threshold, so the ground truth (``two_speakers.json``) is tight and exact: it comes from
the sample positions where each utterance was placed. The audio is written as 16 kHz mono 16-bit
PCM (``two_speakers.wav``).

``three_speakers`` and ``four_speakers``: meetings of short turns (2.5-5 s) among espeak-ng voices
that the GE2E encoder tells apart (cross-voice cosine of sentence embeddings <= 0.75), with one
interruption where the next speaker starts before the current one has finished (one overlap).
Their truth is written as JSON (same layout as above) and as RTTM. :func:`voice_similarity` prints
the cross-voice cosine matrix a meeting's voices have under the engine's own encoder.

Usage: ``python scripts/make_diarization_fixture.py [output_dir] [--similarity]``. Needs
``espeak-ng`` on PATH.
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

__all__ = ["MEETINGS", "SAMPLE_RATE", "TURNS", "VOICES", "build_fixture", "build_meeting", "main", "synthesize"]

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
#: Meeting fixtures: espeak-ng arguments per voice, and (speaker, text, gap in seconds before the
#: next turn; negative = the next speaker starts that long before this turn ends).
MEETINGS: dict[str, tuple[dict[str, tuple[str, ...]], tuple[tuple[str, str, float], ...]]] = {
    "three_speakers": (
        {"A": ("-v", "en-us+klatt4"), "B": ("-v", "en+croak"), "C": ("-v", "en+f4", "-p", "75", "-s", "175")},
        (
            ("A", "Let us start with the budget for the next quarter, shall we?", 0.4),
            ("B", "I looked at the numbers and they are a little higher than we planned.", 0.5),
            ("C", "Most of that comes from the new servers we ordered in May.", 0.3),
            ("A", "Can we delay part of that order until the autumn, or is it too late?", 0.5),
            ("B", "Probably, but the vendor wants a final answer by Friday.", -1.0),
            ("C", "I will call them tomorrow morning and ask for more time.", 0.4),
            ("A", "Good, then we can move on to the hiring plan for next year.", 0.6),
            ("B", "We have two open positions and three very strong candidates.", 0.4),
        ),
    ),
    "four_speakers": (
        {
            "A": ("-v", "en-us+klatt4"),
            "B": ("-v", "en+croak"),
            "C": ("-v", "en-us+f5"),
            "D": ("-v", "en-us+whisper"),
        },
        (
            ("A", "Welcome back everyone, this is the last review before the launch.", 0.4),
            ("B", "The mobile app passed all of the automated tests last night.", 0.5),
            ("C", "The web version still has a small problem with the login page.", 0.3),
            ("D", "I fixed that bug this morning, it was a wrong cache setting.", 0.5),
            ("A", "Then we are ready, unless the servers still need more work.", -1.0),
            ("B", "They are fine, I checked the load on every server yesterday.", 0.4),
            ("C", "I will write the release notes and the blog post this afternoon.", 0.5),
            ("D", "And I will prepare the support team for the busy first week.", 0.4),
        ),
    ),
}
TURN_RANGE_S = (2.5, 5.0)
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


def build_meeting(name: str) -> tuple[np.ndarray, list[dict[str, float | str]]]:
    """One meeting of :data:`MEETINGS`: the mixture (summed voices) and its truth segments."""
    voices, turns = MEETINGS[name]
    placed: list[tuple[int, np.ndarray]] = []
    truth: list[dict[str, float | str]] = []
    position = int(LEAD_IN_S * SAMPLE_RATE)
    for speaker, text, gap in turns:
        utterance = synthesize(text, voices[speaker])
        utterance = 0.5 * utterance / np.abs(utterance).max()
        placed.append((position, utterance))
        truth.append(
            {
                "start_s": round(position / SAMPLE_RATE, 4),
                "end_s": round((position + utterance.size) / SAMPLE_RATE, 4),
                "speaker": speaker,
            }
        )
        position += utterance.size + int(gap * SAMPLE_RATE)
    lengths = [float(t["end_s"]) - float(t["start_s"]) for t in truth]
    if not all(TURN_RANGE_S[0] <= x <= TURN_RANGE_S[1] for x in lengths):
        raise SystemExit(f"{name}: turn lengths {lengths} are outside {TURN_RANGE_S} s; edit the texts")
    audio = np.zeros(max(start + u.size for start, u in placed) + int(LEAD_IN_S * SAMPLE_RATE), dtype=np.float32)
    for start, utterance in placed:
        audio[start : start + utterance.size] += utterance
    return np.clip(audio, -1.0, 1.0), truth


def to_rttm(name: str, truth: list[dict[str, float | str]]) -> str:
    """RTTM lines (``SPEAKER file 1 start duration <NA> <NA> speaker <NA> <NA>``) of truth segments."""
    lines = []
    for t in truth:
        start, duration = float(t["start_s"]), float(t["end_s"]) - float(t["start_s"])
        lines.append(f"SPEAKER {name} 1 {start:.4f} {duration:.4f} <NA> <NA> {t['speaker']} <NA> <NA>\n")
    return "".join(lines)


def voice_similarity(name: str) -> str:
    """Cross-voice cosine matrix of a meeting's voices (each turn embedded alone), as text."""
    from uniopt.engines.diarization import embed_utterance, load_speaker_encoder

    voices, turns = MEETINGS[name]
    encoder = load_speaker_encoder()
    speakers = sorted(voices)
    embeddings = {
        k: [embed_utterance(encoder, synthesize(t, voices[k])) for s, t, _ in turns if s == k] for k in speakers
    }
    lines = [f"{name}: max cosine between turns of two voices (diagonal: min within a voice)"]
    for a in speakers:
        row = []
        for b in speakers:
            sims = [
                float(x @ y)
                for i, x in enumerate(embeddings[a])
                for j, y in enumerate(embeddings[b])
                if a != b or i < j
            ]
            row.append(f"{(min(sims) if a == b else max(sims)):.2f}")
        lines.append(f"  {a}: " + " ".join(row))
    return "\n".join(lines)


def _write(out_dir: Path, name: str, audio: np.ndarray, truth: list[dict[str, float | str]], rttm: bool) -> None:
    sf.write(out_dir / f"{name}.wav", audio, SAMPLE_RATE, subtype="PCM_16")
    meta = {"sample_rate": SAMPLE_RATE, "duration_s": round(audio.size / SAMPLE_RATE, 4), "segments": truth}
    (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    if rttm:
        (out_dir / f"{name}.rttm").write_text(to_rttm(name, truth))
    turns = [round(float(t["end_s"]) - float(t["start_s"]), 2) for t in truth]
    print(f"wrote {out_dir / name}: {audio.size / SAMPLE_RATE:.2f} s, turns {turns}")


def main(argv: list[str] | None = None) -> int:
    """Write every fixture (wav + json, and rttm for the meetings) to the output directory."""
    args = sys.argv[1:] if argv is None else argv
    if "--similarity" in args:
        for name in MEETINGS:
            print(voice_similarity(name))
        args = [a for a in args if a != "--similarity"]
    root = Path(__file__).resolve().parents[1]
    out_dir = Path(args[0]) if args else root / "tests" / "data" / "diarization"
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(out_dir, "two_speakers", *build_fixture(), rttm=False)
    for name in MEETINGS:
        _write(out_dir, name, *build_meeting(name), rttm=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
