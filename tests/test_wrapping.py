"""The wrapped engine is the user's engine: every method, keyword calls, attributes, state, paths.

Stages come from the real plugins, chosen in tier mode on the forced low-resource tier: a
"generic" component gets ONNX Runtime FP32 (a graph stage: a callable taking positional inputs),
a "decoder" component gets torch-int8 (a module stage: a quantized copy of the module).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from uniopt import Component, Metric, UniOptError, UniversalOptimizer, host_profile
from uniopt.optimizer.install import installation_of
from uniopt.plugins.model_cache import model_cache

TIER = "low-resource"  # its chains: generic -> onnxruntime-fp32, decoder -> torch-int8, on any CPU
TIER_MODE: dict[str, Any] = {"mode": "tier", "tier": TIER, "model_warmup_runs": 0, "threads": 1}


class Encoder(nn.Module):
    """A small encoder whose forward counts, in Python, how often the module's own code ran."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))
        self.eager_runs = 0

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.eager_runs += 1  # not part of any exported graph or compiled copy of this module
        return self.lin(x) * scale

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.forward(x)

    def embed_call(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self(x)


class Engine:
    """An engine that declares its encoder and uses it from its own methods."""

    def __init__(self, kind: str = "generic", seed: int = 0, path: str = "enc") -> None:
        self.enc = Encoder(seed)
        self.threshold = 0.0
        self._kind, self._path = kind, path

    def uniopt_components(self) -> list[Component]:
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
        axes = {"x": {0: "batch"}}
        return [
            Component(self._path, self.enc, (x,), input_names=("x",), dynamic_axes=axes, kind=self._kind,
                      metric=Metric("cosine", 0.99))
        ]  # fmt: skip

    def score(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (self.enc(x) > self.threshold).float().mean(-1)


@pytest.fixture(autouse=True)
def _fresh_model_cache() -> Any:
    model_cache.clear()
    yield
    model_cache.clear()


def _stats(fast: UniversalOptimizer, name: str) -> dict[str, Any]:
    return fast.get_performance_info()["components"][name]


def test_every_method_of_a_wrapped_module_runs_the_stage(tmp_path: Any) -> None:
    module = Encoder().eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = module(x)
    fast = UniversalOptimizer(module, (x,), cache_dir=str(tmp_path), **TIER_MODE)
    assert fast.report().component("module").chosen == "onnxruntime-fp32"
    assert fast.engine is module and isinstance(fast.engine, Encoder)
    runs = module.eager_runs
    with torch.no_grad():
        outputs = [fast(x), fast.embed(x), fast.embed_call(x), module.embed(x), module(x), module.forward(x)]
    for out in outputs:
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert module.eager_runs == runs  # the module's own forward never ran: the stage served all six
    assert _stats(fast, "module")["calls"] == 6 and _stats(fast, "module")["eager_calls"] == 0


def test_engine_methods_use_the_stage_and_the_engine_is_patched_in_place(tmp_path: Any) -> None:
    engine = Engine()
    enc = engine.enc
    x = torch.randn(3, 16)
    expected = engine.score(x)
    fast = UniversalOptimizer(engine, cache_dir=str(tmp_path), **TIER_MODE)
    assert fast.engine is engine and engine.enc is enc  # the same objects, optimized in place
    runs = enc.eager_runs
    assert torch.equal(fast.score(x), expected) and torch.equal(engine.score(x), expected)
    assert enc.eager_runs == runs and _stats(fast, "enc")["calls"] == 2
    fast.restore()
    assert installation_of(enc) is None and "forward" not in enc.__dict__
    assert torch.equal(engine.score(x), expected) and enc.eager_runs == runs + 1


def test_keyword_calls(tmp_path: Any) -> None:
    engine = Engine()
    x = torch.randn(2, 16)
    with torch.no_grad():
        doubled = engine.enc(x, scale=2.0)
        plain = engine.enc(x)
    fast = UniversalOptimizer(engine, cache_dir=str(tmp_path), **TIER_MODE)
    assert fast.report().component("enc").chosen == "onnxruntime-fp32"
    with torch.no_grad():
        torch.testing.assert_close(engine.enc(x=x), plain, atol=1e-4, rtol=1e-4)  # the graph's input, by name
        assert _stats(fast, "enc")["eager_calls"] == 0
        # the graph was exported with scale=1: a call with another scale runs the module's forward
        assert torch.equal(engine.enc(x, scale=2.0), doubled)
    stats = _stats(fast, "enc")
    assert stats["calls"] == 2 and stats["eager_calls"] == 1
    assert list(stats["eager_reasons"]) == ["call not in the stage's 1 inputs"]


def _module_stage(name: str) -> dict[str, Any]:
    """Settings under which a decoder gets ``name`` (torch-int8 or torch-bf16) on the low-resource tier."""
    if name == "torch-bf16" and not host_profile().cpu.computes_bf16:
        pytest.skip("this CPU has no bf16 instructions")
    return {**TIER_MODE, "deny": ("torch-int8",)} if name == "torch-bf16" else TIER_MODE


MODULE_STAGES = pytest.mark.parametrize("stage", ["torch-int8", "torch-bf16"])


@MODULE_STAGES
def test_a_module_stage_takes_keyword_calls(tmp_path: Any, stage: str) -> None:
    engine = Engine(kind="decoder")
    x = torch.randn(2, 16)
    with torch.no_grad():
        doubled = engine.enc(x, scale=2.0)
    fast = UniversalOptimizer(engine, cache_dir=str(tmp_path), **_module_stage(stage))
    assert fast.report().component("enc").chosen == stage
    runs = engine.enc.eager_runs
    with torch.no_grad():
        got = engine.enc(x, scale=2.0)
    assert torch.nn.functional.cosine_similarity(got, doubled).min() > 0.99
    assert not torch.equal(got, doubled)  # int8 or bf16 arithmetic, not the FP32 module
    assert engine.enc.eager_runs == runs and _stats(fast, "enc")["eager_calls"] == 0


def test_attribute_reads_and_writes_reach_the_engine(tmp_path: Any) -> None:
    engine = Engine()
    x = torch.randn(5, 16)
    fast = UniversalOptimizer(engine, cache_dir=str(tmp_path), **TIER_MODE)
    fast.threshold = 1e9
    assert engine.threshold == 1e9 and fast.threshold == 1e9
    assert float(fast.score(x).sum()) == 0.0  # the engine's own method saw the new threshold
    fast.extra = "set through the wrapper"
    assert engine.extra == "set through the wrapper"
    del fast.extra
    assert not hasattr(engine, "extra")
    with pytest.raises(AttributeError, match="UniversalOptimizer's own"):
        fast.report = None  # type: ignore[method-assign]
    assert "score" in dir(fast) and "restore" in dir(fast)


def test_performance_logging_keeps_an_eager_component_working(tmp_path: Any) -> None:
    engine = Engine()
    x = torch.randn(2, 16)
    with torch.no_grad():
        doubled = engine.enc(x, scale=2.0)
    fast = UniversalOptimizer(
        engine, cache_dir=str(tmp_path), allow=("eager",), enable_performance_logging=True, **TIER_MODE
    )
    assert fast.report().component("enc").chosen == "eager"
    with torch.no_grad():
        assert torch.equal(engine.enc(x, scale=2.0), doubled)
        assert torch.equal(engine.enc.embed_call(x), doubled / 2)
    info = fast.get_performance_info()
    assert [c["component"] for c in info["calls"]] == ["enc", "enc"]
    assert info["components"]["enc"]["stage"] == "eager" and info["components"]["enc"]["eager_calls"] == 0


def test_a_module_put_back_in_training_mode_runs_its_own_forward(tmp_path: Any) -> None:
    engine = Engine()
    x = torch.randn(2, 16)
    fast = UniversalOptimizer(engine, cache_dir=str(tmp_path), **TIER_MODE)
    assert not engine.enc.training  # wrapping puts component modules in eval mode
    engine.enc.train()
    runs = engine.enc.eager_runs
    engine.enc(x).sum().backward()  # gradients flow: the module's own forward ran
    assert engine.enc.lin[0].weight.grad is not None and engine.enc.eager_runs == runs + 1
    assert _stats(fast, "enc")["eager_reasons"] == {"module in training mode": 1}


class RunningSum(nn.Module):
    """A module with state: each call adds its input's sum to a buffer that shifts the output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 32)
        self.register_buffer("total", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.total.add_(x.sum())
        return self.lin(x) + 1e-3 * self.total


class StatefulEngine:
    def __init__(self) -> None:
        self.step = RunningSum()

    def uniopt_components(self) -> list[Component]:
        return [Component("step", self.step, (torch.ones(2, 16),), kind="decoder", metric=Metric("cosine", 0.99))]


@MODULE_STAGES
def test_engines_with_equal_weights_keep_their_own_state(tmp_path: Any, stage: str) -> None:
    a, b = StatefulEngine(), StatefulEngine()
    fast_a = UniversalOptimizer(a, cache_dir=str(tmp_path), **_module_stage(stage))
    builds = model_cache.builds
    fast_b = UniversalOptimizer(b, cache_dir=str(tmp_path), **_module_stage(stage))
    assert model_cache.builds == builds  # b reuses a's built stage (equal weights, same key)
    assert fast_a.report().component("step").chosen == fast_b.report().component("step").chosen == stage
    x = torch.ones(2, 16)
    with torch.no_grad():
        first = b.step(x)
        for _ in range(3):
            a.step(x)
        second = b.step(x)
    # b's state moved by its own one call only (x.sum() = 32), not by a's three
    atol = 1e-5 if stage == "torch-int8" else 8e-3  # bf16 rounds the outputs
    torch.testing.assert_close(second - first, torch.full_like(first, 1e-3 * 32), atol=atol, rtol=0)


def test_a_wrong_component_path_fails_before_any_build(tmp_path: Any) -> None:
    builds = model_cache.builds
    with pytest.raises(UniOptError, match=r"component path 'enc\.missing': Engine\.enc has no attribute 'missing'"):
        UniversalOptimizer(Engine(path="enc.missing"), cache_dir=str(tmp_path), **TIER_MODE)
    with pytest.raises(UniOptError, match="'enc.lin' is a Sequential, not the Encoder the component declares"):
        UniversalOptimizer(Engine(path="enc.lin"), cache_dir=str(tmp_path), **TIER_MODE)
    assert model_cache.builds == builds


def test_wrapping_twice_hands_the_module_to_the_second_wrapper(tmp_path: Any) -> None:
    engine = Engine()
    x = torch.randn(2, 16)
    first = UniversalOptimizer(engine, cache_dir=str(tmp_path), **TIER_MODE)
    second = UniversalOptimizer(engine, cache_dir=str(tmp_path), **TIER_MODE)
    assert not _stats(first, "enc")["installed"] and _stats(second, "enc")["installed"]
    runs = engine.enc.eager_runs
    engine.score(x)
    assert engine.enc.eager_runs == runs and _stats(second, "enc")["calls"] == 1
    first.restore()  # no longer its module: nothing happens
    assert _stats(second, "enc")["installed"]


def test_mode_off_does_not_touch_the_engine() -> None:
    engine = Engine()
    engine.enc.train()
    UniversalOptimizer(engine, mode="off")
    assert installation_of(engine.enc) is None and engine.enc.training


def test_a_copy_of_an_optimized_module_is_a_plain_module(tmp_path: Any) -> None:
    import copy
    import inspect
    import pickle

    engine = Engine()
    x = torch.randn(2, 16)
    fast = UniversalOptimizer(engine, cache_dir=str(tmp_path), **TIER_MODE)
    assert list(inspect.signature(engine.enc.forward).parameters) == ["x", "scale"]  # callers that inspect it
    for copied in (copy.deepcopy(engine.enc), pickle.loads(pickle.dumps(engine.enc))):
        assert installation_of(copied) is None
        runs = copied.eager_runs
        with torch.no_grad():
            torch.testing.assert_close(copied(x, scale=2.0), 2 * engine.enc(x), atol=1e-4, rtol=1e-4)
        assert copied.eager_runs == runs + 1  # the copy ran its own forward; the stage stayed with engine.enc
    assert _stats(fast, "enc")["calls"] == 2


class WeightNormed(nn.Module):
    """wav2vec2's positional convolution carries a weight-norm parametrization, which refuses pickling."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(9)
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(16, 16, 3, padding=1), name="weight", dim=2)
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.conv(x).transpose(1, 2))


class WeightNormedEngine:
    def __init__(self) -> None:
        self.net = WeightNormed().eval()

    def uniopt_components(self) -> list[Component]:
        x = torch.randn(2, 16, 12)
        return [Component("net", self.net, (x,), kind="decoder", metric=Metric("cosine", 0.99))]


@MODULE_STAGES
def test_a_module_stage_installs_in_a_module_with_parametrizations(tmp_path: Any, stage: str) -> None:
    engine, x = WeightNormedEngine(), torch.randn(2, 16, 12)
    with torch.no_grad():
        expected = engine.net(x)
    fast = UniversalOptimizer(engine, cache_dir=str(tmp_path), **_module_stage(stage))
    assert fast.report().component("net").chosen == stage
    assert installation_of(engine.net) is not None
    with torch.no_grad():
        got = engine.net(x)
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert cosine > 0.99
