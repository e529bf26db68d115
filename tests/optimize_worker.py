"""Optimize a deterministic tiny model in its own process, for the subprocess tests.

Usage: python optimize_worker.py SPEC_JSON

SPEC_JSON is an object with (all optional):

- ``seed`` (int, default 0): seeds the weights and the example input.
- ``layers`` (int, default 2) and ``width`` (int, default 32): the MLP's depth and width;
  more layers make the ONNX export slower (for the kill-during-export test).
- ``settings`` (object): keyword settings for ``UniversalOptimizer`` (``mode``, ``allow``, ...).
- ``block`` (list of str): module names set to ``None`` in ``sys.modules`` before uniopt is
  imported, so they look uninstalled (``import openvino`` raises ImportError).
- ``start_file`` (str): print ``ready``, then wait for this file to exist before optimizing,
  so that several workers start at the same moment.

The cache directory comes from ``UNIOPT_CACHE_DIR`` in the environment. The worker checks the
optimized engine against the eager model on the example input and prints ``check {...}`` with the
largest difference and every artifact-cache look-up it made (``builds``: kind and whether this
process built the entry), then ``json.dumps(opt.report().to_dict())`` as its last stdout line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

#: The example input's shape: (batch, frames, features). 3-D, so Linear exports as MatMul.
FEATURES = 16
FRAMES = 8


def worker_env(cache: Path) -> dict[str, str]:
    """The parent's environment without uniopt settings, with the built-in plugins and ``cache``."""
    from uniopt.plugins import DEFAULT_PLUGINS
    from uniopt.settings import Settings

    drop = {env for _field, env, _help, _default in Settings.describe()}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("UNIOPT_", "USE_"))}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env["UNIOPT_CACHE_DIR"] = str(cache)
    env["UNIOPT_PLUGINS"] = ",".join(name for name, _module in DEFAULT_PLUGINS)
    return env


def build_model(seed: int, layers: int, width: int):  # type: ignore[no-untyped-def]
    """An MLP over the last axis, with weights and example input drawn from ``seed``."""
    import torch

    torch.manual_seed(seed)
    blocks: list[torch.nn.Module] = []
    size = FEATURES
    for _ in range(layers):
        blocks += [torch.nn.Linear(size, width), torch.nn.GELU(), torch.nn.LayerNorm(width)]
        size = width
    blocks.append(torch.nn.Linear(size, 8))
    model = torch.nn.Sequential(*blocks).eval()
    example = torch.randn(1, FRAMES, FEATURES, generator=torch.Generator().manual_seed(seed))
    return model, example


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0]) if argv else {}
    for name in spec.get("block", ()):
        sys.modules[name] = None  # type: ignore[assignment]
    import torch

    from uniopt import UniversalOptimizer
    from uniopt.cache import store

    builds: list[dict[str, object]] = []
    get_or_build = store.ArtifactCache.get_or_build

    def traced(self, key, build, *, kind, description):  # type: ignore[no-untyped-def]
        entry, built = get_or_build(self, key, build, kind=kind, description=description)
        builds.append({"kind": kind, "key": key, "built": built})
        return entry, built

    store.ArtifactCache.get_or_build = traced  # type: ignore[method-assign]

    model, example = build_model(int(spec.get("seed", 0)), int(spec.get("layers", 2)), int(spec.get("width", 32)))
    start_file = spec.get("start_file")
    if start_file:
        print("ready", flush=True)
        deadline = time.monotonic() + 120
        while not os.path.exists(start_file):
            if time.monotonic() > deadline:
                print("start file never appeared", file=sys.stderr)
                return 3
            time.sleep(0.005)
    opt = UniversalOptimizer(model, (example,), **spec.get("settings", {}))
    with torch.inference_mode():
        expected = model(example)
        got = opt(example)
    check = {
        "max_diff": float((expected - got).abs().max()),
        "shape": list(got.shape),
        "dtype": str(got.dtype),
        "builds": builds,
    }
    print("check " + json.dumps(check))
    print(json.dumps(opt.report().to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
