"""Every built-in backend plugin on tiny models, with the real backends (no fakes).

Each candidate is checked through ``UniversalOptimizer`` (its ``CandidateResult``: accepted, or
rejected with the reason) and, where the stage itself matters (dynamic axes, output structure,
which layers were quantized), by building the stage through the plugin host exactly as the
optimizer does (``uniopt_build_stage``), so the test does not depend on which candidate wins the
timing. ONNX exports of the same model are shared through one module-wide cache directory.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import gc
import json
import logging
import os
import subprocess
import sys
import types
import warnings
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.ao.nn.quantized.dynamic as qdynamic
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from optimize_worker import worker_env
from uniopt import Component, Metric, UniversalOptimizer
from uniopt.cache import ArtifactCache
from uniopt.cli import app
from uniopt.errors import OptimizationError, ValidationError
from uniopt.optimizer.report import CandidateResult
from uniopt.plugins import BuildContext, Stage, candidates, plugin_manager
from uniopt.plugins.model_cache import model_cache
from uniopt.plugins.torch_native import DynamicInt8Linear, TorchDynamicInt8, _users_inductor_dir, inductor_cache_in
from uniopt.settings import resolve_settings
from uniopt.threads import thread_budget
from uniopt.tiers import HostProfile, host_profile
from uniopt.tiers.cpu import flags_from

TESTS = Path(__file__).parent
TIER = "cpu-avx512"  # this host is "low-resource" (2 CPUs); force the tier that offers everything


# -- models ----------------------------------------------------------------------------------------
def mlp(seed: int = 0, features: int = 16, hidden: int = 32, out: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, out)).eval()


class TiedProjection(nn.Module):
    """An output projection that reuses the embedding matrix: invisible to quantize_dynamic."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.embedding.weight)

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.embedding.embedding_dim, self.embedding.num_embeddings, bias=False)
        with torch.no_grad():
            linear.weight.copy_(self.embedding.weight)
        return linear


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 40, dim: int = 32) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embedding = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = TiedProjection(self.embedding)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embedding(tokens))))


class SpeakerLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.proj = nn.Linear(16, 8)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(frames)
        return self.proj(out[:, -1])


class FrameMLP(nn.Module):
    """(batch, frames, features) -> (batch, frames, 8): the frames axis can vary."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.inp = nn.Linear(16, 32)
        self.out = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.inp(x)))


class DictHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.a = nn.Linear(16, 8)
        self.b = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.a(x), "hidden": torch.tanh(self.b(x))}


class TupleHeads(DictHeads):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self.a(x), torch.relu(self.b(x))


class RMSNormNet(nn.Module):
    """The legacy exporter fails on aten::rms_norm; the dynamo exporter handles it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.proj = nn.Linear(16, 16)
        self.norm = nn.RMSNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class ScaledBy(nn.Module):
    """Takes a Python float: ONNX export needs tensor inputs, so graph candidates cannot build."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.proj = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        return self.proj(x) * scale


class OneComponent:
    """An engine that declares one component, ``model``, with a full Component spec."""

    def __init__(self, module: nn.Module, inputs: tuple[Any, ...], **spec: Any) -> None:
        self.model = module
        self._inputs = inputs
        self._spec = spec

    def uniopt_components(self) -> list[Component]:
        return [Component("model", self.model, self._inputs, **self._spec)]

    def __call__(self, *args: Any) -> Any:
        return self.model(*args)


# -- helpers ---------------------------------------------------------------------------------------
COMMON: dict[str, Any] = {"mode": "auto", "tier": TIER, "model_warmup_runs": 1, "search_budget_s": 120}


def optimize(
    engine: Any, inputs: Any = None, *, cache: Path, allow: tuple[str, ...], **settings: Any
) -> UniversalOptimizer:
    """Auto mode with only ``allow`` (and eager, the baseline) as candidates."""
    opt = UniversalOptimizer(engine, inputs, cache_dir=str(cache), allow=("eager", *allow), **{**COMMON, **settings})
    _WRAPPED.append(opt)
    return opt


#: Wrappers made by optimize(); restored after each test, as they optimize their models in place.
_WRAPPED: list[UniversalOptimizer] = []


def result(opt: UniversalOptimizer, name: str, component: str = "module") -> CandidateResult:
    return opt.report().component(component).candidate(name)


def build_stage(
    component: Component, name: str, cache: Path, profile: HostProfile | None = None, **overrides: Any
) -> Stage:
    """Build one candidate's stage through the plugin host, as the optimizer does (on ``profile``'s host)."""
    profile = profile or host_profile()
    settings, choice = resolve_settings({"cache_dir": str(cache), "tier": TIER, **overrides}, profile)
    context = BuildContext(
        settings, profile, choice.tier, thread_budget(profile.usable_cpus), cache=ArtifactCache(cache)
    )
    pm = plugin_manager(settings.plugins)
    stage = pm.hook.uniopt_build_stage(candidate=candidates(pm)[name], component=component, context=context)
    assert isinstance(stage, Stage), f"{name} did not build: {stage}"
    return stage


def modules_of(stage: Stage) -> list[nn.Module]:
    assert isinstance(stage.run, nn.Module), stage.run
    return list(stage.run.modules())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.fixture(autouse=True)
def _fresh_model_cache() -> Any:
    model_cache.clear()
    yield
    model_cache.clear()
    while _WRAPPED:
        _WRAPPED.pop().restore()


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact cache for the module: each model is exported once, then loaded."""
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture(scope="module")
def mlp2d() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(100)
    return mlp(), torch.randn(4, 16)


