"""torch-int8-weights: int8 Linear weights (one scale per output channel) with float activations.

The layer against dequantized-weight ``F.linear`` (tight) and against FP32 (looser), the bytes it
stores, shared and tied weights, the candidate on the tiny TTS engine behind the guard, and the
host without the kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from uniopt import UniversalOptimizer
from uniopt.engines.tts import FishSpeechConfig, FishSpeechEngine, TiedOutputProjection
from uniopt.errors import NotApplicable
from uniopt.plugins import torch_native
from uniopt.plugins.model_cache import model_cache
from uniopt.plugins.torch_native import Int8WeightLinear, quantize_int8_weights, quantize_weight_int8

#: One bf16 rounding of the kernel's float32 sum (8 significant bits), with room for its summation order.
BF16_RTOL = 2**-7
#: The real probe (tests replace the module attribute; its cache is cleared around every test).
PROBE = torch_native.int8_weight_kernel_missing
AUTO: dict[str, Any] = {"mode": "auto", "tier": "cpu-avx512", "model_warmup_runs": 1, "reuse_decisions": False}


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    model_cache.clear()
    PROBE.cache_clear()
    yield
    model_cache.clear()
    PROBE.cache_clear()


def _layer(features: int = 64, out: int = 48, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(features, out, bias=bias).eval()


def _relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm())


# -- quantizing a weight -----------------------------------------------------------------------------
def test_each_weight_is_within_half_a_step_of_its_channel_scale() -> None:
    weight = torch.randn(40, 64) * torch.logspace(-3, 1, 40)[:, None]  # channels of very different sizes
    weight[7] = 0.0
    q, scales = quantize_weight_int8(weight, block_elements=1000)  # several blocks of rows
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (40,)
    assert int(q.abs().max()) <= 127
    deq = q.float() * scales.float()[:, None]
    assert bool(((deq - weight).abs() <= scales.float()[:, None] / 2 * (1 + 1e-6)).all())
    live = torch.arange(40) != 7
    assert bool((q[live].abs().amax(dim=1) >= 126).all()), "each channel uses the whole int8 range"
    assert float(scales[7]) == 1.0 and not q[7].any()
    assert bool((scales.float()[live] * 127 >= weight[live].abs().amax(dim=1)).all()), "a scale rounded down clips"


# -- the layer ---------------------------------------------------------------------------------------
def test_the_layer_computes_the_dequantized_linear() -> None:
    layer = _layer()
    int8 = Int8WeightLinear.from_linear(layer, {})
    x = torch.randn(3, 5, 64)
    with torch.inference_mode():
        out, fp32 = int8(x), layer(x)
    deq = int8.dequantized()
    assert out.shape == (3, 5, 48) and out.dtype == torch.float32
    # Tight: what the kernel is given (bf16 activations, the int8 weight times its scale), summed in
    # float32 and rounded once to bf16, then the float32 bias.
    exact = F.linear(x.bfloat16().float(), deq).bfloat16().float() + layer.bias
    assert torch.allclose(out, exact, rtol=BF16_RTOL, atol=1e-6), float((out - exact).abs().max())
    # The same as the dequantized weight on float32 activations, within bf16 rounding.
    assert _relative(out, F.linear(x, deq, layer.bias)) < 5e-3
    # Looser: close to FP32, but not FP32 (the weights really are int8).
    error = _relative(out, fp32)
    assert 1e-4 < error < 2e-2, error


@pytest.mark.parametrize("shape", [(64,), (1, 64), (7, 64), (2, 9, 64)])
def test_any_batch_shape(shape: tuple[int, ...]) -> None:
    layer = _layer(bias=False, seed=1)
    int8 = Int8WeightLinear.from_linear(layer, {})
    x = torch.randn(*shape)
    with torch.inference_mode():
        out = int8(x)
    assert out.shape == (*shape[:-1], 48)
    exact = F.linear(x.bfloat16().float(), int8.dequantized()).bfloat16().float()
    assert torch.allclose(out, exact, rtol=BF16_RTOL, atol=1e-6)


def test_strided_and_offset_inputs_give_the_contiguous_answer() -> None:
    """The kernel reads rows at a stride of in_features with aligned loads; views are copied first."""
    int8 = Int8WeightLinear.from_linear(_layer(seed=2), {})
    base = torch.randn(6, 65)
    offset = base[:, 1:]  # starts one float in: misaligned, rows 65 apart
    transposed = torch.randn(64, 6).t()
    with torch.inference_mode():
        for x in (offset, transposed, offset.bfloat16()):
            assert torch.equal(int8(x).float(), int8(x.contiguous()).float())


class _Attending(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(32, 2, batch_first=True)  # reads out_proj.weight itself
        self.head = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attention(x, x, x)[0])


def test_only_plain_linears_with_a_fitting_input_size_are_replaced() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    work = quantize_int8_weights(model)
    assert type(work[0]) is nn.Linear and isinstance(work[2], Int8WeightLinear)  # 20 is not a multiple of 16
    attending = _Attending().eval()
    work = quantize_int8_weights(attending)
    assert type(work.attention.out_proj) is type(attending.attention.out_proj)
    assert isinstance(work.head, Int8WeightLinear)
    x = torch.randn(1, 4, 32)
    with torch.inference_mode():
        assert _relative(work(x), attending(x)) < 2e-2
    with pytest.raises(NotApplicable, match="no nn.Linear with in_features a multiple of 16"):
        quantize_int8_weights(nn.MultiheadAttention(32, 2))
    with pytest.raises(NotApplicable, match="no nn.Linear"):
        quantize_int8_weights(nn.Sequential(nn.Linear(20, 8)))


# -- weights: stored as int8, shared and tied -----------------------------------------------------------
def _linear_bytes(module: nn.Module) -> tuple[int, int]:
    """(float bytes of the nn.Linear weights, bytes the Int8WeightLinear layers hold), each tensor once."""
    floats = {id(m.weight): m.weight for m in module.modules() if type(m) is nn.Linear}
    int8 = {id(t): t for m in module.modules() if isinstance(m, Int8WeightLinear) for t in (m.weight, m.scales)}
    return (
        sum(t.numel() * t.element_size() for t in floats.values()),
        sum(t.numel() * t.element_size() for t in int8.values()),
    )


def test_the_tts_decoder_stores_its_linear_weights_in_a_quarter_of_the_bytes() -> None:
    engine = FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=4), seed=0)
    decoder = engine.decoder
    before = {name: p.clone() for name, p in decoder.named_parameters()}
    work = quantize_int8_weights(decoder)
    fp32_bytes, _ = _linear_bytes(decoder)
    left, int8_bytes = _linear_bytes(work)
    embedding = decoder.model.embeddings.weight
    assert left == 0, "every Linear of the decoder was quantized"
    # The output projection is quantized too: the int8 layers hold one more [vocab, dim] weight.
    untied = embedding.numel() * 4
    ratio = int8_bytes / (fp32_bytes + untied)
    assert 0.25 <= ratio < 0.26, ratio
    assert all(m.weight.dtype == torch.int8 for m in work.modules() if isinstance(m, Int8WeightLinear))
    for name, p in decoder.named_parameters():  # the engine's own module is left as it was
        assert p.dtype == torch.float32 and torch.equal(p, before[name]), name
    assert isinstance(decoder.model.output, TiedOutputProjection)


def test_a_shared_weight_is_quantized_once_and_stays_shared() -> None:
    torch.manual_seed(6)
    first, second = nn.Linear(32, 32, bias=False), nn.Linear(32, 32)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second).eval()
    work = quantize_int8_weights(model)
    assert isinstance(work[0], Int8WeightLinear) and isinstance(work[2], Int8WeightLinear)
    assert work[0].weight is work[2].weight and work[0].scales is work[2].scales
    assert work[2].bias is not None and work[0].bias is None
    x = torch.randn(3, 32)
    with torch.inference_mode():
        assert _relative(work(x), model(x)) < 2e-2


def test_a_tied_output_projection_is_quantized_and_the_embedding_stays_float() -> None:
    torch.manual_seed(7)
    embedding = nn.Embedding(100, 32)
    model = nn.ModuleDict({"embedding": embedding, "output": TiedOutputProjection(embedding)}).eval()
    work = quantize_int8_weights(model)
    assert isinstance(work["output"], Int8WeightLinear) and work["output"].out_features == 100
    assert type(work["embedding"]) is nn.Embedding and work["embedding"].weight.dtype == torch.float32
    assert torch.equal(work["embedding"].weight, embedding.weight)
    assert isinstance(model["output"], TiedOutputProjection) and model["output"].embedding is embedding
    x = torch.randn(4, 32)
    with torch.inference_mode():
        out, ref = work["output"](x), model["output"](x)
    assert 1e-4 < _relative(out, ref) < 2e-2


# -- the candidate -------------------------------------------------------------------------------------
def test_the_candidate_passes_the_guard_on_the_tiny_tts_decoder(tmp_path: Path) -> None:
    engine = FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=4), seed=0)
    opt = UniversalOptimizer(engine, cache_dir=str(tmp_path), allow=("eager", "torch-int8-weights"), **AUTO)
    try:
        decoder = opt.report().component("decoder")
        result = decoder.candidate("torch-int8-weights")
        assert result.accepted, result.reason
        assert result.metric == "token_agreement" and result.metric_value is not None
        assert result.metric_value >= 0.9  # teacher-forced agreement with eager FP32
        assert [s["step"] for s in result.memory_steps][0] == "torch-int8-weights"
        assert result.speedup is not None, "it was timed against eager"
        codec = opt.report().component("codec").candidate("torch-int8-weights")
        assert not codec.accepted and codec.reason.startswith("not applicable: no nn.Linear"), codec.reason
    finally:
        opt.restore()


def test_without_the_kernel_the_candidate_does_not_apply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reason = "torch 0.0 has no CPU kernel aten._weight_int8pack_mm for torch.bfloat16 (probed)"
    monkeypatch.setattr(torch_native, "int8_weight_kernel_missing", lambda: reason)
    torch.manual_seed(8)
    model, x = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16)).eval(), torch.randn(2, 32)
    opt = UniversalOptimizer(
        model,
        (x,),
        cache_dir=str(tmp_path),
        allow=("eager", "torch-int8-weights"),
        fallback_on_optimization_error=False,  # not applicable is recorded, never raised
        **AUTO,
    )
    result = opt.report().component("module").candidate("torch-int8-weights")
    assert not result.accepted
    assert result.reason == f"not applicable: {reason}"
    assert opt.report().component("module").chosen == "eager"


def test_the_probe_names_a_missing_kernel_instead_of_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    assert PROBE() is None, "this torch has the kernel"
    PROBE.cache_clear()
    monkeypatch.setattr(torch_native, "_INT8_WEIGHT_OP", "_no_such_int8_kernel")
    reason = PROBE()
    assert reason is not None and "has no CPU kernel aten._no_such_int8_kernel" in reason, reason
