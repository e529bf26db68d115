"""Declare uniopt components for an engine of the ``fish_speech`` package (PyPI fish-speech 0.1.0, S1 code).

Duck-typed: nothing here imports ``fish_speech``. The package's ``TTSInferenceEngine`` keeps its
codec as ``decoder_model`` (a ``DAC`` decoded through ``decode(indices, feature_lengths)``, not
``forward``) and runs its ``DualARTransformer`` inside a worker thread behind ``llama_queue``,
out of reach of attribute replacement. So the adapter gives each a module whose ``forward`` is
the whole stage: :class:`RealCodecDecoder` and :class:`RealTokenGenerator` (greedy prefill and
decode loop through ``forward_generate`` / ``forward_generate_fast``, as ``decode_one_token_ar``
does). The text-to-semantic model must be passed in; the adapter's ``inference`` decodes audio
through its ``codec`` attribute, while the worker thread keeps generating with its own model.
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...optimizer.component import Component
from ...optimizer.steps import DecodeSteps
from .codec import codec_component
from .frame import frame_graph
from .generation import check_forced, decoder_component
from .steps import DualARParts, dual_ar_decode_steps

__all__ = ["FishSpeechAdapter", "RealCodecDecoder", "RealTokenGenerator", "fish_decode_steps"]


class RealCodecDecoder(nn.Module):
    """``forward(codes [1, C, frames]) -> audio [1, 1, samples]`` through a ``DAC``'s ``decode``."""

    def __init__(self, dac: Any) -> None:
        super().__init__()
        if not callable(getattr(dac, "decode", None)):
            raise TypeError(f"{type(dac).__name__} has no decode(indices, feature_lengths); expected a fish_speech DAC")
        self.dac = dac

    def forward(self, codes: Tensor) -> Tensor:
        lengths = torch.full((codes.shape[0],), codes.shape[-1], dtype=torch.long, device=codes.device)
        audio, _ = self.dac.decode(indices=codes, feature_lengths=lengths)
        return audio


