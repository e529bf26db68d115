"""How much memory optimizing a built-in engine needs, and whether it fits the memory left here.

An engine's components are built on the meta device (:func:`~uniopt.engines.registry.load_structure`:
shapes and dtypes from the engine's own definition, no weight read or allocated), and what the
estimate needs of each is kept as :class:`ComponentFacts`, in the artifact cache (keyed by the
engines' source, the library versions and ``USE_FAST_MODELS``), so a later ``optimize doctor``
imports no model library. Each candidate declares the memory-checked steps its build runs
(:class:`~uniopt.plugins.BuildStep`); a candidate needs what its largest step needs, by the same
estimate and margins the builders check before each step (:mod:`uniopt.plugins.memory_costs`).
A stage's first calls are checked against the eager calls' peak, which only running them tells:
they are not counted here. Figures are for a cold cache; a bundle or cached artifacts skip the
steps that made them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .memory import format_bytes
from .parked import parks
from .plugins.candidate import Candidate
from .plugins.memory_costs import EAGER_RUNTIME_BYTES, estimate_step, required_bytes
from .tiers import Tier

__all__ = [
    "CandidateNeed",
    "ComponentFacts",
    "ComponentMemory",
    "EngineMemory",
    "component_facts",
    "engine_facts",
    "engine_memory",
]

log = logging.getLogger("uniopt")
CACHE_KIND = "engine-structure"
CACHE_SCHEMA = 2
_ENGINES_DIR = Path(__file__).parent / "engines"
_memo: dict[str, list[ComponentFacts]] = {}


@dataclass(frozen=True)
class ComponentFacts:
    """What the memory estimate needs of a component: its weights, and what decides which candidates apply.

    ``weight_bytes`` are its parameters and buffers (tied ones once), as the builders' checks count
    them; ``parameter_bytes`` the parameters alone (what parking moves to a file, :mod:`uniopt.parked`);
    ``int8_file_bytes`` the weights with Linear and embedding weights at one byte per element (the
    size of a model file with int8 weights).
    """

    name: str
    kind: str
    exporter: str
    weight_bytes: int
    parameter_bytes: int
    int8_file_bytes: int
    decode_steps: bool
    frame_graph: bool
    held_out_calibration: bool
    has_linear: bool


@dataclass(frozen=True)
class CandidateNeed:
    """A candidate's largest build step: its estimate, and the memory left it needs (margins included)."""

    candidate: str
    step: str
    estimated_bytes: int
    required_bytes: int


@dataclass(frozen=True)
class ComponentMemory:
    """A component's weights and the needs of the candidates its tier chain tries here (cheapest first)."""

    name: str
    kind: str
    weight_bytes: int
    needs: tuple[CandidateNeed, ...]

    @property
    def least(self) -> CandidateNeed | None:
        return self.needs[0] if self.needs else None

    @property
    def full(self) -> CandidateNeed | None:
        return self.needs[-1] if self.needs else None

    def fitting(self, build_bytes: int) -> list[str]:
        return [n.candidate for n in self.needs if n.required_bytes <= build_bytes]


@dataclass(frozen=True)
class EngineMemory:
    """One engine: eager footprint, what optimizing it needs, and the verdict against ``available_bytes``.

    ``available_bytes`` is the memory an optimizing process may use in all; the engine's eager
    footprint comes off it first, the weights parked in a file (``parked_bytes``) go back to it,
    and the rest (``build_bytes``) is left for the build steps.
    """

    name: str
    weight_bytes: int
    eager_bytes: int
    available_bytes: int
    components: tuple[ComponentMemory, ...]
    error: str | None = None
    parked_bytes: int = 0

    @property
    def build_bytes(self) -> int:
        return self.available_bytes - self.eager_bytes + self.parked_bytes

    @property
    def least(self) -> CandidateNeed | None:
        """The cheapest candidate of any component: less than this and nothing is optimized."""
        return min((c.least for c in self.components if c.least), key=lambda n: n.required_bytes, default=None)

    @property
    def full(self) -> CandidateNeed | None:
        """The costliest candidate of any chain: with this much every candidate can be built."""
        return max((c.full for c in self.components if c.full), key=lambda n: n.required_bytes, default=None)

    @property
    def fits(self) -> bool:
        full = self.full
        return self.error is None and (full is None or full.required_bytes <= self.build_bytes)

    def fitting(self) -> dict[str, list[str]]:
        return {c.name: c.fitting(self.build_bytes) for c in self.components}

    @property
    def verdict(self) -> str:
        """``fits``, ``only <candidates> fit`` or ``does not fit: stays eager``."""
        if self.error is not None:
            return f"not estimated: {self.error}"
        if self.full is None:
            return "no candidate to build here: stays eager"
        if self.fits:
            return "fits"
        fitting = {name: names for name, names in self.fitting().items() if names}
        if not fitting:
            return "does not fit: stays eager"
        if len(self.components) == 1:
            return f"only {', '.join(next(iter(fitting.values())))} fit"
        parts = "; ".join(f"{name}: {', '.join(names)}" for name, names in fitting.items())
        eager = [c.name for c in self.components if c.name not in fitting and c.needs]
        return f"only {parts} fit" + (f" ({', '.join(eager)} stays eager)" if eager else "")

    def to_dict(self) -> dict[str, Any]:
        def need(n: CandidateNeed | None) -> dict[str, Any] | None:
            return dataclasses.asdict(n) if n else None

        least, full = self.least, self.full
        return {
            "name": self.name,
            "weight_bytes": self.weight_bytes,
            "eager_bytes": self.eager_bytes,
            "parked_bytes": self.parked_bytes,
            "available_bytes": self.available_bytes,
            "build_bytes": self.build_bytes,
            "least_bytes": least.required_bytes if least else None,
            "full_bytes": full.required_bytes if full else None,
            "least": need(least),
            "full": need(full),
            "fits": self.fits,
            "verdict": self.verdict,
            "error": self.error,
            "components": [
                {
                    "name": c.name,
                    "kind": c.kind,
                    "weight_bytes": c.weight_bytes,
                    "least": need(c.least),
                    "full": need(c.full),
                    "fitting": c.fitting(self.build_bytes),
                    "candidates": [dataclasses.asdict(n) for n in c.needs],
                }
                for c in self.components
            ],
        }


