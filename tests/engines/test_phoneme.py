"""The wav2vec2 CTC phoneme engine: decoding, chunking, checkpoints, default models, uniopt integration."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from difflib import SequenceMatcher
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config

from uniopt import Component, Settings, UniversalOptimizer, load_settings
from uniopt.engines import phoneme
from uniopt.engines.audio import speech_like_audio
from uniopt.engines.phoneme import (
    IPA_VOCAB,
    SPECIAL_TOKENS,
    PhonemeExtractor,
    PhonemeSegment,
    clear_fast_instances,
    ctc_greedy_decode,
    default_config,
    get_fast_instance,
)
from uniopt.errors import InputError, UniOptError

SR = 16_000
#: 3 conv layers, 80 samples (5 ms) per frame, a receptive field of 60 samples, 2 transformer layers.
TINY = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
    "conv_dim": (32, 32, 32), "conv_kernel": (10, 3, 3), "conv_stride": (5, 4, 4),
    "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2,
}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models on a shared 2-CPU machine are many times faster on one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_extractor(**kwargs: object) -> PhonemeExtractor:
    kwargs.setdefault("settings", Settings())
    return PhonemeExtractor.from_config(Wav2Vec2Config(**TINY), **kwargs)


@pytest.fixture(scope="module")
def tiny() -> PhonemeExtractor:
    return tiny_extractor()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny: PhonemeExtractor) -> Path:
    path = tmp_path_factory.mktemp("tiny-checkpoint")
    tiny.model.ctc.save_pretrained(path)
    (path / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tiny.vocab)}))
    return path


def check_segments(segments: list[PhonemeSegment], duration: float) -> None:
    assert segments and all(isinstance(s, PhonemeSegment) for s in segments)
    for seg, nxt in zip(segments, [*segments[1:], None], strict=True):
        assert seg.phoneme in IPA_VOCAB and seg.phoneme not in SPECIAL_TOKENS
        assert 0 <= seg.start_s < seg.end_s <= duration + 1e-9
        assert 0 < seg.confidence <= 1
        if nxt is not None:
            assert seg.end_s <= nxt.start_s + 1e-9


# -- decoding ---------------------------------------------------------------------------------------
def one_hot_logits(ids: list[int], vocab_size: int, scale: float = 5.0) -> np.ndarray:
    return scale * np.eye(vocab_size, dtype=np.float32)[ids]


def test_ctc_greedy_decode_collapses_repeats_and_drops_blanks_and_specials() -> None:
    vocab = ["<pad>", "a", "b", "<unk>"]
    ids = [0, 1, 1, 0, 1, 2, 2, 2, 0, 3, 0, 2]
    segments = ctc_greedy_decode(one_hot_logits(ids, 4), vocab, 0.02)
    assert [(s.phoneme, s.start_s, s.end_s) for s in segments] == [
        ("a", pytest.approx(0.02), pytest.approx(0.06)),
        ("a", pytest.approx(0.08), pytest.approx(0.10)),
        ("b", pytest.approx(0.10), pytest.approx(0.16)),
        ("b", pytest.approx(0.22), pytest.approx(0.24)),
    ]
    expected = math.exp(5) / (math.exp(5) + 3)
    assert all(s.confidence == pytest.approx(expected) for s in segments)


def test_ctc_greedy_decode_offsets_batched_torch_input_and_mean_confidence() -> None:
    vocab = ["<pad>", "a", "b"]
    logits = torch.tensor([[[0.0, 2.0, 0.0], [0.0, 4.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    segments = ctc_greedy_decode(logits, vocab, 0.5, offset_s=10.0)
    assert [(s.phoneme, s.start_s, s.end_s) for s in segments] == [("a", 10.0, 11.0), ("b", 11.5, 12.0)]
    probs = torch.softmax(logits[0].double(), -1)
    assert segments[0].confidence == pytest.approx(float(probs[:2, 1].mean()))
    assert segments[1].confidence == pytest.approx(float(probs[3, 2]))
    assert ctc_greedy_decode(one_hot_logits([0, 0, 0], 3), vocab, 0.02) == []


def test_ctc_greedy_decode_rejects_logits_that_do_not_fit_the_vocabulary() -> None:
    with pytest.raises(InputError, match=r"logits must be \(frames, 3\)"):
        ctc_greedy_decode(np.zeros((5, 4)), ["<pad>", "a", "b"], 0.02)
    with pytest.raises(InputError, match="logits must be"):
        ctc_greedy_decode(np.zeros((2, 5, 3)), ["<pad>", "a", "b"], 0.02)


# -- extraction -------------------------------------------------------------------------------------
def test_extract_phonemes_returns_ordered_segments_within_the_audio(tiny: PhonemeExtractor) -> None:
    wav = speech_like_audio(1.3, seed=5)
    segments = tiny.extract_phonemes(wav, SR)
    check_segments(segments, 1.3)
    assert segments == tiny.extract_phonemes(torch.from_numpy(wav), SR)
    assert tiny.frame_samples == 80 and tiny.receptive_field == 60 and tiny.frame_seconds == 0.005


def test_stereo_and_resampled_input_gives_timestamps_in_the_original_duration(tiny: PhonemeExtractor) -> None:
    left, right = (
        speech_like_audio(1.0, seed=1, sample_rate=8_000),
        speech_like_audio(1.0, seed=2, sample_rate=8_000),
    )
    segments = tiny.extract_phonemes(np.stack([left, right], axis=1), 8_000)
    check_segments(segments, 1.0)
    assert segments[-1].end_s > 0.9
    pcm = (np.clip(speech_like_audio(0.5, seed=3), -1, 1) * 32767).astype(np.int16)
    check_segments(tiny.extract_phonemes(pcm, SR), 0.5)


def test_extract_phonemes_rejects_audio_shorter_than_the_receptive_field(tiny: PhonemeExtractor) -> None:
    with pytest.raises(InputError, match="at least 60"):
        tiny.extract_phonemes(np.zeros(59, dtype=np.float32), SR)
    with pytest.raises(InputError, match="NaN"):
        tiny.extract_phonemes(np.full(1000, np.nan, dtype=np.float32), SR)
    assert isinstance(tiny.extract_phonemes(speech_like_audio(60 / SR), SR), list)  # exactly one frame
    with pytest.raises(InputError, match="chunk_seconds must be positive"):
        tiny_extractor(chunk_seconds=0)


class LocalFrames(torch.nn.Module):
    """A stand-in network whose frames see only their own samples: phoneme id = round(10 x mean level)."""

    def __init__(self, kernel: int, stride: int, vocab_size: int) -> None:
        super().__init__()
        self.kernel, self.stride, self.vocab_size = kernel, stride, vocab_size
        self.calls = 0

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        level = F.avg_pool1d(input_values[:, None], self.kernel, self.stride)[:, 0]
        ids = (level * 10).round().long().clamp(0, self.vocab_size - 1)
        return 8.0 * F.one_hot(ids, self.vocab_size).float()


def test_chunked_extraction_equals_one_pass_for_a_model_without_context() -> None:
    rng = np.random.default_rng(0)
    levels = rng.choice([0.0, *np.arange(4, 30) / 10], size=40)  # 0: blank; 0.1-0.3 would be specials
    durations = rng.uniform(0.02, 0.4, size=40)
    wav = np.concatenate([np.full(int(d * SR), v, np.float32) for v, d in zip(levels, durations, strict=True)])
    results = {}
    for chunk in (0.25, 1.0, 60.0):
        extractor = tiny_extractor(chunk_seconds=chunk)
        extractor.normalize = False
        extractor.model = LocalFrames(extractor.receptive_field, extractor.frame_samples, len(extractor.vocab))
        results[chunk] = extractor.extract_phonemes(wav, SR)
        assert extractor.model.calls == max(1, math.ceil(wav.size / SR / chunk - 0.25))  # short tails join
    one_pass = results[60.0]
    check_segments(one_pass, wav.size / SR)
    assert any(s.start_s < 0.25 * k < s.end_s for s in one_pass for k in range(1, 20))  # runs across chunks
    for chunk in (0.25, 1.0):
        assert [(s.phoneme, s.start_s, s.end_s) for s in results[chunk]] == [
            (s.phoneme, s.start_s, s.end_s) for s in one_pass
        ]
        assert [s.confidence for s in results[chunk]] == pytest.approx([s.confidence for s in one_pass])


def test_chunks_of_a_real_model_are_offset_by_their_start() -> None:
    pieces = [speech_like_audio(0.25, seed=s) for s in (1, 2, 3)]
    chunked = tiny_extractor(chunk_seconds=0.25).extract_phonemes(np.concatenate(pieces), SR)
    check_segments(chunked, 0.75)
    single = tiny_extractor(chunk_seconds=60.0)
    expected: list[list[object]] = []
    for k, piece in enumerate(pieces):
        for seg in single.extract_phonemes(piece, SR):
            start, end = seg.start_s + 0.25 * k, seg.end_s + 0.25 * k
            if (
                expected
                and seg.start_s == 0
                and expected[-1][2] == pytest.approx(0.25 * k)
                and expected[-1][0] == seg.phoneme
            ):
                expected[-1][2] = end  # one run across the boundary, as a single pass gives
            else:
                expected.append([seg.phoneme, start, end])
    assert [(s.phoneme, s.start_s, s.end_s) for s in chunked] == [
        (p, pytest.approx(a), pytest.approx(b)) for p, a, b in expected
    ]


# -- checkpoints ------------------------------------------------------------------------------------
def test_a_saved_checkpoint_loads_with_identical_logits(tiny: PhonemeExtractor, checkpoint: Path) -> None:
    loaded = PhonemeExtractor(checkpoint, settings=Settings())
    x = torch.from_numpy(speech_like_audio(0.5))[None]
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), tiny.model(x))
    assert loaded.vocab == tiny.vocab and loaded.info()["trained"] is True
    assert loaded.extract_phonemes(x[0].numpy(), SR) == tiny.extract_phonemes(x[0].numpy(), SR)


def test_preprocessor_config_can_turn_normalisation_off(tmp_path: Path, checkpoint: Path) -> None:
    for file in checkpoint.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    assert PhonemeExtractor(tmp_path, settings=Settings()).normalize is False


def test_missing_or_incomplete_checkpoints_raise_uniopt_errors(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(UniOptError, match="does not exist"):
        PhonemeExtractor(tmp_path / "nowhere", settings=Settings())
    with pytest.raises(UniOptError, match=r"missing config\.json, model\.safetensors .*, vocab\.json"):
        PhonemeExtractor(tmp_path, settings=Settings())
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((checkpoint / name).read_bytes())
    with pytest.raises(UniOptError, match=r"missing vocab\.json"):
        PhonemeExtractor(tmp_path, settings=Settings())
    (tmp_path / "vocab.json").write_text(json.dumps({"<pad>": 0, "a": 999}))
    with pytest.raises(UniOptError, match="'a' has id 999"):
        PhonemeExtractor(tmp_path, settings=Settings())
    (tmp_path / "vocab.json").write_text("{not json")
    with pytest.raises(UniOptError, match="cannot load"):
        PhonemeExtractor(tmp_path, settings=Settings())


# -- default models ---------------------------------------------------------------------------------
def test_default_model_is_wav2vec2_base_size_and_reported_untrained(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="uniopt.engines.phoneme"):
        extractor = PhonemeExtractor(settings=load_settings())
    assert 94e6 < extractor.info()["parameters"] < 96e6
    assert extractor.info()["topology"]["num_hidden_layers"] == 12
    assert extractor.frame_samples == 320 and extractor.receptive_field == 400
    assert extractor.get_performance_info()["model"]["trained"] is False
    assert any("random weights" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert len(extractor.vocab) == len(IPA_VOCAB) and 40 <= len(IPA_VOCAB) <= 75
    assert extractor.vocab[extractor.blank] == "<pad>" and not extractor.model.training


def test_slow_models_setting_selects_the_large_phoneme_topology(monkeypatch: pytest.MonkeyPatch) -> None:
    large = default_config(fast=False)
    assert (large.num_hidden_layers, large.hidden_size, large.num_attention_heads) == (24, 1024, 16)
    assert large.feat_extract_norm == "layer" and large.do_stable_layer_norm and large.conv_bias
    built: list[Wav2Vec2Config] = []

    def capture(config: Wav2Vec2Config) -> None:  # records the config instead of building 300M weights
        built.append(config)
        raise RuntimeError("not built in tests")

    monkeypatch.setattr(phoneme, "Wav2Vec2ForCTC", capture)
    monkeypatch.setenv("USE_FAST_MODELS", "false")
    with pytest.raises(RuntimeError, match="not built"):
        PhonemeExtractor(settings=load_settings())
    assert built[0].num_hidden_layers == 24 and built[0].hidden_size == 1024


def test_weights_are_deterministic_for_a_seed(tiny: PhonemeExtractor) -> None:
    state = torch.random.get_rng_state()
    again, other = tiny_extractor(), tiny_extractor(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone
    weight = "ctc.lm_head.weight"
    assert torch.equal(again.model.state_dict()[weight], tiny.model.state_dict()[weight])
    assert not torch.equal(other.model.state_dict()[weight], tiny.model.state_dict()[weight])


# -- uniopt ---------------------------------------------------------------------------------------
def test_uniopt_components_declare_the_model(tiny: PhonemeExtractor) -> None:
    (component,) = tiny.uniopt_components()
    assert isinstance(component, Component) and component.name == "model" and component.module is tiny.model
    (x,) = component.example_inputs
    assert x.shape == (1, 80_000) and x.dtype == torch.float32
    assert torch.equal(x, tiny.uniopt_components()[0].example_inputs[0])
    assert component.metric.name == "ctc_agreement" and component.metric.threshold == 0.98
    assert (component.kind, component.exporter) == ("encoder", "legacy")
    assert component.dynamic_axes == {"input_values": {1: "samples"}, "logits": {1: "frames"}}
    with torch.inference_mode():
        out = component.module(x)
        assert torch.equal(out, tiny.model(x))
    assert out.shape == (1, 1000, len(tiny.vocab))  # (80000 - 60) // 80 + 1 frames


def test_universal_optimizer_off_and_tier_keep_the_phonemes(tiny: PhonemeExtractor) -> None:
    wav = speech_like_audio(2.0, seed=7)
    plain = tiny.extract_phonemes(wav, SR)
    assert UniversalOptimizer(tiny, mode="off").extract_phonemes(wav, SR) == plain
    optimized = UniversalOptimizer(tiny, mode="tier", threads=1, use_model_quantization=False)
    segments = optimized.extract_phonemes(wav, SR)
    check_segments(segments, 2.0)
    chosen = optimized.report().components[0].chosen
    if chosen == "eager":
        assert segments == plain
    else:  # a reduced-precision stage the guard passed at >= 98 % frame agreement
        same = SequenceMatcher(None, [s.phoneme for s in plain], [s.phoneme for s in segments]).ratio()
        assert same > 0.95, chosen
    assert tiny.model.__class__.__name__ == "CTCLogits"  # the original engine is left as it was


def test_get_fast_instance_is_cached_per_directory_and_settings(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clear_fast_instances()
    try:
        with ThreadPoolExecutor(4) as pool:
            instances = list(pool.map(lambda _: get_fast_instance(checkpoint, mode="off"), range(4)))
        assert all(i is instances[0] for i in instances)
        fast = instances[0]
        assert isinstance(fast, UniversalOptimizer) and fast.settings.mode == "off"
        check_segments(fast.extract_phonemes(speech_like_audio(0.5), SR), 0.5)
        assert fast.get_performance_info()["engine"]["calls"] == 1
        monkeypatch.setenv("USE_OPTIMIZED_PHONEME_MODEL", "false")
        plain = get_fast_instance(checkpoint, mode="off", threads=1)
        assert isinstance(plain, PhonemeExtractor) and plain.trained
        assert get_fast_instance(str(checkpoint), mode="off") is fast
    finally:
        clear_fast_instances()
    with pytest.raises(UniOptError):
        get_fast_instance(checkpoint, no_such_setting=1)


def test_performance_info_counts_calls_audio_and_time(caplog: pytest.LogCaptureFixture) -> None:
    extractor = tiny_extractor(settings=Settings(enable_performance_logging=True))
    assert extractor.get_performance_info()["real_time_factor"] is None
    with caplog.at_level(logging.INFO, logger="uniopt.engines.phoneme"):
        extractor.extract_phonemes(speech_like_audio(0.5), SR)
        extractor(speech_like_audio(1.0), SR)
    info = extractor.get_performance_info()
    assert info["calls"] == 2 and info["audio_seconds"] == pytest.approx(1.5)
    assert info["real_time_factor"] == pytest.approx(info["processing_seconds"] / 1.5)
    assert info["model"]["topology"]["hidden_size"] == 32
    assert sum("phonemes of" in r.getMessage() for r in caplog.records) == 2
