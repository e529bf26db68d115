"""A Fish-Speech-style reference TTS engine with random weights, and an adapter for the real package.

* :class:`FishSpeechEngine` - text to 44.1 kHz audio: a dual autoregressive transformer shaped like
  Fish-Speech S1-mini's ``DualARTransformer`` and a DAC-style codec decoder, both declared to uniopt;
* :class:`FishSpeechAdapter` - the same components declared for an engine of the ``fish_speech`` package.
"""

from uniopt.engines.tts.adapter import FishSpeechAdapter, RealCodecDecoder, RealTokenGenerator
from uniopt.engines.tts.codec import CodecConfig, CodecDecoder, Snake
from uniopt.engines.tts.engine import FishSpeechConfig, FishSpeechEngine
from uniopt.engines.tts.generation import TokenGenerator, sample_token, uniform_noise
from uniopt.engines.tts.model import (
    DualARConfig,
    DualARTransformer,
    KVCache,
    TiedOutputProjection,
    TransformerBlock,
)
from uniopt.engines.tts.tokenizer import ByteTokenizer, check_reference_audio, encode_reference

__all__ = [
    "ByteTokenizer",
    "CodecConfig",
    "CodecDecoder",
    "DualARConfig",
    "DualARTransformer",
    "FishSpeechAdapter",
    "FishSpeechConfig",
    "FishSpeechEngine",
    "KVCache",
    "RealCodecDecoder",
    "RealTokenGenerator",
    "Snake",
    "TiedOutputProjection",
    "TokenGenerator",
    "TransformerBlock",
    "bench_engine",
    "check_reference_audio",
    "encode_reference",
    "sample_token",
    "uniform_noise",
]


def bench_engine() -> FishSpeechEngine:
    """The benchmark's TTS engine: default size (12 slow layers, d=1024, GQA 16/4), 64 decode steps."""
    return FishSpeechEngine()
