"""Building blocks of the dual autoregressive transformer, as in Fish-Speech's ``llama.py``.

Qwen3-style pre-RMSNorm blocks: fused ``wqkv``, grouped-query attention with q/k RMSNorm and
RoPE on interleaved pairs, SwiGLU; key/value caches preallocated in buffers and updated in place
at ``input_pos``; and the output projection tied to the token embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Attention",
    "FeedForward",
    "KVCache",
    "TiedOutputProjection",
    "TransformerBlock",
    "apply_rope",
    "grouped_attention",
    "rope_tables",
]


def rope_tables(length: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin tables, ``[length, head_dim // 2]``, for rotating interleaved pairs."""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float64), freqs)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs ``(x[2i], x[2i+1])`` of ``x [b, L, heads, d]``; ``cos``/``sin`` are ``[L, d/2]``."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :].to(x.dtype), sin[None, :, None, :].to(x.dtype)
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)


class KVCache(nn.Module):
    """Preallocated keys and values ``[batch, kv_heads, length, head_dim]``, written in place."""

    k_cache: Tensor
    v_cache: Tensor

    def __init__(self, max_batch: int, length: int, n_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (max_batch, n_heads, length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k``/``v`` ``[b, heads, len(input_pos), d]`` at ``input_pos``; return the whole cache."""
        self.k_cache[:, :, input_pos] = k.to(self.k_cache.dtype)
        self.v_cache[:, :, input_pos] = v.to(self.v_cache.dtype)
        return self.k_cache, self.v_cache

    def extra_repr(self) -> str:
        return f"shape={tuple(self.k_cache.shape)}"


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Grouped-query attention without copying keys: query heads of a group share a kv head.

    ``q [b, H, L, d]``, ``k``/``v [b, Hkv, S, d]``, boolean ``mask [1, 1, L, S]`` (True = attend;
    None: every query attends to every key). Query head ``h`` uses kv head ``h // (H // Hkv)``,
    as ``repeat_interleave`` would.
    """
    b, heads, length, d = q.shape
    groups = heads // k.shape[1]
    folded = q.reshape(b, k.shape[1], groups * length, d)
    if mask is not None:
        mask = mask.repeat(1, 1, groups, 1)
    y = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask)
    return y.reshape(b, heads, length, d)


class Attention(nn.Module):
    """Fused-qkv grouped-query attention with q/k RMSNorm and RoPE."""

    def __init__(self, dim: int, n_head: int, n_local_heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = n_head, n_local_heads, head_dim
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_local_heads) * head_dim, bias=False)
        self.wo = nn.Linear(n_head * head_dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(head_dim, eps=eps)
        self.k_norm = nn.RMSNorm(head_dim, eps=eps)
        self.kv_cache: KVCache | None = None

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None = None, attend: int = 0
    ) -> Tensor:
        """``attend`` > 0 attends to the first ``attend`` cache positions only (``mask`` covers them)."""
        b, length, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(self.q_norm(q.view(b, length, self.n_head, self.head_dim)), cos, sin)
        k = apply_rope(self.k_norm(k.view(b, length, self.n_local_heads, self.head_dim)), cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, length, self.n_local_heads, self.head_dim).transpose(1, 2)
        if input_pos is not None and self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            if attend:
                k, v = k[:, :, :attend], v[:, :, :attend]
        y = grouped_attention(q, k, v, mask)
        return self.wo(y.transpose(1, 2).reshape(b, length, q_size))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-RMSNorm block: attention then SwiGLU, each with a residual connection."""

    def __init__(self, dim: int, n_head: int, n_local_heads: int, head_dim: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(dim, eps=eps)
        self.attention = Attention(dim, n_head, n_local_heads, head_dim, eps)
        self.ffn_norm = nn.RMSNorm(dim, eps=eps)
        self.feed_forward = FeedForward(dim, hidden)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, input_pos: Tensor | None = None, attend: int = 0
    ) -> Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos, attend)
        return h + self.feed_forward(self.ffn_norm(h))


class TiedOutputProjection(nn.Module):
    """``F.linear(x, embedding.weight)``: the output projection tied to the token embedding.

    ``quantize_dynamic`` only sees ``nn.Linear`` modules, so it leaves this projection in FP32;
    :meth:`to_linear` gives an untied ``nn.Linear`` with the same weight that it can quantize.
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.embedding.weight)

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` holding a copy of the embedding weight (no bias)."""
        weight = self.embedding.weight
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
        return linear
