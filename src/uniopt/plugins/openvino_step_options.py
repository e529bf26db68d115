"""Compile options of a decode step's model, chosen by timing them on this host and kept in the cache.

On hosts with int8 dot products, OpenVINO's CPU plugin quantizes the activations of matmuls
with compressed weights on the fly (``DYNAMIC_QUANTIZATION_GROUP_SIZE``). Whether that pays
depends on the graph: on the 2-vCPU Zen 4 host it made the TTS decoder's slow step (178 MB of
int8 weights, streamed from memory every step) about 2 ms slower and its frame graph (a small
decoder run ten times a call, its weights in cache) about 2 ms faster. So a model with compressed
weights is compiled with each of :data:`OPTION_SETS`, each in a trial process of its own, each is
timed there on the graph's own calls (a step graph: a prompt's prefill, then single steps, scored
as one prefill and many steps; interleaved rounds, the median), and the faster is compiled here.
Each trial process writes its compiled blob to a folder of its own beside the model's blob cache;
the winner's blob is moved into that cache, so the compile here loads it instead of compiling
again (the TTS frame graph: 0.6 s instead of 3 s), and the loser's is deleted with its folder.
What each set's trial process holds is reported beside its time: with dynamic quantization off,
the slow step holds 146 MiB more after a prefill. The choice is a cache entry keyed by the model
file, the host and the compile config: a warm start compiles the chosen set only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import statistics
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MemoryBudgetError
from ..memory import note_child_peak
from ..optimizer.steps import FrameGraph, StepGraph
from ..tiers import host_profile
from .candidate import BuildContext
from .fallback import first_line
from .memory_costs import file_bytes, memory_step

__all__ = ["OPTION_SETS", "OptionChoice", "compile_fastest", "exercise_calls"]

log = logging.getLogger("uniopt")

#: What is raced for a model with compressed weights: the plugin's defaults, and no dynamic quantization.
OPTION_SETS: Mapping[str, Mapping[str, str]] = {
    "default": {},
    "no-dynamic-quantization": {"DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"},
}
#: Interleaved rounds of the race; the median of each option set's rounds counts (for a step graph
#: a round's score is its prefill plus :data:`STEPS_PER_PREFILL` steps, from the steps it timed).
ROUNDS = 5
#: Another option set replaces the defaults only when at least this much faster (noise stays default).
MIN_GAIN = 0.03
#: Single steps timed after the prefill of a step graph (fewer when its caches end sooner).
STEPS = 16
#: Decode steps a step graph's sequence takes per prefill, in the race's score (prefill seconds plus
#: this many steps' seconds): a decode loop runs many steps per prompt (the TTS engine 64 frames a call).
STEPS_PER_PREFILL = 64
#: Positions of the prefill a race starts a step graph's sequence with, where its inputs take any
#: length: a prompt's worth. A prefill of this size is what shows what an option set holds for
#: many rows at once (with dynamic quantization off, 139 MiB more for the TTS decoder's slow step
#: after a 24-position prefill, none after 3).
PREFILL = 32
#: The cache entry's kind, and the version of its layout (a new version is a new key).
CACHE_KIND = "openvino-step-options"
CACHE_SCHEMA = 1


@dataclass(frozen=True)
class OptionChoice:
    """The option set a model was compiled with: its ``name`` in :data:`OPTION_SETS`, each raced
    set's median score in seconds (a step graph: one prefill and :data:`STEPS_PER_PREFILL` steps; a
    frame graph: three calls; none when nothing was raced), and whether the cache held the choice."""

    name: str
    seconds: Mapping[str, float]
    from_cache: bool
    note: str = ""
    #: Each raced set's trial process's resident memory after its timed calls (the compiled model
    #: and OpenVINO's runtime): what the sets cost, for the report.
    resident_bytes: Mapping[str, int] = field(default_factory=dict)
    #: Whether the compile here loaded a compiled blob (the race's winner's, or a warm start's).
    loaded_blob: bool = False

    def to_info(self) -> dict[str, Any]:
        """As plain data for a stage's info."""
        info: dict[str, Any] = {"options": self.name, "from_cache": self.from_cache, "loaded_blob": self.loaded_blob}
        if self.seconds:
            info["race_ms"] = {name: round(s * 1e3, 3) for name, s in self.seconds.items()}
        if self.resident_bytes:
            info["trial_resident_mib"] = {name: round(b / 2**20) for name, b in self.resident_bytes.items()}
        if self.note:
            info["note"] = self.note
        return info


