"""Decode steps with explicit caches, and the stateful OpenVINO candidates built on them.

Everything runs on :meth:`FishSpeechConfig.tiny` and on a tiny ``fish_speech`` ``DualARTransformer``.
"""

from __future__ import annotations

import dataclasses
import platform
from collections import Counter
from pathlib import Path

import pytest
import torch

from tiny_engines import TorchSteps, build_context, tiny_fish_decoder
from uniopt import UniversalOptimizer
from uniopt.cache import ArtifactCache
from uniopt.engines.tts import FishSpeechConfig, FishSpeechEngine
from uniopt.engines.tts.generation import decode_steps
from uniopt.errors import InputError, OptimizationError
from uniopt.optimizer.component import Component
from uniopt.optimizer.guard import metric_value
from uniopt.optimizer.steps import StepOrderError
from uniopt.plugins import BuildContext, BuildFailure, Stage, candidates, plugin_manager
from uniopt.plugins.model_cache import model_cache
from uniopt.plugins.openvino_decode import StatefulStep
from uniopt.tiers import host_profile

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def engine() -> FishSpeechEngine:
    return FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=6), seed=3)


@pytest.fixture(scope="module")
def long_engine() -> FishSpeechEngine:
    """72 decode steps a call: the caches are checked over more than 64 steps."""
    return FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=72), seed=3)


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the tests that build stages directly: each step model is converted once."""
    return tmp_path_factory.mktemp("stateful-cache")


def _context(cache: Path, **settings: object) -> tuple[BuildContext, dict]:
    context = build_context(cache, **settings)
    pm = plugin_manager(context.settings.plugins)
    return context, {"pm": pm, "candidates": candidates(pm)}


def _build(name: str, component: Component, context: BuildContext, plugins: dict) -> Stage:
    built = plugins["pm"].hook.uniopt_build_stage(
        candidate=plugins["candidates"][name], component=component, context=context
    )
    assert not isinstance(built, BuildFailure), built.reason
    return built


def _decoder(engine: FishSpeechEngine) -> Component:
    return engine.uniopt_components()[0]


def test_step_graphs_compute_what_the_model_computes(engine: FishSpeechEngine) -> None:
    steps = decode_steps(engine.decoder)
    loop = steps.install({g.name: TorchSteps(g) for g in steps.graphs})
    component = _decoder(engine)
    with torch.inference_mode():
        reference = engine.decoder(*component.example_inputs)
        assert torch.equal(loop(*component.example_inputs), reference)
        sampled = component.calibration_inputs[0]  # temperature 0.7: the sampling path
        assert torch.equal(loop(*sampled), engine.decoder(*sampled))
        forced = component.teacher_forcing(component.example_inputs, reference)
        for ours, theirs in zip(loop(*forced), engine.decoder(*forced), strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("allow_eos", [False, True])
def test_the_slow_step_computes_only_the_logits_the_loop_reads(allow_eos: bool) -> None:
    config = dataclasses.replace(FishSpeechConfig.tiny(decode_steps=6), allow_eos=allow_eos)
    engine = FishSpeechEngine.from_config(config, seed=3)
    steps = decode_steps(engine.decoder)
    loop = steps.install({g.name: TorchSteps(g) for g in steps.graphs})
    allowed, vocab = engine.decoder.allowed_ids, engine.model.config.vocab_size
    tokens = torch.randint(
        0, vocab, (1, engine.model.config.num_codebooks + 1, 3), generator=torch.Generator().manual_seed(0)
    )
    tokens[:, 1:] %= engine.model.config.codebook_size
    positions = torch.arange(3)
    with torch.inference_mode():
        graph_logits = steps.graph("slow").module(tokens, positions, *steps.graph("slow").empty_caches())[0]
        engine.model.reset_caches()
        eager_logits, eager_hidden = engine.model.forward_generate(tokens, positions, attend=3)
        step_logits, step_hidden = loop.model.forward_generate(tokens, positions)
    assert graph_logits.shape[-1] == allowed.numel() < vocab
    torch.testing.assert_close(graph_logits, eager_logits[..., allowed])
    # The loop sees logits of the whole vocabulary: eager's at the ids it reads, -inf at the others.
    assert step_logits.shape == eager_logits.shape
    torch.testing.assert_close(step_logits[..., allowed], eager_logits[..., allowed])
    others = torch.ones(vocab, dtype=torch.bool)
    others[allowed] = False
    assert torch.isneginf(step_logits[..., others]).all()
    torch.testing.assert_close(step_hidden, eager_hidden)
    # The whole decode loop on these steps still gives eager's frames, greedy and sampled.
    component = _decoder(engine)
    with torch.inference_mode():
        for inputs in (component.example_inputs, component.calibration_inputs[0]):
            assert torch.equal(loop(*inputs), engine.decoder(*inputs))


def test_logit_rows_come_with_the_vocabulary_they_widen_to(engine: FishSpeechEngine) -> None:
    parts = decode_steps(engine.decoder).graph("slow").module.parts
    assert parts.logit_rows is not None and parts.vocab_size == engine.model.config.vocab_size
    with pytest.raises(ValueError, match="together"):
        dataclasses.replace(parts, vocab_size=None)
    with pytest.raises(ValueError, match="together"):
        dataclasses.replace(parts, logit_rows=None)


def test_stateful_f32_keeps_its_caches_right_over_72_steps(long_engine: FishSpeechEngine, built_cache: Path) -> None:
    component = _decoder(long_engine)
    context, plugins = _context(built_cache)
    stage = _build("openvino-stateful-f32", component, context, plugins)
    with torch.inference_mode():
        reference = long_engine.decoder(*component.example_inputs)
        forced = component.teacher_forcing(component.example_inputs, reference)
        expected, got = long_engine.decoder(*forced), stage(*forced)
        for ours, theirs in zip(got, expected, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        assert torch.equal(stage(*component.example_inputs), reference)
        # A second call starts a new sequence: the states are reset at position 0, not carried over.
        assert torch.equal(stage(*component.example_inputs), reference)
        sampled = component.calibration_inputs[0]
        assert metric_value("token_agreement", long_engine.decoder(*sampled).float(), stage(*sampled).float()) > 0.95
    assert stage.info["precision_hint"] == "fp32" and stage.info["weights"] == "float"
    # The compiled slow step computes the logits of the ids the loop reads only.
    logits = stage.run._compiled["slow"].outputs[0].get_partial_shape()
    assert logits[-1].get_length() == long_engine.decoder.allowed_ids.numel()
    # Each layer's attention runs fused with its cache (no concat, matmul or softmax of its own), and
    # its queries' and keys' rotations as one RoPE op each.
    runtime = stage.run._compiled["slow"].get_runtime_model()
    layers = Counter(op.get_rt_info()["layerType"].astype(str) for op in runtime.get_ops())
    if platform.machine() in ("x86_64", "AMD64"):
        assert layers["ScaledDotProductAttention"] == long_engine.model.config.n_layer, layers
        assert layers["Softmax"] == 0 and layers["MatMul"] == 0, layers
        assert layers["RoPE"] == 2 * long_engine.model.config.n_layer, layers


def test_a_step_that_does_not_continue_the_sequence_is_refused(engine: FishSpeechEngine, built_cache: Path) -> None:
    import openvino as ov

    component = _decoder(engine)
    context, plugins = _context(built_cache)
    _build("openvino-stateful-f32", component, context, plugins)
    graph = component.decode_steps.graph("fast")
    entries = context.cache.entries()
    entry = next(e for e in entries if e.kind == "openvino-stateful" and e.description["graph"] == "fast")
    runner = StatefulStep(ov.Core().compile_model(str(entry.path / "model.xml"), "CPU"), graph)
    x = torch.randn(1, 1, graph.input_shapes[0][-1])
    runner(x, torch.tensor([0]))
    runner(x, torch.tensor([1]))
    with pytest.raises(StepOrderError, match="position 3 does not continue the 2 decoded"):
        runner(x, torch.tensor([3]))
    for position in range(2, graph.max_positions):
        runner(x, torch.tensor([position]))
    with pytest.raises(StepOrderError, match="past the caches' end"):
        runner(x, torch.tensor([graph.max_positions]))
    (logits,) = runner(x, torch.tensor([0]))  # position 0 always starts over
    assert logits.shape == (1, 1, engine.config.model.codebook_size)


class _Failing:
    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise RuntimeError("Exception from src/plugins/intel_cpu: injected")


def test_a_failing_step_runs_the_call_eager_counted_or_raises(engine: FishSpeechEngine, built_cache: Path) -> None:
    component = _decoder(engine)
    context, plugins = _context(built_cache)
    stage = _build("openvino-stateful-f32", component, context, plugins)
    decode = stage.run
    decode._loop.model._fast = _Failing()
    with torch.inference_mode():
        reference = engine.decoder(*component.example_inputs)
        assert torch.equal(stage(*component.example_inputs), reference)
        assert decode.fallbacks.calls == 1 and "injected" in decode.fallbacks.last_reason
        with decode.strict(), pytest.raises(OptimizationError, match="backend error"):
            stage(*component.example_inputs)
        # The engine's own input checks reach the caller as they do from eager.
        with pytest.raises(InputError, match="prompt must be a long tensor"):
            stage(component.example_inputs[0].float(), *component.example_inputs[1:])
    strict_context, _ = _context(built_cache, fallback_on_optimization_error=False)
    model_cache.clear()
    no_fallback = _build("openvino-stateful-f32", component, strict_context, plugins).run
    no_fallback._loop.model._fast = _Failing()
    with torch.inference_mode(), pytest.raises(OptimizationError, match="at run time"):
        no_fallback(*component.example_inputs)


def test_int8_and_int4_weights_pass_the_guard_and_warm_start_converts_nothing(tmp_path: Path) -> None:
    engine = FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=8), seed=1)
    allow = ["openvino-stateful-int8", "openvino-stateful-int4"]
    # min_speedup: which one is chosen is timing; that one of them is, once they pass, is not.
    cold = UniversalOptimizer(engine, allow=allow, cache_dir=str(tmp_path), model_warmup_runs=0, min_speedup=0.01)
    report = cold.report().component("decoder")
    for name in allow:
        result = report.candidate(name)
        assert result.accepted, result.reason
        assert result.metric == "token_agreement" and result.metric_value >= 0.9
    assert report.chosen in allow
    steps = [s["step"] for s in report.candidate("openvino-stateful-int8").memory_steps]
    assert steps.count("openvino-convert-step") == 2 and steps.count("nncf-weights") == 2
    model_cache.clear()  # a new process: nothing built in memory
    warm_engine = FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=8), seed=1)
    warm = UniversalOptimizer(warm_engine, allow=allow, cache_dir=str(tmp_path), model_warmup_runs=0, min_speedup=0.01)
    warm_report = warm.report().component("decoder")
    assert warm_report.decision_from_cache and warm_report.chosen == report.chosen
    assert warm_report.stage.info["from_cache"]  # both step models compiled from their cached IRs
    with torch.inference_mode():
        audio, _, _ = warm.synthesize("hello", max_new_tokens=12)
    assert audio.shape[0] == 12 * engine.config.codec.hop_length
    assert warm.get_performance_info()["components"]["decoder"]["eager_calls"] == 0


def test_two_engines_with_equal_weights_keep_their_own_states(tmp_path: Path) -> None:
    engines = [FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=4), seed=2) for _ in range(2)]
    wrapped = [
        UniversalOptimizer(e, allow=["openvino-stateful-f32"], cache_dir=str(tmp_path), min_speedup=0.01)
        for e in engines
    ]
    assert [w.report().component("decoder").chosen for w in wrapped] == ["openvino-stateful-f32"] * 2
    runs = [w._installations["decoder"]._run for w in wrapped]
    assert runs[0] is not runs[1]
    slow = [r._loop.model._slow for r in runs]
    assert slow[0] is not slow[1] and slow[0]._request is not slow[1]._request
    prompt = engines[0].example_prompt()
    params = (torch.tensor(0.0), torch.tensor(0.8), torch.tensor(1.2), torch.tensor(0))
    with torch.inference_mode():
        expected = engines[0].decoder.__class__.forward(engines[0].decoder, prompt, *params)
        assert torch.equal(engines[0].decoder(prompt, *params), expected)
        assert torch.equal(engines[1].decoder(prompt, *params), expected)
    # Wrapping an engine again takes over from the first installation; the loop never calls itself.
    again = UniversalOptimizer(engines[0], allow=["openvino-stateful-f32"], cache_dir=str(tmp_path), min_speedup=0.01)
    with torch.inference_mode():
        assert torch.equal(engines[0].decoder(prompt, *params), expected)
    assert again.get_performance_info()["components"]["decoder"]["eager_calls"] == 0


# -- the fish_speech package ------------------------------------------------------------------------------------
def test_the_real_dual_ar_transformer_decodes_on_stateful_steps(built_cache: Path) -> None:
    adapter, decoder, prompt = tiny_fish_decoder()
    assert decoder.decode_steps is not None
    steps = decoder.decode_steps
    with torch.inference_mode():
        reference = adapter.decoder(prompt)
        loop = steps.install({g.name: TorchSteps(g) for g in steps.graphs})
        assert torch.equal(loop(prompt), reference)
    context, plugins = _context(built_cache)
    stage = _build("openvino-stateful-f32", decoder, context, plugins)
    with torch.inference_mode():
        forced = decoder.teacher_forcing((prompt,), reference)
        for ours, theirs in zip(stage(*forced), adapter.decoder(*forced), strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        assert torch.equal(stage(prompt), reference)


FRAME = "openvino-stateful-frame-int8"


def test_a_bundle_holds_the_step_models_and_a_tier_start_converts_nothing(tmp_path: Path) -> None:
    from tiny_engines import TtsDecoderOnly
    from uniopt.prepare import prepare_bundle

    rows = prepare_bundle(["tiny_engines:TtsDecoderOnly"], host_profile(), tmp_path / "bundle")
    decoder = {r.candidate: r for r in rows if r.component == "decoder"}
    for name in (
        "openvino-stateful-f32",
        "openvino-stateful-int8",
        "openvino-stateful-int4",
        FRAME,
        "onnxruntime-steps-int8",
    ):
        assert decoder[name].status == "built" and decoder[name].entries, decoder[name]
    frame_kinds = {e.kind for e in ArtifactCache(tmp_path / "bundle").entries()}
    assert {"openvino-frame", "openvino-frame-int8"} <= frame_kinds
    assert decoder["onnxruntime-fp32"].status == "skipped" and "not applicable" in decoder["onnxruntime-fp32"].reason
    model_cache.clear()
    wrapped = UniversalOptimizer(
        TtsDecoderOnly(),
        mode="tier",
        tier="cpu-avx512",
        cache_dir=str(tmp_path / "cache"),
        cache_bundle=str(tmp_path / "bundle"),
    )
    report = wrapped.report().component("decoder")
    assert report.chosen == "onnxruntime-steps-int8", report.candidates  # the tier's first decoder candidate
    assert report.stage.info["from_cache"]
    built_here = {e.kind for e in ArtifactCache(tmp_path / "cache").entries()}
    assert not any(k.startswith(("openvino-stateful", "openvino-frame", "onnxruntime-step")) for k in built_here)
    model_cache.clear()
    framed = UniversalOptimizer(
        TtsDecoderOnly(),
        allow=[FRAME],
        min_speedup=0.01,
        model_warmup_runs=0,
        cache_dir=str(tmp_path / "framed"),
        cache_bundle=str(tmp_path / "bundle"),
    )
    result = framed.report().component("decoder").candidate(FRAME)
    assert result.accepted and result.from_cache, result.reason
    built_here = {e.kind for e in ArtifactCache(tmp_path / "framed").entries()}
    assert not any(k.startswith(("openvino-stateful", "openvino-frame")) for k in built_here), built_here


def test_the_step_graphs_feed_forward_is_the_models_own() -> None:
    from uniopt.engines.tts.layers import FeedForward
    from uniopt.engines.tts.steps import feed_forward

    torch.manual_seed(0)
    ff, x = FeedForward(8, 16), torch.randn(1, 3, 8)
    torch.testing.assert_close(feed_forward(ff, x), ff(x), atol=1e-6, rtol=1e-6)  # gate and up as one matmul
    ff.w1 = torch.nn.Linear(8, 16)  # with a bias: not stacked, the module runs as it is
    assert torch.equal(feed_forward(ff, x), ff(x))
