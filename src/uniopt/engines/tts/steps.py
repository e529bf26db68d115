"""Decode steps of a dual autoregressive transformer, with explicit key/value caches.

The model's own ``forward_generate`` / ``forward_generate_fast`` write their caches in place at
``input_pos``, which no graph backend keeps between calls. :class:`SlowStep` and :class:`FastStep`
compute the same steps from the same weights with the caches as inputs (``past``, positions
``0..P-1``) and outputs (``present``: ``past`` with the step's keys and values appended), which a
stateful backend turns into state it keeps between calls. :class:`StepModel` stands in for the
model inside the engine's own decode loop and serves those two methods from step runners, so the
loop, its sampling and its teacher forcing stay the engine's code.

:class:`DualARParts` names what the steps need of a model, so the built-in ``DualARTransformer``
and ``fish_speech``'s share them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...optimizer.install import twin
from ...optimizer.steps import (
    DecodeSteps,
    FrameGraph,
    StepGraph,
    StepRunner,
    onnx_ops_on,
    past_names,
    present_names,
)

__all__ = ["DualARParts", "FastStep", "SlowStep", "StepModel", "attention_step", "dual_ar_decode_steps"]


def halves_order(head_dim: int) -> Tensor:
    """A head's dims reordered, even ones first, then odd ones.

    Rotating the pairs ``(2i, 2i+1)`` of a head (Fish-Speech's RoPE) is rotating its halves
    ``(i, i + head_dim/2)`` once its dims are in this order. Queries and keys reordered alike give
    the same attention, and the halves form is the one graph backends fuse into a single RoPE op.
    """
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def rotation_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin ``[L, d/2]`` of the pairs as tables ``[1, L, 1, d]`` for :func:`rotate_halves`."""
    return torch.cat([cos, cos], dim=-1)[None, :, None, :], torch.cat([sin, sin], dim=-1)[None, :, None, :]


def rotate_halves(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on the halves of ``x [b, L, heads, d]`` (dims in :func:`halves_order`); tables from
    :func:`rotation_tables`."""
    half = x.shape[-1] // 2
    rotated = torch.cat([x[..., half:] * -1.0, x[..., :half]], dim=-1)  # a product by -1, as the fusion expects
    return x * cos + rotated * sin


def _head_norm(norm: Any, x: Tensor, order: Tensor) -> Tensor:
    """``norm`` (an ``nn.RMSNorm`` over a head's dims) of ``x`` whose dims are in ``order``."""
    if not isinstance(norm, nn.RMSNorm):
        raise TypeError(f"q/k norms must be torch.nn.RMSNorm to run as decode steps; got {type(norm).__name__}")
    weight = None if norm.weight is None else norm.weight.index_select(0, order)
    return F.rms_norm(x, norm.normalized_shape, weight, norm.eps)


def reordered_qkv(attention: Any, x: Tensor) -> Tensor:
    """``wqkv(x)`` with each query and key head's dims in :func:`halves_order`, the values as they are:
    ``wqkv``'s rows reordered (a graph backend folds the reordered weight into a constant)."""
    heads, kv_heads, head_dim = attention.n_head, attention.n_local_heads, attention.head_dim
    starts = torch.arange(heads + kv_heads)[:, None] * head_dim
    ordered = (starts + halves_order(head_dim)).flatten()
    rows = torch.cat([ordered, torch.arange((heads + kv_heads) * head_dim, (heads + 2 * kv_heads) * head_dim)])
    wqkv = attention.wqkv
    bias = None if wqkv.bias is None else wqkv.bias.index_select(0, rows)
    return F.linear(x, wqkv.weight.index_select(0, rows), bias)


def _projections(attention: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys ``[b, L, heads, d]`` (normed when the attention has q/k norms, dims in
    :func:`halves_order`) and values, from :func:`reordered_qkv`."""
    b, length, _ = x.shape
    heads, kv_heads, head_dim = attention.n_head, attention.n_local_heads, attention.head_dim
    qkv = reordered_qkv(attention, x)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(b, length, heads, head_dim), k.view(b, length, kv_heads, head_dim)
    q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
    if q_norm is not None and k_norm is not None:
        order = halves_order(head_dim)
        q, k = _head_norm(q_norm, q, order), _head_norm(k_norm, k, order)
    return q, k, v.view(b, length, kv_heads, head_dim)


def attention_step(
    attention: Any,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    visible: Tensor,
    past_key: Tensor,
    past_value: Tensor,
    expand_groups: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Grouped-query attention of ``x [1, L, dim]`` over the past keys and its own.

    ``attention`` is a Fish-Speech ``Attention`` (fused ``wqkv``, optional ``q_norm``/``k_norm``,
    RoPE on interleaved pairs, ``wo``); ``cos``/``sin`` come from :func:`rotation_tables`;
    ``visible [1, 1, L, P+L]`` says which keys each query sees. Returns the output and the caches
    with the step appended; the cached keys' dims are in :func:`halves_order`. Query head ``h``
    reads kv head ``h // groups``, as ``repeat_interleave`` gives: through keys and values expanded
    to every query head (``expand_groups``, the form OpenVINO fuses with stateful caches), or
    through the attention's own grouping (fewer ops where no cache state is kept).
    """
    b, length, _ = x.shape
    heads, kv_heads, head_dim = attention.n_head, attention.n_local_heads, attention.head_dim
    q, k, v = _projections(attention, x)
    q = rotate_halves(q, cos, sin).transpose(1, 2)
    k = torch.cat([past_key, rotate_halves(k, cos, sin).transpose(1, 2)], dim=2)
    v = torch.cat([past_value, v.transpose(1, 2)], dim=2)
    if expand_groups:
        keys, groups = k.shape[2], heads // kv_heads
        expanded_k = k[:, :, None].expand(b, kv_heads, groups, keys, head_dim).reshape(b, heads, keys, head_dim)
        expanded_v = v[:, :, None].expand(b, kv_heads, groups, keys, head_dim).reshape(b, heads, keys, head_dim)
        y = F.scaled_dot_product_attention(q, expanded_k, expanded_v, attn_mask=visible)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
    return attention.wo(y.transpose(1, 2).reshape(b, length, heads * head_dim)), k, v


def feed_forward(ff: Any, x: Tensor) -> Tensor:
    """Fish-Speech's SwiGLU, ``w2(silu(w1 x) * w3 x)``, with the gate and up projections as one matmul
    over their weights stacked (a constant once a graph backend folds it). A feed-forward of another
    form (no ``w1``/``w3`` Linear layers, or biases) runs as it is."""
    w1, w3 = getattr(ff, "w1", None), getattr(ff, "w3", None)
    if not (isinstance(w1, nn.Linear) and isinstance(w3, nn.Linear)) or w1.bias is not None or w3.bias is not None:
        return ff(x)
    gate, up = F.linear(x, torch.cat([w1.weight, w3.weight])).split([w1.out_features, w3.out_features], dim=-1)
    return ff.w2(F.silu(gate) * up)


def _blocks(
    blocks: Any,
    x: Tensor,
    rope: tuple[Tensor, Tensor],
    positions: Tensor,
    past: tuple[Tensor, ...],
    expand_groups: bool = True,
) -> tuple[Tensor, list[Tensor]]:
    """Pre-RMSNorm blocks (attention then SwiGLU, residuals) over ``x`` at ``positions``, RoPE tables
    ``rope`` (cos, sin ``[max positions, d/2]``); the new caches, key then value per layer. Each
    query sees the keys at positions up to its own; ``expand_groups`` as in :func:`attention_step`.
    Within :func:`~uniopt.optimizer.steps.onnx_ops`, the blocks are traced on ONNX Runtime's fused
    ops instead (:mod:`.onnx_blocks`)."""
    if onnx_ops_on():
        from .onnx_blocks import onnx_blocks  # it builds on this module's helpers

        return onnx_blocks(blocks, x, rope, positions, past)
    cos, sin = rotation_tables(rope[0][positions], rope[1][positions])
    keys = past[0].shape[2] + x.shape[1]
    visible = (torch.arange(keys, device=x.device)[None, :] <= positions[:, None])[None, None]
    present: list[Tensor] = []
    for index, block in enumerate(blocks):
        normed = block.attention_norm(x)
        past_key, past_value = past[2 * index], past[2 * index + 1]
        out, k, v = attention_step(block.attention, normed, cos, sin, visible, past_key, past_value, expand_groups)
        h = x + out
        x = h + feed_forward(block.feed_forward, block.ffn_norm(h))
        present += [k, v]
    return x, present


@dataclass(frozen=True)
class DualARParts:
    """What the step graphs need of a dual autoregressive transformer.

    ``embed(tokens [1, C+1, L]) -> [1, L, dim]``; ``logits(normed [1, 1, dim]) -> [1, 1, vocab]``;
    ``rope`` / ``fast_rope`` are ``(cos, sin)`` tables ``[positions, head_dim / 2]``.

    ``logit_rows``, when given, are the ids of the slow logits the decode loop reads (the ids it
    can draw or scores); ``logits`` then returns those alone, ``[1, 1, len(logit_rows)]``, so the
    step graph reads only their rows of the output projection, and the step model hands the loop
    logits of ``vocab_size`` ids with ``-inf`` at every other id.
    """

    model: Any
    embed: Callable[[Tensor], Tensor]
    logits: Callable[[Tensor], Tensor]
    rope: tuple[Tensor, Tensor]
    fast_rope: tuple[Tensor, Tensor]
    num_codebooks: int
    max_positions: int
    logit_rows: Tensor | None = None
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if (self.logit_rows is None) != (self.vocab_size is None):
            raise ValueError("logit_rows and vocab_size are given together")

    def full_logits(self, logits: Tensor) -> Tensor:
        """The step graph's ``logits`` over all ``vocab_size`` ids: ``-inf`` at the ids not in ``logit_rows``."""
        if self.logit_rows is None or self.vocab_size is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        full[..., self.logit_rows] = logits
        return full

    @property
    def layers(self) -> Any:
        return self.model.layers

    @property
    def fast_layers(self) -> Any:
        return self.model.fast_layers


class SlowStep(nn.Module):
    """``(tokens [1, C+1, L], input_pos [L], *past) -> (logits [1, 1, vocab], hidden [1, 1, fast_dim], *present)``.

    The logits and fast-decoder input of the last position, as ``forward_generate`` gives them
    (the logits at ``parts.logit_rows`` alone when the parts name them).
    """

    def __init__(self, parts: DualARParts) -> None:
        super().__init__()
        self.model = parts.model
        self.parts = parts

    def forward(self, tokens: Tensor, input_pos: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        parts, model = self.parts, self.parts.model
        x, present = _blocks(parts.layers, parts.embed(tokens), parts.rope, input_pos, past)
        x = x[:, -1:]
        return (parts.logits(model.norm(x)), model.fast_project_in(x), *present)


class FastStep(nn.Module):
    """``(x [1, 1, fast_dim], input_pos [1], *past) -> (logits [1, 1, codebook_size], *present)``."""

    def __init__(self, parts: DualARParts) -> None:
        super().__init__()
        self.model = parts.model
        self.parts = parts

    def forward(self, x: Tensor, input_pos: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        parts, model = self.parts, self.parts.model
        x, present = _blocks(parts.fast_layers, x, parts.fast_rope, input_pos, past)
        return (model.fast_output(model.fast_norm(x)), *present)


class NoRunnerError(RuntimeError):
    """A step was called that no runner serves (the frame runner took over the fast decoder)."""


class StepModel(nn.Module):
    """The model as the engine's decode loop sees it, with its cached steps served by step runners.

    ``forward_generate`` / ``forward_generate_fast`` run the ``slow`` and ``fast`` runners (which
    keep the caches); ``frame_runner``, when given, runs a frame's whole codebook loop in one call
    (a :class:`~uniopt.engines.tts.frame.FastFrame`), and ``fast`` may then be None (a call of
    ``forward_generate_fast`` raises :class:`NoRunnerError`, which the backend's fallback turns into
    an eager call); every other attribute is the model's own.
    ``wrap_slow(logits, hidden)`` shapes the slow step's result as the model returns it (a tuple,
    or ``fish_speech``'s result object); ``full_logits`` widens the slow step's logits to the
    model's vocabulary (:meth:`DualARParts.full_logits`).
    """

    def __init__(
        self,
        model: nn.Module,
        slow: StepRunner,
        fast: StepRunner | None,
        wrap_slow: Callable[[Tensor, Tensor], Any] = lambda logits, hidden: (logits, hidden),
        frame: StepRunner | None = None,
        full_logits: Callable[[Tensor], Tensor] = lambda logits: logits,
    ) -> None:
        super().__init__()
        self.model = model
        self._slow, self._fast, self._wrap_slow, self._full_logits = slow, fast, wrap_slow, full_logits
        self.frame_runner = frame

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            return getattr(self._modules["model"], name)

    def forward_generate(self, tokens: Tensor, input_pos: Tensor, *args: Any, **kwargs: Any) -> Any:
        logits, hidden = self._slow(tokens, input_pos)
        return self._wrap_slow(self._full_logits(logits), hidden)

    def forward_generate_fast(self, x: Tensor, input_pos: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self._fast is None:
            raise NoRunnerError("the fast decoder's steps are served by the frame runner only")
        return self._fast(x.reshape(x.shape[0], 1, -1).float(), input_pos)[0]

    def reset_caches(self) -> None:
        """Nothing to do: a step at position 0 starts a new sequence in its runner."""


def _graphs(parts: DualARParts, prompt_rows: int) -> tuple[StepGraph, StepGraph]:
    slow_attention, fast_attention = parts.layers[0].attention, parts.fast_layers[0].attention
    n_slow, n_fast = len(parts.layers), len(parts.fast_layers)
    tokens = torch.zeros(1, prompt_rows, 3, dtype=torch.long)
    fast_dim = parts.fast_layers[0].attention_norm.weight.shape[0]
    slow = StepGraph(
        name="slow",
        module=SlowStep(parts),
        example_inputs=(tokens, torch.arange(2, 5)),
        input_names=("tokens", "input_pos", *past_names(n_slow)),
        output_names=("logits", "hidden", *present_names(n_slow)),
        input_shapes=((1, prompt_rows, -1), (-1,)),
        position_input="input_pos",
        layers=n_slow,
        kv_heads=slow_attention.n_local_heads,
        head_dim=slow_attention.head_dim,
        max_positions=parts.max_positions,
    )
    fast = StepGraph(
        name="fast",
        module=FastStep(parts),
        example_inputs=(torch.zeros(1, 1, fast_dim), torch.tensor([2])),
        input_names=("x", "input_pos", *past_names(n_fast)),
        output_names=("logits", *present_names(n_fast)),
        input_shapes=((1, 1, fast_dim), (1,)),
        position_input="input_pos",
        layers=n_fast,
        kv_heads=fast_attention.n_local_heads,
        head_dim=fast_attention.head_dim,
        max_positions=parts.num_codebooks,
    )
    return slow, fast


def dual_ar_decode_steps(
    generator: nn.Module,
    parts: DualARParts,
    wrap_slow: Callable[[Tensor, Tensor], Any] | None = None,
    frame: FrameGraph | None = None,
) -> DecodeSteps:
    """:class:`DecodeSteps` for a decode loop module that calls ``generator.model``'s cached steps.

    The installed loop is a :func:`~uniopt.optimizer.install.twin` of ``generator`` (its weights and
    buffers, its class's forward) whose ``model`` is a :class:`StepModel` over the runners.
    """
    slow, fast = _graphs(parts, parts.num_codebooks + 1)

    def install(runners: Mapping[str, StepRunner]) -> nn.Module:
        extra = {} if wrap_slow is None else {"wrap_slow": wrap_slow}
        loop = twin(generator)  # never the forward an installation put on the engine's module
        loop.__dict__["_modules"] = {
            **generator._modules,
            "model": StepModel(
                parts.model,
                runners["slow"],
                runners.get("fast"),
                frame=runners.get("frame"),
                full_logits=parts.full_logits,
                **extra,
            ),
        }
        return loop

    return DecodeSteps((slow, fast), install, frame)
