"""ONNX export of a component, cached, with the exporter the component prefers and the other as fallback.

MEASURED.md: the legacy exporter fails on ``aten::rms_norm`` and bakes causal padding into
constants; the dynamo exporter fails inside pyannote's sinc filters, and its wav2vec2 graph ran 2x
slower in ONNX Runtime. So each component names its preferred exporter and the other is tried when
the first fails. The export lands in the artifact cache; a second process reuses it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import MemoryBudgetError
from ..optimizer.guard import flatten_outputs, run_reference
from .candidate import BuildContext
from .memory_costs import memory_step

__all__ = ["ExportedModel", "OnnxExporter", "exported_onnx", "graph_stage_runner"]

log = logging.getLogger("uniopt")


@dataclass(frozen=True)
class ExportedModel:
    """An ONNX file in the cache and how it was made."""

    path: Path
    exporter: str
    key: str
    from_cache: bool
    seconds: float


class OnnxExporter:
    """Export settings; a subclass may change them (as Optimum's export configs do)."""

    OPSET: int = 18
    LEGACY_OPSET: int = 17

    def export(self, component: Any, path: Path, exporter: str) -> None:
        """Write ``component`` as ONNX to ``path`` with ``exporter`` ("dynamo" or "legacy")."""
        _check_tensor_inputs(component)
        names = list(component.input_names)
        outputs = list(component.output_names) or None
        axes = {k: dict(v) for k, v in component.dynamic_axes.items()}
        module = component.module.eval()
        sink = io.StringIO()
        with (
            contextlib.redirect_stdout(sink),
            warnings.catch_warnings(),
            quiet_loggers("torch.onnx", "torch.export"),
        ):
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                shapes = tuple(
                    {axis: torch.export.Dim.DYNAMIC for axis in axes.get(name, {})} or None for name in names
                )
                program = torch.onnx.export(
                    module,
                    tuple(component.example_inputs),
                    None,
                    input_names=names,
                    output_names=outputs,
                    dynamic_shapes=shapes if any(shapes) else None,
                    opset_version=self.OPSET,
                    dynamo=True,
                    verbose=False,
                )
                if program is None:
                    raise RuntimeError("the dynamo exporter returned no program")
                program.save(str(path))
            else:
                # Without autograd state the tracer keeps no graph of its own: on wav2vec2-base the
                # export's peak drops from 1533 to 1210 MiB, with the same graph
                # (benchmarks/export_memory.py).
                with torch.no_grad():
                    torch.onnx.export(
                        module,
                        tuple(component.example_inputs),
                        str(path),
                        input_names=names,
                        output_names=outputs,
                        dynamic_axes=axes or None,
                        opset_version=self.LEGACY_OPSET,
                        dynamo=False,
                        do_constant_folding=True,
                    )


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Silence chatty third-party loggers (exporters, quantizers) for the duration of a build."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _check_tensor_inputs(component: Any) -> None:
    for name, value in zip(component.input_names, component.example_inputs, strict=True):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"ONNX export needs tensor inputs; input {name!r} is {type(value).__name__}")


exporter = OnnxExporter()


def export_key(component: Any) -> dict[str, Any]:
    """What identifies an export: the component, exporter preference, opsets and library versions."""
    from ..cache import library_versions

    return {
        "artifact": "onnx-export",
        "component": component.key(),
        "exporter": component.exporter,
        "opset": [exporter.OPSET, exporter.LEGACY_OPSET],
        "versions": library_versions(),
    }


def rebuild_on_failure(
    build: Callable[[Any, BuildContext, list[str]], Any],
) -> Callable[[Any, BuildContext], Any]:
    """Run ``build``; if it fails on a corrupt cached artifact, drop that entry and build afresh.

    ``build`` appends the keys of the cache entries it *loaded* (not built) to the list it gets.
    On failure those entries are checked in full (sha256): a corrupt file that passed the cheap
    size check is a miss and is rebuilt; intact entries mean the failure is real and is raised.
    """

    def wrapped(component: Any, context: BuildContext) -> Any:
        loaded: list[str] = []
        try:
            stage = build(component, context, loaded)
        except Exception as exc:
            corrupt = [key for key in loaded if context.cache.verify_entry(key) is not None]
            if not corrupt:
                raise
            log.warning("cached artifacts for %s are corrupt (%s); rebuilding them", component.name, exc)
            for key in corrupt:
                context.cache.remove(key)
            loaded = []
            stage = build(component, context, loaded)
        # A file can load and still be wrong (flipped weight bytes): the guard finds that, and
        # the optimizer then checks these entries in full (see selection._drop_corrupt_artifacts).
        stage.info["cached_entries"] = list(loaded)
        return stage

    return wrapped


