"""``optimize bench``: optimize engines in auto mode and report every candidate's figures."""

from __future__ import annotations

import time
from typing import Any

from .engines.registry import load_engine
from .memory import measure_memory, release_memory, rss_bytes
from .optimizer import UniversalOptimizer

__all__ = ["run_bench"]


def run_bench(
    names: list[str], *, budget_s: float | None = None, mode: str = "auto", **settings: Any
) -> list[dict[str, Any]]:
    """Build each engine, optimize it with fresh measurements, return one report dict per engine."""
    results = []
    for name in names:
        started = time.perf_counter()
        engine, example_inputs = load_engine(name)
        build_seconds = time.perf_counter() - started
        if budget_s is not None:
            settings["search_budget_s"] = budget_s
        engine_rss = rss_bytes()
        with measure_memory() as use:
            opt = UniversalOptimizer(engine, example_inputs, mode=mode, reuse_decisions=False, **settings)
        report = opt.report().to_dict()
        report.update(engine=name, engine_build_seconds=build_seconds)
        # The peak counts the build steps' child processes (uniopt.isolation) on top of this one.
        report["memory"] = {
            "engine_rss_bytes": engine_rss,
            "peak_rss_bytes": engine_rss + use.peak_increase_bytes,
            "optimized_rss_bytes": rss_bytes(),
            "method": use.method,
        }
        info = getattr(engine, "info", None)
        if callable(info):
            report["engine_info"] = info()
        results.append(report)
        del engine, example_inputs, opt
        release_memory()  # the next engine starts from what this one leaves behind
    return results
