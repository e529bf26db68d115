"""The Fish-Speech-style TTS engine: synthesis, sampling, caches, uniopt components and export traps.

Everything runs on :meth:`FishSpeechConfig.tiny` (2 layers of width 64, 10 codebooks of 64 codes).
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_engines import tiny_fish_model
from uniopt import Component, UniversalOptimizer
from uniopt.engines.tts import (
    FishSpeechAdapter,
    FishSpeechConfig,
    FishSpeechEngine,
    TiedOutputProjection,
    TokenGenerator,
)
from uniopt.errors import InputError
from uniopt.optimizer.guard import metric_value
from uniopt.optimizer.install import Installation, twin
from uniopt.plugins import Stage

HOP = 2048
SR = 44_100


@pytest.fixture(scope="module")
def engine() -> FishSpeechEngine:
    return FishSpeechEngine.from_config(FishSpeechConfig.tiny(decode_steps=4), seed=0)


def _onnx_export(module: torch.nn.Module, inputs: tuple, path: Path, **kwargs) -> None:
    # The exporters warn about their own internals (pytree deprecations, non-leaf .grad, TorchScript);
    # uniopt's export plugin silences them the same way.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kwargs.pop("dynamo", True):
            torch.onnx.export(module, inputs, None, dynamo=True, opset_version=18, verbose=False, **kwargs).save(
                str(path)
            )
        else:
            torch.onnx.export(module, inputs, str(path), dynamo=False, **kwargs)


def _session(path: Path):
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT logs constant-folding notes about CastLike nodes at warning level
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# -- synthesis ------------------------------------------------------------------------------------------
def test_synthesize_returns_audio_rate_and_metrics(engine: FishSpeechEngine) -> None:
    audio, rate, metrics = engine.synthesize("Hello, world.", seed=1)
    frames = engine.config.decode_steps
    assert rate == SR and audio.dtype == np.float32 and audio.shape == (frames * HOP,)
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0 and audio.std() > 0
    assert {"real_time_factor", "time_to_first_audio_s", "tokens_generated", "tokens_per_second"} <= metrics.keys()
    assert metrics["tokens_generated"] == frames
    assert metrics["real_time_factor"] == pytest.approx(metrics["time_to_first_audio_s"] / (frames * HOP / SR))
    info = engine.info()
    assert info["trained"] is False and info["sample_rate"] == SR and info["parameters"]["decoder"] > 0


def test_longer_requests_continue_in_chunks_as_one_long_call(engine: FishSpeechEngine) -> None:
    prompt = engine.encode_prompt("chunks")
    frames = engine.generate(prompt, max_new_tokens=7, temperature=0.7, top_p=0.8, repetition_penalty=1.2, seed=5)
    assert frames.shape == (engine.config.model.num_codebooks + 1, 7)
    long_call = TokenGenerator(engine.model, decode_steps=7, repetition_window=engine.config.repetition_window)
    with torch.inference_mode():
        expected = long_call(prompt, torch.tensor(0.7), torch.tensor(0.8), torch.tensor(1.2), torch.tensor(5))
    assert torch.equal(frames, expected[0])


def test_seeded_sampling_is_deterministic_and_greedy_ignores_the_seed(engine: FishSpeechEngine) -> None:
    first, _, _ = engine.synthesize("seeded", seed=3)
    again, _, _ = engine.synthesize("seeded", seed=3)
    other, _, _ = engine.synthesize("seeded", seed=4)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    greedy = [engine.synthesize("seeded", temperature=0.0, seed=s)[0] for s in (3, 4)]
    assert np.array_equal(greedy[0], greedy[1])


def test_semantic_tokens_and_codes_stay_in_range(engine: FishSpeechEngine) -> None:
    c = engine.config.model
    frames = engine.generate(
        engine.encode_prompt("range"), max_new_tokens=8, temperature=1.0, top_p=1.0, repetition_penalty=1.0, seed=0
    )
    assert bool((frames[0] >= c.semantic_begin_id).all()) and bool((frames[1:] < c.codebook_size).all())
    assert torch.equal(frames[1], frames[0] - c.semantic_begin_id)


def test_reference_audio_extends_the_prompt(engine: FishSpeechEngine) -> None:
    reference = np.sin(np.linspace(0, 400, 3 * HOP + 100)).astype(np.float32) * 0.5
    plain = engine.encode_prompt("voice")
    cloned = engine.encode_prompt("voice", reference)
    assert cloned.shape[-1] == plain.shape[-1] + 3
    assert bool((cloned[0, 0, 1:4] >= engine.config.model.semantic_begin_id).all())
    audio, _, _ = engine.synthesize("voice", torch.from_numpy(reference)[None], seed=1)
    assert audio.shape == (engine.config.decode_steps * HOP,)


def test_reference_audio_goes_through_the_shared_audio_checks(engine: FishSpeechEngine) -> None:
    reference = np.sin(np.linspace(0, 400, 3 * HOP + 100)).astype(np.float32) * 0.5
    expected = engine.encode_prompt("voice", reference)
    pcm = np.round(reference * 32768).astype(np.int16)  # int16 PCM is scaled to [-1, 1)
    assert torch.equal(engine.encode_prompt("voice", pcm), expected)
    stereo = np.stack([reference, reference])  # two channels are averaged
    assert torch.equal(engine.encode_prompt("voice", stereo), expected)
    assert torch.equal(engine.encode_prompt("voice", list(reference)), expected)


def test_end_of_speech_token_ends_the_utterance() -> None:
    config = dataclasses.replace(FishSpeechConfig.tiny(decode_steps=4), allow_eos=True)
    engine = FishSpeechEngine(config)
    assert float(engine.decoder.logit_bias[engine.tokenizer.eos_id]) == 0.0
    engine.decoder.logit_bias[engine.tokenizer.eos_id] = 1e4  # make <|im_end|> the first token
    audio, _, metrics = engine.synthesize("stop", max_new_tokens=9)
    assert audio.shape == (0,) and metrics["tokens_generated"] == 0


@pytest.mark.parametrize(
    ("text", "reference", "kwargs", "message"),
    [
        ("", None, {}, "empty"),
        ("   ", None, {}, "empty"),
        (42, None, {}, "must be a str"),
        ("x" * 400, None, {}, "max_seq_len"),
        ("hi", "voice.wav", {}, "numpy array or torch tensor"),
        ("hi", np.zeros(HOP, dtype=np.uint8), {}, "integer audio"),
        ("hi", np.zeros((3, HOP), dtype=np.float32), {}, "channel"),
        ("hi", np.zeros(HOP - 1, dtype=np.float32), {}, f"at least {HOP}"),
        ("hi", np.full(HOP, np.nan, dtype=np.float32), {}, "NaN"),
        ("hi", np.zeros(0, dtype=np.float32), {}, "empty"),
        ("hi", np.zeros(200 * HOP, dtype=np.float32), {}, "at most"),
        ("hi", None, {"temperature": -0.1}, "temperature"),
        ("hi", None, {"top_p": 0.0}, "top_p"),
        ("hi", None, {"repetition_penalty": 0.0}, "repetition_penalty"),
        ("hi", None, {"max_new_tokens": 0}, "max_new_tokens"),
        ("hi", None, {"seed": "1"}, "seed"),
    ],
)
def test_bad_input_raises_input_error(engine: FishSpeechEngine, text, reference, kwargs, message: str) -> None:
    with pytest.raises(InputError, match=message):
        engine.synthesize(text, reference, **kwargs)


def test_decoder_rejects_a_prompt_that_does_not_fit(engine: FishSpeechEngine) -> None:
    too_long = torch.zeros(1, 11, engine.config.model.max_seq_len, dtype=torch.long)
    params = (torch.tensor(0.0), torch.tensor(0.8), torch.tensor(1.2), torch.tensor(0))
    with pytest.raises(InputError, match="max_seq_len"):
        engine.decoder(too_long, *params)
    with pytest.raises(InputError, match="long tensor"):
        engine.decoder(too_long[:, :3, :4], *params)


# -- caches -----------------------------------------------------------------------------------------------
def test_kv_cache_decoding_equals_full_recompute(engine: FishSpeechEngine) -> None:
    model = engine.model
    prompt = engine.encode_prompt("cache check")
    frames = engine.generate(prompt, max_new_tokens=6, temperature=0.0, top_p=0.8, repetition_penalty=1.2, seed=0)
    sequence = torch.cat([prompt, frames[None]], dim=-1)
    length = prompt.shape[-1]
    with torch.inference_mode():
        full_logits, full_hidden = model(sequence)
        model.reset_caches()
        logits, _ = model.forward_generate(prompt, torch.arange(length))
        torch.testing.assert_close(logits[:, 0], full_logits[:, length - 1], atol=1e-4, rtol=1e-4)
        for step in range(frames.shape[-1] - 1):
            position = length + step
            logits, hidden = model.forward_generate(sequence[..., position : position + 1], torch.tensor([position]))
            torch.testing.assert_close(logits[:, 0], full_logits[:, position], atol=1e-4, rtol=1e-4)
        # The fast decoder: cached codebook steps against one pass over the frame's codes.
        codes = frames[1:, -1]
        full_fast = model.forward_fast(model.fast_project_in(full_hidden[:, -1]), codes[None, :-1])
        model.forward_generate_fast(model.fast_project_in(full_hidden[:, -1:]), torch.tensor([0]))
        for index in range(1, codes.shape[0]):
            step_logits = model.forward_generate_fast(
                model.fast_embeddings(codes[index - 1 : index]), torch.tensor([index])
            )
            torch.testing.assert_close(step_logits[:, 0], full_fast[:, index], atol=1e-4, rtol=1e-4)


def test_decoder_calls_are_independent_of_previous_calls(engine: FishSpeechEngine) -> None:
    component = engine.uniopt_components()[0]
    with torch.inference_mode():
        first = component.module(*component.example_inputs)
        component.module(*component.calibration_inputs[0])
        assert torch.equal(component.module(*component.example_inputs), first)


def test_teacher_forcing_returns_the_logits_behind_each_choice(engine: FishSpeechEngine) -> None:
    decoder, c = engine.decoder, engine.config.model
    prompt = engine.example_prompt()
    params = (torch.tensor(0.0), torch.tensor(0.8), torch.tensor(1.0), torch.tensor(0))  # greedy, no penalty
    with torch.inference_mode():
        frames = decoder(prompt, *params)
        semantic, codes = decoder(*TokenGenerator.teacher_forcing((prompt, *params), frames))
    steps = engine.config.decode_steps
    assert semantic.shape == (1, steps, c.codebook_size)
    assert codes.shape == (1, c.num_codebooks - 1, steps, c.codebook_size)
    assert torch.equal(semantic[0].argmax(-1) + c.semantic_begin_id, frames[0, 0])
    assert torch.equal(codes[0].argmax(-1), frames[0, 2:])
    # Forced frames other than its own: the choices follow what was forced, step by step.
    other = frames.clone()
    other[0, 2:, 0] = (other[0, 2:, 0] + 1) % c.codebook_size
    with torch.inference_mode():
        _, other_codes = decoder(prompt, *params, other)
    assert torch.equal(other_codes[0, 0, 0], codes[0, 0, 0])  # codebook 1 comes before the change
    assert not torch.equal(other_codes[0, 1, 0], codes[0, 1, 0])


def test_one_free_run_gives_the_frames_and_the_teacher_forced_scores(engine: FishSpeechEngine) -> None:
    decoder = engine.uniopt_components()[0]
    assert decoder.free_run_with_scores is not None and decoder.teacher_forcing is not None
    for inputs in decoder.guarded_inputs():  # greedy, and sampled with a repetition penalty
        with torch.inference_mode():
            frames, scores = decoder.free_run_with_scores(engine.decoder, *inputs)
            assert torch.equal(frames, engine.decoder(*inputs))
            replayed = engine.decoder(*decoder.teacher_forcing(inputs, frames))
        assert all(torch.equal(ours, theirs) for ours, theirs in zip(scores, replayed, strict=True))


def test_teacher_forcing_rejects_frames_of_the_wrong_shape(engine: FishSpeechEngine) -> None:
    prompt = engine.example_prompt()
    params = (torch.tensor(0.0), torch.tensor(0.8), torch.tensor(1.2), torch.tensor(0))
    with pytest.raises(InputError, match="forced frames"):
        engine.decoder(prompt, *params, torch.zeros(1, 11, engine.config.decode_steps + 1, dtype=torch.long))


# -- uniopt -------------------------------------------------------------------------------------------------
def test_components_are_what_synthesize_runs(engine: FishSpeechEngine) -> None:
    decoder, codec = engine.uniopt_components()
    assert (decoder.name, decoder.module, decoder.kind, decoder.metric.name) == (
        "decoder",
        engine.decoder,
        "decoder",
        "token_agreement",
    )
    assert (codec.name, codec.module, codec.kind, codec.metric.name) == ("codec", engine.codec, "codec", "snr_db")
    with torch.inference_mode():
        tokens = decoder.module(*decoder.example_inputs)
        audio = codec.module(*codec.example_inputs)
    assert tokens.shape == (1, 11, engine.config.decode_steps) and tokens.dtype == torch.long
    assert audio.shape == (1, 1, codec.example_inputs[0].shape[-1] * HOP)

    calls: dict[str, int] = {"decoder": 0, "codec": 0}

    def counting(component: Component) -> Installation:
        source = twin(component.module)

        def run(*args):
            calls[component.name] += 1
            return source(*args)

        # what uniopt installs for an exported graph: a callable taking the positional inputs only
        stage = Stage("counting", run)
        return Installation(
            component.name, component.module, stage, source=source, input_count=len(component.example_inputs)
        )

    expected, _, _ = engine.synthesize("through forward", seed=2)
    installed = [counting(decoder), counting(codec)]
    try:
        got, _, _ = engine.synthesize("through forward", seed=2)
    finally:
        for installation in installed:
            installation.remove()
    assert np.array_equal(got, expected) and calls == {"decoder": 1, "codec": 1}
    assert "forward" not in engine.decoder.__dict__  # removed: the class's forward again


def _fresh_key(component: Component) -> str:
    return dataclasses.replace(component).key()  # a new Component: its key is computed again


def test_component_keys_stay_the_same_across_calls(engine: FishSpeechEngine) -> None:
    """The KV caches are written on every call; they are state, so the keys do not move."""
    decoder, codec = engine.uniopt_components()
    before = [_fresh_key(decoder), _fresh_key(codec)]
    with torch.inference_mode():
        decoder.module(*decoder.example_inputs)
        codec.module(*codec.example_inputs)
    cache = engine.decoder.model.attention_layers()[0].kv_cache
    assert cache is not None and cache.k_cache.abs().sum() > 0, "the call wrote the KV cache"
    engine.synthesize("another call", seed=3)
    assert [_fresh_key(decoder), _fresh_key(codec)] == before
    assert [_fresh_key(c) for c in engine.uniopt_components()] == before


def test_universal_optimizer_off_gives_identical_audio(engine: FishSpeechEngine) -> None:
    expected, rate, _ = engine.synthesize("unchanged", seed=9)
    wrapped = UniversalOptimizer(engine, mode="off")
    audio, wrapped_rate, _ = wrapped.synthesize("unchanged", seed=9)
    called, _, _ = wrapped("unchanged", seed=9)
    assert rate == wrapped_rate and np.array_equal(audio, expected) and np.array_equal(called, expected)


# -- traps ---------------------------------------------------------------------------------------------------
def test_legacy_exporter_fails_on_rms_norm(engine: FishSpeechEngine, tmp_path: Path) -> None:
    """The TorchScript exporter has no symbolic for ``aten::rms_norm`` (nn.RMSNorm, as in Fish-Speech)."""
    block = engine.model.layers[0]
    x = torch.randn(1, 4, engine.config.model.dim)
    mask = engine.model.causal_mask[None, None, :4, :4]
    args = (x, engine.model.rope_cos[:4], engine.model.rope_sin[:4], mask)
    with pytest.raises(Exception, match="rms_norm"):
        _onnx_export(block, args, tmp_path / "block.onnx", dynamo=False)


class _DecodeStep(torch.nn.Module):
    """One slow decode step with the in-place cache: ``(tokens [1, C+1, 1], input_pos [1]) -> logits``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return self.model.forward_generate(tokens, input_pos)[0]


