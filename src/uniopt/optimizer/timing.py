"""Interleaved timing: candidates take turns (A B C A B C ...), so a neighbour's load hits all alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Timing", "measure_interleaved", "measure_rounds"]


@dataclass
class Timing:
    """Wall-clock samples of one candidate, in seconds."""

    samples: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        return statistics.median(self.samples)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ranking(timings: Mapping[str, Timing]) -> list[str]:
    return sorted(timings, key=lambda name: timings[name].p50)


def _same_order(previous: list[str] | None, ranking: list[str], timings: Mapping[str, Timing], tie: float) -> bool:
    """Whether ``ranking`` keeps ``previous``'s order, but for calls whose medians are within ``tie`` of each other."""
    if previous is None or set(previous) != set(ranking):
        return False
    before = {name: index for index, name in enumerate(previous)}
    return all(
        before[ahead] < before[behind] or timings[behind].p50 <= timings[ahead].p50 * tie
        for index, ahead in enumerate(ranking)
        for behind in ranking[index + 1 :]
    )


def _decisive(timings: Mapping[str, Timing], ranking: list[str], factor: float) -> bool:
    return len(ranking) > 1 and all(
        max(timings[faster].samples) * factor <= min(timings[slower].samples)
        for faster, slower in zip(ranking, ranking[1:], strict=False)
    )


def measure_interleaved(
    calls: Mapping[str, Callable[[], Any]],
    *,
    budget_s: float,
    min_rounds: int = 3,
    max_rounds: int = 15,
    stable_rounds: int = 2,
    keep: tuple[str, ...] = ("eager",),
    prune_factor: float | None = 2.0,
    decisive_factor: float | None = 2.0,
    first_round_factor: float | None = 3.0,
    tie: float = 1.03,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Time every call once per round, rotating the order, until the ranking holds or time runs out.

    Stops after ``min_rounds`` once the ranking by median has not changed for ``stable_rounds``
    rounds (calls whose medians are within ``tie`` of each other may swap: more rounds would
    only choose between equals, and a candidate within 3% of eager is not chosen), after
    ``max_rounds``, or when ``budget_s`` is spent (at least one round always runs);
    after two rounds already when the ranking is decisive: each call's slowest sample at least
    ``decisive_factor`` times faster than the next one's fastest (no more rounds can change it);
    after the first round when each call is ``first_round_factor`` times faster than the next (a
    decoder's eager call of seconds against a candidate's fraction of it: a second round of the
    slow call would cost as much as the first and cannot turn such a gap around).
    From the second round on, a call whose median is ``prune_factor`` times the best one's leaves
    the rotation (its samples are kept), except the ``keep`` calls every ratio is taken against.
    """
    names = list(calls)
    timings = {name: Timing() for name in names}
    started = clock()
    previous: list[str] | None = None
    unchanged = 0
    for round_index in range(max_rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = clock()
            calls[name]()
            timings[name].samples.append(clock() - t0)
        active = {name: timings[name] for name in names}
        ranking = _ranking(active)
        unchanged = unchanged + 1 if _same_order(previous, ranking, active, tie) else 0
        previous = ranking
        if round_index + 1 >= min_rounds and unchanged >= stable_rounds:
            break
        factor = first_round_factor if round_index == 0 else decisive_factor
        if factor is not None and _decisive(active, ranking, factor):
            break
        if clock() - started >= budget_s:
            break
        if prune_factor is not None and round_index >= 1:
            best = timings[ranking[0]].p50
            names = [n for n in names if n in keep or timings[n].p50 <= prune_factor * best]
            previous = [n for n in previous if n in names]
    return timings


def measure_rounds(calls: Mapping[str, Callable[[], Any]], rounds: int) -> dict[str, Timing]:
    """Exactly ``rounds`` interleaved rounds of every call, none left out, no early stop (benchmarks)."""
    return measure_interleaved(
        calls,
        budget_s=float("inf"),
        min_rounds=rounds,
        max_rounds=rounds,
        prune_factor=None,
        decisive_factor=None,
        first_round_factor=None,
    )
