"""Per-token speed of the TTS decoder's PyTorch candidates, guard or not.

    python benchmarks/decoder_speed.py [--steps 64] [--rounds 7]

Builds the default Fish-Speech-style engine (12 slow layers, d=1024, GQA 16/4, random weights),
then times its greedy decode loop interleaved (eager, int8 with the tied output projection
untied, int8 as quantize_dynamic alone sees it, bf16) and prints ms per token, the speed-up over
eager, the free-running token agreement with eager, and what auto mode's guard judges by: the
agreement of each choice under teacher forcing (the eager frames replayed), on the steps where
eager's top two logits are at least 0.05 nats apart, for the semantic token and the codebooks.
With random weights the logits are flat, so these say little about a trained model.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
from collections.abc import Callable
from typing import Any

import torch

from uniopt.engines.tts import FishSpeechConfig, FishSpeechEngine
from uniopt.optimizer.guard import metric_value
from uniopt.optimizer.timing import measure_interleaved
from uniopt.plugins.torch_native import TorchDynamicInt8, _cast, quantize_int8_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    engine = FishSpeechEngine(FishSpeechConfig(decode_steps=args.steps))
    component = engine.uniopt_components()[0]
    inputs = component.example_inputs
    eager = component.module.eval()
    int8 = TorchDynamicInt8().quantize(eager, {torch.nn.Linear})
    tied = copy.deepcopy(eager)
    tied_int8 = torch.ao.quantization.quantize_dynamic(tied, {torch.nn.Linear}, dtype=torch.qint8)
    bf16 = copy.deepcopy(eager).to(torch.bfloat16)
    candidates: dict[str, Callable[..., Any]] = {
        "eager": eager,
        "torch-int8 (projection untied)": int8,
        "torch-int8 (quantize_dynamic alone)": tied_int8,
        "torch-bf16": lambda *args: bf16(*_cast(args, torch.bfloat16)),
        "torch-int8-weights": quantize_int8_weights(eager),
    }
    stages = {name: functools.partial(run, *inputs) for name, run in candidates.items()}
    with torch.inference_mode():
        reference = eager(*inputs)
        outputs = {name: run() for name, run in stages.items()}
        forced = component.teacher_forcing(inputs, reference)
        scored = {name: run(*forced) for name, run in candidates.items()}
        timings = measure_interleaved(
            stages, budget_s=1e9, min_rounds=args.rounds, max_rounds=args.rounds, prune_factor=None
        )
    tokens = reference.numel()
    base = timings["eager"].p50
    print(f"decode loop: {args.steps} steps x {reference.shape[1]} codebooks, threads {torch.get_num_threads()}")
    header = f"{'candidate':38} {'ms/step':>8} {'x eager':>8} {'free-running':>13}"
    print(f"{header} {'forced semantic':>16} {'forced codes':>13}")
    for name, timing in timings.items():
        agreement = float((outputs[name] == reference).double().mean())
        semantic, codes = (
            metric_value("token_agreement", ref.float(), out.float())
            for ref, out in zip(scored["eager"], scored[name], strict=True)
        )
        print(
            f"{name:38} {timing.p50 * 1e3 / args.steps:8.1f} {base / timing.p50:8.2f} {agreement:13.3f}"
            f" {semantic:16.3f} {codes:13.3f}"
        )
    print(f"({tokens} tokens per call; median of {args.rounds} interleaved rounds)")


if __name__ == "__main__":
    main()
