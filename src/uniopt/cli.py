"""The ``optimize`` command line: ``optimize doctor`` and friends."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import UniOptError

app = typer.Typer(help="uniopt: make PyTorch speech engines faster on this machine.", no_args_is_help=True)
console = Console(width=None if sys.stdout.isatty() else 160)


@app.callback()
def _root(
    verbose: int = typer.Option(
        0, "--verbose", "-v", count=True, help="Log what is built, checked and timed to stderr (-vv: memory too)."
    ),
) -> None:
    """uniopt: make PyTorch speech engines faster on this machine."""
    if verbose:
        _log_to_stderr(logging.INFO if verbose == 1 else logging.DEBUG)


def _log_to_stderr(level: int) -> None:
    """Show the ``uniopt`` logger's records at ``level`` and above on stderr (stdout stays the command's)."""
    from rich.logging import RichHandler

    logger = logging.getLogger("uniopt")
    logger.setLevel(level)
    if not any(isinstance(handler, RichHandler) for handler in logger.handlers):
        logger.addHandler(RichHandler(console=Console(stderr=True), show_path=False))


def _gib(n: int | None) -> str:
    return "none" if n is None else f"{n / 2**30:.2f} GiB"


def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[red]no[/]"


def _bandwidth(probe: dict[str, Any] | None, problem: str | None) -> str:
    from .tiers import BandwidthProbe

    return BandwidthProbe(**probe).describe() if probe else f"not measured: {escape(problem or 'unknown')}"


def _print_doctor(data: dict[str, Any]) -> None:
    cpu, mem = data["cpu"], data["memory"]
    host = Table(title="Host", show_header=False)
    host.add_row("CPU", f"{cpu['model']} ({cpu['vendor']}, {cpu['architecture']})")
    host.add_row("cores", f"{cpu['physical_cores']} physical, {cpu['logical_cores']} logical")
    host.add_row("affinity / cgroup quota", f"{cpu['affinity_cpus']} / {cpu['cgroup_cpu_quota'] or 'none'}")
    host.add_row("usable CPUs", f"[bold]{cpu['usable_cpus']:g}[/]")
    host.add_row("instruction sets", " ".join(f for f, on in cpu["flags"].items() if on) or "none of interest")
    host.add_row("memory", f"{_gib(mem['total_bytes'])} total, {_gib(mem['available_bytes'])} available")
    host.add_row("memory limit", _gib(mem["limit_bytes"]))
    room = mem.get("headroom")
    if room:
        used = f"cgroup working set {_gib(room['used_bytes'])}, " if room["used_bytes"] is not None else ""
        host.add_row("memory left", f"{used}[bold]{_gib(room['available_bytes'])}[/] available to build in")
    if "read_bandwidth" in mem:
        host.add_row("memory read bandwidth", _bandwidth(mem["read_bandwidth"], mem.get("read_bandwidth_problem")))
    host.add_row("GPUs", ", ".join(g["name"] for g in data["gpus"]) or "none")
    host.add_row("fingerprint", data["fingerprint"][:16] + "…")
    console.print(host)

    backends = Table(title="Backends")
    for col in ("backend", "available", "version", "detail"):
        backends.add_column(col)
    for name, info in data["backends"].items():
        detail = (
            ", ".join(info["providers"])
            or ", ".join(f"{d}: {'/'.join(p)}" for d, p in info["devices"].items())
            or info["reason"]
        )
        backends.add_row(name, _yes(info["available"]), info["version"] or "-", escape(detail))
    console.print(backends)

    tier = data["tier"]
    console.print(f"[bold]Tier:[/] {tier['name']} — {escape(tier['reason'])}")
    console.print(
        f"[bold]Threads per backend:[/] {data['threads']['intra_op']} (inter-op {data['threads']['inter_op']})"
    )

    cands = Table(title="Candidates on this host")
    for col in ("candidate", "plugin", "precision", "available", "why not"):
        cands.add_column(col)
    for row in data["candidates"]:
        cands.add_row(row["name"], row["plugin"], row["precision"], _yes(row["available"]), escape(row["reason"]))
    console.print(cands)

    if data.get("engines"):
        console.print(_engines_table(data["engines"]))

    changed = {k: v for k, v in data["settings"].items() if v["source"] != "default"}
    if changed:
        settings = Table(title="Settings not at their default")
        for col in ("setting", "value", "from"):
            settings.add_column(col)
        for name, v in changed.items():
            settings.add_row(name, escape(str(v["value"])), v["source"])
        console.print(settings)
    if data["advice"]:
        console.print("[bold]Advice[/]")
        for line in data["advice"]:
            console.print(f"  • {escape(line)}")


def _need(need: dict[str, Any] | None) -> str:
    return "-" if need is None else f"{_mib(need['required_bytes'])} ({need['candidate']})"


def _engines_table(engines: list[dict[str, Any]]) -> Table:
    """A row per engine and per component: weights, eager footprint, least and full chain needs, verdict."""
    table = Table(title="Memory to optimize each engine here (MiB; cold cache, margins included)")
    columns = (
        "engine / component", "weights", "eager (est.)", "parked", "least", "full chain", "left to build", "verdict"
    )  # fmt: skip
    for col in columns:
        right = col in ("weights", "eager (est.)", "parked", "left to build")
        table.add_column(col, justify="right" if right else "left")
    for e in engines:
        if e["error"]:
            table.add_row(e["name"], "-", "-", "-", "-", "-", "-", escape(e["verdict"]))
            continue
        colour = "green" if e["fits"] else "red" if e["verdict"].startswith("does not") else "yellow"
        table.add_row(
            f"[bold]{e['name']}[/]",
            _mib(e["weight_bytes"]),
            _mib(e["eager_bytes"]),
            _mib(e["parked_bytes"]) if e["parked_bytes"] else "-",
            _need(e["least"]),
            _need(e["full"]),
            _mib(e["build_bytes"]),
            f"[{colour}]{escape(e['verdict'])}[/]",
        )
        if len(e["components"]) > 1:
            for c in e["components"]:
                fitting = ", ".join(c["fitting"]) or ("stays eager" if c["least"] else "no candidate")
                table.add_row(
                    f"  {c['name']}",
                    _mib(c["weight_bytes"]),
                    "",
                    "",
                    _need(c["least"]),
                    _need(c["full"]),
                    "",
                    escape(fitting),
                )
    return table


@app.command()
def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    measure_bandwidth: bool = typer.Option(
        False, "--measure-bandwidth", help="Measure the memory read bandwidth again and replace the cached value."
    ),
) -> None:
    """Print the hardware report, the tier, what each backend can do here, and advice."""
    from .doctor import doctor_report

    try:
        data = doctor_report(measure_bandwidth=measure_bandwidth).to_dict()
    except UniOptError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        _print_doctor(data)


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def _print_bench(result: dict[str, Any]) -> None:
    info = result.get("engine_info") or {}
    trained = "" if info.get("trained", True) else " (random weights: speed figures only)"
    console.print(
        f"[bold]{result['engine']}[/]{escape(trained)} — tier {result['tier']}, set-up {result['setup_seconds']:.1f} s"
    )
    for comp in result["components"]:
        table = Table(title=f"{result['engine']} / {comp['component']}")
        for col in (
            "candidate",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "x eager",
            "RTF",
            "accuracy",
            "peak MiB",
            "resident MiB",
            "chosen",
            "note",
        ):
            table.add_column(col, justify="right" if col.endswith(("ms", "eager", "RTF", "MiB")) else "left")
        for c in comp["candidates"]:
            accuracy = "-" if c["metric_value"] is None else f"{c['metric']} {c['metric_value']:.4g}"
            note = "" if c["accepted"] else escape(c["reason"][:80])
            chosen = "[green]✔[/]" if c["name"] == comp["chosen"] else ""
            table.add_row(
                c["name"],
                _fmt(c["p50_ms"]),
                _fmt(c["p95_ms"]),
                _fmt(c["p99_ms"]),
                _fmt(c["speedup"], ".2f"),
                _fmt(c["real_time_factor"], ".3f"),
                accuracy,
                _mib(c.get("peak_memory_bytes")),
                _mib(c.get("resident_memory_bytes")),
                chosen,
                note,
            )
        console.print(table)
    memory = result.get("memory")
    if memory:
        console.print(
            f"RSS: engine {_mib(memory['engine_rss_bytes'])} MiB, peak while optimizing "
            f"{_mib(memory['peak_rss_bytes'])} MiB (with the build steps' child processes), "
            f"after {_mib(memory['optimized_rss_bytes'])} MiB"
        )


@app.command()
def bench(
    engines: list[str] = typer.Argument(
        None, help="Built-in engines (phoneme, diarization, tts) or package.module:factory."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    budget: float = typer.Option(
        None, "--budget", help="Seconds auto mode may spend searching for each engine (its components share them)."
    ),
    mode: str = typer.Option("auto", "--mode", help="auto or tier."),
) -> None:
    """Optimize engines on this host and print each candidate's latency, speed-up and accuracy."""
    from .bench import run_bench
    from .engines.registry import BUILTIN_ENGINES

    results = []
    for name in engines or list(BUILTIN_ENGINES):
        try:
            (result,) = run_bench([name], budget_s=budget, mode=mode)
        except UniOptError as exc:
            console.print(f"[red]error:[/] {escape(str(exc))}")
            raise typer.Exit(2) from exc
        results.append(result)
        if not as_json:
            _print_bench(result)  # each engine's table as soon as it is measured
    if as_json:
        typer.echo(json.dumps(results, indent=2))


