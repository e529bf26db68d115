"""Diarization components with real pretrained weights, ported to plain PyTorch modules.

* :class:`PyanNet` - pyannote segmentation-3.0 (powerset speaker activity, 7 classes);
* :class:`SpeakerEncoder` - resemblyzer's GE2E speaker embedding network, with its preprocessing;
* :class:`Diarizer` - the pipeline built on both: who spoke when, as :class:`Segment` lists;
* :class:`StreamingDiarizer` (``Diarizer.stream()``) - the same stages on audio fed in chunks;
* :func:`diarization_error` - DER and its parts by pyannote.metrics.
"""

from uniopt.engines.diarization.clustering import cluster_embeddings, cluster_units
from uniopt.engines.diarization.metrics import DiarizationScore, diarization_error
from uniopt.engines.diarization.pipeline import (
    Diarizer,
    Segment,
    bench_engine,
    bench_structure,
    postprocess_segments,
)
from uniopt.engines.diarization.segmentation import PyanNet, load_segmentation_model, powerset_to_speakers
from uniopt.engines.diarization.speaker_encoder import (
    SpeakerEncoder,
    embed_utterance,
    load_speaker_encoder,
    wav_to_mel_spectrogram,
)
from uniopt.engines.diarization.streaming import SpeakerDatabase, StreamingDiarizer
from uniopt.engines.diarization.weights import find_segmentation_onnx, find_speaker_encoder_weights

__all__ = [
    "DiarizationScore",
    "Diarizer",
    "PyanNet",
    "Segment",
    "SpeakerDatabase",
    "SpeakerEncoder",
    "StreamingDiarizer",
    "bench_engine",
    "bench_structure",
    "cluster_embeddings",
    "cluster_units",
    "diarization_error",
    "embed_utterance",
    "find_segmentation_onnx",
    "find_speaker_encoder_weights",
    "load_segmentation_model",
    "load_speaker_encoder",
    "postprocess_segments",
    "powerset_to_speakers",
    "wav_to_mel_spectrogram",
]