def _tensor_bytes(module: Any, one_byte: set[int] | None = None, buffers: bool = True) -> int:
    """Parameter and buffer bytes of ``module`` (meta tensors included), each once; ``one_byte`` ids at 1 B."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in [*module.parameters(), *(module.buffers() if buffers else ())]:
        meta = tensor.device.type == "meta"
        key = ("id", id(tensor)) if meta else ("storage", tensor.untyped_storage().data_ptr())
        if key in seen:
            continue
        seen.add(key)
        size = 1 if one_byte is not None and id(tensor) in one_byte else tensor.element_size()
        total += tensor.numel() * size
    return total


def component_facts(component: Any) -> ComponentFacts:
    """The :class:`ComponentFacts` of a :class:`~uniopt.optimizer.component.Component` (on meta or not)."""
    import torch

    module = component.module
    linear = [m.weight for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    steps = component.decode_steps
    return ComponentFacts(
        name=component.name,
        kind=component.kind,
        exporter=component.exporter,
        weight_bytes=_tensor_bytes(module),
        parameter_bytes=_tensor_bytes(module, buffers=False),
        int8_file_bytes=_tensor_bytes(module, {id(w) for w in linear}),
        decode_steps=steps is not None,
        frame_graph=steps is not None and steps.frame is not None,
        held_out_calibration=bool(component.int8_calibration_inputs()),
        has_linear=any(
            isinstance(m, torch.nn.Linear) or callable(getattr(m, "to_linear", None)) for m in module.modules()
        ),
    )


def _structure_key(name: str, use_fast_models: bool) -> str:
    from .cache import cache_key, library_versions

    sources = hashlib.sha256()
    for path in sorted(_ENGINES_DIR.rglob("*.py")):
        sources.update(path.relative_to(_ENGINES_DIR).as_posix().encode())
        sources.update(path.read_bytes())
    spec = {
        "kind": CACHE_KIND,
        "schema": CACHE_SCHEMA,
        "engine": name,
        "sources": sources.hexdigest(),
        "use_fast_models": use_fast_models,
        "versions": library_versions(),
    }
    return cache_key(spec)


def _build_facts(name: str) -> list[ComponentFacts]:
    from .engines.registry import load_structure
    from .optimizer.adapters import engine_components

    return [component_facts(c) for c in engine_components(load_structure(name))]


def engine_facts(name: str, *, cache_dir: Path | str | None = None) -> list[ComponentFacts]:
    """The facts of built-in engine ``name``'s components, from the cache, or built on the meta device now.

    ``cache_dir`` defaults to ``UNIOPT_CACHE_DIR`` or the user cache directory; a cache that cannot
    be written means building them each time, never an error.
    """
    from .cache import ArtifactCache, default_cache_dir
    from .settings import load_settings

    settings = load_settings()
    key = _structure_key(name, settings.use_fast_models)
    if key in _memo:
        return _memo[key]
    built: list[list[ComponentFacts]] = []

    def build(_directory: Path) -> dict[str, Any]:
        built.append(_build_facts(name))
        return {"components": [dataclasses.asdict(f) for f in built[0]]}

    try:
        cache = ArtifactCache(cache_dir or settings.cache_dir or default_cache_dir(), settings.cache_size_limit)
        entry, _ = cache.get_or_build(key, build, kind=CACHE_KIND, description={"engine": name})
        facts = built[0] if built else [ComponentFacts(**f) for f in entry.extra["components"]]
    except (KeyError, TypeError):  # an entry of another layout
        log.warning("cached engine structure of %s is not readable; building it again", name)
        cache.remove(key)
        facts = _build_facts(name)
    except OSError as exc:  # CacheError included: go on without the cache
        log.warning("engine structure of %s not cached (%s)", name, exc)
        facts = built[0] if built else _build_facts(name)
    _memo[key] = facts
    return facts


def _applies(candidate: Candidate, facts: ComponentFacts) -> bool:
    """Whether the candidate's steps can run on the component (what its builder checks first)."""
    steps = {s.step for s in candidate.steps}
    return not (
        (steps & {"onnx-export", "openvino-ir"} and facts.exporter == "none")
        or (steps & {"openvino-convert-step", "onnxruntime-step-export"} and not facts.decode_steps)
        or ("openvino-convert-frame" in steps and not facts.frame_graph)
        or ("nncf-static" in steps and not facts.held_out_calibration)
        or (steps & {"torch-int8", "torch-int8-weights"} and not facts.has_linear)
    )


