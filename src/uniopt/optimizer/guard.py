"""The accuracy guard: a stage's outputs against the eager FP32 reference.

Structure first (the same tree of outputs, each with the same shape and dtype), then values, output
by output: float outputs of FP32 stages to ``atol``/``rtol``; of reduced-precision stages by the
metric the component declares (label metrics on scores also bound the mean KL divergence); integer
outputs by agreement under a label metric, else exactly. A NaN or infinity where the reference is
finite fails; the reference's own NaN and infinities must be matched place for place, and the metric
is computed on the rest. A metric that comes out NaN fails.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import InputError
from .component import Metric

__all__ = [
    "GuardResult",
    "check_outputs",
    "check_structure",
    "distribution_error",
    "finite_parts",
    "fixed_shapes",
    "flatten_outputs",
    "metric_value",
    "non_finite_problem",
    "reference_outputs",
    "run_reference",
    "strict_calls",
]


@dataclass(frozen=True)
class GuardResult:
    """``passed`` with the metric that decided it, its value, and why it failed."""

    passed: bool
    metric: str
    value: float | None
    reason: str = ""


def _as_tensor(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return leaf
    if hasattr(leaf, "__array__") and not isinstance(leaf, (int, float, bool, str)):
        return torch.as_tensor(leaf)
    return leaf


def flatten_outputs(outputs: Any) -> tuple[list[Any], Any]:
    """Leaves and tree structure of an output (tuples, dicts, HF ModelOutput objects)."""
    leaves, spec = pytree.tree_flatten(outputs)
    return [_as_tensor(leaf) for leaf in leaves], spec


def run_reference(module: Callable[..., Any], inputs: tuple[Any, ...]) -> Any:
    """Eager FP32 outputs of ``module`` (or a method of it) on a deep copy of ``inputs`` (some modules
    change inputs in place)."""
    with torch.inference_mode():
        return module(*copy.deepcopy(inputs))


def _describe(inputs: tuple[Any, ...]) -> str:
    return ", ".join(f"{tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__ for v in inputs)


def reference_outputs(name: str, module: Callable[..., Any], inputs: tuple[Any, ...]) -> Any:
    """:func:`run_reference`, with an :class:`~uniopt.errors.InputError` naming the component when it raises."""
    try:
        return run_reference(module, inputs)
    except Exception as exc:
        raise InputError(
            f"component {name!r}: the module raised {type(exc).__name__} on its inputs ({_describe(inputs)}): "
            f"{str(exc).strip()[:300]}; check the component's example, calibration and validation inputs "
            "(called as module(*inputs))"
        ) from exc


def fixed_shapes(stage: Any) -> bool:
    """Whether ``stage`` runs a graph captured at fixed shapes (validated at other sizes as well)."""
    return bool(getattr(getattr(stage, "run", None), "fixed_shapes", False))


@contextlib.contextmanager
def strict_calls(stage: Any) -> Iterator[None]:
    """While validating: a stage that would run eager for a call it cannot take raises instead."""
    strict = getattr(getattr(stage, "run", None), "strict", None)
    with strict() if callable(strict) else contextlib.nullcontext():
        yield


#: Metrics that compare labels; integer outputs are judged by them instead of exact equality.
AGREEMENT_METRICS = ("argmax_agreement", "ctc_agreement", "token_agreement")

#: Frames whose reference top-2 log-probabilities are closer than this (nats) are ties for
#: ``ctc_agreement`` and ``token_agreement`` on logits: either label is as likely to within 5%,
#: so disagreeing there is noise.
TIE_MARGIN_NATS = 0.05
#: The decisive agreements fall back to every frame when fewer than this share of frames is decisive.
MIN_DECISIVE_SHARE = 0.1
#: Label metrics on scores also bound how far the candidate's distribution moved: the mean KL
#: divergence (nats) over decisive frames (:func:`distribution_error`). Measured at benchmark size,
#: accepted candidates stay under 0.005 (segmentation onnxruntime-int8 0.0045, TTS decoder torch-int8
#: 0.002, phoneme openvino-int8-matmul 0.00013) and logits divided by 10 reach 0.115 to 1.1.
MAX_MEAN_KL_NATS = 0.02


def _decisive_agreement(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Argmax agreement over the frames where the reference is not a tie between two labels."""
    top2 = ref.double().log_softmax(-1).topk(2, dim=-1).values
    decisive = (top2[..., 0] - top2[..., 1]) >= TIE_MARGIN_NATS
    agree = ref.argmax(-1) == out.argmax(-1)
    if decisive.double().mean() < MIN_DECISIVE_SHARE:
        return float(agree.double().mean())
    return float(agree[decisive].double().mean())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    denom = a.norm() * b.norm()
    if denom == 0:
        return 1.0 if torch.equal(a, b) else 0.0
    return float((a @ b) / denom)