def exercise_calls(graph: StepGraph | FrameGraph) -> list[tuple[bool, list[np.ndarray]]]:
    """The calls that run ``graph``'s model as a decode loop does, as ``(reset states first, arrays)``.

    A step graph starts a sequence, its states reset: a prefill of :data:`PREFILL` positions where
    its inputs have a free length axis (the example inputs repeated along it), else its example's
    length. Then it takes single steps. A frame graph runs its example inputs three times.
    """
    if isinstance(graph, FrameGraph):
        arrays = [t.numpy() for t in graph.example_inputs]
        return [(False, arrays)] * 3
    position = graph.input_names.index(graph.position_input)
    axes = [_free_axis(shape) for shape in graph.input_shapes]
    lengthened = any(axis is not None for index, axis in enumerate(axes) if index != position)
    length = graph.example_inputs[position].shape[0]
    if lengthened:
        length = max(1, min(PREFILL, graph.max_positions - 1 - STEPS))
    prefill = [
        t if axis is None or index == position else _repeated(t, axis, length)
        for index, (t, axis) in enumerate(zip(graph.example_inputs, axes, strict=True))
    ]
    prefill[position] = torch.arange(length)
    beam = np.zeros(1, dtype=np.int32)  # the step models' last input (beam_idx): row 0 of the caches
    calls = [(True, [*(t.contiguous().numpy() for t in prefill), beam])]
    step = [t if axis is None else t.narrow(axis, t.shape[axis] - 1, 1) for t, axis in zip(prefill, axes, strict=True)]
    for index in range(max(1, min(STEPS, graph.max_positions - length))):
        step[position] = torch.tensor([length + index])
        calls.append((False, [*(t.contiguous().numpy() for t in step), beam]))
    return calls


def _free_axis(shape: tuple[int, ...]) -> int | None:
    """The axis ``shape`` leaves free (-1): the positions' axis of a step input, if it has one."""
    return next((axis for axis, size in enumerate(shape) if size == -1), None)