def candidate_need(candidate: Candidate, facts: ComponentFacts) -> CandidateNeed | None:
    """The largest of the candidate's build steps on this component; None when it declares none or cannot build it."""
    if not candidate.steps or not _applies(candidate, facts):
        return None
    estimates: list[tuple[int, str]] = []
    for s in candidate.steps:
        base = facts.int8_file_bytes if s.base == "int8-file" else facts.weight_bytes
        estimates.extend((estimate_step(step, base), step) for step in s.resolved(facts.exporter))
    estimated, step = max(estimates)
    return CandidateNeed(candidate.name, step, estimated, required_bytes(estimated))


def engine_memory(
    name: str,
    available_bytes: int,
    tier: Tier,
    candidates: Mapping[str, Candidate],
    *,
    facts: Sequence[ComponentFacts] | None = None,
    cache_dir: Path | str | None = None,
    park_setting: str = "auto",
) -> EngineMemory:
    """What optimizing built-in engine ``name`` in ``tier`` needs, against ``available_bytes`` in all.

    ``candidates`` are those available here; each component's chain is the tier's for its kind.
    ``facts`` default to :func:`engine_facts` (``cache_dir`` is its cache).
    The eager footprint is the components' weight bytes plus ``EAGER_RUNTIME_BYTES``; the parameters
    of the components :func:`~uniopt.parked.parks` parks (``park_setting``, ``UNIOPT_PARK_WEIGHTS``),
    in order, with what is left then, come back to the builds. An engine that cannot be built on
    the meta device (a library missing) gets ``error`` and no figures.
    """
    if facts is None:
        try:
            facts = engine_facts(name, cache_dir=cache_dir)
        except Exception as exc:  # a missing or broken model library: say so in the row, not an error
            log.info("engine %s not estimated: %s", name, exc)
            return EngineMemory(name, 0, 0, available_bytes, (), f"{type(exc).__name__}: {exc}")
    components = []
    for f in facts:
        chain = [candidates[n] for n in tier.chain_for(f.kind) if n in candidates]
        found = [need for cand in chain if (need := candidate_need(cand, f)) is not None]
        components.append(ComponentMemory(f.name, f.kind, f.weight_bytes, tuple(sorted(found, key=_order))))
    weights = sum(f.weight_bytes for f in facts)
    eager = weights + EAGER_RUNTIME_BYTES
    parked = 0
    for f in facts:
        if parks(park_setting, f.parameter_bytes, available_bytes - eager + parked):
            parked += f.parameter_bytes
    return EngineMemory(name, weights, eager, available_bytes, tuple(components), parked_bytes=parked)


def _order(need: CandidateNeed) -> tuple[int, str]:
    return need.required_bytes, need.candidate


def memory_advice(engines: Iterable[EngineMemory]) -> str | None:
    """One line naming the engines whose chains do not all fit here, or None."""
    short = [e for e in engines if e.error is None and not e.fits]
    if not short:
        return None
    listed = "; ".join(
        f"{e.name}: {e.verdict}, with {format_bytes(max(e.build_bytes, 0))} left to build in" for e in short
    )
    return (
        f"Not every candidate fits the memory here: {listed}. The rest are refused, not killed; build them "
        "elsewhere with `optimize prepare ENGINE --for doctor.json --out DIR` and set UNIOPT_CACHE_BUNDLE=DIR here."
    )
