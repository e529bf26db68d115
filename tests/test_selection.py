"""Auto and tier selection with fake candidates of known speed and accuracy."""

from __future__ import annotations

import gc
import json
import logging
import subprocess
import sys
import time
import types
from typing import Any, NamedTuple

import pytest
import torch

from uniopt import Component, Metric, UniversalOptimizer
from uniopt.cache import ArtifactCache
from uniopt.errors import OptimizationError, ValidationError
from uniopt.optimizer.timing import measure_interleaved
from uniopt.plugins import DEFAULT_PLUGINS, Candidate, Requirements, Stage, hookimpl
from uniopt.plugins import manager as plugin_manager_module
from uniopt.plugins.model_cache import model_cache

EAGER_SLEEP = 0.012


class SlowNet(torch.nn.Module):
    """Eager takes a known time: it sleeps, then computes a fixed function."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.linear = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(EAGER_SLEEP)
        return self.linear(x)


def _fake(
    name: str,
    seconds: float,
    *,
    wrong: bool = False,
    precision: str = "fp32",
    fails: bool = False,
    counter: dict[str, int] | None = None,
) -> Candidate:
    def build(component: Any, context: Any) -> Stage:
        if fails:
            raise RuntimeError(f"{name} cannot be built here")
        module = component.module

        def run(x: torch.Tensor) -> torch.Tensor:
            if counter is not None:
                counter[name] = counter.get(name, 0) + 1
            time.sleep(seconds)
            with torch.no_grad():
                out = module.linear(x)
            return out + 1.0 if wrong else out

        return Stage(name, run)

    return Candidate(name, "fake", f"fake {name}", build, Requirements(precision=precision))


@pytest.fixture
def fake_plugins(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Register a fake plugin (as a built-in) offering the given candidates; real backends off."""
    model_cache.clear()

    def install(*cands: Candidate) -> None:
        module = types.ModuleType("uniopt_fake_plugin")

        @hookimpl
        def uniopt_register_candidates(register: Any) -> None:
            for cand in cands:
                register(cand)

        module.uniopt_register_candidates = uniopt_register_candidates  # type: ignore[attr-defined]
        monkeypatch.setitem(__import__("sys").modules, "uniopt_fake_plugin", module)
        builtins = [(n, m) for n, m in DEFAULT_PLUGINS if n in ("build", "fallback", "warmup", "eager")]
        monkeypatch.setattr(plugin_manager_module, "DEFAULT_PLUGINS", (*builtins, ("fake", "uniopt_fake_plugin")))
        monkeypatch.setenv("UNIOPT_PLUGINS", ",".join(n for n, _ in builtins) + ",fake")

    yield install
    model_cache.clear()


def _optimize(module: torch.nn.Module, tmp_path: Any, **settings: Any) -> UniversalOptimizer:
    settings.setdefault("model_warmup_runs", 1)
    return UniversalOptimizer(module, (torch.randn(2, 8),), cache_dir=str(tmp_path / "cache"), **settings)


def test_fastest_candidate_that_passes_the_guard_wins(fake_plugins: Any, tmp_path: Any) -> None:
    fake_plugins(_fake("fast", 0.002), _fake("fastest-wrong", 0.0005, wrong=True), _fake("slower", 0.020))
    opt = _optimize(SlowNet(), tmp_path)
    report = opt.report().component("module")
    assert report.chosen == "fast"
    wrong = report.candidate("fastest-wrong")
    assert not wrong.accepted and wrong.reason.startswith("guard:")
    assert report.candidate("slower").speedup < 1.0
    assert report.candidate("fast").speedup > 2.0
    x = torch.randn(3, 8)
    assert torch.allclose(opt(x), opt.engine(x)) and torch.allclose(opt(x), SlowNet()(x))


def test_reduced_precision_is_judged_by_the_component_metric(fake_plugins: Any, tmp_path: Any) -> None:
    fake_plugins(_fake("int8ish", 0.002, wrong=True, precision="int8"))
    module = SlowNet()
    component = Component("module", module, (torch.randn(2, 8),), metric=Metric("cosine", 0.99999))
    engine = types.SimpleNamespace(module=module, uniopt_components=lambda: [component])
    report = UniversalOptimizer(engine, cache_dir=str(tmp_path), model_warmup_runs=0).report().component("module")
    result = report.candidate("int8ish")
    assert not result.accepted and result.metric == "cosine" and result.metric_value < 0.99999
    assert report.chosen == "eager"


