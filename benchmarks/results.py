"""Regenerate the README's results table and plot from ``optimize bench --json``.

    python benchmarks/results.py [ENGINE ...] [--budget S] [--from FILE] [--section NAME]

Runs ``optimize bench --json`` on the engines (default: all built-in) with a new, empty cache, so
every component is searched rather than its stored decision applied, or reads a saved JSON file,
then writes ``benchmarks/results.json``, ``benchmarks/results.md`` and ``benchmarks/results.png``
and replaces the README section between the ``bench:start`` / ``bench:end`` markers.
``--section NAME`` keeps a second host's results apart: ``results-NAME.*`` and the
``bench:NAME:start`` / ``bench:NAME:end`` markers.
Every figure is a ratio against eager FP32 measured in the same process and run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"


def _host() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "uniopt.cli", "doctor", "--json"], capture_output=True, text=True, check=True
    )
    d = json.loads(out.stdout)
    flags = " ".join(f for f, on in d["cpu"]["flags"].items() if on)
    return (
        f"{d['cpu']['model']}, {d['cpu']['usable_cpus']:g} usable CPUs ({flags}), "
        f"{d['memory']['total_bytes'] / 2**30:.0f} GiB, tier {d['tier']['name']}; "
        f"torch {d['backends']['torch']['version']}, onnxruntime {d['backends']['onnxruntime']['version']}, "
        f"openvino {(d['backends']['openvino']['version'] or '-').split('-')[0]}; Python {platform.python_version()}"
    )


def _table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| engine / component | candidate | p50 ms | x eager | accuracy | chosen |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        for comp in result["components"]:
            rows = [c for c in comp["candidates"] if c["accepted"] or c["metric_value"] is not None]
            for c in sorted(rows, key=lambda c: -(c["speedup"] or 0)):
                acc = "-" if c["metric_value"] is None else f"{c['metric']} {c['metric_value']:.4g}"
                if not c["accepted"]:
                    acc += " (rejected)"
                p50 = "-" if c["p50_ms"] is None else f"{c['p50_ms']:.1f}"
                speed = "-" if c["speedup"] is None else f"{c['speedup']:.2f}"
                mark = "**yes**" if c["name"] == comp["chosen"] else ""
                lines.append(
                    f"| {result['engine']} / {comp['component']} | {c['name']} | {p50} | {speed} | {acc} | {mark} |"
                )
    return "\n".join(lines)


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = [(r["engine"], c) for r in results for c in r["components"]]
    fig, axes = plt.subplots(len(comps), 1, figsize=(8, 2.2 * len(comps) + 0.5), squeeze=False)
    for ax, (engine, comp) in zip(axes[:, 0], comps, strict=True):
        rows = sorted((c for c in comp["candidates"] if c["speedup"] is not None), key=lambda c: c["speedup"])
        colors = ["tab:green" if c["name"] == comp["chosen"] else "tab:gray" for c in rows]
        ax.barh([c["name"] for c in rows], [c["speedup"] for c in rows], color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{engine} / {comp['component']}: speed-up over eager (green = chosen)", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engines", nargs="*")
    parser.add_argument("--budget", type=float, default=None)
    parser.add_argument("--from", dest="source", default=None, help="a saved `optimize bench --json` output")
    parser.add_argument("--section", default="", help="name of a second host's results section")
    args = parser.parse_args()
    stem = f"results-{args.section}" if args.section else "results"
    marker = f"bench:{args.section}:" if args.section else "bench:"
    start, end = f"<!-- {marker}start -->", f"<!-- {marker}end -->"
    command = ["optimize", "bench", *args.engines, "--json"] + (["--budget", f"{args.budget:g}"] if args.budget else [])
    if args.source:
        results = json.loads(Path(args.source).read_text())
    else:
        # A cache of its own: decisions stored by earlier runs would be applied instead of searched.
        with tempfile.TemporaryDirectory(prefix="uniopt-results-") as cache:
            out = subprocess.run(
                [sys.executable, "-m", "uniopt.cli", *command[1:]],
                capture_output=True,
                text=True,
                env={**os.environ, "UNIOPT_CACHE_DIR": cache},
            )
        if out.returncode != 0:  # the bench's own error message is on its stdout (a table run) or stderr
            sys.exit(f"{' '.join(command)} failed ({out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
        results = json.loads(out.stdout)
    (HERE / f"{stem}.json").write_text(json.dumps(results, indent=1))
    table = _table(results)
    rerun = " ".join(
        ["python benchmarks/results.py", *args.engines]
        + (["--budget", f"{args.budget:g}"] if args.budget else [])
        + (["--section", args.section] if args.section else [])
    )
    section = (
        f"Measured with `{rerun}` (which runs `{' '.join(command)}`) on: {_host()}.\n\n"
        f"{table}\n\n![speed-ups](benchmarks/{stem}.png)\n"
    )
    (HERE / f"{stem}.md").write_text(section)
    _plot(results, HERE / f"{stem}.png")
    text = README.read_text()
    if start in text and end in text:
        head, rest = text.split(start, 1)
        README.write_text(head + start + "\n" + section + end + rest.split(end, 1)[1])
    print(section)


if __name__ == "__main__":
    main()