def test_dynamo_export_of_a_cached_decode_step_freezes_the_cache(engine: FishSpeechEngine, tmp_path: Path) -> None:
    """The dynamo exporter 'succeeds' on a decode step that updates the cache buffers in place, but
    the buffers become constants of the graph and the update is lost between calls: every ONNX
    Runtime call sees the cache as it was at export (zeros). Step 0 (which attends only to itself)
    matches eager; later steps do not. The decoder component avoids this by running the whole
    loop, caches included, inside one forward."""
    model = engine.model
    step = _DecodeStep(model).eval()
    sequence = engine.encode_prompt("frozen cache")[..., :6]
    model.reset_caches()
    _onnx_export(
        step, (sequence[..., :1], torch.tensor([0])), tmp_path / "step.onnx", input_names=["tokens", "input_pos"]
    )
    session = _session(tmp_path / "step.onnx")
    model.reset_caches()
    differences = []
    with torch.inference_mode():
        for position in range(sequence.shape[-1]):
            tokens, input_pos = sequence[..., position : position + 1], torch.tensor([position])
            eager = step(tokens, input_pos).numpy()
            graph = session.run(None, {"tokens": tokens.numpy(), "input_pos": input_pos.numpy()})[0]
            differences.append(float(np.abs(graph - eager).max()))
    assert differences[0] < 1e-4
    assert min(differences[1:]) > 1e-2, differences


