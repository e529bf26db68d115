"""Choosing a stage per component: tier defaults, or measured candidates behind the guard.

``tier`` mode walks the tier's chain for the component's kind and keeps the first candidate that
is available, builds and passes the guard. ``auto`` mode builds the available candidates one at a
time, validates each against the FP32 reference, and times each survivor interleaved with eager and
the best one so far; the slower of the two is released at once, so no more than two built stages
are alive at a time. The best is kept if it beats eager by ``min_speedup``; otherwise eager stays.
While a challenger whose build needs more memory than the best so far holds is built, the best is
released; the challenger is then timed against eager alone and their speed-ups over eager are
compared, and the best is rebuilt from its cached artifacts only if it still wins at the end, so
the peak is eager plus the larger of the two. Challengers are built with ``BuildContext.trial``: an
OpenVINO one runs in a trial process of its own (:mod:`uniopt.plugins.openvino_trial`), and the
chosen stage is then built in this process and checked again (:meth:`_Selector.install_in_process`).
Every candidate's peak and resident memory are measured; a build step that would not fit the
memory left is refused before it runs (``plugins.memory_costs``). The decision is stored in the
artifact cache, keyed by host fingerprint, tier, component and every setting that changes the
outcome, so the next process applies it without timing anything (the chosen stage is validated
again when it is applied, against the FP32 reference outputs the cache keeps:
:mod:`uniopt.optimizer.references`).

The search budget bounds the whole search, builds included: a candidate is started only while
the budget left holds what the last candidate that built and was checked took. An engine's
components share one budget (:func:`budget_part`: each search gets an equal part of what is left
when it starts, so what one leaves unspent goes to the next). The setting is recorded
in the decision instead of its key: a search that finished within
its budget is reused at any budget; one cut short by its budget is stored as partial, and is
searched again by a process with a larger budget. Several processes starting cold on one cache
take a lock per decision key: one measures, the others wait for its decision (at most the search
and compile budgets plus :data:`DECISION_WAIT_MARGIN_S`), then apply it; after that they search
themselves. Cache entries are held (``ArtifactCache.pinned``) while a stage is built from them, so
eviction in another process cannot delete them under the build.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pluggy
import torch
from filelock import Timeout

from ..errors import InputError, MemoryBudgetError, OptimizationError, ValidationError
from ..memory import measure_memory, memory_headroom, release_memory
from ..parked import page_out_parked, park_for_room
from ..plugins import BuildContext, BuildFailure, Candidate, Stage, availability, candidates
from ..plugins.candidate import TRIAL_PROCESS
from ..plugins.fallback import NOT_APPLICABLE
from ..plugins.memory_costs import memory_step
from ..plugins.model_cache import model_cache, stage_key
from .component import Component
from .guard import GuardResult, check_outputs, check_structure, fixed_shapes, strict_calls
from .references import Reference, compute_references
from .report import CandidateResult, ComponentReport
from .shapes import shape_variants
from .timing import measure_interleaved

__all__ = ["optimize_component"]

log = logging.getLogger("uniopt")
DECISION_FORMAT = 2
#: Seconds a process waits for another's decision beyond that search's budgets.
DECISION_WAIT_MARGIN_S = 60.0


def _ordered(cands: dict[str, Candidate], component: Component, context: BuildContext) -> list[Candidate]:
    """The tier's chain first (its order), then every other candidate (registration order)."""
    chain = [n for n in context.tier.chain_for(component.kind) if n in cands]
    if context.settings.mode == "tier":
        names = chain if "eager" in chain else [*chain, "eager"]
    else:
        names = [
            "eager",
            *[n for n in chain if n != "eager"],
            *[n for n in cands if n not in chain and n != "eager"],
        ]
    return [cands[n] for n in names if n in cands]


def _decision_key(component: Component, context: BuildContext, names: list[str]) -> str:
    """Everything that changes what a search finds, except the search budget (see the module docstring)."""
    from ..cache import cache_key, library_versions

    s = context.settings
    return cache_key(
        {
            "decision": DECISION_FORMAT,
            "host": context.profile.fingerprint,
            "tier": context.tier.name,
            "component": component.key(),
            "metric": [component.metric.name, component.metric.threshold],
            "candidates": sorted(names),
            "settings": {
                "mode": s.mode,
                "atol": s.atol,
                "rtol": s.rtol,
                "min_speedup": s.min_speedup,
                "fallback_on_optimization_error": s.fallback_on_optimization_error,
                "compile_mode": s.compile_mode,
                "compile_budget_s": s.compile_budget_s,
                "model_warmup_runs": s.model_warmup_runs,
                "threads": context.threads.intra_op,
            },
            "versions": library_versions(),
        }
    )


