"""`optimize bench` on a user's module and `optimize cache ls|verify|clear`, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from uniopt.cache import ArtifactCache
from uniopt.cli import app
from uniopt.plugins.model_cache import model_cache

FACTORY = """
import torch

def mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    return model, (torch.randn(4, 32),)
"""


@pytest.fixture
def user_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_engines.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("UNIOPT_ALLOW", "onnxruntime-fp32,torch-int8")
    monkeypatch.setenv("MODEL_WARMUP_RUNS", "1")
    model_cache.clear()
    return "my_engines:mlp"


def _bench(*args: str) -> Any:
    return CliRunner().invoke(app, ["bench", *args])


def test_bench_json_reports_every_candidate_against_eager(user_engine: str) -> None:
    result = _bench(user_engine, "--json", "--budget", "20")
    assert result.exit_code == 0, result.output
    (engine,) = json.loads(result.output)
    assert engine["engine"] == user_engine and engine["mode"] == "auto"
    (component,) = engine["components"]
    by_name = {c["name"]: c for c in component["candidates"]}
    assert by_name["eager"]["speedup"] == 1.0
    for name in ("onnxruntime-fp32", "torch-int8"):
        c = by_name[name]
        assert c["accepted"], c["reason"]
        assert 0 < c["p50_ms"] <= c["p95_ms"] <= c["p99_ms"]
    assert by_name["openvino-f32"]["reason"].startswith("not available: not in UNIOPT_ALLOW")
    assert component["chosen"] in {n for n, c in by_name.items() if c["accepted"]}
    assert not component["decision_from_cache"]  # bench always measures afresh
    memory = engine["memory"]
    # The figures of the whole optimization (the child's peak is folded in: tests/test_isolation.py).
    assert memory["peak_rss_bytes"] >= memory["engine_rss_bytes"] > 0 and memory["optimized_rss_bytes"] > 0
    assert any(s["step"].startswith("onnx-export") for c in component["candidates"] for s in c["memory_steps"])


def test_verbose_logs_what_auto_mode_does_on_stderr(user_engine: str) -> None:
    import logging

    from rich.logging import RichHandler

    logger = logging.getLogger("uniopt")
    level = logger.level
    try:
        result = CliRunner().invoke(app, ["-v", "bench", user_engine, "--json", "--budget", "20"])
        assert result.exit_code == 0, result.output
        assert "FP32 references for" in result.stderr  # an INFO record
        assert "needs ~" not in result.stderr  # the memory steps are DEBUG records: -vv
        json.loads(result.stdout)  # stdout stays the JSON
    finally:
        logger.setLevel(level)
        for handler in [h for h in logger.handlers if isinstance(h, RichHandler)]:
            logger.removeHandler(handler)


def test_bench_table_shows_the_memory_line(user_engine: str) -> None:
    result = _bench(user_engine, "--budget", "10")
    assert result.exit_code == 0, result.output
    assert "peak while optimizing" in result.output and "child processes" in result.output


def test_bench_table_marks_the_choice(user_engine: str) -> None:
    result = _bench(user_engine, "--budget", "20")
    assert result.exit_code == 0, result.output
    assert "x eager" in result.output and "✔" in result.output and "onnxruntime-fp32" in result.output


def test_bench_names_an_unknown_engine() -> None:
    result = _bench("no_such_module:factory", "--json")
    assert result.exit_code == 2 and "cannot import no_such_module" in result.output


def test_cache_ls_verify_clear(user_engine: str) -> None:
    assert _bench(user_engine, "--json", "--budget", "10").exit_code == 0
    listed = CliRunner().invoke(app, ["cache", "ls", "--json"])
    assert listed.exit_code == 0, listed.output
    data = json.loads(listed.output)
    kinds = {e["kind"] for e in data["entries"]}
    assert {"onnx-export", "onnxruntime-fp32", "decision"} <= kinds
    assert data["total_bytes"] == sum(e["size_bytes"] for e in data["entries"]) > 0

    assert CliRunner().invoke(app, ["cache", "verify"]).exit_code == 0
    cache = ArtifactCache(data["root"])
    export = next(e for e in cache.entries() if e.kind == "onnx-export")
    model = export.path / "model.onnx"
    blob = bytearray(model.read_bytes())
    blob[-10:] = bytes(b ^ 0xFF for b in blob[-10:])  # same size, other bytes: only sha256 sees it
    model.write_bytes(bytes(blob))
    verified = CliRunner().invoke(app, ["cache", "verify"])
    assert verified.exit_code == 1 and "does not match its sha256" in verified.output

    cleared = CliRunner().invoke(app, ["cache", "clear"])
    assert cleared.exit_code == 0 and f"removed {len(data['entries'])} entries" in cleared.output
    assert ArtifactCache(data["root"]).entries() == []
