"""Pens to InfluxDB with outages in between: the rig of the broker and database scenarios.

Simulated pens on ptys stream 100 Hz telemetry into a controller, whose publisher
goes through a real mosquitto to an in-process ingest worker writing to a real
influxd. ``stream_through_outages`` takes one part down and up again a counted
number of times while the pens stream and passes are treated, then stops the pens,
lets everything drain, and counts what InfluxDB holds against what the
controller received from its pens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from controller.ingest import IngestWorker
from controller.sessions import EndSession
from devtools.stack.processes import ServerProcess

from ..controller_rig import THERAPIST, eventually, start_rig, stop_rig
from ..test_ingest import count, make_settings, running
from ..test_ingest import eventually as poll

Step = Callable[[], Awaitable[None]]


@dataclass
class Outcome:
    samples_sent: int  # telemetry samples the controller received from its pens
    events_sent: int  # session events the publisher put in its outbox
    samples_stored: int  # points in InfluxDB's telemetry measurement
    events_stored: int
    window_s: float  # from the first outage to the last recovery
    detail: dict[str, int]

    @property
    def lost(self) -> int:
        return max(0, self.samples_sent - self.samples_stored) + max(
            0, self.events_sent - self.events_stored
        )

    @property
    def duplicated(self) -> int:
        return max(0, self.samples_stored - self.samples_sent) + max(
            0, self.events_stored - self.events_sent
        )


async def stream_through_outages(
    tmp_path: Path,
    mosquitto: ServerProcess,
    influxd: ServerProcess,
    *,
    pens: int,
    outages: int,
    outage_s: float,
    take_down: Step,
    bring_up: Step,
) -> Outcome:
    worker = IngestWorker(make_settings(mosquitto, influxd, tmp_path / "ingest", batch_seconds=0.1))
    async with running(worker):
        rig, collector = await start_rig(tmp_path, pens=pens, mqtt_port=mosquitto.port)
        assert rig.edge is not None and rig.edge.publisher is not None
        publisher, outbox = rig.edge.publisher, rig.edge.publisher.outbox
        try:
            sids = [await rig.start_treating("cheeks", 1000, index=i) for i in range(pens)]
            await eventually(lambda: worker.counters.batches >= 3, 10, "ingest under way")
            began = time.monotonic()
            for n in range(outages):
                await take_down()
                # A pass while it is down: its events and samples must wait, not vanish.
                await rig.one_pass(index=n % pens, hold=outage_s)
                await bring_up()
                await eventually(publisher.connected.is_set, 30, "publisher connected")
                await eventually(_more_acked(worker, 20), 30, "flowing again")
            window = time.monotonic() - began
            for sid in sids:
                rig.service.act(EndSession(sid, THERAPIST))
            assert rig.runner is not None
            rig.runner.close()  # the pens go away: no more telemetry after this point
            for pen in rig.service.pens.values():
                await pen.link.close()
            await rig.secured()  # the last events (links down) are in the edge's outbox
            await eventually(lambda: outbox.counters.depth == 0, within=30)
            samples, events = rig.service.counters.telemetry, publisher.counters.events
            detail = {
                "pens": pens,
                "outbox_dropped": outbox.counters.dropped_oldest + outbox.counters.rejected,
                "publisher_connects": publisher.counters.connects,
                "ingest_connects": worker.counters.connects,
                "ingest_write_retries": worker.counters.write_retries,
                "ingest_messages": worker.counters.messages,
                "ingest_dead_letters": worker.counters.dead_letters,
            }
        finally:
            await stop_rig(rig, collector)

        async def landed() -> bool:
            return (
                await count(influxd, "telemetry", "depth_um") >= samples
                and await count(influxd, "events") >= events
            )

        # Past the deadline the counts below say what is missing.
        await asyncio.gather(poll(landed, 30, "everything in InfluxDB"), return_exceptions=True)
    return Outcome(
        samples,
        events,
        await count(influxd, "telemetry", "depth_um"),
        await count(influxd, "events"),
        window,
        detail,
    )


def _more_acked(worker: IngestWorker, more: int) -> Callable[[], bool]:
    """A condition: the worker has acknowledged ``more`` messages beyond its count now."""
    target = worker.counters.acked + more
    return lambda: worker.counters.acked >= target
