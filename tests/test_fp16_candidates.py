"""FP16 candidates: offered only where FP16 is computed, and never a silent change of precision."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from uniopt import Component, Metric
from uniopt.cache import ArtifactCache
from uniopt.optimizer.guard import check_outputs, run_reference
from uniopt.plugins import BuildContext, availability, candidates, plugin_manager
from uniopt.settings import resolve_settings
from uniopt.threads import thread_budget
from uniopt.tiers import host_profile


def _fp16_devices() -> list[str]:
    return [d for d, caps in host_profile().backend("openvino").devices if "FP16" in caps]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Component, BuildContext, dict]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()
    component = Component("mlp", model, (torch.randn(2, 5, 32),), input_names=("x",), metric=Metric("cosine", 0.999))
    profile = host_profile()
    settings, choice = resolve_settings({"cache_dir": str(tmp_path)}, profile)
    context = BuildContext(settings, profile, choice.tier, thread_budget(profile.usable_cpus), ArtifactCache(tmp_path))
    return component, context, candidates(plugin_manager())


def test_fp16_candidates_say_why_they_are_not_offered_here(setup: tuple) -> None:
    _, context, cands = setup
    ok, why = availability(cands["onnxruntime-fp16"], context.profile, context.settings, context.tier)
    has_cuda = "CUDAExecutionProvider" in context.profile.backend("onnxruntime").providers
    assert ok == has_cuda and (has_cuda or why == "ONNX Runtime lacks CUDAExecutionProvider")
    ok, why = availability(cands["openvino-f16"], context.profile, context.settings, context.tier)
    assert ok == bool(_fp16_devices()) and (ok or why == "no OpenVINO device computes FP16")


def test_openvino_f16_is_offered_when_a_device_computes_fp16(setup: tuple) -> None:
    _, context, cands = setup
    backends = tuple(
        dataclasses.replace(b, devices=(*b.devices, ("GPU.0", ("FP32", "FP16")))) if b.name == "openvino" else b
        for b in context.profile.backends
    )
    profile = dataclasses.replace(context.profile, backends=backends)
    assert availability(cands["openvino-f16"], profile, context.settings, context.tier) == (True, "")


def test_onnxruntime_fp16_graph_keeps_fp32_inputs_and_passes_the_guard(setup: tuple) -> None:
    component, context, cands = setup
    stage = cands["onnxruntime-fp16"].build(component, context)
    out = stage(*component.example_inputs)
    assert out.dtype == torch.float32
    verdict = check_outputs(
        run_reference(component.module, component.example_inputs),
        out,
        precision="fp16",
        metric=component.metric,
        atol=1e-4,
        rtol=1e-4,
    )
    assert verdict.passed and verdict.metric == "cosine", verdict.reason
    assert not torch.allclose(out, run_reference(component.module, component.example_inputs), atol=1e-6, rtol=0)


def test_openvino_refuses_a_quiet_change_of_precision(setup: tuple) -> None:
    if _fp16_devices():
        pytest.skip("an OpenVINO device here computes FP16, so f16 is honoured")
    component, context, cands = setup
    with pytest.raises(RuntimeError, match=r"OpenVINO CPU runs \w+ when asked for f16"):
        cands["openvino-f16"].build(component, context)
