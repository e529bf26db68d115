"""The fallback policy: candidates that do not apply, reference failures, the forms of example inputs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import Wav2Vec2Config

from uniopt import Component, Metric, Settings, UniversalOptimizer
from uniopt.cache import ArtifactCache
from uniopt.engines.phoneme import PhonemeExtractor
from uniopt.engines.tts import FishSpeechConfig, FishSpeechEngine
from uniopt.errors import InputError, OptimizationError
from uniopt.optimizer.install import Installation, twin
from uniopt.plugins import BuildContext, BuildFailure, Stage, candidates, plugin_manager
from uniopt.plugins.fallback import ModuleFallback
from uniopt.plugins.model_cache import model_cache
from uniopt.plugins.torch_native import DynamicInt8Linear, _Bf16, _build_bf16
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


# -- run time: torch module stages -------------------------------------------------------------------
class Decoder:
    """An engine with one small decoder component, which the low-resource tier gives torch-int8."""

    def __init__(self) -> None:
        torch.manual_seed(5)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()

    def uniopt_components(self) -> list[Component]:
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(6))
        return [Component("net", self.net, (x,), kind="decoder", metric=Metric("cosine", 0.99))]


MODULE_TIER: dict[str, Any] = {"mode": "tier", "tier": "low-resource", "model_warmup_runs": 0, "threads": 1}


def _module_stage(tmp_path: Path, stage: str, **settings: Any) -> tuple[Decoder, UniversalOptimizer]:
    """A :class:`Decoder` wrapped so that its component runs ``stage`` (torch-int8 or torch-bf16)."""
    if stage == "torch-bf16" and not host_profile().cpu.computes_bf16:
        pytest.skip("this CPU has no bf16 instructions")
    deny = ("torch-int8",) if stage == "torch-bf16" else ()
    engine = Decoder()
    fast = UniversalOptimizer(engine, cache_dir=str(tmp_path), deny=deny, **MODULE_TIER, **settings)
    assert fast.report().component("net").chosen == stage, fast.report().component("net").candidates
    return engine, fast


def _eager(engine: Decoder, x: torch.Tensor) -> torch.Tensor:
    """The component module's own forward, past the installed stage."""
    return nn.Sequential.forward(engine.net, x)


def _fallbacks(fast: UniversalOptimizer) -> tuple[int, str]:
    stats = fast.get_performance_info()["components"]["net"]
    return stats["fallback_calls"], stats["fallback_reason"]


def _running_eager(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "running eager" in r.getMessage()]


def test_a_call_the_int8_module_cannot_take_runs_eager_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine, fast = _module_stage(tmp_path, "torch-int8")
    vector, batch = torch.randn(16), torch.randn(3, 16)
    with torch.inference_mode():
        expected = _eager(engine, vector)
        caplog.set_level(logging.WARNING, logger="uniopt")
        # nn.Linear takes an unbatched vector; the quantized op wants two dimensions at least
        assert torch.equal(engine.net(vector), expected)
        assert torch.equal(engine.net(vector), expected)
        assert not torch.equal(engine.net(batch), _eager(engine, batch))  # int8 still
    calls, reason = _fallbacks(fast)
    assert calls == 2 and "RuntimeError" in reason and "dimension" in reason, reason
    (note,) = _running_eager(caplog)
    assert "torch-int8" in note and "net" in note


def test_a_call_no_module_takes_raises_the_eager_error_and_is_not_counted(tmp_path: Path) -> None:
    engine, fast = _module_stage(tmp_path, "torch-int8")
    with torch.inference_mode(), pytest.raises(RuntimeError, match="mat1 and mat2 must have the same dtype"):
        engine.net(torch.randn(2, 16, dtype=torch.float64))  # the caller's error, as eager raises it
    assert _fallbacks(fast)[0] == 0


