"""The plugin host: loading and selection, third-party plugins through entry points, availability."""

from __future__ import annotations

import dataclasses
import importlib
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from uniopt.doctor import doctor_report
from uniopt.errors import PluginError, SettingsError
from uniopt.optimizer import Component
from uniopt.plugins import (
    DEFAULT_PLUGINS,
    ENTRY_POINT_GROUP,
    Candidate,
    Requirements,
    Stage,
    availability,
    candidates,
    hookimpl,
    plugin_manager,
)
from uniopt.settings import Settings, load_settings
from uniopt.tiers import BackendInfo, tier_by_name

GiB = 2**30
BUILTIN = [name for name, _module in DEFAULT_PLUGINS]

DEMO_PLUGIN = '''
"""A third-party uniopt plugin, installed the ordinary way (a distribution with an entry point)."""
from uniopt.plugins import Candidate, Requirements, Stage, hookimpl


def _build(component, context):
    return Stage("demo-fp32", component.module)


@hookimpl
def uniopt_register_candidates(register):
    register(Candidate("demo-fp32", "demo", "the module, as a demo", _build))
    register(Candidate(
        "demo-int8", "demo", "needs a package nobody has", _build,
        Requirements(packages=("uniopt_demo_missing_runtime",), extra="demo", precision="int8"),
    ))


@hookimpl
def uniopt_doctor_advice(profile, tier, settings, add):
    add("advice from the demo plugin")
'''

TYPO_PLUGIN = """
from uniopt.plugins import Candidate, hookimpl


@hookimpl
def uniopt_register_candidate(register):  # misspelled: the hook is uniopt_register_candidates
    raise AssertionError("never called")
"""

BROKEN_PLUGIN = """
raise RuntimeError("this plugin cannot load here")
"""


@pytest.fixture
def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, str, str], None]]:
    """Install a plugin module with a real ``*.dist-info`` entry point in a sys.path directory."""
    site = tmp_path / "site-packages"
    site.mkdir()
    modules: list[str] = []

    def install(entry_name: str, module: str, source: str) -> None:
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{module}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entry_name} = {module}\n")
        modules.append(module)
        importlib.invalidate_caches()

    monkeypatch.syspath_prepend(str(site))
    try:
        yield install
    finally:
        for module in modules:
            sys.modules.pop(module, None)
        importlib.invalidate_caches()


def names(pm) -> list[str]:
    return sorted(name for name, _plugin in pm.list_name_plugin())


# -- loading -------------------------------------------------------------------------------------


def test_builtins_register_eager() -> None:
    pm = plugin_manager(BUILTIN)
    assert names(pm) == sorted(BUILTIN)
    found = candidates(pm)
    assert found["eager"].plugin == "eager"
    assert found["eager"].requires == Requirements()


def test_selection_loads_only_the_named_plugins() -> None:
    only_eager = plugin_manager(["eager"])
    assert names(only_eager) == ["eager"]
    assert only_eager.hook.uniopt_build_stage.get_hookimpls() == []
    with_build = plugin_manager(["eager", "build"])
    assert names(with_build) == ["build", "eager"]
    assert len(with_build.hook.uniopt_build_stage.get_hookimpls()) == 1
    none = plugin_manager([])
    assert names(none) == [] and candidates(none) == {}


def test_selection_from_the_setting() -> None:
    assert load_settings().plugins == tuple(BUILTIN)  # the conftest's UNIOPT_PLUGINS
    assert names(plugin_manager(load_settings().plugins)) == sorted(BUILTIN)
    assert load_settings(environ={"UNIOPT_PLUGINS": ""}, env_file=None).plugins == ()


def test_unknown_plugin_name() -> None:
    with pytest.raises(SettingsError) as info:
        plugin_manager(["eager", "openvino-turbo"])
    message = str(info.value)
    assert "UNIOPT_PLUGINS" in message and "openvino-turbo" in message
    assert "eager" in message and "build" in message  # names the plugins there are


def test_the_build_plugin_builds() -> None:
    pm = plugin_manager(["eager", "build"])
    eager = candidates(pm)["eager"]
    module = torch.nn.Linear(4, 2)
    component = Component("module", module, (torch.randn(1, 4),))
    stage = pm.hook.uniopt_build_stage(candidate=eager, component=component, context=None)
    assert isinstance(stage, Stage) and stage.candidate == "eager"
    x = torch.randn(3, 4)
    assert torch.equal(stage(x), module(x))


