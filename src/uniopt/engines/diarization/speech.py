"""Real speech for the diarizer's example inputs: espeak-ng turns mixed into conversations.

``speech.npz`` (package data, made by ``scripts/make_segmentation_speech.py`` from the test
fixtures) holds 2.8 s turns of six voices as 8-bit mu-law at 16 kHz. :func:`conversation` lays
turns one after another, alternating voices, each starting a set time after the previous one ends:
negative gaps overlap two voices, positive ones leave silence, so windows of it hold
single-speaker, overlapped and silent frames. The ``held_out`` turns (other voices and sentences)
are for calibration that the guard must not check on.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from importlib import resources

import numpy as np

__all__ = ["GAPS_S", "conversation", "conversation_windows", "turns"]

SAMPLE_RATE = 16_000
#: Seconds from the end of a turn to the start of the next (negative: they overlap), in turn.
GAPS_S = (-0.8, 0.6, -1.2, 1.5, 0.3, -0.5)
_LEAD_S = 0.5
_MU = 255


@functools.lru_cache(maxsize=2)
def turns(held_out: bool = False) -> tuple[np.ndarray, ...]:
    """The float32 turns of ``speech.npz``: those the guard checks on, or the ``held_out`` ones."""
    with resources.files(__package__).joinpath("speech.npz").open("rb") as file, np.load(file) as data:
        codes, lengths, held = data["codes"], data["lengths"], data["held_out"]
    scaled = codes.astype(np.float64) / 127
    audio = (np.sign(scaled) * np.expm1(np.abs(scaled) * np.log1p(_MU)) / _MU).astype(np.float32)
    pieces = np.split(audio, np.cumsum(lengths)[:-1])
    return tuple(p for p, h in zip(pieces, held.tolist(), strict=True) if h == held_out)


def conversation(pieces: Sequence[np.ndarray], samples: int, gaps_s: Sequence[float] = GAPS_S) -> np.ndarray:
    """``samples`` of the pieces in turn (cycling), after 0.5 s of silence, the gaps between them ``gaps_s``."""
    out = np.zeros(samples, dtype=np.float32)
    at = round(_LEAD_S * SAMPLE_RATE)
    for piece, gap in zip(itertools.cycle(pieces), itertools.cycle(gaps_s)):
        if at >= samples:
            break
        part = piece[: samples - at]
        out[at : at + part.size] += part
        at += max(piece.size + round(gap * SAMPLE_RATE), 1)
    return np.clip(out, -1.0, 1.0)


def conversation_windows(count: int, window: int, step: int, *, held_out: bool = False, first: int = 0) -> np.ndarray:
    """``count`` windows (count, window) float32, ``step`` samples apart, of a conversation of :func:`turns`.

    The conversation starts with turn ``first``, so different ``first`` give other pairs of voices.
    """
    pieces = turns(held_out)
    order = [pieces[(first + k) % len(pieces)] for k in range(len(pieces))]
    audio = conversation(order, (count - 1) * step + window)
    return np.stack([audio[k * step : k * step + window] for k in range(count)])
