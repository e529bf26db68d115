"""Speech units of the diarizer: runs of one window-local speaker, and the helpers that make them.

A :class:`Unit` is one run of one local speaker's activity in one segmentation window. Runs are
cut at pauses (:func:`pause_frames`) and, once embedded, where their partial embeddings change
voice (:func:`best_change`); runs too short to embed follow their nearest unit
(:func:`attach_short_runs`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from uniopt.errors import InputError

__all__ = [
    "Unit",
    "attach_short_runs",
    "best_change",
    "check_speaker_counts",
    "frame_samples",
    "gap_groups",
    "mask_samples",
    "pause_frames",
    "runs",
]


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


@functools.lru_cache(maxsize=8)
def frame_samples(window_samples: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """The frame of each sample of a window (window_samples,), and each frame's first sample (frames + 1,).

    Frames split the window evenly (sample ``i`` is in frame ``i * frames // window_samples``);
    the last bound is ``window_samples``. Computed once per window and frame count; read-only.
    """
    sample_frame = np.minimum(np.arange(window_samples) * frames // window_samples, frames - 1)
    bounds = np.searchsorted(sample_frame, np.arange(frames + 1))
    sample_frame.flags.writeable = bounds.flags.writeable = False
    return sample_frame, bounds


def mask_samples(mask: np.ndarray, bounds: np.ndarray, length: int) -> np.ndarray:
    """Indices (int64) of the samples before ``length`` in the frames set in ``mask``.

    ``bounds`` are the frames' first samples, from :func:`frame_samples`.
    """
    spans = [np.arange(bounds[a], min(int(bounds[b]), length)) for a, b in runs(mask)]
    return np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)


def pause_frames(chunk: np.ndarray, frames: int, min_frames: int) -> np.ndarray:
    """Frames (frames,) bool in stretches of at least ``min_frames`` 30 dB below the window's loud frames.

    ``chunk`` is one window's samples, split into ``frames`` as :func:`frame_samples` does;
    ``min_frames`` 0 finds none.
    """
    if min_frames <= 0:
        return np.zeros(frames, dtype=bool)
    sample_frame, bounds = frame_samples(chunk.size, frames)
    power = np.bincount(sample_frame, weights=np.square(chunk, dtype=np.float64), minlength=frames)
    energy = power / np.maximum(np.diff(bounds), 1)  # mean square per frame
    quiet = energy < 1e-3 * np.percentile(energy, 95)
    out = np.zeros(frames, dtype=bool)
    for a, b in runs(quiet):
        if b - a >= min_frames:
            out[a:b] = True
    return out


def gap_groups(spans: Sequence[tuple[float, float]], min_gap_s: float) -> list[list[int]]:
    """Indices of ``spans`` (start, end), given in order of start, grouped across gaps under ``min_gap_s``.

    A span joins the group before it when it starts less than ``min_gap_s`` after the latest end
    in that group.
    """
    groups: list[list[int]] = []
    end = 0.0
    for index, (start, stop) in enumerate(spans):
        if groups and start - end < min_gap_s:
            groups[-1].append(index)
            end = max(end, stop)
        else:
            groups.append([index])
            end = stop
    return groups


def runs(active: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index pairs of the runs of True in a 1-D boolean array."""
    edges = np.diff(np.concatenate([[0], active.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))
