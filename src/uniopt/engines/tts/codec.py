"""A DAC-style codec decoder: codebook codes to 44.1 kHz audio, causal, ``hop_length`` samples a frame.

Codes ``[b, num_codebooks, frames]`` are embedded per codebook and summed, a causal Conv1d lifts
them to ``channels[0]``, then one block per stride upsamples (Snake, ConvTranspose1d) and refines
(three residual units with dilations 1, 3, 9); a final Snake, causal Conv1d and tanh give
``[b, 1, frames * hop_length]``. All padding is on the left, computed from the input length, so
the decoder runs at any number of frames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...optimizer.component import Component, Metric

__all__ = ["CodecConfig", "CodecDecoder", "Snake", "codec_component"]


@dataclass(frozen=True)
class CodecConfig:
    """Sizes of the codec decoder; ``channels`` has one entry more than ``strides``."""

    num_codebooks: int = 10
    codebook_size: int = 1024
    latent_dim: int = 256
    channels: tuple[int, ...] = (512, 256, 128, 64, 32, 16, 8)
    strides: tuple[int, ...] = (8, 8, 4, 2, 2, 2)
    sample_rate: int = 44_100

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.strides) + 1:
            raise ValueError("channels needs one entry more than strides")
        if min(self.strides) < 1 or min(self.channels) < 1:
            raise ValueError("strides and channels must be positive")

    @property
    def hop_length(self) -> int:
        """Audio samples per frame of codes."""
        return math.prod(self.strides)


class Snake(nn.Module):
    """``x + 1/alpha * sin(alpha * x)^2`` with a learnable ``alpha`` per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left by ``(kernel - 1) * dilation``: output length = input length."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, ((self.kernel_size[0] - 1) * self.dilation[0], 0)))


class CausalConvTranspose1d(nn.ConvTranspose1d):
    """Upsampling by ``stride`` with kernel ``2 * stride``; the trailing ``stride`` samples are cut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=2 * stride, stride=stride)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x)[..., : -self.stride[0]]


class ResidualUnit(nn.Module):
    """Snake, dilated causal conv (kernel 7), Snake, 1x1 conv, plus the input."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            Snake(channels),
            CausalConv1d(channels, channels, 7, dilation=dilation),
            Snake(channels),
            nn.Conv1d(channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class DecoderBlock(nn.Sequential):
    """Snake, transposed conv upsampling by ``stride``, three residual units."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(
            Snake(in_channels),
            CausalConvTranspose1d(in_channels, out_channels, stride),
            *(ResidualUnit(out_channels, d) for d in (1, 3, 9)),
        )


class CodecDecoder(nn.Module):
    """``forward(codes [b, num_codebooks, frames] long) -> audio [b, 1, frames * hop_length]`` in [-1, 1]."""

    codebook_offsets: Tensor

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.embeddings = nn.Embedding(c.num_codebooks * c.codebook_size, c.latent_dim)
        self.register_buffer("codebook_offsets", torch.arange(c.num_codebooks) * c.codebook_size, persistent=False)
        self.conv_in = CausalConv1d(c.latent_dim, c.channels[0], 7)
        self.blocks = nn.Sequential(
            *(DecoderBlock(c.channels[i], c.channels[i + 1], s) for i, s in enumerate(c.strides))
        )
        self.snake_out = Snake(c.channels[-1])
        self.conv_out = CausalConv1d(c.channels[-1], 1, 7)

    def forward(self, codes: Tensor) -> Tensor:
        latent = self.embeddings(codes + self.codebook_offsets[None, :, None]).sum(dim=1)
        x = self.conv_in(latent.transpose(1, 2))
        x = self.blocks(x)
        return torch.tanh(self.conv_out(self.snake_out(x)))


def codec_component(codec: nn.Module, codes: Tensor, validation_codes: Sequence[Tensor] = ()) -> Component:
    """The codec as a uniopt component: codes ``[1, codebooks, frames]`` in, audio out, judged by SNR.

    ``validation_codes`` are codes at the other lengths the engine decodes (graph stages are checked on them).
    """
    return Component(
        name="codec",
        module=codec,
        example_inputs=(codes,),
        input_names=("codes",),
        output_names=("audio",),
        dynamic_axes={"codes": {2: "frames"}, "audio": {2: "samples"}},
        metric=Metric("snr_db", 20.0),
        kind="codec",
        exporter="dynamo",
        validation_inputs=[(c,) for c in validation_codes],
    )
