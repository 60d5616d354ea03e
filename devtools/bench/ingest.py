"""Ingest throughput: points per second through MQTT into InfluxDB, against direct writes.

Both figures are measured in one run against the same influxd (fresh databases):

* direct: the lines ingest writes for the same samples (one ``telemetry`` point
  per sample, one ``telemetry_batches`` point per pen-batch) written with
  ``/write`` in batches of ingest's default size, by 1, 2 and 4 concurrent
  writers (InfluxDB takes more in parallel: product.md §10 asks for the ratio
  to the best of them);
* through MQTT: the same samples as the controller publishes them (one
  TelemetryBatch per pen per 100 ms, the 32 pens' batches of each 100 ms in one
  TelemetryBundle), queued at a real mosquitto for a durable ingest session,
  then ``penctl ingest`` (its own process) started and timed from its first
  written batch until InfluxDB holds every point.

Both rates count telemetry samples per second; the figures are their ratios:
``ingest ratio`` against one sequential writer, ``ingest ratio (best direct)``
against the best of 1, 2 and 4 writers in the same round.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from statistics import median

import aiomqtt

from controller.influx import InfluxClient, InfluxSettings
from controller.ingest.points import telemetry_lines
from controller.ingest.settings import IngestSection
from controller.telemetry.schema import (
    TelemetryBatch,
    TelemetryBundle,
    controller_telemetry_topic,
    dump,
)
from devtools.stack.processes import ServerProcess, start_influxd, start_mosquitto

from .framework import BenchContext, Row

DESCRIPTION = "ingest: points/s through MQTT into InfluxDB, as a ratio of direct writes"
TARGET_RATIO = 0.8
DIRECT_WRITERS = (1, 2, 4)
PENS = 32
SAMPLES_PER_BATCH = 10  # 100 ms of a pen at 100 Hz: what the publisher sends
WRITE_LINES = IngestSection().batch_points  # the direct writer's batches are ingest's
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


async def _direct(
    influxd: ServerProcess, batches: list[TelemetryBatch], database: str, writers: int
) -> float:
    # Exactly the lines ingest writes for these batches (a telemetry_batches point
    # per batch too), counted, like the MQTT path, in telemetry samples.
    lines = [line for b in batches for line in telemetry_lines(b)]
    samples = sum(len(b.samples) for b in batches)
    settings = InfluxSettings(url=f"http://127.0.0.1:{influxd.port}", database=database)
    async with InfluxClient(settings) as client:
        await client.create_database()
        # Timed, like the MQTT path, from the first accepted write to the last.
        await client.write(lines[:WRITE_LINES])
        chunks = iter(range(WRITE_LINES, len(lines), WRITE_LINES))

        async def writer() -> None:
            for i in chunks:  # shared: each chunk is taken by one writer
                await client.write(lines[i : i + WRITE_LINES])

        started = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(writers)))
        rate = (len(lines) - WRITE_LINES) / (time.perf_counter() - started)
        await _drop(client, database)
        return rate * samples / len(lines)


async def _drop(client: InfluxClient, database: str) -> None:
    """Drop a measured database, so that InfluxDB does not compact it during the next
    measurement: every measurement starts with the same idle server."""
    await client.query(f'DROP DATABASE "{database}"', method="POST")


def _bundles(batches: list[TelemetryBatch], pens: int) -> list[bytes]:
    """What the controller's publisher makes of one flush of every pen: one bundle."""
    return [
        dump(TelemetryBundle(clinic="bench", controller="bench", batches=batches[i : i + pens]))
        for i in range(0, len(batches), pens)
    ]


