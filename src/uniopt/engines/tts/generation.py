"""Seeded sampling and the decode loop (prefill, then one slow step and a fast codebook loop per frame).

Sampling follows Fish-Speech's ``logits_to_probs``: repetition penalty over a window of recent
frames, top-p on the penalised distribution, then temperature. The random draw is Gumbel-max
with noise from an integer hash of (seed, frame position, codebook, token), so it is the same in
PyTorch and in an exported graph, needs no generator state, and ``temperature == 0`` is greedy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...errors import InputError
from .model import DualARTransformer

__all__ = ["TokenGenerator", "sample_token", "uniform_noise"]

_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values below 2**32.

    Multipliers stay below 2**31 so products never overflow int64; shifts are floor divisions.
    """
    x = torch.bitwise_xor(x, torch.div(x, 65536, rounding_mode="floor"))
    x = torch.bitwise_and(x * 0x7FEB352D, _MASK32)
    x = torch.bitwise_xor(x, torch.div(x, 32768, rounding_mode="floor"))
    x = torch.bitwise_and(x * 0x5BD1E995, _MASK32)
    return torch.bitwise_xor(x, torch.div(x, 65536, rounding_mode="floor"))


def uniform_noise(seed: Tensor, position: Tensor, stream: int, shape: tuple[int, ...]) -> Tensor:
    """Uniforms in ``(0, 1)`` (float32) of ``shape``, a pure function of seed, position and stream."""
    key = _mix32(torch.bitwise_and(seed.reshape(1).long(), _MASK32))
    key = _mix32(torch.bitwise_xor(key, torch.bitwise_and(position.reshape(1).long(), _MASK32)))
    key = _mix32(torch.bitwise_xor(key, (stream * 0x9E3779B9) & _MASK32))
    count = 1
    for size in shape:
        count *= size
    index = torch.arange(count, dtype=torch.long, device=seed.device)
    bits = _mix32(_mix32(torch.bitwise_xor(key, index)))
    return ((torch.div(bits, 512, rounding_mode="floor").float() + 0.5) / float(2**23)).view(shape)