# -- torch-int8 ------------------------------------------------------------------------------------
def test_torch_int8_quantizes_the_linear_layers(mlp2d: Any, shared_cache: Path) -> None:
    model, x = mlp2d
    r = result(optimize(model, (x,), cache=shared_cache, allow=("torch-int8",)), "torch-int8")
    assert r.accepted, r.reason
    assert r.metric == "cosine" and r.metric_value is not None and r.metric_value >= 0.999

    stage = build_stage(Component("module", model, (x,)), "torch-int8", shared_cache)
    quantized = [m for m in modules_of(stage) if isinstance(m, DynamicInt8Linear)]
    assert len(quantized) == 2
    assert not any(type(m) is nn.Linear for m in modules_of(stage))
    assert all(type(m) is nn.Linear for m in (model[0], model[2])), "the original module must stay as it was"


def test_lean_int8_linear_computes_what_torch_ao_computes() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4, bias=False)).eval()
    x = torch.randn(2, 5, 16)
    qconfig = {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notes, attributed to this module
        reference = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), qconfig, dtype=torch.qint8)
    ours = TorchDynamicInt8().quantize(model, {nn.Linear})
    assert [type(m) for m in ours] == [DynamicInt8Linear, nn.ReLU, DynamicInt8Linear]
    with torch.inference_mode():
        assert torch.equal(ours(x), reference(x))
        assert torch.equal(copy.deepcopy(ours)(x), reference(x))


def test_torch_int8_on_a_bare_root_linear(shared_cache: Path) -> None:
    torch.manual_seed(1)
    model, x = nn.Linear(16, 8).eval(), torch.randn(4, 16)
    r = result(optimize(model, (x,), cache=shared_cache, allow=("torch-int8",)), "torch-int8")
    assert r.accepted, r.reason

    stage = build_stage(Component("module", model, (x,)), "torch-int8", shared_cache)
    assert isinstance(stage.run, DynamicInt8Linear), type(stage.run)
    with torch.inference_mode():
        assert cosine(stage(x), model(x)) > 0.999


def test_torch_int8_quantizes_a_tied_projection(shared_cache: Path) -> None:
    model, tokens = TinyLM().eval(), torch.randint(0, 40, (2, 6))
    r = result(optimize(model, (tokens,), cache=shared_cache, allow=("torch-int8",)), "torch-int8")
    assert r.accepted, r.reason

    stage = build_stage(Component("module", model, (tokens,)), "torch-int8", shared_cache)
    assert isinstance(stage.run.head, DynamicInt8Linear), type(stage.run.head)
    assert isinstance(stage.run.hidden, DynamicInt8Linear)
    assert isinstance(model.head, TiedProjection), "the original module must keep its tied projection"
    with torch.inference_mode():
        out, ref = stage(tokens), model(tokens)
    assert out.shape == ref.shape == (2, 6, 40)
    assert cosine(out, ref) > 0.999


