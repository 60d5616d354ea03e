"""Shared fixtures: real servers on free loopback ports, in temporary directories."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.stack.processes import ServerProcess, start_influxd, start_mosquitto


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real Mosquitto 2 broker, anonymous, persistent, on a free port."""
    server = start_mosquitto(tmp_path / "mosquitto")
    yield server
    server.stop()


@pytest.fixture
def influxd(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real influxd (1.x, v1 HTTP API) on a free port."""
    server = start_influxd(tmp_path / "influxd")
    yield server
    server.stop()
