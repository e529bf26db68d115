"""Cache entries of several graphs built at once, each in a child of its own, where memory allows.

A decode-step candidate makes one model per graph (the slow step, the frame graph), each build
mostly one thread (a tracer, an exporter): on a 2-vCPU host two of them side by side take about the
time of the longer. :func:`build_side_by_side` starts every build whose entry is not in the cache
yet, where builds are isolated and the memory left holds all their estimates at once, and waits for
them; each entry's build then moves its child's files in (:meth:`ChildBuild.into`). Otherwise it
starts nothing, and each entry is built in a child when it is asked for (:func:`entry_writer`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..isolation import IsolatedStep, can_isolate, isolated_build, measured_build
from .candidate import BuildContext
from .memory_costs import required_bytes

__all__ = ["ChildBuild", "EntryBuild", "build_side_by_side", "entry_writer", "side_by_side"]


@dataclass(frozen=True)
class EntryBuild:
    """One cache entry to build: ``write(folder)`` writes its files (in a child) and returns its extra data."""

    name: str
    key: str
    write: Callable[[Path], dict[str, Any]]
    what: str
    estimated_bytes: int


class ChildBuild:
    """An :class:`EntryBuild` run in a child of its own, started at once, into a scratch folder."""

    def __init__(self, build: EntryBuild, context: BuildContext) -> None:
        self.folder = context.cache.scratch_dir(f"build-{build.name}")
        step = measured_build(build.write, self.folder, context)
        try:
            self.started = IsolatedStep(step, build.what, enabled=context.settings.isolate_builds)
        except BaseException:  # no child (fork refused): the folder is nobody's
            self.discard()
            raise
        self.context = context

    def wait(self) -> int:
        """Wait for the child; its peak bytes (its error, if any, is raised by :meth:`into`)."""
        with contextlib.suppress(Exception):
            self.started.result()
        return self.started.peak_bytes

    def discard(self) -> None:
        """Remove the scratch folder (its files moved into the cache entry, or not wanted)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def into(self, directory: Path) -> dict[str, Any]:
        """The cache entry's build: the child's files moved into ``directory``."""
        extra, measured = self.started.result()
        self.context.memory_steps.extend(measured)
        for item in self.folder.iterdir():
            os.replace(item, directory / item.name)
        return extra


def build_side_by_side(builds: list[EntryBuild], context: BuildContext) -> dict[str, ChildBuild]:
    """The builds of the entries not in the cache yet, each in a child of its own, all at once (by name).

    Only where the memory left holds every estimate at once and builds are isolated; otherwise none
    is started (``{}``). Returns once every child has ended (what follows is timed). The caller
    discards each one's folder when done (:meth:`ChildBuild.discard`).
    """
    from ..memory import memory_headroom, note_child_peak

    missing = [b for b in builds if context.cache.get(b.key) is None]
    if len(missing) < 2 or not (context.settings.isolate_builds and can_isolate()):
        return {}
    if required_bytes(sum(b.estimated_bytes for b in missing)) > memory_headroom().available_bytes:
        return {}
    started: dict[str, ChildBuild] = {}
    try:
        for build in missing:
            started[build.name] = ChildBuild(build, context)
    except OSError:  # no scratch folder: each builds in turn
        for child in started.values():
            child.wait()
            child.discard()
        return {}
    note_child_peak(sum(child.wait() for child in started.values()))
    return started


@contextlib.contextmanager
def side_by_side(builds: list[EntryBuild], context: BuildContext) -> Iterator[dict[str, ChildBuild]]:
    """:func:`build_side_by_side`, each child's scratch folder removed when the block ends (its files
    moved into their entry, or left over by a build that failed before them)."""
    started = build_side_by_side(builds, context)
    try:
        yield started
    finally:
        for child in started.values():
            child.discard()


def entry_writer(
    build: EntryBuild, context: BuildContext, started: ChildBuild | None = None
) -> Callable[[Path], dict[str, Any]]:
    """What builds ``build``'s cache entry: the files of its child where it ran side by side
    (``started``), else ``write`` run in a child now."""
    return started.into if started is not None else isolated_build(build.write, context, build.what)
