"""Parked weights: a module's parameters in a file the kernel can drop from memory and read back.

A component keeps its eager module while a stage replaces it: it is the guard's reference and the
fallback. On a small VM its weights are then most of the memory a stage would need to be built
and run beside them (the TTS decoder's 770 MiB next to a 1.5 GiB limit). Parked, every parameter's
storage becomes a private mapping of a file in the artifact cache (``torch.from_file``,
``MAP_PRIVATE``): the Parameter objects and their values stay, the anonymous memory they held is
freed, and once :func:`page_out_parked` has run (``madvise(MADV_PAGEOUT)``, Linux 5.4+) their pages
are clean page cache, which the kernel drops under the limit and reads back from the file when the
eager module runs again. A page the engine writes to gets its own copy (copy-on-write), which
``MADV_PAGEOUT`` never drops. Buffers are not parked: they may hold running state.

The file is keyed by the component's content and reused by the next process; its bytes are
compared with the module's before the module is switched to it, so a damaged file is never used.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import sys
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parameter import UninitializedParameter

from .cache import ArtifactCache, cache_key
from .memory import format_bytes, memory_headroom, release_memory

__all__ = ["ParkedWeights", "Parking", "page_in_parked", "page_out_parked", "park_for_room", "parks"]

log = logging.getLogger("uniopt")

CACHE_KIND = "parked-weights"
FILE = "weights.bin"
#: Storages start at this alignment in the file, so each can be mapped at any dtype.
ALIGN = 4096
#: ``auto`` parks a module whose parameters take more than this share of the memory left.
AUTO_SHARE = 0.25
_MADV_PAGEOUT = 21
_MADV_POPULATE_READ = 22
#: Filesystems whose pages are memory the kernel cannot drop: a file there frees nothing.
_MEMORY_FILESYSTEMS = {0x01021994: "tmpfs", 0x858458F6: "ramfs"}


@dataclass
class ParkedWeights:
    """Parameters mapped from ``path``: ``nbytes`` at ``address``, alive while one of ``parameters`` is.

    Only the parameters hold the mapping (their storage is it): it is unmapped with the last of them.
    """

    path: Path
    address: int
    nbytes: int
    parameters: list[weakref.ref[torch.Tensor]]

    @property
    def alive(self) -> bool:
        return any((t := ref()) is not None and self.holds(t) for ref in self.parameters)

    def holds(self, tensor: torch.Tensor) -> bool:
        return self.address <= tensor.data_ptr() < self.address + self.nbytes

    def page_out(self) -> bool:
        """Hand the mapping's unmodified pages back to the page cache; False where the kernel cannot."""
        return self.alive and _madvise(self.address, self.nbytes, _MADV_PAGEOUT)

    def page_in(self) -> bool:
        """Map every page now (read from the file when dropped); False once no parameter maps it."""
        if not self.alive:
            return False
        if not _madvise(self.address, self.nbytes, _MADV_POPULATE_READ):  # before Linux 5.14: read each page
            pages = np.ctypeslib.as_array((ctypes.c_uint8 * self.nbytes).from_address(self.address))
            int(pages[:: mmap.PAGESIZE].sum())
        return True


#: The mappings made in this process whose parameters are alive (pruned as they go).
_parked: list[ParkedWeights] = []


@dataclass(frozen=True)
class Parking:
    """What happened to a component's weights: ``parked_bytes`` moved to a file, and why or why not."""

    parked_bytes: int
    note: str


def parks(setting: str, weight_bytes: int, available_bytes: int) -> bool:
    """Whether weights of ``weight_bytes`` are parked with ``available_bytes`` left (``UNIOPT_PARK_WEIGHTS``)."""
    if setting == "auto":
        return weight_bytes > AUTO_SHARE * available_bytes
    return setting == "true"


def park_for_room(module: torch.nn.Module, key: str, cache: ArtifactCache | None, setting: str) -> Parking:
    """Park ``module``'s parameters when ``setting`` asks for it here; a failure is recorded, never raised."""
    groups = list(_storage_groups(module))
    if not groups:
        before = _parked_bytes(module)
        return Parking(before, "parked in the cache before" if before else "")
    weight_bytes = sum(storage.nbytes() for storage, _ in groups)
    left = memory_headroom().available_bytes
    if not parks(setting, weight_bytes, left):
        return Parking(0, "")
    why = f"{format_bytes(weight_bytes)} of weights, {format_bytes(left)} left"
    problem = _unparkable(cache)
    if problem is not None:
        log.info("weights not parked (%s): %s", why, problem)
        return Parking(0, f"not parked ({why}): {problem}")
    assert cache is not None
    try:
        parked = park_weights(cache, key, groups)
    except (OSError, RuntimeError, ValueError) as exc:  # no room on disk, a file that does not map
        log.warning("weights not parked (%s): %s", why, exc)
        return Parking(0, f"not parked ({why}): {type(exc).__name__}: {exc}")
    del groups  # the old storages: freed now, and their heap handed back below
    release_memory()  # also pages the mapping out
    return Parking(parked.nbytes, f"parked in the cache ({why})")


