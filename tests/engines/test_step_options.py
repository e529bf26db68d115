"""Compile options of the compressed step models, raced on this host once and then read from the cache.

Runs on :meth:`FishSpeechConfig.tiny`; which option set wins there is timing, so the tests check
what is raced, recorded, reused and refused, not the winner.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tiny_engines import build_context
from uniopt.cache import ArtifactCache
from uniopt.engines.tts import FishSpeechConfig, FishSpeechEngine
from uniopt.errors import MemoryBudgetError
from uniopt.plugins import BuildFailure, Stage, candidates, plugin_manager
from uniopt.plugins import openvino_step_options as step_options
from uniopt.plugins.model_cache import model_cache
from uniopt.tiers import HostProfile, host_profile

pytest.importorskip("openvino")
pytest.importorskip("nncf")

FRAME_INT8 = "openvino-stateful-frame-int8"


@pytest.fixture(scope="module")
def engine() -> FishSpeechEngine:
    return FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=6), seed=3)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module: each model file is made once; each test forgets the recorded choices."""
    return tmp_path_factory.mktemp("step-options")


@pytest.fixture()
def cache(shared_cache: Path) -> Path:
    store = ArtifactCache(shared_cache)
    for entry in store.entries():
        if entry.kind == step_options.CACHE_KIND:
            store.remove(entry.key)
    return shared_cache


def _build(
    engine: FishSpeechEngine, cache: Path, name: str = FRAME_INT8, profile: HostProfile | None = None, **options: object
) -> Stage:
    model_cache.clear()  # each build as a new process would: nothing built in memory
    context = build_context(cache, profile, **options)
    pm = plugin_manager(context.settings.plugins)
    component = engine.uniopt_components()[0]
    built = pm.hook.uniopt_build_stage(candidate=candidates(pm)[name], component=component, context=context)
    assert not isinstance(built, BuildFailure), built.reason
    return built


def _records(cache: Path) -> dict[str, dict]:
    entries = ArtifactCache(cache).entries()
    return {e.extra["graph"]: e.extra for e in entries if e.kind == step_options.CACHE_KIND}


def _decode(stage: Stage, engine: FishSpeechEngine) -> torch.Tensor:
    inputs = engine.uniopt_components()[0].example_inputs
    with torch.inference_mode():
        return stage.run(*inputs)


def test_each_compressed_model_races_its_options_once_and_a_warm_build_reads_the_choice(
    engine: FishSpeechEngine, cache: Path
) -> None:
    cold = _build(engine, cache)
    raced = cold.info["compile_options"]
    assert set(raced) == {"slow", "frame"}  # the frame replaces the fast step: two models
    for info in raced.values():
        assert not info["from_cache"]
        assert info["options"] in step_options.OPTION_SETS
        assert set(info["race_ms"]) == set(step_options.OPTION_SETS)
        assert all(ms > 0 for ms in info["race_ms"].values())
        assert set(info["trial_resident_mib"]) == set(step_options.OPTION_SETS)
        assert all(mib > 50 for mib in info["trial_resident_mib"].values())  # an interpreter and OpenVINO's runtime
        assert info["loaded_blob"]  # the winner's trial process compiled it: this process loaded its blob
    records = _records(cache)
    assert {graph: r["options"] for graph, r in records.items()} == {g: i["options"] for g, i in raced.items()}
    runtime = [p for p in cache.rglob("*") if p.parent.name == "runtime"]
    assert len([p for p in runtime if p.suffix == ".blob"]) == 2, runtime  # one per model: the losers' are gone
    assert not [p for p in runtime if p.name.startswith(".race-")], runtime

    warm = _build(engine, cache)
    for graph, info in warm.info["compile_options"].items():
        assert info == {"options": raced[graph]["options"], "from_cache": True, "loaded_blob": True}  # nothing raced
    assert torch.equal(_decode(warm, engine), _decode(cold, engine))


