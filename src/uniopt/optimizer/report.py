"""The optimization report: typed, with ``to_dict()`` for plain JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CandidateResult", "ComponentReport", "OptimizationReport"]


@dataclass
class CandidateResult:
    """One candidate's fate for one component."""

    name: str
    accepted: bool
    reason: str = ""
    metric: str | None = None
    metric_value: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    real_time_factor: float | None = None
    speedup: float | None = None
    #: Peak RSS increase while building and validating; resident memory the built stage adds.
    peak_memory_bytes: int | None = None
    resident_memory_bytes: int | None = None
    #: The largest estimate of the memory-checked build steps that ran (see plugins.memory_costs).
    estimated_peak_bytes: int | None = None
    #: The memory-checked build steps that ran, each ``{"step", "estimated_bytes", "peak_bytes"}``.
    memory_steps: list[dict[str, Any]] = field(default_factory=list)
    build_seconds: float | None = None
    warmup_seconds: float | None = None
    from_cache: bool = False


@dataclass
class ComponentReport:
    """What happened to one component: the chosen stage and every candidate tried."""

    component: str
    chosen: str
    candidates: list[CandidateResult] = field(default_factory=list)
    decision_from_cache: bool = False
    stage: Any = field(default=None, repr=False, compare=False)
    #: Whether the auto-mode search that made the decision ran over its search budget.
    search_cut_short: bool = False
    #: Seconds this process spent searching (0 when it applied a stored decision).
    search_seconds: float = 0.0
    #: For a component found by ``sample=``: the engine method whose call reached it.
    found_by: str = ""
    #: Bytes of the eager module's weights parked in a file (:mod:`uniopt.parked`), and why or why not.
    parked_bytes: int = 0
    parked: str = ""

    def candidate(self, name: str) -> CandidateResult:
        """The result for candidate ``name``."""
        for result in self.candidates:
            if result.name == name:
                return result
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "chosen": self.chosen,
            "decision_from_cache": self.decision_from_cache,
            "search_cut_short": self.search_cut_short,
            "search_seconds": self.search_seconds,
            "found_by": self.found_by,
            "parked_bytes": self.parked_bytes,
            "parked": self.parked,
            "candidates": [asdict(c) for c in self.candidates],
        }


@dataclass
class OptimizationReport:
    """The host, the tier, and one :class:`ComponentReport` per component."""

    fingerprint: str
    tier: str
    tier_reason: str
    mode: str
    components: list[ComponentReport]
    setup_seconds: float = 0.0

    def component(self, name: str) -> ComponentReport:
        """The report for component ``name``."""
        for report in self.components:
            if report.component == name:
                return report
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "tier": self.tier,
            "tier_reason": self.tier_reason,
            "mode": self.mode,
            "setup_seconds": self.setup_seconds,
            "components": [c.to_dict() for c in self.components],
        }
