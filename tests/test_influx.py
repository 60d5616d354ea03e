"""The InfluxDB module against a real influxd."""

from __future__ import annotations

import pytest

from controller.influx import (
    InfluxClient,
    InfluxQueryError,
    InfluxRejected,
    InfluxSettings,
    InfluxUnavailable,
    format_line,
)
from devtools.stack.processes import ServerProcess, free_port


def _client(server: ServerProcess, db: str = "pen") -> InfluxClient:
    return InfluxClient(InfluxSettings(url=f"http://127.0.0.1:{server.port}", database=db))


def test_format_line_escapes_and_types() -> None:
    line = format_line(
        "telemetry",
        {"device": "SIM 1,a=b", "zone": ""},
        {"depth_um": 1200, "temp": 36.5, "armed": True, "note": 'say "hi"'},
        1_700_000_000_000_000_000,
    )
    assert line == (
        r"telemetry,device=SIM\ 1\,a\=b depth_um=1200i,temp=36.5,armed=true,"
        r'note="say \"hi\"" 1700000000000000000'
    )
    with pytest.raises(ValueError, match="finite"):
        format_line("m", {}, {"x": float("nan")}, 1)
    with pytest.raises(ValueError, match="at least one field"):
        format_line("m", {}, {}, 1)


async def test_write_is_idempotent_and_queryable(influxd: ServerProcess) -> None:
    async with _client(influxd) as client:
        assert await client.ping()
        await client.create_database()
        await client.create_database()  # idempotent
        lines = [format_line("t", {"device": "p1"}, {"v": i}, 1_000 + i) for i in range(100)]
        assert await client.write(lines) == 100
        assert await client.write(lines) == 100  # same timestamps: overwrite, not duplicate
        assert await client.count("t", "v") == 100
        series = await client.query('SELECT SUM("v") FROM "t"')
        assert series[0]["values"][0][1] == sum(range(100))


async def test_errors_are_classified(influxd: ServerProcess) -> None:
    async with _client(influxd) as client:
        await client.create_database()
        with pytest.raises(InfluxRejected, match="400") as refused:
            await client.write("not line protocol at all")
        assert refused.value.status == 400  # an attribute: nobody parses the message
        assert refused.value.detail
        with pytest.raises(InfluxQueryError):
            await client.query("SELEKT nonsense")
    async with _client(influxd, db="missing") as client:
        with pytest.raises(InfluxQueryError, match="database not found"):
            await client.query('SELECT * FROM "t"')
    dead = InfluxClient(InfluxSettings(url=f"http://127.0.0.1:{free_port()}", timeout=2))
    async with dead:
        assert not await dead.ping()
        with pytest.raises(InfluxUnavailable):
            await dead.write("t v=1i 1")
