"""Per-frame speed of the TTS decoder's candidates against eager and against the host's bandwidth floor.

    python benchmarks/decoder_speed.py [--steps 32] [--rounds 5] [--candidate NAME ...] [--cache DIR]

Builds the default Fish-Speech-style engine (12 slow layers, d=1024, GQA 16/4, random weights, a
4-layer fast decoder run over 10 codebooks a frame), builds each candidate through its plugin as
auto mode does (stateful OpenVINO steps, PyTorch int8/bf16), and times the greedy decode loop
interleaved with eager. Per candidate it prints ms per frame, x eager, x the int8-weight floor
(the bytes one frame must read with int8 weights: the slow decoder's weights once, of its output
projection the rows of the ids the loop can draw, the fast decoder's once as they stay in cache
across its passes, over the memory read bandwidth, measured again in
this run as ``optimize doctor`` measures it, and its cached value replaced: the figure moves by 2x
between runs on shared hosts), the matrix-vector rate PyTorch reaches on a matrix larger than the
last-level cache, x the kernel floor (the same bytes over the rate OpenVINO's CPU plugin streams
int8 weights at one row of activations, in the slow decoder's MLP shapes: what the stateful
candidates' matmuls can reach at best on this host; ONNX Runtime's 8-bit ``MatMulNBits`` rate in
the same shapes is printed beside it), x the cache-aware floor (the int8-weight floor with the
fast decoder's weights read once per pass, at the rate ``tensor.sum()`` reads a buffer of their
size again and again: whichever cache level holds them; ten passes a frame add up), and
what auto mode's guard judges by: the agreement of each choice
under teacher forcing (eager's frames replayed) on the steps where eager's top two logits are at
least 0.05 nats apart. With random weights the logits are flat, so agreement says little about
a trained model; the speed is real.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from typing import Any

import torch

from uniopt.engines.tts import FishSpeechConfig, FishSpeechEngine
from uniopt.optimizer.guard import metric_value
from uniopt.optimizer.timing import measure_rounds
from uniopt.plugins import BuildContext, BuildFailure, candidates, plugin_manager
from uniopt.settings import resolve_settings
from uniopt.threads import thread_budget
from uniopt.tiers import host_profile
from uniopt.tiers.bandwidth import memory_bandwidth

DEFAULT = (
    "onnxruntime-steps-int8",
    "openvino-stateful-int8",
    "openvino-stateful-frame-int8",
    "openvino-stateful-frame-int4",
    "openvino-stateful-int4",
    "openvino-stateful-f32",
    "openvino-stateful-bf16",
    "torch-int8",
    "torch-int8-weights",
    "torch-bf16",
)


def int8_frame_bytes(engine: FishSpeechEngine) -> int:
    """Bytes of weights one frame must read with int8 weights: every matrix of both decoders once, and
    of the output projection (tied to the embedding) the rows of the ids the decode loop reads."""
    model = engine.model
    matrices = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    output_rows = engine.decoder.allowed_ids.numel() * model.embeddings.weight.shape[1]
    return sum(w.numel() for w in matrices) + output_rows


def fast_pass_bytes(engine: FishSpeechEngine) -> int:
    """Bytes of int8 weights one pass of the fast decoder reads: its layers' matrices and its output projection."""
    model = engine.model
    linears = [m for m in (*model.fast_layers.modules(), model.fast_output) if isinstance(m, torch.nn.Linear)]
    return sum(m.weight.numel() for m in linears)


