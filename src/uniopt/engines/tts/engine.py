"""``FishSpeechEngine``: text to 44.1 kHz audio with a Fish-Speech-shaped model of random weights.

Two components for uniopt: ``decoder`` (a :class:`TokenGenerator`: prefill plus a fixed number
of decode steps, sampling included) and ``codec`` (a :class:`CodecDecoder`). ``synthesize`` calls
only their ``forward``, so whatever uniopt installs in their place serves it: an int8 copy of the
module or an exported graph. The weights are untrained: the audio is noise-like, the timing real.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...errors import InputError
from ...optimizer.component import Component
from .codec import CodecConfig, CodecDecoder, codec_component
from .generation import TokenGenerator, decode_steps, decoder_component
from .model import DualARConfig, DualARTransformer
from .tokenizer import ByteTokenizer, check_reference_audio, encode_reference

__all__ = ["FishSpeechConfig", "FishSpeechEngine"]


@dataclass(frozen=True)
class FishSpeechConfig:
    """Model and codec sizes plus generation settings.

    ``decode_steps`` frames are generated per call of the decoder component (its graph unrolls
    them); longer requests call it again on the prompt extended by what it produced.
    ``allow_eos=False`` masks ``<|im_end|>``: untrained weights have not learned when to stop,
    so an utterance is ``max_new_tokens`` frames long.
    """

    model: DualARConfig = field(default_factory=DualARConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    decode_steps: int = 64
    repetition_window: int = 16
    allow_eos: bool = False
    example_prompt_length: int = 16

    def __post_init__(self) -> None:
        if (self.model.num_codebooks, self.model.codebook_size) != (self.codec.num_codebooks, self.codec.codebook_size):
            raise ValueError("model and codec must agree on num_codebooks and codebook_size")
        if self.decode_steps < 1 or self.example_prompt_length < 1:
            raise ValueError("decode_steps and example_prompt_length must be >= 1")
        if self.example_prompt_length + self.decode_steps > self.model.max_seq_len:
            raise ValueError("example_prompt_length + decode_steps must fit max_seq_len")

    @classmethod
    def tiny(cls, decode_steps: int = 8) -> FishSpeechConfig:
        """A few-second test configuration: 2 layers of width 64, 10 codebooks of 64 codes."""
        model = DualARConfig(
            vocab_size=512,
            dim=64,
            n_layer=2,
            n_head=4,
            n_local_heads=2,
            head_dim=16,
            intermediate_size=128,
            fast_dim=32,
            n_fast_layer=2,
            fast_n_head=4,
            fast_n_local_heads=2,
            fast_head_dim=16,
            fast_intermediate_size=64,
            codebook_size=64,
            max_seq_len=160,
        )
        codec = CodecConfig(codebook_size=64, latent_dim=16, channels=(32, 16, 16, 8, 8, 4, 4))
        return cls(model=model, codec=codec, decode_steps=decode_steps, example_prompt_length=8)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class FishSpeechEngine:
    """A Fish-Speech-style TTS engine built from a config with seeded random weights."""

    sample_rate: int

    def __init__(self, config: FishSpeechConfig | None = None, *, seed: int = 0) -> None:
        self.config = config or FishSpeechConfig()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model = DualARTransformer(self.config.model).eval()
            self.codec = CodecDecoder(self.config.codec).eval()
        self.tokenizer = ByteTokenizer(
            self.config.model.vocab_size, self.config.model.codebook_size, self.config.model.num_codebooks
        )
        self.decoder = TokenGenerator(
            self.model,
            self.config.decode_steps,
            self.config.repetition_window,
            self.config.allow_eos,
            self.tokenizer.eos_id,
        ).eval()
        self.sample_rate = self.config.codec.sample_rate
        self.seed = seed

    @classmethod
    def from_config(cls, config: FishSpeechConfig | None = None, seed: int = 0) -> FishSpeechEngine:
        """An engine with weights drawn from ``seed`` (the default config when ``config`` is None)."""
        return cls(config, seed=seed)

    def info(self) -> dict[str, Any]:
        """What this engine is: untrained, its sizes and parameter counts."""
        return {
            "name": "fish-speech-style reference TTS (DualARTransformer + DAC-style codec)",
            "trained": False,
            "seed": self.seed,
            "sample_rate": self.sample_rate,
            "hop_length": self.config.codec.hop_length,
            "num_codebooks": self.config.model.num_codebooks,
            "decode_steps": self.config.decode_steps,
            "parameters": {"decoder": _count(self.model), "codec": _count(self.codec)},
        }

    # -- the pipeline ------------------------------------------------------------------------------
    def encode_prompt(self, text: str, reference_audio: Any = None) -> torch.Tensor:
        """Prompt tokens ``[1, num_codebooks + 1, T]`` for ``text`` and optional reference audio."""
        codes = None
        if reference_audio is not None:
            hop = self.config.codec.hop_length
            most = self.config.model.max_seq_len // 2
            rate = self.sample_rate
            audio = check_reference_audio(reference_audio, frame_size=hop, max_frames=most, sample_rate=rate)
            c = self.config.model
            codes = encode_reference(
                audio, num_codebooks=c.num_codebooks, codebook_size=c.codebook_size, frame_size=hop
            )
        return self.tokenizer.build_prompt(text, codes)

    def generate(
        self,
        prompt: torch.Tensor,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        repetition_penalty: float,
        seed: int,
    ) -> torch.Tensor:
        """Frames ``[num_codebooks + 1, N]`` after ``prompt``, via ``self.decoder``'s forward in chunks."""
        _check_sampling(max_new_tokens, temperature, top_p, repetition_penalty, seed)
        steps = self.config.decode_steps
        needed = prompt.shape[-1] + math.ceil(max_new_tokens / steps) * steps
        if needed > self.config.model.max_seq_len:
            raise InputError(
                f"text too long: the prompt has {prompt.shape[-1]} tokens and generating {max_new_tokens} frames "
                f"(in chunks of {steps}) needs {needed} positions; max_seq_len is {self.config.model.max_seq_len}"
            )
        params = (
            torch.tensor(float(temperature)),
            torch.tensor(float(top_p)),
            torch.tensor(float(repetition_penalty)),
            torch.tensor(int(seed), dtype=torch.long),
        )
        tokens, produced = prompt, list[torch.Tensor]()
        with torch.inference_mode():
            while sum(p.shape[-1] for p in produced) < max_new_tokens:
                frames = self.decoder(tokens, *params)
                produced.append(frames[0])
                if self.config.allow_eos and bool((frames[0, 0] == self.tokenizer.eos_id).any()):
                    break
                tokens = torch.cat([tokens, frames], dim=-1)
        out = torch.cat(produced, dim=-1)[:, :max_new_tokens]
        ends = (out[0] == self.tokenizer.eos_id).nonzero()
        return out[:, : int(ends[0])] if len(ends) else out

    def decode_audio(self, codes: torch.Tensor) -> np.ndarray:
        """Audio (float32, 1-D) for codes ``[num_codebooks, frames]``, via ``self.codec``'s forward."""
        if codes.shape[-1] == 0:
            return np.zeros(0, dtype=np.float32)
        with torch.inference_mode():
            audio = self.codec(codes[None].long())
        return audio.reshape(-1).float().numpy().astype(np.float32, copy=False)

    def synthesize(
        self,
        text: str,
        reference_audio: Any = None,
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.7,
        top_p: float = 0.8,
        repetition_penalty: float = 1.2,
        seed: int = 0,
    ) -> tuple[np.ndarray, int, dict[str, float]]:
        """``(audio float32, sample_rate, metrics)``; ``max_new_tokens`` defaults to ``decode_steps``.

        Not streaming: ``time_to_first_audio_s`` is the time until the whole utterance is ready.
        """
        started = time.perf_counter()
        prompt = self.encode_prompt(text, reference_audio)
        frames = self.generate(
            prompt,
            max_new_tokens=self.config.decode_steps if max_new_tokens is None else max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
        generated = time.perf_counter()
        audio = self.decode_audio(frames[1:])
        finished = time.perf_counter()
        seconds = audio.shape[0] / self.sample_rate
        total, decode = finished - started, generated - started
        metrics = {
            "real_time_factor": total / seconds if seconds else math.inf,
            "time_to_first_audio_s": total,
            "tokens_generated": int(frames.shape[-1]),
            "tokens_per_second": frames.shape[-1] / decode if decode > 0 else math.inf,
            "prompt_tokens": int(prompt.shape[-1]),
            "generation_s": decode,
            "codec_s": finished - generated,
            "audio_seconds": seconds,
        }
        return audio, self.sample_rate, metrics

    __call__ = synthesize

    # -- uniopt ----------------------------------------------------------------------------------------
    def example_prompt(self, length: int | None = None) -> torch.Tensor:
        """A text-only prompt of ``length`` tokens (default ``example_prompt_length``)."""
        length = length or self.config.example_prompt_length
        text = ("The quick brown fox jumps over the lazy dog. " * (length // 40 + 1))[: max(length - 3, 1)]
        return self.tokenizer.build_prompt(text)

    def uniopt_components(self) -> list[Component]:
        """The decode loop (greedy example, sampled calibration input) and the codec."""
        c = self.config
        prompt = self.example_prompt()
        greedy = (prompt, torch.tensor(0.0), torch.tensor(0.8), torch.tensor(1.2), torch.tensor(0, dtype=torch.long))
        sampled = (
            self.example_prompt(max(4, c.example_prompt_length // 2)),
            torch.tensor(0.7),
            torch.tensor(0.8),
            torch.tensor(1.2),
            torch.tensor(7, dtype=torch.long),
        )
        generator = torch.Generator().manual_seed(0)
        size, books = c.codec.codebook_size, c.codec.num_codebooks
        codes = torch.randint(0, size, (1, books, c.decode_steps), generator=generator)
        # The codec decodes every utterance whole: one frame (an early end) up to several decode chunks.
        longer = torch.randint(0, size, (1, books, 3 * c.decode_steps), generator=generator)
        return [
            decoder_component(
                self.decoder,
                greedy,
                ("prompt", "temperature", "top_p", "repetition_penalty", "seed"),
                TokenGenerator.teacher_forcing,
                calibration_inputs=(sampled,),
                decode_steps=decode_steps(self.decoder),
                free_run_with_scores=TokenGenerator.free_run_with_scores,
            ),
            codec_component(self.codec, codes, (codes[..., :1], longer)),
        ]


def _check_sampling(max_new_tokens: Any, temperature: Any, top_p: Any, repetition_penalty: Any, seed: Any) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    for name, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value!r}")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise InputError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -(2**63) <= int(seed) < 2**63:
        raise InputError(f"seed must be an int64, got {seed!r}")
