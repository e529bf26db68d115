"""The eager candidate: the component's own PyTorch module, unchanged. Always available."""

from __future__ import annotations

from typing import Any

from .candidate import Candidate, Stage
from .hookspecs import hookimpl


def _build(component: Any, context: Any) -> Stage:
    return Stage("eager", component.module)


@hookimpl
def uniopt_register_candidates(register: Any) -> None:
    register(Candidate("eager", "eager", "plain PyTorch FP32, as the engine ships it", _build))
