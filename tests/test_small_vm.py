"""The machine uniopt exists for: a 1.3 CPU / 1.5 GiB cgroup, where optimizing must never get the process killed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from small_vm_script import small_vm

ROOT = Path(__file__).resolve().parents[1]
#: The decoder's stages that run its own loop over exported decode steps (the tiers' decoder chain).
DECODE_STEP_STAGES = ("onnxruntime-steps-int8", "openvino-stateful-frame-int8", "openvino-stateful-int8")


@pytest.mark.cgroup
def test_phoneme_engine_tier_and_auto_mode_finish_in_a_small_vm(tmp_path: Path) -> None:
    """Empty cache, default (base-size) wav2vec2: each mode ends optimized or eager, with reasons, never killed.

    Each row is a cold process, optimizing and then running ``extract_phonemes`` on 8 s, and a warm one.
    """
    out = tmp_path / "rows.json"
    script = str(ROOT / "benchmarks" / "memory.py")
    command = [sys.executable, script, "phoneme", "--mode", "tier", "--mode", "auto", "--small-vm"]
    try:
        with small_vm.small_vm(1.0, 64 * 2**20):  # can a cgroup be made here at all?
            pass
    except small_vm.Unavailable as exc:
        pytest.skip(str(exc))
    proc = subprocess.run([*command, "--json", str(out)], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert [row["mode"] for row in rows] == ["tier", "auto"]
    for row in rows:
        assert "error" not in row, row.get("error")
        assert row["limit"] == small_vm.LIMIT_1_5_GIB
        # Exports of the 95 M-parameter encoder do not fit there: refused with the reason, before running.
        assert row["refused"], "nothing was refused for memory: the estimates are not being checked"
        for reason in row["refused"]:
            assert "available under the 1.5 GiB limit" in reason, reason
        assert row["peak"] < small_vm.LIMIT_1_5_GIB
        assert row["warm_chosen"] == row["chosen"], "the warm start did not apply the cold start's choice"


@pytest.mark.slow
@pytest.mark.cgroup
def test_tts_decoder_is_optimized_in_a_small_vm(tmp_path: Path) -> None:
    """Empty cache, tier mode: the decoder's weights are parked and a decode-steps stage is built there."""
    out = tmp_path / "rows.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "memory.py"), "tts", "--mode", "tier", "--small-vm"]
    try:
        with small_vm.small_vm(1.0, 64 * 2**20):
            pass
    except small_vm.Unavailable as exc:
        pytest.skip(str(exc))
    proc = subprocess.run([*command, "--json", str(out)], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr
    [row] = json.loads(out.read_text())
    assert "error" not in row, row.get("error")
    assert row["parked"] > 700 * 2**20
    assert row["chosen"]["decoder"] in DECODE_STEP_STAGES, row["chosen"]
    # Quantized one weight at a time, the ONNX Runtime steps' export fits once the decoder is parked.
    assert not [reason for reason in row["refused"] if "onnxruntime-step-export" in reason], row["refused"]
    assert row["warm_chosen"] == row["chosen"]
    # The int8 stage and the codec's model take less than the parked float weights gave back.
    assert row["optimized_rss"] < row["eager_rss"]
