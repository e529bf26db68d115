"""Content-addressed on-disk cache for optimized artifacts (ONNX files, OpenVINO IR, ...)."""

from __future__ import annotations

from uniopt.cache.keys import cache_key, hash_module, input_signature, library_versions
from uniopt.cache.store import ArtifactCache, CacheEntry, default_cache_dir

__all__ = [
    "ArtifactCache",
    "CacheEntry",
    "cache_key",
    "default_cache_dir",
    "hash_module",
    "input_signature",
    "library_versions",
]
