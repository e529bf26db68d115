"""Cold vs warm start-up: the second process loads every artifact and the decision from the cache.

    python benchmarks/startup.py [ENGINE] [--cache-dir DIR]

Runs ``optimize``'s auto mode on ENGINE (default: phoneme) twice, each in a fresh process sharing
one empty cache directory, and prints both set-up times, the ratio, and what the warm run took
from the cache, and how long each component's search took against the engine's search budget.
ENGINE is a built-in engine name or ``package.module:factory``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
started = time.perf_counter()
from uniopt import UniversalOptimizer
from uniopt.engines.registry import load_engine
engine, example = load_engine(sys.argv[1])
built = time.perf_counter()
opt = UniversalOptimizer(engine, example)
done = time.perf_counter()
report = opt.report().to_dict()
report["engine_build_seconds"] = built - started
report["optimize_seconds"] = done - built
report["search_budget_s"] = opt.settings.search_budget_s
print(json.dumps(report))
"""


def run(engine: str, cache_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIOPT_")}
    env["UNIOPT_CACHE_DIR"] = cache_dir
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, engine], env=env, check=True, capture_output=True, text=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    report["process_seconds"] = time.perf_counter() - started
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", nargs="?", default="phoneme")
    parser.add_argument("--cache-dir", default=None, help="an empty directory (default: a new temporary one)")
    args = parser.parse_args()
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="uniopt-startup-")
    cold = run(args.engine, cache_dir)
    warm = run(args.engine, cache_dir)
    print(f"engine {args.engine}, cache {cache_dir}")
    print(f"{'':8} {'optimize s':>10} {'process s':>10}  chosen / from cache")
    for label, rep in (("cold", cold), ("warm", warm)):
        chosen = ", ".join(
            f"{c['component']}={c['chosen']}{' (decision cached)' if c['decision_from_cache'] else ''}"
            for c in rep["components"]
        )
        print(f"{label:8} {rep['optimize_seconds']:10.2f} {rep['process_seconds']:10.2f}  {chosen}")
    for component in cold["components"]:
        results = {r["name"]: r for r in component["candidates"]}
        speedup = results.get(component["chosen"], {}).get("speedup")
        timed = [name for name, r in results.items() if r.get("p50_ms") is not None and name != "eager"]
        print(
            f"cold {component['component']}: {component['chosen']}"
            f"{f' at {speedup:.2f}x eager' if speedup else ''}; timed against eager: {', '.join(timed) or 'none'}"
            f"; searched {component['search_seconds']:.1f} s"
            f"{', cut short by its budget' if component['search_cut_short'] else ''}"
        )
    searched = sum(c["search_seconds"] for c in cold["components"])
    print(f"cold search: {searched:.1f} s in all, against the engine's {cold['search_budget_s']:.0f} s search budget")
    ratio = warm["optimize_seconds"] / cold["optimize_seconds"]
    print(f"warm / cold optimize time: {ratio:.3f} ({'within' if ratio <= 0.2 else 'ABOVE'} the 1/5 target)")


if __name__ == "__main__":
    main()
