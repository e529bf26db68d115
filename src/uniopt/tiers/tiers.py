"""Hardware tiers, declared as data, and the rule that picks one for a host profile.

A tier says when it applies (conditions on host facts), the default candidate chain per component
kind (the first candidate that is available and passes validation wins in ``mode="tier"``), which
candidates are ruled out, and the settings it changes. Tiers are tried in :data:`TIERS` order.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .profile import HostProfile

__all__ = ["TIERS", "Condition", "Tier", "TierChoice", "host_facts", "select_tier", "tier_by_name"]

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
}


@dataclass(frozen=True)
class Condition:
    """``fact op value``, for example ``Condition("usable_cpus", "<=", 2)``."""

    fact: str
    op: str
    value: Any

    def holds(self, facts: Mapping[str, Any]) -> bool:
        actual = facts[self.fact]
        return actual is not None and _OPS[self.op](actual, self.value)

    def describe(self, facts: Mapping[str, Any]) -> str:
        return f"{self.fact} = {facts[self.fact]!r} {self.op} {self.value!r}"


@dataclass(frozen=True)
class Tier:
    """One hardware tier. It applies when any of ``when_any`` holds (always, when empty)."""

    name: str
    description: str
    when_any: tuple[Condition, ...]
    chains: Mapping[str, tuple[str, ...]]
    denied: tuple[str, ...] = ()
    setting_defaults: Mapping[str, Any] = field(default_factory=dict)

    def chain_for(self, kind: str) -> tuple[str, ...]:
        """Default candidates, best first, for a component of ``kind``."""
        return self.chains.get(kind, self.chains["generic"])


@dataclass(frozen=True)
class TierChoice:
    """The tier picked for this host and, in words, why."""

    tier: Tier
    reason: str


# Cheap and usually fast first: static int8 needs a calibration pass and often fails the guard.
_ENCODER_CPU = ("openvino-bf16", "openvino-int8-matmul", "onnxruntime-fp32", "eager")
# A decoder that declares decode steps tries them as ONNX Runtime steps with 8-bit MatMulNBits weights
# first, then as stateful OpenVINO models with int8 weights, with the fast decoder's codebooks as one
# call per frame where it declares a frame graph: on the Zen 4 host 15.2 and 20.2 ms a frame against
# eager's 120.7 (dynamic int8 32.4), keeping 99-100% of eager's decisive choices
# (benchmarks/decoder_speed.py); auto mode times them all. Where memory is short the ONNX Runtime
# export is refused before it runs (its peak is ~0.8x the decoder's weights: it fits in the 1.5 GiB
# cgroup once the decoder's eager weights are parked) and OpenVINO's goes on.
_DECODER_CPU = (
    "onnxruntime-steps-int8",
    "openvino-stateful-frame-int8",
    "openvino-stateful-int8",
    "torch-int8",
    "torch-int8-weights",
    "torch-bf16",
    "eager",
)
_EMBEDDING_CPU = ("openvino-bf16", "onnxruntime-fp32", "eager")
# A convolutional codec (the TTS engine's vocoder): PyTorch's bf16 convolutions where the CPU computes
# bf16 (1.58x eager on the Zen 4 host), else OpenVINO with int8 matmuls (1.16x on the AVX2 host);
# ONNX Runtime int8 and OpenVINO static int8 ran at 0.3-0.5x on both (benchmarks/results*.md).
_CODEC_CPU = ("torch-bf16", "openvino-int8-matmul", "openvino-int8-weights", "onnxruntime-fp32", "eager")
# A small VM often cannot afford an export of a large model (refused for memory), so the PyTorch
# candidates, which build without one (a bf16 copy, int8 Linear layers), come before ONNX Runtime.
_ENCODER_SMALL = ("openvino-bf16", "openvino-int8-matmul", "torch-bf16", "torch-int8", "onnxruntime-fp32", "eager")
_EMBEDDING_SMALL = ("openvino-bf16", "torch-bf16", "onnxruntime-fp32", "eager")

TIERS: tuple[Tier, ...] = (
    Tier(
        name="cuda-gpu",
        description="an NVIDIA GPU through CUDA",
        when_any=(Condition("cuda_devices", ">", 0),),
        chains={"generic": ("onnxruntime-fp16", "onnxruntime-cuda", "eager")},
        setting_defaults={"use_model_compilation": True},
    ),
    Tier(
        name="low-resource",
        description="a small VM: few usable CPUs or little memory; no torch.compile, short search",
        when_any=(Condition("usable_cpus", "<=", 2), Condition("memory_limit_gib", "<", 4)),
        chains={
            "encoder": _ENCODER_SMALL,
            "decoder": _DECODER_CPU,
            "codec": _CODEC_CPU,
            "embedding": _EMBEDDING_SMALL,
            "segmentation": ("openvino-f32", "eager"),
            "generic": ("onnxruntime-fp32", "eager"),
        },
        denied=("torch-compile",),
        setting_defaults={"use_model_compilation": False, "model_warmup_runs": 1, "search_budget_s": 120.0},
    ),
    Tier(
        name="cpu-avx512",
        description="an x86 CPU with AVX-512 (VNNI, BF16 or AMX make int8/bf16 pay off)",
        when_any=(Condition("avx512f", "==", True),),
        chains={
            "encoder": _ENCODER_CPU,
            "decoder": _DECODER_CPU,
            "codec": _CODEC_CPU,
            "embedding": _EMBEDDING_CPU,
            "segmentation": ("openvino-f32", "eager"),
            "generic": ("openvino-f32", "onnxruntime-fp32", "eager"),
        },
    ),
    Tier(
        name="cpu-avx2",
        description="an x86 CPU with AVX2 and no AVX-512",
        when_any=(Condition("avx2", "==", True),),
        chains={
            "encoder": ("openvino-f32", "onnxruntime-fp32", "eager"),
            "decoder": ("openvino-stateful-int8", "torch-int8", "eager"),
            "codec": ("openvino-int8-matmul", "onnxruntime-fp32", "eager"),
            "generic": ("onnxruntime-fp32", "eager"),
        },
    ),
    Tier(
        name="cpu-basic",
        description="any other CPU (ARM, or x86 without AVX2)",
        when_any=(),
        chains={"decoder": ("torch-int8", "eager"), "generic": ("onnxruntime-fp32", "eager")},
    ),
)


def host_facts(profile: HostProfile) -> dict[str, Any]:
    """The facts tier conditions are written against."""
    facts: dict[str, Any] = dict(profile.cpu.flags)
    facts.update(
        usable_cpus=profile.usable_cpus,
        memory_limit_gib=profile.memory.usable_bytes / 2**30,
        cuda_devices=sum(1 for g in profile.gpus if g.kind == "cuda"),
    )
    return facts


def tier_by_name(name: str) -> Tier:
    """The tier called ``name``; KeyError names the choices."""
    for tier in TIERS:
        if tier.name == name:
            return tier
    raise KeyError(f"unknown tier {name!r}; expected one of {', '.join(t.name for t in TIERS)}")


def select_tier(profile: HostProfile, override: str | None = None) -> TierChoice:
    """Pick the first tier whose conditions hold, or the overriding one, with the reason."""
    if override:
        return TierChoice(tier_by_name(override), f"set by UNIOPT_TIER={override}")
    facts = host_facts(profile)
    for tier in TIERS:
        if not tier.when_any:
            return TierChoice(tier, f"no other tier applies: {tier.description}")
        held = [c for c in tier.when_any if c.holds(facts)]
        if held:
            because = "; ".join(c.describe(facts) for c in held)
            return TierChoice(tier, f"{because}: {tier.description}")
    raise AssertionError("the last tier applies to every host")
