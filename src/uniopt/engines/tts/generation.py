"""Seeded sampling and the decode loop (prefill, then one slow step and a fast codebook loop per frame).

Sampling follows Fish-Speech's ``logits_to_probs``: repetition penalty over a window of recent
frames, top-p on the penalised distribution, then temperature. The random draw is Gumbel-max
with noise from an integer hash of (seed, frame position, codebook, token), so it is the same in
PyTorch and in an exported graph, needs no generator state, and ``temperature == 0`` is greedy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import InputError
from ...optimizer.component import Component, Metric
from ...optimizer.steps import DecodeSteps
from .model import DualARTransformer

__all__ = [
    "TokenGenerator",
    "check_forced",
    "decode_steps",
    "decoder_component",
    "gumbel_noise",
    "sample_token",
    "uniform_noise",
]

_MASK32 = 0xFFFFFFFF
_TRUE, _FALSE = torch.tensor(True), torch.tensor(False)


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 tensors holding values below 2**32.

    Multipliers stay below 2**31 so products never overflow int64; shifts are floor divisions.
    """
    x = torch.bitwise_xor(x, torch.div(x, 65536, rounding_mode="floor"))
    x = torch.bitwise_and(x * 0x7FEB352D, _MASK32)
    x = torch.bitwise_xor(x, torch.div(x, 32768, rounding_mode="floor"))
    x = torch.bitwise_and(x * 0x5BD1E995, _MASK32)
    return torch.bitwise_xor(x, torch.div(x, 65536, rounding_mode="floor"))


def uniform_noise(seed: Tensor, position: Tensor, stream: int, index: Tensor) -> Tensor:
    """Uniforms in ``(0, 1)`` (float32) at the integer ``index`` tensor (same shape), a pure function of
    seed, position, stream and index: the noise of token ``t`` is the same whichever ids are drawn."""
    key = _mix32(torch.bitwise_and(seed.reshape(1).long(), _MASK32))
    key = _mix32(torch.bitwise_xor(key, torch.bitwise_and(position.reshape(1).long(), _MASK32)))
    key = _mix32(torch.bitwise_xor(key, (stream * 0x9E3779B9) & _MASK32))
    bits = _mix32(_mix32(torch.bitwise_xor(key, index.long())))
    return (torch.div(bits, 512, rounding_mode="floor").float() + 0.5) / float(2**23)


def gumbel_noise(uniforms: Tensor) -> Tensor:
    """Gumbel noise from uniforms in ``(0, 1)``: adding it to scores and taking the argmax draws a sample."""
    return -torch.log(-torch.log(uniforms))


def sample_token(
    logits: Tensor,
    ids: Tensor,
    window: Tensor,
    temperature: Tensor,
    top_p: Tensor,
    repetition_penalty: Tensor,
    gumbel: Tensor | None,
) -> Tensor:
    """The index (0-d long) of the drawn entry of ``logits [N]``, the scores of token ids ``ids [N]``.

    ``window [W]`` holds recent ids to penalise (-1 = none); ``gumbel [N]`` the draw's Gumbel noise
    (:func:`gumbel_noise` of its uniforms; None: the caller knows ``temperature == 0``, so only the
    greedy choice is computed).
    """
    logits = logits.float()
    seen = (window[:, None] == ids[None, :]).any(dim=0)
    penalty = repetition_penalty.float()
    logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    greedy = logits.argmax(dim=-1)
    if gumbel is None:
        return greedy
    probs = logits.softmax(dim=-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values
    kept = (sorted_probs.cumsum(dim=-1) <= top_p.float()).sum(dim=-1, keepdim=True).clamp_min(1)
    threshold = sorted_probs.gather(-1, kept - 1)
    scores = logits / temperature.float().clamp_min(1e-5) + gumbel
    sampled = torch.where(probs >= threshold, scores, torch.full_like(scores, float("-inf"))).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)


def check_forced(forced: Tensor | None, rows: int, steps: int) -> None:
    """Raise :class:`InputError` unless ``forced`` is None or long frames ``[1, rows, steps]``."""
    if forced is not None and (forced.dtype != torch.long or tuple(forced.shape) != (1, rows, steps)):
        raise InputError(
            f"forced frames must be a long tensor [1, {rows}, {steps}]; got {forced.dtype} {tuple(forced.shape)}"
        )


