"""Audio input checks and resampling shared by the speech engines."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from uniopt.engines.audio import normalize_volume, prepare_audio, speech_like_audio, validate_sample_rate
from uniopt.errors import InputError

SR = 16_000


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        (np.array(["a", "b"]), "numeric"),
        (np.array([0.1, None], dtype=object), "numeric"),
        (np.ones(100, dtype=bool), "numeric"),
        (np.ones(100, dtype=np.complex64), "real"),
        (torch.ones(100, dtype=torch.complex64), "real"),
        (np.ones(100, dtype=np.uint8), "int16/int32"),
        (np.ones(100, dtype=np.int64), "int16/int32"),
        (np.zeros((1, 2, 100), dtype=np.float32), "3 dimensions"),
        (np.zeros((3, 100), dtype=np.float32), "channel axis"),
        (np.zeros(0, dtype=np.float32), "empty"),
        (np.zeros((2, 0), dtype=np.float32), "empty"),
        (np.float32(0.5), "single number"),
        (torch.tensor(0.5), "single number"),
        (np.array([0.0, np.nan, 0.1], dtype=np.float32), "NaN or infinite"),
        (np.array([0.0, np.inf, 0.1], dtype=np.float32), "NaN or infinite"),
        ("speech.wav", "numpy array or torch tensor"),
        ([[0.1, 0.2], [0.3]], "could not be read"),
    ],
    ids=[
        "str", "object", "bool", "complex", "complex-torch", "uint8", "int64", "3-d", "3-channels",
        "empty", "empty-2d", "scalar", "scalar-torch", "nan", "inf", "path", "ragged",
    ],
)  # fmt: skip
def test_bad_audio_raises_input_error_that_says_what_to_do(audio: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        prepare_audio(audio, SR)


@pytest.mark.parametrize(
    "rate", [0, -16_000, 999, 384_001, 16_000.5, "16000", True, None, float("nan"), float("inf"), -float("inf")]
)
def test_implausible_sample_rates_are_rejected(rate: object) -> None:
    with pytest.raises(InputError, match="sample_rate"):
        prepare_audio(np.zeros(SR, dtype=np.float32), rate)  # type: ignore[arg-type]


def test_sample_rate_bounds_are_inclusive_and_whole_floats_accepted() -> None:
    assert validate_sample_rate(1_000) == 1_000
    assert validate_sample_rate(384_000) == 384_000
    assert validate_sample_rate(np.int64(22_050)) == 22_050
    assert validate_sample_rate(44_100.0) == 44_100


def test_audio_shorter_than_the_receptive_field_is_rejected() -> None:
    with pytest.raises(InputError, match=r"too short: 399 samples .* at least 400"):
        prepare_audio(np.zeros(399, dtype=np.float32), SR, min_samples=400)
    assert prepare_audio(np.zeros(400, dtype=np.float32), SR, min_samples=400).shape == (400,)
    # the minimum applies after resampling: 200 samples at 8 kHz are 400 at 16 kHz
    with pytest.raises(InputError, match="too short"):
        prepare_audio(np.zeros(199, dtype=np.float32), 8_000, min_samples=400)


def test_int16_and_int32_pcm_are_scaled_to_unit_range() -> None:
    pcm16 = np.array([32767, -32768, 0, 16384], dtype=np.int16)
    np.testing.assert_allclose(prepare_audio(pcm16, SR), [32767 / 32768, -1.0, 0.0, 0.5])
    pcm32 = np.array([2**31 - 1, -(2**31), 2**30], dtype=np.int32)
    np.testing.assert_allclose(prepare_audio(pcm32, SR), [1.0, -1.0, 0.5], rtol=1e-7)


def test_int16_pcm_is_scaled_without_a_float64_copy() -> None:
    pcm = (np.arange(1_000_000) % 65536 - 32768).astype(np.int16)
    tracemalloc.start()
    try:
        out = prepare_audio(pcm, SR)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.dtype == np.float32 and out[0] == -1.0
    assert peak < 1.6 * out.nbytes, f"{peak / 2**20:.1f} MiB for {out.nbytes / 2**20:.1f} MiB of float32"


def test_output_is_contiguous_float32_mono_for_numpy_torch_and_lists() -> None:
    wav = speech_like_audio(0.1)
    for audio in (
        wav,
        wav.astype(np.float64),
        torch.from_numpy(wav),
        torch.from_numpy(wav).bfloat16(),
        list(wav),
    ):
        out = prepare_audio(audio, SR)
        assert out.dtype == np.float32 and out.ndim == 1 and out.flags.c_contiguous
        np.testing.assert_allclose(out, wav, atol=1e-2)


@pytest.mark.parametrize("layout", ["channels-first", "channels-last", "torch"])
def test_stereo_is_averaged_to_mono(layout: str) -> None:
    left, right = speech_like_audio(0.2, seed=1), speech_like_audio(0.2, seed=2)
    stereo = np.stack([left, right])
    audio = {"channels-first": stereo, "channels-last": stereo.T, "torch": torch.from_numpy(stereo)}[layout]
    np.testing.assert_allclose(prepare_audio(audio, SR), (left + right) / 2, rtol=1e-6)


def test_single_channel_2d_audio_is_squeezed() -> None:
    wav = speech_like_audio(0.1)
    np.testing.assert_array_equal(prepare_audio(wav[None], SR), wav)
    np.testing.assert_array_equal(prepare_audio(wav[:, None], SR), wav)


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000])
def test_resampling_keeps_duration_and_pitch(rate: int) -> None:
    seconds, freq = 1.0, 440.0
    t = np.arange(int(seconds * rate)) / rate
    out = prepare_audio(np.sin(2 * np.pi * freq * t).astype(np.float32), rate)
    assert out.shape == (int(seconds * SR),)
    spectrum = np.abs(np.fft.rfft(out))
    assert np.fft.rfftfreq(out.size, 1 / SR)[spectrum.argmax()] == pytest.approx(freq, abs=1.0)


def test_no_resampling_at_the_target_rate_keeps_samples() -> None:
    wav = speech_like_audio(0.1)
    np.testing.assert_array_equal(prepare_audio(wav, 48_000, target_rate=48_000), wav)


def test_normalize_volume_raises_quiet_audio_only() -> None:
    quiet = 0.001 * speech_like_audio(0.5)
    louder = normalize_volume(quiet, -30.0)
    rms_db = 20 * np.log10(np.sqrt(np.mean(louder.astype(np.float64) ** 2)))
    assert rms_db == pytest.approx(-30.0, abs=0.01)
    loud = speech_like_audio(0.5) * 3
    assert normalize_volume(loud, -30.0) is loud
    assert normalize_volume(loud, -30.0, increase_only=False).std() < loud.std()
    silent = np.zeros(100, dtype=np.float32)
    assert normalize_volume(silent) is silent


def test_speech_like_audio_is_deterministic() -> None:
    a, b = speech_like_audio(1.0, seed=3), speech_like_audio(1.0, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and a.shape == (SR,) and np.abs(a).max() < 1
    assert not np.array_equal(a, speech_like_audio(1.0, seed=4))
