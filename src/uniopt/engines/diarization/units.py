"""Speech units of the diarizer: runs of one window-local speaker, and the helpers that make them.

A :class:`Unit` is one run of one local speaker's activity in one segmentation window. Runs are
cut at pauses (:func:`pause_frames`) and, once embedded, where their partial embeddings change
voice (:func:`best_change`); runs too short to embed follow their nearest unit
(:func:`attach_short_runs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from uniopt.errors import InputError

__all__ = ["Unit", "attach_short_runs", "best_change", "check_speaker_counts", "pause_frames", "runs"]


@dataclass
class Unit:
    """One run of a local speaker in a window: its frames, seconds embedded, and the audio to embed."""

    window: int
    local: int
    frames: np.ndarray
    seconds: float
    audio: np.ndarray | None
    samples: np.ndarray | None = None  # window sample index of each sample of ``audio``


def best_change(rows: np.ndarray) -> tuple[int, float] | None:
    """(j, cosine distance) of the split of partial embeddings into rows[:j] and rows[j:] (both >= 2)
    whose mean embeddings differ most."""
    best: tuple[int, float] | None = None
    for j in range(2, rows.shape[0] - 1):
        left, right = rows[:j].sum(axis=0), rows[j:].sum(axis=0)
        distance = 1.0 - float(left @ right / max(np.linalg.norm(left) * np.linalg.norm(right), 1e-12))
        if best is None or distance > best[1]:
            best = (j, distance)
    return best


def check_speaker_counts(num_speakers: int | None, min_speakers: int, max_speakers: int | None) -> None:
    """Raise :class:`InputError` unless the counts are positive integers (or None) with min <= max."""
    for name, value in (("num_speakers", num_speakers), ("min_speakers", min_speakers), ("max_speakers", max_speakers)):
        if value is None and name != "min_speakers":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{name} must be a positive integer or None, got {value!r}")
    if max_speakers is not None and max_speakers < min_speakers:
        raise InputError(f"max_speakers ({max_speakers}) is below min_speakers ({min_speakers})")


def attach_short_runs(units: list[Unit], labels: np.ndarray, short: list[Unit]) -> tuple[list[Unit], np.ndarray]:
    """Units plus the short runs, each labelled as the nearest unit of its window and local speaker."""
    kept, out = list(units), labels.tolist()
    for run in short:
        start = int(np.argmax(run.frames))
        near = [
            (abs(int(np.argmax(u.frames)) - start), i)
            for i, u in enumerate(units)
            if u.window == run.window and u.local == run.local
        ]
        if near:
            kept.append(run)
            out.append(out[min(near)[1]])
    return kept, np.asarray(out, dtype=np.int64)


def pause_frames(chunk: np.ndarray, sample_frame: np.ndarray, frames: int, min_frames: int) -> np.ndarray:
    """Frames (frames,) bool in stretches of at least ``min_frames`` 30 dB below the window's loud frames.

    ``sample_frame`` maps each sample of ``chunk`` to its frame; ``min_frames`` 0 finds none.
    """
    if min_frames <= 0:
        return np.zeros(frames, dtype=bool)
    energy = np.bincount(sample_frame, weights=np.square(chunk, dtype=np.float64), minlength=frames).astype(np.float64)
    energy = energy / np.maximum(np.bincount(sample_frame, minlength=frames), 1)
    quiet = energy < 1e-3 * np.percentile(energy, 95)
    out = np.zeros(frames, dtype=bool)
    for a, b in runs(quiet):
        if b - a >= min_frames:
            out[a:b] = True
    return out


def runs(active: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index pairs of the runs of True in a 1-D boolean array."""
    edges = np.diff(np.concatenate([[0], active.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))
