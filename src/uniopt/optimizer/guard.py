"""The accuracy guard: a stage's outputs against the eager FP32 reference.

Structure first (the same tree of outputs, each with the same shape and dtype), then values:
FP32 stages to ``atol``/``rtol``; reduced-precision stages by the metric the component declares.
A NaN or infinity where the reference is finite always fails.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .component import Metric

__all__ = ["GuardResult", "check_outputs", "check_structure", "flatten_outputs", "metric_value", "run_reference"]


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


def run_reference(module: torch.nn.Module, inputs: tuple[Any, ...]) -> Any:
    """Eager FP32 outputs on a deep copy of ``inputs`` (some modules change inputs in place)."""
    with torch.inference_mode():
        return module(*copy.deepcopy(inputs))


#: Metrics that compare labels; integer outputs are judged by them instead of exact equality.
AGREEMENT_METRICS = ("argmax_agreement", "ctc_agreement", "token_agreement")

#: Frames whose reference top-2 log-probabilities are closer than this (nats) are ties for
#: ``ctc_agreement`` and ``token_agreement`` on logits: either label is as likely to within 5%,
#: so disagreeing there is noise.
TIE_MARGIN_NATS = 0.05
#: The decisive agreements fall back to every frame when fewer than this share of frames is decisive.
MIN_DECISIVE_SHARE = 0.1


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


def check_outputs(
    reference: Any, candidate: Any, *, precision: str, metric: Metric, atol: float, rtol: float
) -> GuardResult:
    """Compare ``candidate`` outputs to ``reference``; FP32 by tolerance, else by ``metric``."""
    ref_flat, out_flat = flatten_outputs(reference), flatten_outputs(candidate)
    failed = _structure_failure(ref_flat, out_flat)
    if failed is not None:
        return failed
    ref_leaves, out_leaves = ref_flat[0], out_flat[0]
    worst: float | None = None
    metric_name = "allclose" if precision == "fp32" else metric.name
    for index, (ref, out) in enumerate(zip(ref_leaves, out_leaves, strict=True)):
        if not isinstance(ref, torch.Tensor):
            continue
        if ref.is_floating_point() and bool(torch.isfinite(ref).all()) and not bool(torch.isfinite(out).all()):
            return GuardResult(False, metric_name, None, f"output {index} has NaN or infinity")
        if not ref.is_floating_point() and metric.name in AGREEMENT_METRICS:
            # Tokens and labels: a near-tie may flip even in FP32, so agreement decides.
            value = metric_value("token_agreement", ref, out)
            if value < metric.threshold:
                return GuardResult(
                    False, metric.name, value, f"output {index}: {metric.name} {value:.4f} < {metric.threshold}"
                )
            worst = value if worst is None or metric_name == "allclose" else min(worst, value)
            metric_name = metric.name
            continue
        if metric_name == "allclose" or not ref.is_floating_point():
            if not torch.allclose(out.double(), ref.double(), atol=atol, rtol=rtol, equal_nan=True):
                diff = metric_value("allclose", ref, out)
                return GuardResult(
                    False,
                    "allclose",
                    diff,
                    f"output {index}: max abs diff {diff:.3g} > atol {atol:g} (rtol {rtol:g})",
                )
            value = metric_value("allclose", ref, out)
            worst = value if worst is None else max(worst, value)
            continue
        value = metric_value(metric_name, ref, out)
        if value < metric.threshold:
            return GuardResult(
                False, metric_name, value, f"output {index}: {metric_name} {value:.4f} < {metric.threshold}"
            )
        worst = value if worst is None else min(worst, value)
    return GuardResult(True, metric_name, worst)
