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
from torch.utils import _pytree as pytree

from ..cache.files import is_unwritable
from ..errors import MemoryBudgetError, NotApplicable
from ..isolation import run_isolated
from ..optimizer.component import Metric
from ..optimizer.guard import flatten_outputs, run_reference
from .candidate import BuildContext
from .fallback import EagerFallback, first_line
from .memory_costs import memory_step

__all__ = ["ExportError", "ExportedModel", "GraphRunner", "OnnxExporter", "exported_onnx", "graph_stage_runner"]

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
    #: How close an export must stay to eager at other sizes after the tracer warned (FP32, fused).
    SHAPE_ATOL: float = 1e-3
    SHAPE_RTOL: float = 1e-3

    def export(self, component: Any, path: Path, exporter: str) -> None:
        """Write ``component`` as ONNX to ``path`` with ``exporter`` ("dynamo" or "legacy") and check it."""
        self.check_export(component, path, self.write(component, path, exporter))

    def write(self, component: Any, path: Path, exporter: str) -> list[str]:
        """Write ``component`` as ONNX to ``path`` with ``exporter``; return the legacy tracer's warnings."""
        _check_tensor_inputs(component)
        names = list(component.input_names)
        outputs = list(component.output_names) or None
        axes = {k: dict(v) for k, v in component.dynamic_axes.items()}
        module = component.module.eval()
        sink = io.StringIO()
        with (
            contextlib.redirect_stdout(sink),
            warnings.catch_warnings(record=True) as caught,
            quiet_loggers("torch.onnx", "torch.export"),
        ):
            warnings.simplefilter("always")
            if exporter == "dynamo":
                shapes = tuple(
                    {axis: torch.export.Dim.DYNAMIC for axis in axes.get(name, {})} or None for name in names
                )
                # Written by the exporter itself with the weights in a separate file (model.onnx.data):
                # no serialized copy of the weights is ever held in memory. On wav2vec2-base the peak
                # drops from 1217 to 128 MiB, on the TTS codec from 291 to 183 MiB, with the same
                # outputs (benchmarks/export_memory.py, dynamo against dynamo-external).
                torch.onnx.export(
                    module,
                    tuple(component.example_inputs),
                    str(path),
                    input_names=names,
                    output_names=outputs,
                    dynamic_shapes=shapes if any(shapes) else None,
                    opset_version=self.OPSET,
                    dynamo=True,
                    external_data=True,
                    verbose=False,
                )
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
        return tracer_warnings(caught)

    def check_export(self, component: Any, path: Path, warned: list[str]) -> None:
        """Raise :class:`ExportError` when the graph at ``path`` cannot take the component's dynamic sizes.

        A declared dynamic axis that came out static fails. The legacy tracer warns when it turns a
        tensor into a Python value (``int(x.shape[1])``), which it then records as a constant; on a
        dynamic axis that constant is wrong at every other size, so after such warnings the graph is
        run at other sizes (:func:`~uniopt.optimizer.shapes.shape_variants`) against eager.
        """
        check_dynamic_axes(component, path)
        self.check_sizes(component, path, warned)

    def check_sizes(self, component: Any, path: Path, warned: list[str]) -> None:
        """After tracer warnings, run the graph at other sizes against eager (:func:`check_other_sizes`)."""
        if warned and component.dynamic_axes:
            check_other_sizes(component, path, warned, atol=self.SHAPE_ATOL, rtol=self.SHAPE_RTOL)


class ExportError(RuntimeError):
    """An export that ran but cannot stand for the module (a dynamic axis came out fixed)."""


def tracer_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """The first lines of the legacy tracer's warnings among ``caught``; the rest are logged at debug."""
    found = []
    for item in caught:
        text = str(item.message).strip().splitlines()[0] if str(item.message).strip() else ""
        if item.category.__name__ == "TracerWarning":
            found.append(f"{Path(item.filename).name}:{item.lineno}: {text[:160]}")
        else:
            log.debug("exporter warning (%s): %s", item.category.__name__, text[:200])
    return found


