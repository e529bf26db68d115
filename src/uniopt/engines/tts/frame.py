"""The fast decoder's codebook loop of one frame as one module, its key/value cache inside.

:class:`FastFrame` runs what the decode loop does per frame after the slow step: the fast decoder
primed with the slow hidden state, then fed codebook 0's code, each next code drawn by
:func:`~uniopt.engines.tts.generation.sample_token` from the frame's seeded noise, or taken from
``forced`` (teacher forcing). The cache grows as tensors inside the module (it starts empty every
frame), so a graph backend runs a frame's C-1 codebooks in one call, with no state to keep.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...optimizer.steps import FrameGraph
from .generation import sample_token
from .steps import DualARParts, _blocks

__all__ = ["FastFrame", "frame_graph", "frame_inputs"]


class FastFrame(nn.Module):
    """``(hidden [1, 1, fast_dim], code [1], window [C-1, W], temperature, top_p, repetition_penalty,
    gumbel [C-1, K], forced [C-1], use_forced) -> (codes [C-1], logits [C-1, K])``.

    ``window`` holds the repetition-window rows of codebooks 1..C-1, ``gumbel`` the Gumbel noise
    of their draws (:func:`~uniopt.engines.tts.generation.gumbel_noise` of their uniforms, computed
    outside the graph; any finite values when ``temperature == 0``), ``K`` the codes scored (the
    fast logits cut to ``limit``). With ``use_forced`` true (0-d bool) the codes fed on are ``forced``.
    """

    code_ids: Tensor
    positions: Tensor

    def __init__(self, parts: DualARParts, limit: int) -> None:
        super().__init__()
        self.model = parts.model
        self.parts = parts
        self.limit = limit
        self.register_buffer("code_ids", torch.arange(limit), persistent=False)
        self.register_buffer("positions", torch.arange(parts.num_codebooks), persistent=False)

    def forward(
        self,
        hidden: Tensor,
        code: Tensor,
        window: Tensor,
        temperature: Tensor,
        top_p: Tensor,
        repetition_penalty: Tensor,
        gumbel: Tensor,
        forced: Tensor,
        use_forced: Tensor,
    ) -> tuple[Tensor, Tensor]:
        parts, model = self.parts, self.parts.model
        attention = parts.fast_layers[0].attention
        empty = hidden.new_zeros(1, attention.n_local_heads, 0, attention.head_dim)
        past: tuple[Tensor, ...] = tuple(empty for _ in range(2 * len(parts.fast_layers)))
        x, codes, scores = hidden.reshape(1, 1, -1).float(), [], []
        for index in range(parts.num_codebooks):
            position = self.positions[index : index + 1]
            out, present = _blocks(parts.fast_layers, x, parts.fast_rope, position, past, expand_groups=False)
            past = tuple(present)
            if index > 0:
                logits = model.fast_output(model.fast_norm(out))[0, -1, : self.limit]
                drawn = sample_token(
                    logits, self.code_ids, window[index - 1], temperature, top_p, repetition_penalty, gumbel[index - 1]
                )
                code = torch.where(use_forced, forced[index - 1], drawn).reshape(1)
                codes.append(code)
                scores.append(logits)
            if index + 1 < parts.num_codebooks:
                x = model.fast_embeddings(code).reshape(1, 1, -1).float()
        if not codes:
            return code.new_zeros(0), hidden.new_zeros(0, self.limit)
        return torch.cat(codes), torch.stack(scores)


def frame_inputs(parts: DualARParts, limit: int, window: int) -> tuple[Tensor, ...]:
    """Example inputs of :class:`FastFrame` (greedy, not forced), for tracing."""
    rows = parts.num_codebooks - 1
    fast_dim = parts.fast_layers[0].attention_norm.weight.shape[0]
    return (
        torch.zeros(1, 1, fast_dim),
        torch.zeros(1, dtype=torch.long),
        torch.full((rows, window), -1, dtype=torch.long),
        torch.tensor(0.0),
        torch.tensor(0.9),
        torch.tensor(1.1),
        torch.zeros(rows, limit),
        torch.zeros(rows, dtype=torch.long),
        torch.tensor(False),
    )


def frame_graph(parts: DualARParts, limit: int, window: int) -> FrameGraph:
    """:class:`FastFrame` over ``parts`` as the frame graph of the decode steps (named ``frame``).

    It runs every fast-decoder step of a frame, so it replaces the ``fast`` step graph.
    """
    return FrameGraph(
        name="frame",
        module=FastFrame(parts, limit),
        example_inputs=frame_inputs(parts, limit, window),
        input_names=(
            "hidden",
            "code",
            "window",
            "temperature",
            "top_p",
            "repetition_penalty",
            "gumbel",
            "forced",
            "use_forced",
        ),
        output_names=("codes", "logits"),
        replaces="fast",
    )
