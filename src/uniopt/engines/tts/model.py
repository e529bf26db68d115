"""A dual autoregressive transformer shaped like Fish-Speech S1-mini's ``DualARTransformer``.

The slow decoder runs over time: token embedding plus the summed codebook embeddings of audio
frames, Qwen3-style pre-RMSNorm blocks (fused ``wqkv``, grouped-query attention, RoPE, q/k
RMSNorm, SwiGLU), a final norm and an output projection through the tied token embedding. The
fast decoder runs over the codebooks of one frame. Both keep preallocated key/value caches in
buffers that decode steps update in place at ``input_pos``, as the original does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from .layers import Attention, KVCache, TiedOutputProjection, TransformerBlock, rope_tables

__all__ = ["DualARConfig", "DualARTransformer"]


@dataclass(frozen=True)
class DualARConfig:
    """Sizes of the slow (time) and fast (codebook) decoders.

    The defaults give about 202 M parameters: a 12-layer slow decoder of width 1024 and a 4-layer
    fast decoder of width 512 (run ten times a frame, it reads about as many weights as the slow one).

    The last ``codebook_size`` ids of the vocabulary are semantic tokens: id
    ``semantic_begin_id + c`` stands for code ``c`` of the first codebook.
    """

    vocab_size: int = 32000
    dim: int = 1024
    n_layer: int = 12
    n_head: int = 16
    n_local_heads: int = 4
    head_dim: int = 64
    intermediate_size: int = 3072
    fast_dim: int = 512
    n_fast_layer: int = 4
    fast_n_head: int = 8
    fast_n_local_heads: int = 2
    fast_head_dim: int = 64
    fast_intermediate_size: int = 1536
    num_codebooks: int = 10
    codebook_size: int = 1024
    max_seq_len: int = 1024
    rope_base: float = 1_000_000.0
    norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for heads, local in ((self.n_head, self.n_local_heads), (self.fast_n_head, self.fast_n_local_heads)):
            if heads % local:
                raise ValueError(f"n_head {heads} must be a multiple of n_local_heads {local}")
        if self.head_dim % 2 or self.fast_head_dim % 2:
            raise ValueError("head_dim and fast_head_dim must be even (RoPE rotates pairs)")
        if self.vocab_size < 256 + 8 + self.codebook_size:
            raise ValueError("vocab_size must hold 256 byte tokens, the special tokens and the semantic tokens")
        if self.num_codebooks < 1 or self.max_seq_len < 2:
            raise ValueError("num_codebooks must be >= 1 and max_seq_len >= 2")

    @property
    def semantic_begin_id(self) -> int:
        """The id of the semantic token for code 0 of the first codebook."""
        return self.vocab_size - self.codebook_size


class DualARTransformer(nn.Module):
    """Slow decoder over time and fast decoder over codebooks (random weights from a config).

    Tokens are ``[b, num_codebooks + 1, L]``: row 0 holds text/special/semantic ids, rows 1..
    the codes of each codebook (used only where row 0 is a semantic token).
    """

    rope_cos: Tensor
    rope_sin: Tensor
    fast_rope_cos: Tensor
    fast_rope_sin: Tensor
    causal_mask: Tensor
    codebook_offsets: Tensor

    def __init__(self, config: DualARConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.codebook_embeddings = nn.Embedding(c.codebook_size * c.num_codebooks, c.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(c.dim, c.n_head, c.n_local_heads, c.head_dim, c.intermediate_size, c.norm_eps)
            for _ in range(c.n_layer)
        )
        self.norm = nn.RMSNorm(c.dim, eps=c.norm_eps)
        self.output = TiedOutputProjection(self.embeddings)
        self.fast_project_in: nn.Module = nn.Linear(c.dim, c.fast_dim) if c.fast_dim != c.dim else nn.Identity()
        self.fast_embeddings = nn.Embedding(c.codebook_size, c.fast_dim)
        self.fast_layers = nn.ModuleList(
            TransformerBlock(
                c.fast_dim, c.fast_n_head, c.fast_n_local_heads, c.fast_head_dim, c.fast_intermediate_size, c.norm_eps
            )
            for _ in range(c.n_fast_layer)
        )
        self.fast_norm = nn.RMSNorm(c.fast_dim, eps=c.norm_eps)
        self.fast_output = nn.Linear(c.fast_dim, c.codebook_size, bias=False)
        cos, sin = rope_tables(c.max_seq_len, c.head_dim, c.rope_base)
        fast_cos, fast_sin = rope_tables(c.num_codebooks, c.fast_head_dim, c.rope_base)
        for name, value in (
            ("rope_cos", cos),
            ("rope_sin", sin),
            ("fast_rope_cos", fast_cos),
            ("fast_rope_sin", fast_sin),
        ):
            self.register_buffer(name, value, persistent=False)
        self.register_buffer(
            "causal_mask", torch.ones(c.max_seq_len, c.max_seq_len, dtype=torch.bool).tril(), persistent=False
        )
        self.register_buffer("codebook_offsets", torch.arange(c.num_codebooks) * c.codebook_size, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    # -- caches -----------------------------------------------------------------------------------
    def attention_layers(self) -> list[Attention]:
        """The attention modules of the slow then the fast decoder."""
        return [cast(TransformerBlock, block).attention for block in (*self.layers, *self.fast_layers)]

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate the key/value caches (no-op when the existing ones are large enough)."""
        cache = self.attention_layers()[0].kv_cache
        if cache is not None and cache.k_cache.shape[0] >= max_batch_size and cache.k_cache.shape[2] >= max_seq_len:
            return
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's {self.config.max_seq_len}")
        dtype = dtype or self.embeddings.weight.dtype
        c = self.config
        attentions = self.attention_layers()
        for attention in attentions[: c.n_layer]:
            attention.kv_cache = KVCache(max_batch_size, max_seq_len, c.n_local_heads, c.head_dim, dtype)
        for attention in attentions[c.n_layer :]:
            attention.kv_cache = KVCache(max_batch_size, c.num_codebooks, c.fast_n_local_heads, c.fast_head_dim, dtype)

    def reset_caches(self) -> None:
        """Zero every key/value cache."""
        for attention in self.attention_layers():
            if attention.kv_cache is not None:
                attention.kv_cache.k_cache.zero_()
                attention.kv_cache.v_cache.zero_()

    def cache_length(self) -> int:
        """Positions the slow cache holds (0 before :meth:`setup_caches`)."""
        cache = self.attention_layers()[0].kv_cache
        return 0 if cache is None else int(cache.k_cache.shape[2])

    # -- slow decoder -------------------------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        """Token embedding plus the codebook embeddings summed, the latter only on semantic positions."""
        codes = self.codebook_embeddings(tokens[:, 1:] + self.codebook_offsets[None, :, None]).sum(dim=1)
        semantic = (tokens[:, 0] >= self.config.semantic_begin_id).unsqueeze(-1)
        return self.embeddings(tokens[:, 0]) + codes * semantic.to(codes.dtype)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Full causal pass without caches: logits ``[b, L, vocab]`` and hidden states ``[b, L, dim]``."""
        length = tokens.shape[-1]
        x = self.embed(tokens)
        mask = self.causal_mask[None, None, :length, :length]
        for layer in self.layers:
            x = layer(x, self.rope_cos[:length], self.rope_sin[:length], mask)
        return self.output(self.norm(x)), x

    def forward_generate(self, tokens: Tensor, input_pos: Tensor, attend: int = 0) -> tuple[Tensor, Tensor]:
        """Cached pass at ``input_pos``: logits ``[b, 1, vocab]`` and fast-decoder input ``[b, 1, fast_dim]``
        of the last position.

        By default every step attends to the whole preallocated cache under a causal mask, as
        Fish-Speech does; ``attend`` (the filled length, ``input_pos[-1] + 1``) reads only that part.
        """
        x = self.embed(tokens)
        mask = _step_mask(self.causal_mask, input_pos, attend or self.cache_length(), attend)
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos, attend)
        x = x[:, -1:]
        return self.output(self.norm(x)), self.fast_project_in(x)

    # -- fast decoder ---------------------------------------------------------------------------------
    def forward_generate_fast(self, x: Tensor, input_pos: Tensor, attend: int = 0) -> Tensor:
        """One cached fast-decoder step at codebook position ``input_pos``: logits ``[b, 1, codebook_size]``.

        ``attend`` as in :meth:`forward_generate` (``input_pos + 1``).
        """
        x = x.view(x.shape[0], 1, -1)
        mask = _step_mask(self.causal_mask, input_pos, attend or self.config.num_codebooks, attend)
        cos, sin = self.fast_rope_cos[input_pos], self.fast_rope_sin[input_pos]
        for layer in self.fast_layers:
            x = layer(x, cos, sin, mask, input_pos, attend)
        return self.fast_output(self.fast_norm(x))

    def forward_fast(self, hidden: Tensor, codes: Tensor) -> Tensor:
        """Full fast pass without caches: ``hidden [b, fast_dim]`` then codes ``[b, n]`` of codebooks
        0..n-1; logits ``[b, n + 1, codebook_size]`` (position ``i`` predicts codebook ``i``)."""
        x = torch.cat([hidden[:, None], self.fast_embeddings(codes)], dim=1)
        length = x.shape[1]
        mask = self.causal_mask[None, None, :length, :length]
        for layer in self.fast_layers:
            x = layer(x, self.fast_rope_cos[:length], self.fast_rope_sin[:length], mask)
        return self.fast_output(self.fast_norm(x))


def _step_mask(causal: Tensor, input_pos: Tensor, length: int, attend: int) -> Tensor | None:
    """The causal mask rows of ``input_pos`` over ``length`` keys; None for a single query that
    attends to exactly the filled positions (every key is visible)."""
    if attend and input_pos.shape[0] == 1:
        return None
    return causal[None, None, input_pos, :length]