def test_eager_stays_when_no_candidate_beats_the_margin(fake_plugins: Any, tmp_path: Any) -> None:
    fake_plugins(_fake("barely", EAGER_SLEEP * 0.97))
    report = _optimize(SlowNet(), tmp_path, min_speedup=1.5).report().component("module")
    assert report.candidate("barely").accepted
    assert report.chosen == "eager"


def test_search_budget_skips_remaining_candidates(fake_plugins: Any, tmp_path: Any) -> None:
    fake_plugins(_fake("first", 0.001), _fake("second", 0.001))
    slow_build = _fake("first", 0.001)

    def build(component: Any, context: Any) -> Stage:
        time.sleep(0.3)
        return slow_build.build(component, context)

    fake_plugins(Candidate("first", "fake", "slow to build", build), _fake("second", 0.001))
    gc.collect()  # a full collection of this process's heap takes ~0.25 s on a 2-vCPU host: not inside the budget
    report = _optimize(SlowNet(), tmp_path, search_budget_s=0.2).report().component("module")
    assert report.candidate("second").reason == "search budget spent"
    assert report.candidate("first").accepted


def _slow_build(name: str, seconds: float) -> Candidate:
    fast = _fake(name, 0.001)

    def build(component: Any, context: Any) -> Stage:
        time.sleep(seconds)
        return fast.build(component, context)

    return Candidate(name, "fake", f"{seconds} s to build", build)


def test_an_engines_components_share_one_search_budget(fake_plugins: Any, tmp_path: Any) -> None:
    """Each search gets an equal part of what is left: the first half the budget, the second the rest."""
    fake_plugins(*(_slow_build(name, 0.5) for name in ("first", "second", "third")))
    first, second = SlowNet(0), SlowNet(1)
    components = [Component(n, m, (torch.randn(2, 8),)) for n, m in (("first", first), ("second", second))]
    engine = types.SimpleNamespace(first=first, second=second, uniopt_components=lambda: components)
    gc.collect()
    reports = UniversalOptimizer(
        engine, cache_dir=str(tmp_path), mode="auto", model_warmup_runs=1, search_budget_s=2.0
    ).report()
    before, after = reports.component("first"), reports.component("second")
    # 1 s for the first: after one 0.5 s build, what is left cannot hold another.
    assert before.candidate("first").accepted
    assert before.candidate("second").reason.startswith("search budget")
    # The second gets the rest (~1.4 s): two builds, then no room for a third.
    assert after.candidate("first").accepted and after.candidate("second").accepted
    assert after.candidate("third").reason.startswith("search budget")
    assert before.search_seconds + after.search_seconds < 2.0 + 0.6  # one build past the budget at most


def test_build_failure_is_recorded_and_can_be_raised(fake_plugins: Any, tmp_path: Any) -> None:
    fake_plugins(_fake("broken", 0.001, fails=True))
    report = _optimize(SlowNet(), tmp_path).report().component("module")
    reason = report.candidate("broken").reason
    assert reason.startswith("build failed:") and "cannot be built here" in reason
    assert report.chosen == "eager"
    with pytest.raises(OptimizationError) as info:
        _optimize(SlowNet(), tmp_path, fallback_on_optimization_error=False)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_guard_failure_raises_when_fallback_is_off(fake_plugins: Any, tmp_path: Any) -> None:
    fake_plugins(_fake("wrong", 0.001, wrong=True))
    with pytest.raises(ValidationError, match="wrong"):
        _optimize(SlowNet(), tmp_path, fallback_on_optimization_error=False)


def test_decision_is_cached_and_applied_without_timing(fake_plugins: Any, tmp_path: Any) -> None:
    calls: dict[str, int] = {}
    fake_plugins(_fake("fast", 0.002, counter=calls))
    first = _optimize(SlowNet(), tmp_path, model_warmup_runs=0).report().component("module")
    assert first.chosen == "fast" and not first.decision_from_cache
    model_cache.clear()
    calls.clear()
    second = _optimize(SlowNet(), tmp_path, model_warmup_runs=0).report().component("module")
    assert second.chosen == "fast" and second.decision_from_cache
    assert calls["fast"] == 1  # the validation call only: nothing was timed


