"""Diarization error rate (DER) and its parts, computed by pyannote.metrics.

:func:`diarization_error` scores :class:`~uniopt.engines.diarization.pipeline.Segment` lists
against reference turns with :class:`pyannote.metrics.diarization.DiarizationErrorRate` over the
whole recording (the UEM is ``[0, duration_s]``). ``collar`` is pyannote's: the total width of the
region removed around each reference boundary (0.25 removes 0.125 s on each side); overlapped
speech is scored. :func:`read_rttm` and :func:`segments_from_json` read reference files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniopt.engines.diarization.pipeline import Segment
from uniopt.errors import BackendUnavailable, InputError

__all__ = ["DiarizationScore", "diarization_error", "read_rttm", "segments_from_json"]


@dataclass(frozen=True)
class DiarizationScore:
    """DER and its parts as fractions of the scored reference speech; ``speakers`` found."""

    der: float
    missed: float
    false_alarm: float
    confusion: float
    speakers: int
    reference_speakers: int


def read_rttm(path: str | Path) -> list[Segment]:
    """``SPEAKER`` lines of an RTTM file as segments (start, start + duration, speaker)."""
    segments = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0] != "SPEAKER":
            continue
        if len(fields) < 8:
            raise InputError(f"{path}:{number}: an RTTM SPEAKER line has at least 8 fields")
        start, duration = float(fields[3]), float(fields[4])
        segments.append(Segment(start, start + duration, fields[7]))
    return segments


def segments_from_json(path: str | Path) -> tuple[list[Segment], float]:
    """Reference segments and duration of a fixture JSON (``segments`` of start_s/end_s/speaker)."""
    meta = json.loads(Path(path).read_text())
    return [Segment(float(s["start_s"]), float(s["end_s"]), str(s["speaker"])) for s in meta["segments"]], float(
        meta["duration_s"]
    )


def _annotation(segments: list[Segment], core: Any) -> Any:
    annotation = core.Annotation()
    for index, seg in enumerate(segments):
        if not seg.end_s > seg.start_s:
            raise InputError(f"segment {seg} has no duration")
        annotation[core.Segment(seg.start_s, seg.end_s), index] = seg.speaker
    return annotation


def diarization_error(
    reference: list[Segment], hypothesis: list[Segment], duration_s: float, collar: float = 0.25
) -> DiarizationScore:
    """DER of ``hypothesis`` against ``reference`` over ``[0, duration_s]`` (see the module docstring)."""
    try:
        from pyannote import core
        from pyannote.metrics.diarization import DiarizationErrorRate
    except ImportError as exc:
        raise BackendUnavailable("pyannote.metrics", "dev", "needed to score diarization") from exc
    if not duration_s > 0 or collar < 0:
        raise InputError(f"duration_s must be > 0 and collar >= 0, got {duration_s}, {collar}")
    if not reference:
        raise InputError("the reference has no speech; DER is undefined")
    metric = DiarizationErrorRate(collar=collar, skip_overlap=False)
    uem = core.Timeline([core.Segment(0.0, duration_s)])
    parts = metric(_annotation(reference, core), _annotation(hypothesis, core), uem=uem, detailed=True)
    total = parts["total"]
    return DiarizationScore(
        der=float(parts["diarization error rate"]),
        missed=float(parts["missed detection"] / total),
        false_alarm=float(parts["false alarm"] / total),
        confusion=float(parts["confusion"] / total),
        speakers=len({s.speaker for s in hypothesis}),
        reference_speakers=len({s.speaker for s in reference}),
    )
