"""Warm-up: ``MODEL_WARMUP_RUNS`` calls with the inputs the guard checks before a stage serves or is timed."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from .hookspecs import hookimpl


@hookimpl
def uniopt_stage_ready(component: Any, stage: Any, context: Any) -> None:
    """Warm ``stage`` up on the inputs the guard checks, less the calls already made with them (``warm_calls``)."""
    if context.settings.model_warmup_runs == 0 or stage.info.get("warmed_up"):
        return
    runs = max(0, context.settings.model_warmup_runs - int(stage.info.get("warm_calls", 0)))
    inputs_per_shape = component.guarded_inputs()
    started = time.perf_counter()
    with torch.inference_mode():
        for inputs in inputs_per_shape:
            for _ in range(runs):
                stage(*copy.deepcopy(inputs))
    stage.info["warmup_seconds"] = time.perf_counter() - started
    stage.info["warmup_runs"] = runs * len(inputs_per_shape)
    stage.info["warmed_up"] = True