def test_decision_is_invalidated_by_weights_and_settings(fake_plugins: Any, tmp_path: Any) -> None:
    fake_plugins(_fake("fast", 0.002))
    assert not _optimize(SlowNet(seed=0), tmp_path).report().component("module").decision_from_cache
    model_cache.clear()
    assert not _optimize(SlowNet(seed=1), tmp_path).report().component("module").decision_from_cache
    model_cache.clear()
    assert not _optimize(SlowNet(seed=0), tmp_path, min_speedup=1.2).report().component("module").decision_from_cache
    model_cache.clear()
    assert _optimize(SlowNet(seed=0), tmp_path).report().component("module").decision_from_cache


def test_decision_key_covers_compile_and_warm_up_settings(fake_plugins: Any, tmp_path: Any) -> None:
    fake_plugins(_fake("fast", 0.002))
    assert not _optimize(SlowNet(), tmp_path).report().component("module").decision_from_cache
    for changed in ({"compile_mode": "max-autotune"}, {"compile_budget_s": 30.0}, {"model_warmup_runs": 3}):
        model_cache.clear()
        report = _optimize(SlowNet(), tmp_path, **changed).report().component("module")
        assert not report.decision_from_cache, f"{changed} reused a decision made without it"
    model_cache.clear()
    assert _optimize(SlowNet(), tmp_path).report().component("module").decision_from_cache


def _slow_first(fake_plugins: Any) -> None:
    """Two candidates; building the first takes 0.3 s, so a 0.2 s budget skips the second."""
    slow_build = _fake("first", 0.001)

    def build(component: Any, context: Any) -> Stage:
        time.sleep(0.3)
        return slow_build.build(component, context)

    fake_plugins(Candidate("first", "fake", "slow to build", build), _fake("second", 0.001))


def test_a_candidate_the_budget_left_cannot_hold_is_not_started(fake_plugins: Any, tmp_path: Any) -> None:
    slow_build = _fake("first", 0.001)

    def build(component: Any, context: Any) -> Stage:
        time.sleep(1.5)
        return slow_build.build(component, context)

    fake_plugins(Candidate("first", "fake", "slow to build", build), _fake("second", 0.001))
    gc.collect()
    report = _optimize(SlowNet(), tmp_path, search_budget_s=2.5).report().component("module")
    assert report.candidate("first").accepted
    # ~1 s of the budget is left after the first took ~1.5 s: the second is predicted not to fit
    reason = report.candidate("second").reason
    assert reason.startswith("search budget:") and "the last candidate took" in reason, reason
    assert report.search_cut_short


def test_the_reference_and_guard_calls_count_as_warm_up(fake_plugins: Any, tmp_path: Any) -> None:
    fake_plugins(_fake("checked", 2 * EAGER_SLEEP))
    once = _optimize(SlowNet(), tmp_path / "once", model_warmup_runs=1).report().component("module")
    assert once.candidate("eager").warmup_seconds < EAGER_SLEEP  # no call: its reference call was its first
    assert once.candidate("checked").warmup_seconds < EAGER_SLEEP  # no call: the guard's call was its first
    model_cache.clear()
    twice = _optimize(SlowNet(), tmp_path / "twice", model_warmup_runs=2).report().component("module")
    assert twice.candidate("eager").warmup_seconds >= EAGER_SLEEP  # one warm-up call left to make
    assert twice.candidate("checked").warmup_seconds >= 2 * EAGER_SLEEP
    assert twice.candidate("checked").accepted and once.candidate("checked").accepted


def _decision_file(cache: Any) -> dict[str, Any]:
    from uniopt.cache import ArtifactCache

    (entry,) = [e for e in ArtifactCache(cache).entries() if e.kind == "decision"]
    return json.loads((entry.path / "decision.json").read_text())


