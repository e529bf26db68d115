"""ONNX Runtime decode steps with 8-bit MatMulNBits weights, on the tiny TTS engine and a tiny ``fish_speech`` model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from tiny_engines import build_context, tiny_fish_decoder
from uniopt import UniversalOptimizer
from uniopt.engines.tts import FishSpeechConfig, FishSpeechEngine
from uniopt.errors import NotApplicable
from uniopt.optimizer.steps import StepOrderError
from uniopt.plugins import BuildFailure, Stage, candidates, plugin_manager
from uniopt.plugins.model_cache import model_cache
from uniopt.plugins.onnxruntime_decode import NAME, CachedStep

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module: each graph is exported and quantized once."""
    return tmp_path_factory.mktemp("ort-steps")


@pytest.fixture(scope="module")
def long_engine() -> FishSpeechEngine:
    """72 decode steps a call: the caches are checked over more than 64 steps."""
    return FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=72), seed=3)


def _build(component: object, cache: Path, **settings: object) -> tuple[Stage, list[dict]]:
    context = build_context(cache, **settings)
    pm = plugin_manager(context.settings.plugins)
    built = pm.hook.uniopt_build_stage(candidate=candidates(pm)[NAME], component=component, context=context)
    assert not isinstance(built, BuildFailure), built.reason
    return built, context.memory_steps


def _graph(stage: Stage, graph: str) -> Any:
    """The ONNX graph (no weights) of the stage's ``graph`` model."""
    import onnx

    runner = stage.run._loop.model.frame_runner if graph == "frame" else stage.run._loop.model._slow
    return onnx.load(runner._session._model_path, load_external_data=False).graph


def _float_matmuls_by_constants(stage: Stage, graph: str) -> tuple[list[str], int]:
    """The float MatMul/Gemm nodes of ``graph``'s model that multiply by a constant, and its MatMulNBits count."""
    model = _graph(stage, graph)
    constants = {i.name for i in model.initializer}
    constants |= {out for node in model.node if node.op_type == "Constant" for out in node.output}
    float_ones = [
        n.name for n in model.node if n.op_type in ("MatMul", "Gemm") and any(i in constants for i in n.input)
    ]
    return float_ones, sum(n.op_type == "MatMulNBits" for n in model.node)


def test_the_steps_keep_their_caches_right_over_72_steps(long_engine: FishSpeechEngine, cache: Path) -> None:
    component = long_engine.uniopt_components()[0]
    stage, steps = _build(component, cache)
    ran = [s["step"] for s in steps]
    assert ran.count("onnxruntime-step-export") == 1 and ran.count("onnxruntime-frame-export") == 1, ran
    with torch.inference_mode():
        reference = long_engine.decoder(*component.example_inputs)
        forced = component.teacher_forcing(component.example_inputs, reference)
        expected, got = long_engine.decoder(*forced), stage(*forced)
        # 8-bit weights and activations: close, not equal; a cache off by one step is off by far more.
        for ours, theirs in zip(got, expected, strict=True):
            torch.testing.assert_close(ours, theirs, atol=0.05, rtol=0.05)
        again = stage(*forced)  # a second call starts a new sequence at position 0
        for first, second in zip(got, again, strict=True):
            assert torch.equal(first, second)
    assert stage.run.fallbacks.calls == 0
    assert stage.info["weights"] == "int8" and not stage.info["from_cache"]


def test_every_matmul_by_a_weight_runs_on_8_bit_weights(long_engine: FishSpeechEngine, cache: Path) -> None:
    component = long_engine.uniopt_components()[0]
    stage, _ = _build(component, cache)
    layers = long_engine.model.config.n_layer
    for graph, least in (("slow", 4 * layers), ("frame", 1)):
        float_ones, quantized = _float_matmuls_by_constants(stage, graph)
        # The weights the graphs compute (rows reordered, projections fused) were folded first.
        assert not float_ones, (graph, float_ones)
        assert quantized >= least, (graph, quantized)


