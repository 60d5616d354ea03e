"""Scenario: the MQTT broker stopped or killed (SIGKILL) mid-session and restarted, 3 times.

Four pens stream 100 Hz telemetry and passes are treated while mosquitto is down.
Counted: broker kills, samples and events the controller produced, and what
InfluxDB holds once it has all settled. Asserted: nothing lost, nothing doubled.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from devtools.stack.processes import ServerProcess

from .conftest import Record
from .figures import Figures
from .pipeline import stream_through_outages

KILLS = 3
OUTAGE_S = 1.5


@pytest.mark.parametrize(
    "crash",
    [pytest.param(False, id="stopped"), pytest.param(True, id="killed", marks=pytest.mark.slow)],
)
async def test_broker_down_mid_session_loses_nothing(
    mosquitto: ServerProcess, influxd: ServerProcess, tmp_path: Path, record: Record, crash: bool
) -> None:
    async def kill() -> None:
        await asyncio.to_thread(mosquitto.kill if crash else mosquitto.stop)

    async def restart() -> None:
        await asyncio.to_thread(mosquitto.start_again)

    outcome = await stream_through_outages(
        tmp_path,
        mosquitto,
        influxd,
        pens=4,
        outages=KILLS,
        outage_s=OUTAGE_S,
        take_down=kill,
        bring_up=restart,
    )
    figures = record(
        Figures(
            scenario="broker down (SIGKILL)" if crash else "broker down (SIGTERM)",
            injected=f"mosquitto {'SIGKILLed' if crash else 'stopped'} mid-session, "
            f"restarted after {OUTAGE_S} s",
            faults=KILLS,
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
    assert figures.detail["publisher_connects"] == KILLS + 1  # every kill was felt
    assert (figures.lost, figures.duplicated) == (0, 0)
    assert figures.received == figures.sent
    assert outcome.samples_sent > 4 * 100 * KILLS * OUTAGE_S  # four pens streamed throughout
