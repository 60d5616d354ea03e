"""The figures a reliability scenario measures, and the file they are collected in.

Every test in this package fills one ``Figures`` and hands it to the ``record``
fixture (conftest.py), which appends it to ``tests/artifacts/reliability.json``;
the test's assertions are then made on the same object, so the published figure
and the checked figure cannot drift apart. docs/RELIABILITY.md quotes the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..controller_rig import eventually

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
FIGURES_FILE = ARTIFACTS / "reliability.json"


@dataclass
class Figures:
    """One scenario's numbers: what was injected, how often, what came through."""

    scenario: str
    injected: str  # what kind of fault, in words
    faults: int = 0  # how many were injected
    window_s: float = 0.0  # over how long (faults / window_s is "how often")
    sent: int = 0  # the units the scenario counts (samples, passes, frames, requests)
    received: int = 0
    lost: int = 0
    duplicated: int = 0
    unit: str = ""  # what sent/received count
    pen_stop_ms: list[float] = field(default_factory=list)  # per fault, where a pen must stop
    lease_ms: int | None = None
    duration_s: float = 0.0  # wall time of the whole test, filled in by ``record``
    detail: dict[str, Any] = field(default_factory=dict)  # scenario-specific counters

    @property
    def pen_stop_ms_max(self) -> float:
        return max(self.pen_stop_ms, default=0.0)


def append(figures: Figures) -> None:
    """Add ``figures`` to the file, replacing an earlier entry for the same scenario."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    if FIGURES_FILE.exists():
        try:
            entries = json.loads(FIGURES_FILE.read_text())
        except ValueError:
            entries = []  # a run killed mid-write: start the file afresh
    entries = [e for e in entries if e.get("scenario") != figures.scenario]
    entry = asdict(figures)
    entry["pen_stop_ms_max"] = figures.pen_stop_ms_max
    entries.append(entry)
    tmp = FIGURES_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, indent=2, default=str) + "\n")
    os.replace(tmp, FIGURES_FILE)


async def settles(predicate: Callable[[], bool], within: float) -> bool:
    """Whether ``predicate`` comes to hold within ``within`` s; a test records its
    figures either way and then asserts, so a failing run still says what it saw."""
    try:
        await eventually(predicate, within=within)
    except TimeoutError:
        return False
    return True
