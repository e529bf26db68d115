"""Components found from sample calls: outermost modules, keyword inputs, dynamic axes, metrics."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from uniopt import Metric, UniOptError, UniversalOptimizer
from uniopt.optimizer.capture import FLOAT_METRIC, LABEL_METRIC, capture_components
from uniopt.optimizer.install import installation_of
from uniopt.plugins.model_cache import model_cache

TIER_MODE: dict[str, Any] = {"mode": "tier", "tier": "low-resource", "model_warmup_runs": 0, "threads": 1}


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(16, 32)
        self.out = nn.Linear(32, 8)

    def forward(self, frames: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        return self.out(torch.relu(self.proj(frames))) * gain


class Labeller(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.head = nn.Linear(8, 5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features).argmax(-1)


class Engine:
    """Not a module: an engine holding two, calling them from its own methods (one by keyword)."""

    def __init__(self) -> None:
        self.encoder = Encoder().eval()
        self.labeller = Labeller().eval()
        self.calls = 0

    def label(self, audio: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        frames = audio.reshape(1, -1, 16)
        return self.labeller(self.encoder(frames=frames))


@pytest.fixture(autouse=True)
def _fresh_model_cache() -> Any:
    model_cache.clear()
    yield
    model_cache.clear()


def _audio(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(frames * 16, generator=torch.Generator().manual_seed(seed))


def test_outermost_modules_their_inputs_axes_and_metrics() -> None:
    engine = Engine()
    found = capture_components(engine, [lambda e: e.label(_audio(6)), lambda e: e.label(_audio(9, 1))])
    by_name = {c.component.name: c for c in found}
    assert sorted(by_name) == ["encoder", "labeller"]  # not encoder.proj, encoder.out or labeller.head
    encoder = by_name["encoder"].component
    assert encoder.input_names == ("frames",) and encoder.example_inputs[0].shape == (1, 6, 16)  # keyword call
    assert encoder.dynamic_axes == {"frames": {1: "frames_1"}, "output_0": {1: "output_0_1"}}
    assert [tuple(c[0].shape) for c in encoder.calibration_inputs] == [(1, 9, 16)]  # the other sample
    assert encoder.metric == FLOAT_METRIC and by_name["labeller"].component.metric == LABEL_METRIC
    assert by_name["encoder"].method == "label" and by_name["encoder"].calls == 2
    assert engine.calls == 2  # the engine's own code ran once per sample


def test_one_sample_one_call_asks_for_another_sample() -> None:
    with pytest.raises(UniOptError, match=r"pass two or more samples of different sizes \(sample=\[a, b\]\)"):
        capture_components(Engine(), lambda e: e.label(_audio(6)))
    same = capture_components(Engine(), [lambda e: e.label(_audio(6))] * 2)  # sizes never change: no dynamic axes
    assert all(c.component.dynamic_axes == {} for c in same)


def test_overrides_set_a_found_component_and_name_only_found_ones() -> None:
    samples = [lambda e: e.label(_audio(6)), lambda e: e.label(_audio(9))]
    found = capture_components(Engine(), samples, {"encoder": {"metric": Metric("cosine", 0.99), "kind": "encoder"}})
    encoder = next(c.component for c in found if c.component.name == "encoder")
    assert encoder.metric == Metric("cosine", 0.99) and encoder.kind == "encoder"
    with pytest.raises(UniOptError, match="overrides for decoder: no such component"):
        capture_components(Engine(), samples, {"decoder": {"kind": "decoder"}})
    with pytest.raises(UniOptError, match="sample= takes a function of the engine"):
        capture_components(Engine(), ["not callable"])  # type: ignore[list-item]


def test_wrapped_by_sample_every_size_runs_the_stage(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    engine = Engine()
    tests = [_audio(n, seed=n) for n in (4, 13, 30)]
    expected = [engine.label(a) for a in tests]
    fast = UniversalOptimizer(
        engine,
        sample=[lambda e: e.label(_audio(6)), lambda e: e.label(_audio(9))],
        cache_dir=str(tmp_path),
        **TIER_MODE,
    )
    report = fast.report().component("encoder")
    assert report.chosen == "onnxruntime-fp32" and report.found_by == "label() (2 calls in the samples)"
    assert fast.report().to_dict()["components"][0]["found_by"].startswith("label()")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="uniopt"):
        got = [fast.label(a) for a in tests]
    assert not [r for r in caplog.records if r.name == "uniopt"]  # no size fell outside the exported graph
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    info = fast.get_performance_info()["components"]
    assert info["encoder"]["calls"] == 3 and info["encoder"]["eager_calls"] == 0  # keyword calls, bound by name


def test_sample_and_example_inputs_are_exclusive() -> None:
    with pytest.raises(UniOptError, match="sample= or example_inputs"):
        UniversalOptimizer(Encoder(), (torch.randn(1, 2, 16),), sample=lambda e: e(torch.randn(1, 2, 16)))
    with pytest.raises(UniOptError, match="overrides= applies to components found by sample="):
        UniversalOptimizer(Encoder(), (torch.randn(1, 2, 16),), overrides={"module": {}})


class Counter(nn.Module):
    """Its output depends on how often it was called before: module state."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        return x * self.steps


def test_a_module_with_state_is_found_and_left_eager(tmp_path: Any) -> None:
    module = Counter()
    samples = [lambda m: m(torch.ones(2)), lambda m: m(torch.ones(3))]
    (found,) = capture_components(module, samples)
    assert found.eager_reason.startswith("its outputs depend on its earlier calls")
    fast = UniversalOptimizer(module, sample=samples, cache_dir=str(tmp_path), **TIER_MODE)
    report = fast.report().component("module")
    assert report.chosen == "eager" and report.candidate("eager").reason == found.eager_reason
    assert installation_of(module) is None