class _Selector:
    def __init__(self, component: Component, context: BuildContext, pm: pluggy.PluginManager, budget_s: float) -> None:
        self.component = component
        self.context = context
        self.pm = pm
        #: Seconds this component's search may take (its part of the engine's budget).
        self.budget_s = budget_s
        self.results: list[CandidateResult] = []
        #: Built stages still in the running: eager, the best so far, and the one being tried.
        self.stages: dict[str, Stage] = {}
        self.best = "eager"
        self.started = time.perf_counter()
        component.module.eval()
        self._references: list[Reference] | None = None
        #: Whether the eager module itself ran on the guarded inputs for the references (not loaded).
        self.module_ran_guarded = False
        self.call_bytes = 0
        self._shape_references: list[Reference] | None = None
        #: Seconds the last candidate that built and was checked took (build, check, timing).
        self.last_cost_s: float | None = None
        #: The best so far, released while a challenger that needs more memory than it holds is built.
        self.set_aside: Candidate | None = None
        self._facts: Any = None

    def references(self, shapes: bool = False) -> list[Reference]:
        """FP32 outputs for the example and the first calibration input, computed once, on demand.

        With ``shapes``, also for the inputs at other sizes that fixed-shape stages are checked on.
        """
        component = self.component
        if self._references is None:
            self._references, self.module_ran_guarded = self._reference_list(component.guarded_inputs())
        if not shapes:
            return self._references
        if self._shape_references is None:  # derived sizes the module does not take are left out
            derived = not component.validation_inputs
            self._shape_references, _ = self._reference_list(shape_variants(component), skip_failing=derived)
        return [*self._references, *self._shape_references]

    def _reference_list(
        self, input_sets: list[tuple[Any, ...]], skip_failing: bool = False
    ) -> tuple[list[Reference], bool]:
        found, call_bytes, ran = compute_references(self.component, input_sets, self.context, skip_failing)
        if ran:
            page_out_parked()  # the eager calls paged parked weights in
        # What a call of the module needs beyond its weights: a stage's first calls need about as much.
        self.call_bytes = max(self.call_bytes, call_bytes)
        return found, ran

    def build_beside_best(self, cand: Candidate) -> bool:
        """Whether ``cand`` is built with the best so far alive.

        Not when its build needs more than the best holds, nor when it would not fit the memory left
        beside the best but would without it. Then the best is released while ``cand`` is built
        (see :func:`_duel`), so the peak is eager plus the larger of the two, not their sum.
        """
        if self.best == "eager" or self.set_aside is not None:
            return True
        from ..engine_memory import candidate_need, component_facts

        if self._facts is None:
            self._facts = component_facts(self.component)
        need = candidate_need(cand, self._facts)
        if need is None:
            return True
        held = _result(self, self.best).resident_memory_bytes or 0
        if need.estimated_bytes > held:
            return False
        left = memory_headroom().available_bytes
        return need.required_bytes <= left or need.required_bytes > left + held

    def refused_beside_best(self) -> bool:
        """Whether the last candidate was refused for memory while the best so far was alive beside it."""
        last = self.results[-1] if self.results else None
        return (
            last is not None
            and last.reason.startswith("refused for memory")
            and self.context.settings.mode == "auto"
            and self.best != "eager"
            and self.set_aside is None
        )

    def put_best_aside(self, candidates: dict[str, Candidate]) -> None:
        log.debug("%s: releasing %s while a larger build runs", self.component.name, self.best)
        self.set_aside = candidates[self.best]
        _close_trial(self.stages.pop(self.best))
        release_memory()

    def install_in_process(self, cand: Candidate) -> str:
        """Build the chosen ``cand`` in this process and check it again: it ran in a trial process, or was set aside.

        Its trial process ends first, so the two are never alive together. Returns the name of the
        stage that is chosen: ``cand``'s, or eager when it does not build or pass here (raised
        instead when fallback is off).
        """
        held = self.stages.pop(cand.name, None)
        if held is not None:
            _close_trial(held)
        del held
        release_memory()
        result = _result(self, cand.name)
        steps = len(self.context.memory_steps)
        with measure_memory() as use:
            built = self._build(cand)
            failure = built.reason if isinstance(built, BuildFailure) else None
            if not isinstance(built, BuildFailure):
                try:
                    verdict = self.validate(cand, built)
                    failure = None if verdict.passed else f"guard: {verdict.reason}"
                except Exception as exc:
                    failure = f"first call failed: {type(exc).__name__}: {str(exc)[:200]}"
        result.memory_steps = [*(result.memory_steps or []), *self.context.memory_steps[steps:]]
        if failure is not None:
            if not self.context.settings.fallback_on_optimization_error:
                raise OptimizationError(self.component.name, cand.name, f"failed in the engine's process: {failure}")
            log.warning("%s: %s was chosen but failed in this process: %s", self.component.name, cand.name, failure)
            result.reason = f"chosen, then failed when built in the engine's process: {failure}"
            release_memory()
            return "eager"
        assert isinstance(built, Stage)
        self.pm.hook.uniopt_stage_ready(component=self.component, stage=built, context=self.context)
        result.resident_memory_bytes = use.resident_increase_bytes
        self.stages[cand.name] = built
        return cand.name

    def reject(self, name: str, reason: str, **figures: Any) -> None:
        self.results.append(CandidateResult(name, accepted=False, reason=reason, **figures))

    def try_candidate(self, cand: Candidate, trial: bool = False) -> Stage | None:
        """Build and validate one candidate, measuring its memory; record and return None when it fails.

        What fails is released before this returns. ``trial``: see :meth:`_build`.
        """
        steps = len(self.context.memory_steps)
        if cand.name != "eager" or self.context.settings.mode == "auto":
            # The FP32 reference outputs are the search's, not this candidate's memory. In auto
            # mode every challenger needs them, and computing them first warms eager up.
            self.references()
        with measure_memory() as use:
            stage = self._build_and_check(cand, trial)
        result = self.results[-1]
        ran = self.context.memory_steps[steps:]
        result.peak_memory_bytes = use.peak_increase_bytes
        result.resident_memory_bytes = _resident_bytes(stage, use.resident_increase_bytes)
        result.estimated_peak_bytes = max((s["estimated_bytes"] for s in ran), default=None)
        result.memory_steps = list(ran)
        if stage is None:
            release_memory()
        return stage

    def _build(self, cand: Candidate, trial: bool = False) -> Stage | BuildFailure:
        """Build ``cand``, holding the cache entries it reads until it is built; then trim the cache.

        Trimming after the build counts what the build's runtimes wrote into its entries (compiled
        blobs); the entries still held are passed over. With ``trial``, the plugin may build it in
        a process of its own (:attr:`BuildContext.trial`).
        """
        context = dataclasses.replace(self.context, trial=trial) if trial else self.context
        cache, key = context.cache, stage_key(cand, self.component, context)

        def build() -> Any:
            return self.pm.hook.uniopt_build_stage(candidate=cand, component=self.component, context=context)

        if cache is None:
            return model_cache.get_or_build(key, build)
        with cache.pinned():
            built = model_cache.get_or_build(key, build)
            cache.evict()
        return built

    def _build_and_check(self, cand: Candidate, trial: bool = False) -> Stage | None:
        started = time.perf_counter()
        built = self._build(cand, trial)
        build_seconds = time.perf_counter() - started
        if isinstance(built, BuildFailure):
            if isinstance(built.error, MemoryBudgetError):
                reason = f"refused for memory: {built.reason}"
            elif built.reason.startswith(NOT_APPLICABLE):
                reason = built.reason
            else:
                reason = f"build failed: {built.reason}"
            self.reject(cand.name, reason, build_seconds=build_seconds)
            return None
        try:
            if built.run is self.component.module:  # eager: the engine's own calls, never refused
                if self.module_ran_guarded:  # the reference calls were its first calls on the warm-up's inputs
                    built.info.setdefault("warm_calls", 1)
                verdict = self.validate(cand, built)
            else:
                # What the eager calls needed, and what the stage says its own first calls add.
                first_calls = self.call_bytes + int(built.info.get("first_call_bytes", 0))
                with memory_step("first-calls", self.component, self.context, first_calls):
                    verdict = self.validate(cand, built)
        except MemoryBudgetError as exc:
            self.reject(cand.name, f"refused for memory: {exc}", build_seconds=build_seconds)
            return None
        except InputError:  # the reference itself fails: the component's inputs are wrong
            raise
        except Exception as exc:
            if self._drop_corrupt_artifacts(cand, built):
                return self._build_and_check(cand, trial)
            if not self.context.settings.fallback_on_optimization_error:
                raise OptimizationError(self.component.name, cand.name, f"first call failed: {exc}") from exc
            self.reject(
                cand.name,
                f"first call failed: {type(exc).__name__}: {str(exc)[:200]}",
                build_seconds=build_seconds,
            )
            return None
        if not verdict.passed:
            if self._drop_corrupt_artifacts(cand, built):
                return self._build_and_check(cand, trial)
            if not self.context.settings.fallback_on_optimization_error:
                raise ValidationError(self.component.name, cand.name, verdict.reason)
            self.reject(
                cand.name,
                f"guard: {verdict.reason}",
                metric=verdict.metric,
                metric_value=verdict.value,
                build_seconds=build_seconds,
            )
            return None
        self.pm.hook.uniopt_stage_ready(component=self.component, stage=built, context=self.context)
        self.results.append(
            CandidateResult(
                cand.name,
                accepted=True,
                metric=verdict.metric,
                metric_value=verdict.value,
                build_seconds=build_seconds,
                warmup_seconds=built.info.get("warmup_seconds"),
                from_cache=bool(built.info.get("from_cache")),
            )
        )
        return built

    def _drop_corrupt_artifacts(self, cand: Candidate, stage: Stage) -> bool:
        """True when ``stage`` was loaded from cache entries that fail the full check; they are removed.

        The cheap size check passes a file whose bytes were flipped in place; it may even load and
        then compute garbage, which only the guard sees. Such entries are a miss, not a lost candidate.
        """
        cache = self.context.cache
        keys = stage.info.get("cached_entries") or ()
        corrupt = [key for key in keys if cache is not None and cache.verify_entry(key) is not None]
        if not corrupt:
            return False
        log.warning("%s for %s: cached artifacts are corrupt; rebuilding them", cand.name, self.component.name)
        for key in corrupt:
            cache.remove(key)
        for context in (self.context, dataclasses.replace(self.context, trial=True)):
            model_cache.discard(stage_key(cand, self.component, context))
        return True

    def validate(self, cand: Candidate, stage: Stage) -> Any:
        if stage.run is self.component.module:  # the reference itself: equal by definition, and free
            return GuardResult(True, "allclose", 0.0)
        references = self.references(shapes=fixed_shapes(stage))  # raises InputError if the module does
        s = self.context.settings
        verdict = None
        for ref in references:
            with torch.inference_mode(), strict_calls(stage):
                outputs = stage(*copy.deepcopy(ref.inputs))
            expected = ref.outputs
            if ref.forced is not None:  # free-running outputs: structure only; scores decide
                verdict = check_structure(ref.outputs, outputs)
                if verdict is not None:
                    return verdict
                forced_inputs, expected = ref.forced
                with torch.inference_mode(), strict_calls(stage):
                    outputs = stage(*copy.deepcopy(forced_inputs))
            verdict = check_outputs(
                expected,
                outputs,
                precision=cand.requires.precision,
                metric=self.component.metric,
                atol=s.atol,
                rtol=s.rtol,
            )
            if not verdict.passed:
                if ref.forced is not None:
                    return dataclasses.replace(verdict, reason=f"teacher-forced {verdict.reason}")
                return verdict
        # Each guarded input ran once: the warm-up's calls, made already (uniopt.plugins.warmup).
        stage.info.setdefault("warm_calls", 1)
        return verdict

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > self.budget_s

    def budget_refusal(self) -> str | None:
        """Why the next candidate is not started, if the budget cannot hold it; None when it can.

        The cost of the last candidate that built and was checked predicts the next one's, so a
        search ends within its budget instead of starting a build it cannot afford.
        """
        if self.over_budget():
            return "search budget spent"
        left = self.budget_s - (time.perf_counter() - self.started)
        if self.last_cost_s is not None and left < self.last_cost_s:
            return f"search budget: {left:.0f} s left, the last candidate took {self.last_cost_s:.0f} s"
        return None

    def cut_short(self) -> bool:
        """Whether the search ran over its budget: a candidate skipped, or a timing stopped by it."""
        return self.over_budget() or any(r.reason.startswith("search budget") for r in self.results)