def park_weights(cache: ArtifactCache, key: str, groups: list[tuple[Any, list[torch.Tensor]]]) -> ParkedWeights:
    """Move the parameters of ``groups`` (:func:`_storage_groups`) to a mapped file in ``cache``
    (written once per ``key``) and return it.

    Raises ``ValueError`` when the cached file's bytes differ from the module's (the entry is
    removed first), ``OSError`` when it cannot be written or mapped.
    """
    offsets, total = _layout(groups)
    entry_key = cache_key({"artifact": CACHE_KIND, "component": key, "layout": _signature(groups)})

    def write(directory: Path) -> None:
        with open(directory / FILE, "wb") as f:
            for (storage, _), offset in zip(groups, offsets, strict=True):
                f.seek(offset)
                f.write(_bytes_of(storage).numpy().data)
            f.truncate(total)

    entry, _ = cache.get_or_build(entry_key, write, kind=CACHE_KIND, description={"bytes": total})
    path = entry.path / FILE
    problem = _in_memory(path)  # the cache may have moved to a temporary folder that could not be written
    if problem is not None:
        cache.remove(entry_key)
        raise ValueError(problem)
    mapping = torch.from_file(str(path), shared=False, size=total, dtype=torch.uint8)
    for (storage, _), offset in zip(groups, offsets, strict=True):
        if not torch.equal(mapping[offset : offset + storage.nbytes()], _bytes_of(storage)):
            cache.remove(entry_key)
            raise ValueError(f"the parked weights in {path} differ from the module's; removed")
    for (_, tensors), offset in zip(groups, offsets, strict=True):
        for tensor in tensors:
            item = tensor.element_size()
            mapped = torch.empty(0, dtype=tensor.dtype).set_(
                mapping.untyped_storage(), offset // item + tensor.storage_offset(), tensor.size(), tensor.stride()
            )
            tensor.data = mapped
    parked = ParkedWeights(path, mapping.data_ptr(), total, [weakref.ref(t) for _, ts in groups for t in ts])
    _parked.append(parked)
    return parked


def page_out_parked() -> None:
    """Page out every parked mapping (after the eager module ran: references, timing)."""
    for parked in _live():
        parked.page_out()


def _live() -> list[ParkedWeights]:
    """The mappings whose parameters are alive (the registry is pruned to them)."""
    _parked[:] = [parked for parked in _parked if parked.alive]
    return _parked


def page_in_parked(module: torch.nn.Module) -> None:
    """Page in ``module``'s parked weights, if any, so that what its eager calls need is measured apart."""
    for parked in _parked:
        if any(parked.holds(p) for p in module.parameters()):
            parked.page_in()


def _unparkable(cache: ArtifactCache | None) -> str | None:
    if not sys.platform.startswith("linux"):
        return "parking needs Linux"
    if cache is None:
        return "no artifact cache"
    return _in_memory(cache.root)


def _in_memory(path: Path) -> str | None:
    """Why a file under ``path`` would free no memory (its filesystem keeps pages in memory), or None."""
    try:
        kind = _filesystem_kind(path)
    except OSError as exc:
        return f"the cache's filesystem is unknown ({exc})"
    if kind in _MEMORY_FILESYSTEMS:
        return f"the cache is on {_MEMORY_FILESYSTEMS[kind]}, whose pages stay in memory"
    return None


def _storage_groups(module: torch.nn.Module) -> Iterator[tuple[Any, list[torch.Tensor]]]:
    """Each CPU storage under ``module``'s parameters (tied ones once) and the parameters over it."""
    groups: dict[int, tuple[Any, list[torch.Tensor]]] = {}
    live = _live()
    for param in module.parameters():
        if isinstance(param, UninitializedParameter) or param.device.type != "cpu" or param.is_sparse:
            continue
        if param.is_quantized or param.numel() == 0:
            continue
        if any(parked.holds(param) for parked in live):  # parked through another module object over them
            continue
        storage = param.untyped_storage()
        groups.setdefault(storage.data_ptr(), (storage, []))[1].append(param)
    yield from groups.values()


def _parked_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters that lie in a parking mapping (each once)."""
    live = _live()
    found = {p.data_ptr(): p.numel() * p.element_size() for p in module.parameters() if any(x.holds(p) for x in live)}
    return sum(found.values())


def _layout(groups: list[tuple[Any, list[torch.Tensor]]]) -> tuple[list[int], int]:
    offsets, position = [], 0
    for storage, _ in groups:
        offsets.append(position)
        position += -(-storage.nbytes() // ALIGN) * ALIGN
    return offsets, position


def _signature(groups: list[tuple[Any, list[torch.Tensor]]]) -> list[Any]:
    return [
        [storage.nbytes(), [[str(t.dtype), list(t.shape), list(t.stride()), t.storage_offset()] for t in tensors]]
        for storage, tensors in groups
    ]


def _bytes_of(storage: Any) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(storage)


@cache
def _libc() -> ctypes.CDLL:
    """The C library, loaded once (``OSError`` where there is none to load)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _filesystem_kind(path: Path) -> int:
    """``statfs``'s ``f_type`` of the filesystem holding ``path``."""
    buffer = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first field
    if _libc().statfs(os.fsencode(str(path)), buffer) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno), str(path))
    return ctypes.c_long.from_buffer(buffer).value


def _madvise(address: int, length: int, advice: int) -> bool:
    """``madvise`` over a whole mapping (``address`` is its start, page-aligned); False where it fails."""
    return length > 0 and _libc().madvise(address, length, advice) == 0
