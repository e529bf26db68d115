"""Streaming diarization: audio in chunks, speakers kept across chunks by a speaker database.

:class:`StreamingDiarizer` runs its :class:`~.pipeline.Diarizer`'s own stages (the same
``segmentation`` and ``embedding`` modules, so an optimized diarizer streams optimized) on each
window of ``window_s`` as soon as the chunks fed so far cover it, one window every ``step_s``.
Each window's units (runs of a local speaker, see ``Diarizer._units``) are matched, longest
first, to the speakers of a :class:`SpeakerDatabase` by cosine distance to their centroids; two
local speakers of one window never match one speaker, and a unit farther than ``threshold`` from
every allowed speaker becomes a new speaker (units under ``min_embedding_s`` join the nearest
allowed one, or the nearest, instead).
Votes are accumulated on one frame grid as in batch mode; frames no later window will cover are
final, and segments that can no longer change are returned by :meth:`feed`, the rest by
:meth:`flush`.

The work per chunk does not grow with the stream: votes are kept only from the earliest frame a
segment still to be returned can start at, and each speaker's frames are scanned from the start
of its last run that may still change (the runs before it in the same segment are kept as that
segment's start and end so far), so about a window plus the run in progress.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from uniopt.engines.audio import prepare_audio
from uniopt.engines.diarization.clustering import l2_normalize
from uniopt.engines.diarization.units import attach_short_runs, gap_groups, runs
from uniopt.errors import InputError

if TYPE_CHECKING:
    from uniopt.engines.diarization.pipeline import Diarizer, Segment
    from uniopt.engines.diarization.units import Unit

__all__ = ["SpeakerDatabase", "StreamingDiarizer"]

SAMPLE_RATE = 16_000
_MIN_REFERENCE = SAMPLE_RATE // 2  # samples of reference audio; shorter 1-D arrays are embeddings


class SpeakerDatabase:
    """Named speakers with running-mean unit-norm centroids; cosine matching with an empty database handled."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._sums: list[np.ndarray] = []
        self._auto = 0

    def __len__(self) -> int:
        return len(self.names)

    def centroids(self) -> np.ndarray:
        """(speakers, dim) unit-norm centroids; (0, 0) when empty."""
        return l2_normalize(np.stack(self._sums)) if self._sums else np.zeros((0, 0))

    def add(self, embedding: np.ndarray, name: str | None = None) -> int:
        """Add a speaker (``SPEAKER_NN`` when unnamed); returns its index."""
        vector = l2_normalize(np.asarray(embedding, dtype=np.float64).reshape(1, -1))[0]
        if self._sums and vector.shape != self._sums[0].shape:
            raise InputError(f"embedding has {vector.size} values, the database holds {self._sums[0].size}")
        if name is None:
            while f"SPEAKER_{self._auto:02d}" in self.names:
                self._auto += 1
            name = f"SPEAKER_{self._auto:02d}"
        if name in self.names:
            raise InputError(f"speaker {name!r} is already in the database")
        self.names.append(name)
        self._sums.append(vector)
        return len(self.names) - 1

    def update(self, index: int, embedding: np.ndarray, weight: float = 1.0) -> None:
        """Move speaker ``index``'s centroid toward ``embedding`` (running sum of unit vectors)."""
        self._sums[index] = self._sums[index] + weight * l2_normalize(embedding.reshape(1, -1))[0]

    def distances(self, embedding: np.ndarray) -> np.ndarray:
        """Cosine distance (speakers,) from ``embedding`` to every centroid; empty when no speakers."""
        if not self._sums:
            return np.zeros(0)
        if embedding.size != self._sums[0].size:
            raise InputError(f"embedding has {embedding.size} values, the database holds {self._sums[0].size}")
        return 1.0 - self.centroids() @ l2_normalize(embedding.reshape(1, -1))[0]