def test_torch_int8_deprecation_is_logged_once(
    shared_cache: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(TorchDynamicInt8, "_warned", False)
    caplog.set_level(logging.WARNING, logger="uniopt")
    x = torch.randn(4, 16)
    for seed in (11, 12):  # two different modules: two real quantize_dynamic calls
        build_stage(Component("module", mlp(seed), (x,)), "torch-int8", shared_cache)
    notes = [r for r in caplog.records if "torch.ao dynamic quantization" in r.getMessage()]
    assert len(notes) == 1, [r.getMessage() for r in caplog.records]
    assert notes[0].levelno == logging.WARNING


# -- torch-int8-rnn --------------------------------------------------------------------------------
def test_torch_int8_rnn_on_an_lstm(shared_cache: Path) -> None:
    model, frames = SpeakerLSTM().eval(), torch.randn(2, 10, 8)
    r = result(optimize(model, (frames,), cache=shared_cache, allow=("torch-int8-rnn",)), "torch-int8-rnn")
    assert r.metric == "cosine" and r.metric_value is not None, r  # it was built and judged
    if r.accepted:
        assert r.metric_value >= 0.999
    else:
        assert r.reason.startswith("guard: ") and "cosine" in r.reason, r.reason

    stage = build_stage(Component("module", model, (frames,)), "torch-int8-rnn", shared_cache)
    kinds = {type(m) for m in modules_of(stage)}
    assert qdynamic.LSTM in kinds and DynamicInt8Linear in kinds, kinds


def test_torch_int8_rnn_needs_an_rnn(mlp2d: Any, shared_cache: Path) -> None:
    model, x = mlp2d
    r = result(optimize(model, (x,), cache=shared_cache, allow=("torch-int8-rnn",)), "torch-int8-rnn")
    assert not r.accepted
    assert r.reason.startswith("not applicable: ") and "LSTM/GRU" in r.reason, r.reason


# -- torch-bf16 ------------------------------------------------------------------------------------
def test_torch_bf16(mlp2d: Any, shared_cache: Path) -> None:
    if not host_profile().cpu.computes_bf16:
        pytest.skip("this CPU has no bf16 instructions")
    model, x = mlp2d
    opt = optimize(model, (x,), cache=shared_cache, allow=("torch-bf16",))
    r = result(opt, "torch-bf16")
    opt.restore()  # the reference below is the FP32 module
    assert r.accepted, r.reason
    assert r.metric == "cosine" and r.metric_value is not None and 0.999 <= r.metric_value

    stage = build_stage(Component("module", model, (x,)), "torch-bf16", shared_cache)
    with torch.inference_mode():
        out, ref = stage(x), model(x)
    assert out.dtype == torch.float32
    assert not torch.equal(out, ref), "bf16 arithmetic should differ from fp32 somewhere"
    assert cosine(out, ref) > 0.999
    assert all(p.dtype == torch.float32 for p in model.parameters()), "the original stays fp32"


# -- torch-compile ---------------------------------------------------------------------------------
# Importing inductor imports torch.utils.mkldnn, whose class body uses the deprecated
# torch.jit.script_method (torch 2.13): a warning from torch itself, once per process.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_keeps_inductors_cache_in_the_components_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("UNIOPT_COMPILE_MODE", raising=False)
    torch.manual_seed(2)
    model, x = mlp(21), torch.randn(4, 16)
    opt = optimize(model, (x,), cache=tmp_path / "cache", allow=("torch-compile",), use_model_compilation=True)
    r = result(opt, "torch-compile")
    assert r.accepted, r.reason
    assert r.metric == "allclose" and r.metric_value is not None and r.metric_value <= 1e-4
    with torch.inference_mode():
        torch.testing.assert_close(opt(x), model(x), atol=1e-4, rtol=1e-4)
    # pointed at the entry for the compile only (inductor itself may set its default afterwards)
    assert str(tmp_path) not in os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")

    cache = ArtifactCache(tmp_path / "cache")
    (entry,) = [e for e in cache.entries() if e.kind == "inductor"]
    assert entry.description == {"component": "module", "compile_mode": "default"}
    written = [p for p in (entry.path / "runtime").rglob("*") if p.is_file()]
    assert any(p.suffix == ".py" for p in written), written  # inductor's generated code
    assert entry.size_bytes >= sum(p.stat().st_size for p in written) > 0
    assert cache.total_bytes() >= entry.size_bytes
    assert not (tmp_path / "cache" / "inductor").exists()

    monkeypatch.setenv("UNIOPT_CACHE_DIR", str(tmp_path / "cache"))
    cleared = CliRunner().invoke(app, ["cache", "clear"])
    assert cleared.exit_code == 0, cleared.output
    assert not entry.path.exists() and ArtifactCache(tmp_path / "cache").entries() == []


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_over_its_budget_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model, x = mlp(22), torch.randn(4, 16)
    opt = optimize(
        model,
        (x,),
        cache=tmp_path / "cache",
        allow=("torch-compile",),
        use_model_compilation=True,
        compile_budget_s=1e-9,
    )
    r = result(opt, "torch-compile")
    assert not r.accepted and "UNIOPT_COMPILE_BUDGET" in r.reason
    # a TORCHINDUCTOR_CACHE_DIR the user set is where inductor's cache stays
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert not [e for e in ArtifactCache(tmp_path / "cache").entries() if e.kind == "inductor"]


def test_inductors_cache_directory_is_set_for_the_compile_and_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # as inductor sets it itself
    assert _users_inductor_dir() is None
    with inductor_cache_in(tmp_path):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default_cache_dir()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    with pytest.raises(RuntimeError, match="compile failed"), inductor_cache_in(tmp_path):
        raise RuntimeError("compile failed")
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert _users_inductor_dir() == str(tmp_path / "mine")


def test_torch_compile_is_ruled_out_on_low_resource(mlp2d: Any, shared_cache: Path) -> None:
    model, x = mlp2d
    opt = optimize(
        model, (x,), cache=shared_cache, allow=("torch-compile",), tier="low-resource", use_model_compilation=True
    )
    r = result(opt, "torch-compile")
    assert not r.accepted
    assert r.reason == "not available: ruled out by tier low-resource"


# -- ONNX Runtime ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def frames_engine() -> OneComponent:
    x = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(9))
    return OneComponent(FrameMLP().eval(), (x,), input_names=("features",), dynamic_axes={"features": {1: "frames"}})


def test_onnxruntime_candidates_accepted_with_a_dynamic_axis(frames_engine: OneComponent, shared_cache: Path) -> None:
    opt = optimize(frames_engine, cache=shared_cache, allow=("onnxruntime",))
    for name in ("onnxruntime-fp32", "onnxruntime-int8"):
        r = result(opt, name, "model")
        assert r.accepted, (name, r.reason)
    assert result(opt, "onnxruntime-fp32", "model").metric == "allclose"
    assert result(opt, "onnxruntime-int8", "model").metric == "cosine"
    cuda = result(opt, "onnxruntime-cuda", "model")
    assert not cuda.accepted and "CUDAExecutionProvider" in cuda.reason
    opt.restore()  # the module-scoped engine runs eager again for the tests below


@pytest.mark.parametrize("name", ["onnxruntime-fp32", "onnxruntime-int8"])
def test_onnxruntime_stage_runs_another_length(frames_engine: OneComponent, shared_cache: Path, name: str) -> None:
    (component,) = frames_engine.uniopt_components()
    stage = build_stage(component, name, shared_cache)
    longer = torch.randn(1, 11, 16)
    with torch.inference_mode():
        out, ref = stage(longer), frames_engine.model(longer)
    assert out.shape == ref.shape == (1, 11, 8) and out.dtype == torch.float32
    if name == "onnxruntime-fp32":
        assert float((out - ref).abs().max()) <= 1e-4
    else:
        assert cosine(out, ref) > 0.999
        assert not torch.equal(out, ref)