def test_decoder_component_exports_whole_and_matches_eager(tmp_path: Path) -> None:
    """The whole decode loop exported with dynamo keeps its cache inside the graph: ONNX Runtime gives
    the eager tokens at two prompt lengths, greedy and sampled. (The graph unrolls every step and
    codebook, so this uses one layer, two codebooks and two steps, and skips the ONNX optimizer.)"""
    base = FishSpeechConfig.tiny(decode_steps=2)
    config = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, num_codebooks=2, n_layer=1, n_fast_layer=1),
        codec=dataclasses.replace(base.codec, num_codebooks=2),
    )
    component = FishSpeechEngine(config).uniopt_components()[0]
    _onnx_export(
        component.module,
        component.example_inputs,
        tmp_path / "decoder.onnx",
        input_names=list(component.input_names),
        output_names=list(component.output_names),
        dynamic_shapes=({2: torch.export.Dim.DYNAMIC}, None, None, None, None),
        optimize=False,
    )
    session = _session(tmp_path / "decoder.onnx")
    for inputs in (component.example_inputs, component.calibration_inputs[0]):
        with torch.inference_mode():
            eager = component.module(*inputs).numpy()
        graph = session.run(None, {n: t.numpy() for n, t in zip(component.input_names, inputs, strict=True)})[0]
        assert np.array_equal(graph, eager)