class StreamingDiarizer:
    """Diarize audio fed in chunks (see the module docstring).

    ``enrolled`` maps names to reference audio (16 kHz, at least 0.5 s) or to embeddings of the
    diarizer's encoder (1-D, fewer than 8000 values); their segments carry those names.
    """

    def __init__(
        self,
        diarizer: Diarizer,
        *,
        threshold: float = 0.25,
        enrolled: dict[str, np.ndarray] | None = None,
        sample_rate: int = SAMPLE_RATE,
    ) -> None:
        if not 0.0 < threshold < 2.0:
            raise InputError(f"threshold is a cosine distance in (0, 2), got {threshold}")
        self.diarizer, self.threshold, self.sample_rate = diarizer, threshold, sample_rate
        self.database = SpeakerDatabase()
        self._buffer = np.zeros(0, dtype=np.float32)
        self._buffer_start = 0  # stream sample index of _buffer[0] (= the next window's start)
        self._received = 0
        # Vote grid from stream frame _origin on; per speaker, the frame its scan starts from and
        # the (start_s, end_s) of the segment in progress before that frame.
        self._origin = 0
        self._votes: list[np.ndarray] = []
        self._norm = np.zeros(0)
        self._scan_from: list[int] = []
        self._open: list[tuple[float, float] | None] = []
        self._frame_s = 0.0
        self._finished = False
        for name, reference in (enrolled or {}).items():
            self.enroll(name, reference)

    # -- enrolment --------------------------------------------------------------------------------
    def enroll(self, name: str, reference: Any, sample_rate: int = SAMPLE_RATE) -> None:
        """Add a named speaker from reference audio (any rate, >= 0.5 s) or an embedding (1-D, < 8000 values)."""
        if not isinstance(name, str) or not name:
            raise InputError(f"an enrolled speaker needs a non-empty name, got {name!r}")
        array = np.asarray(reference.detach().cpu().numpy() if hasattr(reference, "detach") else reference)
        if array.ndim == 1 and 0 < array.size < _MIN_REFERENCE:
            embedding = array.astype(np.float64)
        else:
            wav = prepare_audio(array, sample_rate, SAMPLE_RATE)
            if wav.size < _MIN_REFERENCE:
                raise InputError(f"reference audio for {name!r} is shorter than 0.5 s")
            embedding = self.diarizer._embed([wav])[0]
        self.database.add(embedding, name)

    # -- streaming --------------------------------------------------------------------------------
    def feed(self, chunk: Any, sample_rate: int | None = None) -> list[Segment]:
        """Add a chunk of audio; returns the segments that became final, sorted by start."""
        if self._finished:
            raise InputError("the stream was flushed; start a new one with Diarizer.stream()")
        wav = prepare_audio(chunk, self.sample_rate if sample_rate is None else sample_rate, SAMPLE_RATE)
        self._buffer = np.concatenate([self._buffer, wav])
        self._received += wav.size
        win, step = self.diarizer.window_samples, self.diarizer.step_samples
        while self._buffer.size >= win:
            self._process(self._buffer[:win], self._buffer_start, win)
            self._buffer = self._buffer[step:]
            self._buffer_start += step
        return self._final(self._buffer_start / SAMPLE_RATE)

    def flush(self) -> list[Segment]:
        """Process the audio still buffered (zero-padded) and return every segment not yet returned."""
        if not self._finished:
            self._finished = True
            covered = self._buffer_start + self.diarizer.window_samples - self.diarizer.step_samples
            if self._buffer.size and (self._received > covered or not self._votes):
                win = self.diarizer.window_samples
                padded = np.zeros(win, dtype=np.float32)
                padded[: self._buffer.size] = self._buffer
                self._process(padded, self._buffer_start, self._buffer.size)
        return self._final(math.inf)

    # -- internals --------------------------------------------------------------------------------
    def _process(self, chunk: np.ndarray, start: int, length: int) -> None:
        """Segment, embed and match one window, and add its votes at stream sample ``start``."""
        d = self.diarizer
        activity = d._segment(chunk[None])
        units, short = d._units(chunk[None], activity, [length])
        frames = activity.shape[1]
        self._frame_s = d._frame_s(activity)
        first = round(start / SAMPLE_RATE / self._frame_s) - self._origin
        self._grow(first + frames)
        weights = np.hamming(frames) + 1e-3
        self._norm[first : first + frames] += weights
        if not units:
            return
        units, embeddings = d._embed_units(units, frames)
        labels = self._match(units, embeddings)
        kept, kept_labels = attach_short_runs(units, labels, short)
        self._grow(first + frames)
        local = np.zeros((len(self.database), frames))
        for unit, k in zip(kept, kept_labels.tolist(), strict=True):
            local[k] = np.maximum(local[k], activity[0, :, unit.local] * unit.frames)
        for k in range(len(self.database)):
            self._votes[k][first : first + frames] += local[k] * weights

    def _match(self, units: list[Unit], embeddings: np.ndarray) -> np.ndarray:
        """Database index per unit: longest first, nearest allowed speaker, or a new one."""
        labels = np.full(len(units), -1, dtype=np.int64)
        min_s = self.diarizer.min_embedding_s
        for i in sorted(range(len(units)), key=lambda i: -units[i].seconds):
            taken = {int(labels[j]) for j in range(len(units)) if labels[j] >= 0 and units[j].local != units[i].local}
            distances = self.database.distances(embeddings[i])
            order = np.argsort(distances).tolist()
            allowed = [k for k in order if k not in taken]
            if units[i].seconds < min_s and order:  # too short to tell: never a new speaker
                labels[i] = allowed[0] if allowed else order[0]
            elif allowed and distances[allowed[0]] <= self.threshold:
                labels[i] = allowed[0]
                self.database.update(allowed[0], embeddings[i])
            else:
                labels[i] = self.database.add(embeddings[i])
        return labels

    def _grow(self, size: int) -> None:
        """Vote arrays for every database speaker, at least ``size`` frames (from ``_origin``) long."""
        if size > self._norm.size:
            extra = np.zeros(size - self._norm.size)
            self._norm = np.concatenate([self._norm, extra])
            self._votes = [np.concatenate([v, extra]) for v in self._votes]
        for _ in range(len(self.database) - len(self._votes)):
            self._votes.append(np.zeros(self._norm.size))
            self._scan_from.append(self._origin)
            self._open.append(None)

    @property
    def held_frames(self) -> int:
        """Frames of votes kept for segments not yet returned (bounded, whatever the stream's length)."""
        return int(self._norm.size)

    def _final(self, final_s: float) -> list[Segment]:
        """Segments of the final frames (before ``final_s``) that later audio can no longer change."""
        from uniopt.engines.diarization.pipeline import Segment

        if self._frame_s == 0:
            return []
        d, frame_s = self.diarizer, self._frame_s
        duration = self._received / SAMPLE_RATE
        total = min(self._origin + self._norm.size, math.ceil(min(final_s, duration) / frame_s))
        flushing = math.isinf(final_s)
        horizon = math.inf if flushing else total * frame_s - d.min_gap_s  # a segment ending later may still grow
        # Frames before `settled` get no more votes: the next window starts there.
        settled = total if flushing else min(total, round(self._buffer_start / SAMPLE_RATE / frame_s))
        final: list[Segment] = []
        for k, votes in enumerate(self._votes):
            first, name, carried = self._scan_from[k], self.database.names[k], self._open[k]
            window = slice(first - self._origin, total - self._origin)
            active = (votes[window] / np.maximum(self._norm[window], 1e-12)) > d.onset
            spans = [] if carried is None else [carried]
            starts = [] if carried is None else [first]  # the carried segment stands for runs before `first`
            for a, b in runs(active):
                spans.append((round((first + a) * frame_s, 3), round(min((first + b) * frame_s, duration), 3)))
                starts.append(first + a)
            self._scan_from[k], self._open[k] = settled, None
            for group in gap_groups(spans, d.min_gap_s):
                start_s, end_s = spans[group[0]][0], max(spans[i][1] for i in group)
                if end_s < horizon:
                    if end_s - start_s >= d.min_duration_s:
                        final.append(Segment(start_s, end_s, name))
                    continue
                # The segment in progress: rescan from its last run that starts on settled frames,
                # carrying the runs before it as the segment's start and end so far.
                last = max((i for i in group if starts[i] < settled), default=None)
                if last is not None:
                    self._scan_from[k] = starts[last]
                    if carried and last == 0:
                        self._open[k] = spans[0]
                    else:
                        before = group[: group.index(last)]
                        self._open[k] = (start_s, max(spans[i][1] for i in before)) if before else None
                break
        self._forget(min(self._scan_from, default=settled))
        return sorted(final, key=lambda s: (s.start_s, s.speaker))

    def _forget(self, frame: int) -> None:
        """Drop the votes before stream frame ``frame``: no segment still to come starts there."""
        if frame > self._origin:
            cut = min(frame - self._origin, self._norm.size)
            self._norm = self._norm[cut:]
            self._votes = [v[cut:] for v in self._votes]
            self._origin += cut
