"""Memory on small machines: the peak RSS of a step, the memory left under the limit, releasing what lost.

Linux gives a process its resident-set high-water mark (``VmHWM`` in ``/proc/self/status``) and
resets it when ``5`` is written to ``/proc/self/clear_refs``: :func:`measure_memory` uses that, and
samples RSS from a thread where the reset is not allowed. :func:`memory_headroom` is what a build
may still use before the kernel's OOM killer ends the process: the cgroup limit minus the cgroup's
working set (usage less reclaimable page cache), and never more than the host's available memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "MemoryHeadroom",
    "MemoryUse",
    "measure_memory",
    "memory_headroom",
    "format_bytes",
    "module_bytes",
    "process_status_bytes",
    "release_memory",
    "rss_bytes",
]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_SAMPLE_SECONDS = 0.005


def process_status_bytes(field: str, pid: int | None = None) -> int | None:
    """A memory field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``) in bytes: this process's by default."""
    status = _STATUS if pid is None else Path(f"/proc/{pid}/status")
    try:
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes() -> int:
    """This process's resident set size now."""
    rss = process_status_bytes("VmRSS")
    if rss is not None:
        return rss
    import psutil

    return int(psutil.Process().memory_info().rss)


def _hwm() -> int | None:
    return process_status_bytes("VmHWM")


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _hwm() is not None


@dataclass
class MemoryUse:
    """What a step cost: its peak RSS above the RSS it started at, and the RSS it left behind."""

    peak_increase_bytes: int = 0
    resident_increase_bytes: int = 0
    method: str = ""


class _Sampler(threading.Thread):
    """Polls RSS where the kernel's high-water mark cannot be reset."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="uniopt-rss-sampler")
        self.peak = rss_bytes()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(_SAMPLE_SECONDS):
            self.peak = max(self.peak, rss_bytes())


#: Absolute peaks of the measurements in progress (innermost last): a nested reset folds into them.
_open_peaks: list[list[int]] = []
_lock = threading.Lock()


def _forked_child() -> None:
    """In a forked child: the parent's measurements are not its own, and the lock may have been held
    by a thread of the parent that does not exist here (the child would wait for it forever)."""
    global _lock
    _lock = threading.Lock()
    _open_peaks.clear()


os.register_at_fork(after_in_child=_forked_child)


def _fold_high_water_mark() -> None:
    mark = _hwm() or rss_bytes()
    for peak in _open_peaks:
        peak[0] = max(peak[0], mark)


@contextmanager
def measure_memory() -> Iterator[MemoryUse]:
    """Measure the block's peak RSS increase and the resident memory it adds (Linux ``VmHWM``, else sampling).

    Measurements nest: an inner one resets the kernel's mark only after folding it into the outer ones.
    """
    use = MemoryUse()
    before = rss_bytes()
    sampler = None
    with _lock:
        _fold_high_water_mark()
        if _reset_peak():
            use.method = "VmHWM"
            peak = [before]
            _open_peaks.append(peak)
        else:
            sampler = _Sampler()
            sampler.start()
            use.method = "sampled"
    try:
        yield use
    finally:
        after = rss_bytes()
        with _lock:
            if sampler is not None:
                sampler.done.set()
                sampler.join()
                highest = max(sampler.peak, after)
            else:
                _fold_high_water_mark()
                _open_peaks[:] = [p for p in _open_peaks if p is not peak]
                highest = max(peak[0], after)
        use.peak_increase_bytes = max(0, highest - before)
        use.resident_increase_bytes = after - before


def note_child_peak(increase_bytes: int) -> None:
    """Count a child process's peak (``increase_bytes`` above this process's RSS now) in open measurements.

    A step run in a forked child (:mod:`uniopt.isolation`) allocates in the child; while it ran, this
    process and the child together held about this process's RSS plus the child's own increase.
    """
    if increase_bytes <= 0:
        return
    with _lock:
        mark = rss_bytes() + increase_bytes
        for peak in _open_peaks:
            peak[0] = max(peak[0], mark)


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


def release_memory() -> None:
    """Collect garbage, hand freed heap back to the system (glibc ``malloc_trim``), page out parked weights."""
    from .parked import page_out_parked

    gc.collect()
    _malloc_trim()
    page_out_parked()


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once (tied weights share one)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


@dataclass(frozen=True)
class MemoryHeadroom:
    """Memory a step may still use: ``available_bytes``, and the limit it is measured under (None: host RAM)."""

    available_bytes: int
    limit_bytes: int | None
    used_bytes: int | None

    def describe(self) -> str:
        where = f"under the {format_bytes(self.limit_bytes)} limit" if self.limit_bytes else "on this host"
        return f"{format_bytes(self.available_bytes)} available {where}"


def format_bytes(nbytes: int | None) -> str:
    """``1.5 GiB``, ``610 MiB``."""
    if nbytes is None:
        return "?"
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.1f} GiB"
    return f"{nbytes / 2**20:.0f} MiB"


def memory_headroom(root: Path | str = "/") -> MemoryHeadroom:
    """What this process may still allocate: min(cgroup limit - working set, host available memory)."""
    import psutil

    from .tiers.cgroup import read_cgroup_memory

    host_available = int(psutil.virtual_memory().available)
    cgroup = read_cgroup_memory(root)
    if cgroup is None:
        return MemoryHeadroom(host_available, None, None)
    limit, used = cgroup
    return MemoryHeadroom(max(0, min(limit - used, host_available)), limit, used)