def test_codec_exports_with_dynamic_frames(engine: FishSpeechEngine, tmp_path: Path) -> None:
    component = engine.uniopt_components()[1]
    _onnx_export(
        component.module,
        component.example_inputs,
        tmp_path / "codec.onnx",
        input_names=["codes"],
        output_names=["audio"],
        dynamic_shapes=({2: torch.export.Dim.DYNAMIC},),
    )
    session = _session(tmp_path / "codec.onnx")
    generator = torch.Generator().manual_seed(1)
    for frames in (3, 21):
        codes = torch.randint(0, engine.config.codec.codebook_size, (1, 10, frames), generator=generator)
        with torch.inference_mode():
            eager = component.module(codes)
        graph = torch.from_numpy(session.run(None, {"codes": codes.numpy()})[0])
        assert graph.shape == (1, 1, frames * HOP)
        assert metric_value("snr_db", eager, graph) > 40


def test_tied_projection_is_invisible_to_quantize_dynamic_until_untied(engine: FishSpeechEngine) -> None:
    tied = engine.model.output
    x = torch.randn(3, engine.config.model.dim)
    linear = tied.to_linear()
    assert isinstance(linear, torch.nn.Linear) and linear.bias is None
    assert linear.weight.data_ptr() != tied.embedding.weight.data_ptr()
    torch.testing.assert_close(linear(x), tied(x), atol=0, rtol=0)

    holder = torch.nn.Sequential(TiedOutputProjection(torch.nn.Embedding(300, 64)))
    # Called from here, quantize_dynamic's deprecation warning is attributed to this module, so
    # pyproject's filter for torch.ao.quantization does not cover it.
    with pytest.warns(DeprecationWarning, match="torch.ao.quantization"):
        quantized = torch.ao.quantization.quantize_dynamic(holder, {torch.nn.Linear}, dtype=torch.qint8)
    assert isinstance(quantized[0], TiedOutputProjection)  # the trap: left in FP32
    holder[0] = holder[0].to_linear()
    with pytest.warns(DeprecationWarning, match="torch.ao.quantization"), warnings.catch_warnings():
        # Quantizing a Linear also warns, once per process, that quantized tensor creation is deprecated.
        warnings.filterwarnings("ignore", message="torch.quantize_per_tensor", category=UserWarning)
        quantized = torch.ao.quantization.quantize_dynamic(holder, {torch.nn.Linear}, dtype=torch.qint8)
    assert isinstance(quantized[0], torch.ao.nn.quantized.dynamic.Linear)


