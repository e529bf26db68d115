"""The fallback policy: candidates that do not apply, reference failures, the forms of example inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import Wav2Vec2Config

from uniopt import Component, Settings, UniversalOptimizer
from uniopt.cache import ArtifactCache
from uniopt.engines.phoneme import PhonemeExtractor
from uniopt.engines.tts import FishSpeechConfig, FishSpeechEngine
from uniopt.errors import InputError
from uniopt.plugins import BuildContext, BuildFailure, candidates, plugin_manager
from uniopt.plugins.model_cache import model_cache
from uniopt.plugins.torch_native import _build_bf16
from uniopt.settings import resolve_settings
from uniopt.threads import thread_budget
from uniopt.tiers import host_profile

TINY_WAV2VEC2 = {
    "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
    "conv_dim": (32, 32, 32), "conv_kernel": (10, 3, 3), "conv_stride": (5, 4, 4),
    "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2,
}  # fmt: skip
STRICT: dict[str, Any] = {
    "mode": "auto",
    "tier": "cpu-avx512",
    "model_warmup_runs": 1,
    "reuse_decisions": False,
    "fallback_on_optimization_error": False,
}


@pytest.fixture(autouse=True)
def _fresh_model_cache() -> Any:
    model_cache.clear()
    yield
    model_cache.clear()


def _not_applicable(opt: UniversalOptimizer, component: str, candidate: str) -> str:
    result = opt.report().component(component).candidate(candidate)
    assert not result.accepted
    assert result.reason.startswith("not applicable: "), result.reason  # not reported as a failed build
    return result.reason


def test_strict_auto_mode_on_the_phoneme_engine_records_what_does_not_apply(tmp_path: Path) -> None:
    engine = PhonemeExtractor.from_config(Wav2Vec2Config(**TINY_WAV2VEC2), settings=Settings(), chunk_seconds=2.0)
    opt = UniversalOptimizer(engine, cache_dir=str(tmp_path), allow=("eager", "torch-int8-rnn"), **STRICT)
    assert "not applicable: no LSTM/GRU" in _not_applicable(opt, "model", "torch-int8-rnn")


def test_what_does_not_apply_to_the_tts_components_is_recorded_even_without_fallback(tmp_path: Path) -> None:
    engine = FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=4), seed=0)
    profile = host_profile()
    settings, choice = resolve_settings({"cache_dir": str(tmp_path), "fallback_on_optimization_error": False}, profile)
    context = BuildContext(settings, profile, choice.tier, thread_budget(1), cache=ArtifactCache(tmp_path))
    pm = plugin_manager(settings.plugins)
    components = {c.name: c for c in engine.uniopt_components()}
    expected = [
        ("decoder", "onnxruntime-fp32", "not applicable: component 'decoder' declares that it does not export"),
        ("decoder", "openvino-f32", "not applicable: component 'decoder'"),
        ("decoder", "torch-int8-rnn", "not applicable: no LSTM/GRU"),
        ("codec", "torch-int8-rnn", "not applicable: no Linear/LSTM/GRU layer"),
    ]
    for component, candidate, reason in expected:
        built = pm.hook.uniopt_build_stage(
            candidate=candidates(pm)[candidate], component=components[component], context=context
        )
        assert isinstance(built, BuildFailure) and built.reason.startswith(reason), (component, candidate, built)


@pytest.mark.parametrize("form", ["list", "tensor", "tuple"])
def test_example_inputs_may_be_a_list_a_tensor_or_a_tuple(tmp_path: Path, form: str) -> None:
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval(), torch.randn(4, 16)
    example = {"list": [x], "tensor": x, "tuple": (x,)}[form]
    opt = UniversalOptimizer(model, example, mode="tier", tier="cpu-avx512", cache_dir=str(tmp_path))
    result = opt.report().component("module").candidates[0]
    assert result.accepted or result.reason.startswith("guard:"), result
    with torch.inference_mode():
        torch.testing.assert_close(opt(x), model(x), atol=0.1, rtol=0.1)


def test_a_reference_that_raises_is_an_input_error_naming_the_component_and_inputs(tmp_path: Path) -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(16, 8)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.proj(x) + y

    with pytest.raises(InputError, match=r"component 'module'.*\(4, 16\) torch.float32"):
        UniversalOptimizer(
            TwoInputs().eval(), [torch.randn(4, 16)], mode="tier", tier="cpu-avx512", cache_dir=str(tmp_path)
        )


def test_bf16_leaves_zero_dimensional_controls_in_fp32() -> None:
    class Sampler(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.proj(x), temperature.float() * 1.0

    example = (torch.randn(2, 4), torch.tensor(0.8))
    stage = _build_bf16(Component("m", Sampler().eval(), example), None)  # type: ignore[arg-type]
    scores, temperature = stage(*example)
    assert scores.dtype == torch.float32 and torch.equal(temperature, torch.tensor(0.8))
