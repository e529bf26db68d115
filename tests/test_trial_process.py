"""OpenVINO candidates tried in a process of their own: same outputs, failures reported, nothing left behind."""

from __future__ import annotations

import os
import signal
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch

from uniopt import UniversalOptimizer
from uniopt.errors import StepKilledError
from uniopt.optimizer import Component
from uniopt.plugins import openvino_trial
from uniopt.plugins.openvino_backend import module_model
from uniopt.plugins.openvino_trial import TrialProcess, TrialTimeout, TrialUnavailable
from uniopt.plugins.openvino_worker import SharedArrays

ov = pytest.importorskip("openvino")
F32 = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": "1"}


class TwoOutputs(torch.nn.Module):
    """Float and integer outputs whose size follows the input's."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(64, 256)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.proj(x)
        return y, y.argmax(-1)


def _ir(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = TwoOutputs().eval()
    x = torch.randn(2, 8, 64)
    component = Component("model", model, (x,), input_names=("x",), dynamic_axes={"x": {0: "batch", 1: "frames"}})
    converted, _ = module_model(component)
    path = tmp_path / "model.xml"
    ov.save_model(converted, str(path), compress_to_fp16=False)
    return path, model


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_a_trial_process_computes_what_an_in_process_compile_does(tmp_path: Path) -> None:
    path, _ = _ir(tmp_path)
    local = ov.Core().compile_model(str(path), "CPU", F32)
    trial = TrialProcess(path, "CPU", F32, "test model")
    try:
        assert trial.precision == "f32"
        # Sizes that grow the shared buffer (the outputs are 4x the input) and shrink it again.
        for frames in (8, 3000, 5):
            x = np.random.default_rng(frames).standard_normal((2, frames, 64), dtype=np.float32)
            got = trial.run_arrays([x])
            expected = local([x])
            assert len(got) == 2
            for array, port in zip(got, local.outputs, strict=True):
                np.testing.assert_array_equal(array, expected[port])
            assert got[0].shape == (2, frames, 256) and got[1].dtype == np.int64
        assert trial.peak_bytes() >= trial.rss_bytes() > 0
    finally:
        trial.close()
    assert trial.pid not in _children()


def test_a_model_that_does_not_compile_raises_with_openvinos_reason(tmp_path: Path) -> None:
    broken = tmp_path / "model.xml"
    broken.write_text("<net>not a model</net>")
    before = _children()
    with pytest.raises(RuntimeError, match=r"Exception|Error"):
        TrialProcess(broken, "CPU", F32, "broken model")
    import gc

    gc.collect()
    assert _children() <= before


def test_a_trial_process_killed_by_the_kernel_is_a_refusal_for_memory(tmp_path: Path) -> None:
    path, _ = _ir(tmp_path)
    trial = TrialProcess(path, "CPU", F32, "killed model")
    os.kill(trial.pid, signal.SIGKILL)
    with pytest.raises(StepKilledError, match="killed model"):
        trial.run_arrays([np.zeros((1, 4, 64), np.float32)])
    with pytest.raises(RuntimeError, match="closed"):
        trial.run_arrays([np.zeros((1, 4, 64), np.float32)])


def test_a_trial_process_that_hangs_is_killed_after_its_time_limit(tmp_path: Path) -> None:
    path, _ = _ir(tmp_path)
    trial = TrialProcess(path, "CPU", F32, "stopped model", timeout_s=1.0)
    os.kill(trial.pid, signal.SIGSTOP)  # it cannot answer
    with pytest.raises(TrialTimeout, match="stopped model"):
        trial.run_arrays([np.zeros((1, 4, 64), np.float32)])
    assert trial.pid not in _children()


def test_shared_arrays_round_trip_every_dtype_and_shape(tmp_path: Path) -> None:
    fd = os.memfd_create("test")
    writer, reader = SharedArrays(fd), SharedArrays(os.dup(fd))
    arrays = [np.arange(7, dtype=np.int64), np.ones((3, 5), np.float16), np.float32(2.5) * np.ones(()), np.zeros(0)]
    places = writer.put(arrays)
    assert all(offset % SharedArrays.ALIGN == 0 for offset, _, _ in places)
    for got, want in zip(reader.get(places, copy=True), arrays, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    writer.close()
    reader.close()


# -- in auto mode ----------------------------------------------------------------------------------
def _engine(model: torch.nn.Module) -> Any:
    x = torch.randn(2, 16, 64)
    component = Component(
        "model",
        model,
        (x,),
        input_names=("x",),
        dynamic_axes={"x": {1: "frames"}},
        validation_inputs=[(x[:, :5],), (torch.randn(2, 40, 64),)],
    )
    return types.SimpleNamespace(model=model, uniopt_components=lambda: [component]), x


def _optimize(engine: Any, tmp_path: Path, **settings: Any) -> UniversalOptimizer:
    return UniversalOptimizer(
        engine,
        mode="auto",
        allow=("eager", "openvino-f32"),
        cache_dir=str(tmp_path),
        model_warmup_runs=1,
        reuse_decisions=False,
        **settings,
    )


def test_auto_mode_tries_openvino_in_a_trial_process_and_installs_the_winner_here(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = TwoOutputs().eval()
    engine, x = _engine(model)
    with torch.inference_mode():
        expected = model(x)
    before = _children()
    opt = _optimize(engine, tmp_path, min_speedup=0.001)  # whatever the timing, OpenVINO wins
    result = opt.report().component("model").candidate("openvino-f32")
    assert opt.report().component("model").chosen == "openvino-f32", result.reason
    steps = [s["step"] for s in result.memory_steps]
    assert steps.index("openvino-trial-f32") < steps.index("openvino-compile-f32"), steps
    assert _children() <= before, "the winner's trial process is still running"
    with torch.inference_mode():
        got = engine.model(x)
    torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)
    assert opt.get_performance_info()["components"]["model"]["fallback_calls"] == 0
    opt.restore()


def test_a_loser_in_its_trial_process_is_never_compiled_here(tmp_path: Path) -> None:
    torch.manual_seed(2)
    engine, _ = _engine(TwoOutputs().eval())
    before = _children()
    opt = _optimize(engine, tmp_path, min_speedup=1000.0)  # nothing beats eager by that much
    report = opt.report().component("model")
    assert report.chosen == "eager"
    steps = [s["step"] for s in report.candidate("openvino-f32").memory_steps]
    assert "openvino-trial-f32" in steps and "openvino-compile-f32" not in steps, steps
    assert _children() <= before


def test_trial_processes_off_compiles_in_the_engines_process(tmp_path: Path) -> None:
    torch.manual_seed(3)
    engine, _ = _engine(TwoOutputs().eval())
    opt = _optimize(engine, tmp_path, min_speedup=1000.0, trial_processes=False)
    steps = [s["step"] for s in opt.report().component("model").candidate("openvino-f32").memory_steps]
    assert "openvino-compile-f32" in steps and "openvino-trial-f32" not in steps, steps


def test_a_trial_process_that_cannot_start_is_unavailable_not_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = _ir(tmp_path)
    monkeypatch.setattr(openvino_trial, "WORKER", tmp_path / "missing_worker.py")  # the interpreter exits with 2
    with pytest.raises(TrialUnavailable, match="exited with status 2"):
        TrialProcess(path, "CPU", F32, "no worker")
    monkeypatch.setattr(sys, "frozen", True, raising=False)  # sys.executable is the application itself
    with pytest.raises(TrialUnavailable, match="frozen"):
        TrialProcess(path, "CPU", F32, "frozen app")


def test_without_a_trial_process_auto_mode_compiles_openvino_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(openvino_trial, "WORKER", tmp_path / "missing_worker.py")
    torch.manual_seed(4)
    engine, _ = _engine(TwoOutputs().eval())
    result = _optimize(engine, tmp_path, min_speedup=1000.0).report().component("model").candidate("openvino-f32")
    assert result.accepted, result.reason
    assert "openvino-compile-f32" in [s["step"] for s in result.memory_steps]
