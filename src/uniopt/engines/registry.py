"""The built-in reference engines by name, and user engines by import path."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ..errors import UniOptError

__all__ = ["BUILTIN_ENGINES", "load_engine"]

#: name -> "module:factory"; each factory builds the engine at its default (benchmark) size.
BUILTIN_ENGINES: dict[str, str] = {
    "phoneme": "uniopt.engines.phoneme:bench_engine",
    "diarization": "uniopt.engines.diarization:bench_engine",
    "tts": "uniopt.engines.tts:bench_engine",
}


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