class TokenGenerator(nn.Module):
    """Prefill a prompt, then decode ``decode_steps`` frames with the key/value caches.

    ``forward(prompt [1, C+1, T] long, temperature, top_p, repetition_penalty (0-d float32),
    seed (0-d long), forced=None) -> [1, C+1, decode_steps]``. Each frame is one slow step, whose sampled
    semantic token gives codebook 0, then the fast decoder primed with the slow hidden state and
    run over codebooks 1..C-1. The caches are zeroed at the start of every call, so a call
    depends only on its inputs and an exported graph of this loop is complete. The repetition
    window covers the last ``repetition_window`` frames of prompt plus generated frames, so
    continuing from ``cat(prompt, output)`` samples as one longer call would.

    ``forced`` (frames ``[1, C+1, decode_steps]``) is teacher forcing: instead of tokens the call
    returns the logits every choice is made from, ``([1, decode_steps, codebook_size]`` for the
    semantic ids, ``[1, C-1, decode_steps, codebook_size]`` for codebooks 1..C-1), each computed from
    the forced frames before it. Two models' choices compare step by step this way, without
    one early difference changing everything after it.
    """

    logit_bias: Tensor
    allowed_ids: Tensor
    code_ids: Tensor
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
        # Only these ids can be drawn (the rest have a bias of -inf): sampling and the scores look at
        # them alone, so the decode steps compute the slow logits of these ids only.
        # Listed from the config, not from the bias' values, so the engine also builds on the meta device.
        allowed = sorted({*range(c.semantic_begin_id, c.vocab_size), *((eos_id,) if allow_eos else ())})
        self.register_buffer("allowed_ids", torch.tensor(allowed, dtype=torch.long), persistent=False)
        self.register_buffer("code_ids", torch.arange(c.codebook_size), persistent=False)
        self.register_buffer("fast_positions", torch.arange(c.num_codebooks), persistent=False)
        model.setup_caches(1, c.max_seq_len)

    @staticmethod
    def teacher_forcing(inputs: tuple[Tensor, ...], frames: Tensor) -> tuple[Tensor, ...]:
        """Inputs that replay ``frames`` (this module's output for ``inputs``) and return the scores."""
        return (*inputs[:5], frames)

    def extra_repr(self) -> str:
        return (
            f"decode_steps={self.decode_steps}, repetition_window={self.repetition_window}, allow_eos={self.allow_eos}"
        )

    def _check(self, prompt: Tensor, forced: Tensor | None) -> None:
        if torch.compiler.is_compiling():
            return
        rows = self.model.config.num_codebooks + 1
        if prompt.dtype != torch.long or prompt.dim() != 3 or prompt.shape[0] != 1 or prompt.shape[1] != rows:
            raise InputError(f"prompt must be a long tensor [1, {rows}, T]; got {prompt.dtype} {tuple(prompt.shape)}")
        check_forced(forced, rows, self.decode_steps)
        if prompt.shape[-1] < 1 or prompt.shape[-1] + self.decode_steps > self.model.cache_length():
            raise InputError(
                f"prompt of {prompt.shape[-1]} frames plus {self.decode_steps} decode steps does not fit "
                f"max_seq_len {self.model.cache_length()}"
            )

    def forward(
        self,
        prompt: Tensor,
        temperature: Tensor,
        top_p: Tensor,
        repetition_penalty: Tensor,
        seed: Tensor,
        forced: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        frames, scores = self._decode(prompt, temperature, top_p, repetition_penalty, seed, forced)
        return frames if forced is None else scores

    def free_run_with_scores(
        self, prompt: Tensor, temperature: Tensor, top_p: Tensor, repetition_penalty: Tensor, seed: Tensor
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The frames ``forward`` returns for these inputs, and the scores it returns when forced to
        replay them (:meth:`teacher_forcing`): the same logits, from one decode instead of two."""
        return self._decode(prompt, temperature, top_p, repetition_penalty, seed, None)

    def _decode(
        self,
        prompt: Tensor,
        temperature: Tensor,
        top_p: Tensor,
        repetition_penalty: Tensor,
        seed: Tensor,
        forced: Tensor | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The frames ``[1, C+1, decode_steps]`` (``forced``'s when given) and the logits behind each choice."""
        self._check(prompt, forced)
        model = self.model
        model.reset_caches()
        rows, length = model.config.num_codebooks + 1, prompt.shape[-1]
        padding = torch.full((rows, self.repetition_window), -1, dtype=prompt.dtype, device=prompt.device)
        window = torch.cat([padding, prompt[0]], dim=1)[:, -self.repetition_window :]
        input_pos = torch.arange(length, device=prompt.device)
        # Greedy calls skip the draw; a traced graph keeps it (temperature is an input there).
        greedy = not torch.compiler.is_compiling() and not bool(temperature > 0)
        tokens, frames, scores = prompt, [], []
        for step in range(self.decode_steps):
            logits, hidden = model.forward_generate(tokens, input_pos, attend=length + step)
            position = input_pos[-1:] + 1
            if forced is None:
                params = (temperature, top_p, repetition_penalty, seed, position)
                frame, fast_logits = self._frame(logits[0, -1], hidden, window, *params, greedy=greedy)
                scores.append((logits[0, -1, model.config.semantic_begin_id :], fast_logits))
            else:
                frame = forced[0, :, step]
                scores.append(self._score_frame(logits[0, -1], hidden, frame))
            frames.append(frame)
            window = torch.cat([window[:, 1:], frame[:, None]], dim=1)
            tokens, input_pos = frame.view(1, rows, 1), position
        semantic, codes = zip(*scores, strict=True)
        return torch.stack(frames, dim=-1).unsqueeze(0), (torch.stack(semantic)[None], torch.stack(codes, dim=1)[None])

    def _codebooks(self, hidden: Tensor, code: Tensor, pick: Callable[[int, Tensor], Tensor]) -> list[Tensor]:
        """Run the fast decoder over one frame: primed with the slow ``hidden`` state, then fed codebook
        0's ``code``; ``pick(index, logits)`` gives codebook ``index``'s code, which feeds the next
        step. Returns the logits ``[codebook_size]`` behind codebooks 1..C-1."""
        model = self.model
        model.forward_generate_fast(hidden, self.fast_positions[:1], attend=1)
        scores = []
        for index in range(1, model.config.num_codebooks):
            embedded = model.fast_embeddings(code).view(1, 1, -1)
            step = model.forward_generate_fast(embedded, self.fast_positions[index : index + 1], attend=index + 1)
            scores.append(step[0, -1])
            code = pick(index, scores[-1])
        return scores

    def _score_frame(self, logits: Tensor, hidden: Tensor, frame: Tensor) -> tuple[Tensor, Tensor]:
        """Logits behind a given frame's choices: the semantic ids ``[codebook_size]``, and codebooks
        1..C-1 ``[C-1, codebook_size]``, each from the given codes before it (codebook 0 is the
        semantic token's code)."""
        c = self.model.config
        frame_runner = getattr(self.model, "frame_runner", None)
        if frame_runner is not None:
            rows = c.num_codebooks - 1
            window = torch.full((rows, self.repetition_window), -1, dtype=torch.long, device=frame.device)
            zero, gumbel = hidden.new_zeros(()), hidden.new_zeros((rows, c.codebook_size))
            forced = frame[2:]
            _, fast_logits = frame_runner(hidden, frame[1:2], window, zero, zero, zero + 1, gumbel, forced, _TRUE)
            return logits[c.semantic_begin_id :], fast_logits
        codes = self._codebooks(hidden, frame[1], lambda index, _: frame[index + 1])
        return logits[c.semantic_begin_id :], _stacked(codes, hidden, c.codebook_size)

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
        *,
        greedy: bool,
    ) -> tuple[Tensor, Tensor]:
        """The tokens of one frame ``[C+1]`` (semantic id, then the code of every codebook), and the
        logits ``[C-1, codebook_size]`` codebooks 1..C-1 were drawn from."""
        c = self.model.config
        params = (temperature, top_p, repetition_penalty)
        allowed = self.allowed_ids
        gumbel = None if greedy else gumbel_noise(uniform_noise(seed, position, 0, allowed))
        main = allowed[sample_token(logits[allowed] + self.logit_bias[allowed], allowed, window[0], *params, gumbel)]
        codes_gumbel = None
        if not greedy:  # one row of noise per codebook, computed only for a draw
            codes_ids = self.code_ids + c.codebook_size * self.fast_positions[:, None]
            codes_gumbel = gumbel_noise(uniform_noise(seed, position, 1, codes_ids))
        tokens = [main, (main - c.semantic_begin_id).clamp_min(0)]
        frame_runner = getattr(self.model, "frame_runner", None)
        if frame_runner is not None:
            rows = c.num_codebooks - 1
            rows_gumbel = hidden.new_zeros((rows, c.codebook_size)) if codes_gumbel is None else codes_gumbel[1:]
            unforced = torch.zeros(rows, dtype=torch.long, device=hidden.device)
            codes, fast_logits = frame_runner(
                hidden, tokens[1].reshape(1), window[2:], *params, rows_gumbel, unforced, _FALSE
            )
            return torch.cat([torch.stack(tokens), codes]), fast_logits

        def draw(index: int, fast_logits: Tensor) -> Tensor:
            row = None if codes_gumbel is None else codes_gumbel[index]
            tokens.append(sample_token(fast_logits, self.code_ids, window[index + 1], *params, row))
            return tokens[-1]

        scores = self._codebooks(hidden, tokens[1], draw)
        return torch.stack(tokens), _stacked(scores, hidden, c.codebook_size)


def _stacked(logits: list[Tensor], like: Tensor, width: int) -> Tensor:
    """``logits`` stacked ``[len, width]`` (``[0, width]`` for none: a model with one codebook)."""
    return torch.stack(logits) if logits else like.new_zeros(0, width)


def decoder_component(
    module: nn.Module,
    example_inputs: tuple[Tensor, ...],
    input_names: tuple[str, ...],
    teacher_forcing: Callable[[tuple[Tensor, ...], Tensor], tuple[Tensor, ...]],
    calibration_inputs: tuple[tuple[Tensor, ...], ...] = (),
    decode_steps: DecodeSteps | None = None,
    free_run_with_scores: Callable[..., tuple[Tensor, tuple[Tensor, Tensor]]] | None = None,
) -> Component:
    """A decode loop as a uniopt component: a prompt in, frames ``[1, C+1, steps]`` out.

    Judged step by step under teacher forcing, on the steps the reference is sure of. Exporting
    the loop unrolls every step and codebook (minutes even for a tiny model), so whole-graph
    backends are ruled out; ``decode_steps`` lets step-level backends serve the loop's steps.
    """
    return Component(
        name="decoder",
        module=module,
        example_inputs=example_inputs,
        input_names=input_names,
        output_names=("tokens",),
        dynamic_axes={"prompt": {2: "prompt_frames"}},
        metric=Metric("token_agreement", 0.9),
        teacher_forcing=teacher_forcing,
        free_run_with_scores=free_run_with_scores,
        kind="decoder",
        exporter="none",
        calibration_inputs=calibration_inputs,
        decode_steps=decode_steps,
    )


def decode_steps(generator: TokenGenerator) -> DecodeSteps:
    """The slow and fast decode steps of ``generator``'s model, for step-level backends."""
    from .frame import frame_graph
    from .steps import DualARParts, dual_ar_decode_steps

    model = generator.model
    rows = generator.allowed_ids

    def logits(normed: Tensor) -> Tensor:
        """The output projection at the ids the loop reads: those rows of the tied embedding alone."""
        return F.linear(normed, model.embeddings.weight.index_select(0, rows))

    parts = DualARParts(
        model=model,
        embed=model.embed,
        logits=logits,
        rope=(model.rope_cos, model.rope_sin),
        fast_rope=(model.fast_rope_cos, model.fast_rope_sin),
        num_codebooks=model.config.num_codebooks,
        max_positions=model.cache_length(),
        logit_rows=rows,
        vocab_size=model.config.vocab_size,
    )
    frame = frame_graph(parts, model.config.codebook_size, generator.repetition_window)
    return dual_ar_decode_steps(generator, parts, frame=frame)
