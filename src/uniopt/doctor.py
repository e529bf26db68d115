"""The doctor report: host profile, memory bandwidth, tier, thread budget, candidates, engines' memory, advice."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .advice import host_advice
from .engine_memory import EngineMemory, engine_memory, memory_advice
from .errors import MemoryBudgetError
from .plugins import availability, candidates, plugin_manager
from .plugins.manager import plugin_origins
from .settings import Settings, resolve_settings
from .threads import ThreadBudget, thread_budget
from .tiers import BandwidthProbe, HostProfile, TierChoice, host_profile, memory_bandwidth

__all__ = ["DoctorReport", "doctor_report"]


@dataclass(frozen=True)
class DoctorReport:
    """Everything ``optimize doctor`` shows."""

    profile: HostProfile
    choice: TierChoice
    settings: Settings
    threads: ThreadBudget
    plugins: list[tuple[str, str]]
    candidates: list[dict[str, Any]]
    advice: list[str]
    bandwidth: BandwidthProbe | None = None
    bandwidth_problem: str | None = None
    #: Per built-in engine: eager footprint, the memory optimizing it needs, and whether it fits here.
    engines: list[EngineMemory] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from .memory import memory_headroom

        data = self.profile.to_dict()
        room = memory_headroom()
        data["memory"]["headroom"] = {"available_bytes": room.available_bytes, "used_bytes": room.used_bytes}
        data["memory"]["read_bandwidth"] = self.bandwidth.to_dict() if self.bandwidth else None
        data["memory"]["read_bandwidth_problem"] = self.bandwidth_problem
        data["tier"] = {
            "name": self.choice.tier.name,
            "reason": self.choice.reason,
            "description": self.choice.tier.description,
            "denied": list(self.choice.tier.denied),
        }
        data["threads"] = {"intra_op": self.threads.intra_op, "inter_op": self.threads.inter_op}
        data["settings"] = {
            name: {"value": _jsonable(getattr(self.settings, name)), "source": source}
            for name, source in self.settings.sources.items()
        }
        data["plugins"] = [{"name": n, "origin": o} for n, o in self.plugins]
        data["candidates"] = self.candidates
        data["engines"] = [e.to_dict() for e in self.engines]
        data["advice"] = self.advice
        return data


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def doctor_report(
    overrides: dict[str, Any] | None = None, available_bytes: int | None = None, measure_bandwidth: bool = False
) -> DoctorReport:
    """Build the doctor report for this process.

    ``measure_bandwidth`` measures the memory read bandwidth again and replaces the cached value
    (on a shared host it moves by 2x from one hour to the next).

    ``available_bytes`` is the memory an optimizing process may use in all, which the engines'
    rows are judged against; by default the memory left now plus this process's own RSS (it
    ends before an optimizing process starts).
    """
    from .engines.registry import BUILTIN_ENGINES
    from .memory import memory_headroom, rss_bytes

    profile = host_profile()
    settings, choice = resolve_settings(overrides, profile)
    threads = thread_budget(profile.usable_cpus, settings.threads)
    pm = plugin_manager(settings.plugins)
    origins = plugin_origins()
    plugins = [(name, origins.get(name, "registered at run time")) for name, _ in pm.list_name_plugin()]
    rows = []
    usable = {}
    for cand in candidates(pm).values():
        ok, reason = availability(cand, profile, settings, choice.tier)
        if ok:
            usable[cand.name] = cand
        rows.append(
            {
                "name": cand.name,
                "plugin": cand.plugin,
                "precision": cand.requires.precision,
                "available": ok,
                "reason": reason,
                "description": cand.description,
            }
        )
    advice = host_advice(profile, choice.tier, settings, threads)
    pm.hook.uniopt_doctor_advice(profile=profile, tier=choice.tier, settings=settings, add=advice.append)
    bandwidth, problem = None, None
    try:
        bandwidth = memory_bandwidth(
            threads.intra_op, cache_dir=settings.cache_dir, refresh=measure_bandwidth, profile=profile
        )
    except MemoryBudgetError as exc:
        problem = str(exc)
    if available_bytes is None:
        available_bytes = memory_headroom().available_bytes + rss_bytes()
    engines = [
        engine_memory(
            name, available_bytes, choice.tier, usable, cache_dir=settings.cache_dir, park_setting=settings.park_weights
        )
        for name in BUILTIN_ENGINES
    ]
    if (line := memory_advice(engines)) is not None:
        advice.append(line)
    return DoctorReport(profile, choice, settings, threads, plugins, rows, advice, bandwidth, problem, engines)
