"""resemblyzer's GE2E speaker encoder as a plain PyTorch module, with its preprocessing in numpy.

The network is LSTM(40, 256, 3 layers) -> Linear(256, 256) -> ReLU on the last hidden state of the
last layer, then L2 normalisation. It reads 40-band power (not log) mel frames of 25 ms windows with
a 10 ms hop at 16 kHz. The mel filterbank reproduces ``librosa.filters.mel`` (Slaney mel scale and
Slaney area normalisation) and the spectrogram ``librosa.feature.melspectrogram`` (centred periodic
Hann STFT, power 2), so no librosa is needed at run time. librosa >= 0.10, which a fresh
``pip install resemblyzer`` gets, pads the centred STFT with zeros (``pad_mode="constant"``);
older releases, like the one the model was trained with, padded by reflection (``"reflect"``).

:func:`embed_utterance` mirrors ``VoiceEncoder.embed_utterance``: 1.6 s partial windows at 1.3
partials per second, the last one kept when it covers at least 75 %, embeddings averaged and
L2-normalised. Volume is normalised to -30 dBFS (only ever raised), as in ``preprocess_wav``;
resemblyzer's VAD-based silence trimming (webrtcvad) is not part of this port.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uniopt.engines.diarization.weights import find_speaker_encoder_weights
from uniopt.errors import InputError
from uniopt.threads import single_threaded_blas

__all__ = [
    "PARTIAL_FRAMES",
    "SAMPLE_RATE",
    "SpeakerEncoder",
    "compute_partial_slices",
    "embed_utterance",
    "load_speaker_encoder",
    "mel_filterbank",
    "mel_spectrograms",
    "normalize_volume",
    "validate_wav",
    "wav_to_mel_spectrogram",
]

SAMPLE_RATE = 16_000
N_FFT = 400  # 25 ms
HOP_LENGTH = 160  # 10 ms
N_MELS = 40
PARTIAL_FRAMES = 160  # 1.6 s
TARGET_DBFS = -30.0
_INT16_MAX = 2**15 - 1
#: Checkpoint entries used only by the GE2E training loss, not by the encoder.
_LOSS_ONLY_KEYS = ("similarity_weight", "similarity_bias")


class SpeakerEncoder(nn.Module):
    """GE2E encoder: mel frames (batch, frames, 40) -> unit-norm embeddings (batch, 256)."""

    def __init__(self, n_mels: int = N_MELS, hidden: int = 256, embedding: int = 256, layers: int = 3) -> None:
        super().__init__()
        self.lstm = nn.LSTM(n_mels, hidden, layers, batch_first=True)
        self.linear = nn.Linear(hidden, embedding)
        self.relu = nn.ReLU()

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """Embed a batch of equally long mel spectrograms; 160 frames (1.6 s) is the trained length."""
        _, (hidden, _) = self.lstm(mels)
        return F.normalize(self.relu(self.linear(hidden[-1])), p=2.0, dim=1)


def load_speaker_encoder(path: Path | None = None) -> SpeakerEncoder:
    """Build :class:`SpeakerEncoder` from resemblyzer's ``pretrained.pt`` (found when ``path`` is None)."""
    weights = Path(path) if path is not None else find_speaker_encoder_weights()
    if not weights.is_file():
        raise InputError(f"speaker encoder checkpoint not found: {weights}")
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    state = checkpoint.get("model_state", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise InputError(f"{weights} holds no state dict (expected a 'model_state' entry)")
    state = {k: v for k, v in state.items() if k not in _LOSS_ONLY_KEYS}
    model = SpeakerEncoder()
    model.load_state_dict(state, strict=True)
    return model.eval()


def validate_wav(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Check a waveform is 1-D, non-empty, finite, real-valued 16 kHz audio; return it as float32."""
    if sample_rate != SAMPLE_RATE:
        raise InputError(f"audio must be sampled at {SAMPLE_RATE} Hz, got {sample_rate} Hz; resample it first")
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().cpu().numpy()
    if not isinstance(wav, np.ndarray):
        raise InputError(f"audio must be a numpy array, got {type(wav).__name__}")
    if wav.dtype.kind != "f":
        raise InputError(
            f"audio must be floating point samples in [-1, 1], got dtype {wav.dtype} (divide int16 PCM by 32768)"
        )
    if wav.ndim != 1:
        raise InputError(f"audio must be 1-D (mono samples), got shape {wav.shape}")
    if wav.size == 0:
        raise InputError("audio is empty")
    if not np.isfinite(wav).all():
        raise InputError("audio contains NaN or infinite samples")
    return wav.astype(np.float32, copy=False)


def normalize_volume(wav: np.ndarray, target_dbfs: float = TARGET_DBFS, increase_only: bool = True) -> np.ndarray:
    """Scale ``wav`` to ``target_dbfs`` RMS (resemblyzer's rule); silent audio is returned unchanged."""
    rms = np.sqrt(np.mean((wav * _INT16_MAX) ** 2))
    if rms == 0:
        return wav
    change = target_dbfs - 20 * np.log10(rms / _INT16_MAX)
    if change < 0 and increase_only:
        return wav
    return wav * (10 ** (change / 20))


def _hz_to_mel(freqs: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above (librosa's ``htk=False``)."""
    freqs = np.asanyarray(freqs, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    mels = freqs / f_sp
    log_t = freqs >= min_log_hz
    mels[log_t] = min_log_mel + np.log(freqs[log_t] / min_log_hz) / logstep
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asanyarray(mels, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    freqs = f_sp * mels
    log_t = mels >= min_log_mel
    freqs[log_t] = min_log_hz * np.exp(logstep * (mels[log_t] - min_log_mel))
    return freqs


def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """Triangular Slaney-normalised mel filters (n_mels, 1 + n_fft // 2), as ``librosa.filters.mel``."""
    fft_freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([sr / 2.0]))[0], n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    weights = np.zeros((n_mels, 1 + n_fft // 2), dtype=np.float32)
    for i in range(n_mels):
        weights[i] = np.maximum(0, np.minimum(-ramps[i] / fdiff[i], ramps[i + 2] / fdiff[i + 1]))
    # librosa stores the triangles as float32 before scaling them; do the same for identical values.
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, np.newaxis]
    return weights


_MEL_BASIS = mel_filterbank()
_WINDOW = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann, float64


def wav_to_mel_spectrogram(wav: np.ndarray, pad_mode: str = "constant") -> np.ndarray:
    """Power mel spectrogram (frames, 40) float32 of a 16 kHz waveform, as resemblyzer computes it.

    ``pad_mode`` pads the centred STFT: ``"constant"`` (zeros, librosa >= 0.10) or ``"reflect"``.
    """
    if pad_mode not in ("constant", "reflect"):
        raise InputError(f"pad_mode must be 'constant' or 'reflect', got {pad_mode!r}")
    wav = validate_wav(wav)
    pad = N_FFT // 2
    if pad_mode == "reflect" and wav.size <= pad:
        raise InputError(f"reflect padding needs more than {pad} samples, got {wav.size}")
    return mel_spectrograms([wav], pad_mode)[0]


def mel_spectrograms(wavs: Sequence[np.ndarray], pad_mode: str = "constant") -> list[np.ndarray]:
    """:func:`wav_to_mel_spectrogram` of each waveform, with one FFT and one filterbank product for all.

    The waveforms are taken as valid (1-D, finite float32, longer than ``N_FFT // 2`` for
    ``"reflect"``); every row of the FFT and of the product is computed as it is for one waveform.
    """
    padded = [np.pad(wav, N_FFT // 2, mode="reflect" if pad_mode == "reflect" else "constant") for wav in wavs]
    frames = [np.lib.stride_tricks.sliding_window_view(wav, N_FFT)[::HOP_LENGTH] for wav in padded]
    # As librosa: the FFT runs in float64 and is stored as complex64 before taking the power.
    spectrum = np.fft.rfft(np.concatenate(frames) * _WINDOW, n=N_FFT, axis=-1).astype(np.complex64)
    power = np.abs(spectrum) ** 2
    with single_threaded_blas():
        mels = (power @ _MEL_BASIS.T).astype(np.float32)
    return np.split(mels, np.cumsum([f.shape[0] for f in frames[:-1]]))


def compute_partial_slices(
    n_samples: int, rate: float = 1.3, min_coverage: float = 0.75
) -> tuple[list[slice], list[slice]]:
    """Waveform and mel-frame slices of the 160-frame partial utterances covering ``n_samples``."""
    if not 0 < min_coverage <= 1:
        raise InputError(f"min_coverage must be in (0, 1], got {min_coverage}")
    n_frames = int(np.ceil((n_samples + 1) / HOP_LENGTH))
    frame_step = int(np.round((SAMPLE_RATE / rate) / HOP_LENGTH))
    if not 0 < frame_step <= PARTIAL_FRAMES:
        raise InputError(
            f"rate {rate} partials/s is out of range: it must be at least "
            f"{SAMPLE_RATE / (HOP_LENGTH * PARTIAL_FRAMES)} and give a step of at least one frame"
        )
    wav_slices, mel_slices = [], []
    for start in range(0, max(1, n_frames - PARTIAL_FRAMES + frame_step + 1), frame_step):
        mel_slices.append(slice(start, start + PARTIAL_FRAMES))
        wav_slices.append(slice(start * HOP_LENGTH, (start + PARTIAL_FRAMES) * HOP_LENGTH))
    last = wav_slices[-1]
    coverage = (n_samples - last.start) / (last.stop - last.start)
    if coverage < min_coverage and len(mel_slices) > 1:
        mel_slices, wav_slices = mel_slices[:-1], wav_slices[:-1]
    return wav_slices, mel_slices


def embed_utterance(
    encoder: SpeakerEncoder,
    wav: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    *,
    rate: float = 1.3,
    min_coverage: float = 0.75,
    normalize: bool = True,
    pad_mode: str = "constant",
) -> np.ndarray:
    """Unit-norm utterance embedding (256,) float32: the normalised mean of partial embeddings.

    ``normalize`` first raises the volume to -30 dBFS like resemblyzer's ``preprocess_wav``.
    """
    wav = validate_wav(wav, sample_rate)
    if normalize:
        wav = normalize_volume(wav).astype(np.float32)
    wav_slices, mel_slices = compute_partial_slices(len(wav), rate, min_coverage)
    if wav_slices[-1].stop >= len(wav):
        wav = np.pad(wav, (0, wav_slices[-1].stop - len(wav)), "constant")
    mel = wav_to_mel_spectrogram(wav, pad_mode=pad_mode)
    mels = torch.from_numpy(np.stack([mel[s] for s in mel_slices]))
    param = next(encoder.parameters())
    with torch.no_grad():
        partial = encoder(mels.to(device=param.device, dtype=param.dtype)).float().cpu().numpy()
    raw = partial.mean(axis=0)
    return (raw / np.linalg.norm(raw, 2)).astype(np.float32)
