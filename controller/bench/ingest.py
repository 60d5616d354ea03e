"""Ingest throughput: points per second through MQTT into InfluxDB, against direct writes.

Both figures are measured in one run against the same influxd (fresh databases):

* direct: the telemetry lines written with ``/write`` in batches of 5000;
* through MQTT: the same samples as the controller publishes them (one
  TelemetryBatch per pen per 100 ms), queued at a real mosquitto for a durable
  ingest session, then ``penctl ingest`` (its own process) started and timed
  from its first written batch until InfluxDB holds every point.

The figure is the ratio of the two rates.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt

from ..influx import InfluxClient, InfluxSettings
from ..ingest.points import telemetry_lines
from ..stack.processes import ServerProcess, start_influxd, start_mosquitto
from ..telemetry.schema import TelemetryBatch, device_topic, dump
from .framework import BenchContext, Row

DESCRIPTION = "ingest: points/s through MQTT into InfluxDB, as a ratio of direct writes"
TARGET_RATIO = 0.8
PENS = 32
SAMPLES_PER_BATCH = 10  # 100 ms of a pen at 100 Hz: what the publisher sends
ROOT = "pen/v1"


def _batches(pens: int, seconds: int) -> list[TelemetryBatch]:
    t0 = time.time_ns() - seconds * 1_000_000_000
    out = []
    for b in range(seconds * 10):
        for p in range(pens):
            rows = [
                [
                    t0 + (b * SAMPLES_PER_BATCH + i) * 10_000_000 + p,
                    (b * 10 + i) * 10,
                    1000,
                    1000 + i % 5,
                    100,
                    400,
                    3500,
                    3900,
                    b * 10 + i,
                    0x17,
                ]
                for i in range(SAMPLES_PER_BATCH)
            ]
            out.append(
                TelemetryBatch(clinic="bench", device=f"SIM-{p + 1:04d}", seq=b, samples=rows)
            )
    return out


async def _count(client: InfluxClient) -> int:
    return await client.count("telemetry", "depth_um")


async def _direct(influxd: ServerProcess, batches: list[TelemetryBatch]) -> float:
    lines = [line for b in batches for line in telemetry_lines(b) if line.startswith("telemetry,")]
    settings = InfluxSettings(url=f"http://127.0.0.1:{influxd.port}", database="direct")
    async with InfluxClient(settings) as client:
        await client.create_database()
        started = time.perf_counter()
        for i in range(0, len(lines), 5000):
            await client.write(lines[i : i + 5000])
        return len(lines) / (time.perf_counter() - started)


async def _through_mqtt(
    mosquitto: ServerProcess, influxd: ServerProcess, batches: list[TelemetryBatch], state: Path
) -> float:
    points = sum(len(b.samples) for b in batches)
    env = {
        **os.environ,
        "PENCTL_MQTT__PORT": str(mosquitto.port),
        "PENCTL_INFLUX__URL": f"http://127.0.0.1:{influxd.port}",
        "PENCTL_INFLUX__DATABASE": "mqtt",
        "PENCTL_STATE_DIR": str(state),
    }
    profile = os.environ.get("PENCTL_BENCH_PROFILE")  # a path: cProfile the worker into it
    prefix = ["-m", "cProfile", "-o", profile] if profile else []
    cmd = [sys.executable, *prefix, "-m", "controller.cli", "ingest", "--worker-id", "bench"]
    # 1. A first run creates the durable shared subscription, then leaves.
    worker = await asyncio.create_subprocess_exec(*cmd, env=env, stderr=asyncio.subprocess.PIPE)
    settings = InfluxSettings(url=f"http://127.0.0.1:{influxd.port}", database="mqtt")
    async with InfluxClient(settings) as client:
        await _await_database(client)
        worker.send_signal(signal.SIGTERM)
        await worker.wait()
        # 2. Queue every message at the broker while no worker runs.
        async with aiomqtt.Client(
            "127.0.0.1", mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as mqtt:
            for i in range(0, len(batches), 200):
                await asyncio.gather(
                    *(
                        mqtt.publish(
                            device_topic(ROOT, b.clinic, b.device, "telemetry"), dump(b), qos=1
                        )
                        for b in batches[i : i + 200]
                    )
                )
        # 3. Start the worker; time it from its first written batch to the last point,
        #    so that Python's start-up and the connection are not counted.
        worker = await asyncio.create_subprocess_exec(
            *cmd, env=env, stderr=asyncio.subprocess.DEVNULL
        )
        try:
            first = 0
            while first == 0:
                first = await _count(client)
            started = time.perf_counter()
            while await _count(client) < points:  # noqa: ASYNC110 - polls another server
                await asyncio.sleep(0.02)
            return (points - first) / (time.perf_counter() - started)
        finally:
            worker.send_signal(signal.SIGTERM)
            await worker.wait()


async def _await_database(client: InfluxClient) -> None:
    async with asyncio.timeout(30):
        while True:
            series = await client.query("SHOW DATABASES")
            names = {row[0] for s in series for row in s.get("values", [])}
            if "mqtt" in names:
                return
            await asyncio.sleep(0.1)


def run(ctx: BenchContext) -> list[Row]:
    seconds = 10 if ctx.quick else 30  # of 32 pens at 100 Hz: 96,000 points
    batches = _batches(PENS, seconds)
    points = sum(len(b.samples) for b in batches)
    with (
        tempfile.TemporaryDirectory(prefix="penctl-bench-ingest-") as tmp,
        ctx.progress.task("ingest: direct and through MQTT", 2) as advance,
    ):
        mosquitto = start_mosquitto(Path(tmp) / "mosquitto")
        influxd = start_influxd(Path(tmp) / "influxd")
        try:
            direct = asyncio.run(_direct(influxd, batches))
            advance(1)
            via = asyncio.run(_through_mqtt(mosquitto, influxd, batches, Path(tmp) / "ingest"))
            advance(1)
        finally:
            mosquitto.stop()
            influxd.stop()
    common = {"points": points, "messages": len(batches), "samples_per_message": SAMPLES_PER_BATCH}
    return [
        Row("direct write", round(direct), "points/s", dict(common)),
        Row("through MQTT + ingest", round(via), "points/s", dict(common)),
        Row(
            "ingest ratio",
            round(via / direct, 3),
            "ratio",
            {**common, "target": TARGET_RATIO, "higher_is_better": True},
        ),
    ]