def _close_trial(stage: Stage) -> None:
    trial = stage.info.get(TRIAL_PROCESS)
    if trial is not None:
        trial.close()


def _resident_bytes(stage: Stage | None, increase_bytes: int) -> int | None:
    """What a built stage holds: this process's increase, plus its trial process if it has one."""
    if stage is None:
        return None
    trial = stage.info.get(TRIAL_PROCESS)
    return increase_bytes + (trial.rss_bytes() if trial is not None else 0)


def _result(selector: _Selector, name: str) -> CandidateResult:
    return next(r for r in selector.results if r.name == name and r.accepted)


def _duel(selector: _Selector, challenger: str | None) -> None:
    """Time eager, the best so far and ``challenger`` interleaved; keep the faster of the last two.

    The slower one is released at once, so at most two built stages (besides the eager module)
    are ever alive. ``challenger=None`` times eager alone (nothing else passed the guard). When
    the best so far is set aside (the challenger's build needed its memory), the challenger is
    timed against eager alone and the two speed-ups over eager are compared: the best is rebuilt
    only if it is still the best when the search ends, never beside the challenger.
    """
    aside = selector.set_aside
    best = None if aside is not None else selector.best
    names = list(dict.fromkeys(n for n in ("eager", best, challenger) if n is not None))
    inputs = selector.component.example_inputs
    calls = {name: _call(selector.stages[name], inputs) for name in names}
    remaining = max(1.0, selector.budget_s - (time.perf_counter() - selector.started))
    timed = time.perf_counter()
    timings = measure_interleaved(calls, budget_s=remaining)
    log.debug(
        "%s: timed %s in %.1f s (%s)",
        selector.component.name,
        ", ".join(names),
        time.perf_counter() - timed,
        ", ".join(f"{n} {len(t.samples)} x {t.p50 * 1e3:.1f} ms" for n, t in timings.items()),
    )
    _record_timings(selector, timings)
    if challenger is None or challenger == "eager":
        return
    if aside is not None:
        faster = _beats(_result(selector, challenger), _result(selector, aside.name))
        loser = "eager" if faster else challenger
        if faster:
            selector.best, selector.set_aside = challenger, None
    elif selector.best == "eager" or timings[challenger].p50 < timings[selector.best].p50:
        loser, selector.best = selector.best, challenger
    else:
        loser = challenger
    if loser != "eager":
        _close_trial(selector.stages.pop(loser))
        release_memory()


