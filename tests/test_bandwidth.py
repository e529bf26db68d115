"""The memory bandwidth probe: a plausible number, cached per host and thread count, never broken by its cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from uniopt.cache import ArtifactCache
from uniopt.errors import CacheError, MemoryBudgetError
from uniopt.memory import MemoryHeadroom
from uniopt.threads import thread_budget
from uniopt.tiers import BandwidthProbe, bandwidth, floor_seconds, host_profile, memory_bandwidth

MiB, GiB = 2**20, 2**30


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace the measurement by a fast fake; returns the thread counts it was called with."""
    calls: list[int] = []

    def fake(threads: int, buffer_bytes: int | None = None) -> BandwidthProbe:
        calls.append(threads)
        return BandwidthProbe(1e9 * (10 * threads + len(calls)), threads, 64 * MiB, 0.01, False, float(len(calls)))

    monkeypatch.setattr(bandwidth, "measure_bandwidth", fake)
    return calls


def forbid_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(threads: int, buffer_bytes: int | None = None) -> BandwidthProbe:
        raise AssertionError("measured instead of reading the cache")

    monkeypatch.setattr(bandwidth, "measure_bandwidth", fail)


def manifest(cache_dir: Path) -> Path:
    (entry,) = [e for e in ArtifactCache(cache_dir).entries() if e.kind == "memory-bandwidth"]
    return entry.path / "manifest.json"


def test_a_real_probe_is_plausible_and_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    threads = 1 if before != 1 else 2
    probe = memory_bandwidth(threads, cache_dir=tmp_path)
    assert 0.5e9 < probe.read_bytes_per_s < 2e12
    assert probe.threads == threads and not probe.from_cache
    assert bandwidth.MIN_BUFFER_BYTES <= probe.buffer_bytes <= bandwidth.BUFFER_BYTES
    assert 0 < probe.seconds < 30
    assert torch.get_num_threads() == before  # the budget was set for the probe only

    forbid_measuring(monkeypatch)
    again = memory_bandwidth(threads, cache_dir=tmp_path)
    assert again.from_cache
    assert (again.read_bytes_per_s, again.buffer_bytes, again.measured_at) == (
        probe.read_bytes_per_s,
        probe.buffer_bytes,
        probe.measured_at,
    )


def test_the_default_is_the_thread_budget_in_the_configured_cache(
    measured: list[int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("UNIOPT_CACHE_DIR", str(tmp_path / "configured"))
    probe = memory_bandwidth()
    assert measured == [thread_budget(host_profile().usable_cpus).intra_op] == [probe.threads]
    assert manifest(tmp_path / "configured").is_file()
    monkeypatch.setenv("UNIOPT_THREADS", "3")
    assert memory_bandwidth().threads == 3 and measured[-1] == 3


def test_thread_counts_and_hosts_are_separate_entries(measured: list[int], make_profile, tmp_path: Path) -> None:
    one, two = memory_bandwidth(1, cache_dir=tmp_path), memory_bandwidth(2, cache_dir=tmp_path)
    assert measured == [1, 2] and one.read_bytes_per_s != two.read_bytes_per_s
    assert memory_bandwidth(1, cache_dir=tmp_path) == BandwidthProbe(**{**one.to_dict(), "from_cache": True})
    assert memory_bandwidth(2, cache_dir=tmp_path) == BandwidthProbe(**{**two.to_dict(), "from_cache": True})
    other_host = make_profile("avx2", usable_cpus=4)
    assert not memory_bandwidth(1, cache_dir=tmp_path, profile=other_host).from_cache
    assert measured == [1, 2, 1]
    assert len([e for e in ArtifactCache(tmp_path).entries() if e.kind == "memory-bandwidth"]) == 3


def test_refresh_measures_again_and_replaces(measured: list[int], tmp_path: Path) -> None:
    first = memory_bandwidth(2, cache_dir=tmp_path)
    second = memory_bandwidth(2, cache_dir=tmp_path, refresh=True)
    assert not second.from_cache and second.read_bytes_per_s != first.read_bytes_per_s
    assert memory_bandwidth(2, cache_dir=tmp_path).read_bytes_per_s == second.read_bytes_per_s
    assert measured == [2, 2]


def test_a_corrupt_cache_file_is_measured_again_and_replaced(measured: list[int], tmp_path: Path) -> None:
    memory_bandwidth(2, cache_dir=tmp_path)
    manifest(tmp_path).write_text("{ not json")
    again = memory_bandwidth(2, cache_dir=tmp_path)
    assert not again.from_cache and measured == [2, 2]
    cached = memory_bandwidth(2, cache_dir=tmp_path)
    assert cached.from_cache and cached.read_bytes_per_s == again.read_bytes_per_s


@pytest.mark.parametrize(
    "record",
    [{"read_bytes_per_s": -1.0}, {"read_bytes_per_s": "fast"}, {"read_bytes_per_s": None}, {"threads": 7}, {}],
    ids=["negative", "text", "null", "other-threads", "empty"],
)
def test_an_implausible_record_is_measured_again(measured: list[int], tmp_path: Path, record: dict[str, Any]) -> None:
    memory_bandwidth(2, cache_dir=tmp_path)
    path = manifest(tmp_path)
    data = json.loads(path.read_text())
    data["extra"] = {**data["extra"], **record} if record else {}
    path.write_text(json.dumps(data))
    again = memory_bandwidth(2, cache_dir=tmp_path)
    assert not again.from_cache and measured == [2, 2]
    assert memory_bandwidth(2, cache_dir=tmp_path).from_cache


def test_an_unwritable_cache_dir_still_measures(measured: list[int], tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    for _ in range(2):  # nothing kept: measured each time, never an error
        probe = memory_bandwidth(2, cache_dir=blocker / "cache")
        assert not probe.from_cache and probe.threads == 2
    assert measured == [2, 2]
    assert blocker.read_text() == "not a directory"


def test_a_cache_that_fails_still_measures(
    measured: list[int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def fails(self: ArtifactCache, *args: Any, **kwargs: Any) -> None:
        raise CacheError("no cache today")

    monkeypatch.setattr(ArtifactCache, "__init__", fails)
    assert memory_bandwidth(1, cache_dir=tmp_path).threads == 1 and measured == [1]


def test_bad_thread_counts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="threads must be >= 1"):
        memory_bandwidth(0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        bandwidth.measure_bandwidth(-1)


def test_the_buffer_shrinks_with_the_memory_left(monkeypatch: pytest.MonkeyPatch) -> None:
    room = {"available": 16 * GiB}
    monkeypatch.setattr("uniopt.memory.memory_headroom", lambda: MemoryHeadroom(room["available"], None, None))
    assert bandwidth._buffer_bytes() == 256 * MiB
    room["available"] = int(1.2 * GiB)  # under a 1.5 GiB limit
    assert bandwidth._buffer_bytes() == 153 * MiB
    room["available"] = 200 * MiB
    with pytest.raises(MemoryBudgetError, match="memory bandwidth probe"):
        bandwidth.measure_bandwidth(1)


def test_floor_seconds_and_describe() -> None:
    probe = BandwidthProbe(23.4e9, 2, 256 * MiB, 0.4, True, 0.0)
    assert floor_seconds(117 * 10**6, probe) == pytest.approx(0.005)
    assert probe.describe() == "23.4 GB/s at 2 threads (cached, measured 1970-01-01 00:00 UTC)"
    single = BandwidthProbe(9.96e9, 1, 256 * MiB, 0.4, False, 0.0)
    assert single.describe() == "10.0 GB/s at 1 thread (measured now)"
