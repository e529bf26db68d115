"""Compile options of a decode step's model, chosen by timing them on this host and kept in the cache.

On hosts with int8 dot products, OpenVINO's CPU plugin quantizes the activations of matmuls
with compressed weights on the fly (``DYNAMIC_QUANTIZATION_GROUP_SIZE``). Whether that pays
depends on the graph: on the 2-vCPU Zen 4 host it made the TTS decoder's slow step (178 MB of
int8 weights, streamed from memory every step) about 2 ms slower and its frame graph (a small
decoder run ten times a call, its weights in cache) about 2 ms faster. So a model with compressed
weights is compiled with each of :data:`OPTION_SETS`, each in a trial process of its own, each is
timed there on the graph's own calls (interleaved rounds, the median), and the faster is compiled
here. The choice is a cache entry keyed by the model file, the host and the compile config: a warm
start compiles the chosen set only.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MemoryBudgetError
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
#: Interleaved rounds of the race; the median of each option set's rounds counts.
ROUNDS = 5
#: Another option set replaces the defaults only when at least this much faster (noise stays default).
MIN_GAIN = 0.03
#: Single steps timed after the prefill of a step graph (fewer when its caches end sooner).
STEPS = 16
#: The cache entry's kind, and the version of its layout (a new version is a new key).
CACHE_KIND = "openvino-step-options"
CACHE_SCHEMA = 1


@dataclass(frozen=True)
class OptionChoice:
    """The option set a model was compiled with: its ``name`` in :data:`OPTION_SETS`, the median
    seconds of each set raced (none when nothing was raced), and whether the cache held the choice."""

    name: str
    seconds: Mapping[str, float]
    from_cache: bool
    note: str = ""

    def to_info(self) -> dict[str, Any]:
        """As plain data for a stage's info."""
        info: dict[str, Any] = {"options": self.name, "from_cache": self.from_cache}
        if self.seconds:
            info["median_ms"] = {name: round(s * 1e3, 3) for name, s in self.seconds.items()}
        if self.note:
            info["note"] = self.note
        return info


def exercise_calls(graph: StepGraph | FrameGraph) -> list[tuple[bool, list[np.ndarray]]]:
    """The calls that run ``graph``'s model as a decode loop does, as ``(reset states first, arrays)``.

    A step graph starts a sequence (its example inputs at positions 0..L-1, its states reset) and
    then takes single steps; a frame graph runs its example inputs three times.
    """
    if isinstance(graph, FrameGraph):
        arrays = [t.numpy() for t in graph.example_inputs]
        return [(False, arrays)] * 3
    position = graph.input_names.index(graph.position_input)
    prefill = list(graph.example_inputs)
    length = prefill[position].shape[0]
    prefill[position] = torch.arange(length)
    beam = np.zeros(1, dtype=np.int32)  # the step models' last input (beam_idx): row 0 of the caches
    calls = [(True, [*(t.numpy() for t in prefill), beam])]
    step = [_last_position(t, shape) for t, shape in zip(prefill, graph.input_shapes, strict=True)]
    for index in range(max(1, min(STEPS, graph.max_positions - length))):
        step[position] = torch.tensor([length + index])
        calls.append((False, [*(t.contiguous().numpy() for t in step), beam]))
    return calls


def _last_position(tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``tensor`` cut to its last position along the axis ``shape`` leaves free (-1), if any."""
    free = [axis for axis, size in enumerate(shape) if size == -1]
    return tensor.narrow(free[0], tensor.shape[free[0]] - 1, 1) if free else tensor


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
    key = _key(path, config, context)
    name = _cached_choice(context, key)
    choice = OptionChoice(name, {}, True) if name is not None else _race(path, config, graph, component, context, step)
    if name is None and choice.seconds:
        _store(context, key, choice.name, choice.seconds, graph.name)
    with memory_step(step, component, context, file_bytes(path, path.with_suffix(".bin"))):
        return core.compile_model(str(path), "CPU", {**config, **OPTION_SETS[choice.name]}), choice


def _race(
    path: Path,
    config: Mapping[str, str],
    graph: StepGraph | FrameGraph,
    component: Any,
    context: BuildContext,
    step: str,
) -> OptionChoice:
    """Each option set compiled in a trial process and timed on the graph's calls, in interleaved rounds."""
    from .openvino_trial import TrialProcess, TrialUnavailable

    if not context.settings.trial_processes:
        return OptionChoice("default", {}, False, "not raced: UNIOPT_TRIAL_PROCESSES is off")
    if context.profile.fingerprint != host_profile().fingerprint:  # optimize prepare: built for another host
        return OptionChoice("default", {}, False, "not raced: built for another host, which races them itself")
    # No blob cache in a trial: a warm start compiles the chosen set with it here.
    uncached = {k: v for k, v in config.items() if k != "CACHE_DIR"}
    trials: dict[str, TrialProcess] = {}
    ir_bytes = file_bytes(path, path.with_suffix(".bin"))
    try:
        for name, options in OPTION_SETS.items():
            with memory_step(step.replace("-compile-", "-trial-"), component, context, ir_bytes):
                trials[name] = TrialProcess(path, "CPU", {**uncached, **options}, f"{graph.name} with {name} options")
        calls = exercise_calls(graph)
        samples: dict[str, list[float]] = {name: [] for name in trials}
        for trial in trials.values():  # warm-up
            trial.run_calls(calls)
        for _ in range(ROUNDS):
            for name, trial in trials.items():
                samples[name].append(trial.run_calls(calls))
    except (MemoryBudgetError, TrialUnavailable, RuntimeError) as exc:
        return OptionChoice("default", {}, False, f"not raced: {first_line(exc)}")
    finally:
        for trial in trials.values():
            trial.close()
    seconds = {name: statistics.median(times) for name, times in samples.items()}
    fastest = min(seconds, key=seconds.__getitem__)
    chosen = fastest if seconds[fastest] < seconds["default"] * (1 - MIN_GAIN) else "default"
    log.debug("%s of %s: %s (%s)", graph.name, component.name, chosen, seconds)
    return OptionChoice(chosen, seconds, False)


def _key(path: Path, config: Mapping[str, str], context: BuildContext) -> str:
    from ..cache import cache_key

    return cache_key(
        {
            "kind": CACHE_KIND,
            "schema": CACHE_SCHEMA,
            "model": path.parent.name,  # the model's own cache key
            "host": context.profile.fingerprint,
            "config": {k: v for k, v in config.items() if k != "CACHE_DIR"},
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
