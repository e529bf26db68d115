"""The public names, the wrapper in mode="off", and the error tree."""

from __future__ import annotations

import importlib.metadata
import inspect

import pytest
import torch

import uniopt
import uniopt.errors
from uniopt import SettingsError, UniOptError, UniversalOptimizer
from uniopt.optimizer.adapters import engine_components

PUBLIC = {
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
}


def test_public_names_are_the_intended_ones() -> None:
    assert set(uniopt.__all__) == PUBLIC
    assert len(uniopt.__all__) == len(PUBLIC)
    for name in uniopt.__all__:
        assert getattr(uniopt, name) is not None, name


def test_version_matches_the_distribution() -> None:
    assert uniopt.__version__ == importlib.metadata.version("uniopt")


@pytest.fixture
def linear() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Linear(8, 3).eval(), torch.randn(2, 8)


def test_mode_off_changes_nothing(linear) -> None:
    module, x = linear
    expected = module(x).detach().clone()
    opt = UniversalOptimizer(module, (x,), mode="off")
    with torch.no_grad():
        assert torch.equal(opt(x), expected)
        assert torch.equal(opt(torch.ones(5, 8)), module(torch.ones(5, 8)))
    assert opt.engine is module
    assert opt.weight is module.weight  # attributes are forwarded to the engine
    assert opt.in_features == 8
    report = opt.report()
    assert report.mode == "off" and report.components == []
    assert report.fingerprint == uniopt.host_profile().fingerprint
    assert report.to_dict()["mode"] == "off"
    assert "mode='off'" in repr(opt) and "Linear" in repr(opt)


def test_mode_off_missing_attribute(linear) -> None:
    module, x = linear
    opt = UniversalOptimizer(module, (x,), mode="off")
    with pytest.raises(AttributeError):
        opt.no_such_attribute  # noqa: B018
    with pytest.raises(AttributeError):
        opt._private  # noqa: B018


def test_keyword_settings(linear) -> None:
    module, x = linear
    opt = UniversalOptimizer(module, (x,), mode="off", threads=2, use_model_quantization="false")
    assert opt.settings.threads == 2 and opt.settings.use_model_quantization is False
    assert opt.settings.sources["threads"] == "argument"
    with pytest.raises(SettingsError, match="UNIOPT_MODE"):
        UniversalOptimizer(module, (x,), mode="fast")
    with pytest.raises(SettingsError, match="quantisation"):
        UniversalOptimizer(module, (x,), mode="off", use_quantisation=False)


def test_not_an_engine() -> None:
    with pytest.raises(UniOptError, match="neither an nn.Module nor an engine"):
        engine_components(object())
    with pytest.raises(UniOptError, match="dict is neither"):
        UniversalOptimizer({"model": "not a module"}, mode="tier")
    with pytest.raises(UniOptError, match="str is neither"):  # "off" wraps only what the other modes could
        UniversalOptimizer("not an engine", mode="off")


def test_module_without_example_inputs() -> None:
    with pytest.raises(UniOptError, match="needs example inputs"):
        engine_components(torch.nn.Linear(2, 2))


def test_every_error_is_a_uniopt_error() -> None:
    classes = [getattr(uniopt.errors, name) for name in uniopt.errors.__all__]
    assert len(classes) == 11
    for cls in classes:
        assert issubclass(cls, UniOptError), cls
        assert cls.__name__ in uniopt.errors.__doc__, f"{cls.__name__} missing from the tree"
    assert issubclass(uniopt.errors.ValidationError, uniopt.errors.OptimizationError)
    # narrow subclasses also fit the standard hierarchy callers already catch
    assert issubclass(SettingsError, ValueError)
    assert issubclass(uniopt.errors.InputError, ValueError)
    assert issubclass(uniopt.errors.BackendUnavailable, ImportError)
    assert issubclass(uniopt.errors.CacheError, OSError)
    assert issubclass(uniopt.errors.MemoryBudgetError, MemoryError)
    module_errors = {
        name
        for name, obj in inspect.getmembers(uniopt.errors, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__ == "uniopt.errors"
    }
    assert module_errors == set(uniopt.errors.__all__)


def test_settings_error_message() -> None:
    error = SettingsError("UNIOPT_THREADS", "lots", "an integer >= 1")
    assert str(error) == "UNIOPT_THREADS='lots' is not allowed: expected an integer >= 1"
    assert (error.variable, error.value, error.allowed) == ("UNIOPT_THREADS", "lots", "an integer >= 1")


def test_backend_unavailable_and_optimization_error_messages() -> None:
    error = uniopt.errors.BackendUnavailable("openvino", "openvino", "No module named 'openvino'")
    assert str(error) == (
        "openvino is not available (No module named 'openvino'); install it with: pip install 'uniopt[openvino]'"
    )
    failure = uniopt.errors.ValidationError("encoder", "openvino-bf16", "cosine 0.91 < 0.999")
    assert str(failure) == "openvino-bf16 failed for component 'encoder': cosine 0.91 < 0.999"
    assert (failure.component, failure.candidate) == ("encoder", "openvino-bf16")
