"""End-to-end latency: a pen's sample to the moment it is queryable in InfluxDB.

The whole pipeline, each part a real process or server: simulated pens (their
own process) over pseudo-terminals, the controller (this process) publishing
through its durable outbox to mosquitto, ``penctl ingest`` (its own process)
writing to influxd. A poller asks InfluxDB every 20 ms for points newer than
the last it saw; each new point's latency is the poll's time minus the point's
timestamp, which the controller stamps when the sample arrives from the pen.
The figure therefore errs high by up to one poll interval.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from controller.influx import InfluxClient, InfluxQueryError, InfluxSettings, InfluxUnavailable
from devtools.stack.processes import start_influxd, start_mosquitto

from .fleet import run_fleet
from .framework import BenchContext, Row

DESCRIPTION = "end-to-end: pen sample to queryable in InfluxDB (32 pens at 100 Hz)"
PENS = 32
POLL_S = 0.02
TARGET_P99_MS = 150.0


async def _measure(mqtt_port: int, influx_port: int, state: Path, seconds: float) -> list[float]:
    env = {
        **os.environ,
        "PENCTL_MQTT__PORT": str(mqtt_port),
        "PENCTL_INFLUX__URL": f"http://127.0.0.1:{influx_port}",
        "PENCTL_STATE_DIR": str(state),
    }
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "penctl",
        "ingest",
        "--worker-id",
        "e2e",
        env=env,
        stderr=asyncio.subprocess.DEVNULL,
    )
    latencies: list[float] = []
    client = InfluxClient(InfluxSettings(url=f"http://127.0.0.1:{influx_port}"))

    async def poll() -> None:
        last = time.time_ns()
        while True:
            await asyncio.sleep(POLL_S)
            try:
                series = await client.query(
                    f'SELECT "depth_um" FROM "telemetry" WHERE time > {last}'
                )
            except (InfluxQueryError, InfluxUnavailable):  # the database may not exist yet
                continue
            now = time.time_ns()
            for s in series:
                for ts, _ in s.get("values", []):
                    latencies.append((now - int(ts)) / 1e6)
                    last = max(last, int(ts))

    try:
        await run_fleet(PENS, 0, seconds, mqtt_port=mqtt_port, observer=poll)
    finally:
        await client.aclose()
        worker.send_signal(signal.SIGTERM)
        await worker.wait()
    return latencies


def run(ctx: BenchContext) -> list[Row]:
    seconds = 10.0 if ctx.quick else 30.0
    with (
        tempfile.TemporaryDirectory(prefix="penctl-bench-e2e-") as tmp,
        ctx.progress.task("end-to-end latency", 1) as advance,
    ):
        mosquitto = start_mosquitto(Path(tmp) / "mosquitto")
        influxd = start_influxd(Path(tmp) / "influxd")
        try:
            latencies = asyncio.run(
                _measure(mosquitto.port, influxd.port, Path(tmp) / "ingest", seconds)
            )
        finally:
            mosquitto.stop()
            influxd.stop()
        advance(1)
    # The first seconds include the ingest worker's start; steady state is the figure.
    steady = latencies[len(latencies) // 5 :] or latencies
    cuts = statistics.quantiles(steady, n=100, method="inclusive") if len(steady) > 1 else steady
    common = {"pens": PENS, "points": len(steady), "poll_ms": POLL_S * 1000}
    return [
        Row("e2e latency p50", round(statistics.median(steady), 1), "ms", dict(common)),
        Row(
            "e2e latency p99",
            round(cuts[98] if len(cuts) > 98 else max(steady), 1),
            "ms",
            {**common, "target": TARGET_P99_MS, "higher_is_better": False},
        ),
    ]
