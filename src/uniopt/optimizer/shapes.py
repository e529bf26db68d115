"""Inputs at other sizes along a component's dynamic axes, for stages whose shapes are fixed at export.

A graph backend (ONNX Runtime, OpenVINO) runs what the exporter captured at the example's size; a
size baked into a constant shows only at another size. :func:`shape_variants` returns the inputs
the guard checks such stages on: the component's own ``validation_inputs`` when it declares them,
else the example at half and at double its size along each dynamic axis (inputs that share an
axis name change together). Longer inputs repeat the example, so tokens stay valid tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .component import Component

__all__ = ["dynamic_input_axes", "resized", "shape_variants", "variant_sizes"]


def dynamic_input_axes(component: Component) -> dict[str, list[tuple[int, int]]]:
    """Per dynamic axis name: the ``(input index, axis)`` pairs that carry it, tensor inputs only."""
    axes: dict[str, list[tuple[int, int]]] = {}
    for index, (name, value) in enumerate(zip(component.input_names, component.example_inputs, strict=True)):
        if not isinstance(value, torch.Tensor):
            continue
        for axis, symbol in component.dynamic_axes.get(name, {}).items():
            if -value.dim() <= axis < value.dim():
                axes.setdefault(str(symbol), []).append((index, axis % value.dim()))
    return axes


def variant_sizes(size: int) -> list[int]:
    """Two sizes other than ``size``: half and double it (2 and 3 when ``size`` is 1)."""
    sizes = sorted({max(1, size // 2), 2 * size} - {size})
    return sizes if len(sizes) >= 2 else [*sizes, 3 * size]


def resized(tensor: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """``tensor`` cut or repeated along ``axis`` to ``size``."""
    current = tensor.shape[axis]
    if size <= current:
        return tensor.narrow(axis, 0, size).clone()
    repeats = [1] * tensor.dim()
    repeats[axis] = -(-size // current)
    return tensor.repeat(*repeats).narrow(axis, 0, size).clone()


def _with_size(inputs: tuple[Any, ...], places: list[tuple[int, int]], size: int) -> tuple[Any, ...]:
    changed = list(inputs)
    for index, axis in places:
        changed[index] = resized(changed[index], axis, size)
    return tuple(changed)


def shape_variants(component: Component) -> list[tuple[Any, ...]]:
    """The inputs a shape-fixed stage is validated on besides the example (see the module docstring)."""
    if component.validation_inputs:
        return list(component.validation_inputs)
    variants: list[tuple[Any, ...]] = []
    axes: Mapping[str, list[tuple[int, int]]] = dynamic_input_axes(component)
    for places in axes.values():
        index, axis = places[0]
        size = int(component.example_inputs[index].shape[axis])
        variants.extend(_with_size(component.example_inputs, places, n) for n in variant_sizes(size))
    return variants
