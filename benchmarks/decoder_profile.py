"""Where a stateful decoder candidate's frame goes: OpenVINO's per-node counters over one decode.

    python benchmarks/decoder_profile.py [--candidate openvino-stateful-frame-int8] [--steps 32] [--top 12]

Builds the default Fish-Speech-style engine's decoder candidate through its plugin (as auto mode
does, in a new temporary cache), compiles each of its models again from the same IR file with the
same compile properties and OpenVINO's per-node counters on (``PERF_COUNT``), runs one warm-up and
one measured decode loop with them, and prints per model: its calls, wall time per frame inside
``infer()``, the time its nodes counted, how many nodes ran per call, and the node types that took
the most; then the time per frame spent outside the models (the engine's loop in Python). The
difference between wall and counted time is what OpenVINO spends between nodes.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from typing import Any

import torch

from uniopt.cache import ArtifactCache
from uniopt.engines.tts import FishSpeechConfig, FishSpeechEngine
from uniopt.plugins import BuildContext, BuildFailure, candidates, plugin_manager
from uniopt.plugins.openvino_decode import StatefulDecode
from uniopt.settings import resolve_settings
from uniopt.threads import thread_budget
from uniopt.tiers import host_profile

#: The compile properties a profiled model takes over from the one the plugin compiled.
PROPERTIES = (
    "INFERENCE_PRECISION_HINT",
    "PERFORMANCE_HINT",
    "INFERENCE_NUM_THREADS",
    "NUM_STREAMS",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE",
    "KV_CACHE_PRECISION",
)


class Counters:
    """Wall seconds of each model's ``infer()`` calls and its nodes' counted seconds, by node type."""

    def __init__(self) -> None:
        self.wall: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self.nodes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.seconds: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        #: Seconds spent reading the counters, left out of the loop's own time.
        self.reading = 0.0
        self.on = False

    def record(self, graph: str, request: Any, seconds: float) -> None:
        if not self.on:
            return
        started = time.perf_counter()
        self.wall[graph] += seconds
        self.calls[graph] += 1
        for node in request.get_profiling_info():
            if node.status == node.Status.EXECUTED:
                kind = f"{node.node_type} ({node.exec_type})"
                self.seconds[graph][kind] += node.real_time.total_seconds()
                self.nodes[graph][kind] += 1
        self.reading += time.perf_counter() - started


class ProfiledRequest:
    """An infer request whose ``infer()`` calls are timed and their node counters kept."""

    def __init__(self, request: Any, graph: str, counters: Counters) -> None:
        self._request, self._graph, self._counters = request, graph, counters

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)

    def infer(self, *args: Any) -> Any:
        started = time.perf_counter()
        result = self._request.infer(*args)
        self._counters.record(self._graph, self._request, time.perf_counter() - started)
        return result


class ProfiledModel:
    """A compiled model whose infer requests are :class:`ProfiledRequest`."""

    def __init__(self, compiled: Any, graph: str, counters: Counters) -> None:
        self._compiled, self._graph, self._counters = compiled, graph, counters

    def __getattr__(self, name: str) -> Any:
        return getattr(self._compiled, name)

    def create_infer_request(self) -> ProfiledRequest:
        return ProfiledRequest(self._compiled.create_infer_request(), self._graph, self._counters)


def ir_files(cache: ArtifactCache, weights: str) -> dict[str, str]:
    """The IR file of each graph the candidate built, by graph name (its cache entry's description)."""
    suffix = "" if weights == "float" else f"-{weights}"
    kinds = {f"openvino-stateful{suffix}", f"openvino-frame{suffix}"}
    return {e.description["graph"]: str(e.path / "model.xml") for e in cache.entries() if e.kind in kinds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidate", default="openvino-stateful-frame-int8")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--top", type=int, default=12, help="node types listed per model")
    args = parser.parse_args()
    import openvino as ov

    profile = host_profile()
    settings, tier = resolve_settings({"cache_dir": tempfile.mkdtemp(prefix="uniopt-profile-")}, profile)
    threads = thread_budget(profile.usable_cpus, settings.threads)
    threads.apply_torch()
    cache = ArtifactCache(settings.cache_dir)
    context = BuildContext(settings, profile, tier.tier, threads, cache=cache)
    pm = plugin_manager(settings.plugins)
    component = FishSpeechEngine(FishSpeechConfig(decode_steps=args.steps)).uniopt_components()[0]
    built = pm.hook.uniopt_build_stage(candidate=candidates(pm)[args.candidate], component=component, context=context)
    if isinstance(built, BuildFailure):
        raise SystemExit(f"{args.candidate}: {built.reason}")
    compiled = built.run._compiled
    files = ir_files(cache, built.info["weights"])
    core, counters, profiled = ov.Core(), Counters(), {}
    for graph, model in compiled.items():
        config = {name: model.get_property(name) for name in PROPERTIES}
        again = core.compile_model(files[graph], "CPU", {**config, "PERF_COUNT": True})
        profiled[graph] = ProfiledModel(again, graph, counters)
        print(f"{graph}: {files[graph]}, {', '.join(f'{k}={v}' for k, v in config.items())}")
    decode = StatefulDecode(component, component.decode_steps, profiled, args.candidate, False)
    with torch.inference_mode():
        decode(*component.example_inputs)
        counters.on = True
        started = time.perf_counter()
        decode(*component.example_inputs)
        total = time.perf_counter() - started - counters.reading
    frames = args.steps
    per_frame = total * 1e3 / frames
    print(f"\n{args.candidate}, {threads.intra_op} threads: {per_frame:.2f} ms per frame, counters on")
    for graph in counters.wall:
        counted = sum(counters.seconds[graph].values())
        calls = counters.calls[graph]
        print(
            f"{graph}: {calls} calls, {counters.wall[graph] * 1e3 / frames:.2f} ms per frame in infer(), "
            f"{counted * 1e3 / frames:.2f} counted by its nodes, {sum(counters.nodes[graph].values()) / calls:.0f} "
            "nodes run per call"
        )
        for kind, seconds in counters.seconds[graph].most_common(args.top):
            share = f"{seconds * 1e3 / frames:7.3f} ms per frame"
            print(f"    {kind:48} {share}  {counters.nodes[graph][kind] / calls:5.0f} per call")
    outside = total - sum(counters.wall.values())
    print(f"outside infer() (the loop in Python, sampling between calls): {outside * 1e3 / frames:.2f} ms per frame")


if __name__ == "__main__":
    main()
