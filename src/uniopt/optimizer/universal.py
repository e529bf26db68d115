"""``UniversalOptimizer``: wrap an engine or module, get the same object, faster."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ..plugins import BuildContext, plugin_manager
from ..settings import Settings, resolve_settings
from ..threads import thread_budget
from ..tiers import HostProfile, TierChoice, host_profile
from .adapters import StageModule, check_wrappable, engine_components, with_replaced
from .component import Component
from .report import ComponentReport, OptimizationReport

__all__ = ["UniversalOptimizer"]

log = logging.getLogger("uniopt")


class UniversalOptimizer:
    """Wrap ``engine`` (an engine that declares components, or an ``nn.Module``).

    ``mode="off"`` runs the engine as it is; ``"tier"`` applies the tier's default chain per
    component, validated; ``"auto"`` measures the candidates per component and keeps the fastest
    that passes the accuracy guard. Keyword settings override the environment and ``.env``
    (see :class:`uniopt.settings.Settings`). The wrapper answers every attribute of the engine.
    """

    def __init__(
        self,
        engine: Any,
        example_inputs: Any = None,
        mode: str | None = None,
        *,
        profile: HostProfile | None = None,
        **settings: Any,
    ) -> None:
        if mode is not None:
            settings["mode"] = mode
        self._profile = profile or host_profile()
        self._settings, self._tier = resolve_settings(settings, self._profile)
        self._original = engine
        self._timings: list[dict[str, Any]] = []
        self._context: BuildContext | None = None
        self._plugins: Any = None
        if self._settings.mode == "off":
            check_wrappable(engine)
            self._components: list[Component] = []
        else:
            self._components = engine_components(engine, example_inputs)
        started = time.perf_counter()
        reports = [self._optimize(c) for c in self._components]
        self._report = OptimizationReport(
            fingerprint=self._profile.fingerprint,
            tier=self._tier.tier.name,
            tier_reason=self._tier.reason,
            mode=self._settings.mode,
            components=reports,
            setup_seconds=time.perf_counter() - started,
        )
        self._engine = self._assemble(engine, reports)

    # -- building -------------------------------------------------------------------------------
    def _optimize(self, component: Component) -> ComponentReport:
        from .selection import optimize_component

        if self._context is None:
            threads = thread_budget(self._profile.usable_cpus, self._settings.threads)
            threads.apply_torch()
            cache = _cache(self._settings)
            self._context = BuildContext(self._settings, self._profile, self._tier.tier, threads, cache=cache)
            self._plugins = plugin_manager(self._settings.plugins)
        return optimize_component(component, self._context, self._plugins)

    def _assemble(self, engine: Any, reports: list[ComponentReport]) -> Any:
        logging_on = self._settings.enable_performance_logging
        chosen = {r.component: r for r in reports if r.stage is not None and (logging_on or r.chosen != "eager")}
        if not chosen:
            return engine
        if isinstance(engine, torch.nn.Module) and not callable(getattr(engine, "uniopt_components", None)):
            return self._timed(_installable(chosen["module"].stage, engine), "module")
        modules = {name: self._timed(_installable(r.stage, _resolve(engine, name)), name) for name, r in chosen.items()}
        return with_replaced(engine, modules)

    def _timed(self, module: torch.nn.Module, name: str) -> torch.nn.Module:
        """With ENABLE_PERFORMANCE_LOGGING, time every call of a component (uniopt's own module only)."""
        if not self._settings.enable_performance_logging:
            return module
        starts: list[float] = []

        def before(_module: Any, _args: Any) -> None:
            starts.append(time.perf_counter())

        def after(_module: Any, _args: Any, _output: Any) -> None:
            elapsed = time.perf_counter() - starts.pop()
            self._timings.append({"component": name, "seconds": elapsed})
            log.info("%s: %.2f ms", name, elapsed * 1e3)

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)
        return module

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
        """The optimized engine (the original one in ``mode="off"``)."""
        return self._engine

    def report(self) -> OptimizationReport:
        """What was chosen per component, every candidate's figures, and cold-start costs."""
        return self._report

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._engine(*args, **kwargs)

    def get_performance_info(self) -> dict[str, Any]:
        """Per-component call timings (with ``ENABLE_PERFORMANCE_LOGGING``), the engine's own figures, the report."""
        info: dict[str, Any] = {"calls": list(self._timings), "report": self._report.to_dict()}
        engine_info = getattr(self._engine, "get_performance_info", None)
        if callable(engine_info):
            info["engine"] = engine_info()
        return info

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._engine, name)

    def __repr__(self) -> str:
        name, mode, tier = type(self._original).__name__, self._settings.mode, self._tier.tier.name
        return f"UniversalOptimizer({name}, mode={mode!r}, tier={tier!r})"


def _installable(stage: Any, original: torch.nn.Module) -> torch.nn.Module:
    """The stage's own module when it is one of the original's kind (all methods work), else a shim."""
    if isinstance(stage.run, type(original)) and stage.run is not original:
        return stage.run
    return StageModule(stage, original)


def _resolve(engine: Any, path: str) -> Any:
    obj = engine
    for attr in path.split("."):
        obj = getattr(obj, attr)
    return obj


def _cache(settings: Settings) -> Any:
    from ..cache import ArtifactCache, default_cache_dir

    root = settings.cache_dir or default_cache_dir()
    return ArtifactCache(root, max_bytes=settings.cache_size_limit, bundle=settings.cache_bundle)
