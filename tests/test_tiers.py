"""Tiers: which one a host gets and why, tiers as data, and the thread budget."""

from __future__ import annotations

import dataclasses

import pytest

from uniopt.settings import Settings
from uniopt.threads import ThreadBudget, apply_to_environment, single_threaded_blas, thread_budget
from uniopt.tiers import TIERS, GpuInfo, select_tier, tier_by_name
from uniopt.tiers.tiers import host_facts

GiB = 2**30
CUDA = GpuInfo("cuda", "NVIDIA L4", 24 * GiB, "8.9")


def test_few_cpus_is_low_resource(make_profile) -> None:
    choice = select_tier(make_profile("avx512", usable_cpus=1.3))
    assert choice.tier.name == "low-resource"
    assert "usable_cpus = 1.3 <= 2" in choice.reason
    assert "memory" not in choice.reason.split(":")[0]


def test_big_avx512_host(make_profile) -> None:
    choice = select_tier(make_profile("avx512", usable_cpus=8, total_bytes=16 * GiB))
    assert choice.tier.name == "cpu-avx512"
    assert "avx512f = True" in choice.reason


def test_memory_limit_makes_a_big_host_low_resource(make_profile) -> None:
    choice = select_tier(make_profile("avx512", usable_cpus=8, total_bytes=64 * GiB, limit_bytes=2 * GiB))
    assert choice.tier.name == "low-resource"
    assert "memory_limit_gib = 2.0 < 4" in choice.reason
    assert "usable_cpus" not in choice.reason


def test_small_physical_memory_without_a_limit(make_profile) -> None:
    choice = select_tier(make_profile("avx2", usable_cpus=8, total_bytes=3 * GiB))
    assert choice.tier.name == "low-resource" and "memory_limit_gib = 3.0" in choice.reason


def test_both_limits_are_named(make_profile) -> None:
    choice = select_tier(make_profile(usable_cpus=1.0, limit_bytes=GiB))
    assert "usable_cpus = 1.0" in choice.reason and "memory_limit_gib = 1.0" in choice.reason


def test_avx2_only(make_profile) -> None:
    choice = select_tier(make_profile("avx2", usable_cpus=8))
    assert choice.tier.name == "cpu-avx2" and "avx2 = True" in choice.reason


def test_amx_host_is_avx512(make_profile) -> None:
    assert select_tier(make_profile("amx", usable_cpus=8)).tier.name == "cpu-avx512"


def test_arm_is_basic(make_profile) -> None:
    choice = select_tier(make_profile("arm", usable_cpus=8))
    assert choice.tier.name == "cpu-basic"
    assert choice.reason.startswith("no other tier applies")


def test_cuda_gpu_wins(make_profile) -> None:
    assert select_tier(make_profile("avx512", usable_cpus=8, gpus=(CUDA,))).tier.name == "cuda-gpu"
    # tiers are tried in order: a GPU host with a small CPU quota is still a GPU host
    choice = select_tier(make_profile("avx2", usable_cpus=1.0, gpus=(CUDA,)))
    assert choice.tier.name == "cuda-gpu" and "cuda_devices = 1 > 0" in choice.reason


def test_intel_gpu_is_not_cuda(make_profile) -> None:
    profile = make_profile("avx2", usable_cpus=8, gpus=(GpuInfo("openvino-gpu", "GPU.0"),))
    assert select_tier(profile).tier.name == "cpu-avx2"


@pytest.mark.parametrize(
    ("usable", "limit", "tier"),
    [
        (2.0, None, "low-resource"),
        (2.01, None, "cpu-avx512"),
        (8.0, 4 * GiB - 1, "low-resource"),
        (8.0, 4 * GiB, "cpu-avx512"),
    ],
)
def test_low_resource_boundaries(make_profile, usable: float, limit, tier: str) -> None:
    assert select_tier(make_profile(usable_cpus=usable, limit_bytes=limit)).tier.name == tier


def test_host_facts(make_profile) -> None:
    facts = host_facts(make_profile("amx", usable_cpus=4, total_bytes=32 * GiB, limit_bytes=8 * GiB, gpus=(CUDA, CUDA)))
    assert facts["amx"] is True and facts["avx512f"] is True and facts["neon"] is False
    assert (facts["usable_cpus"], facts["memory_limit_gib"], facts["cuda_devices"]) == (4, 8.0, 2)


def test_override_by_name(make_profile) -> None:
    choice = select_tier(make_profile("avx512", usable_cpus=1.3), "cpu-basic")
    assert choice.tier is tier_by_name("cpu-basic")
    assert choice.reason == "set by UNIOPT_TIER=cpu-basic"