@app.command()
def prepare(
    engines: list[str] = typer.Argument(
        ..., help="Built-in engines (phoneme, diarization, tts) or package.module:factory."
    ),
    target: str = typer.Option(..., "--for", help="The target host's `optimize doctor --json` output (a file)."),
    out: str = typer.Option(..., "--out", help="The bundle directory to build into (created if missing)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Build every artifact another host can use (exports, ORT and OpenVINO models, int8) into a bundle.

    On that host, UNIOPT_CACHE_BUNDLE=OUT makes tier and auto mode load them instead of exporting.
    """
    from pathlib import Path

    from .prepare import prepare_bundle
    from .tiers import HostProfile

    try:
        profile = HostProfile.from_dict(json.loads(Path(target).read_text()))
    except (OSError, ValueError) as exc:
        console.print(f"[red]error:[/] --for {escape(target)}: {escape(str(exc))}")
        raise typer.Exit(2) from exc
    try:
        rows = prepare_bundle(engines, profile, out)
    except UniOptError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps([vars(r) for r in rows], indent=2))
        return
    table = Table(title=f"Bundle {out} for host {profile.fingerprint[:16]}…")
    for col in ("engine", "component", "candidate", "status", "s", "note"):
        table.add_column(col, justify="right" if col == "s" else "left")
    for r in rows:
        table.add_row(r.engine, r.component, r.candidate, r.status, f"{r.seconds:.1f}", escape(r.reason[:90]))
    console.print(table)
    if any(r.status == "failed" for r in rows):
        raise typer.Exit(1)


cache_app = typer.Typer(help="List, verify and clear the artifact cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _open_cache() -> Any:
    from .cache import ArtifactCache, default_cache_dir
    from .settings import load_settings

    settings = load_settings()
    return ArtifactCache(settings.cache_dir or default_cache_dir(), max_bytes=settings.cache_size_limit, required=True)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@cache_app.command("ls")
def cache_ls(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List cache entries, least recently used first, with sizes and what each entry is."""
    cache = _open_cache()
    entries = cache.entries()
    if as_json:
        rows = [
            {
                "key": e.key,
                "kind": e.kind,
                "description": e.description,
                "size_bytes": e.size_bytes,
                "last_used": e.last_used,
                "valid": e.valid,
                "problem": e.problem,
            }
            for e in entries
        ]
        typer.echo(json.dumps({"root": str(cache.root), "total_bytes": cache.total_bytes(), "entries": rows}, indent=2))
        return
    table = Table(title=f"uniopt cache at {cache.root}")
    for col in ("key", "kind", "what", "size", "state"):
        table.add_column(col)
    for e in entries:
        what = ", ".join(f"{k}={v}" for k, v in e.description.items())
        table.add_row(
            e.key[:16],
            e.kind,
            escape(what),
            _size(e.size_bytes),
            "ok" if e.valid else f"[red]{escape(e.problem or '')}[/]",
        )
    console.print(table)
    console.print(f"{len(entries)} entries, {_size(cache.total_bytes())} in all (limit {_size(cache.max_bytes or 0)})")


@cache_app.command("verify")
def cache_verify() -> None:
    """Check every file of every entry against its recorded size and sha256."""
    cache = _open_cache()
    bad = 0
    for entry, problem in cache.verify():
        if problem:
            bad += 1
            console.print(f"[red]bad[/] {entry.key[:16]} {entry.kind}: {escape(problem)}")
    console.print(f"{bad} bad entr{'y' if bad == 1 else 'ies'}; bad entries are rebuilt on next use")
    if bad:
        raise typer.Exit(1)


@cache_app.command("clear")
def cache_clear() -> None:
    """Remove every cache entry (with its compiled blobs) and stale temporaries; entries in use stay."""
    cache = _open_cache()
    removed = cache.clear()
    kept = len(cache.entries())
    note = f"; {kept} kept (in use by another process, or added meanwhile)" if kept else ""
    console.print(f"removed {removed} entries{note}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