class RealTokenGenerator(nn.Module):
    """Greedy prefill plus ``decode_steps`` frames with a ``fish_speech`` ``DualARTransformer``.

    ``forward(prompt [1, C+1, T]) -> [1, C+1, decode_steps]``. The model's key/value caches are set
    up once and zeroed on every call. Fast-decoder logits are cut to ``codebook_limit`` as
    ``decode_one_token_ar`` does. ``forward(prompt, forced)`` replays the frames ``forced`` and
    returns the logits behind every greedy choice instead (teacher forcing): ``[1, decode_steps,
    vocab]`` for the main token and ``[1, C-1, decode_steps, K]`` for codebooks 1..C-1, ``K`` the
    fast logits cut to ``codebook_limit``.
    """

    model: Any
    fast_positions: Tensor

    def __init__(self, model: Any, decode_steps: int = 64, codebook_limit: int = 1024) -> None:
        super().__init__()
        for name in (
            "forward_generate",
            "forward_generate_fast",
            "setup_caches",
            "fast_embeddings",
            "config",
            "tokenizer",
        ):
            if not hasattr(model, name):
                raise TypeError(f"{type(model).__name__} lacks {name!r}; expected a fish_speech DualARTransformer")
        self.model = model
        self.decode_steps = decode_steps
        self.codebook_limit = codebook_limit
        config = model.config
        model.setup_caches(max_batch_size=1, max_seq_len=config.max_seq_len, dtype=next(model.parameters()).dtype)
        self.register_buffer("fast_positions", torch.arange(config.num_codebooks), persistent=False)

    def extra_repr(self) -> str:
        return f"decode_steps={self.decode_steps}, codebook_limit={self.codebook_limit}"

    def _caches(self) -> list[Any]:
        blocks = [*self.model.layers, *self.model.fast_layers]
        return [b.attention.kv_cache for b in blocks if getattr(b.attention, "kv_cache", None) is not None]

    @staticmethod
    def teacher_forcing(inputs: tuple[Tensor, ...], frames: Tensor) -> tuple[Tensor, ...]:
        """Inputs that replay ``frames`` (this module's output for ``inputs``) and return the logits."""
        return (inputs[0], frames)

    def forward(self, prompt: Tensor, forced: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        frames, scores = self._decode(prompt, forced)
        return frames if forced is None else scores

    def free_run_with_scores(self, prompt: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The frames ``forward`` returns for ``prompt``, and the logits it returns when forced to replay them."""
        return self._decode(prompt, None)

    def _decode(self, prompt: Tensor, forced: Tensor | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The frames (``forced``'s when given) and the logits behind every choice."""
        model, config = self.model, self.model.config
        check_forced(forced, int(config.num_codebooks) + 1, self.decode_steps)
        for cache in self._caches():
            cache.k_cache.zero_()
            cache.v_cache.zero_()
        input_pos = torch.arange(prompt.shape[-1], device=prompt.device)
        tokens, frames, main_scores, code_scores = prompt, [], [], []
        for step in range(self.decode_steps):
            result = model.forward_generate(tokens, input_pos)
            main_logits = result.logits[0, -1]
            main = main_logits.argmax(dim=-1, keepdim=True) if forced is None else forced[0, :1, step]
            code = (main - model.tokenizer.semantic_begin_id).clamp_min(0) if forced is None else forced[0, 1:2, step]
            frame_forced = None if forced is None else forced[0, 2:, step]
            codes, scores = self._codebooks(result.hidden_states, code, frame_forced)
            frame_tensor = torch.cat([main, code, codes])
            frames.append(frame_tensor)
            main_scores.append(main_logits)
            code_scores.append(scores)
            tokens, input_pos = frame_tensor.view(1, -1, 1), input_pos[-1:] + 1
        logits = (torch.stack(main_scores)[None], torch.stack(code_scores, dim=1)[None])
        return torch.stack(frames, dim=-1).unsqueeze(0), logits

    def _codebooks(self, hidden: Tensor, code: Tensor, forced: Tensor | None) -> tuple[Tensor, Tensor]:
        """Codebooks 1..C-1 of a frame (greedy, or ``forced``) and their logits ``[C-1, K]``.

        The fast decoder primed with the slow ``hidden`` state, fed codebook 0's ``code``; in one
        call when the model serves a frame runner (a :class:`~uniopt.engines.tts.frame.FastFrame`).
        """
        model, rows = self.model, int(self.model.config.num_codebooks) - 1
        frame_runner = getattr(model, "frame_runner", None)
        if frame_runner is not None:
            zero = hidden.new_zeros(())
            window = torch.full((rows, 1), -1, dtype=torch.long, device=hidden.device)
            gumbel = hidden.new_zeros((rows, self.frame_limit()))
            given = torch.zeros(rows, dtype=torch.long, device=hidden.device) if forced is None else forced
            use_forced = torch.tensor(forced is not None, device=hidden.device)
            params = (zero, zero, zero + 1)  # greedy: temperature 0, no top-p cut, no repetition penalty
            codes, scores = frame_runner(hidden, code.reshape(1), window, *params, gumbel, given, use_forced)
            return codes, scores
        model.forward_generate_fast(hidden, self.fast_positions[:1])
        codes, scores = [], []
        for index in range(1, rows + 1):
            logits = model.forward_generate_fast(model.fast_embeddings(code), self.fast_positions[index : index + 1])[
                0, -1, : self.codebook_limit
            ]
            scores.append(logits)
            code = logits.argmax(dim=-1, keepdim=True) if forced is None else forced[index - 1 : index]
            codes.append(code)
        if not codes:
            return code.new_zeros(0), hidden.new_zeros(0, self.frame_limit())
        return torch.cat(codes), torch.stack(scores)

    def frame_limit(self) -> int:
        """How many fast-decoder logits are scored: the codebook size cut to ``codebook_limit``."""
        return min(self.codebook_limit, int(self.model.config.codebook_size))


def fish_decode_steps(generator: RealTokenGenerator) -> DecodeSteps:
    """The slow and fast decode steps of a ``fish_speech`` ``DualARTransformer``, as its
    ``forward_generate`` / ``forward_generate_fast`` compute them (without audio parts)."""
    model, config = generator.model, generator.model.config
    if getattr(config, "is_reward_model", False):
        raise ValueError("a reward model's forward_generate scores instead of decoding")
    tokenizer = model.tokenizer

    def embed(tokens: Tensor) -> Tensor:
        codes = [
            model.codebook_embeddings(tokens[:, i + 1] + i * config.codebook_size) for i in range(config.num_codebooks)
        ]
        semantic = ((tokens[:, 0] >= tokenizer.semantic_begin_id) & (tokens[:, 0] <= tokenizer.semantic_end_id))[
            ..., None
        ]
        x = model.embeddings(tokens[:, 0]) + torch.stack(codes, dim=1).sum(dim=1) * semantic.to(torch.float32)
        if getattr(config, "scale_codebook_embeddings", False):
            x = torch.where(semantic, x / math.sqrt(config.num_codebooks + 1), x)
        return x

    def logits(normed: Tensor) -> Tensor:
        if getattr(config, "tie_word_embeddings", True):
            return F.linear(normed, model.embeddings.weight)
        return model.output(normed)  # type: ignore[no-any-return]

    def rope(freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
        return freqs_cis[..., 0].float(), freqs_cis[..., 1].float()

    parts = DualARParts(
        model=model,
        embed=embed,
        logits=logits,
        rope=rope(model.freqs_cis),
        fast_rope=rope(model.fast_freqs_cis),
        num_codebooks=int(config.num_codebooks),
        max_positions=int(model.freqs_cis.shape[0]),
    )
    frame = frame_graph(parts, generator.frame_limit(), window=1)
    return dual_ar_decode_steps(
        generator,
        parts,
        lambda logits, hidden: types.SimpleNamespace(logits=logits, hidden_states=hidden),
        frame=frame,
    )


class FishSpeechAdapter:
    """uniopt components for a ``fish_speech`` ``TTSInferenceEngine`` (anything with ``decoder_model``).

    ``text2semantic`` (a ``DualARTransformer``) adds the ``decoder`` component. Other attributes
    are looked up on the wrapped engine.
    """

    def __init__(
        self,
        engine: Any,
        text2semantic: Any = None,
        *,
        decode_steps: int = 64,
        num_codebooks: int | None = None,
        prompt_length: int = 16,
        example_frames: int = 43,
    ) -> None:
        if not hasattr(engine, "decoder_model"):
            raise TypeError(f"{type(engine).__name__} has no decoder_model; expected a fish_speech TTSInferenceEngine")
        self.engine = engine
        self.codec = RealCodecDecoder(engine.decoder_model)
        self.decoder = RealTokenGenerator(text2semantic, decode_steps) if text2semantic is not None else None
        if num_codebooks is None:
            num_codebooks = int(text2semantic.config.num_codebooks) if text2semantic is not None else 10
        self.num_codebooks: int = num_codebooks
        self.prompt_length = prompt_length
        self.example_frames = example_frames

    def __getattr__(self, name: str) -> Any:
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)

    def decode_vq_tokens(self, codes: Tensor) -> Tensor:
        """As the package's ``VQManager.decode_vq_tokens`` (codes ``[C, frames]``), through ``self.codec``."""
        return self.codec(codes[None])[0].squeeze()

    def generate_tokens(self, prompt: Tensor) -> Tensor:
        """Greedy frames ``[1, C+1, decode_steps]`` after ``prompt``, through ``self.decoder``."""
        if self.decoder is None:
            raise TypeError("no text2semantic model was given to the adapter")
        return self.decoder(prompt)

    def inference(self, request: Any) -> Any:
        """The engine's own ``inference``, with audio decoded through ``self.codec``."""
        return type(self.engine).inference(self, request)

    def uniopt_components(self) -> list[Component]:
        """``codec`` always; ``decoder`` when a text-to-semantic model was given."""
        generator = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 1024, (1, self.num_codebooks, self.example_frames), generator=generator)
        components = [codec_component(self.codec, codes)]
        if self.decoder is not None:
            begin = int(self.decoder.model.tokenizer.semantic_begin_id)
            prompt = torch.zeros(1, self.num_codebooks + 1, self.prompt_length, dtype=torch.long)
            prompt[0, 0] = torch.randint(0, min(begin, 256), (self.prompt_length,), generator=generator)
            steps = fish_decode_steps(self.decoder)
            components.insert(
                0,
                decoder_component(
                    self.decoder,
                    (prompt,),
                    ("prompt",),
                    RealTokenGenerator.teacher_forcing,
                    decode_steps=steps,
                    free_run_with_scores=RealTokenGenerator.free_run_with_scores,
                ),
            )
        return components
