"""Speaker diarization: who spoke when, from pyannote segmentation and resemblyzer embeddings.

:class:`Diarizer` slides 10 s windows (the last one zero-padded) through pyannote segmentation-3.0
and hard-decodes the powerset scores (argmax) into up to three window-local speakers; embeds each
local speaker's solo speech (all its speech when that is too little) with the GE2E encoder, from
1.6 s mel partials as resemblyzer's ``embed_utterance`` cuts them; clusters the embeddings on
cosine distance (:mod:`.clustering`); and maps every window's local speakers to the clusters,
averaging their activity over overlapping windows (Hamming-weighted) on one frame grid. Runs
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
from typing import Any

import numpy as np
import torch
from torch import nn

from uniopt.engines.audio import prepare_audio, speech_like_audio
from uniopt.engines.diarization.clustering import cluster_embeddings
from uniopt.engines.diarization.segmentation import load_segmentation_model, powerset_to_speakers
from uniopt.engines.diarization.speaker_encoder import (
    PARTIAL_FRAMES,
    compute_partial_slices,
    load_speaker_encoder,
    normalize_volume,
    wav_to_mel_spectrogram,
)
from uniopt.engines.diarization.weights import find_segmentation_onnx, find_speaker_encoder_weights
from uniopt.engines.stats import CallStats
from uniopt.errors import InputError
from uniopt.optimizer.component import Component, Metric

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
    merged: dict[str, list[list[float]]] = {}
    for seg in sorted(segments, key=lambda s: (s.speaker, s.start_s)):
        spans = merged.setdefault(seg.speaker, [])
        if spans and seg.start_s - spans[-1][1] < min_gap_s:
            spans[-1][1] = max(spans[-1][1], seg.end_s)
        else:
            spans.append([seg.start_s, seg.end_s])
    kept = [
        Segment(start, end, speaker)
        for speaker, spans in merged.items()
        for start, end in spans
        if end - start >= min_duration_s
    ]
    return sorted(kept, key=lambda s: (s.start_s, s.speaker))


def _runs(active: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index pairs of the runs of True in a 1-D boolean array."""
    edges = np.diff(np.concatenate([[0], active.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


class Diarizer:
    """Who spoke when (see the module docstring); :meth:`diarize` returns :class:`Segment` lists.

    ``segmentation`` and ``embedding`` default to the pretrained pyannote segmentation-3.0 and
    resemblyzer networks. ``threshold`` is the cosine distance up to which speaker embeddings are
    merged into one speaker; ``onset`` the share of (Hamming-weighted) window votes a frame needs to
    count as speech of a speaker. A local speaker is embedded when it speaks at least
    ``min_speech_s`` in a window; only those with ``min_embedding_s`` of speech shape the clusters,
    the others join the nearest one.
    """

    def __init__(
        self,
        segmentation: nn.Module | None = None,
        embedding: nn.Module | None = None,
        *,
        window_s: float = 10.0,
        step_s: float = 5.0,
        threshold: float = 0.3,
        onset: float = 0.5,
        min_duration_s: float = 0.25,
        min_gap_s: float = 0.5,
        min_speech_s: float = 0.2,
        min_embedding_s: float = 1.0,
        batch_size: int = 8,
        embedding_batch_size: int = 32,
    ) -> None:
        if not 0 < step_s <= window_s:
            raise InputError(f"step_s must be in (0, window_s={window_s}], got {step_s}")
        if not 0.0 <= onset < 1.0 or min(min_speech_s, min_embedding_s) < 0:
            raise InputError("onset must be in [0, 1) and min_speech_s, min_embedding_s >= 0")
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
        self.threshold, self.onset = threshold, onset
        self.min_duration_s, self.min_gap_s = min_duration_s, min_gap_s
        self.min_speech_s, self.min_embedding_s = min_speech_s, min_embedding_s
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
        mels, owners = [], []
        for index, wav in enumerate(pieces):
            wav = normalize_volume(wav).astype(np.float32)
            wav_slices, mel_slices = compute_partial_slices(wav.size)
            if wav_slices[-1].stop > wav.size:
                wav = np.pad(wav, (0, wav_slices[-1].stop - wav.size))
            mel = wav_to_mel_spectrogram(wav)
            mels += [mel[s] for s in mel_slices]
            owners += [index] * len(mel_slices)
        stacked, partial = np.stack(mels), []
        with torch.inference_mode():
            for first in range(0, len(stacked), self.embedding_batch_size):
                batch = torch.from_numpy(stacked[first : first + self.embedding_batch_size])
                partial.append(torch.as_tensor(self.embedding(batch)).float().cpu().numpy())
        sums = np.zeros((len(pieces), partial[0].shape[1]))
        np.add.at(sums, np.asarray(owners), np.concatenate(partial))
        return sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)

    def _frame_s(self, activity: np.ndarray) -> float:
        """Seconds per segmentation frame, from the model's output size."""
        return self.window_samples / SAMPLE_RATE / activity.shape[1]

    def _speaker_pieces(self, chunks: np.ndarray, activity: np.ndarray, lengths: list[int]) -> tuple[Any, ...]:
        """(window, local speaker) keys, the audio to embed for each, and its seconds of speech.

        ``lengths`` are the numbers of real (not padded) samples in each window.
        """
        frames, frame_s = activity.shape[1], self._frame_s(activity)
        sample_frame = np.minimum(np.arange(self.window_samples) * frames // self.window_samples, frames - 1)
        keys, pieces, seconds = [], [], []
        for w, (chunk, act) in enumerate(zip(chunks, activity, strict=True)):
            valid = np.arange(self.window_samples) < lengths[w]
            real = np.arange(frames) * self.window_samples // frames < lengths[w]  # frames not in the padding
            alone = act.sum(axis=1) == 1
            for s in range(act.shape[1]):
                speech = (act[:, s] > 0) & real
                if speech.sum() * frame_s < max(self.min_speech_s, 1e-9):
                    continue
                clean = speech & alone
                mask = clean if clean.sum() * frame_s >= self.min_embedding_s else speech
                keys.append((w, s))
                pieces.append(chunk[mask[sample_frame] & valid])
                seconds.append(mask.sum() * frame_s)
        return keys, pieces, np.asarray(seconds)

    # -- public ---------------------------------------------------------------------------------
    def diarize(self, audio: Any, sample_rate: int, num_speakers: int | None = None) -> list[Segment]:
        """Speaker segments of ``audio`` (numpy or torch; mono or stereo; any rate), sorted by start.

        ``num_speakers`` fixes the number of speakers when known (at most the number found in
        the windows); silence gives an empty list.
        """
        if num_speakers is not None and (
            isinstance(num_speakers, bool) or not isinstance(num_speakers, (int, np.integer)) or num_speakers < 1
        ):
            raise InputError(f"num_speakers must be a positive integer or None, got {num_speakers!r}")
        started = time.perf_counter()
        wav = prepare_audio(audio, sample_rate, SAMPLE_RATE)
        chunks, starts = self._windows(wav)
        activity = self._segment(chunks)
        keys, pieces, seconds = self._speaker_pieces(chunks, activity, [wav.size - s for s in starts])
        segments: list[Segment] = []
        if keys:
            labels = cluster_embeddings(
                self._embed(pieces), threshold=self.threshold, num_speakers=num_speakers,
                clusterable=seconds >= self.min_embedding_s,
            )  # fmt: skip
            segments = self._aggregate(activity, keys, labels, starts, wav.size)
        self._stats.record(wav.size / SAMPLE_RATE, time.perf_counter() - started)
        return segments

    __call__ = diarize

    def _aggregate(
        self, activity: np.ndarray, keys: list[tuple[int, int]], labels: np.ndarray, starts: list[int], n_samples: int
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
        for (w, s), k in zip(keys, labels.tolist(), strict=True):
            local[w, k] = np.maximum(local[w, k], activity[w, :, s])
        for w, offset in enumerate(offsets):
            votes[:, offset : offset + frames] += local[w] * weights
        active = (votes / np.maximum(norm, 1e-12))[:, :total] > self.onset
        raw = [
            Segment(round(a * frame_s, 3), round(min(b * frame_s, duration), 3), str(k))
            for k in range(active.shape[0])
            for a, b in _runs(active[k])
        ]
        kept = postprocess_segments(raw, self.min_duration_s, self.min_gap_s)
        names: dict[str, str] = {}
        for seg in kept:
            names.setdefault(seg.speaker, f"SPEAKER_{len(names):02d}")
        return sorted(
            (Segment(s.start_s, s.end_s, names[s.speaker]) for s in kept), key=lambda s: (s.start_s, s.speaker)
        )

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
                calibration_inputs=[windows(3, 1)], audio_seconds=2 * win / SAMPLE_RATE,
            ),
            Component(
                "embedding", self.embedding, mels(16, 0),
                input_names=("mels",), output_names=("embeddings",),
                dynamic_axes={"mels": {0: "batch"}, "embeddings": {0: "batch"}},
                metric=Metric("cosine", 0.99), kind="embedding", exporter="legacy",
                calibration_inputs=[mels(5, 1)], audio_seconds=16 * PARTIAL_FRAMES / 100,
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