def test_without_fallback_a_call_the_int8_module_cannot_take_is_an_optimization_error(tmp_path: Path) -> None:
    engine, fast = _module_stage(tmp_path, "torch-int8", fallback_on_optimization_error=False)
    with torch.inference_mode(), pytest.raises(OptimizationError, match="at run time: RuntimeError") as caught:
        engine.net(torch.randn(16))
    assert caught.value.candidate == "torch-int8" and caught.value.component == "net"
    assert isinstance(caught.value.__cause__, RuntimeError) and "dimension" in str(caught.value.__cause__)
    assert _fallbacks(fast)[0] == 0


@pytest.mark.parametrize("stage", ["torch-int8", "torch-bf16"])
def test_a_backend_error_in_a_module_stage_runs_eager(
    tmp_path: Path, stage: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine, fast = _module_stage(tmp_path, stage)
    layer: type[nn.Module] = DynamicInt8Linear if stage == "torch-int8" else _Bf16
    built = layer.forward

    def failing(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 7:
            raise RuntimeError("injected backend error")
        return built(self, x)

    monkeypatch.setattr(layer, "forward", failing)
    x = torch.randn(7, 16)
    caplog.set_level(logging.WARNING, logger="uniopt")
    with torch.inference_mode():
        expected = _eager(engine, x)
        assert torch.equal(engine.net(x), expected) and torch.equal(engine.net(x), expected)
    assert _fallbacks(fast) == (2, "RuntimeError: injected backend error")
    assert len(_running_eager(caplog)) == 1


def test_a_module_stage_that_fails_its_first_calls_is_rejected_not_run_eager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected backend error")

    monkeypatch.setattr(DynamicInt8Linear, "forward", failing)
    opt = UniversalOptimizer(Decoder(), cache_dir=str(tmp_path), **MODULE_TIER)
    report = opt.report().component("net")
    assert report.chosen != "torch-int8"  # the next candidate in the chain
    assert report.candidate("torch-int8").reason == "first call failed: RuntimeError: injected backend error"


def test_inside_strict_a_module_stage_call_that_raises_is_an_optimization_error() -> None:
    def failing(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("injected backend error")

    stage = ModuleFallback("net", failing, torch.neg, "torch-bf16", allowed=True)
    x = torch.ones(2)
    with stage.strict(), pytest.raises(OptimizationError, match="injected backend error") as caught:
        stage(x)
    assert isinstance(caught.value.__cause__, RuntimeError) and stage.fallbacks.calls == 0
    assert torch.equal(stage(x), -x) and stage.fallbacks.calls == 1


@pytest.mark.parametrize("fallback", [True, False])
def test_a_compiled_stage_whose_code_fails_on_a_new_shape_runs_eager(fallback: bool) -> None:
    def compiler(graph: Any, inputs: list[torch.Tensor]) -> Any:
        def run(*args: Any) -> Any:
            if any(isinstance(a, torch.Tensor) and a.shape[:1] == (7,) for a in args):
                raise RuntimeError("injected kernel error")
            return graph.forward(*args)

        return run

    torch.manual_seed(8)
    module = nn.Linear(16, 8).eval()
    source = twin(module)
    stage = Stage("torch-compile", torch.compile(source, backend=compiler, dynamic=False))
    installation = Installation("net", module, stage, source=source, input_count=1, fallback=fallback)
    try:
        with torch.inference_mode():
            x, y = torch.randn(4, 16), torch.randn(7, 16)
            assert torch.equal(module(x), nn.Linear.forward(module, x))  # compiled: takes it
            if fallback:
                assert torch.equal(module(y), nn.Linear.forward(module, y))
                assert installation.stats()["fallback_calls"] == 1
                assert "injected kernel error" in installation.stats()["fallback_reason"]
            else:
                with pytest.raises(OptimizationError, match="at run time") as caught:
                    module(y)
                assert "injected kernel error" in str(caught.value.__cause__)
    finally:
        installation.remove()
        torch._dynamo.reset()
