"""Peak memory of each export path on the wav2vec2-base encoder and the TTS codec, and whether it is the same graph.

    python benchmarks/export_memory.py [--component phoneme|codec ...] [VARIANT ...]

Each variant runs in a fresh process (the peak RSS of one export does not hide the next's):

* ``legacy-autograd``: the TorchScript exporter with autograd on;
* ``legacy-nograd``: the same under ``torch.no_grad()`` (uniopt's legacy export);
* ``legacy-inference``: the same under ``torch.inference_mode()``;
* ``dynamo``: ``torch.onnx.export(dynamo=True)`` then ``program.save``;
* ``dynamo-external``: the dynamo exporter writing the file itself with ``external_data=True``
  (the weights in a separate file, never one serialized protobuf in memory; uniopt's dynamo export);
* ``ov-onnx``: the component's preferred exporter (``legacy-nograd`` or ``dynamo``) then
  ``openvino.convert_model`` of the file and ``save_model``: export and conversion together;
* ``ov-onnx-external``: the ``dynamo-external`` export then the same conversion (uniopt's
  OpenVINO path for a dynamo-exported component);
* ``ov-module``: ``openvino.convert_model(module, example_input=...)`` under ``torch.no_grad()``
  with the component's input shapes (dynamic axes left dynamic) and ``save_model`` (uniopt's
  OpenVINO path for a legacy-exported component);
* ``ov-module-inference``: the same under ``torch.inference_mode()``.

Prints per variant: the peak RSS increase (MiB), the size of what was written, and the largest
absolute difference from eager PyTorch at the example input and at the component's validation
inputs (other lengths on the dynamic axis); ONNX files run in ONNX Runtime, IRs compiled in f32.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("phoneme", "codec")
VARIANTS = (
    "legacy-autograd",
    "legacy-nograd",
    "legacy-inference",
    "dynamo",
    "dynamo-external",
    "ov-onnx",
    "ov-onnx-external",
    "ov-module",
    "ov-module-inference",
)


def load_component(name: str) -> Any:
    """The wav2vec2-base encoder of the phoneme engine, or the TTS engine's codec (random weights)."""
    if name == "phoneme":
        from uniopt.engines.phoneme import PhonemeExtractor

        return PhonemeExtractor().uniopt_components()[0]
    import torch

    from uniopt.engines.tts import FishSpeechConfig
    from uniopt.engines.tts.codec import CodecDecoder, codec_component

    config = FishSpeechConfig()  # the codec exactly as FishSpeechEngine builds it, without the decoder
    with torch.random.fork_rng():
        torch.manual_seed(0)
        codec = CodecDecoder(config.codec).eval()
    generator = torch.Generator().manual_seed(0)
    size, books, steps = config.codec.codebook_size, config.codec.num_codebooks, config.decode_steps
    codes = torch.randint(0, size, (1, books, steps), generator=generator)
    longer = torch.randint(0, size, (1, books, 3 * steps), generator=generator)
    return codec_component(codec, codes, (codes[..., :1], longer))


def _onnx_export(component: Any, path: Path, variant: str) -> None:
    import torch

    module = component.module.eval()
    names = list(component.input_names)
    outputs = list(component.output_names)
    axes = {k: dict(v) for k, v in component.dynamic_axes.items()}
    if variant.startswith("legacy"):
        grad: Any = {
            "legacy-autograd": contextlib.nullcontext(),
            "legacy-nograd": torch.no_grad(),
            "legacy-inference": torch.inference_mode(),
        }[variant]
        with grad:
            torch.onnx.export(
                module,
                tuple(component.example_inputs),
                str(path),
                input_names=names,
                output_names=outputs,
                dynamic_axes=axes,
                opset_version=17,
                dynamo=False,
                do_constant_folding=True,
            )
        return
    shapes = tuple({axis: torch.export.Dim.DYNAMIC for axis in axes.get(name, {})} or None for name in names)
    common = dict(input_names=names, output_names=outputs, dynamic_shapes=shapes, opset_version=18, dynamo=True)
    if variant == "dynamo-external":
        torch.onnx.export(module, tuple(component.example_inputs), str(path), external_data=True, **common)
        return
    program = torch.onnx.export(module, tuple(component.example_inputs), None, **common)
    program.save(str(path))