def test_a_decision_cut_short_by_its_budget_is_searched_again_with_a_larger_one(
    fake_plugins: Any, tmp_path: Any
) -> None:
    _slow_first(fake_plugins)
    gc.collect()
    short = _optimize(SlowNet(), tmp_path, search_budget_s=0.2).report().component("module")
    assert short.search_cut_short and short.candidate("second").reason == "search budget spent"
    stored = _decision_file(tmp_path / "cache")
    assert stored["search_cut_short"] is True and stored["search_budget_s"] == 0.2
    model_cache.clear()
    again = _optimize(SlowNet(), tmp_path, search_budget_s=0.2).report().component("module")
    assert again.decision_from_cache and again.search_cut_short, "the same budget would not get further"
    model_cache.clear()
    larger = _optimize(SlowNet(), tmp_path, search_budget_s=60).report().component("module")
    assert not larger.decision_from_cache, "a larger budget searches again"
    assert not larger.search_cut_short and larger.candidate("second").accepted
    assert _decision_file(tmp_path / "cache")["search_cut_short"] is False
    model_cache.clear()
    for budget in (0.2, 60, 600):  # a complete search serves every budget
        report = _optimize(SlowNet(), tmp_path, search_budget_s=budget).report().component("module")
        assert report.decision_from_cache and not report.search_cut_short
        model_cache.clear()