@pytest.mark.parametrize("name", ["onnxruntime-fp32", "onnxruntime-int8"])
def test_onnxruntime_stage_falls_back_on_a_static_axis(
    frames_engine: OneComponent, shared_cache: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    (component,) = frames_engine.uniopt_components()
    stage = build_stage(component, name, shared_cache)
    caplog.set_level(logging.WARNING, logger="uniopt")
    wider = torch.randn(3, 6, 16)  # the batch axis was not declared dynamic
    with torch.inference_mode():
        first, second, ref = stage(wider), stage(wider), frames_engine.model(wider)
    assert torch.equal(first, ref) and torch.equal(second, ref), "the fallback is the eager module itself"
    notes = [r for r in caplog.records if "outside the exported graph" in r.getMessage()]
    assert len(notes) == 1, [r.getMessage() for r in caplog.records]


def test_tier_mode_installs_onnxruntime_for_every_length(frames_engine: OneComponent, shared_cache: Path) -> None:
    inputs = [torch.randn(1, frames, 16) for frames in (6, 3, 17)]
    with torch.inference_mode():
        expected = [frames_engine.model(x) for x in inputs]
    opt = UniversalOptimizer(
        frames_engine,
        mode="tier",
        tier=TIER,
        cache_dir=str(shared_cache),
        allow=("eager", "onnxruntime-fp32"),
        model_warmup_runs=1,
    )
    assert opt.report().component("model").chosen == "onnxruntime-fp32"
    for x, want in zip(inputs, expected, strict=True):
        with torch.inference_mode():
            torch.testing.assert_close(opt(x), want, atol=1e-4, rtol=1e-4)
    assert opt.engine is frames_engine and isinstance(frames_engine.model, FrameMLP), "installed in place"
    assert opt.get_performance_info()["components"]["model"]["calls"] == 3
    opt.restore()


def host_with_flags(flags: tuple[str, ...]) -> HostProfile:
    """This host's profile with an x86 CPU that has exactly ``flags``."""
    host = host_profile()
    return dataclasses.replace(host, cpu=dataclasses.replace(host.cpu, architecture="x86_64", flags=flags_from(flags)))


@pytest.mark.parametrize(("flags", "bits"), [(("avx2",), 7), (("avx2", "avx512f", "avx512_vnni"), 8)])
def test_onnxruntime_int8_keeps_weights_to_7_bits_where_int8_saturates(
    frames_engine: OneComponent, tmp_path: Path, flags: tuple[str, ...], bits: int
) -> None:
    """Without VNNI, ORT's u8 x s8 kernel sums pairs in int16 and saturates on 8-bit weights."""
    import onnx
    from onnx import numpy_helper

    (component,) = frames_engine.uniopt_components()
    stage = build_stage(component, "onnxruntime-int8", tmp_path, profile=host_with_flags(flags))
    assert stage.info["weight_bits"] == bits
    (entry,) = [e for e in ArtifactCache(tmp_path).entries() if e.kind.startswith("onnxruntime-int8")]
    graph = onnx.load(str(entry.path / "model.onnx")).graph
    weights = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights, "no int8 weights in the quantized graph"
    widest = max(int(abs(w.astype("int32")).max()) for w in weights)
    assert (widest <= 64) is (bits == 7), widest  # ORT's 7-bit range is [-64, 64]


def test_onnxruntime_int8_on_a_gemm_graph(mlp2d: Any, shared_cache: Path) -> None:
    """A 2-D input exports Linear as Gemm(transB=1), which quantize_dynamic used to choke on."""
    model, x = mlp2d
    r = result(optimize(model, (x,), cache=shared_cache, allow=("onnxruntime-int8",)), "onnxruntime-int8")
    assert r.accepted, r.reason


@pytest.mark.parametrize("module_class", [DictHeads, TupleHeads])
def test_onnxruntime_keeps_the_output_structure(module_class: type[nn.Module], shared_cache: Path) -> None:
    model, x = module_class().eval(), torch.randn(2, 5, 16)
    r = result(optimize(model, (x,), cache=shared_cache, allow=("onnxruntime-fp32",)), "onnxruntime-fp32")
    assert r.accepted, r.reason

    stage = build_stage(Component("module", model, (x,)), "onnxruntime-fp32", shared_cache)
    with torch.inference_mode():
        out, ref = stage(x), model(x)
    assert type(out) is type(ref)
    if isinstance(ref, dict):
        assert list(out) == list(ref) == ["logits", "hidden"]
        pairs = [(out[k], ref[k]) for k in ref]
    else:
        assert len(out) == len(ref) == 2
        pairs = list(zip(out, ref, strict=True))
    for got, want in pairs:
        assert isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_legacy_exporter_falls_back_to_dynamo(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    engine = OneComponent(RMSNormNet().eval(), (torch.randn(1, 4, 16),), exporter="legacy")
    r = result(optimize(engine, cache=cache, allow=("onnxruntime-fp32",)), "onnxruntime-fp32", "model")
    assert r.accepted, r.reason
    (export,) = [e for e in ArtifactCache(cache).entries() if e.kind == "onnx-export"]
    assert export.valid
    assert export.extra["exporter"] == "dynamo"
    (failure,) = export.extra["failed"]
    assert failure.startswith("legacy:") and "rms_norm" in failure, failure


# -- build failures and the guard ------------------------------------------------------------------
def test_a_candidate_that_cannot_build_falls_back_to_eager(tmp_path: Path) -> None:
    model, x = ScaledBy().eval(), torch.randn(2, 16)
    opt = optimize(model, (x, 2.0), cache=tmp_path / "cache", allow=("onnxruntime-fp32",))
    r = result(opt, "onnxruntime-fp32")
    assert not r.accepted
    assert r.reason.startswith("build failed: ") and "tensor inputs" in r.reason, r.reason
    assert opt.report().component("module").chosen == "eager"
    with torch.inference_mode():
        assert torch.equal(opt(x, 3.0), model(x, 3.0))


def test_a_build_failure_raises_without_fallback(tmp_path: Path) -> None:
    model, x = ScaledBy().eval(), torch.randn(2, 16)
    with pytest.raises(OptimizationError) as caught:
        optimize(
            model, (x, 2.0), cache=tmp_path / "cache", allow=("onnxruntime-fp32",), fallback_on_optimization_error=False
        )
    assert caught.value.candidate == "onnxruntime-fp32"
    assert caught.value.component == "module"
    assert caught.value.__cause__ is not None
    assert "tensor inputs" in str(caught.value)


def test_the_guard_rejects_reduced_precision(mlp2d: Any, shared_cache: Path) -> None:
    model, x = mlp2d
    engine = OneComponent(model, (x,), metric=Metric("snr_db", 1000.0))
    opt = optimize(engine, cache=shared_cache, allow=("torch-int8", "torch-bf16", "onnxruntime-fp32"))
    report = opt.report().component("model")
    for name in ("torch-int8", "torch-bf16") if host_profile().cpu.computes_bf16 else ("torch-int8",):
        r = report.candidate(name)
        assert not r.accepted, name
        assert r.reason.startswith("guard: ") and "snr_db" in r.reason, r.reason
        assert r.metric == "snr_db" and r.metric_value is not None and r.metric_value < 1000.0
    assert report.candidate("onnxruntime-fp32").accepted, "FP32 stages are judged by tolerance, not by the metric"
    assert report.chosen in ("eager", "onnxruntime-fp32")


def test_a_guard_failure_raises_without_fallback(mlp2d: Any, shared_cache: Path) -> None:
    model, x = mlp2d
    engine = OneComponent(model, (x,), metric=Metric("snr_db", 1000.0))
    with pytest.raises(ValidationError) as caught:
        optimize(engine, cache=shared_cache, allow=("torch-int8",), fallback_on_optimization_error=False)
    assert caught.value.candidate == "torch-int8" and "snr_db" in caught.value.reason


# -- OpenVINO --------------------------------------------------------------------------------------
def test_openvino_candidates(mlp2d: Any, shared_cache: Path) -> None:
    model, x = mlp2d
    opt = optimize(model, (x,), cache=shared_cache, allow=("openvino",))
    report = opt.report().component("module")
    names = ("openvino-f32", "openvino-bf16", "openvino-int8-weights", "openvino-int8-static", "openvino-int8-matmul")
    for name in names:
        r = report.candidate(name)
        assert r.accepted or r.reason, name
        if name == "openvino-bf16" and not host_profile().cpu.computes_bf16:
            assert r.reason == "not available: CPU lacks avx512_bf16 / amx_bf16"
        else:
            assert not r.reason.startswith("not available"), r.reason
        if r.accepted:
            assert r.metric is not None and r.metric_value is not None, r
    f32 = report.candidate("openvino-f32")
    assert f32.accepted, f32.reason
    assert f32.metric == "allclose" and f32.metric_value is not None and f32.metric_value <= 1e-4
    bf16 = report.candidate("openvino-bf16")
    if bf16.accepted:
        assert bf16.metric == "cosine"
    opt.restore()  # mlp2d is module-scoped: its model runs eager again for the tests below


@pytest.mark.parametrize(("name", "hint"), [("openvino-f32", "f32"), ("openvino-bf16", "bf16")])
def test_openvino_precision_is_explicit(mlp2d: Any, shared_cache: Path, name: str, hint: str) -> None:
    if hint == "bf16" and not host_profile().cpu.computes_bf16:
        pytest.skip("this CPU has no bf16 instructions")
    model, x = mlp2d
    stage = build_stage(Component("module", model, (x,)), name, shared_cache)
    assert stage.info["precision_hint"] == hint
    with torch.inference_mode():
        diff = float((stage(x) - model(x)).abs().max())
    if hint == "f32":
        assert diff <= 1e-5, "OpenVINO ran in reduced precision although f32 was asked for"
    else:
        assert diff > 1e-6, "bf16 inference should differ from fp32 somewhere"


class LengthScaled(nn.Module):
    """Scales by its input's length through a Python int: a tracer fixes that value at the example's length."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * torch.full((1,), float(int(x.shape[1])))


def _conv_front_end() -> nn.Module:
    """A weight-normed convolution (as wav2vec2's positional one) in front of a linear head, over frames."""
    torch.manual_seed(3)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 16, 3, padding=1), dim=2)
    return nn.Sequential(conv, nn.GELU(), nn.Conv1d(16, 8, 1)).eval()


def _frames_component(module: nn.Module, x: torch.Tensor, axis: int = 2) -> Component:
    """A legacy-exported component over a dynamic frames axis, validated at 5 and 29 frames."""
    from uniopt.optimizer.shapes import resized

    return Component(
        "model",
        module,
        (x,),
        input_names=("features",),
        output_names=("out",),
        dynamic_axes={"features": {axis: "frames"}},
        exporter="legacy",
        validation_inputs=[(resized(x, axis, 5),), (resized(x, axis, 29),)],
    )


def test_openvino_ir_of_a_legacy_component_is_converted_from_the_module(tmp_path: Path) -> None:
    module = _conv_front_end()
    x = torch.randn(1, 4, 12, generator=torch.Generator().manual_seed(1))
    engine = types.SimpleNamespace(model=module)
    engine.uniopt_components = lambda: [_frames_component(module, x)]
    opt = optimize(engine, cache=tmp_path, allow=("openvino-f32",))
    r = result(opt, "openvino-f32", "model")
    assert r.accepted, r.reason
    steps = [s["step"] for s in r.memory_steps]
    assert "openvino-convert-module" in steps and "openvino-convert" not in steps, steps
    assert not any(s.startswith("onnx-export") for s in steps), steps
    kinds = [e.kind for e in ArtifactCache(tmp_path).entries()]
    assert "onnx-export" not in kinds and "openvino-plain" in kinds, kinds
    stage = build_stage(_frames_component(module, x), "openvino-f32", tmp_path)
    assert stage.info["converted_from"] == "module" and stage.info["from_cache"], stage.info
    for length in (12, 7, 40):  # the example's length and two others: the IR's frames axis is dynamic
        other = torch.randn(1, 4, length)
        with torch.inference_mode():
            got, want = stage(other), module(other)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    opt.restore()


def test_a_module_conversion_wrong_at_other_lengths_falls_back_to_the_onnx_export(tmp_path: Path) -> None:
    module = LengthScaled().eval()
    x = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(2))
    stage = build_stage(_frames_component(module, x, axis=1), "openvino-f32", tmp_path)
    assert stage.info["converted_from"] == "onnx", stage.info
    assert "wrong at input shape" in stage.info["module_conversion_failed"], stage.info
    # The legacy exporter fixes the length as well; the dynamo export is the one that stands.
    assert stage.info["exporter"] == "dynamo"
    kinds = sorted(e.kind for e in ArtifactCache(tmp_path).entries())
    assert kinds == ["onnx-export", "openvino-plain"], "the failed conversion left an entry behind"
    longer = torch.randn(1, 11, 16)
    with torch.inference_mode():
        torch.testing.assert_close(stage(longer), module(longer), atol=1e-4, rtol=1e-5)
    # A warm start takes the IR made from the export without converting the module again.
    again = build_stage(_frames_component(module, x, axis=1), "openvino-f32", tmp_path)
    assert again.info["converted_from"] == "onnx" and again.info["from_cache"], again.info
    assert again.info["module_conversion_failed"] == "converted from ONNX before"


