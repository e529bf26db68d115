"""Graph stages are validated at other sizes along dynamic axes, and fall back per call at run time.

The two traps: a length the legacy tracer bakes into a constant (``int(x.shape[1]) // 2``) gives
wrong values at every other length; a reshape to a baked size raises inside ONNX Runtime.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from uniopt import Component, UniversalOptimizer
from uniopt.cache import ArtifactCache
from uniopt.errors import OptimizationError
from uniopt.optimizer.shapes import resized, shape_variants, variant_sizes
from uniopt.plugins.export import check_dynamic_axes, graph_stage_runner
from uniopt.plugins.fallback import runtime_fallbacks
from uniopt.plugins.model_cache import model_cache

TIER = "cpu-avx512"
AXES = {"x": {1: "t"}, "y": {1: "t"}}


class HalfMean(nn.Module):
    """Subtracts the mean of the first half of the frames: the tracer bakes the half into a constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x[:, : int(x.shape[1]) // 2].mean(dim=1, keepdim=True)


class BakedReshape(nn.Module):
    """Reshapes to a size computed from the length: a constant in the legacy graph, an ORT error elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, int(x.shape[1]) // 4, 32).sum(-1)


class LengthBranch(nn.Module):
    """A branch on the length: neither exporter can keep it (legacy bakes it, dynamo refuses)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 64:
            return x * 2
        return x


class Engine:
    def __init__(self, module: nn.Module, x: torch.Tensor, **spec: Any) -> None:
        self.model = module.eval()
        self._x = x
        self._spec = {"input_names": ("x",), "output_names": ("y",), "dynamic_axes": AXES, "exporter": "legacy", **spec}

    def uniopt_components(self) -> list[Component]:
        return [Component("model", self.model, (self._x,), **self._spec)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@pytest.fixture(autouse=True)
def _fresh_model_cache() -> Any:
    model_cache.clear()
    yield
    model_cache.clear()


def example() -> torch.Tensor:
    return torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(0))


def tier_mode(engine: Any, cache: Path, candidate: str, **settings: Any) -> UniversalOptimizer:
    """Tier mode with only ``candidate`` before eager: the stage is installed whenever it passes."""
    allow = ("eager", candidate)
    return UniversalOptimizer(
        engine, mode="tier", tier=TIER, cache_dir=str(cache), allow=allow, model_warmup_runs=1, **settings
    )


def test_variant_sizes_and_resizing() -> None:
    assert variant_sizes(64) == [32, 128] and variant_sizes(1) == [2, 3] and variant_sizes(2) == [1, 4]
    codes = torch.arange(6).reshape(1, 1, 6)
    assert resized(codes, 2, 3).tolist() == [[[0, 1, 2]]]
    assert resized(codes, 2, 9).tolist() == [[[0, 1, 2, 3, 4, 5, 0, 1, 2]]]


def test_shape_variants_change_every_input_that_shares_an_axis() -> None:
    module = nn.Identity()
    x, mask = torch.randn(2, 10, 4), torch.ones(2, 10)
    component = Component(
        "m", module, (x, mask), input_names=("x", "mask"), dynamic_axes={"x": {1: "t"}, "mask": {1: "t"}}
    )
    shapes = [tuple(tuple(t.shape) for t in inputs) for inputs in shape_variants(component)]
    assert shapes == [((2, 5, 4), (2, 5)), ((2, 20, 4), (2, 20))]
    declared = Component("m", module, x, dynamic_axes={"input_0": {1: "t"}}, validation_inputs=[torch.randn(2, 7, 4)])
    assert [inputs[0].shape for inputs in shape_variants(declared)] == [(2, 7, 4)]


@pytest.mark.parametrize("candidate", ["onnxruntime-fp32", "openvino-f32"])
def test_a_length_baked_into_a_constant_is_not_installed(tmp_path: Path, candidate: str) -> None:
    engine = Engine(HalfMean(), example())
    opt = tier_mode(engine, tmp_path / "cache", candidate)
    chosen = opt.report().component("model")
    assert chosen.chosen == candidate, chosen.candidates
    assert chosen.stage.info["exporter"] == "dynamo"  # the legacy export was wrong at other lengths
    (export,) = [e for e in ArtifactCache(tmp_path / "cache").entries() if e.kind == "onnx-export"]
    (failure,) = export.extra["failed"]
    assert failure.startswith("legacy: ExportError") and "wrong at input shape" in failure, failure
    for length in (32, 64, 100):
        x = torch.randn(1, length, 8)
        with torch.inference_mode():
            torch.testing.assert_close(opt(x), engine(x), atol=1e-5, rtol=1e-5)
    assert runtime_fallbacks(chosen.stage).calls == 0


def test_a_reshape_baked_into_a_constant_is_rejected_or_exported_again(tmp_path: Path) -> None:
    engine = Engine(BakedReshape(), example())
    opt = tier_mode(engine, tmp_path / "cache", "onnxruntime-fp32")
    report = opt.report().component("model")
    assert report.chosen == "onnxruntime-fp32" and report.stage.info["exporter"] == "dynamo"
    for length in (16, 100):
        x = torch.randn(1, length, 8)
        with torch.inference_mode():
            torch.testing.assert_close(opt(x), engine(x), atol=1e-5, rtol=1e-5)
    assert runtime_fallbacks(report.stage).calls == 0


def test_a_graph_that_only_holds_at_the_example_length_is_rejected(tmp_path: Path) -> None:
    engine = Engine(LengthBranch(), example())
    opt = tier_mode(engine, tmp_path / "cache", "onnxruntime-fp32")
    report = opt.report().component("model")
    assert report.chosen == "eager"
    reason = report.candidate("onnxruntime-fp32").reason
    assert "legacy: ExportError" in reason and "dynamo:" in reason, reason


def test_the_guard_checks_graph_stages_at_the_declared_validation_sizes(tmp_path: Path) -> None:
    # The engine runs batches of 3, but only the length was declared dynamic: the graph cannot take it.
    engine = Engine(HalfMean(), example(), exporter="dynamo", validation_inputs=[torch.randn(3, 50, 8)])
    opt = tier_mode(engine, tmp_path / "cache", "onnxruntime-fp32")
    report = opt.report().component("model")
    assert report.chosen == "eager"
    reason = report.candidate("onnxruntime-fp32").reason
    assert "outside the exported graph" in reason and "(3, 50, 8)" in reason, reason
    fits = Engine(HalfMean(), example(), exporter="dynamo", validation_inputs=[torch.randn(1, 50, 8)])
    assert tier_mode(fits, tmp_path / "cache", "onnxruntime-fp32").report().component("model").chosen != "eager"


def _legacy_session(module: nn.Module, x: torch.Tensor, path: Path, **kwargs: Any) -> Any:
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=False, **kwargs)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_check_dynamic_axes_rejects_a_declared_axis_that_came_out_static(tmp_path: Path) -> None:
    component = Component("model", nn.Identity(), example(), input_names=("x",), dynamic_axes=AXES)
    _legacy_session(nn.Identity(), example(), tmp_path / "static.onnx")
    with pytest.raises(RuntimeError, match="axis 1 is declared dynamic but the exported graph fixes it to 64"):
        check_dynamic_axes(component, tmp_path / "static.onnx")
    _legacy_session(nn.Identity(), example(), tmp_path / "dynamic.onnx", dynamic_axes=AXES)
    check_dynamic_axes(component, tmp_path / "dynamic.onnx")


