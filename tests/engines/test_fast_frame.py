"""The fast decoder's codebook loop of a frame as one module (:class:`FastFrame`), against eager."""

from __future__ import annotations

import types
import warnings
from pathlib import Path

import pytest
import torch

from tiny_engines import TorchSteps, build_context, tiny_fish_decoder
from uniopt import UniversalOptimizer
from uniopt.cache import ArtifactCache
from uniopt.engines.tts import FishSpeechAdapter, FishSpeechConfig, FishSpeechEngine
from uniopt.engines.tts.frame import FastFrame, frame_inputs
from uniopt.engines.tts.generation import decode_steps
from uniopt.plugins.export import tracer_warnings
from uniopt.plugins.memory_costs import STEP_BLOB_FIRST_CALL_FACTOR, STEP_FIRST_CALL_FACTORS
from uniopt.plugins.model_cache import model_cache


def _silence(indices: torch.Tensor, feature_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(indices.shape[0], 1, 512 * indices.shape[-1]), feature_lengths * 512


_NO_CODEC = types.SimpleNamespace(decoder_model=types.SimpleNamespace(decode=_silence))


@pytest.fixture(scope="module")
def long_engine() -> FishSpeechEngine:
    """72 decode steps a call: more than 64 frames through the frame module."""
    return FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=72), seed=3)


def _frame_loop(engine: FishSpeechEngine) -> object:
    steps = decode_steps(engine.decoder)
    frame = FastFrame(steps.graph("fast").module.parts, engine.model.config.codebook_size)
    runners = {g.name: TorchSteps(g) for g in steps.graphs}
    return steps.install({**runners, "frame": frame})


def test_frame_module_gives_eager_tokens_over_72_steps(long_engine: FishSpeechEngine) -> None:
    loop = _frame_loop(long_engine)
    component = long_engine.uniopt_components()[0]
    with torch.inference_mode():
        greedy = long_engine.decoder(*component.example_inputs)
        assert torch.equal(loop(*component.example_inputs), greedy)
        sampled = component.calibration_inputs[0]
        assert float(sampled[1]) > 0
        reference = long_engine.decoder(*sampled)
        assert not torch.equal(reference, greedy)  # the draw matters
        assert torch.equal(loop(*sampled), reference)


