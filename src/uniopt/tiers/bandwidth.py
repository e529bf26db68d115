"""The host's sustained memory read bandwidth at the thread budget, measured once and cached.

:func:`measure_bandwidth` times ``tensor.sum()`` over a float32 buffer several times the size of
the last-level cache (256 MiB, or an eighth of the memory left when that is less) with torch at
the given number of threads, and keeps the fastest of a few passes. :func:`memory_bandwidth`
keeps that result in the artifact cache, keyed by the host fingerprint and the thread count, so
``optimize doctor`` measures once per host and then reads it. A memory-bound stage cannot run
faster than :func:`floor_seconds`: the bytes it reads divided by this bandwidth.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .profile import HostProfile, host_profile

__all__ = ["BandwidthProbe", "floor_seconds", "measure_bandwidth", "memory_bandwidth"]

logger = logging.getLogger("uniopt.bandwidth")

#: The buffer on a host with room for it: 8x the 32 MiB L3 of the Zen 4 host uniopt is tuned on.
BUFFER_BYTES = 256 * 2**20
#: The buffer is at most 1/HEADROOM_SHARE of the memory left (170 MiB in a 1.5 GiB cgroup).
HEADROOM_SHARE = 8
#: Below this the buffer would fit in a large last-level cache: refuse instead of measuring cache.
MIN_BUFFER_BYTES = 32 * 2**20
#: Timed passes after one warm-up pass; the fastest counts.
PASSES = 10
#: Timed passes stop early once this many seconds went by (after at least two).
PASS_SECONDS = 0.5
#: The cache entry's kind, and the version of its layout (a new version is a new key).
CACHE_KIND = "memory-bandwidth"
CACHE_SCHEMA = 1


@dataclass(frozen=True)
class BandwidthProbe:
    """One bandwidth measurement: bytes read per second by ``threads`` threads over ``buffer_bytes``.

    ``seconds`` is what the measurement took (filling the buffer included), ``measured_at`` when
    it ran (Unix time), ``from_cache`` whether this call read it from the cache.
    """

    read_bytes_per_s: float
    threads: int
    buffer_bytes: int
    seconds: float
    from_cache: bool
    measured_at: float

    def describe(self) -> str:
        """``23.4 GB/s at 2 threads (cached, measured 2026-12-06 16:40 UTC)`` (decimal GB)."""
        plural = "" if self.threads == 1 else "s"
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.measured_at))
        cached = f" (cached, measured {when})" if self.from_cache else " (measured now)"
        return f"{self.read_bytes_per_s / 1e9:.1f} GB/s at {self.threads} thread{plural}{cached}"

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON data."""
        return asdict(self)


def floor_seconds(bytes_read: int, probe: BandwidthProbe) -> float:
    """The least time reading ``bytes_read`` bytes from memory can take at ``probe``'s bandwidth."""
    return bytes_read / probe.read_bytes_per_s


def _buffer_bytes() -> int:
    from ..errors import MemoryBudgetError
    from ..memory import memory_headroom

    room = memory_headroom()
    size = min(BUFFER_BYTES, room.available_bytes // HEADROOM_SHARE) // 2**20 * 2**20
    if size < MIN_BUFFER_BYTES:
        raise MemoryBudgetError("the memory bandwidth probe", MIN_BUFFER_BYTES * HEADROOM_SHARE, room.describe())
    return size


def measure_bandwidth(threads: int, buffer_bytes: int | None = None) -> BandwidthProbe:
    """Measure the read bandwidth now, with torch at ``threads`` threads (restored afterwards).

    ``buffer_bytes`` defaults to :data:`BUFFER_BYTES`, less when memory is short; raises
    :class:`~uniopt.errors.MemoryBudgetError` when not even :data:`MIN_BUFFER_BYTES` fit.
    """
    import torch

    from ..errors import MemoryBudgetError

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    size = buffer_bytes or _buffer_bytes()
    started = time.perf_counter()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        try:
            buffer = torch.ones(size // 4, dtype=torch.float32)  # written, so every page is resident
        except RuntimeError as exc:  # the allocator's "can't allocate memory"
            raise MemoryBudgetError("the memory bandwidth probe", size, f"the allocation failed ({exc})") from exc
        buffer.sum()  # warm-up
        best = math.inf
        timed = time.perf_counter()
        for done in range(1, PASSES + 1):
            start = time.perf_counter()
            buffer.sum()
            best = min(best, time.perf_counter() - start)
            if done >= 2 and time.perf_counter() - timed > PASS_SECONDS:
                break
        del buffer  # an allocation this large is its own mapping, returned to the system when freed
    finally:
        torch.set_num_threads(previous)
    return BandwidthProbe(size / best, threads, size, time.perf_counter() - started, False, time.time())


def _from_extra(extra: dict[str, Any], threads: int) -> BandwidthProbe | None:
    """The probe a cache entry recorded, or None when the record is not a plausible one."""
    try:
        probe = BandwidthProbe(
            read_bytes_per_s=float(extra["read_bytes_per_s"]),
            threads=int(extra["threads"]),
            buffer_bytes=int(extra["buffer_bytes"]),
            seconds=float(extra["seconds"]),
            from_cache=True,
            measured_at=float(extra["measured_at"]),
        )
    except (KeyError, TypeError, ValueError):
        return None
    rate = probe.read_bytes_per_s
    return probe if math.isfinite(rate) and rate > 0 and probe.threads == threads and probe.buffer_bytes > 0 else None


def memory_bandwidth(
    threads: int | None = None,
    *,
    cache_dir: Path | str | None = None,
    refresh: bool = False,
    profile: HostProfile | None = None,
) -> BandwidthProbe:
    """This host's read bandwidth at ``threads`` (default: the thread budget), from the cache when there.

    ``cache_dir`` defaults to ``UNIOPT_CACHE_DIR`` or the user cache directory; ``refresh``
    measures again and replaces the cached value. A corrupt entry is measured again; a cache that
    cannot be written is measured every time, never an error.
    """
    from ..cache import ArtifactCache, cache_key, default_cache_dir
    from ..settings import load_settings
    from ..threads import thread_budget

    profile = profile or host_profile()
    settings = load_settings()
    if threads is None:
        threads = thread_budget(profile.usable_cpus, settings.threads).intra_op
    elif threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    key = cache_key({"kind": CACHE_KIND, "schema": CACHE_SCHEMA, "host": profile.fingerprint, "threads": threads})
    measured: list[BandwidthProbe] = []

    def build(_directory: Path) -> dict[str, Any]:
        measured.append(measure_bandwidth(threads))
        return measured[0].to_dict()

    try:
        cache = ArtifactCache(cache_dir or settings.cache_dir or default_cache_dir(), settings.cache_size_limit)
        if refresh:
            cache.remove(key)
        elif (entry := cache.get(key)) is not None:
            if (probe := _from_extra(entry.extra, threads)) is not None:
                return probe
            logger.warning("cached memory bandwidth %s is not a measurement; measuring again", entry.path)
            cache.remove(key)
        entry, _built = cache.get_or_build(
            key, build, kind=CACHE_KIND, description={"threads": threads, "host": profile.fingerprint[:16]}
        )
    except OSError as exc:  # CacheError included: go on without the cache
        logger.warning("memory bandwidth not cached (%s)", exc)
        return measured[0] if measured else measure_bandwidth(threads)
    if measured:
        return measured[0]
    return _from_extra(entry.extra, threads) or measure_bandwidth(threads)
