"""Typed settings from arguments, the environment, a ``.env`` file and the tier.

Precedence, highest first: explicit argument > environment variable > ``.env`` file >
tier default > built-in default. The source projects' variable names (``USE_MODEL_QUANTIZATION``,
``MODEL_WARMUP_RUNS``, ...) are read as they are, so existing ``.env`` files keep working.
A value that cannot be parsed raises :class:`~uniopt.errors.SettingsError` naming the variable,
the value and what is allowed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dotenv import dotenv_values

from .errors import SettingsError

if TYPE_CHECKING:
    from .tiers import HostProfile, TierChoice

__all__ = ["MODES", "Settings", "load_settings", "resolve_settings"]

MODES = ("auto", "tier", "off")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


class _NotAllowed(ValueError):
    """A parser's own account of what is allowed."""


def _bool(value: str) -> bool:
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _NotAllowed("true or false (also 1/0, yes/no, on/off)")


def _mode(value: str) -> str:
    if value.strip().lower() not in MODES:
        raise _NotAllowed(" or ".join(MODES))
    return value.strip().lower()


def _compile_mode(value: str) -> str:
    modes = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    if value.strip() not in modes:
        raise _NotAllowed(", ".join(modes))
    return value.strip()


def _park(value: str) -> str:
    text = value.strip().lower()
    if text == "auto":
        return text
    return "true" if _bool(text) else "false"


