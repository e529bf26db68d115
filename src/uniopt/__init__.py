"""uniopt: make existing PyTorch speech engines faster on the machine they run on."""

from .errors import (
    BackendUnavailable,
    CacheError,
    InputError,
    OptimizationError,
    PluginError,
    SettingsError,
    UniOptError,
    ValidationError,
)
from .optimizer import Component, Metric, OptimizationReport, UniversalOptimizer
from .settings import Settings, load_settings
from .tiers import HostProfile, host_profile, select_tier

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "CacheError",
    "Component",
    "HostProfile",
    "InputError",
    "Metric",
    "OptimizationError",
    "OptimizationReport",
    "PluginError",
    "Settings",
    "SettingsError",
    "UniOptError",
    "UniversalOptimizer",
    "ValidationError",
    "__version__",
    "host_profile",
    "load_settings",
    "select_tier",
]