def graph_input_shapes(path: Path) -> dict[str, list[int | str | None]]:
    """Each graph input's shape as the ONNX file declares it: ints, symbolic names, None if unknown."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    shapes: dict[str, list[int | str | None]] = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    return shapes


def check_dynamic_axes(component: Any, path: Path) -> None:
    """Raise :class:`ExportError` when a declared dynamic input axis is a fixed size in the graph."""
    shapes = graph_input_shapes(path)
    for name, axes in component.dynamic_axes.items():
        dims = shapes.get(name)
        if dims is None:
            continue
        for axis in axes:
            if -len(dims) <= axis < len(dims) and isinstance(dims[axis], int):
                raise ExportError(
                    f"input {name!r} axis {axis} is declared dynamic but the exported graph fixes it to {dims[axis]}"
                )


def check_other_sizes(component: Any, path: Path, warned: list[str], *, atol: float, rtol: float) -> None:
    """Run the graph in ONNX Runtime at other sizes; raise :class:`ExportError` where it differs from eager."""
    try:
        import onnxruntime as ort
    except ImportError:  # the guard still checks every graph stage at these sizes
        return
    from ..optimizer.guard import check_outputs
    from ..optimizer.shapes import shape_variants

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    module = component.module.eval()
    for inputs in shape_variants(component):
        try:
            expected = run_reference(module, inputs)
        except Exception:  # not a size this module takes: nothing to compare
            continue
        shape = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
        feeds = dict(zip(component.input_names, inputs, strict=True))
        try:
            arrays = session.run(None, {n: feeds[n].detach().cpu().numpy() for n in names})
        except Exception as exc:
            raise ExportError(f"the graph fails at input shape {shape} ({warned[0]}): {first_line(exc)}") from exc
        leaves, spec = flatten_outputs(expected)
        outputs = pytree.tree_unflatten([torch.from_numpy(a) for a in arrays], spec)
        verdict = check_outputs(expected, outputs, precision="fp32", metric=_ALLCLOSE, atol=atol, rtol=rtol)
        if not verdict.passed:
            raise ExportError(f"the graph is wrong at input shape {shape} ({warned[0]}): {verdict.reason}")


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


_ALLCLOSE = Metric("allclose", 0.0)
#: Version of the checks an export passes before it is kept (exports made before are not reused).
EXPORT_CHECKS = 2
#: How the export's files are laid out: 2 is a dynamo export with its weights in ``model.onnx.data``.
EXPORT_LAYOUT = 2

exporter = OnnxExporter()


def export_key(component: Any) -> dict[str, Any]:
    """What identifies an export: the component, exporter preference, opsets and library versions."""
    from ..cache import library_versions

    return {
        "artifact": "onnx-export",
        "component": component.key(),
        "exporter": component.exporter,
        "opset": [exporter.OPSET, exporter.LEGACY_OPSET],
        "checks": EXPORT_CHECKS,
        "layout": EXPORT_LAYOUT,
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
        raise NotApplicable(f"component {component.name!r} declares that it does not export to ONNX")
    key = cache_key(export_key(component))
    order = [component.exporter, "legacy" if component.exporter == "dynamo" else "dynamo"]

    def build(directory: Path) -> dict[str, Any]:
        errors: list[str] = []
        target = directory / "model.onnx"
        for name in order:

            def written(name: str = name) -> list[str]:  # in a child: torch.onnx and onnx stay there
                warned = exporter.write(component, target, name)
                check_dynamic_axes(component, target)
                _check_loadable(target)
                return warned

            try:
                with memory_step(f"onnx-export-{name}", component, context):
                    warned = run_isolated(written, f"onnx-export-{name}", enabled=context.settings.isolate_builds)
                exporter.check_sizes(component, target, warned)  # here: ONNX Runtime is not fork-safe
                return {"exporter": name, "failed": errors}
            except MemoryBudgetError:
                raise
            except Exception as exc:  # exporter failures are many and varied; the other may work
                if is_unwritable(exc):  # the cache's disk, not the exporter: the cache handles it
                    raise
                first_line = (str(exc).strip().splitlines() or [""])[0][:200]
                errors.append(f"{name}: {type(exc).__name__}: {first_line}")
                log.info("%s: the %s exporter failed: %s", component.name, name, errors[-1])
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


class GraphRunner(EagerFallback):
    """A graph backend's ``run_arrays(list of numpy inputs) -> list of arrays`` as a torch-in, torch-out callable.

    A call the graph cannot take (another dtype or rank, another size on an axis that was not
    declared dynamic, or an error inside the backend) runs the eager module instead, through the
    one run-time policy (:class:`~uniopt.plugins.fallback.RuntimeFallbacks`: counted, logged once,
    raised when fallback is off). Inside :meth:`strict` (the guard's validation) it raises instead.
    """

    #: The graph was captured at fixed shapes: the guard validates it at other sizes too.
    fixed_shapes = True

    def __init__(self, component: Any, run_arrays: Callable[[list[Any]], list[Any]], candidate: str, allowed: bool):
        super().__init__(component.name, component.module, candidate, allowed)
        self._run_arrays = run_arrays
        self._spec = output_structure(component)
        self._signature = _signature(component)

    def __call__(self, *args: Any) -> Any:
        import numpy as np

        if len(args) != len(self._signature):
            raise TypeError(f"{self.component_name} takes {len(self._signature)} inputs, got {len(args)}")
        if not _fits(args, self._signature):
            shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
            return self.eager_instead(f"input {shapes} is outside the exported graph's shapes", None, *args)
        arrays = [a.detach().cpu().numpy() for a in args]
        try:
            outputs = self._run_arrays(arrays)
        except Exception as exc:  # the backend's own errors are many; none reaches the engine's caller
            shapes = [tuple(a.shape) for a in arrays]
            return self.eager_instead(f"backend error at input {shapes}: {first_line(exc)}", exc, *args)
        return pytree.tree_unflatten([torch.from_numpy(np.ascontiguousarray(o)) for o in outputs], self._spec)


def graph_stage_runner(
    component: Any, run_arrays: Any, context: BuildContext | None = None, candidate: str = "graph"
) -> GraphRunner:
    """A :class:`GraphRunner` for ``candidate``; ``context`` supplies the fallback setting (default on)."""
    allowed = context is None or context.settings.fallback_on_optimization_error
    return GraphRunner(component, run_arrays, candidate, allowed)