def _beats(challenger: CandidateResult, best: CandidateResult) -> bool:
    """Whether ``challenger``, timed in a duel of its own, beats the ``best`` set aside while it ran.

    Their speed-ups over eager come from two duels, and eager's own time can move between them: other
    load on the host, or its weights paged out while a large challenger held the memory (seen in a
    1.5 GiB cgroup: eager 4x slower beside one candidate, whose speed-up looked 2.6x the best's while
    it ran 1.5x slower). So the challenger must be faster both by its speed-up and by its own time.
    """
    quicker = (challenger.p50_ms or float("inf")) < (best.p50_ms or float("inf"))
    return quicker and (challenger.speedup or 0.0) > (best.speedup or 0.0)


def _record_timings(selector: _Selector, timings: dict[str, Any]) -> None:
    eager_p50 = timings["eager"].p50
    for name, timing in timings.items():
        result = _result(selector, name)
        result.p50_ms = timing.p50 * 1e3
        result.p95_ms = timing.quantile(0.95) * 1e3
        result.p99_ms = timing.quantile(0.99) * 1e3
        if selector.component.audio_seconds:
            result.real_time_factor = timing.p50 / selector.component.audio_seconds
        result.speedup = eager_p50 / timing.p50


def _call(stage: Stage, inputs: tuple[Any, ...]) -> Any:
    def run() -> Any:
        with torch.inference_mode():
            return stage(*inputs)

    return run


