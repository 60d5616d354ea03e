"""The publisher against a real broker: ordered, numbered, nothing lost across a broker crash."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from controller.config import MqttSettings
from controller.telemetry.outbox import NewMessage, Outbox
from controller.telemetry.publisher import MAX_BUNDLE_BYTES, TelemetryPublisher
from controller.telemetry.schema import TelemetryBatch, TelemetryBundle, device_topic, dump
from devtools.stack.processes import ServerProcess
from firmware_protocol.messages import Telemetry


class Collector:
    """A durable QoS 1 subscriber that reconnects, keeping every payload it gets."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.subscribed = asyncio.Event()
        self.changed = asyncio.Event()

    async def run(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    self.port,
                    identifier="test-collector",
                    protocol=aiomqtt.ProtocolVersion.V5,
                    clean_start=False,
                    properties=props,
                ) as client:
                    await client.subscribe("pen/v1/#", qos=1)
                    self.subscribed.set()
                    async for message in client.messages:
                        payload = bytes(message.payload)  # type: ignore[arg-type]
                        self.messages.append((str(message.topic), json.loads(payload)))
                        self.changed.set()
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)

    async def wait_for(self, predicate: Any, within: float = 30.0) -> None:
        async with asyncio.timeout(within):
            while not predicate(self.messages):
                self.changed.clear()
                await self.changed.wait()


def _telemetry(i: int) -> Telemetry:
    return Telemetry(i, 500, 500 + i % 3, 100, 300, 3600, 3900, i * 2, 3, 1)