def metric_value(name: str, ref: torch.Tensor, out: torch.Tensor) -> float:
    """The value of metric ``name`` for one output tensor against its reference."""
    if name == "cosine":
        if ref.dim() >= 2:  # per row: the worst embedding, not the average one
            rows_ref, rows_out = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1])
            return min(_cosine(r, o) for r, o in zip(rows_ref, rows_out, strict=True))
        return _cosine(ref, out)
    if name in ("ctc_agreement", "token_agreement") and ref.is_floating_point() and ref.dim() > 0:
        return _decisive_agreement(ref, out)
    if name in AGREEMENT_METRICS:
        if ref.dim() == 0 or not ref.is_floating_point():
            return float((ref == out).double().mean())
        return float((ref.argmax(-1) == out.argmax(-1)).double().mean())
    if name == "snr_db":
        noise = (ref.double() - out.double()).pow(2).sum()
        signal = ref.double().pow(2).sum()
        return math.inf if noise == 0 else float(10 * torch.log10(signal / noise))
    if name == "allclose":
        return float((ref.double() - out.double()).abs().max()) if ref.numel() else 0.0
    raise ValueError(f"unknown metric {name!r}")


def check_structure(reference: Any, candidate: Any) -> GuardResult | None:
    """A failed result when ``candidate`` differs from ``reference`` in structure, shape or dtype."""
    return _structure_failure(flatten_outputs(reference), flatten_outputs(candidate))


def _structure_failure(reference: tuple[list[Any], Any], candidate: tuple[list[Any], Any]) -> GuardResult | None:
    """:func:`check_structure` on flattened outputs ``(leaves, spec)``."""
    (ref_leaves, ref_spec), (out_leaves, out_spec) = reference, candidate
    if ref_spec != out_spec:
        return GuardResult(False, "structure", None, f"output structure differs: {out_spec} vs {ref_spec}")
    for index, (ref, out) in enumerate(zip(ref_leaves, out_leaves, strict=True)):
        if not isinstance(ref, torch.Tensor):
            if ref != out:
                return GuardResult(False, "structure", None, f"output {index}: {out!r} != {ref!r}")
            continue
        if not isinstance(out, torch.Tensor) or out.shape != ref.shape or out.dtype != ref.dtype:
            got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
            return GuardResult(
                False,
                "structure",
                None,
                f"output {index}: got {got}, expected {tuple(ref.shape)} {ref.dtype}",
            )
    return None


def non_finite_problem(ref: torch.Tensor, out: torch.Tensor) -> str | None:
    """Why ``out``'s NaN and infinities do not match ``ref``'s, or None when they do.

    Where ``ref`` is finite, ``out`` must be; where ``ref`` is NaN or an infinity, ``out`` must hold
    the same (NaN, or the infinity of the same sign).
    """
    ref_bad, out_bad = ~torch.isfinite(ref), ~torch.isfinite(out)
    extra = int((out_bad & ~ref_bad).sum())
    if extra:
        return f"{extra} NaN or infinite values where the reference is finite"
    if not bool(ref_bad.any()):
        return None
    codes = {"nan": 0.0, "posinf": 1.0, "neginf": -1.0}
    if not bool(out_bad[ref_bad].all()) or not torch.equal(
        ref[ref_bad].nan_to_num(**codes), out[ref_bad].nan_to_num(**codes)
    ):
        return "its NaN and infinities differ from the reference's, which has them at the same places"
    return None


