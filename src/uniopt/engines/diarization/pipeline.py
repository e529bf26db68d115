"""Speaker diarization: who spoke when, from pyannote segmentation and resemblyzer embeddings.

:class:`Diarizer` slides 10 s windows (the last one zero-padded) through pyannote segmentation-3.0
and hard-decodes the powerset scores (argmax) into up to three window-local speakers. Each local
speaker's activity is cut into runs at pauses (stretches of ``min_pause_s`` 30 dB below the
window's loud frames), and each run becomes a unit: its solo speech (all of it when that is too
little) is embedded with the GE2E encoder, from 1.6 s mel partials as resemblyzer's
``embed_utterance`` cuts them. The units are clustered on cosine distance with the constraint that
two local speakers of one window are different people, the number of speakers counted from the
linkage gaps or cut at a fixed threshold (:func:`.clustering.cluster_units`); every window's units
then vote for their cluster over overlapping windows (Hamming-weighted) on one frame grid. Runs
above ``onset`` become segments; same-speaker gaps under ``min_gap_s`` are filled, then segments
under ``min_duration_s`` dropped. Speakers are named ``SPEAKER_00``, ... by first appearance.

Windows are cut, segmented and embedded ``batch_size`` at a time and only their activity, units
and embeddings are kept, so a call holds one batch of audio pieces and mel partials, whatever the
length of the audio.

The networks are called only as ``self.segmentation(waveforms)`` and ``self.embedding(mels)``, the
two components :meth:`Diarizer.uniopt_components` declares, so uniopt can swap either for an
optimized stage.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from uniopt.engines.audio import prepare_audio, speech_like_audio
from uniopt.engines.diarization.clustering import cannot_link_matrix, cluster_units
from uniopt.engines.diarization.segmentation import PyanNet, load_segmentation_model, powerset_to_speakers
from uniopt.engines.diarization.speaker_encoder import (
    PARTIAL_FRAMES,
    SpeakerEncoder,
    compute_partial_slices,
    load_speaker_encoder,
    mel_spectrograms,
    normalize_volume,
    wav_to_mel_spectrogram,
)
from uniopt.engines.diarization.speech import conversation_windows
from uniopt.engines.diarization.units import (
    Unit,
    attach_short_runs,
    best_change,
    check_speaker_counts,
    frame_samples,
    gap_groups,
    mask_samples,
    pause_frames,
    runs,
)
from uniopt.engines.diarization.weights import find_segmentation_onnx, find_speaker_encoder_weights
from uniopt.engines.stats import CallStats
from uniopt.errors import InputError
from uniopt.optimizer.component import Component, Metric

if TYPE_CHECKING:
    from uniopt.engines.diarization.streaming import StreamingDiarizer

__all__ = ["SAMPLE_RATE", "Diarizer", "Segment", "bench_engine", "bench_structure", "postprocess_segments"]

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class Segment:
    """One speaker turn: seconds from the start of the audio, and the speaker label."""

    start_s: float
    end_s: float
    speaker: str

    @property
    def duration_s(self) -> float:
        """``end_s - start_s``."""
        return self.end_s - self.start_s


def postprocess_segments(segments: list[Segment], min_duration_s: float = 0.0, min_gap_s: float = 0.0) -> list[Segment]:
    """Fill same-speaker gaps shorter than ``min_gap_s``, then drop segments shorter than ``min_duration_s``.

    Returns the segments sorted by start time (then speaker).
    """
    if min_duration_s < 0 or min_gap_s < 0:
        raise InputError(f"min_duration_s and min_gap_s must be >= 0, got {min_duration_s}, {min_gap_s}")
    spans: dict[str, list[tuple[float, float]]] = {}
    for seg in sorted(segments, key=lambda s: (s.speaker, s.start_s)):
        spans.setdefault(seg.speaker, []).append((seg.start_s, seg.end_s))
    kept = []
    for speaker, own in spans.items():
        for group in gap_groups(own, min_gap_s):
            start, end = own[group[0]][0], max(own[i][1] for i in group)
            if end - start >= min_duration_s:
                kept.append(Segment(start, end, speaker))
    return sorted(kept, key=lambda s: (s.start_s, s.speaker))


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    """``rows`` scaled to unit L2 norm (all-zero rows stay zero)."""
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def _audio_of(units: list[Unit]) -> list[np.ndarray]:
    """The audio of the units that hold audio (all those :meth:`Diarizer._units` makes)."""
    return [u.audio for u in units if u.audio is not None]


class _PartialQueue:
    """Mel partials of units, embedded in arrival order ``batch_size`` at a time, whatever the units' sizes.

    ``embed`` maps partials to their embeddings; it is called with whole batches only, except for
    the rest in :meth:`finish`. :meth:`ready` hands out each unit once all its partials are embedded.
    """

    def __init__(self, embed: Callable[[np.ndarray], np.ndarray], batch_size: int) -> None:
        self._embed, self._batch_size = embed, batch_size
        self._mels: np.ndarray | None = None  # partials not yet embedded
        self._rows: list[np.ndarray] = []  # embedded partials of units not yet handed out
        self._waiting: deque[tuple[Unit, int]] = deque()  # units and their number of partials

    def add(self, units: list[Unit], mels: np.ndarray, counts: list[int]) -> None:
        """Queue the units with their partials (``counts[i]`` rows of ``mels`` each); embed the full batches."""
        self._waiting.extend(zip(units, counts, strict=True))
        self._mels = mels if self._mels is None else np.concatenate([self._mels, mels])
        self._run(len(self._mels) // self._batch_size * self._batch_size)

    def finish(self) -> list[tuple[Unit, np.ndarray]]:
        """Embed the partials left and hand out the units still waiting."""
        self._run(0 if self._mels is None else len(self._mels))
        return self.ready()

    def ready(self) -> list[tuple[Unit, np.ndarray]]:
        """The units whose partials are all embedded, in order, each with its partials' embeddings."""
        if not self._rows:
            return []
        rows, used, out = np.concatenate(self._rows), 0, []
        while self._waiting and used + self._waiting[0][1] <= len(rows):
            unit, count = self._waiting.popleft()
            out.append((unit, rows[used : used + count]))
            used += count
        self._rows = [rows[used:]]
        return out

    def _run(self, count: int) -> None:
        if count and self._mels is not None:
            self._rows.append(self._embed(self._mels[:count]))
            self._mels = self._mels[count:]


