"""Pens to InfluxDB: simulated pens, controller, a real broker, ingest, a real influxd."""

from __future__ import annotations

from pathlib import Path

from controller.ingest import IngestWorker
from controller.sessions import EndSession
from devtools.stack.processes import ServerProcess

from .controller_rig import THERAPIST, eventually, start_rig, stop_rig
from .test_ingest import count, make_settings, running
from .test_ingest import eventually as poll


async def test_every_sample_and_event_lands_once(
    mosquitto: ServerProcess, influxd: ServerProcess, tmp_path: Path
) -> None:
    worker = IngestWorker(make_settings(mosquitto, influxd, tmp_path / "ingest"))
    async with running(worker):
        rig, collector = await start_rig(tmp_path, pens=2, mqtt_port=mosquitto.port)
        try:
            sid = await rig.start_treating("cheeks", 1000)
            await rig.one_pass()
            await rig.one_pass()
            rig.service.act(EndSession(sid, THERAPIST))
            assert rig.runner is not None
            rig.runner.close()  # the pens go away: no more telemetry after this point
            for pen in rig.service.pens.values():
                await pen.link.close()
            await rig.secured()  # the last events (links down) are in the edge's outbox
            assert rig.edge is not None and rig.edge.publisher is not None
            publisher, outbox = rig.edge.publisher, rig.edge.publisher.outbox
            await eventually(lambda: outbox.counters.depth == 0, within=20)
            samples = rig.service.counters.telemetry
            events = publisher.counters.events
        finally:
            await stop_rig(rig, collector)

        async def landed() -> bool:
            return (
                await count(influxd, "telemetry", "depth_um") == samples
                and await count(influxd, "events") == events
            )

        await poll(landed, 30, "every sample and event in InfluxDB")
    # Exactly once: nothing missing, nothing doubled, after everything settled.
    assert await count(influxd, "telemetry", "depth_um") == samples
    assert await count(influxd, "events") == events
    assert samples > 50  # not a vacuous comparison: two pens streamed throughout
    assert events > 5
