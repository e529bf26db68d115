"""One thread budget, sized to the usable CPUs and applied alike to every backend.

A process under a 1-CPU quota that lets torch, ONNX Runtime and OpenVINO each start a thread per
logical core spends its quota on contention. The budget gives each backend ``intra_op`` threads
(usable CPUs rounded down, at least 1) and a single inter-op thread.

An engine's own numpy work between its networks (features, clustering) runs inside
:func:`single_threaded_blas`: its products are small, and numpy's OpenBLAS wakes a worker per CPU
for them that then spins, waiting for more work, while the next network wants those CPUs.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["ThreadBudget", "single_threaded_blas", "thread_budget"]


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

    def onnxruntime_options(self, options: Any | None = None, spinning: bool = False) -> Any:
        """An ``onnxruntime.SessionOptions`` (new or given) limited to the budget.

        Idle ORT workers spin by default, stealing the CPU from whatever runs next (another
        backend, the engine's own Python code, a neighbour on a shared VM), so they do not here
        unless ``spinning``: for sessions called back to back, as a decode loop's steps are. Even
        then they stop at the end of each run, so one session's workers never spin through
        another's run.
        """
        import onnxruntime as ort

        options = options or ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op
        options.inter_op_num_threads = self.inter_op
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if spinning:
            options.add_session_config_entry("session.force_spinning_stop", "1")
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


_BLAS_LOCK = threading.Lock()
_blas_state: dict[str, Any] = {"controller": None, "limiter": None, "depth": 0}


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """numpy's BLAS (OpenBLAS, MKL, BLIS) on one thread inside the block, restored after the outermost one.

    Nested and concurrent blocks share one limit (threadpoolctl's), set by the first to enter and
    lifted by the last to leave. OpenBLAS splits a product by rows and columns, never along the
    summed axis, so its results are the same on one thread.
    """
    with _BLAS_LOCK:
        if _blas_state["depth"] == 0:
            if _blas_state["controller"] is None:
                from threadpoolctl import ThreadpoolController

                _blas_state["controller"] = ThreadpoolController()
            _blas_state["limiter"] = _blas_state["controller"].limit(limits=1, user_api="blas")
        _blas_state["depth"] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _blas_state["depth"] -= 1
            if _blas_state["depth"] == 0:
                _blas_state["limiter"].restore_original_limits()
                _blas_state["limiter"] = None