# -- the fish_speech package -----------------------------------------------------------------------------------
class _StandInEngine:
    """What the adapter needs of ``fish_speech``'s ``TTSInferenceEngine``: ``decoder_model`` and ``inference``."""

    def __init__(self, codec: torch.nn.Module) -> None:
        self.decoder_model = types.SimpleNamespace(
            decode=lambda indices, feature_lengths: (codec(indices), feature_lengths * HOP)
        )
        self.precision = torch.float32

    def inference(self, request):
        return self.decode_vq_tokens(request)

    def decode_vq_tokens(self, codes):
        raise AssertionError("the adapter must route decoding through its codec component")


def test_adapter_declares_the_codec_and_routes_decoding_through_it(engine: FishSpeechEngine) -> None:
    adapter = FishSpeechAdapter(_StandInEngine(engine.codec), example_frames=4)
    (codec,) = adapter.uniopt_components()
    assert codec.name == "codec" and codec.module is adapter.codec
    codes = codec.example_inputs[0] % engine.config.codec.codebook_size
    with torch.inference_mode():
        expected = engine.codec(codes)[0].squeeze()
        torch.testing.assert_close(adapter.inference(codes[0]), expected)
    assert adapter.precision is torch.float32
    with pytest.raises(TypeError, match="decoder_model"):
        FishSpeechAdapter(object())


