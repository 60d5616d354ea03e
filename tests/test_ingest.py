"""The ingest worker against a real Mosquitto and a real influxd.

Test messages are built with the schema models and published with aiomqtt, as
the controller's publisher does. Every wait polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from controller.influx import InfluxClient, InfluxSettings
from controller.ingest import IngestSettings, IngestWorker, load_ingest_settings
from controller.ingest.deadletters import DeadLetterStore
from controller.telemetry.schema import (
    DeviceStatus,
    EventRecord,
    TelemetryBatch,
    device_topic,
    dump,
)
from devtools.stack.processes import ServerProcess

ROOT = "pen/v1"
SAMPLES = 10  # per telemetry message
PERIOD_NS = 10_000_000  # 100 Hz


# --- helpers -------------------------------------------------------------------------


def make_settings(
    mosquitto: ServerProcess,
    influxd: ServerProcess,
    state_dir: Path,
    worker_id: str = "w1",
    **ingest: Any,
) -> IngestSettings:
    return load_ingest_settings(
        state_dir=state_dir,
        mqtt={"port": mosquitto.port, "topic_root": ROOT},
        influx={"url": f"http://127.0.0.1:{influxd.port}", "database": "pen"},
        ingest={"worker_id": worker_id, "stats_interval_s": 0.2, "backoff_max_s": 1.0, **ingest},
    )


def influx(server: ServerProcess) -> InfluxClient:
    return InfluxClient(InfluxSettings(url=f"http://127.0.0.1:{server.port}", database="pen"))


@contextlib.asynccontextmanager
async def running(worker: IngestWorker) -> AsyncIterator[asyncio.Task[None]]:
    """Run a worker in the background until the block ends; re-raise what it died of."""
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: _ready(worker, task), 20, "worker subscribed")
        yield task
    finally:
        worker.stop()
        await asyncio.wait_for(task, 20)


async def _ready(worker: IngestWorker, task: asyncio.Task[None]) -> bool:
    if task.done():
        task.result()
    return worker.ready.is_set()


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], within: float, what: str, every: float = 0.05
) -> None:
    """Poll `condition` (plain or async) until true; AssertionError after `within` s."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(every)


async def count(server: ServerProcess, measurement: str, field: str = "seq") -> int:
    async with influx(server) as client:
        try:
            return await client.count(measurement, field)
        except Exception:  # database not created yet, server restarting...
            return -1


async def await_count(
    server: ServerProcess, measurement: str, expected: int, within: float, field: str = "seq"
) -> None:
    """Poll COUNT until it is exactly `expected`; fail with the last count at the deadline."""
    last = -1

    async def reached() -> bool:
        nonlocal last
        last = await count(server, measurement, field)
        assert last <= expected, f"{measurement}: {last} points, more than {expected}"
        return last == expected

    try:
        await eventually(reached, within, f"{expected} points in {measurement}", every=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc} (last count {last})") from None


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes


def telemetry(clinic: str, device: str, seq: int, t0: int, session: str = "S-1") -> Message:
    rows = []
    for k in range(SAMPLES):
        n = seq * SAMPLES + k
        ts = t0 + n * PERIOD_NS
        rows.append([ts, n * 10, 800, 795, 120, 300 + k, 3650, 3900, n, 0x07])
    batch = TelemetryBatch(
        clinic=clinic, device=device, seq=seq, session=session, zone="forehead", samples=rows
    )
    return Message(device_topic(ROOT, clinic, device, "telemetry"), dump(batch))


def event(clinic: str, device: str, seq: int, t0: int, kind: Any, **kw: Any) -> Message:
    record = EventRecord(clinic=clinic, device=device, seq=seq, ts_ns=t0 + seq, kind=kind, **kw)
    return Message(device_topic(ROOT, clinic, device, "events"), dump(record))


def telemetry_stream(
    clinics: int, devices: int, batches: int, t0: int, first: int = 0
) -> list[Message]:
    """Interleaved across devices, as many pens streaming at once would be."""
    return [
        telemetry(f"c{c}", f"pen-{c}-{d}", seq, t0)
        for seq in range(first, first + batches)
        for c in range(clinics)
        for d in range(devices)
    ]