async def _through_mqtt(
    mosquitto: ServerProcess,
    influxd: ServerProcess,
    batches: list[TelemetryBatch],
    state: Path,
    name: str,
) -> float:
    """Samples/s through a fresh worker ``name`` into a fresh database ``name``."""
    samples = sum(len(b.samples) for b in batches)
    lines = samples + len(batches)  # a telemetry_batches point per batch
    env = {
        **os.environ,
        "PENCTL_MQTT__PORT": str(mosquitto.port),
        "PENCTL_INFLUX__URL": f"http://127.0.0.1:{influxd.port}",
        "PENCTL_INFLUX__DATABASE": name,
        # Its own group: the durable session of an earlier round's worker would
        # otherwise keep getting a share of the messages.
        "PENCTL_INGEST__GROUP": name,
        "PENCTL_STATE_DIR": str(state),
        # The worker's own "points written" counter, published every 50 ms, times
        # the run: polling InfluxDB instead cost the writes being timed ~5%.
        "PENCTL_INGEST__STATS_INTERVAL_S": "0.05",
    }
    profile = os.environ.get("PENCTL_BENCH_PROFILE")  # a path: cProfile the worker into it
    prefix = ["-m", "cProfile", "-o", profile] if profile else []
    cmd = [sys.executable, *prefix, "-m", "penctl", "ingest", "--worker-id", name]
    stats_topic = f"{ROOT}/_ingest/ingest/{name}/stats"
    async with aiomqtt.Client(
        "127.0.0.1", mosquitto.port, protocol=aiomqtt.ProtocolVersion.V5
    ) as mqtt:
        await mqtt.subscribe(stats_topic, qos=1)
        stats = _stats(mqtt)
        # 1. A first run creates the durable shared subscription, then leaves.
        worker = await asyncio.create_subprocess_exec(*cmd, env=env, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(30):
            async for _ in stats:  # the worker announces itself once subscribed
                break
        worker.send_signal(signal.SIGTERM)
        await worker.wait()
        # 2. Queue every message at the broker while no worker runs.
        topic = controller_telemetry_topic(ROOT, "bench", "bench")
        for bundle in _bundles(batches, PENS):
            await mqtt.publish(topic, bundle, qos=1)
        # 3. Start the worker; time it from its first written batch to the last point,
        #    so that Python's start-up and the connection are not counted.
        worker = await asyncio.create_subprocess_exec(
            *cmd, env=env, stderr=asyncio.subprocess.DEVNULL
        )
        try:
            # Timed from the first write InfluxDB accepted to the last, with the
            # worker's own (points written, when) pairs: exact whenever the stats
            # message itself is late, and Python's start-up is not counted.
            first: tuple[int, int] | None = None
            async with asyncio.timeout(120):
                async for written, at_ns in stats:
                    if written and first is None:
                        first = (written, at_ns)
                    if written >= lines:
                        break
            assert first is not None
            rate = (written - first[0]) / ((at_ns - first[1]) / 1e9)
        finally:
            worker.send_signal(signal.SIGTERM)
            await worker.wait()
    settings = InfluxSettings(url=f"http://127.0.0.1:{influxd.port}", database=name)
    async with InfluxClient(settings) as client:
        landed = await client.count("telemetry", "depth_um")
        await _drop(client, name)
    if landed != samples:
        raise RuntimeError(f"ingest wrote {landed} of {samples} samples")
    return rate * samples / lines  # lines also count telemetry_batches points


async def _stats(mqtt: aiomqtt.Client) -> AsyncIterator[tuple[int, int]]:
    """(points written, when the last write was accepted) of each online stats message."""
    async for message in mqtt.messages:
        stats = json.loads(bytes(message.payload))
        if stats.get("online"):
            yield int(stats["points_written"]), int(stats["written_at_ns"])


def run(ctx: BenchContext) -> list[Row]:
    seconds = 30 if ctx.quick else 60  # of 32 pens at 100 Hz: 192,000 points
    rounds = 1 if ctx.quick else 5  # each a direct write, then the same through MQTT
    batches = _batches(PENS, seconds)
    points = sum(len(b.samples) for b in batches)
    direct: dict[int, list[float]] = {n: [] for n in DIRECT_WRITERS}
    via: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="penctl-bench-ingest-") as tmp,
        ctx.progress.task(
            "ingest: direct and through MQTT", (len(DIRECT_WRITERS) + 1) * rounds
        ) as advance,
    ):
        mosquitto = start_mosquitto(Path(tmp) / "mosquitto")
        influxd = start_influxd(Path(tmp) / "influxd")
        try:
            for r in range(rounds):
                # Each round in another order: no way of writing always comes second.
                order: list[int | None] = [*DIRECT_WRITERS, None]
                for n in order[r % len(order) :] + order[: r % len(order)]:
                    if n is None:
                        state = Path(tmp) / "ingest"
                        via.append(
                            asyncio.run(
                                _through_mqtt(mosquitto, influxd, batches, state, f"mqtt{r}")
                            )
                        )
                    else:
                        direct[n].append(
                            asyncio.run(_direct(influxd, batches, f"direct{r}w{n}", writers=n))
                        )
                    advance(1)
        finally:
            mosquitto.stop()
            influxd.stop()
    sequential = direct[1]
    best = [max(direct[n][r] for n in DIRECT_WRITERS) for r in range(rounds)]
    best_writers = [max((direct[n][r], n) for n in DIRECT_WRITERS)[1] for r in range(rounds)]
    ratios = [v / d for v, d in zip(via, sequential, strict=True)]
    best_ratios = [v / d for v, d in zip(via, best, strict=True)]
    common = {
        "points": points,
        "messages": len(batches) // PENS,
        "samples_per_message": SAMPLES_PER_BATCH * PENS,
        "runs": rounds,
    }

    def spread(values: list[float]) -> dict[str, float]:
        return {"best": max(values), "worst": min(values)}

    writers = {f"{n} writers": round(median(direct[n])) for n in DIRECT_WRITERS}
    return [
        Row(
            "direct write",
            round(median(sequential)),
            "points/s",
            {**common, **spread(sequential), "writers": 1},
        ),
        *(
            Row(
                f"direct write, {n} concurrent writers",
                round(median(direct[n])),
                "points/s",
                {**common, **spread(direct[n]), "writers": n},
            )
            for n in DIRECT_WRITERS
            if n > 1
        ),
        Row(
            "direct write, best of 1/2/4 writers",
            round(median(best)),
            "points/s",
            {**common, **spread(best), "best_writers": best_writers, **writers},
        ),
        Row("through MQTT + ingest", round(median(via)), "points/s", {**common, **spread(via)}),
        Row(
            "ingest ratio",
            round(median(ratios), 3),
            "ratio",
            {
                **common,
                **spread(ratios),
                "ratios": [round(x, 3) for x in ratios],
                "against": "one sequential writer",
            },
        ),
        Row(
            "ingest ratio (best direct)",
            round(median(best_ratios), 3),
            "ratio",
            {
                **common,
                **spread(best_ratios),
                "ratios": [round(x, 3) for x in best_ratios],
                "against": "the best of 1, 2 and 4 concurrent direct writers, each round",
                "target": TARGET_RATIO,
                "higher_is_better": True,
            },
        ),
    ]
