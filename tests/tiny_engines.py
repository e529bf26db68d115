"""Small engines importable by ``package.module:factory`` specs, for the CLI tests (``optimize prepare``),
and the build context the tests that build stages directly use."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import torch

from uniopt.cache import ArtifactCache
from uniopt.optimizer.steps import StepGraph
from uniopt.plugins import BuildContext
from uniopt.settings import resolve_settings
from uniopt.threads import thread_budget
from uniopt.tiers import HostProfile, host_profile


def build_context(cache: Path, profile: HostProfile | None = None, **settings: object) -> BuildContext:
    """What a stage is built with: ``settings`` resolved on ``profile`` (default: this host), the cache ``cache``."""
    profile = profile or host_profile()
    resolved, tier = resolve_settings({"cache_dir": str(cache), **settings}, profile)
    threads = thread_budget(profile.usable_cpus, resolved.threads)
    return BuildContext(resolved, profile, tier.tier, threads, cache=ArtifactCache(resolved.cache_dir))


def wide_mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """A deterministic MLP and its example input; the same weights in every process."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()
    return model, (torch.randn(4, 16, 64),)


class WideMlp:
    """:func:`wide_mlp` as an engine that declares its component, with held-out calibration inputs."""

    def __init__(self) -> None:
        self.module, self.example = wide_mlp()
        generator = torch.Generator().manual_seed(6)
        self.calibration = [(torch.randn(4, 16, 64, generator=generator),) for _ in range(8)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def uniopt_components(self) -> list:
        from uniopt.optimizer import Component, Metric

        # Static int8 of random activations reaches cosine ~0.999, not past it: the threshold allows int8.
        metric = Metric("cosine", 0.995)
        return [Component("module", self.module, self.example, calibration_inputs=self.calibration, metric=metric)]


class WideMlpLegacy(WideMlp):
    """:func:`wide_mlp` for the legacy exporter, over a dynamic length: its OpenVINO IR comes from the module."""

    def uniopt_components(self) -> list:
        from uniopt.optimizer import Component, Metric

        x = self.example[0]
        return [
            Component(
                "module",
                self.module,
                self.example,
                input_names=("x",),
                dynamic_axes={"x": {1: "length"}},
                exporter="legacy",
                metric=Metric("cosine", 0.995),
                calibration_inputs=self.calibration,
                validation_inputs=[(x[:, :5],), (x.repeat(1, 2, 1),)],
            )
        ]


class TtsDecoderOnly:
    """The TTS engine at its test size (seeded weights: the same in every process), its decoder alone."""

    def __init__(self) -> None:
        from uniopt.engines.tts import FishSpeechConfig, FishSpeechEngine

        self.engine = FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=4), seed=4)
        self.decoder = self.engine.decoder

    def uniopt_components(self) -> list:
        return self.engine.uniopt_components()[:1]


def tiny_fish_model(*, max_seq_len: int = 64, n_fast_layer: int = 1) -> Any:
    """A ``fish_speech`` ``DualARTransformer`` of test size (4 codebooks of 64 codes, semantic ids 200..263).

    Skips the calling test when the package is not installed.
    """
    import pytest

    llama = pytest.importorskip(
        "fish_speech.models.text2semantic.llama",
        reason="pip install --no-deps fish-speech==0.1.0 einops loguru loralib tiktoken",
    )
    semantic = {i: 200 + i for i in range(64)}
    tokenizer = types.SimpleNamespace(semantic_id_to_token_id=semantic, semantic_begin_id=200, semantic_end_id=263)
    args = llama.DualARModelArgs(
        vocab_size=264,
        n_layer=2,
        n_head=4,
        n_local_heads=2,
        dim=64,
        head_dim=16,
        intermediate_size=128,
        max_seq_len=max_seq_len,
        codebook_size=64,
        num_codebooks=4,
        n_fast_layer=n_fast_layer,
        attention_qk_norm=True,
        use_gradient_checkpointing=False,
    )
    torch.manual_seed(0)
    return llama.DualARTransformer(args, tokenizer=tokenizer).eval()


def tiny_fish_decoder() -> tuple[Any, Any, torch.Tensor]:
    """A ``FishSpeechAdapter`` over :func:`tiny_fish_model` (two fast layers, 66 decode steps), its
    decoder component, and a 5-position prompt of semantic tokens with their codes (seeded)."""
    from uniopt.engines.tts import FishSpeechAdapter

    model = tiny_fish_model(max_seq_len=96, n_fast_layer=2)
    no_codec = types.SimpleNamespace(decoder_model=types.SimpleNamespace(decode=lambda indices, feature_lengths: None))
    adapter = FishSpeechAdapter(no_codec, model, decode_steps=66, prompt_length=5)
    decoder = adapter.uniopt_components()[0]
    prompt = decoder.example_inputs[0]
    prompt[0, 0, 2:] = torch.tensor([205, 230, 250])  # semantic tokens: their codebook embeddings count
    prompt[0, 1:, 2:] = torch.randint(0, 64, (4, 3), generator=torch.Generator().manual_seed(2))
    return adapter, decoder, prompt


class TorchSteps:
    """A step runner that keeps the caches as PyTorch tensors (the step graph run as it is)."""

    def __init__(self, graph: StepGraph) -> None:
        self.graph = graph
        self.past = graph.empty_caches()

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if int(inputs[1][0]) == 0:
            self.past = self.graph.empty_caches()
        assert int(inputs[1][0]) == self.past[0].shape[2], "a step must continue the sequence"
        outputs = self.graph.module(*inputs, *self.past)
        kept = len(outputs) - 2 * self.graph.layers
        self.past = outputs[kept:]
        return outputs[:kept]
