"""Tests of uniopt.cache: keys, atomic entries, invalid entries, LRU eviction, several processes."""

from __future__ import annotations

import builtins
import dataclasses
import enum
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from filelock import FileLock, Timeout

import uniopt
import uniopt.cache
from uniopt.cache import (
    ArtifactCache,
    CacheEntry,
    cache_key,
    hash_module,
    input_signature,
    library_versions,
)
from uniopt.errors import CacheError

WORKER = Path(__file__).with_name("cache_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"


@dataclasses.dataclass(frozen=True)
class Profile:
    tier: str
    flags: tuple[str, ...]


class Precision(enum.Enum):
    FP32 = "fp32"
    INT8 = "int8"


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.scale


class OtherNet(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) - self.scale


def make_net(cls: type[TinyNet] = TinyNet, seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return cls()


def writer(content: bytes = b"x" * 100, name: str = "model.bin", calls: list[int] | None = None):
    """Return a build function that writes two files (one in a subfolder) and counts its calls."""

    def build(tmpdir: Path) -> dict[str, Any]:
        if calls is not None:
            calls.append(1)
        (tmpdir / name).write_bytes(content)
        (tmpdir / "sub").mkdir()
        (tmpdir / "sub" / "weights.dat").write_bytes(b"w" * 10)
        return {"opset": 17, "file": Path("model.bin")}

    return build


def build_entry(cache: ArtifactCache, key: str, calls: list[int] | None = None, size: int = 100):
    return cache.get_or_build(key, writer(b"x" * size, calls=calls), kind="onnx", description={"model": key})


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    return env


# -- public names ---------------------------------------------------------------------------------


def test_public_names() -> None:
    assert sorted(uniopt.cache.__all__) == sorted(
        [
            "ArtifactCache",
            "CacheEntry",
            "cache_key",
            "default_cache_dir",
            "hash_module",
            "input_signature",
            "library_versions",
        ]
    )
    assert isinstance(uniopt.cache.default_cache_dir(), Path)


# -- keys -----------------------------------------------------------------------------------------


def test_cache_key_is_stable_and_sensitive() -> None:
    parts = {"opset": 17, "shape": (1, 16000), "precision": Precision.FP32, "out": Path("a/b")}
    key = cache_key(parts)
    assert len(key) == 64 and int(key, 16) >= 0
    assert cache_key(dict(reversed(list(parts.items())))) == key
    assert cache_key({**parts, "shape": [1, 16000]}) == key
    assert cache_key({**parts, "opset": 18}) != key
    assert cache_key({**parts, "precision": Precision.INT8}) != key
    assert cache_key({"x": float("nan")}) == cache_key({"x": float("nan")})
    profile = Profile("avx2", ("avx2", "fma"))
    assert cache_key({"host": profile}) == cache_key({"host": Profile("avx2", ("avx2", "fma"))})
    assert cache_key({"host": profile}) != cache_key({"host": Profile("avx512", ("avx2", "fma"))})


def test_cache_key_rejects_unserializable_values() -> None:
    with pytest.raises(TypeError):
        cache_key({"model": object()})
    with pytest.raises(TypeError):
        cache_key({"bad": {1: "int key"}})


def test_hash_module_same_seed_same_hash_and_weight_change_detected() -> None:
    first = hash_module(make_net())
    assert first == hash_module(make_net())
    assert len(first) == 64
    assert hash_module(make_net(seed=1)) != first
    net = make_net()
    with torch.no_grad():
        net.proj.weight[0, 0] += 1e-6
    assert hash_module(net) != first
    net = make_net()
    with torch.no_grad():
        net.get_buffer("scale")[2] = 2.0
    assert hash_module(net) != first
    assert hash_module(make_net(OtherNet)) != first
    scalar = torch.nn.Module()
    scalar.register_buffer("step", torch.tensor(3, dtype=torch.int64))
    assert hash_module(scalar) == hash_module(scalar)


class Scaled(torch.nn.Module):
    """Equal parameters; outputs differ by a non-persistent buffer and by plain attributes."""

    def __init__(self, offset: float = 0.0, scale: float = 1.0, power: int = 1, clamp: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(4, 3)
        self.register_buffer("offset", torch.full((3,), offset), persistent=False)
        self.scale, self.power, self.clamp, self.activation = scale, power, clamp, "identity"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (self.proj(x) * self.scale + self.offset) ** self.power
        y = torch.tanh(y) if self.activation == "tanh" else y
        return y.clamp(-1, 1) if self.clamp else y


def test_hash_module_covers_non_persistent_buffers_and_plain_attributes() -> None:
    x = torch.randn(2, 4)
    base = Scaled()
    variants = [Scaled(offset=1.0), Scaled(scale=2.0), Scaled(power=2), Scaled(clamp=True), Scaled()]
    variants[-1].activation = "tanh"
    for other in variants:
        assert dict(other.named_parameters()).keys() == dict(base.named_parameters()).keys()
        assert all(torch.equal(a, b) for a, b in zip(other.parameters(), base.parameters(), strict=True))
        assert not torch.equal(other(x), base(x))  # a different function...
        assert hash_module(other) != hash_module(base)  # ...so a different key
    assert hash_module(Scaled()) == hash_module(base)
    base.train()  # the optimizer puts modules in eval(); the flag itself is not part of the key
    assert hash_module(base) == hash_module(Scaled().eval())


class Cache(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(2, 3), persistent=False)
        self.register_buffer("v_cache", torch.zeros(2, 3))  # persistent, as in Fish-Speech's own KVCache
        self.register_buffer("history", torch.zeros(4), persistent=False)
        self.uniopt_state_buffers = ("history",)
        self.register_buffer("window", torch.ones(3), persistent=False)


class Decoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(3, 3)
        self.cache = Cache()
        self.register_buffer("steps", torch.zeros(1), persistent=False)


def test_state_buffers_count_by_dtype_and_shape_only() -> None:
    torch.manual_seed(0)
    net = Decoder()
    first = hash_module(net)
    for name in ("cache.k_cache", "cache.v_cache", "cache.history"):  # by name, and declared by the module
        net.get_buffer(name).add_(1.0)
    assert hash_module(net) == first
    net.get_buffer("steps").add_(1.0)  # not declared: a constant, so it counts...
    assert hash_module(net) != first
    assert hash_module(net, state_buffers=["steps"]) == hash_module(net, state_buffers=["steps"])
    declared = hash_module(net, state_buffers=["steps"])
    net.get_buffer("steps").add_(1.0)  # ...unless the component declares it
    assert hash_module(net, state_buffers=["steps"]) == declared
    net.get_buffer("cache.window").mul_(2.0)
    assert hash_module(net, state_buffers=["steps"]) != declared
    resized = Decoder()
    resized.cache.register_buffer("k_cache", torch.zeros(2, 5), persistent=False)  # a state's shape counts
    assert hash_module(resized) != hash_module(Decoder())
    wider = Decoder()
    wider.cache.register_buffer("k_cache", torch.zeros(2, 3, dtype=torch.bfloat16), persistent=False)
    assert hash_module(wider) != hash_module(Decoder())


def test_component_keys_cover_calibration_inputs_and_state_buffers() -> None:
    torch.manual_seed(0)
    x, calib = torch.randn(2, 4), [(torch.randn(2, 4),)]
    component = uniopt.Component("net", make_net(), (x,), calibration_inputs=calib)
    same = uniopt.Component("net", make_net(), (x.clone(),), calibration_inputs=[(calib[0][0].clone(),)])
    other_calibration = uniopt.Component("net", make_net(), (x,), calibration_inputs=[(calib[0][0] + 1,)])
    other_example = uniopt.Component("net", make_net(), (x + 1,), calibration_inputs=calib)
    assert component.calibration_key() == same.calibration_key()
    assert other_calibration.calibration_key() != component.calibration_key()
    assert other_example.calibration_key() != component.calibration_key()  # the example is calibrated on too
    net = Decoder()
    declared = uniopt.Component("dec", net, (torch.zeros(1, 3),), state_buffers=["steps"])
    key = declared.key()
    net.get_buffer("steps").add_(1.0)
    assert uniopt.Component("dec", net, (torch.zeros(1, 3),), state_buffers=["steps"]).key() == key
    assert uniopt.Component("dec", net, (torch.zeros(1, 3),)).key() != key


def test_library_versions_does_not_import_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    libraries = {"torch", "onnx", "onnxruntime", "openvino", "nncf", "transformers"}
    real_import = builtins.__import__

    def guarded_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] in libraries:
            raise AssertionError(f"library_versions imported {name}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded_import)
    versions = library_versions()
    monkeypatch.undo()
    assert set(versions) == libraries | {"uniopt"}
    assert versions["torch"] is not None and versions["torch"].startswith(torch.__version__[:4])
    assert versions["uniopt"] == uniopt.__version__


def test_uniopt_version_is_part_of_every_artifact_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Artifact and decision keys include library_versions(): another uniopt release makes other keys."""
    from uniopt.plugins.export import export_key

    component = uniopt.Component("net", make_net(), (torch.zeros(2, 4),))
    before = cache_key(export_key(component))
    real_version = importlib.metadata.version

    def version(dist: str) -> str:
        return "99.0" if dist == "uniopt" else real_version(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert library_versions()["uniopt"] == "99.0"
    assert cache_key(export_key(component)) != before


def test_input_signature_describes_nested_inputs() -> None:
    inputs = (
        torch.zeros(2, 3),
        {"lengths": np.zeros((2,), dtype=np.int64), "flag": True},
        [16000, 0.5, None, "en"],
    )
    sig = input_signature(inputs)
    assert sig == [
        {"type": "tensor", "dtype": "float32", "shape": [2, 3]},
        {
            "type": "dict",
            "items": [
                ["lengths", {"type": "ndarray", "dtype": "int64", "shape": [2]}],
                ["flag", {"type": "bool", "value": True}],
            ],
        },
        {
            "type": "list",
            "items": [
                {"type": "int", "value": 16000},
                {"type": "float", "value": 0.5},
                {"type": "NoneType", "value": None},
                {"type": "str", "value": "en"},
            ],
        },
    ]
    json.dumps(sig)
    assert input_signature((torch.zeros(2, 4),)) != input_signature((torch.zeros(2, 3),))
    assert input_signature(torch.zeros(1)) == input_signature((torch.zeros(1),))
    with pytest.raises(TypeError):
        input_signature((object(),))


# -- building and hits ----------------------------------------------------------------------------


def test_build_once_then_hit(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    calls: list[int] = []
    entry, built = build_entry(cache, "k1", calls)
    assert built and calls == [1]
    assert entry.path == cache.path_for("k1") == tmp_path / "entries" / "k1"
    assert (entry.path / "manifest.json").is_file()
    assert set(entry.files) == {"model.bin", "sub/weights.dat"}
    assert entry.files["model.bin"]["size"] == 100
    assert entry.extra == {"opset": 17, "file": "model.bin"}
    assert entry.kind == "onnx" and entry.description == {"model": "k1"} and entry.valid

    again, built = build_entry(cache, "k1", calls)
    assert not built and calls == [1]
    assert again.files == entry.files and again.extra == entry.extra
    assert again.created == entry.created
    hit = ArtifactCache(tmp_path).get("k1")
    assert hit is not None and hit.size_bytes == entry.size_bytes == cache.total_bytes()
    assert os.listdir(tmp_path / "tmp") == []


def test_failing_build_leaves_nothing(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)

    def build(tmpdir: Path) -> None:
        (tmpdir / "half.bin").write_bytes(b"partial")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        cache.get_or_build("k1", build, kind="onnx", description={})
    assert cache.get("k1") is None
    assert cache.entries() == []
    assert os.listdir(tmp_path / "entries") == [] and os.listdir(tmp_path / "tmp") == []
    _, built = build_entry(cache, "k1")
    assert built


def test_unserializable_extra_or_description_fails_cleanly(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    with pytest.raises(TypeError):
        cache.get_or_build("k1", lambda d: {"bad": object()}, kind="x", description={})
    with pytest.raises(TypeError):
        cache.get_or_build("k1", writer(), kind="x", description={"bad": object()})
    assert cache.entries() == [] and os.listdir(tmp_path / "tmp") == []


def test_invalid_key_is_rejected(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    for key in ("../escape", "", "a/b", "x" * 200):
        with pytest.raises(ValueError):
            cache.path_for(key)


# -- invalid entries ------------------------------------------------------------------------------


def test_truncated_file_is_a_miss_and_rebuilt_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = ArtifactCache(tmp_path)
    calls: list[int] = []
    entry, _ = build_entry(cache, "k1", calls)
    with open(entry.path / "model.bin", "r+b") as f:
        f.truncate(10)
    with caplog.at_level(logging.WARNING, logger="uniopt.cache"):
        assert cache.get("k1") is None
        assert not entry.path.exists()
        rebuilt, built = build_entry(cache, "k1", calls)
        assert built and calls == [1, 1]
        assert (rebuilt.path / "model.bin").stat().st_size == 100
        # A second corruption of the same key in this process is not reported again.
        (rebuilt.path / "model.bin").write_bytes(b"short")
        assert cache.get("k1") is None
    warnings = [r for r in caplog.records if r.name == "uniopt.cache"]
    assert len(warnings) == 1
    assert "k1" in warnings[0].getMessage() and "rebuilt" in warnings[0].getMessage()


@pytest.mark.parametrize("damage", ["delete_file", "corrupt_manifest", "missing_manifest"])
def test_damaged_entry_is_rebuilt(tmp_path: Path, damage: str) -> None:
    cache = ArtifactCache(tmp_path)
    calls: list[int] = []
    entry, _ = build_entry(cache, "k1", calls)
    if damage == "delete_file":
        (entry.path / "sub" / "weights.dat").unlink()
    elif damage == "corrupt_manifest":
        (entry.path / "manifest.json").write_text('{"schema": 1, "key": "k1", "fil')
    else:  # a process killed after writing files but before the manifest
        (entry.path / "manifest.json").unlink()
    [listed] = cache.entries()
    assert not listed.valid and listed.problem
    rebuilt, built = build_entry(cache, "k1", calls)
    assert built and calls == [1, 1] and rebuilt.valid
    assert cache.get("k1") is not None
    assert [e.problem for e in cache.entries()] == [None]


def test_stale_temporary_is_ignored_and_cleared(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    stale = tmp_path / "tmp" / "k1.99999999.1.deadbeef"  # no process has this pid
    stale.mkdir()
    (stale / "model.bin").write_bytes(b"half")
    fresh = tmp_path / "tmp" / f"k2.{os.getpid()}.1.cafe"
    fresh.mkdir()
    assert cache.get("k1") is None and cache.entries() == []
    _, built = build_entry(cache, "k1")
    assert built
    two_hours_ago = time.time() - 7200
    for path in (stale / "model.bin", stale):
        os.utime(path, (two_hours_ago, two_hours_ago))
    ArtifactCache(tmp_path)  # construction removes stale temporaries
    assert not stale.exists() and fresh.exists()

    stale.mkdir()
    os.utime(stale, (two_hours_ago, two_hours_ago))
    assert cache.clear() == 1
    assert not stale.exists() and fresh.exists()


# -- maintenance ----------------------------------------------------------------------------------


def test_lru_eviction_respects_use(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    sizes = {}
    for key in ("a", "b", "c"):
        entry, _ = build_entry(cache, key, size=1000)
        sizes[key] = entry.size_bytes
        time.sleep(0.01)
    assert cache.get("a") is not None  # "a" is now the most recently used
    assert [e.key for e in cache.entries()] == ["b", "c", "a"]
    assert cache.evict(sizes["a"] + sizes["c"]) == ["b"]
    assert cache.evict() == []  # no limit configured

    # Room for two entries (manifests differ by a few bytes), not three.
    limited = ArtifactCache(tmp_path, max_bytes=sizes["a"] + sizes["c"] + 50)
    time.sleep(0.01)
    _, built = build_entry(limited, "d", size=1000)
    assert built
    assert sorted(e.key for e in limited.entries()) == ["a", "d"]
    big, built = build_entry(limited, "e", size=100_000)  # too big alone, but kept
    assert built and [e.key for e in limited.entries()] == ["e"]
    assert limited.total_bytes() == big.size_bytes


def test_last_used_survives_processes_and_keeps_entry_valid(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    entry, _ = build_entry(cache, "k1")
    time.sleep(0.01)
    used = cache.get("k1")
    assert used is not None and used.last_used > entry.last_used
    reread = ArtifactCache(tmp_path).entries()[0]
    assert reread.last_used == pytest.approx(used.last_used) and reread.valid
    assert [problem for _, problem in cache.verify()] == [None]


def test_verify_detects_same_size_byte_flip(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    entry, _ = build_entry(cache, "k1")
    build_entry(cache, "k2")
    data = bytearray((entry.path / "model.bin").read_bytes())
    data[50] ^= 0xFF
    (entry.path / "model.bin").write_bytes(bytes(data))
    results = {e.key: problem for e, problem in cache.verify()}
    assert results["k2"] is None
    assert results["k1"] is not None and "sha256" in results["k1"]
    assert "model.bin" in results["k1"]


def test_remove_and_clear(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    for key in ("a", "b", "c"):
        build_entry(cache, key)
    cache.remove("a")
    cache.remove("a")  # removing a missing entry is fine
    assert cache.get("a") is None
    assert sorted(e.key for e in cache.entries()) == ["b", "c"]
    assert cache.clear() == 2
    assert cache.entries() == [] and cache.total_bytes() == 0
    assert os.listdir(tmp_path / "tmp") == []


def test_unwritable_root_raises_cache_error_when_required(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    root = afile / "cache"
    with pytest.raises(CacheError, match="UNIOPT_CACHE_DIR") as info:
        ArtifactCache(root, required=True)
    assert str(root) in str(info.value)
    assert isinstance(info.value, OSError)


def test_lock_timeout_builds_without_the_lock(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class QuickCache(ArtifactCache):
        LOCK_TIMEOUT = 0.1

    cache = QuickCache(tmp_path)
    held = FileLock(tmp_path / "locks" / "k1.lock")
    with held, caplog.at_level(logging.WARNING, logger="uniopt.cache"):
        entry, built = build_entry(cache, "k1")
    assert built and entry.valid and cache.get("k1") is not None
    assert any("without its lock" in r.getMessage() for r in caplog.records)


def test_entry_published_by_another_process_during_build_wins(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    other = ArtifactCache(tmp_path)

    def build(tmpdir: Path) -> None:
        # Another process, not honouring the lock, publishes the same key meanwhile.
        other._build("k1", writer(b"theirs"), "onnx", {})
        (tmpdir / "model.bin").write_bytes(b"ours")

    entry, built = cache.get_or_build("k1", build, kind="onnx", description={})
    assert not built
    assert (entry.path / "model.bin").read_bytes() == b"theirs"
    assert os.listdir(tmp_path / "tmp") == []


def test_invalid_leftover_at_destination_is_replaced(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)

    def build(tmpdir: Path) -> None:
        leftover = cache.path_for("k1")
        leftover.mkdir()
        (leftover / "model.bin").write_bytes(b"junk")  # no manifest: invalid
        (tmpdir / "model.bin").write_bytes(b"ours")

    entry, built = cache.get_or_build("k1", build, kind="onnx", description={})
    assert built and (entry.path / "model.bin").read_bytes() == b"ours"
    hit = cache.get("k1")
    assert hit is not None and hit.files == entry.files and hit.created == entry.created


def test_runtime_files_count_towards_the_entry_and_go_with_it(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    entry, _ = build_entry(cache, "k1")
    folder = cache.runtime_dir(entry.path)
    assert folder == entry.path / "runtime" and folder.is_dir()
    (folder / "compiled.blob").write_bytes(b"b" * 5000)
    (found,) = cache.entries()
    assert found.size_bytes == entry.size_bytes + 5000 and found.valid
    assert cache.verify_entry("k1") is None, "runtime files are not part of the manifest's check"
    cache.remove("k1")
    rebuilt, built = build_entry(cache, "k1")
    assert built and rebuilt.path == entry.path and not (rebuilt.path / "runtime").exists()
    (cache.runtime_dir(rebuilt.path) / "compiled.blob").write_bytes(b"b" * 5000)
    assert cache.evict(rebuilt.size_bytes + 100) == ["k1"], "the runtime files push it over the limit"
    assert cache.runtime_dir(tmp_path / "elsewhere" / "k1") is None

    def reserved(tmpdir: Path) -> None:
        (tmpdir / "runtime").mkdir()
        (tmpdir / "runtime" / "x").write_bytes(b"x")

    with pytest.raises(ValueError, match="reserved"):
        cache.get_or_build("k2", reserved, kind="onnx", description={})


def test_runtime_files_of_a_bundle_entry_go_to_a_companion_entry(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    build_entry(ArtifactCache(bundle), "k1")
    before = sorted(str(p) for p in bundle.rglob("*"))
    cache = ArtifactCache(tmp_path / "cache", bundle=bundle)
    entry = cache.get("k1")
    assert entry is not None and entry.path.parent == bundle / "entries"
    folder = cache.runtime_dir(entry.path)
    assert folder is not None and (tmp_path / "cache" / "entries") in folder.parents
    assert cache.runtime_dir(entry.path) == folder
    (folder / "compiled.blob").write_bytes(b"b" * 10)
    assert [e.kind for e in cache.entries()] == ["runtime"]
    assert sorted(str(p) for p in bundle.rglob("*")) == before, "the bundle was written"


def test_an_entry_in_use_is_not_evicted_or_cleared(tmp_path: Path) -> None:
    cache, other = ArtifactCache(tmp_path), ArtifactCache(tmp_path)
    for key in ("a", "b"):
        build_entry(cache, key)
    with cache.pinned():
        assert cache.get("a") is not None
        with cache.pinned():  # nested: the outer block holds
            cache.get("b")
        assert other.evict(0) == [] and other.clear() == 0
    assert sorted(other.evict(0)) == ["a", "b"]
    with cache.pinned():
        entry, built = build_entry(cache, "c")  # built inside the block: held as well
        assert built and other.evict(0) == [] and entry.path.exists()
    assert other.clear() == 1


def test_lock_names_a_key_and_a_purpose(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    with cache.lock("k1.decide", timeout=1):
        assert (tmp_path / "locks" / "k1.decide.lock").exists()
        with pytest.raises(Timeout):
            ArtifactCache(tmp_path).lock("k1.decide", timeout=0.05).acquire()
    for bad in ("k1", "k1.Bad", "../k1.decide"):
        with pytest.raises(ValueError):
            cache.lock(bad, timeout=1)


@pytest.mark.parametrize(("folder", "name"), [("openvino", "123.blob"), ("inductor", "fxgraph/ab/graph")])
def test_clear_removes_the_folders_kept_outside_the_entries_before(tmp_path: Path, folder: str, name: str) -> None:
    cache = ArtifactCache(tmp_path)
    (tmp_path / folder / name).parent.mkdir(parents=True)
    (tmp_path / folder / name).write_bytes(b"old")
    cache.clear()
    assert not (tmp_path / folder).exists()


# -- several processes ----------------------------------------------------------------------------


def test_two_processes_build_once(tmp_path: Path) -> None:
    root, counter, start = tmp_path / "cache", tmp_path / "counter.txt", tmp_path / "start"
    args = [sys.executable, str(WORKER), str(root), "shared", str(counter), "1.0", str(start)]
    procs = [subprocess.Popen(args, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    try:  # both workers have imported everything: start them together
        assert [p.stdout.readline() for p in procs if p.stdout] == [b"ready\n", b"ready\n"]
    finally:
        start.touch()
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err.decode() for _, err in outputs]
    results = [out.decode().strip().split("|") for out, _ in outputs]
    assert all(len(r) == 2 for r in results), outputs
    contents = {content for content, _ in results}
    assert len(contents) == 1
    assert sorted(built for _, built in results) == ["False", "True"]
    assert len(counter.read_text().splitlines()) == 1
    entry = ArtifactCache(root).get("shared")
    assert entry is not None and (entry.path / "artifact.txt").read_text() in contents


def test_killed_builder_leaves_no_entry_and_rebuild_succeeds(tmp_path: Path) -> None:
    root, counter = tmp_path / "cache", tmp_path / "counter.txt"
    args = [sys.executable, str(WORKER), str(root), "k1", str(counter), "60"]
    proc = subprocess.Popen(args, env=worker_env(), stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (counter.exists() and counter.read_text().strip()):
            assert time.monotonic() < deadline and proc.poll() is None, "worker did not start"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    cache = ArtifactCache(root)
    [leftover] = os.listdir(root / "tmp")
    assert leftover.startswith(f"k1.{proc.pid}.")
    assert cache.get("k1") is None and cache.entries() == []

    entry: CacheEntry
    entry, built = build_entry(cache, "k1")
    assert built and entry.valid and cache.get("k1") is not None
    assert os.listdir(root / "tmp") == [leftover]  # too young to be stale: ignored


def test_eviction_in_another_process_never_deletes_an_entry_being_read(tmp_path: Path) -> None:
    root, release = tmp_path / "cache", tmp_path / "release"
    cache = ArtifactCache(root)
    for key in ("read", "idle"):
        entry, _ = cache.get_or_build(key, writer(b"x" * 100, name="artifact.txt"), kind="test", description={})
    reader = subprocess.Popen(
        [sys.executable, str(WORKER), "hold", str(root), "read", str(release)],
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "holding", reader.stderr
        evictor = subprocess.run(
            [sys.executable, str(WORKER), "evict", str(root), "0"],
            env=worker_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert evictor.returncode == 0, evictor.stderr
        assert evictor.stdout.strip() == "idle", "only the entry nobody reads is evicted"
        assert cache.get("read") is not None
    finally:
        release.touch()
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    assert out.strip() == "x" * 100, "the reader read the whole entry"
    assert ArtifactCache(root).evict(0) == ["read"], "once released, it can be evicted"


class _Doubling(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * 2


class _Halving(_Doubling):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) / 2


_Halving.__name__ = _Halving.__qualname__ = "_Doubling"  # scripted, the two look alike but for their code


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_scripted_modules_with_equal_weights_and_other_code_get_other_keys() -> None:
    torch.manual_seed(0)
    doubling = _Doubling()
    halving = _Halving()
    halving.load_state_dict(doubling.state_dict())
    a, b = torch.jit.script(doubling), torch.jit.script(halving)
    assert type(a) is type(b) and repr(a) == repr(b)  # only the TorchScript code tells them apart
    assert hash_module(a) != hash_module(b)
    assert hash_module(a) == hash_module(torch.jit.script(doubling))
