"""Bundles: artifacts prepared on one machine (``optimize prepare``) and used read-only on another."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_engines import WideMlp, WideMlpLegacy
from uniopt import UniversalOptimizer
from uniopt.cache import ArtifactCache
from uniopt.errors import CacheError
from uniopt.plugins.model_cache import model_cache
from uniopt.tiers import host_profile

OPTIMIZE = Path(sys.executable).with_name("optimize")
GRAPH = ("onnxruntime-fp32", "onnxruntime-int8", "openvino-f32", "openvino-int8-static")


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle for this host's own profile, made by the CLI as a user would on a build machine."""
    root = tmp_path_factory.mktemp("prepare")
    target = root / "target.json"
    target.write_text(json.dumps(host_profile().to_dict()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    out = root / "bundle"
    proc = subprocess.run(
        [str(OPTIMIZE), "prepare", "tiny_engines:WideMlp", "--for", str(target), "--out", str(out), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["candidate"]: r for r in json.loads(proc.stdout)}
    for name in GRAPH:
        assert rows[name]["status"] == "built", rows[name]
    assert rows["onnxruntime-cuda"]["status"] == "skipped"
    assert "not available on the target" in rows["onnxruntime-cuda"]["reason"]
    assert "torch-int8" not in rows, "PyTorch candidates leave nothing on disk to prepare"
    assert json.loads((out / "bundle.json").read_text())["target_fingerprint"] == host_profile().fingerprint
    return out


def test_a_bundle_is_used_and_never_written(bundle: Path, tmp_path: Path) -> None:
    model_cache.clear()
    before = _snapshot(bundle)
    engine = WideMlp()
    model, inputs = engine.module, engine.example
    opt = UniversalOptimizer(
        engine, mode="auto", allow=("eager", *GRAPH), cache_dir=str(tmp_path), cache_bundle=str(bundle)
    )
    report = opt.report().component("module")
    for name in GRAPH:
        result = report.candidate(name)
        assert result.accepted and result.from_cache, (name, result.reason)
    own = ArtifactCache(tmp_path).entries()
    kinds = {e.kind for e in own}
    assert kinds == {"decision", "reference", "runtime"}, f"built again instead of loading the bundle: {kinds}"
    assert _snapshot(bundle) == before, "the bundle was changed"
    # OpenVINO's compiled blobs for the bundle's IRs: in entries of the writable cache, never in the bundle.
    runtime = [e for e in own if e.kind == "runtime"]
    compiled = ("openvino-plain", "openvino-int8-static")  # the IRs of openvino-f32 and openvino-int8-static
    assert sorted(e.description["for"] for e in runtime) == sorted(
        e.key for e in ArtifactCache(bundle).entries() if e.kind in compiled
    )
    assert all(list((e.path / "runtime").glob("*.blob")) for e in runtime)
    with torch.inference_mode():
        got, want = opt(*inputs), model(*inputs)
    assert got.shape == want.shape
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.995  # the component's metric


def test_an_invalid_bundle_entry_is_passed_over_and_built_in_the_cache(bundle: Path, tmp_path: Path) -> None:
    model_cache.clear()
    copy = tmp_path / "bundle"
    subprocess.run(["cp", "-a", str(bundle), str(copy)], check=True)
    exports = [e for e in ArtifactCache(copy).entries() if e.kind == "onnx-export"]
    assert len(exports) == 1
    model_file = exports[0].path / "model.onnx"
    model_file.write_bytes(model_file.read_bytes()[:100])  # truncated: the size check fails
    opt = UniversalOptimizer(
        WideMlp(),
        mode="tier",
        allow=("eager", "onnxruntime-fp32"),
        cache_dir=str(tmp_path / "cache"),
        cache_bundle=str(copy),
    )
    assert opt.report().component("module").chosen == "onnxruntime-fp32"
    rebuilt = {e.kind for e in ArtifactCache(tmp_path / "cache").entries()}
    assert "onnx-export" in rebuilt, "the truncated bundled export was used or not rebuilt"
    assert len(model_file.read_bytes()) == 100, "the bundle itself was repaired in place"


def test_a_bundle_holds_the_ir_converted_from_the_module(tmp_path: Path) -> None:
    """A legacy-exported component: the bundle's IR is the one converted from the module, and the target loads it."""
    from uniopt.prepare import prepare_bundle

    model_cache.clear()
    out = tmp_path / "bundle"
    rows = prepare_bundle(["tiny_engines:WideMlpLegacy"], host_profile(), out, allow=["eager", "openvino-f32"])
    (row,) = [r for r in rows if r.candidate == "openvino-f32"]
    assert row.status == "built", row
    irs = [e for e in ArtifactCache(out).entries() if e.kind == "openvino-plain"]
    assert [e.description for e in irs] == [{"from": "module"}]
    engine = WideMlpLegacy()
    opt = UniversalOptimizer(
        engine, mode="auto", allow=("eager", "openvino-f32"), cache_dir=str(tmp_path / "cache"), cache_bundle=str(out)
    )
    result = opt.report().component("module").candidate("openvino-f32")
    assert result.accepted and result.from_cache, result.reason
    assert not [s for s in result.memory_steps if s["step"].startswith(("openvino-convert", "onnx-export"))]
    kinds = {e.kind for e in ArtifactCache(tmp_path / "cache").entries()}
    assert not kinds & {"openvino-plain", "onnx-export"}, f"built again instead of loading the bundle: {kinds}"
    opt.restore()


def test_a_directory_that_is_no_bundle_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="not a uniopt cache bundle"):
        ArtifactCache(tmp_path / "cache", bundle=tmp_path)
