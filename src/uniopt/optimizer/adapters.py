"""Engine adapters: which components an engine has, and how to put a stage in a module's place.

An engine declares its components by defining ``uniopt_components()``, returning
:class:`~uniopt.optimizer.component.Component` objects whose ``name`` is the attribute path of the
module inside the engine (``"model"``, ``"segmentation.net"``). A plain ``nn.Module`` is one
component, called ``"module"``, and needs example inputs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..errors import UniOptError
from .component import Component

__all__ = ["StageModule", "check_wrappable", "engine_components", "with_replaced"]


class StageModule(torch.nn.Module):
    """An ``nn.Module`` that runs a stage and answers attribute look-ups from the original module."""

    def __init__(self, stage: Any, original: torch.nn.Module) -> None:
        super().__init__()
        self.stage = stage
        object.__setattr__(self, "_original", original)

    def forward(self, *args: Any) -> Any:
        return self.stage(*args)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)


def check_wrappable(engine: Any) -> None:
    """Raise unless ``engine`` is an ``nn.Module`` or declares ``uniopt_components()``."""
    if not isinstance(engine, torch.nn.Module) and not callable(getattr(engine, "uniopt_components", None)):
        raise UniOptError(
            f"{type(engine).__name__} is neither an nn.Module nor an engine that declares "
            "uniopt_components(); see the README for how to declare components"
        )


def engine_components(engine: Any, example_inputs: Any = None) -> list[Component]:
    """The components of ``engine``: declared by the engine, or the module itself."""
    check_wrappable(engine)
    declare = getattr(engine, "uniopt_components", None)
    if callable(declare):
        components = list(declare())
        if example_inputs is not None:
            raise UniOptError("this engine declares its own components and example inputs; pass none")
        return components
    if example_inputs is None:
        raise UniOptError("a plain nn.Module needs example inputs: UniversalOptimizer(module, example_inputs=(x,))")
    return [Component("module", engine, example_inputs)]


def _copy_node(node: Any) -> Any:
    new = copy.copy(node)
    if isinstance(node, torch.nn.Module):
        new._modules = dict(node._modules)  # type: ignore[assignment]
    return new


def with_replaced(engine: Any, replacements: dict[str, torch.nn.Module]) -> Any:
    """A shallow copy of ``engine`` with modules at attribute paths replaced.

    Only the objects on each path are copied, so the original engine is left as it was and
    shares everything else (weights, tokenizers) with the copy.
    """
    root = _copy_node(engine)
    copies: dict[str, Any] = {"": root}
    for path, module in replacements.items():
        parts = path.split(".")
        parent = root
        for depth, attr in enumerate(parts[:-1]):
            key = ".".join(parts[: depth + 1])
            if key not in copies:
                copies[key] = _copy_node(getattr(parent, attr))
                setattr(parent, attr, copies[key])
            parent = copies[key]
        setattr(parent, parts[-1], module)
    return root