def test_frame_module_gives_eager_teacher_forced_logits(long_engine: FishSpeechEngine) -> None:
    loop = _frame_loop(long_engine)
    component = long_engine.uniopt_components()[0]
    with torch.inference_mode():
        frames = long_engine.decoder(*component.example_inputs)
        forced = component.teacher_forcing(component.example_inputs, frames)
        for ours, theirs in zip(loop(*forced), long_engine.decoder(*forced), strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_forced_codes_are_fed_on_and_returned(long_engine: FishSpeechEngine) -> None:
    steps = decode_steps(long_engine.decoder)
    limit = long_engine.model.config.codebook_size
    frame = FastFrame(steps.graph("fast").module.parts, limit)
    inputs = list(frame_inputs(frame.parts, limit, 16))
    inputs[0] = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        free, free_logits = frame(*inputs)
        forced = (free + 1) % limit
        inputs[7], inputs[8] = forced, torch.tensor(True)
        codes, logits = frame(*inputs)
    assert torch.equal(codes, forced)
    assert torch.equal(logits[0], free_logits[0])  # the first code's logits come before any forced code
    assert not torch.allclose(logits[1:], free_logits[1:])


def test_frame_module_in_openvino_gives_eager_tokens(long_engine: FishSpeechEngine) -> None:
    ov = pytest.importorskip("openvino")
    steps = decode_steps(long_engine.decoder)
    limit = long_engine.model.config.codebook_size
    frame = FastFrame(steps.graph("fast").module.parts, limit)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = ov.convert_model(frame, example_input=frame_inputs(frame.parts, limit, 16))
    assert not tracer_warnings(caught)  # nothing that changes between frames became a constant
    # The draws' Gumbel noise comes in computed; the attention groups query heads itself (no keys expanded).
    ops = {op.get_type_name() for op in model.get_ops()}
    assert "Log" not in ops and "Broadcast" not in ops, ops
    request = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()

    def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        request.infer([t.contiguous().numpy() for t in inputs])
        return tuple(torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(2))

    loop = steps.install({**{g.name: TorchSteps(g) for g in steps.graphs}, "frame": run})
    component = long_engine.uniopt_components()[0]
    with torch.inference_mode():
        for inputs in (component.example_inputs, component.calibration_inputs[0]):
            assert torch.equal(loop(*inputs), long_engine.decoder(*inputs))


class _Failing:
    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise RuntimeError("Exception from src/plugins/intel_cpu: injected")


def test_int8_frame_candidate_passes_the_guard_falls_back_counted_and_warm_starts(tmp_path: Path) -> None:
    pytest.importorskip("nncf")
    engine = FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=8), seed=1)
    component = engine.uniopt_components()[0]
    with torch.inference_mode():
        reference = engine.decoder(*component.example_inputs)
    allow = ["openvino-stateful-frame-int8"]
    options = {"allow": allow, "cache_dir": str(tmp_path), "model_warmup_runs": 0, "min_speedup": 0.01}
    cold = UniversalOptimizer(engine, **options)
    report = cold.report().component("decoder")
    result = report.candidate("openvino-stateful-frame-int8")
    assert result.accepted, result.reason
    assert result.metric == "token_agreement" and result.metric_value >= 0.9
    steps = [s["step"] for s in result.memory_steps]
    # The frame replaces the fast step graph: only the slow step and the frame are converted and compressed.
    assert steps.count("openvino-convert-step") == 1 and steps.count("openvino-convert-frame") == 1
    assert steps.count("nncf-weights") == 2
    entries = ArtifactCache(tmp_path).entries()
    assert {"openvino-frame", "openvino-frame-int8"} <= {e.kind for e in entries}
    assert {e.description.get("graph") for e in entries if e.kind.startswith("openvino-")} == {"slow", "frame"}
    # The first calls are checked for what the slow step's weights take when laid out again there.
    [slow] = [e for e in entries if e.kind == "openvino-stateful-int8"]
    weights = (slow.path / "model.bin").stat().st_size
    # Loaded from the race winner's blob, the slow step lays its weights out at its first calls, not at the compile.
    assert report.stage.info["compile_options"]["slow"]["loaded_blob"]
    first_call_bytes = int((STEP_FIRST_CALL_FACTORS["compressed"] + STEP_BLOB_FIRST_CALL_FACTOR) * weights)
    assert report.stage.info["first_call_bytes"] == first_call_bytes > 0
    [first_calls] = [s for s in result.memory_steps if s["step"] == "first-calls"]
    assert first_calls["base_bytes"] >= first_call_bytes
    decode = report.stage.run
    assert decode._loop.model.frame_runner is not None and decode._loop.model._fast is None
    with torch.inference_mode():
        assert decode(*component.example_inputs).shape == reference.shape
        decode._loop.model.frame_runner = _Failing()
        assert torch.equal(decode(*component.example_inputs), reference)  # the whole call ran eager
    assert decode.fallbacks.calls == 1 and "injected" in decode.fallbacks.last_reason
    model_cache.clear()
    warm = UniversalOptimizer(FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=8), seed=1), **options)
    warm_report = warm.report().component("decoder")
    assert warm_report.decision_from_cache and warm_report.stage.info["from_cache"]
    assert warm_report.stage.info["first_call_bytes"] == first_call_bytes  # loaded from the blob again


# -- the fish_speech package ------------------------------------------------------------------------------------
def test_the_real_dual_ar_transformer_runs_a_frame_in_one_call(tmp_path: Path) -> None:
    pytest.importorskip("nncf")
    adapter, decoder, prompt = tiny_fish_decoder()
    steps = decoder.decode_steps
    assert steps is not None and steps.frame is not None
    with torch.inference_mode():
        reference = adapter.decoder(prompt)
        loop = steps.install({**{g.name: TorchSteps(g) for g in steps.graphs}, "frame": steps.frame.module})
        assert torch.equal(loop(prompt), reference)
        forced = decoder.teacher_forcing((prompt,), reference)
        for ours, theirs in zip(loop(*forced), adapter.decoder(*forced), strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        assert decoder.free_run_with_scores is not None  # the reference's one decode: frames and scores
        frames, scores = decoder.free_run_with_scores(adapter.decoder, prompt)
        assert torch.equal(frames, reference)
        assert all(torch.equal(a, b) for a, b in zip(scores, adapter.decoder(*forced), strict=True))
    options = {"allow": ["openvino-stateful-frame-int8"], "model_warmup_runs": 0, "min_speedup": 0.01}
    adapter = FishSpeechAdapter(_NO_CODEC, adapter.decoder.model, decode_steps=8, prompt_length=5)
    with torch.inference_mode():
        reference = adapter.decoder(prompt)
    wrapped = UniversalOptimizer(adapter, cache_dir=str(tmp_path), **options)
    result = wrapped.report().component("decoder").candidate("openvino-stateful-frame-int8")
    assert result.accepted, result.reason
    decode = wrapped.report().component("decoder").stage.run
    assert decode._loop.model.frame_runner is not None
    with torch.inference_mode():
        tokens = adapter.generate_tokens(prompt)
    assert tokens.shape == reference.shape and decode.fallbacks.calls == 0
    assert float((tokens == reference).float().mean()) >= 0.9


def test_int4_frame_candidate_serves_a_frame_in_one_call_and_passes_the_guard(tmp_path: Path) -> None:
    pytest.importorskip("nncf")
    name = "openvino-stateful-frame-int4"
    engine = FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=8), seed=1)
    options = {"allow": [name], "cache_dir": str(tmp_path), "model_warmup_runs": 0, "min_speedup": 0.01}
    report = UniversalOptimizer(engine, **options).report().component("decoder")
    result = report.candidate(name)
    assert result.accepted, result.reason
    assert result.metric == "token_agreement" and result.metric_value >= 0.9
    decode = report.stage.run
    assert decode._loop.model.frame_runner is not None and decode._loop.model._fast is None
    assert report.stage.info["weights"] == "int4" and set(report.stage.info["compile_options"]) == {"slow", "frame"}