def session_events(clinic: str, device: str, t0: int, therapist: str) -> list[Message]:
    common = {"session": f"S-{device}", "therapist": therapist, "plan": "P-1"}
    return [
        event(clinic, device, 0, t0, "session_created", **common),
        event(clinic, device, 1, t0, "zone_selected", zone="cheeks", **common),
        event(
            clinic,
            device,
            2,
            t0,
            "depth_set",
            zone="cheeks",
            values={"depth_um": 1200, "limit_um": 1500},
            **common,
        ),
        event(
            clinic,
            device,
            3,
            t0,
            "pass_ended",
            zone="cheeks",
            values={
                "depth_um": 1190,
                "limit_um": 1500,
                "pass_no": 1,
                "strokes": 900,
                "cartridge": f"CART-{device}",
            },
            **common,
        ),
        event(
            clinic,
            device,
            4,
            t0,
            "refused",
            zone="cheeks",
            code="depth_over_limit",
            message="1.8 mm is deeper than the zone allows (1.5 mm)",
            values={"depth_um": 1800, "limit_um": 1500},
            **common,
        ),
        event(clinic, device, 5, t0, "session_report", values={"duration_s": 600}, **common),
    ]


async def publish(port: int, messages: list[Message], concurrency: int = 64) -> None:
    """QoS 1, each PUBACKed by the broker before this returns."""
    async with aiomqtt.Client(
        "127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5, max_inflight_messages=concurrency
    ) as client:
        client.pending_calls_threshold = concurrency + 1  # silence aiomqtt's warning
        for i in range(0, len(messages), concurrency):
            await asyncio.gather(
                *(client.publish(m.topic, m.payload, qos=1) for m in messages[i : i + concurrency])
            )


async def publish_steadily(port: int, messages: list[Message], per_second: float) -> None:
    """Mid-stream publishing: a fixed rate, so outages and kills land between messages."""
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        start = time.monotonic()
        for i, m in enumerate(messages):
            await client.publish(m.topic, m.payload, qos=1)
            delay = start + (i + 1) / per_second - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)


