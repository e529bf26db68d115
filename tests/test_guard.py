"""The accuracy guard: structure first, then values by tolerance or by the component's metric."""

from __future__ import annotations

import math

import pytest
import torch

from uniopt import Metric
from uniopt.optimizer.guard import (
    MAX_MEAN_KL_NATS,
    TIE_MARGIN_NATS,
    check_outputs,
    distribution_error,
    metric_value,
)

FP32 = {"precision": "fp32", "metric": Metric(), "atol": 1e-4, "rtol": 1e-4}


def test_fp32_within_tolerance_passes_and_reports_the_max_difference() -> None:
    ref = torch.ones(3, 4)
    verdict = check_outputs(ref, ref + 5e-5, **FP32)
    assert verdict.passed and verdict.metric == "allclose" and verdict.value == pytest.approx(5e-5, rel=1e-2)


def test_fp32_beyond_tolerance_fails_with_the_difference() -> None:
    verdict = check_outputs(torch.zeros(4), torch.tensor([0.0, 0.0, 0.01, 0.0]), **FP32)
    assert not verdict.passed and "max abs diff 0.01" in verdict.reason


@pytest.mark.parametrize(
    ("candidate", "words"),
    [
        ((torch.zeros(2, 3),), "structure"),
        ({"y": torch.zeros(2, 3)}, "structure"),
        (torch.zeros(2, 4), "expected (2, 3)"),
        (torch.zeros(2, 3, dtype=torch.float64), "torch.float32"),
    ],
)
def test_structure_shape_and_dtype_must_match(candidate: object, words: str) -> None:
    verdict = check_outputs(torch.zeros(2, 3), candidate, **FP32)
    assert not verdict.passed and words in verdict.reason


def test_nested_outputs_are_compared_leaf_by_leaf() -> None:
    ref = {"logits": torch.ones(2), "extra": (torch.zeros(1), torch.ones(1))}
    good = {"logits": torch.ones(2), "extra": (torch.zeros(1), torch.ones(1))}
    bad = {"logits": torch.ones(2), "extra": (torch.zeros(1), torch.full((1,), 2.0))}
    assert check_outputs(ref, good, **FP32).passed
    assert not check_outputs(ref, bad, **FP32).passed


def test_nan_fails_even_under_a_lenient_metric() -> None:
    out = torch.tensor([1.0, float("nan")])
    verdict = check_outputs(torch.ones(2), out, precision="bf16", metric=Metric("cosine", 0.0), atol=1, rtol=1)
    assert not verdict.passed and "NaN" in verdict.reason


def test_cosine_takes_the_worst_row() -> None:
    ref = torch.eye(3)
    out = ref.clone()
    out[2] = torch.tensor([0.0, 1.0, 1.0])
    assert metric_value("cosine", ref, out) == pytest.approx(1 / math.sqrt(2))
    verdict = check_outputs(ref, out, precision="int8", metric=Metric("cosine", 0.9), atol=0, rtol=0)
    assert not verdict.passed and verdict.metric == "cosine"


def test_argmax_agreement_and_token_agreement() -> None:
    ref = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    out = torch.tensor([[0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.3, 0.7]])
    assert metric_value("argmax_agreement", ref, out) == 0.75
    assert metric_value("token_agreement", torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4])) == 0.75


def test_ctc_agreement_ignores_ties_but_not_decisive_frames() -> None:
    tie = [0.0, TIE_MARGIN_NATS / 2, -5.0]
    decisive = [3.0, 0.0, -5.0]
    ref = torch.tensor([tie, decisive, decisive, decisive])
    flipped_tie = torch.tensor([[1.0, 0.0, -5.0], decisive, decisive, decisive])
    flipped_decisive = torch.tensor([tie, [0.0, 3.0, -5.0], decisive, decisive])
    assert metric_value("argmax_agreement", ref, flipped_tie) == 0.75
    assert metric_value("ctc_agreement", ref, flipped_tie) == 1.0
    assert metric_value("ctc_agreement", ref, flipped_decisive) == pytest.approx(2 / 3)
    # Token agreement on logits (teacher-forced decoders) is judged the same way.
    assert metric_value("token_agreement", ref, flipped_tie) == 1.0
    assert metric_value("token_agreement", ref, flipped_decisive) == pytest.approx(2 / 3)


def test_snr_of_a_waveform() -> None:
    signal = torch.sin(torch.linspace(0, 100, 4000))
    assert metric_value("snr_db", signal, signal) == math.inf
    assert metric_value("snr_db", signal, signal * 1.01) == pytest.approx(40.0, abs=0.1)
    verdict = check_outputs(signal, signal * 1.1, precision="bf16", metric=Metric("snr_db", 30.0), atol=0, rtol=0)
    assert not verdict.passed and verdict.value == pytest.approx(20.0, abs=0.1)


