"""``optimize prepare``: build a target host's artifacts on a larger machine, as a read-only bundle.

The target's ``optimize doctor --json`` gives its profile. For every component of each engine,
every graph candidate the target's tier and instruction sets allow is built here with the
target's profile (so the keys are the ones the target computes): the ONNX export, ORT-optimized and
int8 models, OpenVINO IR with nncf int8 where the target's CPU makes int8 saturate or not, and
a decoder's stateful step models.
Nothing is timed. On the target, ``UNIOPT_CACHE_BUNDLE=DIR`` makes tier and auto mode load these
instead of exporting; an artifact built for another tier or other library versions has another
key and is simply not found.

An ORT model optimized at ``ORT_ENABLE_ALL`` may hold kernels for this machine's CPU only, so it is
built only when this CPU's instruction sets are the target's (the target optimizes it itself,
from the bundled export, otherwise). Compiling for a precision this CPU lacks (bf16) fails after
the IR is saved: the IR is what the bundle needs, so such a failure is reported, not fatal.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cache import ArtifactCache, library_versions
from .engines.registry import load_engine
from .memory import release_memory
from .optimizer.adapters import engine_components
from .plugins import BuildContext, BuildFailure, availability, candidates, plugin_manager
from .plugins.fallback import NOT_APPLICABLE
from .settings import resolve_settings
from .threads import thread_budget
from .tiers import HostProfile, host_profile

__all__ = ["PreparedArtifact", "prepare_bundle"]

#: Candidates that need ONNX are the ones that leave artifacts on disk.
#: Candidates that need one of these build cached artifacts (ONNX exports, OpenVINO IRs).
_ARTIFACT_PACKAGES = ("onnx", "openvino")
#: Needs the target's own CPU to build (see the module docstring).
_HOST_SPECIFIC = ("onnxruntime-fp32",)


@dataclass
class PreparedArtifact:
    """What preparing one candidate for one component did."""

    engine: str
    component: str
    candidate: str
    status: str  # "built", "skipped" or "failed"
    reason: str = ""
    seconds: float = 0.0
    entries: list[str] = field(default_factory=list)


def prepare_bundle(engines: list[str], target: HostProfile, out: Path | str, **settings: Any) -> list[PreparedArtifact]:
    """Build every artifact ``target`` can use for ``engines`` into the cache directory ``out``."""
    out = Path(out)
    here = host_profile()
    resolved, choice = resolve_settings({"mode": "tier", **settings}, target)
    context = BuildContext(
        resolved, target, choice.tier, thread_budget(here.usable_cpus, resolved.threads), cache=ArtifactCache(out)
    )
    pm = plugin_manager(resolved.plugins)
    same_cpu = here.cpu.flags == target.cpu.flags
    results: list[PreparedArtifact] = []
    for engine_name in engines:
        engine, example_inputs = load_engine(engine_name)
        for component in engine_components(engine, example_inputs):
            for cand in candidates(pm).values():
                if not set(_ARTIFACT_PACKAGES) & set(cand.requires.packages):
                    continue
                row = PreparedArtifact(engine_name, component.name, cand.name, "skipped")
                results.append(row)
                ok, why = availability(cand, target, resolved, choice.tier)
                if not ok:
                    row.reason = f"not available on the target: {why}"
                elif component.exporter == "none" and component.decode_steps is None:
                    row.reason = "the component does not export"
                elif cand.name in _HOST_SPECIFIC and not same_cpu:
                    row.reason = "optimized for the CPU it runs on; the target builds it from the bundled export"
                else:
                    _build(row, cand, component, context, pm)
        del engine, example_inputs
        release_memory()
    _write_index(out, target, results)
    return results


def _build(row: PreparedArtifact, cand: Any, component: Any, context: BuildContext, pm: Any) -> None:
    before = {e.key for e in context.cache.entries()}
    started = time.perf_counter()
    stage = pm.hook.uniopt_build_stage(candidate=cand, component=component, context=context)
    row.seconds = time.perf_counter() - started
    row.entries = sorted({e.key for e in context.cache.entries()} - before)
    if isinstance(stage, BuildFailure) and stage.reason.startswith(NOT_APPLICABLE) and not row.entries:
        row.reason = stage.reason
    elif isinstance(stage, BuildFailure):
        row.status, row.reason = (
            ("built", f"artifacts saved; {stage.reason}") if row.entries else ("failed", stage.reason)
        )
    else:
        row.status = "built"
    del stage
    release_memory()


def _write_index(out: Path, target: HostProfile, results: list[PreparedArtifact]) -> None:
    index = {
        "target_fingerprint": target.fingerprint,
        "versions": library_versions(),
        "artifacts": [vars(r) for r in results],
    }
    (out / "bundle.json").write_text(json.dumps(index, indent=1))