def cache_read_bytes_per_s(threads: int, nbytes: int) -> float:
    """Bytes per second ``tensor.sum()`` reads from a float32 buffer of ``nbytes``, read again and again at
    ``threads`` threads: the rate of the cache level that holds it (memory's, once it holds none)."""
    buffer = torch.ones(max(nbytes // 4, 1))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buffer.sum()
        best = min(_seconds(buffer.sum) for _ in range(50))
    finally:
        torch.set_num_threads(previous)
    return buffer.numel() * 4 / best


def matvec_bytes_per_s(threads: int, megabytes: int = 256) -> float:
    """Bytes per second bf16 ``F.linear`` streams at one row of activations, over a matrix larger than the cache."""
    weight = torch.ones(megabytes * 2**20 // 2 // 1024, 1024, dtype=torch.bfloat16)
    x = torch.ones(1, 1024, dtype=torch.bfloat16)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.nn.functional.linear(x, weight)
        best = min(_seconds(lambda: torch.nn.functional.linear(x, weight)) for _ in range(5))
    finally:
        torch.set_num_threads(previous)
    return weight.numel() * 2 / best


def openvino_int8_matvec_bytes_per_s(threads: int, megabytes: int = 256) -> float:
    """Weight bytes per second OpenVINO's CPU plugin streams through int8-weight matmuls at one row of
    activations: the slow decoder's MLP shapes (1024 -> 2816 -> 1024) chained over ``megabytes`` of
    weights in nncf's int8 layout (u8, a zero point and a scale per output channel), float activations."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    dim, hidden = 1024, 2816
    x = ops.parameter([1, dim], ov.Type.f32, name="x")
    y, total = x.output(0), 0
    while total < megabytes * 2**20:
        for rows, cols in ((hidden, dim), (dim, hidden)):
            weight = ops.constant(rng.integers(0, 256, (rows, cols), dtype=np.uint8))
            zero = ops.constant(np.full((rows, 1), 128, dtype=np.uint8))
            scale = ops.constant(np.full((rows, 1), 1e-3, dtype=np.float32))
            shifted = ops.subtract(ops.convert(weight, ov.Type.f32), ops.convert(zero, ov.Type.f32))
            y = ops.matmul(y, ops.multiply(shifted, scale), False, True).output(0)
            total += rows * cols
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(threads)}
    request = ov.Core().compile_model(ov.Model([y], [x]), "CPU", config).create_infer_request()
    data = np.ones((1, dim), dtype=np.float32)
    request.infer([data])
    return total / min(_seconds(lambda: request.infer([data])) for _ in range(5))


def onnxruntime_int8_matvec_bytes_per_s(threads: int, megabytes: int = 256) -> float:
    """The same rate for ONNX Runtime's ``MatMulNBits`` (8-bit weights in blocks of 128, accuracy level
    4: activations quantized to int8 per block, int8 dot products), in the same shapes: a kernel no
    candidate uses yet, measured beside OpenVINO's for comparison on the host."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    dim, hidden, block = 1024, 2816, 128
    nodes, weights, previous, total = [], [], "x", 0
    while total < megabytes * 2**20:
        for rows, cols in ((hidden, dim), (dim, hidden)):
            index = len(nodes)
            packed = rng.integers(0, 256, (rows, cols // block, block), dtype=np.uint8)
            scales = np.full(rows * cols // block, 1e-3, dtype=np.float32)
            weights += [numpy_helper.from_array(packed, f"w{index}"), numpy_helper.from_array(scales, f"s{index}")]
            node = helper.make_node(
                "MatMulNBits",
                [previous, f"w{index}", f"s{index}"],
                [f"y{index}"],
                domain="com.microsoft",
                K=cols,
                N=rows,
                bits=8,
                block_size=block,
                accuracy_level=4,
            )
            nodes.append(node)
            previous, total = f"y{index}", total + rows * cols
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dim])
    y = helper.make_tensor_value_info(previous, TensorProto.FLOAT, [1, dim])
    graph = helper.make_graph(nodes, "matvec", [x], [y], weights)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = helper.make_model(graph, opset_imports=opsets).SerializeToString()
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feed = {"x": np.ones((1, dim), dtype=np.float32)}
    session.run(None, feed)
    return total / min(_seconds(lambda: session.run(None, feed)) for _ in range(5))


def _seconds(call: Any) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--candidate", action="append", help="candidates to time (default: all decoder candidates)")
    parser.add_argument("--cache", default=None, help="uniopt cache directory (default: a new temporary one)")
    args = parser.parse_args()
    profile = host_profile()
    settings, tier = resolve_settings({"cache_dir": args.cache or tempfile.mkdtemp(prefix="uniopt-decoder-")}, profile)
    threads = thread_budget(profile.usable_cpus, settings.threads)
    threads.apply_torch()
    from uniopt.cache import ArtifactCache

    context = BuildContext(settings, profile, tier.tier, threads, cache=ArtifactCache(settings.cache_dir))
    pm = plugin_manager(settings.plugins)
    offered = candidates(pm)

    engine = FishSpeechEngine(FishSpeechConfig(decode_steps=args.steps))
    component = engine.uniopt_components()[0]
    inputs = component.example_inputs
    runs: dict[str, Any] = {"eager": component.module.eval()}
    for name in args.candidate or DEFAULT:
        if name not in offered:
            print(f"{name}: not offered here")
            continue
        built = pm.hook.uniopt_build_stage(candidate=offered[name], component=component, context=context)
        if isinstance(built, BuildFailure):
            print(f"{name}: {built.reason}")
            continue
        runs[name] = built
        for graph, choice in built.info.get("compile_options", {}).items():
            raced = f"race ms {choice.get('race_ms')}, trial MiB {choice.get('trial_resident_mib')}"
            print(f"{name}: {graph} compiled with {choice['options']} ({raced})")
    with torch.inference_mode():
        reference = runs["eager"](*inputs)
        forced = component.teacher_forcing(inputs, reference)
        scored = {name: run(*forced) for name, run in runs.items()}
        outputs = {name: run(*inputs) for name, run in runs.items()}
        stages = {name: functools.partial(run, *inputs) for name, run in runs.items()}
        timings = measure_rounds(stages, args.rounds)
    probe = memory_bandwidth(threads.intra_op, refresh=True)
    matvec = matvec_bytes_per_s(threads.intra_op)
    int8_matvec = openvino_int8_matvec_bytes_per_s(threads.intra_op)
    nbits_matvec = onnxruntime_int8_matvec_bytes_per_s(threads.intra_op)
    floor_ms = int8_frame_bytes(engine) / probe.read_bytes_per_s * 1e3
    fast_bytes, passes = fast_pass_bytes(engine), engine.model.config.num_codebooks
    cache_rate = cache_read_bytes_per_s(threads.intra_op, fast_bytes)
    once = (int8_frame_bytes(engine) - fast_bytes) / probe.read_bytes_per_s
    cache_floor_ms = (once + passes * fast_bytes / cache_rate) * 1e3
    kernel_floor_ms = int8_frame_bytes(engine) / int8_matvec * 1e3
    base = timings["eager"].p50
    print(
        f"{profile.cpu.model} ({', '.join(f for f, on in profile.cpu.flags if on)}); {threads.intra_op} threads;"
        f" memory read {probe.read_bytes_per_s / 1e9:.1f} GB/s; "
        f"int8-weight floor {floor_ms:.1f} ms per frame ({int8_frame_bytes(engine) / 1e6:.0f} MB); "
        f"bf16 matrix-vector product {matvec / 1e9:.1f} GB/s; OpenVINO int8-weight matrix-vector product "
        f"{int8_matvec / 1e9:.1f} GB/s, so a kernel floor of {kernel_floor_ms:.1f} ms per frame "
        f"(ONNX Runtime's MatMulNBits, 8 bits, int8 dot products: {nbits_matvec / 1e9:.1f} GB/s); "
        f"the fast decoder's {fast_bytes / 1e6:.1f} MB a pass read at {cache_rate / 1e9:.1f} GB/s over its {passes}"
        f" passes: a cache-aware floor of {cache_floor_ms:.1f} ms per frame"
    )
    print(f"decode loop: {args.steps} frames x {reference.shape[1]} tokens, median of {args.rounds} interleaved rounds")
    header = f"{'candidate':30} {'ms/frame':>9} {'x eager':>8} {'x floor':>8} {'x kernel':>9} {'x cache':>8}"
    header += f" {'free-running':>13}"
    print(f"{header} {'forced semantic':>16} {'forced codes':>13}")
    for name, timing in timings.items():
        agreement = float((outputs[name] == reference).double().mean())
        semantic, codes = (
            metric_value("token_agreement", ref.float(), out.float())
            for ref, out in zip(scored["eager"], scored[name], strict=True)
        )
        per_frame = timing.p50 * 1e3 / args.steps
        print(
            f"{name:30} {per_frame:9.1f} {base / timing.p50:8.2f} {per_frame / floor_ms:8.2f}"
            f" {per_frame / kernel_floor_ms:9.2f} {per_frame / cache_floor_ms:8.2f} {agreement:13.3f}"
            f" {semantic:16.3f} {codes:13.3f}"
        )


if __name__ == "__main__":
    main()