def _names(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _optional_names(value: str) -> tuple[str, ...] | None:
    return _names(value) or None


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = int(value)
        if number < minimum:
            raise _NotAllowed(f"an integer >= {minimum}")
        return number

    return parse


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise _NotAllowed("a positive number")
    return number


def _size(value: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise _NotAllowed("a size such as 2GiB, 500MB or 1048576")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _optional_str(value: str) -> str | None:
    return value.strip() or None


def _tier(value: str) -> str | None:
    from .tiers.tiers import TIERS

    name = value.strip()
    if not name:
        return None
    if name not in {t.name for t in TIERS}:
        raise _NotAllowed("one of " + ", ".join(t.name for t in TIERS))
    return name


def _setting(env: str, parse: Callable[[str], Any], default: Any, help: str, allowed: str) -> Any:
    return field(default=default, metadata={"env": env, "parse": parse, "help": help, "allowed": allowed})


@dataclass(frozen=True)
class Settings:
    """Every setting uniopt reads; ``describe()`` lists them with their variables."""

    mode: str = _setting(
        "UNIOPT_MODE",
        _mode,
        "auto",
        "auto: measure candidates; tier: tier defaults; off: no change",
        "auto, tier or off",
    )
    tier: str | None = _setting(
        "UNIOPT_TIER", _tier, None, "force a hardware tier instead of detecting it", "a tier name"
    )
    allow: tuple[str, ...] | None = _setting(
        "UNIOPT_ALLOW",
        _optional_names,
        None,
        "only these candidates (comma list of names or prefixes such as openvino)",
        "a comma-separated list",
    )
    deny: tuple[str, ...] = _setting(
        "UNIOPT_DENY",
        _names,
        (),
        "never these candidates (comma list of names or prefixes)",
        "a comma-separated list",
    )
    cache_dir: str | None = _setting(
        "UNIOPT_CACHE_DIR",
        _optional_str,
        None,
        "where exported models and decisions are kept (default: the user cache directory)",
        "a directory path",
    )
    cache_bundle: str | None = _setting(
        "UNIOPT_CACHE_BUNDLE",
        _optional_str,
        None,
        "a read-only cache prepared elsewhere (optimize prepare): its artifacts are used, never changed",
        "a directory path",
    )
    cache_size_limit: int = _setting(
        "UNIOPT_CACHE_SIZE_LIMIT",
        _size,
        5 * 2**30,
        "evict least-recently-used cache entries above this size",
        "a size such as 5GiB",
    )
    threads: int | None = _setting(
        "UNIOPT_THREADS",
        _int_at_least(1),
        None,
        "threads per backend (default: the usable CPUs, rounded down)",
        "an integer >= 1",
    )
    atol: float = _setting(
        "UNIOPT_ATOL",
        _positive_float,
        1e-4,
        "absolute tolerance for FP32 stages against the reference",
        "a positive number",
    )
    rtol: float = _setting(
        "UNIOPT_RTOL",
        _positive_float,
        1e-4,
        "relative tolerance for FP32 stages against the reference",
        "a positive number",
    )
    min_speedup: float = _setting(
        "UNIOPT_MIN_SPEEDUP",
        _positive_float,
        1.05,
        "a candidate must beat eager by this factor to be chosen",
        "a positive number",
    )
    search_budget_s: float = _setting(
        "UNIOPT_SEARCH_BUDGET",
        _positive_float,
        300.0,
        "seconds auto mode may spend on one engine (its components share them), builds included",
        "a positive number of seconds",
    )
    compile_mode: str = _setting(
        "UNIOPT_COMPILE_MODE",
        _compile_mode,
        "default",
        "torch.compile mode",
        "default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs",
    )
    compile_budget_s: float = _setting(
        "UNIOPT_COMPILE_BUDGET",
        _positive_float,
        120.0,
        "seconds torch.compile's first call may take before the candidate is rejected",
        "a positive number of seconds",
    )
    reuse_decisions: bool = _setting(
        "UNIOPT_REUSE_DECISIONS",
        _bool,
        True,
        "apply a cached auto-mode decision instead of measuring again",
        "true or false",
    )
    plugins: tuple[str, ...] | None = _setting(
        "UNIOPT_PLUGINS",
        _names,
        None,
        "plugins to load (comma list; unset: all installed; empty: none)",
        "a comma-separated list",
    )
    use_model_quantization: bool = _setting(
        "USE_MODEL_QUANTIZATION", _bool, True, "allow int8 candidates", "true or false"
    )
    use_model_compilation: bool = _setting(
        "USE_MODEL_COMPILATION", _bool, True, "allow torch.compile candidates", "true or false"
    )
    use_fast_models: bool = _setting(
        "USE_FAST_MODELS", _bool, True, "engines build their smaller default models", "true or false"
    )
    use_optimized_phoneme_model: bool = _setting(
        "USE_OPTIMIZED_PHONEME_MODEL",
        _bool,
        True,
        "optimize the phoneme engine (false keeps it eager)",
        "true or false",
    )
    model_warmup_runs: int = _setting(
        "MODEL_WARMUP_RUNS", _int_at_least(0), 2, "warm-up calls per stage and input shape", "an integer >= 0"
    )
    enable_performance_logging: bool = _setting(
        "ENABLE_PERFORMANCE_LOGGING",
        _bool,
        False,
        "log per-call timings and real-time factor",
        "true or false",
    )
    fallback_on_optimization_error: bool = _setting(
        "FALLBACK_ON_OPTIMIZATION_ERROR",
        _bool,
        True,
        "keep the previous stage when a candidate fails (false: raise)",
        "true or false",
    )
    isolate_builds: bool = _setting(
        "UNIOPT_ISOLATE_BUILDS",
        _bool,
        True,
        "run artifact-building steps (exports, conversions, compression) in a forked child process",
        "true or false",
    )
    park_weights: str = _setting(
        "UNIOPT_PARK_WEIGHTS",
        _park,
        "auto",
        "move a component's eager weights to a file in the cache the kernel can drop and read back "
        "(auto: when they take more than a quarter of the memory left)",
        "auto, true or false",
    )
    trial_processes: bool = _setting(
        "UNIOPT_TRIAL_PROCESSES",
        _bool,
        True,
        "in auto mode, compile and time OpenVINO candidates in a process of their own (a loser leaves nothing)",
        "true or false",
    )
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def describe(cls) -> list[tuple[str, str, str, Any]]:
        """(field, environment variable, description, default) for every setting."""
        return [(f.name, f.metadata["env"], f.metadata["help"], f.default) for f in _setting_fields()]


def _setting_fields() -> list[Any]:
    return [f for f in fields(Settings) if "env" in f.metadata]


def _parse(f: Any, raw: Any, origin: str) -> Any:
    """Parse and check one value; typed arguments go through the same checks as text."""
    if raw is None and f.default is None:
        return None
    text = ",".join(map(str, raw)) if isinstance(raw, (tuple, list)) else str(raw)
    try:
        return f.metadata["parse"](text)
    except _NotAllowed as exc:
        raise SettingsError(f.metadata["env"], raw, str(exc), origin) from None
    except ValueError:
        raise SettingsError(f.metadata["env"], raw, f.metadata["allowed"], origin) from None


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    env_file: str | Path | None = ".env",
    tier_defaults: Mapping[str, Any] | None = None,
) -> Settings:
    """Resolve every setting by precedence: argument > environment > .env > tier > default.

    ``overrides`` are keyword arguments by field name (already typed, or strings to parse).
    ``env_file`` is read without changing ``os.environ``; a missing file is fine.
    """
    environ = os.environ if environ is None else environ
    dotenv: dict[str, str] = {}
    if env_file and Path(env_file).is_file():
        dotenv = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
    overrides = dict(overrides or {})
    known = {f.name: f for f in _setting_fields()}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise SettingsError(f"argument {unknown[0]}", overrides[unknown[0]], "one of " + ", ".join(known))
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, f in known.items():
        env = f.metadata["env"]
        if name in overrides:
            value = overrides[name]
            values[name] = _parse(f, value, "argument")
            sources[name] = "argument"
        elif env in environ:
            values[name], sources[name] = _parse(f, environ[env], "environment"), "environment"
        elif env in dotenv:
            values[name], sources[name] = _parse(f, dotenv[env], str(env_file)), ".env"
        elif tier_defaults and name in tier_defaults:
            values[name], sources[name] = tier_defaults[name], "tier"
        else:
            sources[name] = "default"
    return replace(Settings(), **values, sources=sources)


def resolve_settings(
    overrides: Mapping[str, Any] | None = None, profile: HostProfile | None = None
) -> tuple[Settings, TierChoice]:
    """Settings and tier together: the tier is picked first, then its defaults fill the gaps."""
    from .tiers import host_profile, select_tier

    profile = profile or host_profile()
    first = load_settings(overrides)
    choice = select_tier(profile, first.tier)
    return load_settings(overrides, tier_defaults=choice.tier.setting_defaults), choice
