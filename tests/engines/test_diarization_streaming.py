"""Streaming diarization: chunking, enrolled speakers, the speaker database, bad input.

Streaming DER against batch on every fixture is in ``test_diarization_der.py``, which computes the
batch results once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from uniopt.engines.diarization import Diarizer, Segment, SpeakerDatabase
from uniopt.errors import InputError

from .test_diarization_der import FIXTURES, load, pytestmark  # noqa: F401 - the module's skip condition

SR = 16_000


def stream(engine: Any, audio: np.ndarray, chunk_s: float = 1.0, **kwargs) -> tuple[list[Segment], list[float]]:
    """All segments of a stream fed in chunks, and how long after its end each one was returned."""
    streamer = engine.stream(**kwargs)
    segments, delays, size = [], [], int(chunk_s * SR)
    for first in range(0, audio.size, size):
        new = streamer.feed(audio[first : first + size], SR)
        fed_s = min(first + size, audio.size) / SR
        assert all(s.end_s <= fed_s + 1e-6 for s in new)  # only audio already fed is reported
        segments += new
        delays += [fed_s - s.end_s for s in new]
    segments += streamer.flush()
    assert len(set(segments)) == len(segments)  # nothing is returned twice
    return sorted(segments, key=lambda s: (s.start_s, s.speaker)), delays


@pytest.fixture(scope="module")
def diarizer() -> Diarizer:
    return Diarizer()


def test_chunk_size_does_not_change_the_result(diarizer: Diarizer) -> None:
    audio = load("two_speakers")[0][: 16 * SR]  # two windows
    assert stream(diarizer, audio, 1.0)[0] == stream(diarizer, audio, 3.7)[0]


def test_work_per_chunk_does_not_grow_with_the_stream(diarizer: Diarizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the three fixtures streamed back to back (86 s), the votes kept and the frames scanned
    for final segments after each 1 s chunk stay within two windows (per speaker), as after 10 s."""
    import uniopt.engines.diarization.streaming as streaming

    scanned, runs = [0], streaming.runs

    def counting_runs(active: np.ndarray) -> list[tuple[int, int]]:
        scanned[0] += active.size
        return runs(active)

    monkeypatch.setattr(streaming, "runs", counting_runs)
    audio = np.concatenate([load(name)[0] for name in FIXTURES])
    window_frames = diarizer._segment(np.zeros((1, diarizer.window_samples), dtype=np.float32)).shape[1]
    streamer = diarizer.stream()
    held, per_speaker = [], []
    for first in range(0, audio.size, SR):
        scanned[0] = 0
        streamer.feed(audio[first : first + SR], SR)
        held.append(streamer.held_frames)
        per_speaker.append(scanned[0] / max(len(streamer.database), 1))
    assert len(streamer.database) >= 3 and len(held) > 80
    assert max(held) <= 2 * window_frames, held
    assert max(per_speaker) <= 2 * window_frames, per_speaker
    assert streamer.flush() and streamer.held_frames <= 2 * window_frames


def test_enrolled_speakers_are_named(diarizer: Diarizer) -> None:
    audio, reference, _ = load("three_speakers")
    first = {t.speaker: t for t in reversed(reference)}  # each voice's first turn
    clip = {k: audio[int(t.start_s * SR) : int(t.end_s * SR)] for k, t in first.items()}
    enrolled = {"alice": clip["A"], "bob": diarizer._embed([clip["B"]])[0]}  # audio, and an embedding
    segments, _ = stream(diarizer, audio, enrolled=enrolled)
    names = {s.speaker for s in segments}
    assert {"alice", "bob"} <= names and len(names) == 3  # C is found and numbered
    for turn in reference:
        overlaps: dict[str, float] = {}
        for s in segments:
            overlaps[s.speaker] = overlaps.get(s.speaker, 0.0) + max(
                0.0, min(s.end_s, turn.end_s) - max(s.start_s, turn.start_s)
            )
        best = max(overlaps, key=overlaps.__getitem__)
        assert best == {"A": "alice", "B": "bob"}.get(turn.speaker, "SPEAKER_00"), (turn, overlaps)


def test_silence_and_short_streams(diarizer: Diarizer) -> None:
    streamer = diarizer.stream()
    assert streamer.feed(np.zeros(3 * SR, dtype=np.float32), SR) == []
    assert streamer.flush() == [] and streamer.flush() == []
    audio = load("two_speakers")[0]
    short = diarizer.stream()
    assert short.feed(audio[int(0.5 * SR) : int(3.5 * SR)], SR) == []  # less than a window: nothing final yet
    assert {s.speaker for s in short.flush()} == {"SPEAKER_00"}


def test_stream_rejects_bad_input(diarizer: Diarizer) -> None:
    streamer = diarizer.stream()
    with pytest.raises(InputError, match="NaN"):
        streamer.feed(np.array([0.0, np.nan], dtype=np.float32), SR)
    with pytest.raises(InputError, match="empty"):
        streamer.feed(np.zeros(0, dtype=np.float32), SR)
    with pytest.raises(InputError, match="sample_rate"):
        streamer.feed(np.zeros(SR, dtype=np.float32), 0)
    with pytest.raises(InputError, match="0.5 s"):
        streamer.enroll("carol", np.zeros(SR // 4 * 3, dtype=np.float32)[: SR // 2 + 10], sample_rate=32_000)
    with pytest.raises(InputError, match="name"):
        streamer.enroll("", np.ones(256))
    streamer.flush()
    with pytest.raises(InputError, match="flushed"):
        streamer.feed(np.zeros(SR, dtype=np.float32), SR)
    with pytest.raises(InputError, match="threshold"):
        diarizer.stream(threshold=0.0)


def test_speaker_database() -> None:
    database = SpeakerDatabase()
    assert len(database) == 0 and database.distances(np.ones(4)).size == 0  # empty database
    assert database.add(np.array([1.0, 0, 0, 0])) == 0 and database.names == ["SPEAKER_00"]
    database.add(np.array([0, 1.0, 0, 0]), "bob")
    assert database.add(np.array([0, 0, 1.0, 0])) == 2 and database.names[2] == "SPEAKER_01"
    assert np.allclose(database.distances(np.array([1.0, 0, 0, 0])), [0.0, 1.0, 1.0])
    database.update(0, np.array([0, 0, 0, 1.0]))
    assert database.distances(np.array([1.0, 0, 0, 0]))[0] == pytest.approx(1 - 2**-0.5)
    with pytest.raises(InputError, match="already"):
        database.add(np.ones(4), "bob")
    with pytest.raises(InputError, match="values"):
        database.distances(np.ones(5))
