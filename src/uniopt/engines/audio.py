"""Audio input checks and resampling shared by the speech engines.

:func:`prepare_audio` turns what a caller passes (numpy or torch, mono or stereo, float or integer
PCM, any sample rate) into the float32 mono waveform at the rate a model was trained on, or raises
:class:`~uniopt.errors.InputError` with a message that says how to fix the input. The rules:

* shape: 1-D ``(samples,)``, or 2-D with one or two channels, either ``(channels, samples)`` or
  ``(samples, channels)`` (the axis of length 1 or 2 is the channel axis; when both are, the
  first one is). Two channels are averaged to mono; more than two are rejected.
* dtype: float16/32/64 samples are taken as they are (expected in [-1, 1]); int16 PCM is divided by
  32768 and int32 PCM by 2147483648, so full scale maps to [-1, 1); other integer types, booleans,
  complex numbers and non-numeric arrays are rejected.
* sample rate: a whole number of Hz from 1000 to 384000 (NaN, infinities, fractions, zero and
  negative rates are rejected); other rates than the model's are resampled with
  :func:`scipy.signal.resample_poly` (up/down factors reduced by their gcd).
* empty audio, NaN or infinite samples, and audio shorter than the model's ``min_samples`` are rejected.

The phoneme, diarization and TTS engines (its reference audio) all go through :func:`prepare_audio`.
"""

from __future__ import annotations

import math
from math import gcd
from typing import Any

import numpy as np
import torch

from uniopt.errors import InputError

__all__ = [
    "MAX_SAMPLE_RATE",
    "MIN_SAMPLE_RATE",
    "TARGET_DBFS",
    "normalize_volume",
    "prepare_audio",
    "resample",
    "speech_like_audio",
    "validate_sample_rate",
]

MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000
TARGET_DBFS = -30.0
#: Integer PCM types converted to float, and the divisor that maps full scale to [-1, 1).
_PCM_SCALE = {np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31}
_INT16_MAX = 2**15 - 1