def _winner(selector: _Selector) -> str:
    """The best survivor when it beats eager by ``min_speedup`` in its last interleaved timing."""
    if selector.best == "eager":
        return "eager"
    speedup = _result(selector, selector.best).speedup or 0.0
    return selector.best if speedup >= selector.context.settings.min_speedup else "eager"


@contextmanager
def _progress(total: int, label: str) -> Iterator[Any]:
    import sys

    if not sys.stderr.isatty():
        yield lambda name: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task(label, total=total)

        def advance(name: str) -> None:
            progress.update(task, advance=1, description=f"{label}: {name}")

        yield advance


def _load_decision(context: BuildContext, key: str) -> dict[str, Any] | None:
    if context.cache is None:
        return None
    with context.cache.pinned():
        entry = context.cache.get(key)
        if entry is None:
            return None
        try:
            decision = json.loads((entry.path / "decision.json").read_text())
        except (OSError, ValueError):
            decision = None
    if not isinstance(decision, dict):
        context.cache.remove(key)
        return None
    return decision


def _searched_enough(decision: dict[str, Any], context: BuildContext) -> bool:
    """A partial decision serves budgets up to the one it had; a complete one serves any budget."""
    if not decision.get("search_cut_short"):
        return True
    budget = context.settings.search_budget_s
    if budget <= float(decision.get("search_budget_s", 0.0)):
        return True
    log.info(
        "%s: the stored decision was cut short by its %.0f s search budget; searching again with %.0f s",
        decision.get("component"),
        float(decision.get("search_budget_s", 0.0)),
        budget,
    )
    return False


