"""Real engines nobody here wrote, installed from PyPI, wrapped as a user would wrap them.

resemblyzer's ``VoiceEncoder`` ships its trained weights; its users call ``embed_utterance`` and
``embed_speaker``, which compute mel frames and call ``self(mels)`` with a batch of partial
utterances of shape ``(partials, 160, 40)``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from uniopt import UniversalOptimizer
from uniopt.plugins.model_cache import model_cache

with warnings.catch_warnings():  # resemblyzer imports a scipy.ndimage path scipy deprecates
    warnings.simplefilter("ignore", DeprecationWarning)
    from resemblyzer import VoiceEncoder
    from resemblyzer import audio as resemblyzer_audio

FIXTURE = Path(__file__).parent / "data" / "diarization" / "two_speakers.wav"
TIER_MODE: dict[str, Any] = {"mode": "tier", "tier": "low-resource", "model_warmup_runs": 0}
#: The guard's embedding threshold, for the utterance embeddings the engine's methods return.
COSINE = 0.999


@pytest.fixture(scope="module")
def recording() -> np.ndarray:
    audio, rate = sf.read(FIXTURE, dtype="float32")
    assert rate == 16_000
    return audio


@pytest.fixture(autouse=True)
def _fresh_model_cache() -> Any:
    model_cache.clear()
    yield
    model_cache.clear()


def _partials(wav: np.ndarray) -> torch.Tensor:
    """The mel frames ``embed_utterance`` gives the model for ``wav`` (its own slicing)."""
    wav_slices, mel_slices = VoiceEncoder.compute_partial_slices(len(wav), rate=1.3, min_coverage=0.75)
    wav = np.pad(wav, (0, max(0, wav_slices[-1].stop - len(wav))))
    mel = resemblyzer_audio.wav_to_mel_spectrogram(wav)
    return torch.from_numpy(np.array([mel[s] for s in mel_slices]))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "uniopt" and r.levelno >= logging.WARNING]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_resemblyzer_embed_utterance_and_embed_speaker_run_the_stage(
    recording: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    encoder = VoiceEncoder(device="cpu", verbose=False)
    turns = [recording[int(s * 16_000) : int(s * 16_000) + 48_000] for s in (0.5, 10.5, 20.5)]  # 3 s of speaker A
    mels = _partials(turns[0])
    assert mels.shape == (3, 160, 40) and all(_partials(t).shape == mels.shape for t in turns)
    expected = [encoder.embed_utterance(t) for t in turns]
    expected_speaker = encoder.embed_speaker(turns)

    fast = UniversalOptimizer(encoder, example_inputs=(mels,), cache_dir=str(tmp_path), **TIER_MODE)
    assert fast.report().component("module").chosen == "onnxruntime-fp32"
    assert fast.engine is encoder and isinstance(fast, UniversalOptimizer)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="uniopt"):
        got = [fast.embed_utterance(t) for t in turns]
        got_speaker = encoder.embed_speaker(turns)  # through the user's own reference, too
    assert not _warnings(caplog)  # no call fell outside the exported graph
    stats = fast.get_performance_info()["components"]["module"]
    assert stats["calls"] == 6 and stats["eager_calls"] == 0
    for e, g in zip(expected, got, strict=True):
        assert _cosine(e, g) > COSINE and not np.array_equal(e, g)  # ONNX Runtime's numbers, not eager's
    assert _cosine(expected_speaker, got_speaker) > COSINE

    longer = recording[int(0.5 * 16_000) : int(4.5 * 16_000)]  # another partial count: the graph's batch is fixed
    reference = VoiceEncoder(device="cpu", verbose=False).embed_utterance(longer)
    with caplog.at_level(logging.WARNING, logger="uniopt"):
        assert _cosine(fast.embed_utterance(longer), reference) > COSINE
    assert any("outside the exported graph's shapes" in m for m in _warnings(caplog))


def test_resemblyzer_wrapped_by_sample_runs_the_stage_for_every_length(
    recording: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    encoder = VoiceEncoder(device="cpu", verbose=False)
    short, longer = recording[8_000:56_000], recording[8_000:88_000]  # 3 and 5 partial utterances
    fast = UniversalOptimizer(
        encoder,
        sample=[lambda e: e.embed_utterance(short), lambda e: e.embed_utterance(longer)],
        cache_dir=str(tmp_path),
        **TIER_MODE,
    )
    report = fast.report().component("module")
    assert report.chosen == "onnxruntime-fp32" and report.found_by == "embed_utterance() (2 calls in the samples)"
    reference = VoiceEncoder(device="cpu", verbose=False)
    turns = [recording[int(s * 16_000) : int(s * 16_000) + n] for s, n in ((0.5, 40_000), (10.5, 100_000))]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="uniopt"):
        got = [fast.embed_utterance(t) for t in turns] + [fast.embed_speaker(turns)]
    assert not _warnings(caplog)  # 2 and 6 partials: the batch axis was found dynamic
    expected = [reference.embed_utterance(t) for t in turns] + [reference.embed_speaker(turns)]
    assert all(_cosine(g, e) > COSINE for g, e in zip(got, expected, strict=True))
    stats = fast.get_performance_info()["components"]["module"]
    assert stats["calls"] == 4 and stats["eager_calls"] == 0


def _silero() -> Any:
    with warnings.catch_warnings():  # torch.jit.load is deprecated upstream
        warnings.simplefilter("ignore", DeprecationWarning)
        from silero_vad import get_speech_timestamps, load_silero_vad

        return load_silero_vad(), get_speech_timestamps


def test_silero_vad_script_module_alone_runs_eager_with_the_reason(recording: np.ndarray, tmp_path: Path) -> None:
    model, get_speech_timestamps = _silero()
    assert isinstance(model, torch.jit.ScriptModule)
    audio = torch.from_numpy(recording)
    expected = get_speech_timestamps(audio, model)
    assert len(expected) >= 6  # the fixture's six turns, some split at pauses
    samples = [lambda m: get_speech_timestamps(audio[:64_000], m), lambda m: get_speech_timestamps(audio[:96_000], m)]
    fast = UniversalOptimizer(model, sample=samples, cache_dir=str(tmp_path), **TIER_MODE)
    report = fast.report().component("module")
    assert report.found_by.startswith("the sample calls (") and report.chosen == "eager"
    reason = report.candidate("eager").reason
    assert "depend on its earlier calls" in reason and "SileroVadAdapter" in reason  # its LSTM state and context
    assert get_speech_timestamps(audio, fast) == expected


def test_silero_vad_through_the_adapter_runs_its_network_optimized(recording: np.ndarray, tmp_path: Path) -> None:
    from uniopt.engines.silero_vad import SileroVadAdapter

    model, get_speech_timestamps = _silero()
    audio = torch.from_numpy(recording)
    adapter = SileroVadAdapter(model)
    with torch.inference_mode():  # the Python forward is the packaged one, chunk by chunk, bit for bit
        model.reset_states()
        for start in range(0, 16_000 * 3, 512):
            assert torch.equal(adapter(audio[start : start + 512], 16_000), model(audio[start : start + 512], 16_000))
        with pytest.raises(ValueError, match="number of samples"):
            adapter(audio[:600], 16_000)
    expected = get_speech_timestamps(audio, model)
    fast = UniversalOptimizer(adapter, cache_dir=str(tmp_path), **TIER_MODE)
    report = fast.report().component("network")
    assert report.chosen == "onnxruntime-fp32", report.candidates
    assert get_speech_timestamps(audio, fast) == expected
    assert get_speech_timestamps(audio, model) == expected  # the packaged model itself is untouched
    stats = fast.get_performance_info()["components"]["network"]
    assert stats["calls"] >= len(recording) // 512 and stats["eager_calls"] == 0


def _tiny_wav2vec2_dir(directory: Path) -> Path:
    """A config-built Wav2Vec2ForCTC, its CTC tokenizer and feature extractor, saved as a model directory."""
    import json

    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4}
    vocab.update({c: i + 5 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")})
    (directory / "vocab.json").write_text(json.dumps(vocab))
    torch.manual_seed(0)
    config = Wav2Vec2Config(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, pad_token_id=0,
    )  # fmt: skip
    model = Wav2Vec2ForCTC(config).eval()
    with torch.no_grad():  # random weights favour letters over the pad token, so there is text to compare
        model.lm_head.bias[5:] += torch.linspace(0, 3, len(vocab) - 5)
    model.save_pretrained(directory)
    Wav2Vec2CTCTokenizer(str(directory / "vocab.json")).save_pretrained(directory)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, return_attention_mask=False).save_pretrained(
        directory
    )
    return directory


def test_transformers_asr_pipeline_wrapped_by_sample_keeps_its_transcriptions(
    recording: np.ndarray, tmp_path: Path
) -> None:
    from transformers import pipeline

    (tmp_path / "wav2vec2").mkdir()
    model_dir = _tiny_wav2vec2_dir(tmp_path / "wav2vec2")
    asr = pipeline("automatic-speech-recognition", model=str(model_dir), device="cpu")
    model = asr.model
    clips = [recording[16_000:64_000], recording[160_000:272_000]]
    expected = [asr(c)["text"] for c in clips]
    assert all(len(t) > 10 for t in expected)
    samples = [lambda p: p(recording[:32_000]), lambda p: p(recording[:48_000])]
    fast = UniversalOptimizer(asr, sample=samples, cache_dir=str(tmp_path / "cache"), **TIER_MODE)
    (report,) = fast.report().components
    assert (report.component, report.chosen, report.found_by) == (
        "model",
        "onnxruntime-fp32",
        "__call__() (2 calls in the samples)",
    )
    assert fast.engine is asr and asr.model is model
    assert [fast(c)["text"] for c in clips] == expected
    stats = fast.get_performance_info()["components"]["model"]
    assert stats["calls"] == 2 and stats["eager_calls"] == 0  # input_values by keyword, bound to the graph's input
