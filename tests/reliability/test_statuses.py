"""Scenarios: retained statuses that stay true (issue 13), with real mosquitto and influxd.

* While the controller runs, every pen's status is republished (retained) every
  ``mqtt.status_interval_s`` with fresh link counters; on a clean stop the pens,
  the controller and the ingest worker all say offline.
* A controller killed with SIGKILL cannot say anything: the broker publishes its
  last will, and ingest takes the pens it served offline in InfluxDB.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import aiomqtt

from controller.influx import InfluxClient, InfluxSettings
from controller.ingest import IngestWorker
from devtools.stack.processes import ServerProcess

from ..controller_rig import start_rig, stop_rig
from ..test_ingest import eventually as poll
from ..test_ingest import make_settings, running
from .conftest import Record
from .figures import Figures

PENS = 2
INTERVAL_S = 0.3


async def retained(port: int, prefix: str = "pen/v1/", settle_s: float = 1.0) -> dict[str, Any]:
    """Every retained message under ``prefix``, by topic (empty payloads left out)."""
    found: dict[str, Any] = {}
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(prefix + "#", qos=1)
        try:
            async with asyncio.timeout(settle_s):
                async for message in client.messages:
                    if message.retain and message.payload:
                        found[str(message.topic)] = json.loads(bytes(message.payload))  # type: ignore[arg-type]
        except TimeoutError:
            pass  # every retained message arrives right after subscribing
    return found


async def last_statuses(influxd: ServerProcess) -> dict[str, list[Any]]:
    """device -> [time, online, state, controller, link_frames_received] of its newest status."""
    settings = InfluxSettings(url=f"http://127.0.0.1:{influxd.port}", database="pen")
    async with InfluxClient(settings) as client:
        series = await client.query(
            'SELECT LAST("online"), LAST("state"), LAST("controller"), '
            'LAST("link_frames_received") FROM "device_status" GROUP BY "device"'
        )
    return {s["tags"]["device"]: s["values"][0] for s in series}


async def status_points(influxd: ServerProcess) -> dict[str, int]:
    settings = InfluxSettings(url=f"http://127.0.0.1:{influxd.port}", database="pen")
    async with InfluxClient(settings) as client:
        try:
            series = await client.query(
                'SELECT COUNT("online") FROM "device_status" GROUP BY "device"'
            )
        except Exception:  # no database or measurement yet
            return {}
    return {s["tags"]["device"]: int(s["values"][0][1]) for s in series}


async def test_statuses_are_refreshed_and_say_offline_on_a_clean_stop(
    mosquitto: ServerProcess, influxd: ServerProcess, tmp_path: Path, record: Record
) -> None:
    worker = IngestWorker(make_settings(mosquitto, influxd, tmp_path / "ingest"))
    async with running(worker):
        rig, collector = await start_rig(
            tmp_path, pens=PENS, mqtt_port=mosquitto.port, mqtt={"status_interval_s": INTERVAL_S}
        )
        try:

            async def refreshed() -> bool:
                counts = await status_points(influxd)
                return len(counts) == PENS and min(counts.values()) >= 4

            await poll(refreshed, 20, "pen statuses refreshed")
            running_now = await last_statuses(influxd)
            while_running = await retained(mosquitto.port)
        finally:
            await stop_rig(rig, collector)
        await poll(
            # The pens' own last word, or the one ingest derives from the controller's.
            lambda: _all_offline(influxd, "stopped", "controller_offline"),
            20,
            "pens offline in InfluxDB after the stop",
        )
        after_stop = await retained(mosquitto.port)
        stats_topic = worker.stats_topic
    after_ingest = await retained(mosquitto.port)
    pens = {t: d for t, d in after_stop.items() if t.endswith("/status") and "/device/" in t}
    controller = next(d for t, d in after_stop.items() if "/controller/" in t)
    refreshes = await status_points(influxd)
    figures = record(
        Figures(
            scenario="statuses: refreshed, offline on a clean stop",
            injected=f"{PENS} pens with statuses every {INTERVAL_S} s; a clean stop of the "
            "controller, then of the ingest worker",
            faults=1,
            unit="retained status messages saying offline after the stop",
            sent=PENS + 2,
            received=sum(not d["online"] for d in pens.values())
            + (not controller["online"])
            + (not after_ingest[stats_topic]["online"]),
            detail={
                "status_points_per_pen": refreshes,
                "frames_received_while_running": {d: v[4] for d, v in running_now.items()},
                "online_while_running": sum(
                    d["online"] for t, d in while_running.items() if "/device/" in t
                ),
                "pens_after_stop": {t: d["online"] for t, d in pens.items()},
                "controller_after_stop": controller["online"],
                "ingest_after_its_stop": after_ingest[stats_topic]["online"],
            },
        )
    )
    assert figures.detail["online_while_running"] == PENS
    assert all(v[1] is True for v in running_now.values())
    assert all(v[4] and v[4] > 0 for v in running_now.values())  # live link counters
    assert len(pens) == PENS
    assert figures.received == figures.sent  # every one of them says offline
    assert after_stop[stats_topic]["online"] is True  # ingest still ran then


async def _all_offline(influxd: ServerProcess, *states: str) -> bool:
    statuses = await last_statuses(influxd)
    return bool(statuses) and all(v[1] is False and v[2] in states for v in statuses.values())


KILLED_CONTROLLER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from controller.config import MqttSettings
    from controller.telemetry.events import Pseudonymizer
    from controller.telemetry.outbox import Outbox
    from controller.telemetry.publisher import TelemetryPublisher

    async def main(port: int, state: Path) -> None:
        pub = TelemetryPublisher(
            MqttSettings(port=port), Outbox(state / "outbox.db"), clinic_id="clinic-k",
            controller_id="doomed", pseudonymize=Pseudonymizer("k" * 32),
        )
        task = asyncio.create_task(pub.run())
        await pub.connected.wait()
        for pen in ("PEN-K1", "PEN-K2"):
            pub.set_status(pen, online=True, state="up", link={"frames_received": 7})
        while pub.outbox.waiting_for_broker():
            await asyncio.sleep(0.01)
        print("ready", flush=True)
        await task

    asyncio.run(main(int(sys.argv[1]), Path(sys.argv[2])))
    """
)


async def test_a_killed_controllers_pens_go_offline(
    mosquitto: ServerProcess, influxd: ServerProcess, tmp_path: Path, record: Record
) -> None:
    worker = IngestWorker(make_settings(mosquitto, influxd, tmp_path / "ingest"))
    async with running(worker):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            KILLED_CONTROLLER,
            str(mosquitto.port),
            str(tmp_path),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(30):
                while (await proc.stdout.readline()).strip() != b"ready":  # logs first
                    pass

            async def online() -> bool:
                statuses = await last_statuses(influxd)
                return len(statuses) == 2 and all(v[1] is True for v in statuses.values())

            await poll(online, 20, "both pens online in InfluxDB")
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        await poll(
            lambda: _all_offline(influxd, "controller_offline"), 20, "pens offline after the kill"
        )
        marked = worker.counters.pens_marked_offline
    statuses = await last_statuses(influxd)
    figures = record(
        Figures(
            scenario="statuses: a killed controller's pens go offline",
            injected="SIGKILL to a controller process with two pens online",
            faults=1,
            unit="pens shown offline in InfluxDB (device_status) after the kill",
            sent=2,
            received=sum(v[1] is False for v in statuses.values()),
            detail={"pens_marked_offline": marked, "statuses": statuses},
        )
    )
    assert figures.received == 2
    assert all(v[3] == "doomed" for v in statuses.values())
