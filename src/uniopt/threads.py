"""One thread budget, sized to the usable CPUs and applied alike to every backend.

A process under a 1-CPU quota that lets torch, ONNX Runtime and OpenVINO each start a thread per
logical core spends its quota on contention. The budget gives each backend ``intra_op`` threads
(usable CPUs rounded down, at least 1) and a single inter-op thread.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["ThreadBudget", "thread_budget"]


@dataclass(frozen=True)
class ThreadBudget:
    """Threads per backend: ``intra_op`` inside an operator, ``inter_op`` across operators."""

    intra_op: int
    inter_op: int = 1

    def apply_torch(self) -> None:
        """Set torch's thread pools (the inter-op pool only if torch has not started it yet)."""
        import torch

        torch.set_num_threads(self.intra_op)
        try:
            torch.set_num_interop_threads(self.inter_op)
        except RuntimeError:  # inter-op pool already started; torch allows setting it once
            pass

    def onnxruntime_options(self, options: Any | None = None) -> Any:
        """An ``onnxruntime.SessionOptions`` (new or given) limited to the budget."""
        import onnxruntime as ort

        options = options or ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op
        options.inter_op_num_threads = self.inter_op
        # Idle ORT workers spin by default, stealing the CPU from whatever runs next (another
        # backend, the engine's own Python code, a neighbour on a shared VM).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return options

    def openvino_config(self) -> dict[str, str]:
        """The OpenVINO ``compile_model`` properties that keep it inside the budget."""
        return {"INFERENCE_NUM_THREADS": str(self.intra_op), "NUM_STREAMS": "1"}

    def environment(self) -> dict[str, str]:
        """Variables that limit OpenMP/MKL pools in child processes started from here."""
        return {name: str(self.intra_op) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def thread_budget(usable_cpus: float, override: int | None = None) -> ThreadBudget:
    """The budget for ``usable_cpus`` (1.3 -> 1 thread), or ``override`` threads when set."""
    if override is not None:
        return ThreadBudget(intra_op=override)
    return ThreadBudget(intra_op=max(1, math.floor(usable_cpus)))


def apply_to_environment(budget: ThreadBudget) -> None:
    """Export the budget to OpenMP/MKL variables not already set by the user."""
    for name, value in budget.environment().items():
        os.environ.setdefault(name, value)
