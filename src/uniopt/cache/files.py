"""File-system helpers for the artifact cache: unique names, hashing, fsync, sizes, removal."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import threading
from pathlib import Path

__all__ = ["fsync_path", "is_unwritable", "pid_alive", "remove_path", "sha256_file", "tree_stat", "unique_path"]

#: Error numbers that mean a file system takes no more writes (full, read-only, not ours).
UNWRITABLE_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM") if hasattr(errno, name)
)


def is_unwritable(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an exception it was raised from is an OSError of :data:`UNWRITABLE_ERRNOS`."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in UNWRITABLE_ERRNOS:
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def unique_path(directory: Path, prefix: str) -> Path:
    """A name in ``directory`` no other process or thread will pick."""
    return directory / f"{prefix}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(6)}"


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path, directory: bool = False) -> None:
    """Flush a file or directory to disk; best effort (directories cannot be opened on Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tree_stat(path: Path) -> tuple[int, float]:
    """Return the total size of the files under ``path`` and the newest mtime in it."""
    st = os.lstat(path)
    size, newest = (0 if os.path.isdir(path) else st.st_size), st.st_mtime
    for dirpath, dirs, names in os.walk(path):
        for name in dirs + names:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                size += 0 if name in dirs else st.st_size
                newest = max(newest, st.st_mtime)
    return size, newest


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (always False off POSIX)."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return True


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree, ignoring what is already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