class Diarizer:
    """Who spoke when (see the module docstring); :meth:`diarize` returns :class:`Segment` lists.

    ``segmentation`` and ``embedding`` default to the pretrained pyannote segmentation-3.0 and
    resemblyzer networks. ``clustering="gap"`` counts the speakers from the data (one speaker when
    every merge is closer than ``threshold``); ``"threshold"`` merges speakers up to the cosine
    distance ``threshold``. ``onset`` is the share of (Hamming-weighted) window votes a frame needs
    to count as speech of a speaker. A run is embedded when it lasts ``min_speech_s`` (shorter ones
    follow the nearest run of their local speaker); only runs with ``min_embedding_s`` of speech
    shape the clusters, the others join the nearest allowed one.
    """

    def __init__(
        self,
        segmentation: nn.Module | None = None,
        embedding: nn.Module | None = None,
        *,
        window_s: float = 10.0,
        step_s: float = 5.0,
        threshold: float = 0.3,
        clustering: str = "gap",
        onset: float = 0.5,
        min_duration_s: float = 0.25,
        min_gap_s: float = 0.5,
        min_speech_s: float = 0.2,
        min_embedding_s: float = 1.0,
        min_pause_s: float = 0.2,
        change_distance: float = 0.2,
        batch_size: int = 8,
        embedding_batch_size: int = 32,
    ) -> None:
        if not 0 < step_s <= window_s:
            raise InputError(f"step_s must be in (0, window_s={window_s}], got {step_s}")
        if not 0.0 <= onset < 1.0 or min(min_speech_s, min_embedding_s, min_pause_s) < 0:
            raise InputError("onset must be in [0, 1) and min_speech_s, min_embedding_s, min_pause_s >= 0")
        if min(batch_size, embedding_batch_size) < 1:
            raise InputError("batch sizes must be at least 1")
        postprocess_segments([], min_duration_s, min_gap_s)  # validates both
        self.sources = {
            "segmentation": str(find_segmentation_onnx()) if segmentation is None else "custom module",
            "embedding": str(find_speaker_encoder_weights()) if embedding is None else "custom module",
        }
        self.trained = segmentation is None and embedding is None
        self.segmentation: nn.Module = (segmentation or load_segmentation_model()).eval()
        self.embedding: nn.Module = (embedding or load_speaker_encoder()).eval()
        self.window_samples = round(window_s * SAMPLE_RATE)
        self.step_samples = round(step_s * SAMPLE_RATE)
        if clustering not in ("gap", "threshold"):
            raise InputError(f"clustering must be 'gap' or 'threshold', got {clustering!r}")
        self.threshold, self.onset, self.clustering = threshold, onset, clustering
        self.min_duration_s, self.min_gap_s = min_duration_s, min_gap_s
        self.min_speech_s, self.min_embedding_s, self.min_pause_s = min_speech_s, min_embedding_s, min_pause_s
        self.change_distance = change_distance
        self.batch_size, self.embedding_batch_size = batch_size, embedding_batch_size
        self._stats = CallStats()

    # -- stages ---------------------------------------------------------------------------------
    def _starts(self, n_samples: int) -> list[int]:
        """First sample of each window; the last one may reach past the audio (it is zero-padded)."""
        win, step = self.window_samples, self.step_samples
        count = 1 if n_samples <= win else math.ceil((n_samples - win) / step) + 1
        return [k * step for k in range(count)]

    def _window_batch(self, wav: np.ndarray, starts: list[int]) -> np.ndarray:
        """The windows (len(starts), window_samples) float32 of ``wav`` at ``starts``, zero-padded at the end."""
        chunks = np.zeros((len(starts), self.window_samples), dtype=np.float32)
        for row, start in zip(chunks, starts, strict=True):
            piece = wav[start : start + self.window_samples]
            row[: piece.size] = piece
        return chunks

    def _segment(self, chunks: np.ndarray) -> np.ndarray:
        """Local speaker activity (windows, frames, 3) of 0/1 floats."""
        out = []
        with torch.inference_mode():
            for first in range(0, len(chunks), self.batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(chunks[first : first + self.batch_size]))
                log_probs = torch.as_tensor(self.segmentation(batch[:, None, :])).float()
                out.append(np.asarray(powerset_to_speakers(log_probs)))
        return np.concatenate(out)

    def _embed(self, pieces: list[np.ndarray]) -> np.ndarray:
        """Unit-norm embeddings (len(pieces), dim) of waveforms, partials batched through ``self.embedding``."""
        partials, owners = self._embed_partials(pieces)
        sums = np.zeros((len(pieces), partials.shape[1]))
        np.add.at(sums, owners, partials)
        return _unit_rows(sums)

    def _embed_partials(self, pieces: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of every 1.6 s partial of the pieces (rows in time order) and each one's piece index."""
        mels, counts = self._partial_mels(pieces)
        return self._embed_mels(mels), np.repeat(np.arange(len(pieces), dtype=np.int64), counts)

    def _partial_mels(self, pieces: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
        """The 1.6 s mel partials (partials, 160, 40) of the pieces in order, and how many each piece has."""
        wavs, slices = [], []
        for wav in pieces:
            wav = normalize_volume(wav).astype(np.float32)
            wav_slices, mel_slices = compute_partial_slices(wav.size)
            if wav_slices[-1].stop > wav.size:
                wav = np.pad(wav, (0, wav_slices[-1].stop - wav.size))
            wavs.append(wav)
            slices.append(mel_slices)
        mels = mel_spectrograms(wavs)
        stacked = np.stack([mel[s] for mel, piece in zip(mels, slices, strict=True) for s in piece])
        return stacked, [len(piece) for piece in slices]

    def _embed_mels(self, mels: np.ndarray) -> np.ndarray:
        """Embeddings (partials, dim) float64 of mel partials, ``embedding_batch_size`` per network call."""
        partial = []
        with torch.inference_mode():
            for first in range(0, len(mels), self.embedding_batch_size):
                batch = torch.from_numpy(mels[first : first + self.embedding_batch_size])
                partial.append(torch.as_tensor(self.embedding(batch)).float().cpu().numpy())
        return np.concatenate(partial).astype(np.float64)

    def _embed_units(self, units: list[Unit], frames: int) -> tuple[list[Unit], np.ndarray]:
        """Unit-norm embeddings of the units, after splitting those whose partials change speaker (:meth:`_split`)."""
        embedded = [u for u in units if u.audio is not None]
        partials, owners = self._embed_partials(_audio_of(embedded))
        pairs = [pair for i, unit in enumerate(embedded) for pair in self._split(unit, partials[owners == i], frames)]
        return [unit for unit, _ in pairs], _unit_rows(np.stack([vector for _, vector in pairs]))

    def _split(self, unit: Unit, rows: np.ndarray, frames: int) -> list[tuple[Unit, np.ndarray]]:
        """The unit, or its parts where its partial embeddings ``rows`` change speaker, each with its summed rows.

        A unit of at least four partials is cut where the mean partial embeddings before and
        after differ most, when their cosine distance exceeds ``change_distance``; the halves
        are tried again. The units returned hold no audio.
        """
        assert unit.samples is not None  # set with the audio by _units
        samples = unit.samples
        hop = round(SAMPLE_RATE / 1.3) / SAMPLE_RATE  # seconds between partials (compute_partial_slices)
        out: list[tuple[Unit, np.ndarray]] = []

        def split(part: Unit, rows: np.ndarray, first_s: float) -> None:
            cut = best_change(rows) if rows.shape[0] >= 4 and self.change_distance < 2 else None
            if cut is None or cut[1] <= self.change_distance:
                out.append((replace(part, audio=None, samples=None), rows.sum(axis=0)))
                return
            j = cut[0]
            at_s = first_s + (j - 0.5) * hop + PARTIAL_FRAMES / 200  # middle of the partials' overlap
            at = min(int(at_s * SAMPLE_RATE), samples.size - 1)
            frame = int(samples[at]) * frames // self.window_samples
            before = part.frames & (np.arange(frames) < frame)
            after = part.frames & ~before
            left_s = at / SAMPLE_RATE - first_s
            right = Unit(part.window, part.local, after, part.seconds - left_s, None)
            split(Unit(part.window, part.local, before, left_s, None), rows[:j], first_s)
            split(right, rows[j:], first_s + j * hop)

        split(unit, rows, 0.0)
        return out

    def _scan(self, wav: np.ndarray, starts: list[int]) -> tuple[np.ndarray, list[Unit], np.ndarray, list[Unit]]:
        """Activity of every window, the embedded units and their unit-norm embeddings, and the short runs.

        The windows are cut, segmented and embedded ``batch_size`` at a time; only their activity,
        units and embeddings are kept, so memory follows the batch, not the length of the audio.
        The partials go through ``self.embedding`` in the same batches as for all windows at once.
        """
        queue = _PartialQueue(self._embed_mels, self.embedding_batch_size)
        activities: list[np.ndarray] = []
        short: list[Unit] = []
        pairs: list[tuple[Unit, np.ndarray]] = []
        for first in range(0, len(starts), self.batch_size):
            batch = starts[first : first + self.batch_size]
            chunks = self._window_batch(wav, batch)
            activities.append(self._segment(chunks))
            units, batch_short = self._units(chunks, activities[-1], [wav.size - s for s in batch], first)
            short += batch_short
            for _, group in itertools.groupby(units, key=lambda u: u.window):  # one window's mels at a time
                window_units = list(group)
                queue.add(window_units, *self._partial_mels(_audio_of(window_units)))
            pairs += self._split_ready(queue.ready(), activities[-1].shape[1])
        pairs += self._split_ready(queue.finish(), activities[-1].shape[1])
        activity = np.concatenate(activities)
        if not pairs:
            return activity, [], np.zeros((0, 0)), short
        return activity, [u for u, _ in pairs], _unit_rows(np.stack([v for _, v in pairs])), short

    def _split_ready(self, ready: list[tuple[Unit, np.ndarray]], frames: int) -> list[tuple[Unit, np.ndarray]]:
        """:meth:`_split` of each unit with its partial embeddings."""
        return [pair for unit, rows in ready for pair in self._split(unit, rows, frames)]

    def _frame_s(self, activity: np.ndarray) -> float:
        """Seconds per segmentation frame, from the model's output size."""
        return self.window_samples / SAMPLE_RATE / activity.shape[1]

    def _units(
        self, chunks: np.ndarray, activity: np.ndarray, lengths: list[int], first: int = 0
    ) -> tuple[list[Unit], list[Unit]]:
        """Speech units to embed, and short runs that follow their nearest unit, of every window.

        A unit is one run of one local speaker's activity in one window, cut at pauses (see
        :func:`.units.pause_frames`): the segmentation model may give two voices that take turns one
        local speaker, so each run is embedded on its own. ``lengths`` are the numbers of real
        (not padded) samples in each window; ``first`` is the index of the first window.
        """
        frames, frame_s = activity.shape[1], self._frame_s(activity)
        _, bounds = frame_samples(self.window_samples, frames)
        units: list[Unit] = []
        short: list[Unit] = []
        for w, (chunk, act) in enumerate(zip(chunks, activity, strict=True), start=first):
            length = lengths[w - first]
            real = np.arange(frames) * self.window_samples // frames < length  # frames not in the padding
            alone = act.sum(axis=1) == 1
            speaking = real & ~pause_frames(chunk, frames, round(self.min_pause_s / frame_s))
            for s in range(act.shape[1]):
                for a, b in runs((act[:, s] > 0) & speaking):
                    run = np.zeros(frames, dtype=bool)
                    run[a:b] = True
                    if (b - a) * frame_s < max(self.min_speech_s, 1e-9):
                        short.append(Unit(w, s, run, 0.0, None, None))
                        continue
                    clean = run & alone
                    mask = clean if clean.sum() * frame_s >= self.min_embedding_s else run
                    samples = mask_samples(mask, bounds, length)
                    units.append(Unit(w, s, run, float(mask.sum() * frame_s), chunk[samples], samples))
        return units, short

    # -- public ---------------------------------------------------------------------------------
    def diarize(
        self,
        audio: Any,
        sample_rate: int,
        num_speakers: int | None = None,
        *,
        min_speakers: int = 1,
        max_speakers: int | None = None,
    ) -> list[Segment]:
        """Speaker segments of ``audio`` (numpy or torch; mono or stereo; any rate), sorted by start.

        ``num_speakers`` fixes the number of speakers when known; otherwise it is counted from
        the data within ``[min_speakers, max_speakers]`` (see :func:`.clustering.cluster_units`).
        Silence gives an empty list.
        """
        check_speaker_counts(num_speakers, min_speakers, max_speakers)
        started = time.perf_counter()
        wav = prepare_audio(audio, sample_rate, SAMPLE_RATE)
        starts = self._starts(wav.size)
        activity, units, embeddings, short = self._scan(wav, starts)
        segments: list[Segment] = []
        if units:
            labels = self._cluster(units, embeddings, num_speakers, min_speakers, max_speakers)
            kept, kept_labels = attach_short_runs(units, labels, short)
            segments = self._aggregate(activity, kept, kept_labels, starts, wav.size)
        self._stats.record(wav.size / SAMPLE_RATE, time.perf_counter() - started)
        return segments

    __call__ = diarize

    def _cluster(
        self, units: list[Unit], embeddings: np.ndarray, num_speakers: int | None, min_speakers: int,
        max_speakers: int | None,
    ) -> np.ndarray:  # fmt: skip
        """Speaker labels of the units: cannot-link within a window, counted or cut at the threshold."""
        windows = np.array([u.window for u in units])
        local = np.array([u.local for u in units])
        return cluster_units(
            embeddings, cannot_link_matrix(windows, local), num_speakers=num_speakers,
            min_speakers=min_speakers, max_speakers=max_speakers,
            threshold=self.threshold if self.clustering == "threshold" else None,
            single_distance=self.threshold, clusterable=np.array([u.seconds for u in units]) >= self.min_embedding_s,
        )  # fmt: skip

    def _aggregate(
        self, activity: np.ndarray, units: list[Unit], labels: np.ndarray, starts: list[int], n_samples: int
    ) -> list[Segment]:
        """Hamming-weighted vote of the windows on a global frame grid, binarised into segments."""
        frames, frame_s, duration = activity.shape[1], self._frame_s(activity), n_samples / SAMPLE_RATE
        total = math.ceil(duration / frame_s)
        offsets = [round(s / SAMPLE_RATE / frame_s) for s in starts]
        weights = np.hamming(frames) + 1e-3
        votes = np.zeros((int(labels.max()) + 1, total + frames))
        norm = np.zeros(total + frames)
        for offset in offsets:
            norm[offset : offset + frames] += weights
        order = sorted(range(len(units)), key=lambda i: units[i].window)
        for w, members in itertools.groupby(order, key=lambda i: units[i].window):
            local = np.zeros((votes.shape[0], frames))
            for i in members:
                k = int(labels[i])
                local[k] = np.maximum(local[k], activity[w, :, units[i].local] * units[i].frames)
            votes[:, offsets[w] : offsets[w] + frames] += local * weights
        active = (votes / np.maximum(norm, 1e-12))[:, :total] > self.onset
        raw = [
            Segment(round(a * frame_s, 3), round(min(b * frame_s, duration), 3), str(k))
            for k in range(active.shape[0])
            for a, b in runs(active[k])
        ]
        kept = postprocess_segments(raw, self.min_duration_s, self.min_gap_s)
        names: dict[str, str] = {}
        for seg in kept:
            names.setdefault(seg.speaker, f"SPEAKER_{len(names):02d}")
        return sorted(
            (Segment(s.start_s, s.end_s, names[s.speaker]) for s in kept), key=lambda s: (s.start_s, s.speaker)
        )

    def stream(self, *, threshold: float = 0.25, enrolled: dict[str, Any] | None = None,
               sample_rate: int = SAMPLE_RATE) -> StreamingDiarizer:  # fmt: skip
        """A :class:`~.streaming.StreamingDiarizer` on this diarizer's (possibly optimized) stages."""
        from uniopt.engines.diarization.streaming import StreamingDiarizer

        return StreamingDiarizer(self, threshold=threshold, enrolled=enrolled, sample_rate=sample_rate)

    def uniopt_components(self) -> list[Component]:
        """The segmentation and speaker-embedding networks, with example inputs of speech.

        Segmentation sees windows, ``step_s`` apart, of espeak-ng voices in conversation with
        overlaps and pauses (:mod:`.speech`); static int8 is calibrated on other voices. The speaker
        encoder sees mel partials of speech-like audio.
        """
        win, step = self.window_samples, self.step_samples

        def windows(count: int, held_out: bool = False, first: int = 0) -> tuple[torch.Tensor]:
            chunks = conversation_windows(count, win, step, held_out=held_out, first=first)
            return (torch.from_numpy(chunks[:, None, :]),)

        def mels(count: int, seed: int) -> tuple[torch.Tensor]:
            wav = normalize_volume(speech_like_audio(count * 0.8 + 1.0, seed)).astype(np.float32)
            mel = wav_to_mel_spectrogram(wav)
            step = (mel.shape[0] - PARTIAL_FRAMES) // max(count - 1, 1)
            return (torch.from_numpy(np.stack([mel[i * step : i * step + PARTIAL_FRAMES] for i in range(count)])),)

        return [
            Component(
                "segmentation", self.segmentation, windows(2),
                input_names=("waveforms",), output_names=("log_probs",),
                dynamic_axes={"waveforms": {0: "batch"}, "log_probs": {0: "batch"}},
                metric=Metric("argmax_agreement", 0.97), kind="segmentation", exporter="legacy",
                calibration_inputs=[windows(3, first=3), windows(3, held_out=True)],
                audio_seconds=2 * win / SAMPLE_RATE,
            ),
            Component(
                "embedding", self.embedding, mels(16, 0),
                input_names=("mels",), output_names=("embeddings",),
                dynamic_axes={"mels": {0: "batch"}, "embeddings": {0: "batch"}},
                metric=Metric("cosine", 0.99), kind="embedding", exporter="legacy",
                calibration_inputs=[mels(5, 1), mels(5, 2)], audio_seconds=16 * PARTIAL_FRAMES / 100,
            ),
        ]  # fmt: skip

    def info(self) -> dict[str, Any]:
        """Weights provenance (``trained``, ``sources``) and the pipeline's parameters."""
        return {
            "trained": self.trained, "sources": dict(self.sources),
            "window_s": self.window_samples / SAMPLE_RATE, "step_s": self.step_samples / SAMPLE_RATE,
            "threshold": self.threshold, "onset": self.onset,
            "min_duration_s": self.min_duration_s, "min_gap_s": self.min_gap_s,
        }  # fmt: skip

    def get_performance_info(self) -> dict[str, Any]:
        """Calls made, seconds of audio and of processing, real-time factor, and :meth:`info`."""
        stats = self._stats.snapshot()
        stats["model"] = self.info()
        return stats


def bench_engine() -> Diarizer:
    """The diarizer with the pretrained segmentation and speaker-encoder weights."""
    return Diarizer()


def bench_structure() -> Diarizer:
    """:func:`bench_engine`'s networks, their pretrained topology without reading the weight files.

    Built on the meta device, it sizes the engine without allocating it (``optimize doctor``).
    """
    return Diarizer(PyanNet(), SpeakerEncoder())
