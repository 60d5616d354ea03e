"""The benchmark framework behind ``penctl bench``.

A benchmark is a module listed in ``BENCHMARKS`` that exposes::

    DESCRIPTION: str
    def run(ctx: BenchContext) -> list[Row]: ...

``run`` does its own timing and returns result rows (name, value, unit, extra).
A row whose figure has a requirement puts ``target`` (same unit) and
``higher_is_better`` in ``extra``; ``judge`` then adds ``meets_target``. Long work
reports progress through ``ctx.progress`` so the command line can show it, and
honours ``ctx.quick`` (a smoke run of a few seconds, for tests and CI).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

#: benchmark name -> module exposing DESCRIPTION and run(ctx); adding one is one line.
BENCHMARKS: dict[str, str] = {
    "codec": "devtools.bench.codec",
    "reaction": "devtools.bench.reaction",
    "capacity": "devtools.bench.capacity",
    "ingest": "devtools.bench.ingest",
    "e2e": "devtools.bench.e2e",
}


@dataclass(frozen=True, slots=True)
class Row:
    """One measured figure."""

    name: str
    value: float
    unit: str
    extra: dict[str, Any] = field(default_factory=dict)


Advance = Callable[[float], None]


class Progress(Protocol):
    """Where a benchmark reports how far along it is."""

    def task(self, description: str, total: float) -> contextlib.AbstractContextManager[Advance]:
        """A unit of work of ``total`` steps; the context yields ``advance(steps)``."""
        ...


class NullProgress:
    """Progress that goes nowhere (tests, --json - without a terminal)."""

    @contextlib.contextmanager
    def task(self, description: str, total: float) -> Iterator[Advance]:
        yield lambda steps: None


@dataclass
class BenchContext:
    quick: bool = False
    progress: Progress = field(default_factory=NullProgress)


@dataclass
class BenchResult:
    name: str
    description: str
    seconds: float
    rows: list[Row]


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError, AttributeError):
        # Other processes share the machine; the load says how much to trust the figures.
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def judge(row: Row) -> Row:
    """Add ``meets_target`` to a row that carries a ``target``."""
    target = row.extra.get("target")
    if target is None:
        return row
    higher = row.extra.get("higher_is_better", True)
    ok = row.value >= target if higher else row.value <= target
    return Row(row.name, row.value, row.unit, {**row.extra, "meets_target": ok})


def run_benchmark(name: str, ctx: BenchContext) -> BenchResult:
    """Import and run one registered benchmark."""
    module = importlib.import_module(BENCHMARKS[name])
    started = time.perf_counter()
    rows = [judge(row) for row in module.run(ctx)]
    return BenchResult(name, module.DESCRIPTION, time.perf_counter() - started, rows)


def report(results: list[BenchResult], *, quick: bool, started_at: datetime) -> dict[str, Any]:
    """The JSON document ``penctl bench --json`` writes."""
    return {
        "started_at": started_at.isoformat(timespec="seconds"),
        "quick": quick,
        "machine": machine_info(),
        "benchmarks": {
            r.name: {
                "description": r.description,
                "seconds": round(r.seconds, 3),
                "rows": [asdict(row) for row in r.rows],
            }
            for r in results
        },
    }


def now_utc() -> datetime:
    return datetime.now(UTC)


def rate(count: float, seconds: float) -> float:
    """count per second, guarding a zero interval on a coarse clock."""
    return count / seconds if seconds > 0 else float("inf")


def repeat_rates(
    work: Callable[[], float], repeats: int, advance: Advance
) -> tuple[float, dict[str, Any]]:
    """Run ``work`` (returns a rate) ``repeats`` times: the median, and the spread as extra."""
    rates = []
    for _ in range(repeats):
        rates.append(work())
        advance(1)
    return statistics.median(rates), {
        "runs": repeats,
        "best": round(max(rates)),
        "worst": round(min(rates)),
    }