def _ov_module(component: Any, path: Path, variant: str) -> None:
    import openvino as ov
    import torch

    from uniopt.plugins.openvino_backend import module_input_shapes

    grad = torch.inference_mode() if variant == "ov-module-inference" else torch.no_grad()
    with grad:
        model = ov.convert_model(
            component.module.eval(),
            example_input=tuple(component.example_inputs),
            input=module_input_shapes(component),
        )
    ov.save_model(model, str(path), compress_to_fp16=False)


def _eager(component: Any, inputs: tuple[Any, ...]) -> Any:
    import torch

    with torch.inference_mode():
        out = component.module(*inputs)
    return (out[0] if isinstance(out, (tuple, list)) else out).numpy()


def worker(name: str, variant: str) -> dict[str, Any]:
    import numpy as np

    from uniopt.memory import measure_memory, release_memory

    warnings.simplefilter("ignore")
    component = load_component(name)
    folder = Path(tempfile.mkdtemp())
    onnx_path, ir_path = folder / "model.onnx", folder / "model.xml"
    release_memory()
    with measure_memory() as use, contextlib.redirect_stdout(io.StringIO()):
        if variant in ("ov-onnx", "ov-onnx-external"):
            import openvino as ov

            preferred = "legacy-nograd" if component.exporter == "legacy" else "dynamo"
            _onnx_export(component, onnx_path, "dynamo-external" if variant == "ov-onnx-external" else preferred)
            ov.save_model(ov.convert_model(str(onnx_path)), str(ir_path), compress_to_fp16=False)
        elif variant.startswith("ov-module"):
            _ov_module(component, ir_path, variant)
        else:
            _onnx_export(component, onnx_path, variant)
    files = sorted(p.name for p in folder.iterdir())
    size = sum(p.stat().st_size for p in folder.iterdir())
    if variant.startswith("ov-"):
        import openvino as ov

        compiled = ov.Core().compile_model(str(ir_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

        def run(inputs: tuple[Any, ...]) -> Any:
            return compiled([t.numpy() for t in inputs])[compiled.output(0)]

    else:
        import onnxruntime as ort

        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

        def run(inputs: tuple[Any, ...]) -> Any:
            feeds = {n: t.numpy() for n, t in zip(component.input_names, inputs, strict=True)}
            return session.run(None, feeds)[0]

    def diff(inputs: tuple[Any, ...]) -> float:
        return float(np.abs(np.asarray(run(inputs)) - _eager(component, inputs)).max())

    others = []
    for inputs in component.validation_inputs:
        try:
            others.append(diff(inputs))
        except Exception as exc:  # a graph that fixed the length fails here
            others.append(f"fails: {type(exc).__name__}")
    lengths = [tuple(t.shape)[-1] for t in (component.example_inputs[0], *(v[0] for v in component.validation_inputs))]
    return {
        "component": name,
        "variant": variant,
        "peak_mib": use.peak_increase_bytes / 2**20,
        "size_mib": size / 2**20,
        "files": files,
        "diff_example": diff(tuple(component.example_inputs)),
        "diff_other": others,
        "lengths": lengths,
    }


def _format(value: Any) -> str:
    return f"{value:.1e}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--component", action="append", choices=COMPONENTS)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("variants", nargs="*", metavar="VARIANT", help=f"some of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.worker:
        print("ROW " + json.dumps(worker(*args.worker)))
        return
    rows = []
    print("| component | export path | peak MiB | written MiB (files) | max abs diff at example | at other lengths |")
    print("|---|---|---|---|---|---|")
    for name in args.component or COMPONENTS:
        for variant in args.variants or VARIANTS:
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", name, variant],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
            )
            found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            if not found:
                error = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
                rows.append({"component": name, "variant": variant, "error": error})
                print(f"| {name} | {variant} | failed: {error} | | | |", flush=True)
                continue
            row = json.loads(found[-1])
            rows.append(row)
            others = ", ".join(f"{n}: {_format(d)}" for n, d in zip(row["lengths"][1:], row["diff_other"], strict=True))
            print(
                f"| {name} | {variant} | {row['peak_mib']:.0f} | {row['size_mib']:.1f} ({len(row['files'])}) "
                f"| {row['diff_example']:.1e} (length {row['lengths'][0]}) | {others} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