def _repeated(tensor: torch.Tensor, axis: int, length: int) -> torch.Tensor:
    """``tensor`` repeated along ``axis`` and cut to ``length`` there."""
    times = -(-length // tensor.shape[axis])
    return torch.cat([tensor] * times, dim=axis).narrow(axis, 0, length)


def compile_fastest(
    core: Any,
    path: Path,
    config: Mapping[str, str],
    graph: StepGraph | FrameGraph,
    component: Any,
    context: BuildContext,
    step: str,
) -> tuple[Any, OptionChoice]:
    """``path`` compiled here with ``config`` plus the fastest of :data:`OPTION_SETS` on this host.

    ``step`` names the memory-checked compile step. The choice comes from the cache when it holds
    one for this model, host and config. Otherwise each set is compiled and timed in a trial
    process of its own (:class:`~uniopt.plugins.openvino_trial.TrialProcess`: a model freed in
    this process would break OpenVINO in the children later forked from it, and the loser leaves
    nothing here), and the defaults are kept when the race cannot run (trial processes off or
    unavailable, a set that does not fit the memory left or fails to compile, a build for another
    host's bundle).
    """
    # The blob cache folder is not part of the key (OpenVINO leaves it out of a blob's hash too).
    uncached = {k: v for k, v in config.items() if k != "CACHE_DIR"}
    blobs = Path(config["CACHE_DIR"]) if "CACHE_DIR" in config else None
    ir_bytes = file_bytes(path, path.with_suffix(".bin"))
    key = _key(path, uncached, context)
    name = _cached_choice(context, key)
    if name is not None:
        choice = OptionChoice(name, {}, True)
    else:
        trial_step = step.replace("-compile-", "-trial-")
        choice = _race(path, uncached, blobs, ir_bytes, graph, component, context, trial_step)
        if choice.seconds:
            _store(context, key, choice.name, choice.seconds, graph.name)
    with memory_step(step, component, context, ir_bytes):
        compiled = core.compile_model(str(path), "CPU", {**config, **OPTION_SETS[choice.name]})
    loaded = blobs is not None and bool(compiled.get_property("LOADED_FROM_CACHE"))
    return compiled, dataclasses.replace(choice, loaded_blob=loaded)


def _race(
    path: Path,
    uncached: Mapping[str, str],
    blobs: Path | None,
    ir_bytes: int,
    graph: StepGraph | FrameGraph,
    component: Any,
    context: BuildContext,
    trial_step: str,
) -> OptionChoice:
    """Each option set compiled in a trial process and timed on the graph's calls, in interleaved rounds.

    ``uncached`` is the compile config without the blob cache ``blobs``, where the winner's
    compiled blob is moved; ``trial_step`` names the memory-checked step of each trial process. A
    step graph's prefill and single steps are timed apart and scored as one prefill and
    :data:`STEPS_PER_PREFILL` steps: a decode loop's prompt is prefilled once for many steps.
    """
    from .openvino_trial import TrialProcess, TrialUnavailable

    if not context.settings.trial_processes:
        return OptionChoice("default", {}, False, "not raced: UNIOPT_TRIAL_PROCESSES is off")
    if context.profile.fingerprint != host_profile().fingerprint:  # optimize prepare: built for another host
        return OptionChoice("default", {}, False, "not raced: built for another host, which races them itself")
    trials: dict[str, TrialProcess] = {}
    with _blob_folders(blobs, list(OPTION_SETS)) as folders:
        try:
            configs = {name: _trial_config(uncached, options, folders[name]) for name, options in OPTION_SETS.items()}
            trials = _start_trials(path, configs, ir_bytes, graph, component, context, trial_step)
            seconds = _timed_rounds(trials, graph)
            resident = {name: trial.rss_bytes() for name, trial in trials.items()}
        except (MemoryBudgetError, TrialUnavailable, RuntimeError) as exc:
            return OptionChoice("default", {}, False, f"not raced: {first_line(exc)}")
        finally:
            for trial in trials.values():
                trial.close()
        fastest = min(seconds, key=seconds.__getitem__)
        chosen = fastest if seconds[fastest] < seconds["default"] * (1 - MIN_GAIN) else "default"
        if blobs is not None:
            _keep_blobs(folders[chosen], blobs)
    log.debug("%s of %s: %s (%s)", graph.name, component.name, chosen, seconds)
    return OptionChoice(chosen, seconds, False, resident_bytes=resident)


def _trial_config(uncached: Mapping[str, str], options: Mapping[str, str], folder: Path | None) -> dict[str, str]:
    """An option set's compile config, writing its compiled blob to ``folder`` (none: no blob)."""
    return {**uncached, **options, **({"CACHE_DIR": str(folder)} if folder is not None else {})}


def _start_trials(
    path: Path,
    configs: Mapping[str, dict[str, str]],
    ir_bytes: int,
    graph: StepGraph | FrameGraph,
    component: Any,
    context: BuildContext,
    trial_step: str,
) -> dict[str, Any]:
    """A trial process per config, compiled: all at once where the memory left holds every compile, else in turn.

    On an error the processes started so far end with it.
    """
    from .openvino_trial import TrialProcess

    trials: dict[str, TrialProcess] = {}
    try:
        try:  # the compiles share the CPUs
            with memory_step(trial_step, component, context, ir_bytes, copies=len(configs)):
                for name, config in configs.items():
                    trials[name] = TrialProcess(path, "CPU", config, f"{graph.name} with {name} options", wait=False)
                for trial in trials.values():
                    trial.wait_compiled()
                note_child_peak(sum(trial.peak_bytes() for trial in trials.values()))
        except MemoryBudgetError:
            if trials:  # refused by the estimate, not at the start: the compiles ran out of memory
                raise
            for name, config in configs.items():  # one after the other
                with memory_step(trial_step, component, context, ir_bytes):
                    trials[name] = TrialProcess(path, "CPU", config, f"{graph.name} with {name} options")
    except BaseException:
        for trial in trials.values():
            trial.close()
        raise
    return trials


def _timed_rounds(trials: Mapping[str, Any], graph: StepGraph | FrameGraph) -> dict[str, float]:
    """Each trial's median score over :data:`ROUNDS` interleaved rounds of ``graph``'s calls, after a warm-up."""
    calls = exercise_calls(graph)
    first, rest = (calls[:1], calls[1:]) if isinstance(graph, StepGraph) else ([], calls)
    weight = STEPS_PER_PREFILL / len(rest) if first else 1.0
    samples: dict[str, list[float]] = {name: [] for name in trials}
    for trial in trials.values():  # warm-up
        trial.run_calls(calls)
    for _ in range(ROUNDS):
        for name, trial in trials.items():
            prefill = trial.run_calls(first) if first else 0.0
            samples[name].append(prefill + weight * trial.run_calls(rest))
    return {name: statistics.median(times) for name, times in samples.items()}


@contextmanager
def _blob_folders(blobs: Path | None, names: list[str]) -> Iterator[dict[str, Path | None]]:
    """A new folder per option set in ``blobs``, removed after; None for each where none can be made."""
    folders: dict[str, Path | None] = dict.fromkeys(names)
    try:
        if blobs is not None:
            with suppress(OSError):
                for name in names:
                    folders[name] = Path(tempfile.mkdtemp(prefix=f".race-{name}-", dir=blobs))
        yield folders
    finally:
        for folder in folders.values():
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)