@contextlib.asynccontextmanager
async def _running(*coros: Any) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _batches(messages: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The telemetry batches received, taken out of the controller's bundles."""
    out = []
    for topic, payload in messages:
        if topic.endswith("/telemetry"):
            assert "/controller/ctl/" in topic, "telemetry is published in bundles"
            out.extend(payload["batches"])
    return out


def _unique_samples(messages: list[tuple[str, dict[str, Any]]]) -> set[tuple[int, ...]]:
    """Every sample once: a redelivered batch repeats rows, never adds new ones."""
    return {tuple(r) for b in _batches(messages) for r in b["samples"]}


def _seqs(messages: list[tuple[str, dict[str, Any]]], stream: str) -> list[int]:
    if stream == "telemetry":
        return sorted({b["seq"] for b in _batches(messages)})
    return sorted({m["seq"] for t, m in messages if t.endswith("/" + stream)})


async def _wait_persisted(workdir: Path) -> None:
    """Mosquitto autosaves every second; wait until the durable subscription is on disk,
    so that even a SIGKILLed broker comes back knowing the collector."""
    db = workdir / "mosquitto.db"
    async with asyncio.timeout(10):
        while not db.exists():  # noqa: ASYNC110 - another process writes it
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("broker_crash", [False, True])
async def test_publish_survives_broker_crash(
    mosquitto: ServerProcess, tmp_path: Path, broker_crash: bool
) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    settings = MqttSettings(port=mosquitto.port)
    pub = TelemetryPublisher(
        settings, outbox, clinic_id="c1", controller_id="ctl", batch_interval=0.02
    )
    collector = Collector(mosquitto.port)
    async with _running(collector.run(), pub.run()):
        async with asyncio.timeout(10):
            await collector.subscribed.wait()
            await pub.connected.wait()
        await _wait_persisted(mosquitto.workdir)
        for i in range(300):
            pub.add_sample("SIM-0001", _telemetry(i), session="s1", zone="cheeks")
        pub.add_event("SIM-0001", "pass_started", session="s1", zone="cheeks")
        await collector.wait_for(lambda m: len(_seqs(m, "events")) == 1)
        if broker_crash:
            mosquitto.kill()
        else:
            mosquitto.stop()
        for i in range(300, 600):
            pub.add_sample("SIM-0001", _telemetry(i), session="s1", zone="cheeks")
        pub.add_event("SIM-0001", "pass_ended", session="s1", zone="cheeks", values={"strokes": 7})
        pub.flush()
        assert outbox.counters.depth > 0  # held on disk while the broker is down
        mosquitto.start_again()
        await collector.wait_for(lambda m: len(_seqs(m, "events")) == 2)
        await collector.wait_for(lambda m: len(_unique_samples(m)) >= 600)
    seqs = _seqs(collector.messages, "telemetry")
    assert seqs == list(range(len(seqs)))  # gapless stream numbers
    unique = _unique_samples(collector.messages)
    assert len(unique) == 600  # every sample once (a redelivery may repeat a batch)
    assert sorted(r[1] for r in unique) == list(range(600))
    assert _seqs(collector.messages, "events") == [0, 1]
    assert pub.counters.connects >= 2


async def test_messages_nobody_subscribed_to_stay_in_the_outbox(
    mosquitto: ServerProcess, tmp_path: Path
) -> None:
    """Mosquitto answers 0x10 "no matching subscribers" when no consumer holds a
    subscription (as right after a broker restart): such messages are kept and sent
    again once someone subscribes."""
    outbox = Outbox(tmp_path / "outbox.db")
    pub = TelemetryPublisher(
        MqttSettings(port=mosquitto.port),
        outbox,
        clinic_id="c1",
        controller_id="ctl",
        batch_interval=0.02,
    )
    collector = Collector(mosquitto.port)
    async with _running(pub.run()):
        for i in range(3):
            pub.add_event("SIM-0001", "pass_ended", session="s1", values={"number": i})
        async with asyncio.timeout(10):
            while pub.counters.undelivered == 0:  # noqa: ASYNC110 - a counter, no event
                await asyncio.sleep(0.01)
        assert outbox.counters.depth == 3  # nothing acknowledged away
        async with _running(collector.run()):
            await collector.wait_for(lambda m: _seqs(m, "events") == [0, 1, 2])
            async with asyncio.timeout(10):
                while outbox.counters.depth:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
    assert pub.counters.published >= 3


def test_telemetry_rows_go_out_as_one_bundle_per_clinic(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    pub = TelemetryPublisher(MqttSettings(), outbox, clinic_id="c1", controller_id="ctl")
    for device in ("SIM-0001", "SIM-0002"):
        pub.add_sample(device, _telemetry(1))
    pub.flush()
    pub.add_event("SIM-0001", "pass_started")
    pub.add_sample("SIM-0001", _telemetry(2))
    pub.flush()
    # A batch another clinic's controller left in this outbox (a clinic id changed).
    other = TelemetryBatch(clinic="c2", device="SIM-0009", seq=0, samples=[[1] * 10])
    outbox.put(NewMessage(device_topic("pen/v1", "c2", "SIM-0009", "telemetry"), dump(other)))
    rows = outbox.pending(100)
    publications = pub._publications(rows)
    assert [p.topic for p in publications] == [
        "pen/v1/c1/controller/ctl/telemetry",
        "pen/v1/c1/device/SIM-0001/events",
        "pen/v1/c2/controller/ctl/telemetry",
    ]
    first = TelemetryBundle.model_validate_json(publications[0].payload)
    assert [(b.device, b.seq) for b in first.batches] == [
        ("SIM-0001", 0),
        ("SIM-0002", 0),
        ("SIM-0001", 1),
    ]
    assert sorted(r.id for p in publications for r in p.rows) == [r.id for r in rows]
    assert TelemetryBundle.model_validate_json(publications[2].payload).batches == [other]


def test_a_bundle_is_split_at_its_size_limit(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    pub = TelemetryPublisher(
        MqttSettings(), outbox, clinic_id="c1", controller_id="ctl", max_batch=3000
    )
    for i in range(6000):  # two batches of 3000 samples, ~180 KiB each
        pub.add_sample("SIM-0001", _telemetry(i))
    publications = pub._publications(outbox.pending(100))
    assert [len(p.rows) for p in publications] == [1, 1]
    assert all(len(p.payload) <= MAX_BUNDLE_BYTES for p in publications)
