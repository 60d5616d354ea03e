"""Scenarios: telemetry that loses nothing whatever else subscribes (issue 13).

Four simulated pens treat through a controller, a real mosquitto and an ingest
worker into a real influxd, with a plain subscriber on ``pen/v1/#`` throughout
(a monitoring client: with it, Mosquitto answers PUBACK 'success' even while the
ingest group's subscription is gone). Counted per device and stream against the
numbers the controller assigned (streams.py); asserted: none lost, none doubled.

* ingest down 15 s, and meanwhile the broker SIGKILLed and restarted (Mosquitto
  2.0.11 forgets the group's shared subscription across a restart, and loses
  what arrived since its last autosave);
* start-up: the controller publishes before any ingest worker ever subscribed;
  with a client reference that is a name and an override reason that is prose,
  searched for in every MQTT payload and every InfluxDB point.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from controller.influx import InfluxClient, InfluxSettings
from controller.ingest import IngestWorker
from controller.ingest.worker import cancel_and_wait
from controller.sessions import OverrideZone
from devtools.stack.processes import ServerProcess

from ..controller_rig import MANAGER, eventually, start_rig, stop_rig
from ..test_ingest import make_settings, running
from .conftest import Record
from .figures import Figures
from .streams import PlainSubscriber, assigned, count_streams, totals

PENS = 4
INGEST_DOWN_S = 15.0
CLEAR_CODE = "Maria.Garcia"
REASON = "Maria Garcia asked for one more pass on her cheeks"


def _fast_acks() -> dict[str, Any]:
    # The defaults (5 s, then doubling) suit a clinic; the scenarios want a verdict sooner.
    return {"ack_timeout_s": 1.0, "ack_timeout_max_s": 4.0, "reorder_s": 1.0}


async def test_plain_subscriber_ingest_down_and_broker_killed_lose_nothing(
    mosquitto: ServerProcess, influxd: ServerProcess, tmp_path: Path, record: Record
) -> None:
    settings = make_settings(mosquitto, influxd, tmp_path / "ingest", batch_seconds=0.1)
    plain = PlainSubscriber(mosquitto.port)
    watcher = asyncio.create_task(plain.run())
    try:
        await asyncio.wait_for(plain.subscribed.wait(), 10)
        first = IngestWorker(settings)
        async with running(first):  # the group's durable session and subscription exist
            rig, collector = await start_rig(
                tmp_path, pens=PENS, mqtt_port=mosquitto.port, mqtt=_fast_acks()
            )
            sids = [await rig.start_treating("cheeks", 1000, index=i) for i in range(PENS)]
            await eventually(lambda: first.counters.controller_acks >= 10, 10)
        assert rig.edge is not None and rig.edge.publisher is not None
        publisher, outbox = rig.edge.publisher, rig.edge.publisher.outbox
        try:
            down_at = time.monotonic()
            await rig.one_pass(index=0, hold=1.0)  # events and samples while ingest is away
            await asyncio.sleep(max(0.0, down_at + 5.0 - time.monotonic()))
            await asyncio.to_thread(mosquitto.kill)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(mosquitto.start_again)
            await rig.one_pass(index=1, hold=1.0)
            await rig.one_pass(index=2, hold=1.0)
            await asyncio.sleep(max(0.0, down_at + INGEST_DOWN_S - time.monotonic()))
            waiting = outbox.counters.depth
            second = IngestWorker(settings)  # same worker id: the same durable session
            async with running(second):
                await rig.one_pass(index=3, hold=0.5)
                await rig.finish(sids)
                await eventually(lambda: outbox.counters.depth == 0, 90, "all acknowledged")
                window = publisher.window.counters
                devices = sorted(p.serial for p in rig.service.pens.values() if p.serial)
                numbers = assigned(outbox, devices)
                samples = rig.service.counters.telemetry
        finally:
            await stop_rig(rig, collector)
        counts = await count_streams(influxd, numbers)
        stored_samples = await _count(influxd, "telemetry", "depth_um")
    finally:
        await cancel_and_wait([watcher])  # again and again: aiomqtt may swallow one
    sums = totals(counts)
    figures = record(
        Figures(
            scenario="plain subscriber, ingest down, broker SIGKILLed",
            injected=f"a plain subscriber on pen/v1/# throughout; ingest stopped "
            f"{INGEST_DOWN_S:.0f} s; mosquitto SIGKILLed and restarted 5 s into it",
            faults=2,
            window_s=INGEST_DOWN_S,
            unit="stream messages (telemetry batches + events), per device and stream",
            sent=sums["assigned"],
            received=sums["stored"],
            lost=sums["lost"],
            duplicated=sums["duplicated"],
            detail={
                "pens": PENS,
                "samples_sent": samples,
                "samples_stored": stored_samples,
                "waiting_in_outbox_when_ingest_returned": waiting,
                "resent_after_reconnect": window.resent_reconnect,
                "resent_lost": window.resent_lost,
                "resent_timeout": window.resent_timeout,
                "plain_subscriber_messages": len(plain.payloads),
                "streams": {k: vars(c) for k, c in counts.items()},
            },
        )
    )
    assert waiting > 0  # the outage really held messages back
    assert all(c.assigned > 0 for c in counts.values()), counts
    assert (figures.lost, figures.duplicated) == (0, 0), counts
    assert stored_samples == samples
    assert all(c.first == 0 for c in counts.values())  # nothing lost at a stream's start


async def test_published_before_ingest_ever_subscribed_and_nothing_personal(
    mosquitto: ServerProcess, influxd: ServerProcess, tmp_path: Path, record: Record
) -> None:
    plain = PlainSubscriber(mosquitto.port)
    watcher = asyncio.create_task(plain.run())
    try:
        await asyncio.wait_for(plain.subscribed.wait(), 10)
        rig, collector = await start_rig(
            tmp_path, pens=PENS, mqtt_port=mosquitto.port, mqtt=_fast_acks()
        )
        assert rig.edge is not None and rig.edge.publisher is not None
        publisher, outbox = rig.edge.publisher, rig.edge.publisher.outbox
        try:
            sids = [
                await rig.start_treating("cheeks", 1000, index=i, client_ref=CLEAR_CODE)
                for i in range(PENS)
            ]
            rig.service.act(OverrideZone(sids[0], "cheeks", MANAGER, REASON, max_passes=5))
            await rig.one_pass(index=0)
            await asyncio.sleep(3.0)  # seconds of telemetry with nobody to take it
            before = publisher.counters.events
            worker = IngestWorker(make_settings(mosquitto, influxd, tmp_path / "ingest"))
            async with running(worker):
                await rig.one_pass(index=1)
                await rig.finish(sids)
                await eventually(lambda: outbox.counters.depth == 0, 60, "all acknowledged")
                devices = sorted(p.serial for p in rig.service.pens.values() if p.serial)
                numbers = assigned(outbox, devices)
        finally:
            await stop_rig(rig, collector)
        counts = await count_streams(influxd, numbers)
        points = await _all_points(influxd)
    finally:
        await cancel_and_wait([watcher])  # again and again: aiomqtt may swallow one
    sums = totals(counts)
    leaks = [
        where
        for where, text in [*((t, p.decode(errors="replace")) for t, p in plain.payloads), *points]
        for secret in (CLEAR_CODE, "Maria", "Garcia", REASON)
        if secret in text
    ]
    reports = [d for t, d in plain.documents() if t.endswith("/events")]
    pseudonyms = {d["values"]["client"] for d in reports if d["kind"] == "session_report"}
    figures = record(
        Figures(
            scenario="published before ingest subscribed; nothing personal",
            injected=f"{before} events (and telemetry) published before any ingest worker had "
            f"subscribed; client reference {CLEAR_CODE!r} and an override reason in prose",
            faults=1,
            unit="stream messages (telemetry batches + events), per device and stream",
            sent=sums["assigned"],
            received=sums["stored"],
            lost=sums["lost"],
            duplicated=sums["duplicated"],
            detail={
                "events_before_ingest": before,
                "mqtt_payloads_searched": len(plain.payloads),
                "influx_points_searched": len(points),
                "clear_code_found": len(leaks),
                "pseudonyms": sorted(pseudonyms),
                "streams": {k: vars(c) for k, c in counts.items()},
            },
        )
    )
    assert before >= PENS * 5  # sessions, zones, depths, arming, a pass, the override
    assert (figures.lost, figures.duplicated) == (0, 0), counts
    assert all(c.first == 0 for c in counts.values())
    assert len(plain.payloads) > 100 and len(points) > 1000  # a real search
    assert leaks == []
    assert len(pseudonyms) == 1  # one client, one pseudonym on every report


async def _count(influxd: ServerProcess, measurement: str, field: str) -> int:
    settings = InfluxSettings(url=f"http://127.0.0.1:{influxd.port}", database="pen")
    async with InfluxClient(settings) as client:
        return await client.count(measurement, field)


async def _all_points(influxd: ServerProcess) -> list[tuple[str, str]]:
    """Every point of every measurement, as (measurement, its row in text)."""
    settings = InfluxSettings(url=f"http://127.0.0.1:{influxd.port}", database="pen")
    out: list[tuple[str, str]] = []
    async with InfluxClient(settings) as client:
        measurements = await client.query("SHOW MEASUREMENTS")
        for (name,) in measurements[0]["values"]:
            for series in await client.query(f'SELECT * FROM "{name}"'):
                out += [(name, repr(row)) for row in series.get("values", [])]
    return out
