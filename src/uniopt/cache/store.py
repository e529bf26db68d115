"""On-disk artifact cache: atomic entries, per-key file locks, validation and LRU eviction.

Layout: ``entries/<key>/`` (files, ``manifest.json`` written last, ``.last_used``, and a
``runtime/`` folder for files a runtime adds later), ``tmp/<key>.<pid>.<thread>.<random>``
(builds in progress, entries being deleted) and ``locks/`` (``<key>.lock`` for building,
``<key>.use`` for readers, ``<key>.<purpose>.lock`` for :meth:`ArtifactCache.lock`). A finished
temporary directory is renamed into ``entries/``, so readers see a whole entry or none. An entry
with a missing or corrupt manifest, or a missing or resized file, is a miss: it is deleted and
rebuilt, with one warning per key and process.

Entries in use: inside :meth:`ArtifactCache.pinned`, every entry a thread gets is held with a shared
``flock`` on its ``<key>.use`` file until the block ends. Eviction and :meth:`ArtifactCache.clear`
take that lock exclusively without waiting, and pass over an entry they cannot lock: an entry
another thread or process is reading is never deleted under it (POSIX; elsewhere nothing is held).

``runtime/`` holds what a runtime writes after the entry is published (OpenVINO's compiled blobs
for the entry's IR, inductor's cache for a compiled component, :meth:`ArtifactCache.runtime_dir`).
It is not in the manifest and not checked by ``verify``, but it counts towards the entry's size,
and goes with the entry when the entry is evicted, removed, cleared or rebuilt.

A cache may sit on a read-only *bundle*: a cache directory prepared on another machine
(``optimize prepare``). Its valid entries are found first and are never written, touched or
deleted; an invalid or rejected one is passed over, and whatever is built goes to the cache itself.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from filelock import FileLock, Timeout

from uniopt.cache.files import fsync_path, is_unwritable, pid_alive, remove_path, sha256_file, tree_stat, unique_path
from uniopt.cache.keys import cache_key, jsonable
from uniopt.errors import CacheError

try:
    import fcntl
except ImportError:  # Windows: entries in use are not protected from eviction
    fcntl = None  # type: ignore[assignment]

__all__ = ["ArtifactCache", "CacheEntry", "default_cache_dir"]

logger = logging.getLogger("uniopt.cache")

MANIFEST = "manifest.json"
LAST_USED = ".last_used"
RUNTIME = "runtime"
#: Folders that earlier versions kept outside the entries; ``clear`` deletes them.
_LEGACY_DIRS = ("openvino", "inductor")
_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_warned: set[str] = set()
_warned_lock = threading.Lock()

Build = Callable[[Path], Mapping[str, Any] | None]


def default_cache_dir() -> Path:
    """Return the platform's per-user cache directory for uniopt."""
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("uniopt"))


@dataclass(frozen=True)
class CacheEntry:
    """One cache entry as read from disk; ``problem`` is None for a valid entry."""

    key: str
    path: Path
    kind: str
    description: dict[str, Any]
    files: dict[str, dict[str, Any]]
    created: float
    last_used: float
    size_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None

    @property
    def valid(self) -> bool:
        """Whether the entry passed the size check (``verify`` also checks sha256)."""
        return self.problem is None


def _scan(tmp: Path) -> dict[str, dict[str, Any]]:
    """Hash and fsync every file a build wrote; return relpath -> {size, sha256}."""
    files: dict[str, dict[str, Any]] = {}
    for dirpath, dirs, names in os.walk(tmp):
        dirs.sort()
        for name in sorted(names):
            full = Path(dirpath) / name
            rel = full.relative_to(tmp).as_posix()
            if rel in (MANIFEST, LAST_USED) or rel.split("/")[0] == RUNTIME or full.is_symlink():
                raise ValueError(f"a cache build wrote a reserved name or a symlink: {rel!r}")
            files[rel] = {"size": full.stat().st_size, "sha256": sha256_file(full)}
            fsync_path(full)
    return files


def _check_manifest(m: Any, key: str, schema: int) -> str | None:
    if not isinstance(m, dict) or m.get("schema") != schema or m.get("key") != key:
        return f"manifest.json is not a schema {schema} manifest for this key"
    if not isinstance(m.get("created"), (int, float)) or not isinstance(m.get("kind"), str):
        return "manifest.json lacks kind or created"
    if not all(isinstance(m.get(k), dict) for k in ("description", "extra", "files")):
        return "manifest.json lacks description, extra or files"
    for rel, info in m["files"].items():
        parts = PurePosixPath(rel).parts
        reserved = rel in (MANIFEST, LAST_USED) or (bool(parts) and parts[0] == RUNTIME)
        bad_name = not parts or rel.startswith("/") or ".." in parts or reserved
        if bad_name or not isinstance(info, dict) or not isinstance(info.get("size"), int):
            return f"manifest.json has a bad record for {rel!r}"
    return None


