"""Measure each build step's peak memory against its estimate (the factors in plugins/memory_costs.py).

    python benchmarks/memory_factors.py [--component phoneme|codec|decoder ...] [--candidate NAME ...]

Every candidate is built in a fresh process with an empty cache, so each step runs from scratch
(export, ORT optimization or quantization, OpenVINO convert, nncf, compile, torch copies). Prints,
per step: its base MiB (the component's weights, or the model file a load step reads), the
measured peak RSS increase, peak / base, the estimate and whether the estimate covered it.
``--json FILE`` keeps the rows. The decode-step candidates run only when named, on the decoder:
``--component decoder --candidate onnxruntime-steps-int8``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = (
    "torch-int8",
    "torch-int8-weights",
    "torch-bf16",
    "onnxruntime-fp32",
    "onnxruntime-int8",
    "openvino-f32",
    "openvino-bf16",
    "openvino-int8-weights",
    "openvino-int8-static",
    "openvino-int8-matmul",
)
#: Candidates for a decoder that declares decode steps (``--component decoder``): not in the default run.
STEP_CANDIDATES = ("onnxruntime-steps-int8", "openvino-stateful-frame-int8", "openvino-stateful-int8")

WORKER = """
import dataclasses, json, sys
from uniopt import UniversalOptimizer
from uniopt.plugins.memory_costs import weight_bytes
name, candidate = sys.argv[1], sys.argv[2]
if name == "phoneme":
    from uniopt.engines.phoneme import PhonemeExtractor
    component = PhonemeExtractor().uniopt_components()[0]
else:  # the TTS engine's "codec" or "decoder"
    from uniopt.engines.tts import FishSpeechEngine
    component = next(c for c in FishSpeechEngine().uniopt_components() if c.name == name)


class OneComponent:  # the component as its engine declares it (exporter, metric, calibration)

    def __init__(self, component):
        self.module = component.module
        self.component = dataclasses.replace(component, name="module")

    def uniopt_components(self):
        return [self.component]


opt = UniversalOptimizer(OneComponent(component), mode="auto", allow=("eager", candidate),
                         reuse_decisions=False, search_budget_s=3600)
result = opt.report().components[0].candidate(candidate)
print(json.dumps({"component": name, "weights": weight_bytes(component), "candidate": candidate,
                  "accepted": result.accepted, "reason": result.reason, "peak": result.peak_memory_bytes,
                  "steps": result.memory_steps}))
"""


def run(component: str, candidate: str) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "UNIOPT_CACHE_DIR": cache, "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.run(
            [sys.executable, "-c", WORKER, component, candidate], capture_output=True, text=True, env=env
        )
    if proc.returncode != 0:
        return {"component": component, "candidate": candidate, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--component", action="append", choices=("phoneme", "codec", "decoder"))
    parser.add_argument("--candidate", action="append", choices=CANDIDATES + STEP_CANDIDATES)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    print(f"{'component':9} {'candidate':22} {'step':22} {'base':>8} {'peak':>8} {'x':>5} {'estimate':>9} ok")
    for component in args.component or ("phoneme", "codec"):
        for candidate in args.candidate or CANDIDATES:
            row = run(component, candidate)
            rows.append(row)
            if "error" in row:
                print(f"{component:9} {candidate:22} failed: {row['error']}")
                continue
            mib = 2**20
            for step in row["steps"]:
                base = step.get("base_bytes", row["weights"])
                ratio = step["peak_bytes"] / base
                ok = "yes" if step["estimated_bytes"] >= step["peak_bytes"] else "NO"
                print(
                    f"{component:9} {candidate:22} {step['step']:22} {base / mib:8.0f} "
                    f"{step['peak_bytes'] / mib:8.0f} {ratio:5.2f} {step['estimated_bytes'] / mib:9.0f} {ok}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