def _baked_runner(tmp_path: Path, **settings: Any) -> Any:
    """A real ONNX Runtime session of the baked reshape (as the legacy tracer writes it), as a stage."""
    module = BakedReshape().eval()
    session = _legacy_session(module, example(), tmp_path / "baked.onnx", dynamic_axes=AXES)
    component = Component("model", module, example(), input_names=("x",), dynamic_axes=AXES)

    def run_arrays(arrays: list[Any]) -> list[Any]:
        return session.run(None, {"x": arrays[0]})

    class Context:
        class settings:  # noqa: N801 - stands for Settings
            fallback_on_optimization_error = settings.get("fallback", True)

    return module, graph_stage_runner(component, run_arrays, Context(), "onnxruntime-fp32")  # type: ignore[arg-type]


def test_a_call_the_graph_cannot_take_runs_eager_is_counted_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module, runner = _baked_runner(tmp_path)
    caplog.set_level(logging.WARNING, logger="uniopt")
    with torch.inference_mode():
        torch.testing.assert_close(runner(example()), module(example()))
        for length in (16, 100):
            x = torch.randn(1, length, 8)
            assert torch.equal(runner(x), module(x))
        wrong_dtype = example().double()
        assert torch.equal(runner(wrong_dtype), module(wrong_dtype))
    assert runner.fallbacks.calls == 3 and "input" in runner.fallbacks.last_reason
    notes = [r.getMessage() for r in caplog.records if "running eager" in r.getMessage()]
    assert len(notes) == 1 and "backend error" in notes[0], notes
    assert runner.fallbacks.to_dict()["calls"] == 3


def test_without_fallback_a_backend_error_is_a_uniopt_error_with_its_cause(tmp_path: Path) -> None:
    _module, runner = _baked_runner(tmp_path, fallback=False)
    with pytest.raises(OptimizationError, match="at run time: backend error") as caught:
        runner(torch.randn(1, 16, 8))
    assert caught.value.candidate == "onnxruntime-fp32" and caught.value.__cause__ is not None
    assert "onnxruntime" in type(caught.value.__cause__).__module__.lower() or "Reshape" in str(caught.value.__cause__)


def test_inside_validation_a_call_the_graph_cannot_take_raises(tmp_path: Path) -> None:
    from uniopt.optimizer.guard import strict_calls
    from uniopt.plugins import Stage

    _module, runner = _baked_runner(tmp_path)
    stage = Stage("onnxruntime-fp32", runner)
    with strict_calls(stage), pytest.raises(OptimizationError, match="backend error"):
        stage(torch.randn(1, 16, 8))
    assert runner.fallbacks.calls == 0


def test_the_engines_validate_graph_stages_at_the_sizes_they_run() -> None:
    from transformers import Wav2Vec2Config

    from uniopt import Settings
    from uniopt.engines.phoneme import PhonemeExtractor
    from uniopt.engines.tts import FishSpeechConfig, FishSpeechEngine

    tiny = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
            "conv_dim": (32, 32, 32), "conv_kernel": (10, 3, 3), "conv_stride": (5, 4, 4),
            "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2}  # fmt: skip
    extractor = PhonemeExtractor.from_config(Wav2Vec2Config(**tiny), settings=Settings(), chunk_seconds=3.0)
    (model,) = extractor.uniopt_components()
    assert [tuple(inputs[0].shape) for inputs in shape_variants(model)] == [(1, extractor.chunk_samples), (1, 16_000)]
    engine = FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=4), seed=0)
    codec = next(c for c in engine.uniopt_components() if c.name == "codec")
    assert [inputs[0].shape[-1] for inputs in shape_variants(codec)] == [1, 12]
