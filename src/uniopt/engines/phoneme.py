"""Phoneme recognition with a wav2vec2 CTC model: audio in, timed IPA phonemes out.

:class:`PhonemeExtractor` loads a local ``Wav2Vec2ForCTC`` checkpoint directory (``config.json``,
weights and the phoneme ``vocab.json``), or builds one from a config with seeded random weights
(``trained=False``: the topology and speed are real, the phonemes are not). Audio is checked and
resampled to 16 kHz by :func:`uniopt.engines.audio.prepare_audio`, normalised to zero mean and unit
variance like ``Wav2Vec2FeatureExtractor``, run in chunks, and decoded greedily
(:func:`ctc_greedy_decode`). The network is called only through ``self.model`` (a
:class:`CTCLogits`: ``input_values -> logits``), the one component it declares to uniopt.

Quantization: int8 of the convolutional feature encoder costs accuracy. uniopt's torch int8
candidate quantizes ``nn.Linear`` layers only, i.e. the transformer's projections and feed-forward
layers, and leaves the ``Conv1d`` feature encoder in float, so nothing needs excluding here.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

from uniopt.engines.audio import prepare_audio, speech_like_audio
from uniopt.engines.stats import CallStats
from uniopt.errors import InputError, UniOptError
from uniopt.optimizer.component import Component, Metric
from uniopt.settings import Settings, load_settings

__all__ = [
    "IPA_VOCAB",
    "SAMPLE_RATE",
    "SPECIAL_TOKENS",
    "CTCLogits",
    "PhonemeExtractor",
    "PhonemeSegment",
    "bench_engine",
    "clear_fast_instances",
    "ctc_greedy_decode",
    "default_config",
    "get_fast_instance",
]

log = logging.getLogger("uniopt.engines.phoneme")

SAMPLE_RATE = 16_000
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
#: ``<pad>`` (the CTC blank), the special tokens, then an espeak-style IPA phoneme set.
IPA_VOCAB: tuple[str, ...] = (
    *SPECIAL_TOKENS,
    *"a e i o u y ø œ æ ɑ ɒ ɐ ʌ ɔ ə ɚ ɛ ɜ ɪ ʊ ɨ ɯ aɪ aʊ eɪ oʊ ɔɪ ː".split(),
    *"p b t d k ɡ ʔ f v θ ð s z ʃ ʒ x ç ɣ h β ʁ m n ŋ ɲ l ʎ ɹ r ɾ j w ts tʃ dʒ".split(),
)


@dataclass(frozen=True)
class PhonemeSegment:
    """One recognised phoneme, its span in seconds from the start of the audio, and its mean probability."""

    phoneme: str
    start_s: float
    end_s: float
    confidence: float


class CTCLogits(nn.Module):
    """``Wav2Vec2ForCTC`` returning only its logits: (batch, samples) -> (batch, frames, vocab)."""

    def __init__(self, ctc: Wav2Vec2ForCTC) -> None:
        super().__init__()
        self.ctc = ctc

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        return self.ctc(input_values).logits


def default_config(fast: bool = True, vocab_size: int = len(IPA_VOCAB)) -> Wav2Vec2Config:
    """wav2vec2-base topology (``fast``, ~95M parameters) or the large espeak phoneme one (~315M)."""
    ids: dict[str, Any] = {"vocab_size": vocab_size, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if fast:  # as facebook/wav2vec2-base
        return Wav2Vec2Config(**ids)
    # as facebook/wav2vec2-lv-60-espeak-cv-ft
    return Wav2Vec2Config(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True, **ids,
    )  # fmt: skip


def _runs(logits: Any, vocab: Sequence[str], blank: int, ignore: Collection[str]) -> list[list[Any]]:
    """[token, first frame, last frame, summed probability] of each kept run of equal argmax."""
    scores = torch.as_tensor(logits).detach().cpu().double()
    scores = scores[0] if scores.dim() == 3 and scores.shape[0] == 1 else scores
    if scores.dim() != 2 or scores.shape[-1] != len(vocab):
        raise InputError(
            f"logits must be (frames, {len(vocab)}) or (1, frames, {len(vocab)}), got {tuple(scores.shape)}"
        )
    probs, ids = scores.softmax(-1).max(-1)
    ids_list, runs = ids.tolist(), []
    starts = [i for i in range(len(ids_list)) if i == 0 or ids_list[i] != ids_list[i - 1]]
    for first, stop in zip(starts, [*starts[1:], len(ids_list)], strict=True):
        token = ids_list[first]
        if token != blank and vocab[token] not in ignore:
            runs.append([vocab[token], first, stop - 1, float(probs[first:stop].sum())])
    return runs


def ctc_greedy_decode(
    logits: np.ndarray | torch.Tensor,
    vocab: Sequence[str],
    frame_seconds: float,
    *,
    blank: int = 0,
    offset_s: float = 0.0,
    ignore: Collection[str] = SPECIAL_TOKENS,
) -> list[PhonemeSegment]:
    """Greedy CTC: argmax per frame, collapse repeats, drop blanks and ``ignore`` tokens.

    ``logits`` is (frames, vocab) or (1, frames, vocab). A phoneme spans from the start of its first
    frame to the end of its last, ``offset_s + frame * frame_seconds``; confidence is the mean
    softmax probability of the phoneme over those frames.
    """
    return [
        PhonemeSegment(p, offset_s + a * frame_seconds, offset_s + (b + 1) * frame_seconds, total / (b - a + 1))
        for p, a, b, total in _runs(logits, vocab, blank, ignore)
    ]


def _read_vocab(path: Path, size: int) -> list[str]:
    mapping = json.loads(path.read_text(encoding="utf-8"))  # a tokenizer's vocab.json: {token: id}
    vocab = ["<unk>"] * size
    for token, index in mapping.items():
        if not isinstance(index, int) or not 0 <= index < size:
            raise UniOptError(f"{path}: token {token!r} has id {index!r}, not one of the model's {size} outputs")
        vocab[index] = token
    return vocab


def _load_checkpoint(model_dir: str | Path) -> tuple[Wav2Vec2ForCTC, list[str], bool]:
    path = Path(model_dir)
    if not path.is_dir():
        raise UniOptError(f"phoneme model directory {path} does not exist; pass a local Wav2Vec2ForCTC checkpoint")
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    if not any(path.glob("model*.safetensors*")) and not any(path.glob("pytorch_model*.bin*")):
        missing.append("model.safetensors (or pytorch_model.bin)")
    if not (path / "vocab.json").is_file():
        missing.append("vocab.json")
    if missing:
        raise UniOptError(
            f"{path} is not a complete wav2vec2 CTC checkpoint: missing {', '.join(missing)}; "
            "write one with model.save_pretrained(dir) and processor.save_pretrained(dir)"
        )
    try:
        ctc = Wav2Vec2ForCTC.from_pretrained(path, local_files_only=True)
        vocab = _read_vocab(path / "vocab.json", ctc.config.vocab_size or 0)
    except (OSError, ValueError, RuntimeError, AttributeError) as exc:
        raise UniOptError(f"cannot load the wav2vec2 CTC checkpoint in {path}: {exc}") from exc
    preprocessor = path / "preprocessor_config.json"
    normalize = json.loads(preprocessor.read_text()).get("do_normalize", True) if preprocessor.is_file() else True
    return ctc, vocab, bool(normalize)


class PhonemeExtractor:
    """Timed phonemes from speech with a wav2vec2 CTC model (see the module docstring).

    ``model_dir`` loads a local checkpoint; without it the model is built from ``config`` (default:
    :func:`default_config` with ``USE_FAST_MODELS``) with weights seeded by ``seed``. ``vocab``
    names the model's outputs (default :data:`IPA_VOCAB`, or the checkpoint's ``vocab.json``).
    Audio longer than ``chunk_seconds`` runs in chunks; a last piece shorter than a quarter chunk
    joins the chunk before it, and a phoneme cut by a chunk boundary is joined into one segment.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        settings: Settings | None = None,
        vocab: Sequence[str] | None = None,
        config: Wav2Vec2Config | None = None,
        chunk_seconds: float = 20.0,
        seed: int = 0,
    ) -> None:
        if not chunk_seconds > 0:
            raise InputError(f"chunk_seconds must be positive, got {chunk_seconds}")
        self.settings = settings if settings is not None else load_settings()
        self.normalize = True
        if model_dir is not None:
            ctc, loaded_vocab, self.normalize = _load_checkpoint(model_dir)
            self.vocab = list(vocab) if vocab is not None else loaded_vocab
            self.trained, self.source = True, str(model_dir)
        else:
            self.vocab = list(vocab) if vocab is not None else list(IPA_VOCAB)
            if config is None:
                config = default_config(self.settings.use_fast_models, len(self.vocab))
            config = Wav2Vec2Config.from_dict({**config.to_dict(), "vocab_size": len(self.vocab)})
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                ctc = Wav2Vec2ForCTC(config)
            self.trained, self.source = False, "config"
            log.warning(
                "PhonemeExtractor built from a config with random weights (seed %d): the phonemes it "
                "returns are meaningless; pass model_dir with a trained checkpoint for real output",
                seed,
            )
        if len(self.vocab) != ctc.config.vocab_size:
            raise UniOptError(f"vocab has {len(self.vocab)} tokens but the model has {ctc.config.vocab_size} outputs")
        self.model: nn.Module = CTCLogits(ctc.eval()).eval()
        self.config = ctc.config
        self.blank = self.vocab.index("<pad>") if "<pad>" in self.vocab else (self.config.pad_token_id or 0)
        strides, kernels = list(self.config.conv_stride), list(self.config.conv_kernel)
        self.frame_samples = math.prod(strides)
        self.receptive_field = 1 + sum((k - 1) * math.prod(strides[:i]) for i, k in enumerate(kernels))
        if getattr(self.config, "add_adapter", False):
            self.frame_samples *= self.config.adapter_stride**self.config.num_adapter_layers
        self.frame_seconds = self.frame_samples / SAMPLE_RATE
        self.chunk_samples = max(
            self.frame_samples, round(chunk_seconds * SAMPLE_RATE) // self.frame_samples * self.frame_samples
        )
        self.parameters = sum(p.numel() for p in ctc.parameters())
        self._stats = CallStats()

    @classmethod
    def from_config(cls, config: Wav2Vec2Config, vocab: Sequence[str] | None = None, **kwargs: Any) -> PhonemeExtractor:
        """An extractor with ``config``'s topology and seeded random weights."""
        return cls(config=config, vocab=vocab, **kwargs)

    def info(self) -> dict[str, Any]:
        """The model: source, ``trained`` flag, parameter count, topology, frame stride, chunk size."""
        topology = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                    "feat_extract_norm", "do_stable_layer_norm", "conv_stride", "conv_kernel")  # fmt: skip
        return {
            "source": self.source,
            "trained": self.trained,
            "parameters": self.parameters,
            "topology": {name: getattr(self.config, name) for name in topology},
            "vocab_size": len(self.vocab),
            "frame_seconds": self.frame_seconds,
            "receptive_field_samples": self.receptive_field,
            "chunk_seconds": self.chunk_samples / SAMPLE_RATE,
        }

    def uniopt_components(self) -> list[Component]:
        """The CTC network, ``self.model``, with 5 s of deterministic speech-like audio as example.

        Graph stages are also validated at the lengths the extractor runs: a whole chunk, and 1 s.
        """

        def inputs(seed: int, seconds: float = 5.0) -> tuple[torch.Tensor]:
            return (torch.from_numpy(self._normalized(speech_like_audio(seconds, seed)))[None],)

        return [
            Component(
                name="model",
                module=self.model,
                example_inputs=inputs(0),
                input_names=("input_values",),
                output_names=("logits",),
                dynamic_axes={"input_values": {1: "samples"}, "logits": {1: "frames"}},
                metric=Metric("ctc_agreement", 0.98),
                kind="encoder",
                exporter="legacy",
                calibration_inputs=[inputs(seed) for seed in range(1, 5)],
                validation_inputs=[inputs(5, self.chunk_samples / SAMPLE_RATE), inputs(6, 1.0)],
            )
        ]

    def _normalized(self, wav: np.ndarray) -> np.ndarray:
        if not self.normalize:
            return wav
        return ((wav - wav.mean()) / np.sqrt(wav.var() + 1e-7)).astype(np.float32)

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        bounds = list(range(0, n, self.chunk_samples)) + [n]
        if len(bounds) > 2 and n - bounds[-2] < max(self.receptive_field, self.chunk_samples // 4):
            del bounds[-2]
        return list(zip(bounds[:-1], bounds[1:], strict=True))

    def _logits(self, wav: np.ndarray) -> Any:
        with torch.inference_mode():
            out = self.model(torch.from_numpy(self._normalized(wav))[None])
        return out[0] if isinstance(out, (tuple, list)) else out

    def extract_phonemes(self, audio: Any, sample_rate: int) -> list[PhonemeSegment]:
        """Phonemes of ``audio`` (numpy or torch; mono or stereo; any rate), in time order."""
        started = time.perf_counter()
        wav = prepare_audio(audio, sample_rate, SAMPLE_RATE, min_samples=self.receptive_field)
        duration = wav.size / SAMPLE_RATE
        runs: list[list[Any]] = []  # frames counted from the start of the audio
        chunk_end = -2  # the last frame of the previous chunk
        for start, stop in self._chunks(wav.size):
            logits = self._logits(wav[start:stop])
            offset = start // self.frame_samples
            for phoneme, first, last, total in _runs(logits, self.vocab, self.blank, SPECIAL_TOKENS):
                prev = runs[-1] if runs else None
                # A run cut by a chunk boundary: one pass over the whole audio would give one run.
                if prev and first == 0 and prev[2] == chunk_end and prev[0] == phoneme:
                    prev[2], prev[3] = last + offset, prev[3] + total
                else:
                    runs.append([phoneme, first + offset, last + offset, total])
            chunk_end = offset + int(logits.shape[-2]) - 1
        fs = self.frame_seconds
        segments = [PhonemeSegment(p, a * fs, min((b + 1) * fs, duration), t / (b - a + 1)) for p, a, b, t in runs]
        seconds = time.perf_counter() - started
        self._stats.record(duration, seconds)
        if self.settings.enable_performance_logging:
            log.info("phonemes of %.2f s of audio in %.1f ms", duration, seconds * 1e3)
        return segments

    __call__ = extract_phonemes

    def get_performance_info(self) -> dict[str, Any]:
        """Calls made, seconds of audio and of processing, real-time factor, and :meth:`info`."""
        stats = self._stats.snapshot()
        stats["model"] = self.info()
        return stats


_FAST_INSTANCES: dict[tuple[Any, ...], Any] = {}
_FAST_LOCK = threading.Lock()


def get_fast_instance(model_dir: str | Path | None = None, **optimizer_settings: Any) -> Any:
    """The process-wide extractor for ``model_dir`` and these settings, built on first use.

    Unless ``USE_OPTIMIZED_PHONEME_MODEL`` is false it is wrapped in
    :class:`uniopt.UniversalOptimizer` (which answers ``extract_phonemes`` and every other attribute);
    ``optimizer_settings`` (``mode="tier"``, ``use_fast_models=False``, ...) override the environment;
    the environment at the first call decides. Concurrent first calls build the instance once.
    """
    where = None if model_dir is None else str(Path(model_dir).resolve())
    key = (where, tuple(sorted((k, repr(v)) for k, v in optimizer_settings.items())))
    with _FAST_LOCK:
        instance = _FAST_INSTANCES.get(key)
        if instance is None:
            settings = load_settings(optimizer_settings)
            instance = PhonemeExtractor(model_dir, settings=settings)
            if settings.use_optimized_phoneme_model:
                from uniopt.optimizer.universal import UniversalOptimizer

                instance = UniversalOptimizer(instance, **optimizer_settings)
            _FAST_INSTANCES[key] = instance
        return instance


def clear_fast_instances() -> None:
    """Forget the instances :func:`get_fast_instance` built (they are rebuilt on the next call)."""
    with _FAST_LOCK:
        _FAST_INSTANCES.clear()


def bench_engine() -> PhonemeExtractor:
    """The benchmark's phoneme engine: the default model (base size, or large with USE_FAST_MODELS=false)."""
    return PhonemeExtractor()
