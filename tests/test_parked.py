"""Parked weights: the same values from a mapped file, the anonymous memory freed, pages the kernel can drop."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from small_vm_script import small_vm
from test_selection import SlowNet, _fake, _optimize, fake_plugins  # noqa: F401 - the fixture is used by name
from uniopt import parked
from uniopt.cache import ArtifactCache
from uniopt.errors import SettingsError
from uniopt.memory import process_status_bytes, release_memory
from uniopt.optimizer.install import shallow_copy
from uniopt.parked import FILE, Parking, page_in_parked, park_for_room, parks
from uniopt.settings import resolve_settings
from uniopt.tiers import host_profile

MiB = 2**20


class Tied(torch.nn.Module):
    """Two 16 MiB matrices, the output projection tied to the input one, and a running-state buffer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(2048, 2048)
        self.mid = torch.nn.Linear(2048, 2048)
        self.out = torch.nn.Linear(2048, 2048)
        self.out.weight = self.inp.weight
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.out(torch.relu(self.mid(torch.relu(self.inp(x)))))


WEIGHT_BYTES = 2 * 2048 * 2048 * 4


def _status(field: str) -> int:
    value = process_status_bytes(field)
    assert value is not None
    return value


def _run(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.ones(2, 2048))


def _mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


def test_a_parked_module_computes_the_same_from_a_mapped_file_and_frees_its_memory(tmp_path: Path) -> None:
    model = Tied().eval()
    expected = _run(model)
    params = [id(p) for p in model.parameters()]
    gc.collect()
    anon = _status("RssAnon")
    parking = park_for_room(model, "tied", ArtifactCache(tmp_path), "true")
    assert parking.parked_bytes >= WEIGHT_BYTES, parking
    assert parking.note.startswith("parked in the cache"), parking.note
    gc.collect()
    assert anon - _status("RssAnon") > 0.8 * WEIGHT_BYTES
    assert [id(p) for p in model.parameters()] == params  # the same Parameter objects, tied ones still tied
    assert model.out.weight is model.inp.weight
    assert str(tmp_path) in _mapped_files()
    assert torch.equal(_run(model), expected)
    assert model.calls.item() == 2  # buffers stay the module's own, writable memory
    again = park_for_room(shallow_copy(model), "tied", ArtifactCache(tmp_path), "true")  # a second wrapper
    assert again == Parking(parking.parked_bytes, "parked in the cache before")
    assert len(ArtifactCache(tmp_path).entries()) == 1


@pytest.mark.parametrize("populate", ["madvise", "each page read"])
def test_paged_out_weights_are_read_back_and_what_the_engine_wrote_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, populate: str
) -> None:
    if populate == "each page read":  # a kernel before 5.14 refuses MADV_POPULATE_READ as it refuses this
        monkeypatch.setattr(parked, "_MADV_POPULATE_READ", 1000)
    model = Tied().eval()
    expected = _run(model)
    park_for_room(shallow_copy(model), "tied", ArtifactCache(tmp_path), "true")  # as a wrapper's twin does
    gc.collect()  # the module object it was parked through is gone; the parameters are not
    _run(model)  # pages the weights in
    touched = _status("RssFile")
    release_memory()
    paged_out = _status("RssFile")
    assert touched - paged_out > 0.8 * WEIGHT_BYTES
    page_in_parked(model)  # before the eager calls' own memory is measured
    assert _status("RssFile") - paged_out > 0.8 * WEIGHT_BYTES
    assert torch.equal(_run(model), expected)
    with torch.no_grad():
        model.mid.bias.fill_(0.5)  # a private copy of those pages
    release_memory()
    assert torch.equal(model.mid.bias, torch.full((2048,), 0.5))


