"""Text and reference audio to the prompt tokens of :class:`~uniopt.engines.tts.model.DualARTransformer`.

Text is UTF-8 bytes (ids 0..255), so no vocabulary file is needed. The vocabulary is sized like a
BPE vocabulary (the tied output projection then costs what it does in the real model); ids
above the special tokens are unused until the semantic tokens at its end. Reference audio is
turned into codes by a fixed random projection of each frame (there is no trained codec encoder),
which gives the prompt the shape a voice-cloning prompt has.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...errors import InputError
from ..audio import prepare_audio

__all__ = ["ByteTokenizer", "check_reference_audio", "encode_reference"]


class ByteTokenizer:
    """UTF-8 byte tokens, four special tokens, and the semantic tokens at the end of the vocabulary."""

    PAD = 256
    IM_START = 257
    IM_END = 258
    VOICE = 259

    def __init__(self, vocab_size: int, codebook_size: int, num_codebooks: int) -> None:
        self.vocab_size = vocab_size
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.semantic_begin_id = vocab_size - codebook_size

    @property
    def eos_id(self) -> int:
        """The token that ends an utterance (``<|im_end|>``)."""
        return self.IM_END

    def encode(self, text: str) -> list[int]:
        """The byte ids of ``text`` (validated: a non-empty string)."""
        if not isinstance(text, str):
            raise InputError(f"text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise InputError("text is empty; give at least one non-space character")
        return list(text.encode("utf-8"))

    def build_prompt(self, text: str, reference_codes: np.ndarray | None = None) -> torch.Tensor:
        """Prompt ``[1, num_codebooks + 1, T]``.

        ``<|im_start|>``, the reference frames, the text bytes, ``<|im_end|>``, ``<|voice|>``.
        """
        ids = self.encode(text)
        rows = self.num_codebooks + 1
        parts = [self._text_frames([self.IM_START])]
        if reference_codes is not None:
            frames = np.zeros((rows, reference_codes.shape[1]), dtype=np.int64)
            frames[0] = self.semantic_begin_id + reference_codes[0]
            frames[1:] = reference_codes
            parts.append(frames)
        parts.append(self._text_frames([*ids, self.IM_END, self.VOICE]))
        return torch.from_numpy(np.concatenate(parts, axis=1))[None]

    def _text_frames(self, ids: list[int]) -> np.ndarray:
        frames = np.zeros((self.num_codebooks + 1, len(ids)), dtype=np.int64)
        frames[0] = ids
        return frames


def check_reference_audio(
    reference_audio: Any, *, frame_size: int, max_frames: int, sample_rate: int = 44_100
) -> np.ndarray:
    """``reference_audio`` as a float32 mono array, or :class:`InputError` saying what is wrong.

    Checked and converted by :func:`uniopt.engines.audio.prepare_audio` (stereo is averaged, int16
    PCM scaled), at the engine's ``sample_rate``; it must be at least one frame and at most
    ``max_frames`` frames long.
    """
    audio = prepare_audio(reference_audio, sample_rate, sample_rate, min_samples=frame_size)
    if audio.shape[0] // frame_size > max_frames:
        raise InputError(
            f"reference_audio is {audio.shape[0] // frame_size} frames long; at most {max_frames} fit the prompt"
        )
    return audio


def encode_reference(
    audio: np.ndarray, *, num_codebooks: int, codebook_size: int, frame_size: int, seed: int = 1234
) -> np.ndarray:
    """Codes ``[num_codebooks, frames]`` of whole frames of ``audio``, by a fixed random projection.

    Each frame is summarised by the mean and RMS of 64 equal chunks; codebook ``k`` picks the
    code whose random direction best matches that summary. Deterministic for a given ``seed``.
    """
    frames = audio[: audio.shape[0] // frame_size * frame_size].reshape(-1, 64, frame_size // 64).astype(np.float64)
    features = np.concatenate([frames.mean(axis=-1), np.sqrt((frames**2).mean(axis=-1))], axis=-1)
    features = (features - features.mean(axis=-1, keepdims=True)) / (features.std(axis=-1, keepdims=True) + 1e-8)
    projection = np.random.default_rng(seed).standard_normal((features.shape[1], num_codebooks, codebook_size))
    scores = np.einsum("nf,fkc->nkc", features, projection)
    return scores.argmax(axis=-1).T.astype(np.int64)