# -- the graphs' conversions side by side ---------------------------------------------------------------------------
def test_the_decode_graphs_convert_side_by_side_where_the_memory_left_holds_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from uniopt.plugins import openvino_decode
    from uniopt.plugins.side_by_side import build_side_by_side

    pytest.importorskip("openvino")
    engine = FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=4), seed=1)
    component = engine.uniopt_components()[0]
    graphs = [component.decode_steps.graph("slow"), component.decode_steps.frame]
    real_write = openvino_decode._write_plain

    def write_timed(graph: object, component: object, context: object, directory: Path) -> dict:
        started = time.monotonic()
        time.sleep(1.0)  # each child outlasts the start of the other
        extra = real_write(graph, component, context, directory)
        (directory / "span").write_text(f"{started} {time.monotonic()}")
        return extra

    monkeypatch.setattr(openvino_decode, "_write_plain", write_timed)
    context = build_context(tmp_path)
    converted = build_side_by_side(openvino_decode._conversions(graphs, component, context), context)
    assert set(converted) == {"slow", "frame"}
    spans = {name: [float(t) for t in (c.folder / "span").read_text().split()] for name, c in converted.items()}
    assert spans["slow"][0] < spans["frame"][1] and spans["frame"][0] < spans["slow"][1]  # they overlapped
    loaded: list[str] = []
    conversions = openvino_decode._conversions(graphs, component, context)
    for graph, conversion in zip(graphs, conversions, strict=True):  # the entries take the files; the folders go
        path, from_cache = openvino_decode._step_ir(
            graph, conversion, component, context, "float", loaded, converted[graph.name]
        )
        assert path.is_file() and path.with_suffix(".bin").is_file() and not from_cache
        assert not list(converted[graph.name].folder.iterdir())  # moved into the entry
    assert [s["step"] for s in context.memory_steps] == ["openvino-convert-step", "openvino-convert-frame"]
    # Cached now: nothing to convert.
    assert build_side_by_side(openvino_decode._conversions(graphs, component, context), context) == {}


def test_a_failed_conversion_leaves_no_scratch_folder_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from uniopt.plugins import BuildFailure, candidates, openvino_decode, plugin_manager

    pytest.importorskip("nncf")
    engine = FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=4), seed=1)
    component = engine.uniopt_components()[0]
    real_write = openvino_decode._write_plain

    def slow_fails(graph: object, component: object, context: object, directory: Path) -> dict:
        if getattr(graph, "name", "") == "slow":
            raise RuntimeError("injected conversion failure")
        return real_write(graph, component, context, directory)

    monkeypatch.setattr(openvino_decode, "_write_plain", slow_fails)
    context = build_context(tmp_path)
    pm = plugin_manager(context.settings.plugins)
    model_cache.clear()
    candidate = candidates(pm)["openvino-stateful-frame-int8"]
    built = pm.hook.uniopt_build_stage(candidate=candidate, component=component, context=context)
    assert isinstance(built, BuildFailure) and "injected conversion failure" in built.reason
    assert not [p for p in (tmp_path / "tmp").iterdir() if "build-" in p.name]  # the frame's went too


def test_the_decode_graphs_convert_one_after_the_other_without_room_for_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from uniopt import memory
    from uniopt.plugins import openvino_decode
    from uniopt.plugins.side_by_side import build_side_by_side

    engine = FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=4), seed=1)
    component = engine.uniopt_components()[0]
    graphs = [component.decode_steps.graph("slow"), component.decode_steps.frame]
    tight = memory.MemoryHeadroom(available_bytes=1, limit_bytes=None, used_bytes=None)
    monkeypatch.setattr(memory, "memory_headroom", lambda: tight)
    context = build_context(tmp_path)
    assert build_side_by_side(openvino_decode._conversions(graphs, component, context), context) == {}