class ArtifactCache:
    """A directory of build artifacts keyed by :func:`uniopt.cache.cache_key`."""

    SCHEMA_VERSION: ClassVar[int] = 1
    LOCK_TIMEOUT: ClassVar[float] = 600.0
    STALE_TEMP_SECONDS: ClassVar[float] = 3600.0
    ORPHAN_TEMP_SECONDS: ClassVar[float] = 86400.0  # removed even if its pid seems alive

    def __init__(
        self,
        root: Path | str,
        max_bytes: int | None = None,
        bundle: Path | str | None = None,
        *,
        required: bool = False,
    ) -> None:
        """Open (creating) the cache at ``root``, on the read-only ``bundle`` if one is given.

        A directory that cannot be written (read-only, a file in the way, no permission) raises
        :class:`CacheError` when ``required``; otherwise it is warned about once and the cache
        lives in a private temporary directory, deleted at exit (:attr:`persistent` is False).
        """
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        self.requested_root = self.root = Path(root).expanduser()
        self.max_bytes = max_bytes
        self.bundle = None if bundle is None else Path(bundle).expanduser()
        if self.bundle is not None and not (self.bundle / "entries").is_dir():
            raise CacheError(f"{str(self.bundle)!r} is not a uniopt cache bundle (no entries/ folder)")
        self._passed_over: set[str] = set()
        self._pins = threading.local()
        self.persistent = True
        try:
            self._open(self.root)
        except OSError as exc:
            error = CacheError(
                f"the uniopt cache directory {str(self.root)!r} is not writable ({exc}); "
                "set UNIOPT_CACHE_DIR to a writable directory"
            )
            if required:
                raise error from exc
            self._without_persistence(error)
        self._remove_stale_temporaries()

    def _open(self, root: Path) -> None:
        self._entries, self._tmp, self._locks = (root / d for d in ("entries", "tmp", "locks"))
        for d in (self._entries, self._tmp, self._locks):
            d.mkdir(parents=True, exist_ok=True)
        probe = unique_path(self._tmp, "probe")
        probe.write_bytes(b"")
        probe.unlink()

    def _without_persistence(self, error: CacheError) -> None:
        """Go on in a private temporary directory (deleted at exit), warning once per directory."""
        if not self.persistent:
            raise error
        with _warned_lock:
            first = str(self.requested_root) not in _warned
            _warned.add(str(self.requested_root))
        if first:
            logger.warning("%s; continuing without a persistent cache (nothing is kept for the next run)", error)
        self.root = Path(tempfile.mkdtemp(prefix="uniopt-cache-"))
        atexit.register(shutil.rmtree, self.root, True)
        self.persistent = False
        self._open(self.root)

    def path_for(self, key: str) -> Path:
        """Return the directory of the entry for ``key`` (which may not exist)."""
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise ValueError(f"invalid cache key {key!r}: use 1-128 characters from [A-Za-z0-9_-]")
        return self._entries / key

    def get(self, key: str) -> CacheEntry | None:
        """Return the entry for ``key`` and mark it used, or None (an invalid one is deleted).

        The bundle's entry comes first, when there is a valid one.
        """
        bundled = self._bundled(key)
        if bundled is not None:
            return bundled
        path = self.path_for(key)
        self._pin(key)
        entry = self._inspect(key, path)
        if entry is None:
            return None
        if entry.problem is not None:
            self._warn_once(entry)
            self._discard(key, path, only_if_invalid=True)
            return None
        return replace(entry, last_used=self._touch(path))

    def get_or_build(
        self, key: str, build: Build, *, kind: str, description: Mapping[str, Any]
    ) -> tuple[CacheEntry, bool]:
        """Return ``(entry, built_now)``, calling ``build(tmpdir)`` only on a miss.

        ``build`` writes its files into ``tmpdir`` and may return a JSON-able mapping, kept as
        ``entry.extra``. If it raises, nothing is left behind and the error propagates.
        """
        entry = self.get(key)
        if entry is not None:
            return entry, False
        desc = jsonable(dict(description))
        lock = FileLock(self._locks / f"{key}.lock", timeout=self.LOCK_TIMEOUT)
        try:
            lock.acquire()
        except (Timeout, OSError) as exc:  # correctness never depends on the lock
            logger.warning("building cache entry %s without its lock (%s)", key, exc)
        try:
            entry = self.get(key) if lock.is_locked else None  # re-check once the lock is held
            if entry is not None:
                return entry, False
            try:
                entry, built = self._build(key, build, kind, desc)
            except Exception as exc:  # a build that ran out of room may wrap the OSError
                if not is_unwritable(exc) or not self.persistent:
                    raise
                self._without_persistence(CacheError(f"the uniopt cache {str(self.root)!r} cannot be written: {exc}"))
                entry, built = self._build(key, build, kind, desc)
        finally:
            if lock.is_locked:
                with contextlib.suppress(OSError):
                    lock.release()
        if built:
            self._evict(self.max_bytes, keep=key)
        return entry, built

    def entries(self) -> list[CacheEntry]:
        """Return every entry, valid or not, least recently used first."""
        found = []
        for name in os.listdir(self._entries):
            if _KEY_RE.fullmatch(name) and (entry := self._inspect(name, self._entries / name)):
                found.append(entry)
        return sorted(found, key=lambda e: (e.last_used, e.key))

    def verify(self) -> list[tuple[CacheEntry, str | None]]:
        """Check every entry's files by size and sha256; return (entry, problem or None) pairs."""
        return [(entry, self._full_check(entry)) for entry in self.entries()]

    def verify_entry(self, key: str) -> str | None:
        """Check one entry (the bundle's, when ``get`` would return it) by size and sha256."""
        entry = self._bundled(key) or self._inspect(key, self.path_for(key))
        return "missing" if entry is None else self._full_check(entry)

    @staticmethod
    def _full_check(entry: CacheEntry) -> str | None:
        problem = entry.problem
        for rel, info in entry.files.items():
            try:
                if problem is None and sha256_file(entry.path / rel) != info.get("sha256"):
                    problem = f"file {rel!r} does not match its sha256"
            except OSError as exc:
                problem = f"file {rel!r} cannot be read ({exc})"
        return problem

    def remove(self, key: str) -> None:
        """Delete the entry for ``key`` if it exists; a bundle's entry is passed over from now on instead."""
        if self._bundled(key) is not None:
            self._passed_over.add(key)
        self._discard(key, self.path_for(key), only_if_invalid=False)

    def _bundled(self, key: str) -> CacheEntry | None:
        """The bundle's valid entry for ``key``, read without writing anything."""
        if self.bundle is None or key in self._passed_over:
            return None
        entry = self._inspect(key, self.bundle / "entries" / self.path_for(key).name)
        if entry is not None and entry.problem is not None:
            self._warn_once(entry)
            self._passed_over.add(key)
            return None
        return entry

    def clear(self) -> int:
        """Delete every entry not in use and stale temporaries; return the number of entries deleted."""
        removed = 0
        for name in os.listdir(self._entries):
            if not _KEY_RE.fullmatch(name):
                continue
            with self._unused(name) as free:
                removed += free and self._discard(name, self._entries / name, only_if_invalid=False)
        for name in _LEGACY_DIRS:
            remove_path(self.root / name)
        self._remove_stale_temporaries()
        return removed

    def evict(self, max_bytes: int | None = None) -> list[str]:
        """Delete entries, invalid then least recently used, until the total fits; return their keys.

        ``max_bytes`` defaults to the cache's own limit; with neither, nothing is deleted. Entries
        in use (see :meth:`pinned`) are passed over.
        """
        return self._evict(self.max_bytes if max_bytes is None else max_bytes, keep=None)

    def total_bytes(self) -> int:
        """Return the size of all entries in bytes (temporaries are not counted)."""
        return sum(e.size_bytes for e in self.entries())

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """Hold every entry this thread gets (``get``, ``get_or_build``) until the block ends.

        An entry held this way is never deleted by eviction or :meth:`clear`, in this process or
        another; it may still be removed explicitly (:meth:`remove`, a corrupt entry). Blocks nest;
        the outermost releases. Holding costs one open file per entry.
        """
        if getattr(self._pins, "held", None) is not None:
            yield
            return
        held: dict[str, int] = {}
        self._pins.held = held
        try:
            yield
        finally:
            self._pins.held = None
            for fd in held.values():
                with contextlib.suppress(OSError):
                    os.close(fd)  # closing the file releases its lock

    def lock(self, name: str, timeout: float) -> FileLock:
        """An inter-process lock on ``name`` (``<key>.<purpose>``), for work outside a build.

        Used as ``with cache.lock(...)``; raises :class:`filelock.Timeout` after ``timeout`` seconds.
        """
        key, _, purpose = name.partition(".")
        self.path_for(key)  # checks the key
        if not re.fullmatch(r"[a-z]{1,32}", purpose):
            raise ValueError(f"invalid lock purpose {purpose!r} in {name!r}: use lower-case letters")
        return FileLock(self._locks / f"{key}.{purpose}.lock", timeout=timeout)

    def scratch_dir(self, name: str) -> Path:
        """A new folder for files that later become an entry's (moved in by rename: the same filesystem).

        The caller removes it; one left behind by a process that is gone is removed as stale.
        """
        folder = unique_path(self._tmp, name)
        folder.mkdir()
        return folder

    def runtime_dir(self, entry: Path) -> Path | None:
        """A folder for files a runtime writes about the entry at ``entry`` (compiled blobs), or None.

        For an entry of this cache, its own ``runtime/`` folder. For a bundle's entry, which is
        never written, the ``runtime/`` folder of a companion entry of this cache keyed by the
        bundle entry's key. None when no such folder can be made.
        """
        key = entry.name
        if not _KEY_RE.fullmatch(key):
            return None
        try:
            if entry.parent == self._entries:
                folder = entry / RUNTIME
            elif self.bundle is not None and entry.parent == self.bundle / "entries":
                companion, _ = self.get_or_build(
                    cache_key({"runtime-for": key}), lambda _: None, kind="runtime", description={"for": key}
                )
                folder = companion.path / RUNTIME
            else:
                return None
            folder.mkdir(exist_ok=True)
        except OSError:
            return None
        return folder

    def _pin(self, key: str) -> None:
        """Inside :meth:`pinned`: take a shared lock on ``key``'s ``.use`` file (best effort)."""
        held = getattr(self._pins, "held", None)
        if held is None or key in held or fcntl is None:
            return
        try:
            fd = os.open(self._locks / f"{key}.use", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # eviction holds it exclusively only while it deletes the entry
        except OSError:
            os.close(fd)
            return
        held[key] = fd

    @contextlib.contextmanager
    def _unused(self, key: str) -> Iterator[bool]:
        """Lock ``key``'s ``.use`` file exclusively for the block, without waiting; False if it is in use.

        Without ``flock`` (Windows, a file system that refuses it) the entry counts as unused:
        correctness does not depend on this lock, only the protection of readers does.
        """
        fd = None
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fd = os.open(self._locks / f"{key}.use", os.O_RDWR | os.O_CREAT, 0o666)
        if fd is None:
            yield True
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.debug("cache entry %s is in use; it is not deleted", key)
                yield False
                return
            except OSError:
                pass
            yield True
        finally:
            os.close(fd)

    @staticmethod
    def _runtime_bytes(path: Path) -> int:
        try:
            return tree_stat(path / RUNTIME)[0]
        except OSError:
            return 0

    def _inspect(self, key: str, path: Path) -> CacheEntry | None:
        """Read an entry, checking its manifest and file sizes; None if nothing is there."""
        try:
            raw = (path / MANIFEST).read_bytes()
            m = json.loads(raw)
            problem = _check_manifest(m, key, self.SCHEMA_VERSION)
        except FileNotFoundError:
            problem = "manifest.json is missing"
        except (OSError, ValueError) as exc:
            problem = f"manifest.json cannot be read ({exc})"
        if problem is not None:
            try:
                size, mtime = tree_stat(path)
            except FileNotFoundError:
                return None
            return CacheEntry(key, path, "", {}, {}, mtime, mtime, size, {}, problem)
        for rel, info in m["files"].items():
            try:
                size = os.stat(path / rel).st_size
            except OSError:
                problem = f"file {rel!r} is missing"
                break
            if size != info["size"]:
                problem = f"file {rel!r} has {size} bytes, expected {info['size']}"
                break
        try:
            last_used = float((path / LAST_USED).read_text(encoding="ascii"))
        except (OSError, ValueError):
            last_used = float(m["created"])
        files, created = m["files"], float(m["created"])
        size = sum(info["size"] for info in files.values()) + len(raw) + self._runtime_bytes(path)
        return CacheEntry(key, path, m["kind"], m["description"], files, created, last_used, size, m["extra"], problem)

    def _touch(self, path: Path, now: float | None = None) -> float:
        """Record a use of an entry in its ``.last_used`` sidecar, atomically."""
        now = time.time() if now is None else now
        tmp = unique_path(path, LAST_USED)
        try:
            tmp.write_text(repr(now), encoding="ascii")
            os.replace(tmp, path / LAST_USED)
        except OSError:  # the entry was removed meanwhile, or is read-only
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        return now

    def _warn_once(self, entry: CacheEntry) -> None:
        with _warned_lock:
            if str(entry.path) in _warned:
                return
            _warned.add(str(entry.path))
        logger.warning("cache entry %s is invalid (%s); it will be rebuilt", entry.path, entry.problem)

    def _discard(self, key: str, path: Path, *, only_if_invalid: bool) -> bool:
        """Move an entry out of ``entries/`` atomically and delete it; True if it was removed.

        With ``only_if_invalid``, an entry that is valid once moved (another process published
        it meanwhile) is put back.
        """
        trash = unique_path(self._tmp, key)
        try:
            os.replace(path, trash)
        except FileNotFoundError:
            return False
        except OSError:
            remove_path(path)
            return not os.path.lexists(path)
        if only_if_invalid and (moved := self._inspect(key, trash)) and moved.problem is None:
            with contextlib.suppress(OSError):
                os.rename(trash, path)
                return False
        remove_path(trash)
        return True

    def _build(self, key: str, build: Build, kind: str, desc: Any) -> tuple[CacheEntry, bool]:
        """Build into a fresh temporary directory, write its manifest last, then publish it."""
        tmp = unique_path(self._tmp, key)
        tmp.mkdir()
        try:
            result = build(tmp)
            extra = jsonable(dict(result)) if result is not None else {}
            files = _scan(tmp)
            now = time.time()
            manifest = dict(schema=self.SCHEMA_VERSION, key=key, kind=kind, description=desc)
            manifest.update(files=files, created=now, extra=extra)
            raw = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False).encode()
            part = unique_path(tmp, MANIFEST)
            with open(part, "wb", buffering=0) as f:
                f.write(raw)
                os.fsync(f.fileno())
            os.replace(part, tmp / MANIFEST)
            self._touch(tmp, now)
            fsync_path(tmp, directory=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = self.path_for(key)
        size = sum(info["size"] for info in files.values()) + len(raw)
        entry = CacheEntry(key, final, kind, desc, files, now, now, size, extra)
        error: OSError | None = None
        for _ in range(5):
            try:
                os.replace(tmp, final)
            except OSError as exc:
                error, existing = exc, self._inspect(key, final)
                if existing is None:  # gone meanwhile, or the error was not about it
                    continue
                if existing.problem is None:  # another process won without the lock: use theirs
                    shutil.rmtree(tmp, ignore_errors=True)
                    return replace(existing, last_used=self._touch(final)), False
                self._warn_once(existing)
                self._discard(key, final, only_if_invalid=True)
                continue
            fsync_path(self._entries, directory=True)
            return entry, True
        shutil.rmtree(tmp, ignore_errors=True)
        raise CacheError(f"cannot publish cache entry {final}: {error}") from error

    def _evict(self, limit: int | None, keep: str | None) -> list[str]:
        if limit is None:
            return []
        entries = self.entries()
        total = sum(e.size_bytes for e in entries)
        removed: list[str] = []
        for e in sorted(entries, key=lambda e: (e.problem is None, e.last_used)):
            if total <= limit:
                break
            if e.key == keep:
                continue
            with self._unused(e.key) as free:
                if not free:
                    continue
                if self._discard(e.key, e.path, only_if_invalid=e.problem is not None):
                    removed.append(e.key)
                total -= e.size_bytes
        return removed

    def _remove_stale_temporaries(self) -> None:
        """Delete temporaries older than STALE_TEMP_SECONDS whose process is gone."""
        now = time.time()
        for name in os.listdir(self._tmp):
            try:
                age = now - tree_stat(self._tmp / name)[1]
            except OSError:
                continue
            fields = name.split(".")
            pid = int(fields[1]) if len(fields) >= 4 and fields[1].isdigit() else None
            alive = pid is not None and age < self.ORPHAN_TEMP_SECONDS and pid_alive(pid)
            if age >= self.STALE_TEMP_SECONDS and not alive:
                remove_path(self._tmp / name)
