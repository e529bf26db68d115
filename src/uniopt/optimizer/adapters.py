"""Engine adapters: which components an engine has, and where each one lives in it.

An engine declares its components by defining ``uniopt_components()``, returning
:class:`~uniopt.optimizer.component.Component` objects whose ``name`` is the attribute path of the
module inside the engine (``"model"``, ``"segmentation.net"``). A plain ``nn.Module`` is one
component, called ``"module"``, at the engine itself, and needs example inputs.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UniOptError
from .component import Component

__all__ = ["check_wrappable", "component_path", "engine_components", "resolve_path"]


def check_wrappable(engine: Any) -> None:
    """Raise unless ``engine`` is an ``nn.Module`` or declares ``uniopt_components()``."""
    if not isinstance(engine, torch.nn.Module) and not callable(getattr(engine, "uniopt_components", None)):
        raise UniOptError(
            f"{type(engine).__name__} is neither an nn.Module nor an engine that declares "
            "uniopt_components(); see the README for how to declare components"
        )


def declares_components(engine: Any) -> bool:
    """Whether ``engine`` lists its own components through ``uniopt_components()``."""
    return callable(getattr(engine, "uniopt_components", None))


def component_path(engine: Any, component: Component) -> str:
    """The attribute path of ``component`` in ``engine`` ("" for an ``nn.Module`` wrapped as itself)."""
    return "" if component.module is engine and component.name == "module" else component.name


def resolve_path(engine: Any, path: str) -> Any:
    """The object at attribute path ``path`` of ``engine``; a :class:`UniOptError` naming the missing step."""
    obj = engine
    walked = type(engine).__name__
    for attr in path.split(".") if path else ():
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise UniOptError(
                f"component path {path!r}: {walked} has no attribute {attr!r}; a component's name is "
                "the attribute path of its module in the engine"
            ) from None
        walked = f"{walked}.{attr}"
    return obj


def check_paths(engine: Any, components: list[Component]) -> None:
    """Raise unless every component's module is the module at its path in ``engine``."""
    names = [c.name for c in components]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UniOptError(f"components named twice: {', '.join(duplicates)}")
    for component in components:
        path = component_path(engine, component)
        found = resolve_path(engine, path)
        if found is not component.module:
            raise UniOptError(
                f"component {component.name!r}: the engine's {path!r} is a {type(found).__name__}, not the "
                f"{type(component.module).__name__} the component declares; uniopt installs stages at that path"
            )


def engine_components(engine: Any, example_inputs: Any = None) -> list[Component]:
    """The components of ``engine`` (declared by it, or the module itself), their paths checked."""
    check_wrappable(engine)
    if declares_components(engine):
        if example_inputs is not None:
            raise UniOptError("this engine declares its own components and example inputs; pass none")
        components = list(engine.uniopt_components())
    elif example_inputs is None:
        raise UniOptError("a plain nn.Module needs example inputs: UniversalOptimizer(module, example_inputs=(x,))")
    else:
        components = [Component("module", engine, example_inputs)]
    check_paths(engine, components)
    return components