def validate_sample_rate(sample_rate: Any) -> int:
    """Return ``sample_rate`` as an int, or raise InputError when it is not a plausible audio rate."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer, float, np.floating)):
        raise InputError(
            f"sample_rate must be an integer number of Hz, got {type(sample_rate).__name__}; "
            "pass the rate the audio was recorded at, e.g. 16000"
        )
    if not math.isfinite(float(sample_rate)) or float(sample_rate) != int(sample_rate):
        raise InputError(f"sample_rate must be a whole number of Hz, got {sample_rate}")
    rate = int(sample_rate)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise InputError(
            f"sample_rate {rate} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz; pass the rate the "
            "audio was recorded at (check that sample_rate and audio were not swapped)"
        )
    return rate


def _to_numpy(audio: Any) -> np.ndarray:
    if isinstance(audio, torch.Tensor):
        if audio.is_complex():
            raise InputError("audio must be real-valued samples, got a complex tensor; pass its real part")
        audio = audio.detach().cpu()
        if audio.dtype == torch.bfloat16:
            audio = audio.float()
        return audio.numpy()
    if isinstance(audio, (np.ndarray, np.generic)):
        return np.asarray(audio)
    if isinstance(audio, (list, tuple)):
        try:
            return np.asarray(audio)
        except ValueError as exc:
            raise InputError(f"audio could not be read as an array: {exc}") from None
    raise InputError(
        f"audio must be a numpy array or torch tensor of samples, got {type(audio).__name__}; "
        "load files first, e.g. with soundfile.read(path, dtype='float32')"
    )


def _to_float(wav: np.ndarray) -> np.ndarray:
    kind = wav.dtype.kind
    if kind == "f":
        return wav.astype(np.float32, copy=False)
    if wav.dtype in _PCM_SCALE:  # one float32 copy, scaled in place (a power of two: exact)
        scaled = wav.astype(np.float32)
        scaled *= np.float32(1.0 / _PCM_SCALE[wav.dtype])
        return scaled
    if kind in "iu":
        raise InputError(
            f"integer audio of dtype {wav.dtype} is not supported; pass float samples in [-1, 1] "
            "or int16/int32 PCM (divided by 32768 / 2147483648)"
        )
    if kind == "c":
        raise InputError("audio must be real-valued samples, got complex numbers; pass the real part")
    raise InputError(f"audio must hold numeric samples, got dtype {wav.dtype}; pass float32 samples in [-1, 1]")


def _to_mono(wav: np.ndarray) -> np.ndarray:
    if wav.ndim == 1:
        return wav
    if wav.ndim != 2:
        raise InputError(
            f"audio must be 1-D (samples,) or 2-D (channels, samples), got {wav.ndim} dimensions "
            f"with shape {wav.shape}; pass one recording at a time"
        )
    if wav.shape[0] in (1, 2):
        channels_first = True
    elif wav.shape[1] in (1, 2):
        channels_first = False
    else:
        raise InputError(
            f"audio of shape {wav.shape} has no channel axis of size 1 or 2; pass mono (samples,) "
            "or stereo (2, samples) audio, mixing other channel layouts down first"
        )
    return wav.mean(axis=0 if channels_first else 1, dtype=np.float32)


def resample(wav: np.ndarray, orig_rate: int, target_rate: int) -> np.ndarray:
    """Resample a 1-D float32 waveform with a polyphase filter; the duration is kept."""
    if orig_rate == target_rate:
        return wav
    from scipy.signal import resample_poly

    divisor = gcd(orig_rate, target_rate)
    out = resample_poly(wav, target_rate // divisor, orig_rate // divisor)
    return np.ascontiguousarray(out, dtype=np.float32)


def prepare_audio(audio: Any, sample_rate: int, target_rate: int = 16_000, *, min_samples: int = 1) -> np.ndarray:
    """Validate ``audio`` and return it as contiguous float32 mono at ``target_rate``.

    ``min_samples`` is the shortest input (at ``target_rate``) the model accepts, such as its
    receptive field. See the module docstring for the shape, dtype and rate rules.
    """
    rate = validate_sample_rate(sample_rate)
    target = validate_sample_rate(target_rate)
    wav = _to_numpy(audio)
    if wav.dtype == np.bool_ or wav.dtype.kind not in "fiuc":
        raise InputError(f"audio must hold numeric samples, got dtype {wav.dtype}; pass float32 samples in [-1, 1]")
    if wav.ndim == 0:
        raise InputError("audio is a single number, not a waveform; pass an array of samples")
    if wav.size == 0:
        raise InputError(f"audio is empty (shape {wav.shape}); pass at least some samples")
    wav = _to_mono(_to_float(wav))
    if not np.isfinite(wav).all():
        bad = int((~np.isfinite(wav)).sum())
        raise InputError(
            f"audio contains {bad} NaN or infinite samples; fix the source or replace them, e.g. np.nan_to_num(audio)"
        )
    wav = resample(wav, rate, target)
    if wav.size < min_samples:
        raise InputError(
            f"audio is too short: {wav.size} samples ({1e3 * wav.size / target:.1f} ms) at {target} Hz, "
            f"the model needs at least {min_samples} ({1e3 * min_samples / target:.1f} ms); "
            "pass longer audio or pad it with silence"
        )
    return np.ascontiguousarray(wav, dtype=np.float32)


def normalize_volume(wav: np.ndarray, target_dbfs: float = TARGET_DBFS, increase_only: bool = True) -> np.ndarray:
    """Scale ``wav`` to ``target_dbfs`` RMS; with ``increase_only`` loud audio is left as it is.

    Silent audio is returned unchanged.
    """
    rms = float(np.sqrt(np.mean((np.asarray(wav, dtype=np.float64) * _INT16_MAX) ** 2)))
    if rms == 0:
        return wav
    change = target_dbfs - 20 * np.log10(rms / _INT16_MAX)
    if change < 0 and increase_only:
        return wav
    return (wav * (10 ** (change / 20))).astype(wav.dtype, copy=False)


def speech_like_audio(seconds: float = 5.0, seed: int = 0, sample_rate: int = 16_000) -> np.ndarray:
    """Deterministic speech-like float32 audio (harmonics of a voice pitch at syllable rate, plus noise).

    Meant as example and calibration input for speech models, not as speech.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    phases = rng.uniform(0, 2 * np.pi, (8, 1))
    voiced = np.sin(2 * np.pi * rng.uniform(90, 220) * np.arange(1, 9)[:, None] * t + phases).mean(axis=0)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 5) * t)
    return (0.3 * envelope * voiced + 0.02 * rng.standard_normal(t.size)).astype(np.float32)