def test_the_next_module_maps_the_same_file_and_a_damaged_file_is_never_used(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    expected = _run(Tied().eval())
    first = Tied().eval()
    park_for_room(first, "tied", cache, "true")
    [entry] = cache.entries()
    second = Tied().eval()
    assert park_for_room(second, "tied", cache, "true").parked_bytes > 0
    assert [e.key for e in cache.entries()] == [entry.key]  # mapped again, not written again
    assert torch.equal(_run(second), expected)
    del first, second
    gc.collect()  # nothing maps the file now: damage it in place, as a disk error would
    with open(entry.path / FILE, "r+b") as f:
        f.seek(WEIGHT_BYTES // 2)
        f.write(b"\xff" * 4096)
    third = Tied().eval()
    parking = park_for_room(third, "tied", cache, "true")
    assert parking.parked_bytes == 0 and "differ from the module's" in parking.note, parking.note
    assert str(entry.path) not in _mapped_files()
    assert torch.equal(_run(third), expected)
    assert cache.entries() == []
    assert park_for_room(third, "tied", cache, "true").parked_bytes > 0  # written again
    assert torch.equal(_run(third), expected)


def test_a_cache_in_memory_is_not_used_for_parking() -> None:
    if (
        not Path("/dev/shm").is_dir()
        or "tmpfs" not in subprocess.run(["stat", "-f", "-c", "%T", "/dev/shm"], capture_output=True, text=True).stdout
    ):
        pytest.skip("no tmpfs at /dev/shm")
    model = Tied().eval()
    expected = _run(model)
    cache_dir = Path("/dev/shm") / f"uniopt-park-test-{os.getpid()}"
    try:
        parking = park_for_room(model, "tied", ArtifactCache(cache_dir), "true")
    finally:
        subprocess.run(["rm", "-rf", str(cache_dir)], check=True)
    assert parking.parked_bytes == 0 and "on tmpfs" in parking.note, parking.note
    assert torch.equal(_run(model), expected)


def test_when_weights_are_parked() -> None:
    assert parks("auto", 300 * MiB, 1000 * MiB)
    assert not parks("auto", 200 * MiB, 1000 * MiB)
    assert parks("true", 1, 10**12) and not parks("false", 10**12, 1)
    settings, _ = resolve_settings({"park_weights": "on"}, host_profile())
    assert settings.park_weights == "true"
    with pytest.raises(SettingsError, match="UNIOPT_PARK_WEIGHTS"):
        resolve_settings({"park_weights": "sometimes"}, host_profile())


def test_the_report_says_what_was_parked_and_the_chosen_stage_runs(fake_plugins: Any, tmp_path: Any) -> None:  # noqa: F811
    fake_plugins(_fake("fast", 0.002))
    module = SlowNet()
    opt = _optimize(module, tmp_path, park_weights="true")
    report = opt.report().component("module")
    assert report.chosen == "fast"
    assert report.parked_bytes > 0 and report.to_dict()["parked"].startswith("parked in the cache")
    assert str(tmp_path / "cache") in _mapped_files()
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.allclose(opt.engine(x), torch.nn.functional.linear(x, module.linear.weight, module.linear.bias))
    off = _optimize(SlowNet(), tmp_path / "off", park_weights="false")
    assert off.report().component("module").parked_bytes == 0


PARK_IN_CGROUP = r"""
import sys
sys.path[:0] = sys.argv[2:]
import torch
from uniopt.cache import ArtifactCache
from uniopt.memory import memory_headroom, release_memory
from uniopt.parked import park_for_room
torch.manual_seed(0)
model = torch.nn.Linear(10240, 10240, bias=False)  # 400 MiB
x = torch.randn(1, 10240)
expected = model(x).detach()
before = memory_headroom().available_bytes
parking = park_for_room(model, "big", ArtifactCache(sys.argv[1]), "auto")
with torch.no_grad():
    same = torch.equal(model(x), expected)
release_memory()
print(parking.parked_bytes, before, memory_headroom().available_bytes, same)
"""


@pytest.mark.cgroup
def test_in_a_1_5_gib_cgroup_parking_gives_the_weights_memory_back(tmp_path: Path) -> None:
    """``auto`` parks a 400 MiB module there, and the memory left grows by about its size, after running it."""
    try:
        with small_vm.small_vm() as vm:
            command = vm.command([sys.executable, "-c", PARK_IN_CGROUP, str(tmp_path / "cache"), *sys.path])
            proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except small_vm.Unavailable as exc:
        pytest.skip(str(exc))
    assert proc.returncode == 0, proc.stderr
    parked, before, after, same = proc.stdout.split()
    assert int(parked) == 400 * MiB and same == "True"
    assert int(after) - int(before) > 300 * MiB, (int(before) / MiB, int(after) / MiB)


@pytest.mark.cgroup
def test_in_a_1_5_gib_cgroup_the_doctor_counts_the_tts_decoder_parked(tmp_path: Path) -> None:
    """The doctor's forecast there: the decoder's parameters parked, and its candidates fit beside the engine."""
    env = {**os.environ, "UNIOPT_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        with small_vm.small_vm() as vm:
            command = vm.command([sys.executable, "-c", "from uniopt.cli import main; main()", "doctor", "--json"])
            proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    except small_vm.Unavailable as exc:
        pytest.skip(str(exc))
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)["engines"]}
    tts = rows["tts"]
    decoder = next(c for c in tts["components"] if c["name"] == "decoder")
    assert tts["parked_bytes"] > 700 * MiB, tts["parked_bytes"]
    assert decoder["fitting"], tts["verdict"]
    assert rows["diarization"]["parked_bytes"] == 0  # 11 MiB of weights: not worth a file
