"""A cache that cannot be written never takes the process down: warn once, go on without persistence."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from uniopt import UniversalOptimizer
from uniopt.cache import ArtifactCache
from uniopt.cache import store as cache_store
from uniopt.errors import CacheError
from uniopt.plugins.model_cache import model_cache

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    model_cache.clear()
    monkeypatch.setattr(cache_store, "_warned", set())
    yield
    model_cache.clear()


def model() -> tuple[nn.Module, torch.Tensor]:
    """About 1 MiB of weights: more than the small file systems below hold."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval(), torch.randn(2, 256)


def write(directory: Path) -> None:
    (directory / "data.bin").write_bytes(b"x" * 1000)


def warnings_about(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if words in r.getMessage()]


@pytest.mark.parametrize("mode", ["tier", "auto"])
def test_a_cache_path_that_is_a_file(tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    net, x = model()
    caplog.set_level(logging.WARNING, logger="uniopt")
    settings: dict[str, Any] = {"tier": "cpu-avx512", "model_warmup_runs": 1, "allow": ("eager", "onnxruntime-fp32")}
    opt = UniversalOptimizer(net, (x,), mode=mode, cache_dir=str(blocker / "cache"), **settings)
    assert opt.report().component("module").candidate("onnxruntime-fp32").accepted
    with torch.inference_mode():
        torch.testing.assert_close(opt(x), net(x), atol=1e-4, rtol=1e-4)
    assert len(warnings_about(caplog, "without a persistent cache")) == 1
    assert blocker.read_text() == "not a directory"


def test_a_required_cache_still_raises(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(CacheError, match="UNIOPT_CACHE_DIR"):
        ArtifactCache(tmp_path / "afile" / "cache", required=True)


def test_permission_denied_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ArtifactCache._open

    def denied(self: ArtifactCache, root: Path) -> None:
        if root == tmp_path / "cache":
            raise PermissionError(errno.EACCES, "Permission denied", str(root))
        real(self, root)

    monkeypatch.setattr(ArtifactCache, "_open", denied)
    cache = ArtifactCache(tmp_path / "cache")
    assert not cache.persistent and cache.requested_root == tmp_path / "cache"
    entry, built = cache.get_or_build("k", write, kind="test", description={})
    assert built and entry.valid and (entry.path / "data.bin").stat().st_size == 1000


def test_no_space_during_a_build_moves_to_a_private_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = ArtifactCache(tmp_path / "cache")
    full = [True]

    def fills_up(directory: Path) -> None:
        if full.pop() if full else False:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        write(directory)

    caplog.set_level(logging.WARNING, logger="uniopt.cache")
    entry, built = cache.get_or_build("k", fills_up, kind="test", description={})
    assert built and entry.valid and not cache.persistent
    assert tmp_path / "cache" not in entry.path.parents
    assert os.listdir(tmp_path / "cache" / "tmp") == [] and os.listdir(tmp_path / "cache" / "entries") == []
    assert len(warnings_about(caplog, "without a persistent cache")) == 1
    other, built = cache.get_or_build("k2", write, kind="test", description={})
    assert built and other.valid and len(warnings_about(caplog, "without a persistent cache")) == 1


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        for option in options:
            subprocess.run(["mount", "-o", f"remount,{option}", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _can_mount() -> bool:
    return ROOT and subprocess.run(["which", "mount"], capture_output=True).returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs root to mount a small tmpfs")


@needs_mount
@pytest.mark.parametrize("mode", ["tier", "auto"])
def test_a_real_full_file_system(tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: str) -> None:
    net, x = model()
    caplog.set_level(logging.WARNING, logger="uniopt")
    with tmpfs(tmp_path / "small", "256k") as small:
        allow = ("eager", "onnxruntime-fp32")
        opt = UniversalOptimizer(
            net, (x,), mode=mode, tier="cpu-avx512", model_warmup_runs=1, cache_dir=str(small), allow=allow
        )
        result = opt.report().component("module").candidate("onnxruntime-fp32")
        assert result.accepted, result.reason
        with torch.inference_mode():
            torch.testing.assert_close(opt(x), net(x), atol=1e-4, rtol=1e-4)
        assert len(warnings_about(caplog, "without a persistent cache")) == 1
        assert os.listdir(small / "tmp") == []  # nothing half-written left behind


@needs_mount
def test_a_real_read_only_file_system(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    net, x = model()
    caplog.set_level(logging.WARNING, logger="uniopt")
    with tmpfs(tmp_path / "ro", "1m", "ro") as ro:
        opt = UniversalOptimizer(
            net, (x,), mode="auto", tier="cpu-avx512", model_warmup_runs=1, cache_dir=str(ro / "cache"),
            allow=("eager", "torch-int8"),
        )  # fmt: skip
        # "torch-int8" allows its family: torch-int8-weights too; neither writes to disk
        assert opt.report().component("module").chosen in ("eager", "torch-int8", "torch-int8-weights")
        assert os.listdir(ro) == []
        assert len(warnings_about(caplog, "without a persistent cache")) == 1
