"""Thread-safe call statistics for audio engines: calls, audio and processing seconds, real-time factor."""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["CallStats"]


class CallStats:
    """Counts what an engine has processed; :meth:`snapshot` adds the real-time factor."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls = 0
        self._audio_seconds = 0.0
        self._processing_seconds = 0.0

    def record(self, audio_seconds: float, processing_seconds: float) -> None:
        """Add one call that handled ``audio_seconds`` of audio in ``processing_seconds``."""
        with self._lock:
            self._calls += 1
            self._audio_seconds += audio_seconds
            self._processing_seconds += processing_seconds

    def snapshot(self) -> dict[str, Any]:
        """Calls, audio seconds, processing seconds and real-time factor (None before any audio)."""
        with self._lock:
            calls, audio, processing = self._calls, self._audio_seconds, self._processing_seconds
        return {
            "calls": calls,
            "audio_seconds": audio,
            "processing_seconds": processing,
            "real_time_factor": processing / audio if audio else None,
        }