def test_the_phoneme_engine_found_by_sample_ends_with_its_declared_choice(tmp_path: Any) -> None:
    from transformers import Wav2Vec2Config

    from uniopt.engines.audio import speech_like_audio
    from uniopt.engines.phoneme import PhonemeExtractor
    from uniopt.settings import Settings

    tiny = {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "conv_dim": (32, 32, 32), "conv_kernel": (10, 3, 3), "conv_stride": (5, 4, 4),
        "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2,
    }  # fmt: skip
    settings = {**TIER_MODE, "use_model_quantization": False, "cache_dir": str(tmp_path)}

    def engine() -> PhonemeExtractor:
        return PhonemeExtractor.from_config(Wav2Vec2Config(**tiny), settings=Settings())

    declared = UniversalOptimizer(engine(), **settings)
    wavs = [speech_like_audio(seconds, seed) for seconds, seed in ((2.0, 1), (3.0, 2), (4.0, 3))]
    sampled_engine = engine()
    sampled = UniversalOptimizer(
        sampled_engine,
        sample=[lambda e: e.extract_phonemes(wavs[0], 16_000), lambda e: e.extract_phonemes(wavs[1], 16_000)],
        overrides={"model": {"kind": "encoder", "metric": Metric("ctc_agreement", 0.98), "exporter": "legacy"}},
        **settings,
    )
    report = sampled.report().component("model")
    assert report.found_by == "extract_phonemes() (2 calls in the samples)"
    assert report.chosen == declared.report().component("model").chosen != "eager"
    assert sampled.extract_phonemes(wavs[2], 16_000) == declared.extract_phonemes(wavs[2], 16_000)
    assert sampled.get_performance_info()["components"]["model"]["eager_calls"] == 0


def test_the_diarizer_found_by_sample_ends_with_its_declared_choices(tmp_path: Any) -> None:
    from pathlib import Path

    import soundfile as sf

    from uniopt.engines.diarization import Diarizer

    audio, rate = sf.read(Path(__file__).parent / "data" / "diarization" / "two_speakers.wav", dtype="float32")
    settings: dict[str, Any] = {"mode": "tier", "model_warmup_runs": 0, "cache_dir": str(tmp_path)}
    declared = UniversalOptimizer(Diarizer(), **settings)
    declared_components = Diarizer().uniopt_components()
    overrides = {c.name: {"metric": c.metric, "kind": c.kind, "exporter": c.exporter} for c in declared_components}
    sampled = UniversalOptimizer(
        Diarizer(),
        sample=[lambda d: d.diarize(audio[: 8 * rate], rate), lambda d: d.diarize(audio[: 12 * rate], rate)],
        overrides=overrides,
        **settings,
    )
    chosen = {c.component: c.chosen for c in declared.report().components}
    assert {c.component: c.chosen for c in sampled.report().components} == chosen
    assert {c.found_by for c in sampled.report().components} == {"diarize() (2 calls in the samples)"}
    assert sampled.diarize(audio, rate) == declared.diarize(audio, rate)
    info = sampled.get_performance_info()["components"]
    assert all(info[name]["eager_calls"] == 0 for name in info) and set(info) == {
        n for n, c in chosen.items() if c != "eager"
    }


def test_the_tts_engine_found_by_sample_ends_with_its_declared_choices(tmp_path: Any) -> None:
    from uniopt.engines.tts import FishSpeechConfig, FishSpeechEngine

    # The ONNX Runtime steps' exports take ~25 s each here (tests/engines/test_onnxruntime_decode.py);
    # the OpenVINO steps stand for the decoder's step candidates here.
    settings: dict[str, Any] = {
        "mode": "tier",
        "model_warmup_runs": 0,
        "cache_dir": str(tmp_path),
        "deny": ("onnxruntime-steps-int8",),
    }
    declared = UniversalOptimizer(FishSpeechEngine(FishSpeechConfig.tiny()), **settings)
    engine = FishSpeechEngine(FishSpeechConfig.tiny())
    # A decode loop is judged replayed; its reference replays in the same decode.
    fields = ("metric", "kind", "exporter", "teacher_forcing", "free_run_with_scores", "decode_steps")
    overrides = {c.name: {f: getattr(c, f) for f in fields} for c in engine.uniopt_components()}
    sampled = UniversalOptimizer(
        engine,
        sample=[lambda e: e.synthesize("hello there"), lambda e: e.synthesize("a longer line", max_new_tokens=12)],
        overrides=overrides,
        **settings,
    )
    chosen = {c.component: c.chosen for c in declared.report().components}
    assert {c.component: c.chosen for c in sampled.report().components} == chosen
    assert chosen["decoder"] != "eager"
    assert {c.found_by for c in sampled.report().components} == {
        "synthesize() (3 calls in the samples)",  # 12 frames: two decoder calls of 8
        "synthesize() (2 calls in the samples)",
    }
    audio, _, _ = sampled.synthesize("another line", temperature=0.7, seed=3)
    expected, _, _ = declared.synthesize("another line", temperature=0.7, seed=3)
    assert np.array_equal(audio, expected)
    info = sampled.get_performance_info()["components"]
    assert all(info[name]["eager_calls"] == 0 for name in info) and set(info) == {"decoder", "codec"}