def _store_decision(context: BuildContext, key: str, component: Component, report: ComponentReport) -> None:
    if context.cache is None:
        return
    payload = {**report.to_dict(), "search_budget_s": context.settings.search_budget_s}

    def write(directory: Any) -> None:
        (directory / "decision.json").write_text(json.dumps(payload, indent=1))

    context.cache.remove(key)
    context.cache.get_or_build(
        key, write, kind="decision", description={"component": component.name, "chosen": report.chosen}
    )


def budget_part(budget_s: float, spent_s: float, searches_left: int) -> float:
    """The part of an engine's search budget the next of ``searches_left`` searches gets.

    An equal part of what is left, so what one search leaves unspent goes to the ones after it.
    """
    return max(0.0, budget_s - spent_s) / max(1, searches_left)


def optimize_component(
    component: Component, context: BuildContext, pm: pluggy.PluginManager, budget_s: float
) -> ComponentReport:
    """Pick the stage for ``component`` according to ``context.settings.mode``.

    Auto mode's search takes at most ``budget_s`` (its part of the engine's budget: :func:`budget_part`).
    Its eager weights are parked first where memory is short (see :mod:`uniopt.parked`).
    """
    parking = park_for_room(component.module, component.key(), context.cache, context.settings.park_weights)
    report = _optimize_component(component, context, pm, budget_s)
    report.parked_bytes, report.parked = parking.parked_bytes, parking.note
    return report


def _optimize_component(
    component: Component, context: BuildContext, pm: pluggy.PluginManager, budget_s: float
) -> ComponentReport:
    registered = candidates(pm)
    selector = _Selector(component, context, pm, budget_s)
    ordered = _ordered(registered, component, context)
    usable = []
    for cand in ordered:
        ok, why = availability(cand, context.profile, context.settings, context.tier)
        if ok:
            usable.append(cand)
        else:
            selector.reject(cand.name, f"not available: {why}")
    if context.settings.mode != "auto":
        return _search(selector, usable)
    key = _decision_key(component, context, [c.name for c in usable])
    if not context.settings.reuse_decisions or context.cache is None:
        return _search_and_store(selector, usable, key)
    seen: list[dict[str, Any]] = []

    def reuse() -> ComponentReport | None:
        """Apply the stored decision, unless it is missing, too partial, or the one that failed already."""
        decision = _load_decision(context, key)
        if decision is None or decision in seen or not _searched_enough(decision, context):
            return None
        seen.append(decision)
        return _apply_decision(selector, registered, decision)

    report = reuse()
    if report is not None:
        return report
    with _deciding(context, key, component.name):
        # Another process may have decided while this one waited for the lock.
        return reuse() or _search_and_store(selector, usable, key)