def _keep_blobs(folder: Path | None, blobs: Path) -> None:
    """Move the compiled blobs in ``folder`` into the blob cache ``blobs`` (one already there is kept)."""
    if folder is None:
        return
    for blob in folder.glob("*.blob"):
        target = blobs / blob.name
        if not target.exists():
            try:
                os.replace(blob, target)
            except OSError as exc:  # the compile here then compiles instead of loading
                log.debug("compiled blob %s not kept (%s)", blob.name, exc)


def _key(path: Path, uncached: Mapping[str, str], context: BuildContext) -> str:
    """The cache key of the choice for the model at ``path`` compiled with ``uncached`` on this host."""
    from ..cache import cache_key

    return cache_key(
        {
            "kind": CACHE_KIND,
            "schema": CACHE_SCHEMA,
            "model": path.parent.name,  # the model's own cache key
            "host": context.profile.fingerprint,
            "config": dict(uncached),
            "sets": {name: dict(options) for name, options in OPTION_SETS.items()},
        }
    )


def _cached_choice(context: BuildContext, key: str) -> str | None:
    """The option set the cache recorded for ``key``, or None (no cache, no entry, or not a set raced now)."""
    if context.cache is None:
        return None
    try:
        entry = context.cache.get(key)
    except OSError as exc:
        log.warning("compile options not read from the cache (%s)", exc)
        return None
    name = None if entry is None else entry.extra.get("options")
    if entry is not None and name not in OPTION_SETS:
        log.warning("cached compile options %s are not an option set; racing again", entry.path)
        try:
            context.cache.remove(key)
        except OSError as exc:
            log.warning("compile options record not removed (%s)", exc)
        return None
    return name


def _store(context: BuildContext, key: str, name: str, seconds: Mapping[str, float], graph: str) -> None:
    """Keep the choice; a cache that cannot be written means racing again next time, never an error."""
    if context.cache is None:
        return
    record = {"options": name, "median_seconds": dict(seconds), "graph": graph}
    try:
        context.cache.get_or_build(key, lambda _directory: record, kind=CACHE_KIND, description={"graph": graph})
    except OSError as exc:
        log.warning("compile options not cached (%s)", exc)
