"""Build steps in a forked child: results and errors come back, memory and imports stay in the child."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from small_vm_script import small_vm
from uniopt.errors import MemoryBudgetError, StepKilledError
from uniopt.isolation import BuildTimeout, can_isolate, isolated_build, run_isolated
from uniopt.memory import measure_memory, release_memory, rss_bytes
from uniopt.plugins.export import ExportError

MiB = 2**20
pytestmark = pytest.mark.skipif(not can_isolate(), reason="build steps cannot run in a forked child here")


def test_the_result_comes_back_and_the_childs_memory_does_not_stay() -> None:
    release_memory()
    before = rss_bytes()

    def allocate() -> int:
        block = torch.ones(300 * MiB // 4)  # written: every page is resident in the child
        return int(block.numel())

    with measure_memory() as use:
        assert run_isolated(allocate, "allocate") == 300 * MiB // 4
    release_memory()
    assert rss_bytes() - before < 50 * MiB, "the child's allocation stayed in this process"
    # The child's peak counts in the measurement that was open while it ran.
    assert use.peak_increase_bytes >= 280 * MiB


def test_the_child_sees_the_parents_objects_as_they_are() -> None:
    module = torch.nn.Linear(8, 4)
    expected = module(torch.ones(1, 8))
    got = run_isolated(lambda: module(torch.ones(1, 8)).detach(), "call")
    torch.testing.assert_close(got, expected.detach())


def test_errors_keep_their_type_and_fields() -> None:
    def refuse() -> None:
        raise MemoryBudgetError("onnx-export-legacy", 900 * MiB, "610 MiB available under the 1.5 GiB limit")

    with pytest.raises(MemoryBudgetError) as refused:
        run_isolated(refuse, "export")
    assert refused.value.step == "onnx-export-legacy" and refused.value.needed_bytes == 900 * MiB
    assert "610 MiB available" in str(refused.value)

    def bad_export() -> None:
        raise ExportError("input 'x' axis 1 is declared dynamic but the exported graph fixes it to 7")

    with pytest.raises(ExportError, match="fixes it to 7"):
        run_isolated(bad_export, "export")

    class Local(Exception):  # defined here: does not pickle
        pass

    def unpicklable() -> None:
        raise Local("from a local class")

    with pytest.raises(RuntimeError, match="Local: from a local class"):
        run_isolated(unpicklable, "step")


def test_a_killed_child_is_a_refusal_for_memory_and_this_process_goes_on() -> None:
    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(StepKilledError, match="killed by the kernel") as killed:
        run_isolated(die, "onnx-export-legacy")
    assert isinstance(killed.value, MemoryBudgetError)


def test_a_hanging_child_is_killed_at_its_time_limit() -> None:
    import time

    with pytest.raises(BuildTimeout, match="did not finish in 1 s"):
        run_isolated(lambda: time.sleep(60), "step", timeout_s=1.0)


def test_memory_steps_measured_in_the_child_reach_the_parents_list(tmp_path: Path) -> None:
    steps: list[dict] = [{"step": "before"}]
    context = SimpleNamespace(memory_steps=steps, settings=SimpleNamespace(isolate_builds=True))

    def build(directory: Path) -> dict:
        steps.append({"step": "onnx-export-legacy", "peak_bytes": 1})
        (directory / "model.onnx").write_text("graph")
        return {"exporter": "legacy"}

    assert isolated_build(build, context, "export")(tmp_path) == {"exporter": "legacy"}
    assert [s["step"] for s in steps] == ["before", "onnx-export-legacy"]
    assert (tmp_path / "model.onnx").read_text() == "graph"


WORKER = textwrap.dedent(
    """
    import json, sys, torch
    from uniopt import UniversalOptimizer
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).eval()
    opt = UniversalOptimizer(model, (torch.randn(3, 64),), mode="tier", tier="low-resource")
    (component,) = opt.report().components
    steps = [s["step"] for c in component.candidates for s in c.memory_steps]
    heavy = [m for m in ("torch.onnx", "onnx", "onnxscript", "onnxruntime.quantization") if m in sys.modules]
    print(json.dumps({"chosen": component.chosen, "steps": steps, "heavy": heavy}))
    """
)


def test_an_export_leaves_its_libraries_in_the_child(tmp_path: Path) -> None:
    """After a cold ONNX Runtime build the exporter and onnx are not imported in this process."""
    env = {**os.environ, "UNIOPT_CACHE_DIR": str(tmp_path), "UNIOPT_ISOLATE_BUILDS": "true"}
    proc = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["chosen"] == "onnxruntime-fp32"
    assert "onnx-export-legacy" in found["steps"] or "onnx-export-dynamo" in found["steps"]
    assert found["heavy"] == [], f"imported in the engine's process: {found['heavy']}"


@pytest.mark.cgroup
def test_a_step_past_the_limit_kills_only_its_child() -> None:
    """In a 512 MiB cgroup, a step allocating 1 GiB is killed; the process that ran it reports it and goes on."""
    try:
        with small_vm.small_vm(1.0, 64 * MiB):  # can a cgroup be made here at all?
            pass
    except small_vm.Unavailable as exc:
        pytest.skip(str(exc))
    script = textwrap.dedent(
        """
        import torch
        from uniopt.errors import StepKilledError
        from uniopt.isolation import run_isolated
        engine = torch.ones(200 * 2**20 // 4)  # what the engine holds
        try:
            run_isolated(lambda: torch.ones(2**30 // 4).sum(), "too large a step")
        except StepKilledError as exc:
            print("refused:", exc)
        print("engine still here:", float(engine[0]))
        """
    )
    with small_vm.small_vm(1.0, 512 * MiB) as vm:
        proc = subprocess.run(vm.command([sys.executable, "-c", script]), capture_output=True, text=True, timeout=300)
        kills = vm.oom_kills()
    assert proc.returncode == 0, proc.stderr
    assert "refused: too large a step was killed by the kernel" in proc.stdout
    assert "engine still here: 1.0" in proc.stdout
    assert kills >= 1


def test_a_child_forked_while_another_thread_measures_memory_does_not_wait_for_it() -> None:
    """The child measures its own memory: the parent's lock, held by a thread the child lacks, is not its."""
    import threading
    import time

    from uniopt import memory

    held = threading.Event()

    def measuring() -> None:
        with memory._lock:  # held while the child is forked, released soon after
            held.set()
            time.sleep(2.0)

    thread = threading.Thread(target=measuring)
    thread.start()
    held.wait()
    try:
        assert run_isolated(lambda: 7, "a step beside a measurement", timeout_s=20) == 7
    finally:
        thread.join()