def now_t0() -> int:
    return (time.time_ns() // 1_000_000_000 - 3600) * 1_000_000_000


# --- tests ---------------------------------------------------------------------------


async def test_exact_counts_land_and_dashboards_can_query(
    mosquitto: ServerProcess, influxd: ServerProcess, tmp_path: Path
) -> None:
    t0 = now_t0()
    stream = telemetry_stream(clinics=3, devices=2, batches=20, t0=t0)  # 120 msgs, 1200 samples
    events = [
        m
        for c in range(3)
        for d in range(2)
        for m in session_events(f"c{c}", f"pen-{c}-{d}", t0, therapist=f"T-{d}")
    ]
    statuses = [
        Message(
            device_topic(ROOT, "c0", f"pen-0-{d}", "status"),
            dump(
                DeviceStatus(
                    clinic="c0",
                    device=f"pen-0-{d}",
                    ts_ns=t0,
                    online=True,
                    state="idle",
                    link={"rtt_ms": 2.5},
                )
            ),
        )
        for d in range(2)
    ]
    worker = IngestWorker(make_settings(mosquitto, influxd, tmp_path / "state"))
    async with running(worker):
        await publish(mosquitto.port, stream + events + statuses)
        await await_count(influxd, "telemetry", 1200, 30, field="depth_um")
        await await_count(influxd, "telemetry_batches", 120, 10)
        await await_count(influxd, "events", 36, 10)
        await await_count(influxd, "device_status", 2, 10, field="state")
        await eventually(
            lambda: worker.counters.acked == len(stream + events + statuses),
            10,
            "all acknowledged",
        )
        stats = await read_stats(mosquitto.port, worker.stats_topic, lambda s: s["acked"] >= 158)

    assert worker.counters.messages == 158  # no redelivery in a clean run
    # telemetry + batches + events + sessions + zones + safety + cartridges + status
    assert worker.counters.points_written == 1200 + 120 + 36 + 12 + 24 + 6 + 6 + 2
    assert worker.counters.dead_letters == 0
    assert worker.counters.batches >= 1
    lag = worker.counters.lag_s()
    assert lag is not None
    assert 3000 < lag < 4000
    assert stats["worker"] == "w1"
    assert stats["online"] is True

    assert await count(influxd, "sessions") == 12
    assert await count(influxd, "zones") == 24
    assert await count(influxd, "safety") == 6
    assert await count(influxd, "cartridges", "cartridge") == 6
    async with influx(influxd) as client:
        # The clinic-dashboard questions of product.md §1, answered in InfluxQL.
        per_therapist = await client.query(
            "SELECT COUNT(\"session\") FROM sessions WHERE kind = 'session_created' "
            "GROUP BY therapist"
        )
        assert {s["tags"]["therapist"]: s["values"][0][1] for s in per_therapist} == {
            "T-0": 3,
            "T-1": 3,
        }
        depth = await client.query(
            "SELECT MAX(depth_ratio) FROM zones WHERE kind = 'pass_ended' GROUP BY zone"
        )
        assert depth[0]["tags"]["zone"] == "cheeks"
        assert depth[0]["values"][0][1] == pytest.approx(1190 / 1500)
        refusals = await client.query("SELECT COUNT(seq) FROM safety GROUP BY code")
        assert refusals[0]["tags"]["code"] == "depth_over_limit"
        cartridges = await client.query('SELECT COUNT(DISTINCT("cartridge")) FROM cartridges')
        assert cartridges[0]["values"][0][1] == 6
        health = await client.query(
            "SELECT MEAN(current_ma), MAX(temperature_c) FROM telemetry GROUP BY device"
        )
        assert len(health) == 6
        # Session and zone are fields on telemetry: series stay per device, not per session.
        series = await client.query("SHOW SERIES FROM telemetry")
        assert len(series[0]["values"]) == 6


async def read_stats(
    port: int, topic: str, until: Callable[[dict[str, Any]], bool], within: float = 10
) -> dict[str, Any]:
    """The worker's retained stats message once it satisfies `until`."""
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(within):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                if message.payload:
                    stats: dict[str, Any] = json.loads(message.payload)
                    if until(stats):
                        return stats
    raise AssertionError("unreachable")


async def test_redelivery_does_not_duplicate(
    mosquitto: ServerProcess, influxd: ServerProcess, tmp_path: Path
) -> None:
    t0 = now_t0()
    stream = telemetry_stream(clinics=2, devices=2, batches=15, t0=t0)  # 60 msgs, 600 samples

    # 1. The broker's own redelivery: a worker that writes but never acknowledges...
    class ForgetfulWorker(IngestWorker):
        def _new_client(self, *, clean: bool = False) -> Any:
            client, _ack, overflow = super()._new_client(clean=clean)
            return client, lambda message: None, overflow

    settings = make_settings(mosquitto, influxd, tmp_path / "state")
    forgetful = ForgetfulWorker(settings)
    async with running(forgetful):
        await publish(mosquitto.port, stream)
        await await_count(influxd, "telemetry", 600, 30, field="depth_um")
    assert forgetful.counters.messages == 60
    # ...is replaced by one with the same id: the broker redelivers the unacknowledged
    # messages of the durable session, and they overwrite the same points.
    worker = IngestWorker(settings)
    async with running(worker):
        await eventually(lambda: worker.counters.acked >= 60, 20, "redelivered and acked")
        # 2. A publisher that sends everything again (a crash between PUBACK and delete).
        await publish(mosquitto.port, stream)
        await eventually(lambda: worker.counters.acked >= 120, 20, "republished and acked")
    assert worker.counters.messages == 120
    assert worker.counters.points_written == 2 * (600 + 60)
    assert await count(influxd, "telemetry", "depth_um") == 600
    assert await count(influxd, "telemetry_batches") == 60


@pytest.mark.parametrize(
    "outage_s", [pytest.param(3.0, id="3s"), pytest.param(30.0, id="30s", marks=pytest.mark.slow)]
)
async def test_influx_outage_mid_stream_loses_and_duplicates_nothing(
    mosquitto: ServerProcess, influxd: ServerProcess, tmp_path: Path, outage_s: float
) -> None:
    t0 = now_t0()
    rate = 50.0  # messages per second: 500 samples/s across 4 pens
    total_s = outage_s + 4
    batches = int(rate * total_s / 4)
    stream = telemetry_stream(clinics=2, devices=2, batches=batches, t0=t0)
    expected = len(stream) * SAMPLES
    worker = IngestWorker(make_settings(mosquitto, influxd, tmp_path / "state", batch_seconds=0.1))
    async with running(worker):
        publisher = asyncio.create_task(publish_steadily(mosquitto.port, stream, rate))
        await eventually(lambda: worker.counters.batches >= 5, 10, "ingest under way")
        influxd.stop()
        await asyncio.sleep(0.5)  # let a write or two run into the closed port
        acked_at_outage = worker.counters.acked
        await asyncio.sleep(outage_s - 0.5)
        assert worker.counters.acked == acked_at_outage, "acknowledged during the outage"
        assert worker.counters.write_retries > 0
        influxd.start_again()
        await publisher
        await await_count(influxd, "telemetry", expected, 60, field="depth_um")
        await await_count(influxd, "telemetry_batches", len(stream), 10)
        await eventually(lambda: worker.counters.acked == len(stream), 10, "all acked")
    assert worker.counters.dead_letters == 0
    assert worker.counters.messages == len(stream)  # nothing redelivered, nothing missing


async def test_unwritten_messages_stay_unacknowledged_at_the_broker(
    mosquitto: ServerProcess, influxd: ServerProcess, tmp_path: Path
) -> None:
    """Received while InfluxDB is down, then the worker goes away: the broker still has them."""
    t0 = now_t0()
    stream = telemetry_stream(clinics=1, devices=2, batches=30, t0=t0)  # 60 msgs
    settings = make_settings(mosquitto, influxd, tmp_path / "state")
    influxd.stop()
    first = IngestWorker(settings)
    async with running(first):
        await publish(mosquitto.port, stream)
        await eventually(lambda: first.counters.messages == len(stream), 20, "all received")
        await eventually(lambda: first.counters.write_retries >= 2, 20, "retrying")
    assert first.counters.acked == 0
    influxd.start_again()
    second = IngestWorker(settings)  # same worker id: same durable session
    async with running(second):
        await await_count(influxd, "telemetry", len(stream) * SAMPLES, 30, field="depth_um")
        await eventually(lambda: second.counters.acked == len(stream), 10, "all acked")
    assert second.counters.messages == len(stream)  # every one of them came back


async def test_memory_stays_bounded_when_the_broker_floods(
    mosquitto: ServerProcess, influxd: ServerProcess, tmp_path: Path
) -> None:
    """A backlog meets a small buffer; nothing is lost and memory stays bounded.

    Mosquitto 2.0.11 honours the worker's Receive Maximum only until the first
    acknowledgements, then sends the whole backlog at once (measured; docs/MQTT.md).
    The worker drops what its buffer cannot hold, unacknowledged, and reconnects so
    that the broker sends those again.
    """
    t0 = now_t0()
    stream = telemetry_stream(clinics=2, devices=4, batches=150, t0=t0)  # 1200 msgs
    settings = make_settings(
        mosquitto,
        influxd,
        tmp_path / "state",
        receive_maximum=50,
        batch_messages=50,
        max_buffered=100,
    )
    async with running(IngestWorker(settings)):
        pass  # the durable session exists; now a backlog builds up while we are away
    await publish(mosquitto.port, stream)
    worker = IngestWorker(settings)
    async with running(worker):
        await await_count(influxd, "telemetry_batches", len(stream), 60)
        await await_count(influxd, "telemetry", len(stream) * SAMPLES, 10, field="depth_um")
    # Buffer bound: aiomqtt's queue (max_buffered) + the hand-over queue + one in hand.
    assert worker.counters.buffered_peak <= 100 + 50 + 1
    assert worker.counters.dead_letters == 0
    if worker.counters.overflow_drops:  # the broker flooded us (Mosquitto 2.0.11 does)
        assert worker.counters.resyncs > 0


def penctl(config: Path, log: Path) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).with_name("penctl")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "penctl"]
    with log.open("ab") as out:
        return subprocess.Popen(
            [*argv, "ingest", "--config", str(config), "--log-format", "json"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def write_config(
    path: Path, mosquitto: ServerProcess, influxd: ServerProcess, **ingest: Any
) -> Path:
    items = "\n".join(f"{k} = {json.dumps(v)}" for k, v in ingest.items())
    path.write_text(
        f'state_dir = "{path.parent / "state"}"\n'
        f"[mqtt]\nport = {mosquitto.port}\n"
        f'[influx]\nurl = "http://127.0.0.1:{influxd.port}"\n'
        f"[ingest]\n{items}\n"
    )
    return path


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def test_killed_worker_restarts_and_loses_nothing(
    mosquitto: ServerProcess, influxd: ServerProcess, tmp_path: Path
) -> None:
    t0 = now_t0()
    stream = telemetry_stream(clinics=2, devices=2, batches=60, t0=t0)  # 240 msgs over ~4 s
    # At the kill the worker holds received messages it has not written, which a worker
    # acknowledging on receipt would lose. InfluxDB is stopped first so that the
    # worker's acknowledged count is frozen when it is read (a quiet stream is written
    # at once, so a stats message read a moment before the kill could be stale).
    config = write_config(
        tmp_path / "ingest.toml",
        mosquitto,
        influxd,
        worker_id="k1",
        batch_seconds=1.0,
        stats_interval_s=0.1,
    )
    log = tmp_path / "ingest.log"
    stats_topic = f"{ROOT}/_ingest/ingest/k1/stats"
    with reaped(penctl(config, log)) as first:
        await read_stats(mosquitto.port, stats_topic, lambda s: s["online"], within=30)
        publisher = asyncio.create_task(publish_steadily(mosquitto.port, stream, 60))
        await read_stats(mosquitto.port, stats_topic, lambda s: s["online"] and s["batches"] >= 1)
        await asyncio.to_thread(influxd.stop)
        before = await read_stats(
            mosquitto.port,
            stats_topic,
            lambda s: s["online"] and s["write_retries"] >= 1 and s["messages"] > s["acked"],
        )
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    assert before["messages"] > before["acked"]  # something was in flight
    await asyncio.to_thread(influxd.start_again)
    with reaped(penctl(config, log)) as second:
        await publisher
        await await_count(influxd, "telemetry", len(stream) * SAMPLES, 60, field="depth_um")
        await await_count(influxd, "telemetry_batches", len(stream), 10)
        # The second life gets the first one's unacknowledged messages again. Not
        # "once InfluxDB holds everything": a write that InfluxDB answered 500 while
        # shutting down can have landed, so the count can be complete while the
        # broker's redelivery of that batch is still on its way (a time-out here).
        after = await read_stats(
            mosquitto.port,
            stats_topic,
            lambda s: (
                s["online"]
                and s["acked"] == s["messages"]
                and before["acked"] + s["messages"] >= len(stream)
            ),
        )
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0
    assert after["dead_letters"] == 0


async def test_two_workers_share_the_subscription(
    mosquitto: ServerProcess, influxd: ServerProcess, tmp_path: Path
) -> None:
    t0 = now_t0()
    stream = telemetry_stream(clinics=3, devices=3, batches=20, t0=t0)  # 180 msgs
    one = IngestWorker(make_settings(mosquitto, influxd, tmp_path / "a", worker_id="a"))
    two = IngestWorker(make_settings(mosquitto, influxd, tmp_path / "b", worker_id="b"))
    async with running(one), running(two):
        await publish(mosquitto.port, stream)
        await await_count(influxd, "telemetry", len(stream) * SAMPLES, 30, field="depth_um")
        await eventually(
            lambda: one.counters.acked + two.counters.acked == len(stream),
            10,
            "all acked",
        )
    assert one.counters.messages > 0
    assert two.counters.messages > 0
    # Each message went to exactly one worker.
    assert one.counters.messages + two.counters.messages == len(stream)
    assert await count(influxd, "telemetry_batches") == len(stream)


async def test_malformed_payloads_are_dead_lettered_and_the_rest_lands(
    mosquitto: ServerProcess, influxd: ServerProcess, tmp_path: Path
) -> None:
    t0 = now_t0()
    good = telemetry_stream(clinics=1, devices=2, batches=10, t0=t0)  # 20 msgs, 200 samples
    overflow = TelemetryBatch(
        clinic="c0",
        device="pen-x",
        seq=0,
        samples=[
            [t0 + k * PERIOD_NS, k, 800, 2**63 if k == 3 else 795, 0, 0, 0, 0, 0, 0]
            for k in range(SAMPLES)
        ],
    )  # valid JSON and schema, but InfluxDB refuses one point (int64 overflow)
    bad = [
        Message(device_topic(ROOT, "c0", "pen-0-0", "telemetry"), b"{definitely not json"),
        Message(device_topic(ROOT, "c0", "pen-0-0", "telemetry"), b'{"clinic":"c0"}'),
        Message(device_topic(ROOT, "c0", "pen-0-0", "events"), dump(overflow)),
        Message(
            device_topic(ROOT, "c0", "pen-0-1", "telemetry"),
            telemetry("c0", "pen-9", 0, t0).payload,
        ),
        Message(device_topic(ROOT, "c0", "pen-x", "telemetry"), dump(overflow)),
    ]
    mixed = [*good[:7], *bad, *good[7:]]
    worker = IngestWorker(make_settings(mosquitto, influxd, tmp_path / "state"))
    async with running(worker) as task:
        await publish(mosquitto.port, mixed, concurrency=1)
        await eventually(lambda: worker.counters.acked == len(mixed), 20, "all acked")
        assert not task.done()  # never a crash
    # The good messages all land, and the 9 good samples of the overflowing batch too.
    assert await count(influxd, "telemetry", "depth_um") == 200 + 9
    assert worker.counters.malformed == 4
    assert worker.counters.rejected_points == 1
    assert worker.counters.dead_letters == 5
    assert worker.counters.by_reason == {
        "bad_json": 1,
        "schema": 2,
        "topic_mismatch": 1,
        "rejected": 1,
    }
    with DeadLetterStore(worker.dead_letter_path, "reader") as store:
        letters = store.all()
    assert sorted(reason for _, reason, _, _, _ in letters) == sorted(
        ["bad_json", "schema", "schema", "topic_mismatch", "rejected"]
    )
    rejected = next(letter for letter in letters if letter[1] == "rejected")
    assert rejected[0].endswith("/pen-x/telemetry")
    assert str(2**63) in rejected[2]  # the refused line is kept with InfluxDB's answer


async def test_broker_restart_resubscribes(
    mosquitto: ServerProcess, influxd: ServerProcess, tmp_path: Path
) -> None:
    """Mosquitto 2.0.11 forgets a durable client's $share subscription on restart."""
    t0 = now_t0()
    worker = IngestWorker(make_settings(mosquitto, influxd, tmp_path / "state"))
    async with running(worker):
        await publish(mosquitto.port, telemetry_stream(1, 1, 5, t0))
        await await_count(influxd, "telemetry_batches", 5, 20)
        mosquitto.stop()
        mosquitto.start_again()
        await eventually(
            lambda: worker.counters.connects >= 2 and worker.ready.is_set(),
            20,
            "reconnected and subscribed",
        )
        await publish(mosquitto.port, telemetry_stream(1, 1, 5, t0, first=5))
        await await_count(influxd, "telemetry_batches", 10, 20)


async def test_retired_worker_leaves_the_group(
    mosquitto: ServerProcess, influxd: ServerProcess, tmp_path: Path
) -> None:
    """A retired member gets no share of later messages (offline members otherwise do)."""
    t0 = now_t0()
    stay = IngestWorker(make_settings(mosquitto, influxd, tmp_path / "a", worker_id="a"))
    leave = IngestWorker(make_settings(mosquitto, influxd, tmp_path / "b", worker_id="b"))
    async with running(stay):
        async with running(leave):
            pass  # joined the group with a durable session, then went offline
        await leave.retire(idle_s=0.5)
        stream = telemetry_stream(2, 2, 10, t0)
        await publish(mosquitto.port, stream)
        await await_count(influxd, "telemetry_batches", len(stream), 20)
    assert stay.counters.messages == len(stream)