def test_each_layers_attention_is_one_node_with_the_caches_in_and_out(
    long_engine: FishSpeechEngine, cache: Path
) -> None:
    """ONNX Runtime's GroupQueryAttention (RoPE, grouping and caches inside) and a skip-RMSNorm per residual add."""
    component = long_engine.uniopt_components()[0]
    stage, _ = _build(component, cache)
    layers, fast_layers = long_engine.model.config.n_layer, long_engine.model.config.n_fast_layer
    codebooks = long_engine.model.config.num_codebooks
    slow = _graph(stage, "slow")
    kinds = [n.op_type for n in slow.node]
    attention = [n for n in slow.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == layers and all(n.domain == "com.microsoft" for n in attention)
    fed = [(n.input[3], n.input[4]) for n in attention]  # each fed its layer's past caches
    assert fed == [(f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(layers)]
    assert all(len(n.output) == 3 for n in attention)
    assert kinds.count("SkipSimplifiedLayerNormalization") == 2 * layers - 1
    assert not {"Transpose", "Expand", "RotaryEmbedding", "Attention", "Softmax"} & set(kinds), kinds
    frame = _graph(stage, "frame")
    attention = [n for n in frame.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == fast_layers * codebooks and all(len(n.output) == 3 for n in attention)


def test_head_sizes_its_attention_cannot_take_are_refused_with_the_reason(tmp_path: Path) -> None:
    """ONNX Runtime's CPU GroupQueryAttention takes head sizes that are multiples of 16: a recorded refusal."""
    config = FishSpeechConfig.tiny()
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, fast_head_dim=8))
    component = FishSpeechEngine.from_config(config, seed=3).uniopt_components()[0]
    context = build_context(tmp_path)
    pm = plugin_manager(context.settings.plugins)
    built = pm.hook.uniopt_build_stage(candidate=candidates(pm)[NAME], component=component, context=context)
    assert isinstance(built, BuildFailure) and isinstance(built.error, NotApplicable)
    assert "multiples of 16" in built.reason and "are 8" in built.reason


def test_a_step_that_does_not_continue_the_sequence_is_refused(long_engine: FishSpeechEngine, cache: Path) -> None:
    component = long_engine.uniopt_components()[0]
    stage, _ = _build(component, cache)
    slow: CachedStep = stage.run._loop.model._slow
    graph = component.decode_steps.graph("slow")
    tokens = torch.zeros(1, graph.example_inputs[0].shape[1], 1, dtype=torch.long)
    slow(tokens, torch.tensor([0]))
    slow(tokens, torch.tensor([1]))
    with pytest.raises(StepOrderError, match="position 3 does not continue the 2 decoded"):
        slow(tokens, torch.tensor([3]))
    logits, _ = slow(tokens, torch.tensor([0]))  # position 0 always starts over
    assert logits.shape[:2] == (1, 1)


def test_auto_mode_guards_it_and_a_warm_start_exports_nothing(cache: Path) -> None:
    engine = FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=72), seed=3)  # long_engine's weights
    # The module's cache: the models exported above serve the search; its decision is this test's own.
    options = {"allow": [NAME], "cache_dir": str(cache), "model_warmup_runs": 0, "min_speedup": 0.01}
    cold = UniversalOptimizer(engine, **options).report().component("decoder")
    result = cold.candidate(NAME)
    assert result.accepted, result.reason
    assert result.metric == "token_agreement" and result.metric_value >= 0.9
    model_cache.clear()  # a new process: nothing built in memory
    warm_engine = FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=72), seed=3)
    warm = UniversalOptimizer(warm_engine, **options)
    report = warm.report().component("decoder")
    assert report.decision_from_cache and report.chosen == cold.chosen
    if report.chosen == NAME:  # chosen when it beat eager's time; tiny models are timing noise
        assert report.stage.info["from_cache"]  # both models loaded from their cache entries
        with torch.inference_mode():
            audio, _, _ = warm.synthesize("hello", max_new_tokens=12)
        assert audio.shape[0] == 12 * engine.config.codec.hop_length
        assert warm.get_performance_info()["components"]["decoder"]["eager_calls"] == 0


def test_the_real_dual_ar_transformer_decodes_on_onnxruntime_steps(tmp_path: Path) -> None:
    adapter, decoder, prompt = tiny_fish_decoder()
    stage, _ = _build(decoder, tmp_path)
    with torch.inference_mode():
        reference = adapter.decoder(prompt)
        forced = decoder.teacher_forcing((prompt,), reference)
        for ours, theirs in zip(stage(*forced), adapter.decoder(*forced), strict=True):
            torch.testing.assert_close(ours, theirs, atol=0.05, rtol=0.05)
    assert stage.run.fallbacks.calls == 0
