"""Peak memory of ONNX export paths for the wav2vec2-base encoder, and whether they give the same graph.

    python benchmarks/export_memory.py [VARIANT ...]

Variants of the legacy (TorchScript) exporter, each in a fresh process: ``default`` (as called
with autograd on), ``nograd`` (under ``torch.no_grad()``, what uniopt does), ``nofold`` (no
constant folding) and ``nograd-nofold``. Prints the peak RSS increase of the export, the file
size, and the largest difference of ONNX Runtime's output from eager PyTorch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("default", "nograd", "nofold", "nograd-nofold")

WORKER = """
import contextlib, io, os, sys, tempfile, warnings
import numpy as np, onnxruntime as ort, torch
from uniopt.engines.phoneme import PhonemeExtractor
from uniopt.memory import measure_memory, release_memory
warnings.simplefilter("ignore")
variant = sys.argv[1]
component = PhonemeExtractor().uniopt_components()[0]
folder = tempfile.mkdtemp()
path = os.path.join(folder, "model.onnx")
axes = {k: dict(v) for k, v in component.dynamic_axes.items()}
release_memory()
with measure_memory() as use:
    grad = torch.no_grad() if "nograd" in variant else contextlib.nullcontext()
    with grad, contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(component.module.eval(), tuple(component.example_inputs), path,
                          input_names=list(component.input_names), output_names=list(component.output_names),
                          dynamic_axes=axes, opset_version=17, dynamo=False,
                          do_constant_folding="nofold" not in variant)
size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
(x,) = component.example_inputs
out = session.run(None, {component.input_names[0]: x.numpy()})[0]
with torch.no_grad():
    ref = component.module(x).numpy()
diff = float(np.abs(out - ref).max())
print(f"| {variant} | {use.peak_increase_bytes / 2**20:.0f} | {size / 2**20:.0f} | {diff:.2e} |")
"""


def main() -> None:
    print("| legacy export variant | peak MiB | file MiB | max abs diff vs eager |")
    print("|---|---|---|---|")
    for variant in sys.argv[1:] or VARIANTS:
        proc = subprocess.run(
            [sys.executable, "-c", WORKER, variant],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
        failed = f"| {variant} | failed: {proc.stderr.strip().splitlines()[-1:]} | | |"
        print(lines[-1] if lines else failed, flush=True)


if __name__ == "__main__":
    main()