def sample_token(
    logits: Tensor, window: Tensor, temperature: Tensor, top_p: Tensor, repetition_penalty: Tensor, noise: Tensor
) -> Tensor:
    """One token id (0-d long) from ``logits [V]``.

    ``window [W]`` holds recent ids to penalise (-1 = none); ``noise [V]`` uniforms for the draw.
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    seen = (window[:, None] == torch.arange(vocab, device=logits.device)[None, :]).any(dim=0)
    penalty = repetition_penalty.float()
    logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    greedy = logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values
    kept = (sorted_probs.cumsum(dim=-1) <= top_p.float()).sum(dim=-1, keepdim=True).clamp_min(1)
    threshold = sorted_probs.gather(-1, kept - 1)
    gumbel = -torch.log(-torch.log(noise))
    scores = logits / temperature.float().clamp_min(1e-5) + gumbel
    sampled = torch.where(probs >= threshold, scores, torch.full_like(scores, float("-inf"))).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)


class TokenGenerator(nn.Module):
    """Prefill a prompt, then decode ``decode_steps`` frames with the key/value caches.

    ``forward(prompt [1, C+1, T] long, temperature, top_p, repetition_penalty (0-d float32),
    seed (0-d long)) -> [1, C+1, decode_steps]``. Each frame is one slow step, whose sampled
    semantic token gives codebook 0, then the fast decoder primed with the slow hidden state and
    run over codebooks 1..C-1. The caches are zeroed at the start of every call, so a call
    depends only on its inputs and an exported graph of this loop is complete. The repetition
    window covers the last ``repetition_window`` frames of prompt plus generated frames, so
    continuing from ``cat(prompt, output)`` samples as one longer call would.
    """

    logit_bias: Tensor
    fast_positions: Tensor

    def __init__(
        self,
        model: DualARTransformer,
        decode_steps: int = 64,
        repetition_window: int = 16,
        allow_eos: bool = False,
        eos_id: int = 258,
    ) -> None:
        super().__init__()
        if decode_steps < 1 or repetition_window < 1:
            raise ValueError("decode_steps and repetition_window must be >= 1")
        self.model = model
        self.decode_steps = decode_steps
        self.repetition_window = repetition_window
        self.allow_eos = allow_eos
        self.eos_id = eos_id
        c = model.config
        bias = torch.full((c.vocab_size,), float("-inf"))
        bias[c.semantic_begin_id :] = 0.0
        if allow_eos:
            bias[eos_id] = 0.0
        self.register_buffer("logit_bias", bias, persistent=False)
        self.register_buffer("fast_positions", torch.arange(c.num_codebooks), persistent=False)
        model.setup_caches(1, c.max_seq_len)

    def extra_repr(self) -> str:
        return (
            f"decode_steps={self.decode_steps}, repetition_window={self.repetition_window}, allow_eos={self.allow_eos}"
        )

    def _check(self, prompt: Tensor) -> None:
        if torch.compiler.is_compiling():
            return
        rows = self.model.config.num_codebooks + 1
        if prompt.dtype != torch.long or prompt.dim() != 3 or prompt.shape[0] != 1 or prompt.shape[1] != rows:
            raise InputError(f"prompt must be a long tensor [1, {rows}, T]; got {prompt.dtype} {tuple(prompt.shape)}")
        if prompt.shape[-1] < 1 or prompt.shape[-1] + self.decode_steps > self.model.cache_length():
            raise InputError(
                f"prompt of {prompt.shape[-1]} frames plus {self.decode_steps} decode steps does not fit "
                f"max_seq_len {self.model.cache_length()}"
            )

    def forward(
        self, prompt: Tensor, temperature: Tensor, top_p: Tensor, repetition_penalty: Tensor, seed: Tensor
    ) -> Tensor:
        self._check(prompt)
        model = self.model
        model.reset_caches()
        rows, length = model.config.num_codebooks + 1, prompt.shape[-1]
        padding = torch.full((rows, self.repetition_window), -1, dtype=prompt.dtype, device=prompt.device)
        window = torch.cat([padding, prompt[0]], dim=1)[:, -self.repetition_window :]
        input_pos = torch.arange(length, device=prompt.device)
        tokens, frames = prompt, []
        for _ in range(self.decode_steps):
            logits, hidden = model.forward_generate(tokens, input_pos)
            position = input_pos[-1:] + 1
            frame = self._frame(logits[0, -1], hidden, window, temperature, top_p, repetition_penalty, seed, position)
            frames.append(frame)
            window = torch.cat([window[:, 1:], frame[:, None]], dim=1)
            tokens, input_pos = frame.view(1, rows, 1), position
        return torch.stack(frames, dim=-1).unsqueeze(0)

    def _frame(
        self,
        logits: Tensor,
        hidden: Tensor,
        window: Tensor,
        temperature: Tensor,
        top_p: Tensor,
        repetition_penalty: Tensor,
        seed: Tensor,
        position: Tensor,
    ) -> Tensor:
        """The tokens of one frame ``[C+1]``: semantic id, then the code of every codebook."""
        model, c = self.model, self.model.config
        params = (temperature, top_p, repetition_penalty)
        main = sample_token(
            logits + self.logit_bias, window[0], *params, uniform_noise(seed, position, 0, (c.vocab_size,))
        )
        code = (main - c.semantic_begin_id).clamp_min(0)
        model.forward_generate_fast(hidden, self.fast_positions[:1])
        noise = uniform_noise(seed, position, 1, (c.num_codebooks, c.codebook_size))
        tokens = [main, code]
        for index in range(1, c.num_codebooks):
            fast_logits = model.forward_generate_fast(
                model.fast_embeddings(code).view(1, 1, -1), self.fast_positions[index : index + 1]
            )
            code = sample_token(fast_logits[0, -1], window[index + 1], *params, noise[index])
            tokens.append(code)
        return torch.stack(tokens)
