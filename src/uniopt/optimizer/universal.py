"""``UniversalOptimizer``: wrap an engine or module; its own methods then run the chosen stages."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

from ..errors import UniOptError
from ..plugins import BuildContext, plugin_manager
from ..settings import Settings, resolve_settings
from ..threads import thread_budget
from ..tiers import HostProfile, TierChoice, host_profile
from .adapters import check_paths, check_wrappable, engine_components
from .capture import Captured, capture_components
from .component import Component
from .install import Installation, installation_of, twin
from .report import CandidateResult, ComponentReport, OptimizationReport

__all__ = ["UniversalOptimizer"]

log = logging.getLogger("uniopt")


class UniversalOptimizer:
    """Wrap ``engine`` (an engine that declares components, or an ``nn.Module``) and optimize it in place.

    ``mode="off"`` runs the engine as it is; ``"tier"`` applies the tier's default chain per
    component, validated; ``"auto"`` measures the candidates per component and keeps the fastest
    that passes the accuracy guard. Keyword settings override the environment and ``.env``
    (see :class:`uniopt.settings.Settings`).

    Components are the engine's own (``uniopt_components()``), the module itself (an ``nn.Module``
    with ``example_inputs``), or found by ``sample=``: a function of the engine, or a list of them,
    that calls the engine as its users do (``lambda e: e.embed_utterance(wav)``); the outermost
    modules those calls reach become the components (see :mod:`uniopt.optimizer.capture`), and
    ``overrides`` sets fields of a found component by its path (``{"model": {"kind": "encoder"}}``).

    Each chosen stage is installed in the engine you pass, as the ``forward`` of the component's own
    module (the module object, its attributes, methods and buffers stay; accelerate's hooks work
    this way), so every method of the engine runs it: ``fast.engine is engine``. The component
    modules are put in eval mode. :meth:`restore` puts the original forwards back. The wrapper reads
    and writes the engine's attributes (``fast.threshold = 0.9`` sets the engine's).
    """

    def __init__(
        self,
        engine: Any,
        example_inputs: Any = None,
        mode: str | None = None,
        *,
        sample: Any = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        profile: HostProfile | None = None,
        **settings: Any,
    ) -> None:
        if mode is not None:
            settings["mode"] = mode
        self._profile = profile or host_profile()
        self._settings, self._tier = resolve_settings(settings, self._profile)
        self._engine = engine
        self._timings: list[dict[str, Any]] = []
        self._installations: dict[str, Installation] = {}
        self._context: BuildContext | None = None
        self._plugins: Any = None
        found_by: dict[str, str] = {}
        if sample is not None and example_inputs is not None:
            raise UniOptError("pass sample= or example_inputs, not both")
        if overrides and sample is None:
            raise UniOptError("overrides= applies to components found by sample=; pass sample= too")
        components: list[Component] = []
        kept: list[ComponentReport] = []
        if self._settings.mode == "off":
            if sample is None:
                check_wrappable(engine)
        elif sample is not None:
            captured = capture_components(engine, sample, overrides)
            components = [c.component for c in captured if not c.eager_reason]
            found_by = {c.component.name: _described(c) for c in captured}
            check_paths(engine, [c.component for c in captured])
            kept = [_kept_eager(c, found_by) for c in captured if c.eager_reason]
        else:
            components = engine_components(engine, example_inputs)
        started = time.perf_counter()
        detached = [self._detached(c) for c in components]
        reports = self._optimize_all(detached)
        for report in reports:
            report.found_by = found_by.get(report.component, "")
        reports.extend(kept)
        self._report = OptimizationReport(
            fingerprint=self._profile.fingerprint,
            tier=self._tier.tier.name,
            tier_reason=self._tier.reason,
            mode=self._settings.mode,
            components=reports,
            setup_seconds=time.perf_counter() - started,
        )
        for component, work, report in zip(components, detached, reports[: len(components)], strict=True):
            self._install(component.module, work, report)

    # -- building -------------------------------------------------------------------------------
    def _detached(self, component: Component) -> Component:
        """``component`` over a twin of its module: the stage never calls the installed forward."""
        module = component.module
        previous = installation_of(module)
        if previous is not None:  # wrapped before: this wrapper takes over from the original forward
            previous.remove()
        module.eval()
        return dataclasses.replace(component, module=twin(module))

    def _optimize_all(self, components: list[Component]) -> list[ComponentReport]:
        """Each component's report, its search within its part of the engine's one search budget."""
        from .selection import budget_part, optimize_component

        reports: list[ComponentReport] = []
        spent = 0.0
        for index, component in enumerate(components):
            if self._context is None:
                threads = thread_budget(self._profile.usable_cpus, self._settings.threads)
                threads.apply_torch()
                cache = _cache(self._settings)
                self._context = BuildContext(self._settings, self._profile, self._tier.tier, threads, cache=cache)
                self._plugins = plugin_manager(self._settings.plugins)
            part = budget_part(self._settings.search_budget_s, spent, len(components) - index)
            reports.append(optimize_component(component, self._context, self._plugins, part))
            spent += reports[-1].search_seconds
        return reports

    def _install(self, module: Any, component: Component, report: ComponentReport) -> None:
        """Route ``module``'s forward through the chosen stage (eager: only to time it, when logging)."""
        logging_on = self._settings.enable_performance_logging
        if report.chosen == "eager" and not logging_on:
            return
        self._installations[component.name] = Installation(
            component.name,
            module,
            report.stage,
            source=component.module,
            input_count=len(component.example_inputs),
            timer=self._record if logging_on else None,
            fallback=self._settings.fallback_on_optimization_error,
        )

    def _record(self, name: str, seconds: float) -> None:
        """With ENABLE_PERFORMANCE_LOGGING, every call of a component is timed and logged."""
        self._timings.append({"component": name, "seconds": seconds})
        log.info("%s: %.2f ms", name, seconds * 1e3)

    # -- the wrapped engine -----------------------------------------------------------------------
    @property
    def settings(self) -> Settings:
        """The resolved settings this optimizer runs with."""
        return self._settings

    @property
    def tier(self) -> TierChoice:
        """The hardware tier and why it was chosen."""
        return self._tier

    @property
    def engine(self) -> Any:
        """The engine, with the chosen stages installed in its component modules."""
        return self._engine

    def report(self) -> OptimizationReport:
        """What was chosen per component, every candidate's figures, and cold-start costs."""
        return self._report

    def restore(self) -> None:
        """Put every component module's original forward back; the engine then runs as it shipped."""
        for installation in self._installations.values():
            installation.remove()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._engine(*args, **kwargs)

    def get_performance_info(self) -> dict[str, Any]:
        """Per-component stage use, call timings (ENABLE_PERFORMANCE_LOGGING), the engine's own figures, the report."""
        info: dict[str, Any] = {
            "components": {name: i.stats() for name, i in self._installations.items()},
            "calls": list(self._timings),
            "report": self._report.to_dict(),
        }
        engine_info = getattr(self._engine, "get_performance_info", None)
        if callable(engine_info):
            info["engine"] = engine_info()
        return info

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._engine, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        elif hasattr(type(self), name):
            raise AttributeError(f"{name!r} is UniversalOptimizer's own; set the engine's through .engine.{name}")
        else:
            setattr(self._engine, name, value)

    def __delattr__(self, name: str) -> None:
        if name.startswith("_") or hasattr(type(self), name):
            object.__delattr__(self, name)
        else:
            delattr(self._engine, name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(dir(self._engine)))

    def __repr__(self) -> str:
        name, mode, tier = type(self._engine).__name__, self._settings.mode, self._tier.tier.name
        return f"UniversalOptimizer({name}, mode={mode!r}, tier={tier!r})"


def _kept_eager(captured: Captured, found_by: dict[str, str]) -> ComponentReport:
    """The report of a found component that is not optimized, with the reason."""
    name = captured.component.name
    result = CandidateResult("eager", accepted=True, reason=captured.eager_reason)
    return ComponentReport(name, "eager", [result], found_by=found_by[name])


def _described(captured: Captured) -> str:
    calls = f"{captured.calls} call{'s' if captured.calls != 1 else ''}"
    return f"{captured.method}() ({calls} in the samples)" if captured.method else f"the sample calls ({calls})"


def _cache(settings: Settings) -> Any:
    from ..cache import ArtifactCache, default_cache_dir

    root = settings.cache_dir or default_cache_dir()
    return ArtifactCache(root, max_bytes=settings.cache_size_limit, bundle=settings.cache_bundle)
