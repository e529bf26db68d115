"""The decoder blocks on ONNX Runtime's fused CPU ops, for step graphs traced within ``onnx_ops``.

Per layer, :func:`onnx_blocks` writes one ``com.microsoft::GroupQueryAttention`` node (the packed
queries, keys and values in; RoPE on the halves, the grouping, the causal mask and the caches'
concatenation inside; the present caches out) and one ``com.microsoft::SkipSimplifiedLayerNormalization``
per residual add followed by an RMS norm, so a layer is about 15 nodes where the plain form
spells out dozens. The q/k head norms (ONNX Runtime's CPU attention does not take their weights)
are one ``RMSNormalization`` over the query and key heads together, with a per-head scale.

The attention takes its positions from the caches: a step's tokens sit right after the past
positions (``continued_length`` holds every step runner to that), and ``positions`` only gives
the op its sequence lengths. The symbolic ops carry shapes, not values: these blocks are only
ever traced for an export, never run in PyTorch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import NotApplicable
from .steps import feed_forward, halves_order, reordered_qkv

__all__ = ["onnx_blocks"]

#: Opset versions of the symbolic nodes: ONNX's ``RMSNormalization`` and ONNX Runtime's contrib ops.
ONNX_OPSET, CONTRIB_OPSET = 23, 1
#: ONNX Runtime's CPU ``GroupQueryAttention`` takes head sizes that are multiples of this.
HEAD_SIZE_MULTIPLE = 16


def _rms_parts(norm: Any) -> tuple[Tensor, float] | None:
    """The weight and epsilon of an RMS norm over the last axis: ``torch.nn.RMSNorm`` or a module of
    Fish-Speech's own ``RMSNorm`` form (a 1-D ``weight``, a float ``eps``); None for any other norm."""
    if isinstance(norm, nn.RMSNorm):
        if norm.weight is None or len(norm.normalized_shape) != 1:
            return None
        return norm.weight, norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
    weight, eps = getattr(norm, "weight", None), getattr(norm, "eps", None)
    if type(norm).__name__ == "RMSNorm" and isinstance(weight, Tensor) and weight.dim() == 1 and isinstance(eps, float):
        return weight, eps
    return None


def _add_and_norm(x: Tensor, skip: Tensor, norm: Any) -> tuple[Tensor, Tensor]:
    """``(norm(x + skip), x + skip)``: one ``SkipSimplifiedLayerNormalization`` where ``norm`` is an RMS norm."""
    parts = _rms_parts(norm)
    if parts is None:
        total = x + skip
        return norm(total), total
    weight, eps = parts
    normed, _, _, total = torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::SkipSimplifiedLayerNormalization",
        [x, skip, weight],
        {"epsilon": float(eps)},
        dtypes=[x.dtype] * 4,
        shapes=[x.shape, (*x.shape[:-1], 1), (*x.shape[:-1], 1), x.shape],
        version=CONTRIB_OPSET,
    )
    return normed, total


def _norm(x: Tensor, norm: Any) -> Tensor:
    parts = _rms_parts(norm)
    if parts is None:
        return norm(x)  # type: ignore[no-any-return]
    weight, eps = parts
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _normed_heads(attention: Any, qkv: Tensor) -> Tensor:
    """``qkv [b, L, (H + 2 Hkv) d]`` with each query and key head RMS-normed by ``q_norm`` / ``k_norm``
    (dims in :func:`halves_order`): one norm over the query and key heads, a scale per head."""
    q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
    if q_norm is None or k_norm is None:
        return qkv
    q_parts, k_parts = _rms_parts(q_norm), _rms_parts(k_norm)
    if q_parts is None or k_parts is None or q_parts[1] != k_parts[1]:
        raise TypeError("q/k norms must be RMS norms with one epsilon to run on ONNX Runtime's attention")
    b, length, _ = qkv.shape
    heads, kv_heads, head_dim = attention.n_head, attention.n_local_heads, attention.head_dim
    order = halves_order(head_dim)
    scale = torch.cat(
        [q_parts[0].index_select(0, order).expand(heads, -1), k_parts[0].index_select(0, order).expand(kv_heads, -1)]
    )
    qk, v = qkv.split([(heads + kv_heads) * head_dim, kv_heads * head_dim], dim=-1)
    shape = (b, length, heads + kv_heads, head_dim)
    normed = torch.onnx.ops.symbolic(
        "RMSNormalization",
        [qk.reshape(shape), scale],
        {"axis": -1, "epsilon": float(q_parts[1])},
        dtype=qkv.dtype,
        shape=shape,
        version=ONNX_OPSET,
    )
    return torch.cat([normed.reshape(b, length, -1), v], dim=-1)


def _attention(
    attention: Any, x: Tensor, rope: tuple[Tensor, Tensor], lengths: tuple[Tensor, Tensor], past: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """A Fish-Speech attention of ``x [b, L, dim]`` as one ``GroupQueryAttention``: its output, the present caches."""
    b, length, _ = x.shape
    heads, kv_heads, head_dim = attention.n_head, attention.n_local_heads, attention.head_dim
    if head_dim % HEAD_SIZE_MULTIPLE:
        raise NotApplicable(
            f"ONNX Runtime's GroupQueryAttention takes head sizes that are multiples of {HEAD_SIZE_MULTIPLE}; "
            f"this decoder's are {head_dim}"
        )
    qkv = _normed_heads(attention, reordered_qkv(attention, x))
    past_key, past_value = past
    cache = (b, kv_heads, past_key.shape[2] + length, head_dim)
    y, present_key, present_value = torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::GroupQueryAttention",
        [qkv, None, None, past_key, past_value, *lengths, *rope],
        {"num_heads": heads, "kv_num_heads": kv_heads, "do_rotary": 1, "rotary_interleaved": 0},
        dtypes=[x.dtype] * 3,
        shapes=[(b, length, heads * head_dim), cache, cache],
        version=CONTRIB_OPSET,
    )
    return attention.wo(y), present_key, present_value


def onnx_blocks(
    blocks: Any, x: Tensor, rope: tuple[Tensor, Tensor], positions: Tensor, past: tuple[Tensor, ...]
) -> tuple[Tensor, list[Tensor]]:
    """``_blocks`` in the ONNX Runtime form: pre-RMSNorm blocks over ``x`` at ``positions`` (right after
    the past caches' positions), RoPE tables ``rope`` ``[max positions, d/2]``; the new caches."""
    # The attention's sequence lengths: the last position (int32 [1]) and the total (int32 scalar).
    lengths = (positions[-1:].to(torch.int32), (positions[-1] + 1).to(torch.int32))
    present: list[Tensor] = []
    normed = _norm(x, blocks[0].attention_norm)
    for index, block in enumerate(blocks):
        out, key, value = _attention(block.attention, normed, rope, lengths, (past[2 * index], past[2 * index + 1]))
        ffn_in, h = _add_and_norm(out, x, block.ffn_norm)
        out = feed_forward(block.feed_forward, ffn_in)
        if index + 1 < len(blocks):
            normed, x = _add_and_norm(out, h, blocks[index + 1].attention_norm)
        else:
            x = h + out
        present += [key, value]
    return x, present