def test_a_wrapper_sees_every_build() -> None:
    events: list[str] = []

    class Timing:
        @hookimpl(wrapper=True)
        def uniopt_build_stage(self, candidate, component, context):
            events.append(f"before {candidate.name}")
            stage = yield
            events.append(f"after {stage.candidate}")
            return stage

    pm = plugin_manager(["eager", "build"])
    plugin = Timing()
    pm.register(plugin, name="timing")
    try:
        component = Component("module", torch.nn.Identity(), (torch.zeros(1),))
        pm.hook.uniopt_build_stage(candidate=candidates(pm)["eager"], component=component, context=None)
    finally:
        pm.unregister(plugin)
    assert events == ["before eager", "after eager"]


def test_duplicate_candidate_name() -> None:
    class Again:
        @hookimpl
        def uniopt_register_candidates(self, register):
            register(Candidate("eager", "again", "a second eager", lambda component, context: None))

    pm = plugin_manager(["eager"])
    plugin = Again()
    pm.register(plugin, name="again")
    try:
        with pytest.raises(PluginError, match="candidate 'eager' registered by both") as info:
            candidates(pm)
        assert {"'again'", "'eager'"} <= set(str(info.value).split(" by both ")[1].split(" and "))
    finally:
        pm.unregister(plugin)


def test_register_takes_only_candidates() -> None:
    class Sloppy:
        @hookimpl
        def uniopt_register_candidates(self, register):
            register("onnxruntime-fp32")

    pm = plugin_manager([])
    plugin = Sloppy()
    pm.register(plugin, name="sloppy")
    try:
        with pytest.raises(PluginError, match="takes a Candidate, got str"):
            candidates(pm)
    finally:
        pm.unregister(plugin)


# -- third-party plugins through real entry points -----------------------------------------------


def test_third_party_plugin_through_an_entry_point(install_plugin, make_profile) -> None:
    install_plugin("demo", "uniopt_thirdparty_demo", DEMO_PLUGIN)
    pm = plugin_manager(None)
    assert {"demo", *BUILTIN} <= set(names(pm))
    demo = pm.get_plugin("demo")
    assert demo is not None and demo.__name__ == "uniopt_thirdparty_demo"
    found = candidates(pm)
    assert {"eager", "demo-fp32", "demo-int8"} <= set(found)
    assert found["demo-int8"].plugin == "demo"

    profile, settings, tier = make_profile(), Settings(), tier_by_name("cpu-avx512")
    assert availability(found["demo-fp32"], profile, settings, tier) == (True, "")
    ok, reason = availability(found["demo-int8"], profile, settings, tier)
    assert not ok
    assert "uniopt_demo_missing_runtime: not installed" in reason and "pip install 'uniopt[demo]'" in reason


def test_selection_leaves_third_party_plugins_out(install_plugin) -> None:
    install_plugin("demo", "uniopt_thirdparty_demo", DEMO_PLUGIN)
    pm = plugin_manager(["eager", "build"])
    assert names(pm) == ["build", "eager"]
    assert "demo-fp32" not in candidates(pm)
    assert "uniopt_thirdparty_demo" not in sys.modules  # not even imported
    assert names(plugin_manager(["demo"])) == ["demo"]


