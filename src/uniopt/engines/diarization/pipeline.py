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

The networks are called only as ``self.segmentation(waveforms)`` and ``self.embedding(mels)``, the
two components :meth:`Diarizer.uniopt_components` declares, so uniopt can swap either for an
optimized stage.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from uniopt.engines.audio import prepare_audio, speech_like_audio
from uniopt.engines.diarization.clustering import cannot_link_matrix, cluster_units
from uniopt.engines.diarization.segmentation import load_segmentation_model, powerset_to_speakers
from uniopt.engines.diarization.speaker_encoder import (
    PARTIAL_FRAMES,
    compute_partial_slices,
    load_speaker_encoder,
    mel_spectrograms,
    normalize_volume,
    wav_to_mel_spectrogram,
)
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

__all__ = ["SAMPLE_RATE", "Diarizer", "Segment", "bench_engine", "postprocess_segments"]

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
    def _windows(self, wav: np.ndarray) -> tuple[np.ndarray, list[int]]:
        win, step = self.window_samples, self.step_samples
        count = 1 if wav.size <= win else math.ceil((wav.size - win) / step) + 1
        padded = np.zeros((count - 1) * step + win, dtype=np.float32)
        padded[: wav.size] = wav
        starts = [k * step for k in range(count)]
        return np.stack([padded[s : s + win] for s in starts]), starts

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
        return sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)

    def _embed_partials(self, pieces: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of every 1.6 s partial of the pieces (rows in time order) and each one's piece index."""
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
        owners = [index for index, piece in enumerate(slices) for _ in piece]
        partial = []
        with torch.inference_mode():
            for first in range(0, len(stacked), self.embedding_batch_size):
                batch = torch.from_numpy(stacked[first : first + self.embedding_batch_size])
                partial.append(torch.as_tensor(self.embedding(batch)).float().cpu().numpy())
        return np.concatenate(partial).astype(np.float64), np.asarray(owners, dtype=np.int64)

    def _embed_units(self, units: list[Unit], frames: int) -> tuple[list[Unit], np.ndarray]:
        """Embeddings of the units, after splitting those whose partials show a change of speaker.

        A unit of at least four partials is cut where the mean partial embeddings before and
        after differ most, when their cosine distance exceeds ``change_distance``; the halves
        are tried again.
        """
        partials, owners = self._embed_partials([u.audio for u in units if u.audio is not None])
        hop = round(SAMPLE_RATE / 1.3) / SAMPLE_RATE  # seconds between partials (compute_partial_slices)
        out: list[Unit] = []
        vectors: list[np.ndarray] = []

        def split(unit: Unit, rows: np.ndarray, first_s: float, samples: np.ndarray) -> None:
            cut = best_change(rows) if rows.shape[0] >= 4 and self.change_distance < 2 else None
            if cut is None or cut[1] <= self.change_distance:
                out.append(unit)
                vectors.append(rows.sum(axis=0))
                return
            j = cut[0]
            at_s = first_s + (j - 0.5) * hop + PARTIAL_FRAMES / 200  # middle of the partials' overlap
            at = min(int(at_s * SAMPLE_RATE), samples.size - 1)
            frame = int(samples[at]) * frames // self.window_samples
            before = unit.frames & (np.arange(frames) < frame)
            after = unit.frames & ~before
            left_s = at / SAMPLE_RATE - first_s
            right = Unit(unit.window, unit.local, after, unit.seconds - left_s, None)
            split(Unit(unit.window, unit.local, before, left_s, None), rows[:j], first_s, samples)
            split(right, rows[j:], first_s + j * hop, samples)

        embedded = [u for u in units if u.audio is not None]
        for index, unit in enumerate(embedded):
            assert unit.samples is not None  # set with the audio by _units
            split(unit, partials[owners == index], 0.0, unit.samples)
        unit_vectors = np.stack(vectors)
        return out, unit_vectors / np.maximum(np.linalg.norm(unit_vectors, axis=1, keepdims=True), 1e-12)

    def _frame_s(self, activity: np.ndarray) -> float:
        """Seconds per segmentation frame, from the model's output size."""
        return self.window_samples / SAMPLE_RATE / activity.shape[1]

    def _units(self, chunks: np.ndarray, activity: np.ndarray, lengths: list[int]) -> tuple[list[Unit], list[Unit]]:
        """Speech units to embed, and short runs that follow their nearest unit, of every window.

        A unit is one run of one local speaker's activity in one window, cut at pauses (see
        :func:`.units.pause_frames`): the segmentation model may give two voices that take turns one
        local speaker, so each run is embedded on its own. ``lengths`` are the numbers of real
        (not padded) samples in each window.
        """
        frames, frame_s = activity.shape[1], self._frame_s(activity)
        _, bounds = frame_samples(self.window_samples, frames)
        units: list[Unit] = []
        short: list[Unit] = []
        for w, (chunk, act) in enumerate(zip(chunks, activity, strict=True)):
            real = np.arange(frames) * self.window_samples // frames < lengths[w]  # frames not in the padding
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
                    samples = mask_samples(mask, bounds, lengths[w])
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
        chunks, starts = self._windows(wav)
        activity = self._segment(chunks)
        units, short = self._units(chunks, activity, [wav.size - s for s in starts])
        segments: list[Segment] = []
        if units:
            units, embeddings = self._embed_units(units, activity.shape[1])
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
        local = np.zeros((len(starts), votes.shape[0], frames))
        for unit, k in zip(units, labels.tolist(), strict=True):
            local[unit.window, k] = np.maximum(
                local[unit.window, k], activity[unit.window, :, unit.local] * unit.frames
            )
        for w, offset in enumerate(offsets):
            votes[:, offset : offset + frames] += local[w] * weights
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
        """The segmentation and speaker-embedding networks, with speech-like example inputs."""
        win = self.window_samples

        def windows(count: int, seed: int) -> tuple[torch.Tensor]:
            wav = speech_like_audio(count * win / SAMPLE_RATE, seed)
            return (torch.from_numpy(wav[: count * win].reshape(count, 1, win).copy()),)

        def mels(count: int, seed: int) -> tuple[torch.Tensor]:
            wav = normalize_volume(speech_like_audio(count * 0.8 + 1.0, seed)).astype(np.float32)
            mel = wav_to_mel_spectrogram(wav)
            step = (mel.shape[0] - PARTIAL_FRAMES) // max(count - 1, 1)
            return (torch.from_numpy(np.stack([mel[i * step : i * step + PARTIAL_FRAMES] for i in range(count)])),)

        return [
            Component(
                "segmentation", self.segmentation, windows(2, 0),
                input_names=("waveforms",), output_names=("log_probs",),
                dynamic_axes={"waveforms": {0: "batch"}, "log_probs": {0: "batch"}},
                metric=Metric("argmax_agreement", 0.97), kind="segmentation", exporter="legacy",
                calibration_inputs=[windows(3, 1), windows(3, 2)], audio_seconds=2 * win / SAMPLE_RATE,
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