def test_a_dynamo_component_keeps_its_ir_from_the_onnx_export(mlp2d: Any, tmp_path: Path) -> None:
    model, x = mlp2d
    stage = build_stage(Component("module", model, (x,)), "openvino-f32", tmp_path)
    assert stage.info["converted_from"] == "onnx" and stage.info["exporter"] == "dynamo"
    (export,) = [e for e in ArtifactCache(tmp_path).entries() if e.kind == "onnx-export"]
    assert sorted(p.name for p in export.path.iterdir() if p.name.startswith("model")) == [
        "model.onnx",
        "model.onnx.data",
    ], "the dynamo export writes its weights to their own file"


class ConvThenLinear(nn.Module):
    """A convolution front end and a linear head: what openvino-int8-matmul splits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 16, 3)
        self.head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.conv(x)).transpose(1, 2))


def test_openvino_int8_matmul_quantizes_matmuls_only(tmp_path: Path) -> None:
    import openvino as ov

    torch.manual_seed(5)
    model = ConvThenLinear().eval()
    component = Component("module", model, (torch.randn(1, 4, 64),), calibration_inputs=[(torch.randn(1, 4, 64),)] * 2)
    stage = build_stage(component, "openvino-int8-matmul", tmp_path)
    assert stage.info["precision_hint"] == ("bf16" if host_profile().cpu.computes_bf16 else "f32")
    (entry,) = [e for e in ArtifactCache(tmp_path).entries() if e.kind == "openvino-int8-matmul"]
    ir = ov.Core().read_model(str(entry.path / "model.xml"))
    quantized = {
        target.get_node().get_type_name()
        for op in ir.get_ordered_ops()
        if op.get_type_name() == "FakeQuantize"
        for target in op.output(0).get_target_inputs()
    }
    assert "MatMul" in quantized and "Convolution" not in quantized, quantized
    x = torch.randn(1, 4, 64)
    with torch.inference_mode():
        expected, got = model(x), stage(x)
    assert torch.nn.functional.cosine_similarity(expected.flatten(), got.flatten(), dim=0) > 0.99


@pytest.mark.parametrize(("flags", "widest"), [(("avx2",), 63), (("avx2", "avx512f", "avx512_vnni"), 127)])
def test_openvino_static_int8_uses_half_the_range_where_int8_saturates(
    tmp_path: Path, flags: tuple[str, ...], widest: int
) -> None:
    """nncf's overflow fix on every layer for hosts without VNNI; the full int8 range elsewhere."""
    import numpy as np
    import openvino as ov

    torch.manual_seed(5)
    model = ConvThenLinear().eval()
    component = Component("module", model, (torch.randn(1, 4, 64),), calibration_inputs=[(torch.randn(1, 4, 64),)] * 2)
    build_stage(component, "openvino-int8-matmul", tmp_path, profile=host_with_flags(flags))
    (entry,) = [e for e in ArtifactCache(tmp_path).entries() if e.kind == "openvino-int8-matmul"]
    ir = ov.Core().read_model(str(entry.path / "model.xml"))
    weights = [
        op.get_data()
        for op in ir.get_ordered_ops()
        if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8
    ]
    assert weights, "no int8 weights in the IR"
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == widest


