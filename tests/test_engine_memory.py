"""What optimizing each built-in engine needs: sized on the meta device, judged against the memory left."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from uniopt.engine_memory import (
    ComponentFacts,
    component_facts,
    engine_facts,
    engine_memory,
    memory_advice,
)
from uniopt.engines.registry import BUILTIN_ENGINES, load_engine, load_structure
from uniopt.optimizer.adapters import engine_components
from uniopt.plugins import candidates, plugin_manager
from uniopt.plugins.memory_costs import EAGER_RUNTIME_BYTES, STEP_COSTS, estimate_step, required_bytes, weight_bytes
from uniopt.tiers import tier_by_name

MiB = 2**20


def all_candidates() -> dict[str, Any]:
    return dict(candidates(plugin_manager()))


def real_weights(engine: Any) -> dict[str, int]:
    return {c.name: weight_bytes(c) for c in engine_components(engine)}


def meta_facts(build: Any) -> dict[str, ComponentFacts]:
    with torch.device("meta"):
        engine = build()
    assert all(p.device.type == "meta" for c in engine_components(engine) for p in c.module.parameters())
    return {c.name: component_facts(c) for c in engine_components(engine)}


def test_built_in_engines_on_meta_weigh_what_the_built_engines_weigh() -> None:
    """The meta estimate of each component is its really-built weight bytes, as the builders count them."""
    pytest.importorskip("transformers")
    from uniopt.engines.diarization import find_segmentation_onnx, find_speaker_encoder_weights

    try:
        find_segmentation_onnx(), find_speaker_encoder_weights()
    except Exception as exc:
        pytest.skip(f"diarization weights not installed: {exc}")
    for name in ("diarization", "phoneme"):
        estimated = {f.name: f.weight_bytes for f in engine_facts(name)}
        engine, _ = load_engine(name)
        built = real_weights(engine)
        del engine
        assert set(estimated) == set(built), name
        for component, size in built.items():
            assert size > 0 and abs(estimated[component] - size) <= 0.02 * size, (name, component, estimated, built)


def test_tts_builds_on_meta_and_its_tied_projection_counts_once() -> None:
    from uniopt.engines.tts import FishSpeechConfig, FishSpeechEngine

    config = FishSpeechConfig.tiny()
    facts = meta_facts(lambda: FishSpeechEngine(config))
    built = real_weights(FishSpeechEngine(config))
    assert {name: f.weight_bytes for name, f in facts.items()} == built
    decoder = facts["decoder"]
    assert decoder.decode_steps and decoder.frame_graph and decoder.exporter == "none"
    assert 0 < decoder.int8_file_bytes < decoder.weight_bytes


@pytest.mark.parametrize("allow_eos", [False, True])
def test_token_generator_allows_the_ids_its_bias_leaves_finite(allow_eos: bool) -> None:
    from uniopt.engines.tts import FishSpeechConfig, FishSpeechEngine

    engine = FishSpeechEngine(dataclasses.replace(FishSpeechConfig.tiny(), allow_eos=allow_eos))
    generator = engine.decoder
    expected = torch.isfinite(generator.logit_bias).nonzero().flatten()
    assert torch.equal(generator.allowed_ids, expected) and generator.allowed_ids.dtype == expected.dtype


def test_load_structure_allocates_no_weights() -> None:
    engine = load_structure("diarization")
    assert engine.segmentation.lstm.weight_ih_l0.device.type == "meta"
    assert all(t.device.type == "meta" for t in engine.embedding.parameters())


def phoneme_facts() -> list[ComponentFacts]:
    # The phoneme encoder as its facts say: wav2vec2-base's 360 MiB of weights, exported with the legacy exporter.
    size = 378_000_000
    return [ComponentFacts("model", "encoder", "legacy", size, size, size // 4, False, False, True, True)]


def test_the_verdict_follows_the_memory_left() -> None:
    tier, cands = tier_by_name("low-resource"), all_candidates()
    facts = phoneme_facts()
    roomy = engine_memory("phoneme", 64 * 2**30, tier, cands, facts=facts, park_setting="false")
    assert roomy.fits and roomy.verdict == "fits"
    assert roomy.eager_bytes == facts[0].weight_bytes + EAGER_RUNTIME_BYTES
    least, full = roomy.least, roomy.full
    assert least is not None and full is not None
    # torch-bf16 is one bf16 copy: the cheapest; the legacy ONNX export is what the exporting candidates need.
    assert least.candidate == "torch-bf16" and least.step == "torch-copy"
    assert least.required_bytes == required_bytes(estimate_step("torch-copy", facts[0].weight_bytes))
    assert full.step == "onnx-export-legacy"
    assert full.required_bytes == required_bytes(estimate_step("onnx-export-legacy", facts[0].weight_bytes))
    # The export: ONNX Runtime's, and static int8's (quantized on the IR converted from it).
    assert full.candidate in {"onnxruntime-fp32", "openvino-int8-matmul"}
    # OpenVINO's float IR is converted from the module of the legacy-traced encoder: less than the export.
    needs = {n.candidate: n for n in roomy.components[0].needs}
    assert needs["openvino-bf16"].step == "openvino-check-module"
    assert least.required_bytes < needs["openvino-bf16"].required_bytes < full.required_bytes

    small = engine_memory(
        "phoneme", roomy.eager_bytes + least.required_bytes, tier, cands, facts=facts, park_setting="false"
    )
    assert not small.fits and small.verdict == "only torch-bf16 fit"
    assert small.fitting() == {"model": ["torch-bf16"]}
    some = engine_memory(
        "phoneme", roomy.eager_bytes + full.required_bytes - 1, tier, cands, facts=facts, park_setting="false"
    )
    assert some.verdict.startswith("only torch-bf16, torch-int8") and "onnxruntime-fp32" not in some.verdict
    none = engine_memory(
        "phoneme", roomy.eager_bytes + least.required_bytes - 1, tier, cands, facts=facts, park_setting="false"
    )
    assert not none.fits and none.verdict == "does not fit: stays eager"
    line = memory_advice([roomy, small, none])
    assert (
        line is not None
        and "phoneme: only torch-bf16 fit, with" in line
        and "phoneme: does not fit: stays eager" in line
    )
    assert memory_advice([roomy]) is None


def test_a_component_whose_chain_cannot_build_it_names_what_does() -> None:
    tier, cands = tier_by_name("low-resource"), all_candidates()
    # A decoder that exports to nothing and declares no decode steps: only the PyTorch copies apply.
    decoder = ComponentFacts("decoder", "decoder", "none", 800 * MiB, 790 * MiB, 220 * MiB, False, False, False, True)
    codec = ComponentFacts("codec", "codec", "dynamo", 32 * MiB, 32 * MiB, 16 * MiB, False, False, False, False)
    row = engine_memory("tts", 64 * 2**30, tier, cands, facts=[decoder, codec])
    names = {c.name: [n.candidate for n in c.needs] for c in row.components}
    assert set(names["decoder"]) == {"torch-int8", "torch-int8-weights", "torch-bf16"}
    # The codec chain, cheapest first; no Linear layer for OpenVINO's int8 matmuls.
    assert names["codec"] == ["torch-bf16", "onnxruntime-fp32", "openvino-int8-weights"]
    codec_need = row.components[1].needs[0].required_bytes
    tight = engine_memory(
        "tts", row.eager_bytes + codec_need, tier, cands, facts=[decoder, codec], park_setting="false"
    )
    assert tight.verdict == "only codec: torch-bf16 fit (decoder stays eager)"
    data = tight.to_dict()
    assert data["least_bytes"] == codec_need and data["fits"] is False
    assert data["components"][0]["fitting"] == [] and data["components"][1]["fitting"] == ["torch-bf16"]


def test_parked_weights_go_back_to_the_builds() -> None:
    """With the memory left short, ``auto`` parks the decoder's parameters: what is left to build in grows by them."""
    tier, cands = tier_by_name("low-resource"), all_candidates()
    decoder = ComponentFacts("decoder", "decoder", "none", 800 * MiB, 790 * MiB, 220 * MiB, False, False, False, True)
    codec = ComponentFacts("codec", "codec", "dynamo", 32 * MiB, 32 * MiB, 16 * MiB, False, False, False, False)
    facts = [decoder, codec]
    kept = engine_memory("tts", 1536 * MiB, tier, cands, facts=facts, park_setting="false")
    parked = engine_memory("tts", 1536 * MiB, tier, cands, facts=facts)
    assert kept.parked_bytes == 0 and not kept.fits
    # 1536 - 832 - 320 MiB left: the decoder's 790 MiB are more than a quarter; the codec's 32 MiB are not.
    assert parked.parked_bytes == 790 * MiB
    assert parked.build_bytes == kept.build_bytes + 790 * MiB and parked.fits
    assert parked.to_dict()["parked_bytes"] == 790 * MiB
    roomy = engine_memory("tts", 64 * 2**30, tier, cands, facts=facts)
    assert roomy.parked_bytes == 0
    assert engine_memory("tts", 64 * 2**30, tier, cands, facts=facts, park_setting="true").parked_bytes == 822 * MiB


def test_every_declared_step_is_a_step_the_builders_check() -> None:
    for exporter in ("dynamo", "legacy"):
        declared = {step for c in all_candidates().values() for s in c.steps for step in s.resolved(exporter)}
        assert declared <= set(STEP_COSTS), declared - set(STEP_COSTS)
    assert {s.base for c in all_candidates().values() for s in c.steps} <= {"weights", "int8-file"}
    assert all(c.steps for name, c in all_candidates().items() if name != "eager")


def test_facts_are_cached_for_the_next_process(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from uniopt import engine_memory as module
    from uniopt.cache import ArtifactCache

    module._memo.clear()
    first = engine_facts("tts", cache_dir=tmp_path)
    assert [e.kind for e in ArtifactCache(tmp_path).entries()] == ["engine-structure"]
    module._memo.clear()
    monkeypatch.setattr(module, "_build_facts", lambda name: pytest.fail("built again"))
    assert engine_facts("tts", cache_dir=tmp_path) == first
    assert list(BUILTIN_ENGINES) == ["phoneme", "diarization", "tts"]