@contextmanager
def _deciding(context: BuildContext, key: str, name: str) -> Iterator[None]:
    """Hold the decision lock for ``key`` while this process searches and stores its decision.

    When another process holds it, wait for it (its decision is then there to apply), at most
    the search and compile budgets plus :data:`DECISION_WAIT_MARGIN_S`; after that, go on without it.
    """
    assert context.cache is not None
    s = context.settings
    lock = context.cache.lock(f"{key}.decide", timeout=0)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        wait = s.search_budget_s + s.compile_budget_s + DECISION_WAIT_MARGIN_S
        log.info("%s: another process is measuring it; waiting up to %.0f s for its decision", name, wait)
        try:
            lock.acquire(timeout=wait)
        except Timeout:
            log.warning("%s: no decision from the other process after %.0f s; measuring here", name, wait)
    except OSError as exc:  # correctness never depends on the lock
        log.info("%s: deciding without the decision lock (%s)", name, exc)
    try:
        yield
    finally:
        if lock.is_locked:
            with suppress(OSError):
                lock.release()


def _search_and_store(selector: _Selector, usable: list[Candidate], key: str) -> ComponentReport:
    report = _search(selector, usable)
    _store_decision(selector.context, key, selector.component, report)
    return report


def _search(selector: _Selector, usable: list[Candidate]) -> ComponentReport:
    """Tier mode: the first candidate that passes. Auto mode: time the survivors, keep the fastest."""
    component, context = selector.component, selector.context
    selector.started = time.perf_counter()  # the budget is the search's, not a wait for another's decision
    if context.settings.mode == "auto":
        log.info("%s: searching within %.0f s", component.name, selector.budget_s)
    with _progress(len(usable), f"optimizing {component.name}") as advance:
        for cand in usable:
            refusal = selector.budget_refusal() if context.settings.mode == "auto" and cand.name != "eager" else None
            if refusal is not None:
                selector.reject(cand.name, refusal)
                continue
            advance(cand.name)
            if context.settings.mode == "auto" and not selector.build_beside_best(cand):
                selector.put_best_aside({c.name: c for c in usable})
            started = time.perf_counter()
            trial = context.settings.mode == "auto" and cand.name != "eager"
            stage = selector.try_candidate(cand, trial=trial)
            if stage is None and selector.refused_beside_best():
                # The estimates let it be built beside the best; a build step found less memory left.
                selector.results.pop()
                selector.put_best_aside({c.name: c for c in usable})
                stage = selector.try_candidate(cand, trial=trial)
            if stage is None:
                if selector.results[-1].reason.startswith(("guard:", "first call failed")):
                    selector.last_cost_s = time.perf_counter() - started
                continue
            if context.settings.mode == "tier":
                seconds = time.perf_counter() - selector.started
                return ComponentReport(component.name, cand.name, selector.results, stage=stage, search_seconds=seconds)
            selector.stages[cand.name] = stage
            del stage  # the selector alone holds it, so a loser is freed as soon as it loses
            if cand.name != "eager":
                _duel(selector, cand.name)
                selector.last_cost_s = time.perf_counter() - started
    if context.settings.mode == "tier":
        raise AssertionError("eager always passes its own guard")
    if selector.best == "eager":
        _duel(selector, None)
    chosen = _winner(selector)
    for name in [n for n in selector.stages if n not in ("eager", chosen)]:
        _close_trial(selector.stages.pop(name))
    selector.set_aside = None  # when it is the one chosen, it is built here below
    if chosen != "eager" and (chosen not in selector.stages or TRIAL_PROCESS in selector.stages[chosen].info):
        chosen = selector.install_in_process({c.name: c for c in usable}[chosen])
    report = ComponentReport(
        component.name,
        chosen,
        selector.results,
        stage=selector.stages[chosen],
        search_cut_short=selector.cut_short(),
        search_seconds=time.perf_counter() - selector.started,
    )
    selector.stages.clear()
    release_memory()
    return report


def _apply_decision(
    selector: _Selector, registered: dict[str, Candidate], decision: dict[str, Any]
) -> ComponentReport | None:
    """Rebuild the stored choice without timing; None when it no longer builds or validates."""
    chosen = decision["chosen"]
    if chosen not in registered:
        return None
    stage = selector.try_candidate(registered[chosen])
    if stage is None:
        return None
    stored = [CandidateResult(**c) for c in decision["candidates"]]
    for result in stored:
        if result.name == chosen:
            result.from_cache = bool(stage.info.get("from_cache"))
    cut_short = bool(decision.get("search_cut_short"))
    return ComponentReport(
        selector.component.name, chosen, stored, decision_from_cache=True, stage=stage, search_cut_short=cut_short
    )