def test_float_step_models_are_not_raced(engine: FishSpeechEngine, cache: Path) -> None:
    stage = _build(engine, cache, "openvino-stateful-f32")
    assert "compile_options" not in stage.info
    assert _records(cache) == {}


def test_a_record_that_names_no_option_set_is_raced_again(engine: FishSpeechEngine, cache: Path) -> None:
    _build(engine, cache)
    for entry in ArtifactCache(cache).entries():
        if entry.kind == step_options.CACHE_KIND:
            manifest = entry.path / "manifest.json"
            data = json.loads(manifest.read_text())
            data["extra"]["options"] = "unheard-of"
            manifest.write_text(json.dumps(data))
    again = _build(engine, cache)
    for info in again.info["compile_options"].values():
        assert not info["from_cache"] and info["options"] in step_options.OPTION_SETS
    assert all(r["options"] in step_options.OPTION_SETS for r in _records(cache).values())


def test_a_race_that_does_not_fit_keeps_the_defaults_and_records_nothing(
    engine: FishSpeechEngine, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_step = step_options.memory_step
    refused: list[tuple[str, int]] = []

    def no_room_for_trials(step: str, component: object, context: object, base: int | None = None, copies: int = 1):  # type: ignore[no-untyped-def]
        if "-trial-" in step:
            refused.append((step, copies))
            raise MemoryBudgetError(step, 2**40, "1 MiB available (test)")
        return real_step(step, component, context, base, copies)

    monkeypatch.setattr(step_options, "memory_step", no_room_for_trials)
    stage = _build(engine, cache)
    # Per model: both trial processes at once, then the first one alone.
    assert refused == [("openvino-trial-f32", 2), ("openvino-trial-f32", 1)] * 2
    for info in stage.info["compile_options"].values():
        assert info["options"] == "default" and not info["from_cache"] and "race_ms" not in info
        assert info["note"].startswith("not raced: ") and "openvino-trial-f32" in info["note"]
    assert _records(cache) == {}  # not a measurement: the next build races
    assert _decode(stage, engine).shape[-1] == engine.config.decode_steps


def test_without_room_for_both_trial_processes_at_once_they_compile_one_after_the_other(
    engine: FishSpeechEngine, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_step = step_options.memory_step
    ran: list[int] = []

    def room_for_one(step: str, component: object, context: object, base: int | None = None, copies: int = 1):  # type: ignore[no-untyped-def]
        if "-trial-" in step:
            if copies > 1:
                raise MemoryBudgetError(step, 2**40, "1 MiB available (test)")
            ran.append(copies)
        return real_step(step, component, context, base, copies)

    monkeypatch.setattr(step_options, "memory_step", room_for_one)
    stage = _build(engine, cache)
    assert ran == [1, 1, 1, 1]  # two models, each set's trial process on its own
    for info in stage.info["compile_options"].values():
        assert set(info["race_ms"]) == set(step_options.OPTION_SETS) and info["loaded_blob"]


def test_without_trial_processes_nothing_is_raced(engine: FishSpeechEngine, cache: Path) -> None:
    stage = _build(engine, cache, trial_processes=False)
    for info in stage.info["compile_options"].values():
        info.pop("loaded_blob")  # the shared cache may hold a blob of the defaults from another test
        assert info == {"options": "default", "from_cache": False, "note": "not raced: UNIOPT_TRIAL_PROCESSES is off"}
    assert _records(cache) == {}


def test_a_build_for_another_host_races_nothing(engine: FishSpeechEngine, cache: Path) -> None:
    """``optimize prepare`` builds with the target's profile: a race here would time this host."""
    target = dataclasses.replace(host_profile(), usable_cpus=1.3)
    stage = _build(engine, cache, profile=target)
    for info in stage.info["compile_options"].values():
        assert info["options"] == "default" and "race_ms" not in info
        assert info["note"] == "not raced: built for another host, which races them itself"
    assert _records(cache) == {}