def test_a_process_that_cannot_get_the_decision_lock_searches_after_the_wait(
    fake_plugins: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process holds the decision lock and never decides: wait for the budgets, then measure."""
    import uniopt.optimizer.selection as selection
    from uniopt.cache import ArtifactCache

    fake_plugins(_fake("fast", 0.002))
    monkeypatch.setattr(selection, "DECISION_WAIT_MARGIN_S", 0.0)
    cache = tmp_path / "cache"
    taken: list[str] = []
    real_lock = ArtifactCache.lock

    def lock(self: ArtifactCache, name: str, timeout: float) -> Any:
        taken.append(name)
        return real_lock(self, name, timeout)

    monkeypatch.setattr(ArtifactCache, "lock", lock)
    budgets = {"search_budget_s": 0.5, "compile_budget_s": 0.5}
    _optimize(SlowNet(), tmp_path, **budgets)  # finds the lock's name
    (name,) = taken
    ArtifactCache(cache).remove(name.partition(".")[0])  # no decision stored: a cold cache again
    model_cache.clear()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(cache / "locks" / f"{name}.lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="uniopt"):
            report = _optimize(SlowNet(), tmp_path, **budgets).report()
        waited = time.monotonic() - started
    finally:
        holder.kill()
        holder.communicate()
    assert not report.component("module").decision_from_cache and report.component("module").chosen == "fast"
    assert waited >= 1.0, "it did not wait for the search and compile budgets"
    messages = [r.getMessage() for r in caplog.records]
    assert any("another process is measuring it" in m for m in messages), messages
    assert any("measuring here" in m for m in messages), messages


HOLD_LOCK = """
import sys, time
from filelock import FileLock
with FileLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_tier_mode_takes_the_first_passing_candidate_of_the_chain(fake_plugins: Any, tmp_path: Any) -> None:
    calls: dict[str, int] = {}
    # The low-resource and AVX-512 tiers put torch-int8 first for decoders; a fake stands in for it.
    fake_plugins(_fake("torch-int8", 0.005, wrong=True, counter=calls), _fake("torch-bf16", 0.005, counter=calls))
    module = SlowNet()
    component = Component("module", module, (torch.randn(2, 8),), kind="decoder")
    engine = types.SimpleNamespace(module=module, uniopt_components=lambda: [component])
    opt = UniversalOptimizer(engine, mode="tier", tier="cpu-avx512", cache_dir=str(tmp_path), model_warmup_runs=0)
    report = opt.report().component("module")
    assert report.chosen == "torch-bf16"
    assert report.candidate("torch-int8").reason.startswith("guard:")
    assert all(r.p50_ms is None for r in report.candidates)  # no timing in tier mode


def test_mode_off_leaves_the_engine_alone(fake_plugins: Any, tmp_path: Any) -> None:
    fake_plugins(_fake("fast", 0.001))
    module = SlowNet()
    opt = _optimize(module, tmp_path, mode="off")
    assert opt.engine is module and opt.report().components == []


def test_interleaving_rotates_order_and_stops_when_stable() -> None:
    order: list[str] = []
    now = [0.0]
    cost = {"a": 1.0, "b": 2.0, "c": 3.0}

    def call(name: str) -> Any:
        def run() -> None:
            order.append(name)
            now[0] += cost[name]

        return run

    timings = measure_interleaved(
        {n: call(n) for n in cost}, budget_s=1e9, min_rounds=3, stable_rounds=2, clock=lambda: now[0]
    )
    assert order[:6] == ["a", "b", "c", "b", "c", "a"]
    assert len(timings["a"].samples) == 3  # ranking stable from round 1: stops at min_rounds
    assert [timings[n].p50 for n in "abc"] == [1.0, 2.0, 3.0]


def test_interleaving_respects_the_budget() -> None:
    now = [0.0]

    def run() -> None:
        now[0] += 10.0

    timings = measure_interleaved({"a": run, "b": run}, budget_s=15.0, min_rounds=5, clock=lambda: now[0])
    assert len(timings["a"].samples) == 1  # one round always runs, then the budget is spent


def _rounds(cost: dict[str, float], **options: Any) -> dict[str, int]:
    """How many samples each call got from measure_interleaved, each call taking ``cost`` seconds on a fake clock."""
    now = [0.0]

    def call(name: str) -> Any:
        def run() -> None:
            now[0] += cost[name]

        return run

    timings = measure_interleaved({n: call(n) for n in cost}, budget_s=1e9, clock=lambda: now[0], **options)
    return {name: len(t.samples) for name, t in timings.items()}


def test_calls_within_the_tie_may_swap_without_more_rounds() -> None:
    now, calls = [0.0], [0]

    def a_cost() -> float:
        """Samples 1.00, 1.03, 0.99, 1.04, ...: a's median swaps places with b's 1.01 every round, 1.5% apart."""
        k, calls[0] = calls[0], calls[0] + 1
        return 1.03 + 0.01 * (k // 2) if k % 2 else 1.0 - 0.01 * (k // 2)

    cost = {"eager": lambda: 1.5, "a": a_cost, "b": lambda: 1.01}

    def call(name: str) -> Any:
        def run() -> None:
            now[0] += cost[name]()

        return run

    def samples(**options: Any) -> int:
        now[0], calls[0] = 0.0, 0
        timings = measure_interleaved({n: call(n) for n in cost}, budget_s=1e9, clock=lambda: now[0], **options)
        return len(timings["a"].samples)

    assert samples(min_rounds=3) == 3  # tied: the ranking holds from the first round on
    assert samples(min_rounds=3, tie=1.0) == 15  # no tie: they never settle, max_rounds ends it


def test_a_decisive_ranking_stops_after_two_rounds() -> None:
    assert _rounds({"eager": 10.0, "fast": 4.0}, min_rounds=5) == {"eager": 2, "fast": 2}  # 2.5x: no round changes it
    assert _rounds({"eager": 10.0, "fast": 4.0}, min_rounds=5, decisive_factor=3.0) == {"eager": 5, "fast": 5}


def test_measure_rounds_times_every_call_exactly_that_many_rounds() -> None:
    from uniopt.optimizer.timing import measure_rounds

    counts = {"eager": 0, "fast": 0, "slow": 0}
    sleep = {"eager": 0.01, "fast": 0.001, "slow": 0.05}  # decisive, and "slow" would be pruned

    def call(name: str) -> Any:
        def run() -> None:
            counts[name] += 1
            time.sleep(sleep[name])

        return run

    timings = measure_rounds({n: call(n) for n in counts}, 4)
    assert {name: len(t.samples) for name, t in timings.items()} == counts == dict.fromkeys(counts, 4)


def test_a_ranking_several_times_apart_stops_after_one_round() -> None:
    assert _rounds({"eager": 10.0, "fast": 2.0}, min_rounds=5) == {"eager": 1, "fast": 1}  # 5x apart
    # Every neighbour in the ranking must be that far apart: here the two candidates are not.
    assert _rounds({"eager": 10.0, "fast": 2.0, "close": 2.5}, min_rounds=5, stable_rounds=1) == dict.fromkeys(
        ("eager", "fast", "close"), 5
    )
    assert _rounds({"eager": 10.0, "fast": 2.0}, min_rounds=5, first_round_factor=None) == {"eager": 2, "fast": 2}


def test_clearly_slower_candidates_leave_the_rotation_but_eager_stays() -> None:
    now = [0.0]
    cost = {"eager": 10.0, "fast": 1.0, "slow": 5.0, "close": 1.5}
    counts = dict.fromkeys(cost, 0)

    def call(name: str) -> Any:
        def run() -> None:
            counts[name] += 1
            now[0] += cost[name]

        return run

    timings = measure_interleaved(
        {n: call(n) for n in cost}, budget_s=1e9, min_rounds=5, stable_rounds=10, clock=lambda: now[0]
    )
    assert counts["slow"] == 2  # pruned after round 2: 5x the best
    assert counts["eager"] == counts["fast"] == counts["close"] > 2
    assert timings["slow"].p50 == 5.0


STEPS = 12
TIE = [-5.0, 1.0, 0.99, -5.0, -5.0, -5.0]  # row 0: tokens 1 and 2 are a near-tie


def _table(**rows: list[float]) -> torch.Tensor:
    """Next-token logits by previous token: 0 -> 1 (or 2, a near-tie) -> 3/4 -> 0, decisively."""
    table = torch.full((6, 6), -5.0)
    table[0] = torch.tensor(TIE)
    for previous, following in ((1, 3), (2, 4), (3, 0), (4, 0), (5, 0)):
        table[previous, following] = 3.0
    for index, row in rows.items():
        table[int(index[1:])] = torch.tensor(row)
    return table


class ToyDecoder(torch.nn.Module):
    """Greedy ``argmax(table[previous])`` for STEPS tokens; with ``forced`` tokens, the logits behind each choice."""

    def __init__(self, table: torch.Tensor, sleep: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.sleep = sleep

    def forward(self, start: torch.Tensor, forced: torch.Tensor | None = None) -> torch.Tensor:
        time.sleep(self.sleep)
        if forced is not None:
            return self.table[torch.cat([start.view(1), forced[:-1]])]
        tokens, token = [], start
        for _ in range(STEPS):
            token = self.table[token].argmax()
            tokens.append(token)
        return torch.stack(tokens)


def _toy(name: str, table: torch.Tensor) -> Candidate:
    def build(component: Any, context: Any) -> Stage:
        return Stage(name, ToyDecoder(table))

    return Candidate(name, "fake", f"toy {name}", build, Requirements(precision="int8"))


def _decode(tmp_path: Any, *, forcing: bool) -> Any:
    module = ToyDecoder(_table(), sleep=EAGER_SLEEP)
    component = Component(
        "decoder",
        module,
        (torch.tensor(0),),
        metric=Metric("token_agreement", 0.9),
        teacher_forcing=(lambda inputs, tokens: (*inputs, tokens)) if forcing else None,
    )
    engine = types.SimpleNamespace(decoder=module, uniopt_components=lambda: [component])
    return UniversalOptimizer(engine, cache_dir=str(tmp_path), model_warmup_runs=0).report().component("decoder")


def test_teacher_forcing_forgives_a_flipped_tie_that_derails_free_running(fake_plugins: Any, tmp_path: Any) -> None:
    tie_flipped = _table(r0=[-5.0, 0.99, 1.0, -5.0, -5.0, -5.0])
    assert not torch.equal(ToyDecoder(tie_flipped)(torch.tensor(0)), ToyDecoder(_table())(torch.tensor(0)))
    fake_plugins(_toy("tie-flipped", tie_flipped))
    free = _decode(tmp_path / "free", forcing=False).candidate("tie-flipped")
    assert not free.accepted and free.metric_value < 0.5  # one early difference, every later token differs
    model_cache.clear()
    forced = _decode(tmp_path / "forced", forcing=True)
    assert forced.candidate("tie-flipped").accepted and forced.candidate("tie-flipped").metric_value == 1.0
    assert forced.chosen == "tie-flipped"


def test_teacher_forcing_still_rejects_a_flipped_decisive_choice(fake_plugins: Any, tmp_path: Any) -> None:
    fake_plugins(_toy("decisive-flipped", _table(r1=[-5.0, -5.0, -5.0, -5.0, -5.0, 3.0])))
    report = _decode(tmp_path, forcing=True)
    result = report.candidate("decisive-flipped")
    assert not result.accepted and result.metric == "token_agreement" and "teacher-forced" in result.reason
    assert result.metric_value == pytest.approx(0.5)  # rows 1 and 3 decide; row 1 now disagrees
    assert report.chosen == "eager"


def test_a_free_run_with_scores_makes_the_teacher_forced_reference_in_one_call_per_input() -> None:
    """Given ``free_run_with_scores``, the reference decodes each input once, with the same outputs and scores."""
    from uniopt.optimizer.references import compute_references

    calls: list[str] = []

    class Counted(ToyDecoder):
        def forward(self, start: torch.Tensor, forced: torch.Tensor | None = None) -> torch.Tensor:
            calls.append("forced" if forced is not None else "free")
            return super().forward(start, forced)

    def free_run_with_scores(module: Counted, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = module(start)
        return tokens, module.table[torch.cat([start.view(1), tokens[:-1]])]

    module, inputs = Counted(_table()), [(torch.tensor(0),), (torch.tensor(2),)]
    forcing = lambda inputs, tokens: (*inputs, tokens)  # noqa: E731
    no_cache = types.SimpleNamespace(cache=None)
    plain = Component("decoder", module, inputs[0], teacher_forcing=forcing)
    twice, _, _ = compute_references(plain, inputs, no_cache)
    assert calls == ["free", "forced", "free", "forced"]
    calls.clear()
    once, _, _ = compute_references(
        Component("decoder", module, inputs[0], teacher_forcing=forcing, free_run_with_scores=free_run_with_scores),
        inputs,
        no_cache,
    )
    assert calls == ["free", "free"]
    for ours, theirs in zip(once, twice, strict=True):
        assert ours.forced is not None and theirs.forced is not None
        assert torch.equal(ours.outputs, theirs.outputs)
        assert all(torch.equal(a, b) for a, b in zip(ours.forced[0], theirs.forced[0], strict=True))
        assert torch.equal(ours.forced[1], theirs.forced[1])


def test_eager_alone_runs_no_reference_pass(fake_plugins: Any, tmp_path: Any) -> None:
    """Tier mode that ends with eager calls the module not once: eager is its own reference."""

    class Counting(SlowNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls.append(1)  # a list the module's copies share, so every call counts
            return super().forward(x)

    fake_plugins()
    net = Counting()
    net.calls = []
    opt = _optimize(net, tmp_path, mode="tier", model_warmup_runs=0)
    assert opt.report().component("module").chosen == "eager"
    assert net.calls == []


class _CountingNet(SlowNet):
    """SlowNet counting its eager calls in a list its copies share."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(1)
        return super().forward(x)


def test_a_warm_start_validates_against_the_kept_reference_outputs(
    fake_plugins: Any, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fake_plugins(_fake("fast", 0.002))
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))

    def optimize() -> tuple[_CountingNet, Any]:
        model_cache.clear()
        net = _CountingNet()
        report = UniversalOptimizer(net, (x,), cache_dir=str(tmp_path), model_warmup_runs=0).report()
        return net, report.component("module")

    cold_net, cold = optimize()
    assert cold.chosen == "fast" and cold_net.calls  # the reference pass and the timing ran eager
    (kept,) = [e for e in ArtifactCache(tmp_path).entries() if e.kind == "reference"]
    warm_net, warm = optimize()
    assert warm.chosen == "fast" and warm.decision_from_cache
    assert warm_net.calls == [], "the warm start ran the eager module for its reference outputs"
    size = (kept.path / "references.pt").stat().st_size
    (kept.path / "references.pt").write_bytes(b"x" * size)  # the same size: only loading it tells
    with caplog.at_level(logging.WARNING, logger="uniopt"):
        damaged_net, damaged = optimize()
    assert damaged.chosen == "fast" and damaged_net.calls  # computed again, never trusted
    assert "references.pt" in caplog.text
    again_net, _ = optimize()
    assert again_net.calls == [], "the damaged entry was not written again"


def test_outputs_that_do_not_load_back_safely_are_not_kept(fake_plugins: Any, tmp_path: Any) -> None:
    class Named(NamedTuple):
        value: torch.Tensor

    class NamedOut(SlowNet):
        def forward(self, x: torch.Tensor) -> Any:
            return Named(super().forward(x))

    fake_plugins(_fake("fast", 0.002))
    opt = UniversalOptimizer(NamedOut(), (torch.randn(2, 8),), cache_dir=str(tmp_path), model_warmup_runs=0)
    assert not opt.report().component("module").candidate("fast").accepted  # judged against the reference
    kinds = {e.kind for e in ArtifactCache(tmp_path).entries()}
    assert "decision" in kinds and "reference" not in kinds