def _ir_entry(cache: Path, kind: str = "openvino-plain") -> Any:
    (entry,) = [e for e in ArtifactCache(cache).entries() if e.kind == kind]
    return entry


def test_openvino_compiled_blobs_live_in_their_ir_entry(mlp2d: Any, tmp_path: Path) -> None:
    """Counted in the entry's size, evicted and cleared with it; no folder outside the entries."""
    model, x = mlp2d
    build_stage(Component("module", model, (x,)), "openvino-f32", tmp_path)
    entry = _ir_entry(tmp_path)
    blobs = list((entry.path / "runtime").glob("*.blob"))
    assert blobs, f"no compiled blob in {entry.path / 'runtime'}"
    assert not (tmp_path / "openvino").exists(), "a compiled-blob folder outside the managed entries"
    blob_bytes = sum(b.stat().st_size for b in blobs)
    assert entry.size_bytes >= blob_bytes + sum(info["size"] for info in entry.files.values())
    cache = ArtifactCache(tmp_path)
    assert [problem for _, problem in cache.verify()] == [None, None]
    limit = cache.total_bytes() - blob_bytes  # the IR alone would fit; with its blobs it does not
    assert entry.key in cache.evict(limit)
    assert not entry.path.exists() and not list(tmp_path.rglob("*.blob"))

    model_cache.clear()
    build_stage(Component("module", model, (x,)), "openvino-f32", tmp_path)
    assert list(tmp_path.rglob("*.blob"))
    assert ArtifactCache(tmp_path).clear() == 2
    assert not list(tmp_path.rglob("*.blob")), "optimize cache clear left compiled blobs"