def exported_onnx(component: Any, context: BuildContext, loaded: list[str] | None = None) -> ExportedModel:
    """The component's ONNX export, from the cache or made now (preferred exporter, then the other)."""
    from ..cache import cache_key

    if component.exporter == "none":
        raise ValueError(f"component {component.name!r} declares that it does not export to ONNX")
    key = cache_key(export_key(component))
    order = [component.exporter, "legacy" if component.exporter == "dynamo" else "dynamo"]

    def build(directory: Path) -> dict[str, Any]:
        errors: list[str] = []
        for name in order:
            try:
                with memory_step(f"onnx-export-{name}", component, context):
                    exporter.export(component, directory / "model.onnx", name)
                _check_loadable(directory / "model.onnx")
                return {"exporter": name, "failed": errors}
            except MemoryBudgetError:
                raise
            except Exception as exc:  # exporter failures are many and varied; the other may work
                first_line = (str(exc).strip().splitlines() or [""])[0][:200]
                errors.append(f"{name}: {type(exc).__name__}: {first_line}")
                for leftover in directory.iterdir():
                    leftover.unlink()
        raise RuntimeError("ONNX export failed with every exporter: " + " | ".join(errors))

    started = time.perf_counter()
    entry, built = context.cache.get_or_build(key, build, kind="onnx-export", description={"component": component.name})
    seconds = time.perf_counter() - started
    if not built and loaded is not None:
        loaded.append(key)
    if built:
        log.info("exported %s with the %s exporter in %.1f s", component.name, entry.extra["exporter"], seconds)
    return ExportedModel(entry.path / "model.onnx", entry.extra["exporter"], key, not built, seconds)


def _check_loadable(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path), full_check=False)


def output_structure(component: Any) -> Any:
    """The tree structure of the component's eager outputs (computed once per component)."""
    spec = component.__dict__.get("_output_spec")
    if spec is None:
        leaves, spec = flatten_outputs(run_reference(component.module, component.example_inputs))
        if not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
            raise TypeError("a graph backend can only return tensors; this component returns other values")
        component.__dict__["_output_spec"] = spec
    return spec


def _signature(component: Any) -> list[tuple[Any, tuple[int | None, ...]]]:
    """Per input: dtype, and shape with None on the dynamic axes."""
    result = []
    for name, tensor in zip(component.input_names, component.example_inputs, strict=True):
        dynamic = set(component.dynamic_axes.get(name, {}))
        result.append((tensor.dtype, tuple(None if i in dynamic else n for i, n in enumerate(tensor.shape))))
    return result


def _fits(args: tuple[Any, ...], signature: list[tuple[Any, tuple[int | None, ...]]]) -> bool:
    for arg, (dtype, shape) in zip(args, signature, strict=True):
        if not isinstance(arg, torch.Tensor) or arg.dtype != dtype or arg.dim() != len(shape):
            return False
        if any(want is not None and got != want for got, want in zip(arg.shape, shape, strict=True)):
            return False
    return True


def graph_stage_runner(component: Any, run_arrays: Any) -> Any:
    """Wrap ``run_arrays(list of numpy inputs) -> list of arrays`` as a torch-in, torch-out callable.

    An input the exported graph cannot take (another dtype, or another size on an axis that was
    not declared dynamic) runs through the eager module instead, logged once, rather than failing
    deep inside the backend.
    """
    import numpy as np
    from torch.utils import _pytree as pytree

    spec = output_structure(component)
    signature = _signature(component)
    expected = len(signature)
    eager = component.module
    warned: list[bool] = []

    def run(*args: Any) -> Any:
        if len(args) != expected:
            raise TypeError(f"{component.name} takes {expected} inputs, got {len(args)}")
        if not _fits(args, signature):
            if not warned:
                warned.append(True)
                log.warning(
                    "%s: input %s is outside the exported graph's shapes; running eager",
                    component.name,
                    [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)],
                )
            return eager(*args)
        arrays = [a.detach().cpu().numpy() for a in args]
        outputs = run_arrays(arrays)
        return pytree.tree_unflatten([torch.from_numpy(np.ascontiguousarray(o)) for o in outputs], spec)

    return run
