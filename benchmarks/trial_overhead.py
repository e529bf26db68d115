"""What a call through an OpenVINO trial process costs beyond the same call in this process.

    python benchmarks/trial_overhead.py

Auto mode times OpenVINO candidates in a trial process of their own
(:mod:`uniopt.plugins.openvino_trial`), so their timings include the round trip: the message both
ways and the arrays copied through the shared buffer. The model here doubles its input (no
compute to speak of), run on one thread; the difference of the medians is the round trip.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from uniopt.plugins.openvino_trial import TrialProcess

CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": "1"}


def _medians_ms(calls: dict[str, Callable[[], object]], rounds: int = 300) -> dict[str, float]:
    """Each call's median, the calls taking turns (a neighbour's load hits both alike)."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - started)
    return {name: sorted(times)[rounds // 2] * 1e3 for name, times in samples.items()}


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "double.xml"
        x = ops.parameter([-1], ov.Type.f32, name="x")
        ov.save_model(ov.Model([ops.multiply(x, ops.constant(np.float32(2.0)))], [x]), str(path))
        request = ov.Core().compile_model(str(path), "CPU", CONFIG).create_infer_request()
        trial = TrialProcess(path, "CPU", CONFIG, "double")
        print("| array in and out | trial process ms | in-process ms | round trip ms |")
        print("|---|---|---|---|")
        for elements in (2048, 262144, 1048576):
            array = np.random.default_rng(0).standard_normal(elements, dtype=np.float32)
            medians = _medians_ms(
                {
                    "remote": lambda a=array: trial.run_arrays([a]),
                    "local": lambda a=array: (request.infer([a]), request.get_output_tensor(0).data.copy()),
                }
            )
            remote, local = medians["remote"], medians["local"]
            print(f"| {array.nbytes / 2**20:.3f} MiB | {remote:.3f} | {local:.3f} | {remote - local:.3f} |")
        trial.close()


if __name__ == "__main__":
    main()