def test_unknown_override_names_the_choices(make_profile) -> None:
    with pytest.raises(KeyError) as info:
        select_tier(make_profile(), "turbo")
    message = str(info.value)
    assert "turbo" in message
    for tier in TIERS:
        assert tier.name in message


# -- tiers are data ------------------------------------------------------------------------------


def test_tier_names_are_unique_and_the_last_always_applies() -> None:
    names = [t.name for t in TIERS]
    assert len(names) == len(set(names))
    assert TIERS[-1].when_any == ()
    assert all(t.when_any for t in TIERS[:-1])


@pytest.mark.parametrize("tier", TIERS, ids=lambda t: t.name)
def test_tier_chains(tier) -> None:
    assert "generic" in tier.chains
    for kind, chain in tier.chains.items():
        assert chain and chain[-1] == "eager", kind
        assert len(chain) == len(set(chain)), kind
        assert not set(chain) & set(tier.denied), kind  # a tier never proposes what it rules out
    assert tier.chain_for("a-kind-no-tier-names") == tier.chains["generic"]
    assert tier.description


@pytest.mark.parametrize("tier", TIERS, ids=lambda t: t.name)
def test_tier_setting_defaults_are_settings(tier) -> None:
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    defaults = Settings()
    for name, value in tier.setting_defaults.items():
        assert name in fields and name != "sources"
        assert isinstance(value, type(getattr(defaults, name))), name


def test_low_resource_rules_out_torch_compile() -> None:
    tier = tier_by_name("low-resource")
    assert "torch-compile" in tier.denied
    assert tier.setting_defaults["use_model_compilation"] is False


# -- thread budget -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usable", "override", "intra"),
    [(1.3, None, 1), (2.0, None, 2), (0.5, None, 1), (7.99, None, 7), (1.3, 3, 3), (64.0, 1, 1)],
)
def test_thread_budget(usable: float, override, intra: int) -> None:
    assert thread_budget(usable, override) == ThreadBudget(intra_op=intra, inter_op=1)


def test_openvino_config_is_accepted_by_openvino() -> None:
    config = ThreadBudget(intra_op=1).openvino_config()
    assert config == {"INFERENCE_NUM_THREADS": "1", "NUM_STREAMS": "1"}
    ov = pytest.importorskip("openvino")
    import numpy as np
    import openvino.opset13 as ops

    x = ops.parameter([1, 4], np.float32, name="x")
    model = ov.Model([ops.relu(x)], [x], "tiny")
    compiled = ov.Core().compile_model(model, "CPU", ThreadBudget(intra_op=2).openvino_config())
    assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 2
    assert int(compiled.get_property("NUM_STREAMS")) == 1


def test_onnxruntime_options() -> None:
    ort = pytest.importorskip("onnxruntime")
    options = ThreadBudget(intra_op=3).onnxruntime_options()
    assert isinstance(options, ort.SessionOptions)
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    given = ort.SessionOptions()
    given.enable_profiling = False
    assert ThreadBudget(intra_op=1).onnxruntime_options(given) is given
    assert (given.intra_op_num_threads, given.inter_op_num_threads) == (1, 1)


def test_apply_torch() -> None:
    import torch

    before = torch.get_num_threads()
    try:
        ThreadBudget(intra_op=1).apply_torch()
        assert torch.get_num_threads() == 1
        ThreadBudget(intra_op=2).apply_torch()  # a second call must not fail on the inter-op pool
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_environment_respects_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    monkeypatch.setenv("MKL_NUM_THREADS", "placeholder")
    monkeypatch.delenv("MKL_NUM_THREADS")  # recorded by monkeypatch, so restored afterwards
    budget = ThreadBudget(intra_op=2)
    assert budget.environment() == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    apply_to_environment(budget)
    assert os.environ["OMP_NUM_THREADS"] == "8"
    assert os.environ["MKL_NUM_THREADS"] == "2"


def test_single_threaded_blas_nests_and_restores() -> None:
    import numpy as np
    from threadpoolctl import ThreadpoolController

    def blas_threads() -> list[int]:
        return [lib.num_threads for lib in ThreadpoolController().select(user_api="blas").lib_controllers]

    np.ones((2, 2)) @ np.ones((2, 2))  # numpy's BLAS is loaded
    before = blas_threads()
    assert before
    with single_threaded_blas():
        assert set(blas_threads()) == {1}
        with single_threaded_blas():
            assert set(blas_threads()) == {1}
        assert set(blas_threads()) == {1}  # the outer block still holds the limit
    assert blas_threads() == before
