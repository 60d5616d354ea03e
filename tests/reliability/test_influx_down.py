"""Scenario: InfluxDB stopped mid-session and restarted, again and again.

Four pens stream 100 Hz telemetry and passes are treated while influxd is down;
the ingest worker must hold its messages unacknowledged and retry. Counted:
outages, write retries, samples and events produced and stored. Asserted:
nothing lost, nothing doubled.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from devtools.stack.processes import ServerProcess

from .conftest import Record
from .figures import Figures
from .pipeline import stream_through_outages

OUTAGES = 3
OUTAGE_S = 1.5


async def test_influx_down_mid_session_loses_nothing(
    mosquitto: ServerProcess, influxd: ServerProcess, tmp_path: Path, record: Record
) -> None:
    async def stop() -> None:
        await asyncio.to_thread(influxd.stop)

    async def restart() -> None:
        await asyncio.to_thread(influxd.start_again)

    outcome = await stream_through_outages(
        tmp_path,
        mosquitto,
        influxd,
        pens=4,
        outages=OUTAGES,
        outage_s=OUTAGE_S,
        take_down=stop,
        bring_up=restart,
    )
    figures = record(
        Figures(
            scenario="InfluxDB down",
            injected=f"influxd stopped mid-session, restarted after {OUTAGE_S} s",
            faults=OUTAGES,
            window_s=round(outcome.window_s, 2),
            unit="telemetry samples + session events",
            sent=outcome.samples_sent + outcome.events_sent,
            received=outcome.samples_stored + outcome.events_stored,
            lost=outcome.lost,
            duplicated=outcome.duplicated,
            detail={
                **outcome.detail,
                "samples": outcome.samples_sent,
                "events": outcome.events_sent,
            },
        )
    )
    assert figures.detail["ingest_write_retries"] >= OUTAGES  # every outage was felt
    assert (figures.lost, figures.duplicated) == (0, 0)
    assert figures.received == figures.sent
    assert outcome.samples_sent > 4 * 100 * OUTAGES * OUTAGE_S  # four pens streamed throughout