def test_adapter_with_the_real_dual_ar_transformer(engine: FishSpeechEngine) -> None:
    model = tiny_fish_model()
    prompt = torch.zeros(1, 5, 5, dtype=torch.long)
    prompt[0, 0] = torch.tensor([1, 7, 42, 99, 3])
    with torch.inference_mode():  # the package's uncached pass, before the adapter sets up the caches
        # (DualARTransformer.forward passes vq_parts to BaseTransformer.forward, which does not take it)
        base = importlib.import_module(type(model).__module__).BaseTransformer
        first_main = base.forward(model, prompt).logits[0, -1].argmax()
    adapter = FishSpeechAdapter(_StandInEngine(engine.codec), model, decode_steps=3, prompt_length=5)
    decoder, codec = adapter.uniopt_components()
    assert decoder.name == "decoder" and decoder.module is adapter.decoder and codec.name == "codec"
    assert decoder.example_inputs[0].shape == (1, 5, 5)
    key = _fresh_key(decoder)
    with torch.inference_mode():
        tokens = adapter.generate_tokens(prompt)
        assert tokens.shape == (1, 5, 3) and torch.equal(adapter.generate_tokens(prompt), tokens)
        assert decoder.module(*decoder.example_inputs).shape == (1, 5, 3)
    # fish_speech's KVCache keeps k_cache/v_cache as persistent buffers, written by every call: state.
    assert _fresh_key(decoder) == key
    assert int(tokens[0, 0, 0]) == int(first_main)
    # Teacher forcing replays the frames and returns the logits behind each greedy choice.
    assert decoder.teacher_forcing is not None and decoder.exporter == "none"
    with torch.inference_mode():
        main, codes = decoder.module(*decoder.teacher_forcing((prompt,), tokens))
    assert main.shape == (1, 3, 264) and codes.shape == (1, 3, 3, 64)  # codebook_size 64 < codebook_limit
    assert torch.equal(main[0].argmax(-1), tokens[0, 0]) and torch.equal(codes[0].argmax(-1), tokens[0, 2:])
    with pytest.raises(InputError, match="forced frames"):
        decoder.module(prompt, tokens[..., :2])