def test_doctor_lists_a_third_party_plugin(install_plugin, monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugin("demo", "uniopt_thirdparty_demo", DEMO_PLUGIN)
    monkeypatch.delenv("UNIOPT_PLUGINS")  # unset: every installed plugin
    data = doctor_report().to_dict()
    assert {"name": "demo", "origin": "entry point uniopt_thirdparty_demo"} in data["plugins"]
    assert {"name": "eager", "origin": "built-in"} in data["plugins"]
    rows = {row["name"]: row for row in data["candidates"]}
    assert rows["demo-fp32"]["available"] is True
    assert rows["demo-int8"]["available"] is False and rows["demo-int8"]["precision"] == "int8"
    assert "advice from the demo plugin" in data["advice"]

    monkeypatch.setenv("UNIOPT_PLUGINS", ",".join(BUILTIN))
    data = doctor_report().to_dict()
    assert [p["name"] for p in data["plugins"]] and "demo" not in [p["name"] for p in data["plugins"]]
    assert "advice from the demo plugin" not in data["advice"]


def test_misspelled_hookimpl_fails_at_start_up(install_plugin) -> None:
    install_plugin("typo", "uniopt_thirdparty_typo", TYPO_PLUGIN)
    with pytest.raises(PluginError, match="uniopt_register_candidate"):
        plugin_manager(None)
    assert names(plugin_manager(BUILTIN)) == sorted(BUILTIN)  # deselected, it does no harm


def test_plugin_that_fails_to_import(install_plugin) -> None:
    install_plugin("broken", "uniopt_thirdparty_broken", BROKEN_PLUGIN)
    with pytest.raises(PluginError, match=r"plugin 'broken' \(entry point uniopt_thirdparty_broken\) failed to load"):
        plugin_manager(["broken"])


# -- availability ---------------------------------------------------------------------------------


def _never_built(component: Component, context: object) -> Stage:
    raise AssertionError("availability() must not build")


def candidate(name: str, **requires) -> Candidate:
    return Candidate(name, "test", "a test candidate", _never_built, Requirements(**requires))


def settings(**values) -> Settings:
    return dataclasses.replace(Settings(), **values)


@pytest.fixture
def host(make_profile):
    return make_profile("avx512", usable_cpus=8)


AVX512 = tier_by_name("cpu-avx512")
LOW = tier_by_name("low-resource")


@pytest.mark.parametrize(
    ("allow", "name", "ok"),
    [
        (("openvino",), "openvino-int8-static", True),
        (("openvino",), "onnxruntime-fp32", False),
        (("onnxruntime-fp32",), "onnxruntime-fp32", True),
        (("onnxruntime-fp32",), "onnxruntime-cuda", False),
        (("torch", "openvino"), "torch-int8", True),
    ],
)
def test_allow_list(host, allow, name: str, ok: bool) -> None:
    result = availability(candidate(name), host, settings(allow=allow), AVX512)
    assert result[0] is ok
    if not ok:
        assert result[1] == f"not in UNIOPT_ALLOW={','.join(allow)}"


def test_allow_list_keeps_the_eager_fallback(host) -> None:
    """Like UNIOPT_DENY and tier denials, UNIOPT_ALLOW never removes the eager fallback."""
    assert availability(candidate("eager"), host, settings(allow=("openvino",)), AVX512) == (True, "")


def test_deny_list(host) -> None:
    deny = settings(deny=("onnxruntime", "openvino-int8"))
    assert availability(candidate("onnxruntime-fp32"), host, deny, AVX512) == (
        False,
        "ruled out by UNIOPT_DENY",
    )
    assert availability(candidate("openvino-int8-static"), host, deny, AVX512)[0] is False
    assert availability(candidate("openvino-f32"), host, deny, AVX512) == (True, "")
    assert availability(candidate("eager"), host, settings(deny=("eager",)), AVX512) == (True, "")


def test_tier_denies_torch_compile(host) -> None:
    assert availability(candidate("torch-compile"), host, Settings(), LOW) == (
        False,
        "ruled out by tier low-resource",
    )
    assert availability(candidate("torch-compile-max-autotune"), host, Settings(), LOW)[0] is False
    assert availability(candidate("torch-compile"), host, Settings(), AVX512) == (True, "")


def test_missing_backend_names_the_pip_extra(make_profile) -> None:
    reason = "import openvino failed: No module named 'openvino'"
    profile = make_profile(backends=(BackendInfo("torch", True, "2.5.0"), BackendInfo("openvino", False, None, reason)))
    ok, why = availability(
        candidate("openvino-f32", packages=("openvino",), extra="openvino"), profile, Settings(), AVX512
    )
    assert not ok
    assert why == f"openvino: {reason}; pip install 'uniopt[openvino]'"


def test_packages_that_are_not_probed_are_looked_up(host) -> None:
    missing = candidate("x-fp32", packages=("uniopt_no_such_package",), extra="x")
    assert availability(missing, host, Settings(), AVX512) == (
        False,
        "uniopt_no_such_package: not installed; pip install 'uniopt[x]'",
    )
    assert availability(candidate("np-fp32", packages=("numpy",)), host, Settings(), AVX512) == (True, "")


def test_cpu_flags(make_profile) -> None:
    int8 = candidate("openvino-int8-static", cpu_flags_any=("avx512_vnni", "amx"))
    assert availability(int8, make_profile("avx2"), Settings(), AVX512) == (
        False,
        "CPU lacks avx512_vnni / amx",
    )
    assert availability(int8, make_profile("amx"), Settings(), AVX512) == (True, "")
    assert availability(int8, make_profile("avx512"), Settings(), AVX512) == (True, "")


def test_memory_too_small(make_profile) -> None:
    big = candidate("torch-compile", min_memory_bytes=4 * GiB)
    small_host = make_profile(limit_bytes=1610612736)
    assert availability(big, small_host, Settings(), AVX512) == (False, "needs 4.0 GiB, 1.5 GiB usable")
    assert availability(big, make_profile(total_bytes=16 * GiB), Settings(), AVX512) == (True, "")


def test_setting_switched_off(host) -> None:
    int8 = candidate("torch-int8", setting="use_model_quantization", precision="int8")
    assert availability(int8, host, settings(use_model_quantization=False), AVX512) == (
        False,
        "USE_MODEL_QUANTIZATION=false",
    )
    assert availability(int8, host, settings(use_model_quantization=True), AVX512) == (True, "")
