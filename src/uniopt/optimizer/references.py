"""The FP32 reference outputs the guard compares candidates with, computed once per content.

A component's eager outputs for its inputs depend on nothing but the module's content (its
:meth:`~uniopt.optimizer.component.Component.key`), the input values, the library versions, the
host and the thread count, so they are kept in the artifact cache under a key of all of those.
The next process that validates a stage for the same component (a warm start applying a cached
decision) loads them instead of running the eager module again; for an autoregressive decoder,
whose reference decodes are most of a warm start, that is most of the time saved. Only outputs
made of tensors, numbers, strings, ``None`` and tuples, lists or dicts of them are kept (they load
back with ``torch.load(weights_only=True)``); anything else is computed in each process.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from ..cache import cache_key, library_versions
from ..cache.keys import hash_inputs
from ..errors import InputError
from ..memory import measure_memory
from ..parked import page_in_parked
from ..plugins import BuildContext
from .component import Component
from .guard import reference_outputs

__all__ = ["Reference", "compute_references"]

log = logging.getLogger("uniopt")

#: The cache entry kind, and the file inside it.
KIND = "reference"
FILE = "references.pt"


class Reference(NamedTuple):
    """The reference's outputs for ``inputs``, and under teacher forcing ``(forced inputs, scores)``."""

    inputs: tuple[Any, ...]
    outputs: Any
    forced: tuple[tuple[Any, ...], Any] | None


def compute_references(
    component: Component, input_sets: Sequence[tuple[Any, ...]], context: BuildContext, skip_failing: bool = False
) -> tuple[list[Reference], int, bool]:
    """The references for ``input_sets`` (from the cache when kept there), the peak bytes a reference
    call needed, and whether the module ran for them in this process (False: loaded from the cache).

    With ``skip_failing``, input sets the module raises on are left out; otherwise that is an
    :class:`~uniopt.errors.InputError`.
    """
    cache = context.cache
    if cache is None:
        return (*_measured(component, input_sets, skip_failing), True)
    key = _key(component, input_sets, context, skip_failing)
    entry = cache.get(key)
    if entry is not None:
        loaded = _load(entry.path / FILE, component, input_sets)
        if loaded is not None:
            return loaded, int(entry.extra.get("call_bytes", 0)), False
        cache.remove(key)  # written again below
    references, call_bytes = _measured(component, input_sets, skip_failing)
    if _keepable(references):

        def write(directory: Any) -> dict[str, Any]:
            rows = [{"index": _index(r, input_sets), "outputs": r.outputs,
                     "forced": None if r.forced is None else r.forced[1]} for r in references]  # fmt: skip
            torch.save(rows, directory / FILE)
            return {"call_bytes": call_bytes}

        cache.get_or_build(key, write, kind=KIND, description={"component": component.name, "sets": len(input_sets)})
    return references, call_bytes, True


def _measured(
    component: Component, input_sets: Sequence[tuple[Any, ...]], skip_failing: bool
) -> tuple[list[Reference], int]:
    page_in_parked(component.module)  # the calls' own memory is measured, not the weights read back from their file
    started = time.perf_counter()
    with measure_memory() as use:
        found = _run(component, input_sets, skip_failing)
    calls = len(found) * (2 if component.teacher_forcing is not None and _scored(component) is None else 1)
    log.info(
        "%s: FP32 references for %d inputs in %.1f s (%d calls of the module)",
        component.name,
        len(found),
        time.perf_counter() - started,
        calls,
    )
    return found, use.peak_increase_bytes


def _run(component: Component, input_sets: Sequence[tuple[Any, ...]], skip_failing: bool) -> list[Reference]:
    torch.manual_seed(0)
    module, forcing, name = component.module, component.teacher_forcing, component.name
    scored = _scored(component)
    found = []
    for inputs in input_sets:
        try:
            if scored is not None:  # one decode gives the outputs and the scores of replaying them
                outputs, scores = reference_outputs(name, functools.partial(scored, module), inputs)
            else:
                outputs = reference_outputs(name, module, inputs)
        except InputError:
            if skip_failing:
                continue
            raise
        forced = None
        if forcing is not None:
            forced_inputs = forcing(inputs, outputs)
            forced = (forced_inputs, scores if scored is not None else reference_outputs(name, module, forced_inputs))
        found.append(Reference(inputs, outputs, forced))
    return found


def _scored(component: Component) -> Any:
    """The component's one call giving its outputs and their teacher-forced scores, when it has one."""
    return component.free_run_with_scores if component.teacher_forcing is not None else None


def _key(component: Component, input_sets: Sequence[tuple[Any, ...]], context: BuildContext, skip: bool) -> str:
    forcing = component.teacher_forcing
    return cache_key(
        {
            "artifact": KIND,
            "component": component.key(),
            "inputs": hash_inputs(input_sets),
            "skip_failing": skip,
            "teacher_forcing": getattr(forcing, "__qualname__", repr(forcing)) if forcing is not None else None,
            "host": context.profile.fingerprint,
            "threads": context.threads.intra_op,
            "versions": library_versions(),
        }
    )


def _index(reference: Reference, input_sets: Sequence[tuple[Any, ...]]) -> int:
    return next(i for i, inputs in enumerate(input_sets) if inputs is reference.inputs)


def _keepable(references: list[Reference]) -> bool:
    """Whether every output is made of what ``torch.load(weights_only=True)`` reads back."""
    from torch.utils import _pytree as pytree

    for reference in references:
        trees = [reference.outputs] + ([] if reference.forced is None else [reference.forced[1]])
        for tree in trees:
            leaves, spec = pytree.tree_flatten(tree)
            if not all(_plain_node(node) for node in _nodes(spec)):
                return False
            if not all(leaf is None or isinstance(leaf, (torch.Tensor, bool, int, float, str)) for leaf in leaves):
                return False
    return True


def _nodes(spec: Any) -> list[Any]:
    found, stack = [], [spec]
    while stack:
        node = stack.pop()
        found.append(node.type)
        stack.extend(node.children())
    return found


def _plain_node(node_type: Any) -> bool:
    return node_type is None or node_type in (tuple, list, dict)


def _load(path: Any, component: Component, input_sets: Sequence[tuple[Any, ...]]) -> list[Reference] | None:
    """The kept references, with the inputs (and forced inputs) rebuilt; None when the file does not load."""
    try:
        rows = torch.load(path, weights_only=True)
        references = []
        for row in rows:
            inputs = input_sets[row["index"]]
            forced = None
            if row["forced"] is not None and component.teacher_forcing is not None:
                forced = (component.teacher_forcing(inputs, row["outputs"]), row["forced"])
            references.append(Reference(inputs, row["outputs"], forced))
    except Exception as exc:  # a damaged entry is computed again, never trusted
        log.warning("reference outputs in %s do not load (%s); computing them again", path, exc)
        return None
    torch.manual_seed(0)  # as after computing them: what follows sees the same random state
    return references