def test_an_ir_rebuilt_under_the_same_path_is_compiled_afresh(mlp2d: Any, tmp_path: Path) -> None:
    model, x = mlp2d
    component = Component("module", model, (x,))
    build_stage(component, "openvino-f32", tmp_path)
    entry = _ir_entry(tmp_path)
    (old,) = (entry.path / "runtime").glob("*.blob")
    old_stat = old.stat()
    ArtifactCache(tmp_path).remove(entry.key)  # what a corrupt IR gets, before it is rebuilt
    model_cache.clear()
    stage = build_stage(component, "openvino-f32", tmp_path)
    rebuilt = _ir_entry(tmp_path)
    assert rebuilt.path == entry.path and rebuilt.created > entry.created
    (new,) = (rebuilt.path / "runtime").glob("*.blob")
    assert new.stat().st_mtime_ns > old_stat.st_mtime_ns, "a blob compiled from the old IR was kept"
    with torch.inference_mode():
        assert float((stage(x) - model(x)).abs().max()) <= 1e-5


def test_openvino_static_int8_is_keyed_by_its_calibration_data() -> None:
    from uniopt.plugins.openvino_backend import _ir_key

    torch.manual_seed(5)
    model, x = ConvThenLinear().eval(), torch.randn(1, 4, 64)
    one = Component("module", model, (x,), calibration_inputs=[(torch.randn(1, 4, 64),)] * 2)
    other = Component("module", model, (x,), calibration_inputs=[(torch.randn(1, 4, 64),)] * 2)
    assert one.key() == other.key(), "the same module and input signature: one export"
    for variant in ("int8-static", "int8-matmul"):
        assert _ir_key(one, "export", variant, False) != _ir_key(other, "export", variant, False)
    for variant in ("plain", "int8-weights"):  # data-free: one IR for both
        assert _ir_key(one, "export", variant, False) == _ir_key(other, "export", variant, False)


def test_openvino_static_int8_is_calibrated_on_inputs_the_guard_does_not_check(tmp_path: Path) -> None:
    """nncf sees only held-out calibration inputs; without any, static int8 does not apply."""
    import nncf

    torch.manual_seed(5)
    model = ConvThenLinear().eval()
    checked, held_out = (torch.randn(1, 4, 64),), (torch.randn(1, 4, 64),)
    component = Component("module", model, (torch.randn(1, 4, 64),), calibration_inputs=[checked, held_out])
    seen: list[Any] = []
    real = nncf.Dataset

    def recording(items: Any, transform: Any = None) -> Any:
        seen.extend(items)
        return real(items, transform)

    # In this process, so that the recording sees the calls; nncf's module annotating with
    # nncf.Dataset is imported before the patch.
    import nncf.openvino.quantization.quantize_model  # noqa: F401

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nncf, "Dataset", recording)
        build_stage(component, "openvino-int8-static", tmp_path, isolate_builds=False)
    guarded = [t.numpy() for inputs in component.guarded_inputs() for t in inputs]
    assert [len(arrays) for arrays in seen] == [1]
    assert all(not (arrays[0] == g).all() for arrays in seen for g in guarded)
    assert (seen[0][0] == held_out[0].numpy()).all()
    only_checked = Component("module", model, (torch.randn(1, 4, 64),), calibration_inputs=[checked])
    with pytest.raises(AssertionError, match="not applicable: static int8 needs calibration inputs"):
        build_stage(only_checked, "openvino-int8-static", tmp_path / "other")


# -- allow and missing backends --------------------------------------------------------------------
def test_allow_keeps_eager(mlp2d: Any, shared_cache: Path) -> None:
    model, x = mlp2d
    opt = UniversalOptimizer(model, (x,), cache_dir=str(shared_cache), allow=("onnxruntime-fp32",), **COMMON)
    report = opt.report().component("module")
    assert report.candidate("eager").accepted
    assert report.candidate("onnxruntime-fp32").accepted
    assert report.candidate("openvino-f32").reason.startswith("not available: not in UNIOPT_ALLOW")
    opt.restore()


