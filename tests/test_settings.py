"""Settings: every field's variable, precedence, sources, legacy names, tiers' defaults."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from uniopt.errors import SettingsError
from uniopt.settings import Settings, load_settings, resolve_settings
from uniopt.tiers import TIERS

GiB = 2**30

#: field -> (variable, a good value, what it parses to, a bad value or None when any text is allowed)
FIELDS: dict[str, tuple[str, str, Any, str | None]] = {
    "mode": ("UNIOPT_MODE", " TIER ", "tier", "fast"),
    "tier": ("UNIOPT_TIER", "cpu-avx2", "cpu-avx2", "gpu-huge"),
    "allow": ("UNIOPT_ALLOW", "openvino, onnxruntime-fp32", ("openvino", "onnxruntime-fp32"), None),
    "deny": ("UNIOPT_DENY", "torch-compile,", ("torch-compile",), None),
    "cache_dir": ("UNIOPT_CACHE_DIR", "/var/cache/uniopt", "/var/cache/uniopt", None),
    "cache_bundle": ("UNIOPT_CACHE_BUNDLE", "/opt/uniopt-bundle", "/opt/uniopt-bundle", None),
    "cache_size_limit": ("UNIOPT_CACHE_SIZE_LIMIT", "2GiB", 2 * GiB, "lots"),
    "threads": ("UNIOPT_THREADS", "3", 3, "0"),
    "atol": ("UNIOPT_ATOL", "1e-5", 1e-5, "-1e-5"),
    "rtol": ("UNIOPT_RTOL", "0.001", 0.001, "tight"),
    "min_speedup": ("UNIOPT_MIN_SPEEDUP", "1.2", 1.2, "0"),
    "search_budget_s": ("UNIOPT_SEARCH_BUDGET", "90", 90.0, "ten"),
    "plugins": ("UNIOPT_PLUGINS", "eager, build", ("eager", "build"), None),
    "compile_mode": ("UNIOPT_COMPILE_MODE", "max-autotune", "max-autotune", "fastest"),
    "compile_budget_s": ("UNIOPT_COMPILE_BUDGET", "30", 30.0, "0"),
    "reuse_decisions": ("UNIOPT_REUSE_DECISIONS", "false", False, "sometimes"),
    "use_model_quantization": ("USE_MODEL_QUANTIZATION", "false", False, "maybe"),
    "use_model_compilation": ("USE_MODEL_COMPILATION", "0", False, "2"),
    "use_fast_models": ("USE_FAST_MODELS", "No", False, "nope"),
    "use_optimized_phoneme_model": ("USE_OPTIMIZED_PHONEME_MODEL", "off", False, "disabled"),
    "model_warmup_runs": ("MODEL_WARMUP_RUNS", "0", 0, "-1"),
    "enable_performance_logging": ("ENABLE_PERFORMANCE_LOGGING", "yes", True, "y"),
    "fallback_on_optimization_error": ("FALLBACK_ON_OPTIMIZATION_ERROR", "FALSE", False, "ture"),
    "isolate_builds": ("UNIOPT_ISOLATE_BUILDS", "false", False, "sandboxed"),
    "park_weights": ("UNIOPT_PARK_WEIGHTS", "Yes", "true", "sometimes"),
    "trial_processes": ("UNIOPT_TRIAL_PROCESSES", "0", False, "separately"),
}


def test_the_table_covers_every_setting() -> None:
    described = {name: env for name, env, _help, _default in Settings.describe()}
    assert described == {name: row[0] for name, row in FIELDS.items()}


def test_describe_has_help_and_true_defaults() -> None:
    defaults = Settings()
    envs = [env for _name, env, _help, _default in Settings.describe()]
    assert len(envs) == len(set(envs))
    for name, env, help_text, default in Settings.describe():
        assert env == env.upper() and help_text
        assert getattr(defaults, name) == default


def test_defaults_in_a_clean_environment() -> None:
    settings = load_settings(environ={}, env_file=None)
    assert settings == Settings()
    assert set(settings.sources.values()) == {"default"}
    assert (settings.mode, settings.tier, settings.allow, settings.plugins) == ("auto", None, None, None)


@pytest.mark.parametrize("name", list(FIELDS))
def test_field_parses_its_variable(name: str) -> None:
    env, good, expected, _bad = FIELDS[name]
    settings = load_settings(environ={env: good}, env_file=None)
    assert getattr(settings, name) == expected
    assert settings.sources[name] == "environment"
    others = {k for k, v in settings.sources.items() if v != "default"}
    assert others == {name}


@pytest.mark.parametrize("name", [n for n, row in FIELDS.items() if row[3] is not None])
def test_field_rejects_a_bad_value(name: str) -> None:
    env, _good, _expected, bad = FIELDS[name]
    assert bad is not None
    with pytest.raises(SettingsError) as info:
        load_settings(environ={env: bad}, env_file=None)
    message = str(info.value)
    assert env in message and repr(bad) in message
    assert "environment" in message  # says where the bad value came from
    assert "expected" in message and info.value.allowed
    assert info.value.value == bad


def test_bad_value_in_env_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MODEL_WARMUP_RUNS=several\n")
    with pytest.raises(SettingsError, match=r"MODEL_WARMUP_RUNS='several' \(from \.env\).*integer"):
        load_settings(environ={})


def test_bad_string_argument_is_rejected() -> None:
    with pytest.raises(SettingsError, match=r"UNIOPT_MODE='fast' \(from argument\).*auto or tier or off"):
        load_settings({"mode": "fast"}, environ={}, env_file=None)


def test_unknown_argument_is_rejected() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"use_quantisation": True}, environ={}, env_file=None)
    assert "use_quantisation" in str(info.value)
    assert "use_model_quantization" in str(info.value)  # lists the real names


def test_typed_arguments_are_taken_as_they_are() -> None:
    settings = load_settings({"threads": 4, "allow": ("eager",)}, environ={"UNIOPT_THREADS": "2"}, env_file=None)
    assert (settings.threads, settings.allow) == (4, ("eager",))
    assert settings.sources["threads"] == settings.sources["allow"] == "argument"


def test_precedence(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MODEL_WARMUP_RUNS=3\n")
    tier = {"model_warmup_runs": 1}
    env = {"MODEL_WARMUP_RUNS": "4"}
    layers = [
        (load_settings({"model_warmup_runs": "5"}, environ=env, tier_defaults=tier), 5, "argument"),
        (load_settings(environ=env, tier_defaults=tier), 4, "environment"),
        (load_settings(environ={}, tier_defaults=tier), 3, ".env"),
        (load_settings(environ={}, env_file=None, tier_defaults=tier), 1, "tier"),
        (load_settings(environ={}, env_file=None), 2, "default"),
    ]
    for settings, value, source in layers:
        assert (settings.model_warmup_runs, settings.sources["model_warmup_runs"]) == (value, source)


def test_env_file_does_not_change_the_environment(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("UNIOPT_MIN_SPEEDUP=1.5\n")
    assert load_settings().min_speedup == 1.5  # the real os.environ and ./.env
    assert "UNIOPT_MIN_SPEEDUP" not in os.environ


def test_env_file_from_another_path(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "uniopt.env"
    path.parent.mkdir()
    path.write_text("UNIOPT_ATOL=0.5\n")
    assert load_settings(environ={}, env_file=path).atol == 0.5
    assert load_settings(environ={}, env_file=tmp_path / "missing.env").atol == Settings().atol


def test_sources_record_every_setting(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("USE_FAST_MODELS=false\n")
    settings = load_settings({"mode": "off"}, environ={"UNIOPT_THREADS": "2"}, tier_defaults={"search_budget_s": 60.0})
    assert set(settings.sources) == set(FIELDS)
    assert {k: v for k, v in settings.sources.items() if v != "default"} == {
        "mode": "argument",
        "threads": "environment",
        "use_fast_models": ".env",
        "search_budget_s": "tier",
    }
    # sources do not take part in equality: the same values from elsewhere are the same settings
    assert settings == dataclasses.replace(settings, sources={})


def test_legacy_variable_names_from_env_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "# the engines' own .env, unchanged\n"
        "USE_MODEL_QUANTIZATION=false\n"
        "USE_MODEL_COMPILATION=False\n"
        "USE_FAST_MODELS=0\n"
        "USE_OPTIMIZED_PHONEME_MODEL=no\n"
        "MODEL_WARMUP_RUNS=5\n"
        "ENABLE_PERFORMANCE_LOGGING=true\n"
        "FALLBACK_ON_OPTIMIZATION_ERROR=false\n"
        "SOME_OTHER_ENGINE_SETTING=whatever\n"
    )
    settings = load_settings(environ={})
    assert settings.use_model_quantization is False
    assert settings.use_model_compilation is False
    assert settings.use_fast_models is False
    assert settings.use_optimized_phoneme_model is False
    assert settings.model_warmup_runs == 5
    assert settings.enable_performance_logging is True
    assert settings.fallback_on_optimization_error is False
    assert all(
        settings.sources[k] == ".env"
        for k in (
            "use_model_quantization",
            "use_model_compilation",
            "use_fast_models",
            "use_optimized_phoneme_model",
            "model_warmup_runs",
            "enable_performance_logging",
            "fallback_on_optimization_error",
        )
    )


@pytest.mark.parametrize("name", [t.name for t in TIERS])
def test_tier_accepts_every_known_name(name: str) -> None:
    assert load_settings(environ={"UNIOPT_TIER": name}, env_file=None).tier == name


def test_tier_rejects_other_names_and_lists_the_choices() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(environ={"UNIOPT_TIER": "avx512"}, env_file=None)
    for tier in TIERS:
        assert tier.name in str(info.value)


def test_empty_tier_means_detect() -> None:
    assert load_settings(environ={"UNIOPT_TIER": ""}, env_file=None).tier is None


def test_empty_plugin_list_means_none_and_unset_means_all() -> None:
    assert load_settings(environ={"UNIOPT_PLUGINS": ""}, env_file=None).plugins == ()
    assert load_settings(environ={}, env_file=None).plugins is None


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("2GiB", 2 * GiB),
        ("500MB", 500_000_000),
        ("1.5 GiB", 3 * GiB // 2),
        ("64kib", 65536),
        ("10gb", 10_000_000_000),
        ("1048576", 1048576),
        ("512b", 512),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert load_settings(environ={"UNIOPT_CACHE_SIZE_LIMIT": text}, env_file=None).cache_size_limit == size


@pytest.mark.parametrize("text", ["2TB", "GiB", "-1GiB", "2 GiB of disk", ""])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(SettingsError, match="UNIOPT_CACHE_SIZE_LIMIT.*2GiB, 500MB"):
        load_settings(environ={"UNIOPT_CACHE_SIZE_LIMIT": text}, env_file=None)


# -- resolve_settings: the tier's defaults -------------------------------------------------------


def test_resolve_applies_the_tier_defaults(make_profile) -> None:
    settings, choice = resolve_settings(profile=make_profile(usable_cpus=1.3))
    assert choice.tier.name == "low-resource"
    for name, value in choice.tier.setting_defaults.items():
        assert getattr(settings, name) == value
        assert settings.sources[name] == "tier"
    assert settings.use_model_compilation is False


def test_environment_wins_over_the_tier(make_profile, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USE_MODEL_COMPILATION", "true")
    settings, choice = resolve_settings(profile=make_profile(usable_cpus=1.3))
    assert choice.tier.name == "low-resource"
    assert settings.use_model_compilation is True
    assert settings.sources["use_model_compilation"] == "environment"
    assert settings.model_warmup_runs == 1  # the tier's other defaults still apply


def test_env_file_and_argument_win_over_the_tier(make_profile, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MODEL_WARMUP_RUNS=4\n")
    settings, _ = resolve_settings({"search_budget_s": 10.0}, make_profile(usable_cpus=1.3))
    assert (settings.model_warmup_runs, settings.sources["model_warmup_runs"]) == (4, ".env")
    assert (settings.search_budget_s, settings.sources["search_budget_s"]) == (10.0, "argument")


def test_forced_tier_decides_the_defaults(make_profile, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIOPT_TIER", "cpu-avx512")
    settings, choice = resolve_settings(profile=make_profile(usable_cpus=1.3))
    assert choice.tier.name == "cpu-avx512" and "UNIOPT_TIER" in choice.reason
    assert settings.use_model_compilation is True
    assert settings.sources["use_model_compilation"] == "default"


def test_tier_from_argument(make_profile) -> None:
    settings, choice = resolve_settings({"tier": "low-resource"}, make_profile(usable_cpus=64))
    assert choice.tier.name == "low-resource" and settings.use_model_compilation is False


def test_bad_environment_fails_resolve(make_profile, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIOPT_THREADS", "many")
    with pytest.raises(SettingsError, match="UNIOPT_THREADS"):
        resolve_settings(profile=make_profile())


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().mode = "off"  # type: ignore[misc]


def test_typed_arguments_are_checked_like_text() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({"threads": 0})
    assert info.value.variable == "UNIOPT_THREADS" and info.value.origin == "argument"
    assert load_settings({"threads": 3, "allow": ["openvino", "torch-int8"]}).allow == ("openvino", "torch-int8")
    assert load_settings({"allow": ""}).allow is None