def test_integer_tokens_are_judged_by_agreement_not_exact_equality() -> None:
    ref = torch.arange(20)
    one_flip = ref.clone()
    one_flip[-1] = 0
    token = Metric("token_agreement", 0.9)
    for precision in ("fp32", "int8"):
        verdict = check_outputs(ref, one_flip, precision=precision, metric=token, atol=1e-4, rtol=1e-4)
        assert verdict.passed and verdict.metric == "token_agreement" and verdict.value == 0.95
    many_flips = torch.zeros(20, dtype=torch.long)
    assert not check_outputs(ref, many_flips, precision="int8", metric=token, atol=0, rtol=0).passed
    # Without an agreement metric, integers must match exactly.
    assert not check_outputs(ref, one_flip, precision="fp32", metric=Metric(), atol=1e-4, rtol=1e-4).passed


# -- NaN and infinity ------------------------------------------------------------------------------
@pytest.mark.parametrize(("metric", "threshold"), [("cosine", 0.99), ("snr_db", 20.0), ("ctc_agreement", 0.9)])
def test_an_all_nan_candidate_fails_when_the_reference_holds_one_infinity(metric: str, threshold: float) -> None:
    ref = torch.linspace(-1, 1, 12).reshape(3, 4)
    ref[0, 0] = -math.inf
    verdict = check_outputs(
        ref, torch.full_like(ref, math.nan), precision="int8", metric=Metric(metric, threshold), atol=0, rtol=0
    )
    assert not verdict.passed and "where the reference is finite" in verdict.reason


def test_the_references_own_infinities_must_be_matched_and_the_rest_is_judged() -> None:
    ref = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    ref[:, 0] = -math.inf  # a masked label
    close = ref + 1e-3
    cos = Metric("cosine", 0.999)
    assert check_outputs(ref, close, precision="int8", metric=cos, atol=0, rtol=0).passed
    ctc = check_outputs(ref, close, precision="int8", metric=Metric("ctc_agreement", 0.9), atol=0, rtol=0)
    assert ctc.passed and ctc.value == 1.0
    assert check_outputs(ref, ref + 5e-5, **FP32).passed
    moved = close.clone()
    moved[0, 0], moved[0, 1] = 0.5, -math.inf
    verdict = check_outputs(ref, moved, precision="int8", metric=cos, atol=0, rtol=0)
    assert not verdict.passed and "where the reference is finite" in verdict.reason
    flipped = close.clone()
    flipped[1, 0] = math.inf
    verdict = check_outputs(ref, flipped, precision="int8", metric=cos, atol=0, rtol=0)
    assert not verdict.passed and "same places" in verdict.reason


def test_a_metric_that_comes_out_nan_fails() -> None:
    ref = torch.full((2, 4), 1e200, dtype=torch.float64)  # the norms overflow: cosine is inf / inf
    assert math.isnan(metric_value("cosine", ref, ref))
    verdict = check_outputs(ref, ref.clone(), precision="int8", metric=Metric("cosine", 0.99), atol=0, rtol=0)
    assert not verdict.passed and "nan" in verdict.reason


# -- FP32 is judged as FP32 --------------------------------------------------------------------------
def test_fp32_float_outputs_are_judged_by_tolerance_next_to_integer_outputs() -> None:
    tokens, logits = torch.arange(8), torch.randn(8, 5)
    token = Metric("token_agreement", 0.9)
    assert check_outputs(
        (tokens, logits), (tokens, logits + 1e-6), precision="fp32", metric=token, atol=1e-4, rtol=1e-4
    ).passed
    verdict = check_outputs(
        (tokens, logits), (tokens, logits * 3 + 5), precision="fp32", metric=token, atol=1e-4, rtol=1e-4
    )
    assert not verdict.passed and verdict.metric == "allclose" and verdict.reason.startswith("output 1")


# -- agreement is not enough -------------------------------------------------------------------------
def test_scaled_logits_keep_every_argmax_but_fail_on_their_distribution() -> None:
    logits = 4 * torch.randn(50, 12, generator=torch.Generator().manual_seed(2))
    ctc = Metric("ctc_agreement", 0.98)
    assert metric_value("ctc_agreement", logits, logits / 10) == 1.0
    verdict = check_outputs(logits, logits / 10, precision="int8", metric=ctc, atol=0, rtol=0)
    assert not verdict.passed and "mean KL" in verdict.reason
    assert distribution_error(logits, logits / 10) > MAX_MEAN_KL_NATS
    noisy = logits + 0.05 * torch.randn(50, 12, generator=torch.Generator().manual_seed(3))
    assert check_outputs(logits, noisy, precision="int8", metric=ctc, atol=0, rtol=0).passed
    for name in ("argmax_agreement", "token_agreement"):
        assert not check_outputs(logits, logits / 10, precision="bf16", metric=Metric(name, 0.9), atol=0, rtol=0).passed