def finite_parts(ref: torch.Tensor, out: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``ref`` and ``out`` with the reference's non-finite places set to one finite value in both.

    For label metrics (scores), NaN and -inf become less than every finite score and +inf more, so
    argmax and softmax stay what they were; for the others they become 0, so they do not count.
    """
    bad = ~torch.isfinite(ref)
    if not bool(bad.any()):
        return ref, out
    if metric in AGREEMENT_METRICS:
        finite = ref[~bad].double()
        low = float(finite.min()) - 1 if finite.numel() else 0.0
        high = float(finite.max()) + 1 if finite.numel() else 0.0
        fill = torch.where(ref == math.inf, high, low).to(ref.dtype)
    else:
        fill = torch.zeros_like(ref)
    return torch.where(bad, fill, ref), torch.where(bad, fill, out)


def distribution_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Mean KL divergence (nats) of softmax(``out``) from softmax(``ref``) over the last axis.

    Averaged over the decisive frames (see :data:`TIE_MARGIN_NATS`), or every frame when fewer than
    :data:`MIN_DECISIVE_SHARE` are decisive. Scores may be logits or log-probabilities.
    """
    log_p, log_q = ref.double().log_softmax(-1), out.double().log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    top2 = log_p.topk(min(2, log_p.shape[-1]), dim=-1).values
    decisive = (top2[..., 0] - top2[..., -1]) >= TIE_MARGIN_NATS
    if decisive.double().mean() < MIN_DECISIVE_SHARE:
        return float(kl.mean())
    return float(kl[decisive].mean())


def _fail(index: int, metric: str, value: float | None, reason: str) -> GuardResult:
    return GuardResult(False, metric, value, f"output {index}: {reason}")


def _check_leaf(
    index: int, ref: torch.Tensor, out: torch.Tensor, precision: str, metric: Metric, atol: float, rtol: float
) -> GuardResult:
    """One output tensor: floats of FP32 stages by tolerance, labels by agreement, the rest by ``metric``."""
    labels = metric.name in AGREEMENT_METRICS
    if not ref.is_floating_point():
        if labels:  # tokens and labels: a near-tie may flip even in FP32, so agreement decides
            value = metric_value("token_agreement", ref, out)
            if value < metric.threshold:
                return _fail(index, metric.name, value, f"{metric.name} {value:.4f} < {metric.threshold}")
            return GuardResult(True, metric.name, value)
        name = "allclose"
    else:
        name = "allclose" if precision == "fp32" or metric.name == "allclose" else metric.name
        problem = non_finite_problem(ref, out)
        if problem is not None:
            return _fail(index, name, None, problem)
        ref, out = finite_parts(ref, out, name)
    if name == "allclose":
        value = metric_value("allclose", ref, out)
        if not torch.allclose(out.double(), ref.double(), atol=atol, rtol=rtol):
            return _fail(index, name, value, f"max abs diff {value:.3g} > atol {atol:g} (rtol {rtol:g})")
        return GuardResult(True, name, value)
    value = metric_value(name, ref, out)
    if math.isnan(value) or value < metric.threshold:
        return _fail(index, name, value, f"{name} {value:.4f} < {metric.threshold}")
    if labels and ref.dim() > 0:
        kl = distribution_error(ref, out)
        if math.isnan(kl) or kl > MAX_MEAN_KL_NATS:
            reason = f"{name} {value:.4f}, but the scores differ: mean KL {kl:.4g} nats > {MAX_MEAN_KL_NATS}"
            return _fail(index, name, value, reason)
    return GuardResult(True, name, value)


def check_outputs(
    reference: Any, candidate: Any, *, precision: str, metric: Metric, atol: float, rtol: float
) -> GuardResult:
    """Compare ``candidate`` outputs to ``reference``, output by output (see :func:`_check_leaf`).

    The result names the metric of the first float output (else of the first output) and its
    worst value over the outputs judged by it.
    """
    ref_flat, out_flat = flatten_outputs(reference), flatten_outputs(candidate)
    failed = _structure_failure(ref_flat, out_flat)
    if failed is not None:
        return failed
    results: list[tuple[bool, GuardResult]] = []
    for index, (ref, out) in enumerate(zip(ref_flat[0], out_flat[0], strict=True)):
        if not isinstance(ref, torch.Tensor):
            continue
        verdict = _check_leaf(index, ref, out, precision, metric, atol, rtol)
        if not verdict.passed:
            return verdict
        results.append((ref.is_floating_point(), verdict))
    if not results:
        return GuardResult(True, "allclose", 0.0)
    shown = next((v for is_float, v in results if is_float), results[0][1]).metric
    values = [v.value for _, v in results if v.metric == shown and v.value is not None]
    worst = max if shown == "allclose" else min
    return GuardResult(True, shown, worst(values) if values else None)
