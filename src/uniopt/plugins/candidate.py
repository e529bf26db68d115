"""Candidates: what a plugin offers, what it needs (as data), and whether this host has it."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..optimizer.component import Component
    from ..settings import Settings
    from ..threads import ThreadBudget
    from ..tiers import HostProfile, Tier

__all__ = [
    "TRIAL_PROCESS",
    "BuildContext",
    "BuildFailure",
    "BuildStep",
    "Candidate",
    "Requirements",
    "Stage",
    "availability",
]

#: ``Stage.info`` key of a stage that runs in a trial process of its own (an object with ``close()``):
#: the optimizer builds it again in the engine's process if it wins (see ``BuildContext.trial``).
TRIAL_PROCESS = "trial_process"


@dataclass(frozen=True)
class Requirements:
    """What a candidate needs, readable without importing any backend.

    ``packages`` are import names; ``extra`` is the pip extra that installs them;
    ``cpu_flags_any`` needs at least one of those flags (empty: none needed);
    ``setting`` names a boolean setting that must be true (``use_model_quantization``);
    ``providers`` are ONNX Runtime execution providers that must be installed;
    ``openvino_capability`` is an OpenVINO optimization capability (``FP16``) some device must have.
    """

    packages: tuple[str, ...] = ()
    extra: str | None = None
    cpu_flags_any: tuple[str, ...] = ()
    min_memory_bytes: int = 0
    precision: str = "fp32"
    setting: str | None = None
    providers: tuple[str, ...] = ()
    openvino_capability: str | None = None


@dataclass(frozen=True)
class BuildStep:
    """A memory-checked step a candidate's build runs (see :mod:`uniopt.plugins.memory_costs`).

    ``step`` is a key of ``STEP_COSTS``, ``"onnx-export"`` for the component's exporter, or
    ``"openvino-ir"`` for the conversion an OpenVINO IR is made by (from the module for a
    component the legacy tracer exports, else from its ONNX export); ``base`` is what its estimate
    is taken on: ``"weights"`` (the module, or a model file in float) or ``"int8-file"`` (a model
    file whose Linear and embedding weights are int8).
    """

    step: str
    base: str = "weights"

    def resolved(self, exporter: str) -> tuple[str, ...]:
        """The ``STEP_COSTS`` keys this step runs as on a component with ``exporter``."""
        if self.step == "onnx-export":
            return (f"onnx-export-{exporter}",)
        if self.step == "openvino-ir":
            if exporter == "legacy":
                return ("openvino-convert-module", "openvino-check-module")
            return (f"onnx-export-{exporter}", "openvino-convert")
        return (self.step,)


@dataclass(frozen=True)
class Stage:
    """A runnable replacement for a component: same call signature, same output structure."""

    candidate: str
    run: Callable[..., Any]
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def __call__(self, *args: Any) -> Any:
        return self.run(*args)


@dataclass(frozen=True)
class BuildFailure:
    """A candidate that could not be built here, and why (recorded as a fallback)."""

    candidate: str
    reason: str
    error: BaseException | None = field(default=None, compare=False)


@dataclass
class BuildContext:
    """What a plugin may use while building: settings, host, tier, thread budget, cache."""

    settings: Settings
    profile: HostProfile
    tier: Tier
    threads: ThreadBudget
    cache: Any = None
    events: list[str] = field(default_factory=list)
    #: Every memory-measured build step that ran: ``{"step", "estimated_bytes", "peak_bytes"}``.
    memory_steps: list[dict[str, Any]] = field(default_factory=list)
    #: The stage is built to be judged against others (auto mode's challengers): a plugin may run
    #: it in a process of its own (``Stage.info[TRIAL_PROCESS]``), so that a loser leaves nothing
    #: resident; the winner is built again with ``trial`` false.
    trial: bool = False


@dataclass(frozen=True)
class Candidate:
    """One way to run a component, offered by a plugin."""

    name: str
    plugin: str
    description: str
    build: Callable[[Component, BuildContext], Stage] = field(compare=False, repr=False)
    requires: Requirements = Requirements()
    #: The memory-checked steps ``build`` runs, in order, from an empty cache (what ``optimize doctor``
    #: estimates a candidate's memory from; none: not estimated).
    steps: tuple[BuildStep, ...] = ()


def _package_available(package: str, profile: HostProfile) -> tuple[bool, str]:
    probed = {b.name: b for b in profile.backends}
    if package in probed:
        info = probed[package]
        return info.available, info.reason or "not available"
    if importlib.util.find_spec(package) is None:
        return False, "not installed"
    return True, ""


def availability(candidate: Candidate, profile: HostProfile, settings: Settings, tier: Tier) -> tuple[bool, str]:
    """Whether ``candidate`` can run here, and if not, why (a sentence for the report)."""
    req = candidate.requires
    name = candidate.name
    allowed = settings.allow is None or any(name == a or name.startswith(a + "-") for a in settings.allow)
    if name != "eager" and not allowed:
        return False, f"not in UNIOPT_ALLOW={','.join(settings.allow or ())}"
    denied = [d for d in (*settings.deny, *tier.denied) if name == d or name.startswith(d + "-")]
    if denied and name != "eager":
        source = "UNIOPT_DENY" if denied[0] in settings.deny else f"tier {tier.name}"
        return False, f"ruled out by {source}"
    if req.setting and not getattr(settings, req.setting):
        return False, f"{req.setting.upper()}=false"
    for package in req.packages:
        ok, reason = _package_available(package, profile)
        if not ok:
            hint = f"; pip install 'uniopt[{req.extra}]'" if req.extra else ""
            return False, f"{package}: {reason}{hint}"
    ort_providers = profile.backend("onnxruntime").providers
    missing = [p for p in req.providers if p not in ort_providers]
    if missing:
        return False, f"ONNX Runtime lacks {', '.join(missing)}"
    if req.openvino_capability:
        devices = profile.backend("openvino").devices
        if not any(req.openvino_capability in caps for _, caps in devices):
            return False, f"no OpenVINO device computes {req.openvino_capability}"
    if req.cpu_flags_any and not any(profile.cpu.has(f) for f in req.cpu_flags_any):
        return False, f"CPU lacks {' / '.join(req.cpu_flags_any)}"
    if req.min_memory_bytes and profile.memory.usable_bytes < req.min_memory_bytes:
        return (
            False,
            f"needs {req.min_memory_bytes / 2**30:.1f} GiB, {profile.memory.usable_bytes / 2**30:.1f} GiB usable",
        )
    return True, ""
