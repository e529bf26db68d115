"""Run one ``get_or_build`` in its own process, for the cache's multi-process tests.

Usage: python cache_worker.py ROOT KEY COUNTER_FILE SLEEP_SECONDS [START_FILE]

The build appends a line to COUNTER_FILE, sleeps, then writes ``artifact.txt``. The worker prints
the artifact's content and whether it built it. With START_FILE, it prints ``ready`` once imported
and waits for that file to exist, so that several workers can start at the same moment.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from uniopt.cache import ArtifactCache


def main(argv: list[str]) -> int:
    """Build or fetch the entry named on the command line and print its artifact."""
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
