"""Run one ``get_or_build`` in its own process, for the cache's multi-process tests.

Usage: python cache_worker.py ROOT KEY COUNTER_FILE SLEEP_SECONDS [START_FILE]

The build appends a line to COUNTER_FILE, sleeps, then writes ``artifact.txt``. The worker prints
the artifact's content and whether it built it. With START_FILE, it prints ``ready`` once imported
and waits for that file to exist, so that several workers can start at the same moment.

Usage: python cache_worker.py hold ROOT KEY RELEASE_FILE

Reads the entry for KEY as a stage build does, inside ``ArtifactCache.pinned()``: gets it, prints
``holding``, waits for RELEASE_FILE to exist, then reads ``artifact.txt`` and prints its content.

Usage: python cache_worker.py evict ROOT MAX_BYTES

Evicts down to MAX_BYTES and prints the evicted keys, one line, comma-separated.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from uniopt.cache import ArtifactCache


def hold(root: str, key: str, release_file: str) -> int:
    """Hold an entry in use until RELEASE_FILE exists, then read it."""
    cache = ArtifactCache(root)
    with cache.pinned():
        entry = cache.get(key)
        if entry is None:
            print("missing", flush=True)
            return 1
        print("holding", flush=True)
        deadline = time.monotonic() + 60
        while not os.path.exists(release_file) and time.monotonic() < deadline:
            time.sleep(0.005)
        print((entry.path / "artifact.txt").read_text(encoding="utf-8"), flush=True)
    return 0


def main(argv: list[str]) -> int:
    """Build or fetch the entry named on the command line and print its artifact."""
    if argv[0] == "hold":
        return hold(*argv[1:4])
    if argv[0] == "evict":
        print(",".join(ArtifactCache(argv[1]).evict(int(argv[2]))), flush=True)
        return 0
    root, key, counter_file, sleep_seconds = argv[:4]
    cache = ArtifactCache(root)
    if len(argv) > 4:
        print("ready", flush=True)
        while not os.path.exists(argv[4]):
            time.sleep(0.005)

    def build(tmpdir: Path) -> dict[str, int]:
        with open(counter_file, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
            f.flush()
            os.fsync(f.fileno())
        time.sleep(float(sleep_seconds))
        (tmpdir / "artifact.txt").write_text(f"built by {os.getpid()}", encoding="utf-8")
        return {"pid": os.getpid()}

    entry, built = cache.get_or_build(key, build, kind="test", description={"worker": True})
    content = (entry.path / "artifact.txt").read_text(encoding="utf-8")
    print(f"{content}|{built}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