@pytest.fixture(scope="module")
def without_openvino(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    """The worker and ``optimize doctor --json`` with ``sys.modules["openvino"] = None``, in parallel."""
    cache = tmp_path_factory.mktemp("no-openvino-cache")
    cwd = tmp_path_factory.mktemp("no-openvino-cwd")
    spec = {"block": ["openvino"], "settings": {**COMMON, "allow": ["eager", "openvino", "onnxruntime-fp32"]}}
    doctor = (
        "import sys; sys.modules['openvino'] = None; sys.argv = ['optimize', 'doctor', '--json']; "
        "from uniopt.cli import app; app()"
    )
    commands = {
        "worker": [sys.executable, str(TESTS / "optimize_worker.py"), json.dumps(spec)],
        "doctor": [sys.executable, "-c", doctor],
    }

    def run(command: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, env=worker_env(cache), cwd=cwd, capture_output=True, text=True, timeout=300)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(run, command) for name, command in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def _worker_report(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_missing_openvino_is_a_recorded_fallback(without_openvino: dict[str, Any]) -> None:
    report = _worker_report(without_openvino["worker"])
    (component,) = report["components"]
    results = {c["name"]: c for c in component["candidates"]}
    openvino = [name for name in results if name.startswith("openvino")]
    assert sorted(openvino) == [
        "openvino-bf16",
        "openvino-f16",
        "openvino-f32",
        "openvino-int8-matmul",
        "openvino-int8-static",
        "openvino-int8-weights",
        "openvino-stateful-bf16",
        "openvino-stateful-f32",
        "openvino-stateful-frame-int4",
        "openvino-stateful-frame-int8",
        "openvino-stateful-int4",
        "openvino-stateful-int8",
    ]
    for name in openvino:
        r = results[name]
        assert not r["accepted"]
        assert r["reason"].startswith("not available: openvino: import openvino failed"), r["reason"]
        assert "pip install 'uniopt[" in r["reason"], r["reason"]
    assert "pip install 'uniopt[openvino]'" in results["openvino-f32"]["reason"]
    assert results["onnxruntime-fp32"]["accepted"], results["onnxruntime-fp32"]["reason"]
    assert component["chosen"] in ("eager", "onnxruntime-fp32")
    check = json.loads(without_openvino["worker"].stdout.splitlines()[-2].removeprefix("check "))
    assert check["max_diff"] <= 1e-4


def test_missing_openvino_hint_installs_openvino(without_openvino: dict[str, Any]) -> None:
    """Every openvino candidate's hint must name an extra that installs openvino itself."""
    report = _worker_report(without_openvino["worker"])
    results = {c["name"]: c for c in report["components"][0]["candidates"]}
    for name in ("openvino-int8-weights", "openvino-int8-static", "openvino-int8-matmul"):
        hint = results[name]["reason"].split("pip install ", 1)[1]
        extras = hint.strip("'").removeprefix("uniopt[").removesuffix("]").split(",")
        assert "openvino" in extras or "all" in extras, f"{name}: {hint} does not install openvino"


def test_doctor_without_openvino(without_openvino: dict[str, Any]) -> None:
    proc = without_openvino["doctor"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    openvino = data["backends"]["openvino"]
    assert openvino["available"] is False
    assert "import openvino failed" in openvino["reason"]
    assert data["backends"]["onnxruntime"]["available"] is True
    rows = {row["name"]: row for row in data["candidates"]}
    assert rows["openvino-f32"]["available"] is False and "uniopt[openvino]" in rows["openvino-f32"]["reason"]
    assert rows["onnxruntime-fp32"]["available"] is True


# -- the process-wide model cache ------------------------------------------------------------------
def test_two_wrappers_of_one_module_share_the_stage_in_use(tmp_path: Path) -> None:
    torch.manual_seed(31)
    model, x = mlp(31), torch.randn(4, 16)
    with torch.inference_mode():
        expected = model(x)
    first = optimize(model, (x,), cache=tmp_path / "a", allow=("onnxruntime-fp32",), min_speedup=0.01)
    report = first.report().component("module")
    assert [r.name for r in report.candidates if r.accepted] == ["eager", "onnxruntime-fp32"]
    assert report.chosen == "onnxruntime-fp32" and model_cache.builds == 2
    # The loser (eager) was let go after the search; the stage in use stays in the process cache.
    assert len(model_cache) == 1
    # Another wrapper, even with another cache directory, takes the stage in use from the process
    # cache (only eager, which nothing held on to, is built again).
    second = optimize(model, (x,), cache=tmp_path / "b", allow=("onnxruntime-fp32",), min_speedup=0.01)
    assert model_cache.builds == 3
    assert second.report().component("module").stage is report.stage
    assert not [e for e in ArtifactCache(tmp_path / "b").entries() if e.kind == "onnx-export"], (
        "nothing was exported again"
    )
    with torch.inference_mode():
        torch.testing.assert_close(second(x), expected, atol=1e-4, rtol=1e-4)


def test_a_stage_no_engine_uses_is_freed(tmp_path: Path) -> None:
    torch.manual_seed(33)
    model, x = mlp(33), torch.randn(4, 16)
    opt = optimize(model, (x,), cache=tmp_path, allow=("onnxruntime-fp32",), min_speedup=0.01)
    _WRAPPED.remove(opt)
    stage = weakref.ref(opt.report().component("module").stage)
    assert len(model_cache) == 1 and stage() is not None
    del opt, model  # the stage is installed in the model itself: both go
    gc.collect()
    assert stage() is None, "the process cache kept a stage that no engine uses"
    assert len(model_cache) == 0


def test_wrappers_from_four_threads_build_once(tmp_path: Path) -> None:
    torch.manual_seed(32)
    model, x = mlp(32), torch.randn(4, 16)
    with torch.inference_mode():
        expected = model(x)
    cache = tmp_path / "cache"

    def wrap(_: int) -> tuple[Any, torch.Tensor]:
        # Tier mode: no timing, so every thread picks the same candidate deterministically.
        opt = UniversalOptimizer(
            model,
            (x,),
            mode="tier",
            tier=TIER,
            cache_dir=str(cache),
            allow=("eager", "onnxruntime-fp32"),
            model_warmup_runs=1,
        )
        with torch.inference_mode():
            return opt.report().component("module"), opt(x)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(wrap, range(4)))
    assert [report.chosen for report, _ in results] == ["onnxruntime-fp32"] * 4
    assert model_cache.builds == 1
    stages = {id(report.stage) for report, _ in results}
    assert len(stages) == 1, "every wrapper got the one built stage"
    outputs = [out for _, out in results]
    assert all(torch.equal(out, outputs[0]) for out in outputs)
    torch.testing.assert_close(outputs[0], expected, atol=1e-4, rtol=1e-4)
    assert len([e for e in ArtifactCache(cache).entries() if e.kind == "onnx-export"]) == 1
