"""``penctl bench [NAME ...] [--json PATH|-] [--quick]``: run benchmarks, print a table.

With no names every registered benchmark runs. ``--json PATH`` also writes the
results and the machine they were measured on; ``--json -`` writes that JSON to
stdout and the table to stderr, so the output can be piped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from controller.logs import configure_logging

from .framework import (
    BENCHMARKS,
    Advance,
    BenchContext,
    BenchResult,
    machine_info,
    now_utc,
    report,
    run_benchmark,
)


def register(subparsers: Any) -> None:
    """Add the ``bench`` subcommand to penctl's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="measure performance figures (product.md section 10)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})",
    )
    p.add_argument("--json", metavar="PATH|-", help="write results as JSON to PATH (- for stdout)")
    p.add_argument("--quick", action="store_true", help="a short smoke run, figures are rough")
    p.set_defaults(handler=main)


class _RichProgress:
    """Adapts rich's progress bars to the framework's Progress protocol."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    @contextlib.contextmanager
    def task(self, description: str, total: float) -> Iterator[Advance]:
        task_id = self._progress.add_task(description, total=total)
        try:
            yield lambda steps: self._progress.advance(task_id, steps)
        finally:
            self._progress.remove_task(task_id)


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.3g}"


def _table(results: list[BenchResult]) -> Table:
    table = Table(title="penctl bench", caption="value: median of runs; spread: half the range")
    for column in ("benchmark", "figure", "value", "unit", "target", "spread"):
        table.add_column(
            column, justify="right" if column in ("value", "target") else "left", no_wrap=True
        )
    for result in results:
        for row in result.rows:
            target = ""
            if "target" in row.extra:
                ok = row.extra.get("meets_target")
                mark = "[green]ok[/]" if ok else "[red]MISSED[/]"
                target = f"{_fmt(row.extra['target'])} {mark}"
            spread = ""
            if "best" in row.extra and row.value:
                half = (row.extra["best"] - row.extra["worst"]) / 2 / row.value
                spread = f"±{half:.1%}"
            table.add_row(result.name, row.name, _fmt(row.value), row.unit, target, spread)
    return table


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # Unwinds like Ctrl-C, so each benchmark's finally stops the servers it started
    # (they run in their own sessions and would outlive a plain SIGTERM).
    raise SystemExit(128 + signum)


def main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # The controller under test logs each session event; at benchmark rates that
    # would measure the terminal. Warnings still show.
    configure_logging("console", logging.WARNING)
    names: list[str] = args.names or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(
            f"penctl bench: unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}",
            file=sys.stderr,
        )
        return 2
    to_stdout = args.json == "-"
    console = Console(stderr=to_stdout)
    if not console.is_terminal:  # a log file or a pipe: do not wrap rows at 80 columns
        console = Console(stderr=to_stdout, width=120)
    started_at = now_utc()
    machine = machine_info()
    console.print(
        f"[bold]{machine['cpu_model']}[/], {machine['cores']} cores, "
        f"Python {machine['python']}" + (" (quick run)" if args.quick else "")
    )
    results: list[BenchResult] = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        ctx = BenchContext(quick=args.quick, progress=_RichProgress(progress))
        overall = progress.add_task("benchmarks", total=len(names))
        for name in names:
            progress.update(overall, description=f"benchmark {name}")
            results.append(run_benchmark(name, ctx))
            progress.advance(overall)
    console.print(_table(results))
    if args.json:
        text = json.dumps(report(results, quick=args.quick, started_at=started_at), indent=2)
        if to_stdout:
            sys.stdout.write(text + "\n")
        else:
            Path(args.json).write_text(text + "\n", encoding="utf-8")
            console.print(f"results written to {args.json}")
    return 0
