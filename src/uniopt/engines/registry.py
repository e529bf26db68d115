"""The built-in reference engines by name, and user engines by import path."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ..errors import UniOptError

__all__ = ["BUILTIN_ENGINES", "BUILTIN_STRUCTURES", "load_engine", "load_structure"]

#: name -> "module:factory"; each factory builds the engine at its default (benchmark) size.
BUILTIN_ENGINES: dict[str, str] = {
    "phoneme": "uniopt.engines.phoneme:bench_engine",
    "diarization": "uniopt.engines.diarization:bench_engine",
    "tts": "uniopt.engines.tts:bench_engine",
}

#: name -> "module:factory" building the same engine without reading weight files, for the meta device
#: (the engines that build from a config build the same way).
BUILTIN_STRUCTURES: dict[str, str] = {**BUILTIN_ENGINES, "diarization": "uniopt.engines.diarization:bench_structure"}


def _factory(spec: str) -> Callable[[], Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UniOptError(
            f"engine {spec!r}: use a built-in name ({', '.join(BUILTIN_ENGINES)}) or 'package.module:factory'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UniOptError(f"engine {spec!r}: cannot import {module_name} ({exc})") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UniOptError(f"engine {spec!r}: {module_name} has no callable {attr!r}")
    return factory


def load_engine(name: str) -> tuple[Any, Any]:
    """Build engine ``name``: returns (engine, example_inputs or None).

    A factory may return an engine that declares ``uniopt_components()``, or a pair
    ``(nn.Module, example_inputs)``.
    """
    built = _factory(BUILTIN_ENGINES.get(name, name))()
    if isinstance(built, tuple) and len(built) == 2:
        return built[0], built[1]
    return built, None


def load_structure(name: str) -> Any:
    """Built-in engine ``name``'s modules on the meta device: shapes and dtypes, no weights read or allocated."""
    import logging

    import torch

    if name not in BUILTIN_STRUCTURES:
        raise UniOptError(f"no built-in engine {name!r}; expected one of {', '.join(BUILTIN_STRUCTURES)}")
    factory = _factory(BUILTIN_STRUCTURES[name])
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)  # "random weights" warnings are about a real engine, not this one
    try:
        with torch.device("meta"):
            return factory()
    finally:
        logging.disable(disabled)
