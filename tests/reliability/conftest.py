"""Reliability-suite fixtures; mosquitto and influxd come from tests/conftest.py."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from .figures import Figures, append

Record = Callable[[Figures], Figures]


@pytest.fixture
def record() -> Record:
    """``record(figures)``: stamp the test's wall time so far and append to reliability.json."""
    started = time.monotonic()

    def write(figures: Figures) -> Figures:
        figures.duration_s = round(time.monotonic() - started, 2)
        append(figures)
        return figures

    return write
