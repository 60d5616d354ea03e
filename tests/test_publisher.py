"""The publisher against a real broker: bundled, numbered, kept until acknowledged end to end.

``Acker`` stands in for ingest's side of the protocol (docs/MQTT.md) with a plain
MQTT client, so these tests can decide what gets acknowledged and when; the
pipeline tests (tests/test_pipeline_e2e.py, tests/reliability/) use the real worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from controller.config import MqttSettings
from controller.ingest.worker import cancel_and_wait
from controller.telemetry.events import Pseudonymizer
from controller.telemetry.outbox import Outbox
from controller.telemetry.publisher import MAX_BUNDLE_SAMPLES, TelemetryPublisher
from controller.telemetry.schema import Ack, AckRange, TelemetryBundle, dump
from devtools.stack.processes import ServerProcess

from .telemetry_helpers import telemetry

KEY = "k" * 32


def publisher(tmp_path: Path, port: int = 1883, **mqtt: Any) -> TelemetryPublisher:
    settings = MqttSettings(port=port, batch_interval_s=0.02, **mqtt)
    return TelemetryPublisher(
        settings,
        Outbox(tmp_path / "outbox.db"),
        clinic_id="c1",
        controller_id="ctl",
        pseudonymize=Pseudonymizer(KEY),
    )


class Acker:
    """A plain subscriber that records every message and acknowledges what ``accept`` lets
    through, as an ingest worker would after writing it."""

    def __init__(self, port: int, accept: Callable[[str, dict[str, Any]], bool] | None = None):
        self.port = port
        self.accept = accept or (lambda topic, payload: True)
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.subscribed = asyncio.Event()
        self.changed = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.port, protocol=aiomqtt.ProtocolVersion.V5
                ) as client:
                    await client.subscribe("pen/v1/#", qos=1)
                    self.subscribed.set()
                    async for message in client.messages:
                        topic = str(message.topic)
                        payload = bytes(message.payload)  # type: ignore[arg-type]
                        if not payload or topic.endswith("/ack"):
                            continue
                        doc = json.loads(payload)
                        self.messages.append((topic, doc))
                        self.changed.set()
                        ack = self._ack(topic, doc)
                        if ack is not None and self.accept(topic, doc):
                            await client.publish("pen/v1/c1/controller/ctl/ack", dump(ack), qos=1)
            except aiomqtt.MqttError:
                self.subscribed.clear()
                await asyncio.sleep(0.05)

    @staticmethod
    def _ack(topic: str, doc: dict[str, Any]) -> Ack | None:
        if topic.endswith("/controller/ctl/telemetry"):
            ranges = [(b["device"], "telemetry", b["seq"]) for b in doc["batches"]]
        elif topic.endswith("/events"):
            ranges = [(doc["device"], "events", doc["seq"])]
        else:
            return None
        return Ack(
            clinic="c1",
            controller="ctl",
            worker="test",
            ts_ns=time.time_ns(),
            ranges=[AckRange(device=d, stream=s, seqs=[(n, n)]) for d, s, n in ranges],  # type: ignore[arg-type]
        )

    async def wait_for(self, predicate: Callable[[Any], bool], within: float = 30.0) -> None:
        async with asyncio.timeout(within):
            while not predicate(self.messages):
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def running(*coros: Any) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield
    finally:
        # Cancelling again until done: Python 3.11's wait_for (inside aiomqtt) can
        # swallow a cancellation, and a reconnect loop would then run for ever.
        await cancel_and_wait(tasks)


async def until(condition: Callable[[], bool], within: float = 30.0) -> None:
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - counters of another component
            await asyncio.sleep(0.01)


def batches(messages: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The telemetry batches received, taken out of the controller's bundles."""
    out = []
    for topic, payload in messages:
        if topic.endswith("/telemetry"):
            assert topic == "pen/v1/c1/controller/ctl/telemetry", "telemetry comes in bundles"
            out.extend(payload["batches"])
    return out


def unique_samples(messages: list[tuple[str, dict[str, Any]]]) -> set[tuple[int, ...]]:
    """Every sample once: a repeated batch repeats rows, never adds new ones."""
    return {tuple(r) for b in batches(messages) for r in b["samples"]}


def seqs(messages: list[tuple[str, dict[str, Any]]], stream: str) -> list[int]:
    if stream == "telemetry":
        return sorted({b["seq"] for b in batches(messages)})
    return sorted({m["seq"] for t, m in messages if t.endswith("/" + stream)})


# --- without a broker ----------------------------------------------------------------


def test_one_flush_is_one_bundle_of_every_pen(tmp_path: Path) -> None:
    pub = publisher(tmp_path)
    for i in range(3):
        for device in ("SIM-0001", "SIM-0002"):
            pub.add_sample(device, telemetry(i))
    pub.add_sample("SIM-0001", telemetry(3), session="s1", zone="cheeks")  # a new batch
    pub.flush()
    pub.add_sample("SIM-0002", telemetry(4))
    pub.flush()
    first, second = pub.outbox.pending(10)
    assert first.topic == second.topic == "pen/v1/c1/controller/ctl/telemetry"
    bundle = TelemetryBundle.model_validate_json(first.payload)
    assert [(b.device, b.seq, len(b.samples), b.zone) for b in bundle.batches] == [
        ("SIM-0001", 0, 3, None),
        ("SIM-0001", 1, 1, "cheeks"),
        ("SIM-0002", 0, 3, None),
    ]
    assert first.acked_end_to_end and not first.retain
    later = TelemetryBundle.model_validate_json(second.payload)
    assert [(b.device, b.seq) for b in later.batches] == [("SIM-0002", 1)]


def test_a_bundle_is_split_at_its_size_limit(tmp_path: Path) -> None:
    pub = publisher(tmp_path)
    pub.max_batch = MAX_BUNDLE_SAMPLES
    for i in range(MAX_BUNDLE_SAMPLES):
        pub.add_sample("SIM-0001", telemetry(i))
        pub.add_sample("SIM-0002", telemetry(i))
    pub.flush()
    rows = pub.outbox.pending(10)
    assert [len(TelemetryBundle.model_validate_json(r.payload).batches) for r in rows] == [1, 1]
    assert all(len(r.payload) < 256 * 1024 for r in rows)


# --- against a real broker ------------------------------------------------------------


@pytest.mark.parametrize("broker_crash", [False, True])
async def test_nothing_leaves_the_outbox_before_it_is_acknowledged(
    mosquitto: ServerProcess, tmp_path: Path, broker_crash: bool
) -> None:
    pub = publisher(tmp_path, mosquitto.port)
    acker = Acker(mosquitto.port)
    async with running(acker.run(), pub.run()):
        async with asyncio.timeout(10):
            await acker.subscribed.wait()
            await pub.connected.wait()
        for i in range(300):
            pub.add_sample("SIM-0001", telemetry(i), session="s1", zone="cheeks")
        pub.add_event("SIM-0001", "pass_started", {"zone_id": "cheeks", "number": 1})
        await acker.wait_for(lambda m: len(seqs(m, "events")) == 1)
        (mosquitto.kill if broker_crash else mosquitto.stop)()
        for i in range(300, 600):
            pub.add_sample("SIM-0001", telemetry(i), session="s1", zone="cheeks")
        pub.add_event("SIM-0001", "pass_ended", {"zone_id": "cheeks", "strokes": 7})
        pub.flush()
        assert pub.outbox.counters.depth > 0  # held on disk while the broker is down
        mosquitto.start_again()
        await acker.wait_for(
            lambda m: len(unique_samples(m)) >= 600 and len(seqs(m, "events")) == 2
        )
        await until(lambda: pub.outbox.counters.depth == 0)
    assert seqs(acker.messages, "telemetry") == list(range(len(seqs(acker.messages, "telemetry"))))
    unique = unique_samples(acker.messages)
    assert sorted(r[1] for r in unique) == list(range(600))
    assert seqs(acker.messages, "events") == [0, 1]
    assert pub.counters.connects >= 2
    assert pub.outbox.counters.acknowledged == pub.counters.bundles + 2


async def test_what_nobody_acknowledges_is_sent_again_until_someone_does(
    mosquitto: ServerProcess, tmp_path: Path
) -> None:
    """No subscriber at all at first (Mosquitto drops the messages), then one that ignores
    the first copy of everything: both are overcome by resending, with backoff."""
    pub = publisher(tmp_path, mosquitto.port, ack_timeout_s=0.3, ack_timeout_max_s=0.6)
    async with running(pub.run()):
        await until(pub.connected.is_set)
        for i in range(3):
            pub.add_event("SIM-0001", "pass_ended", {"number": i})
        await until(lambda: pub.window.counters.resent_timeout >= 3)
        assert pub.outbox.counters.depth == 3  # nothing acknowledged, nothing forgotten
        seen: set[tuple[str, int]] = set()

        def second_copy_only(topic: str, doc: dict[str, Any]) -> bool:
            key = (topic, doc["seq"])
            first = key not in seen
            seen.add(key)
            return not first

        acker = Acker(mosquitto.port, accept=second_copy_only)
        async with running(acker.run()):
            await until(lambda: pub.outbox.counters.depth == 0)
    assert seqs(acker.messages, "events") == [0, 1, 2]
    assert pub.window.rto_s == pytest.approx(0.3)  # progress reset the backoff


async def test_a_loss_is_noticed_when_a_later_message_is_acknowledged(
    mosquitto: ServerProcess, tmp_path: Path
) -> None:
    pub = publisher(tmp_path, mosquitto.port, reorder_s=0.2, ack_timeout_s=60)
    dropped: list[int] = []

    def lose_the_first_event(topic: str, doc: dict[str, Any]) -> bool:
        if topic.endswith("/events") and doc["seq"] == 0 and not dropped:
            dropped.append(0)
            return False
        return True

    acker = Acker(mosquitto.port, accept=lose_the_first_event)
    async with running(acker.run(), pub.run()):
        await until(lambda: pub.connected.is_set() and acker.subscribed.is_set())
        pub.add_event("SIM-0001", "pass_started", {"number": 1})
        await acker.wait_for(lambda m: len(m) == 1)
        await asyncio.sleep(0.05)  # the next one is sent measurably later
        pub.add_event("SIM-0001", "pass_ended", {"number": 1})
        await until(lambda: pub.outbox.counters.depth == 0, within=10)  # long before 60 s
    assert pub.window.counters.resent_lost >= 1
    assert pub.window.counters.resent_timeout == 0


async def test_acks_for_someone_else_are_ignored(mosquitto: ServerProcess, tmp_path: Path) -> None:
    pub = publisher(tmp_path, mosquitto.port)
    async with running(pub.run()):
        await until(pub.connected.is_set)
        pub.add_event("SIM-0001", "pass_started", {"number": 1})
        wrong = Ack(
            clinic="c1",
            controller="other",
            worker="w",
            ts_ns=1,
            ranges=[AckRange(device="SIM-0001", stream="events", seqs=[(0, 0)])],
        )
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.publish("pen/v1/c1/controller/ctl/ack", dump(wrong), qos=1)
            await client.publish("pen/v1/c1/controller/ctl/ack", b"{not json", qos=1)
        await until(lambda: pub.counters.bad_acks == 2)
    assert pub.outbox.counters.depth == 1


async def test_close_leaves_retained_statuses_offline(
    mosquitto: ServerProcess, tmp_path: Path
) -> None:
    pub = publisher(tmp_path, mosquitto.port)
    task = asyncio.create_task(pub.run())
    await until(pub.connected.is_set)
    pub.set_status("SIM-0001", online=True, state="up", link={"crc_errors": 0})
    pub.set_status("SIM-0001", online=False, state="stopped")
    await pub.close()
    await asyncio.wait_for(task, 5)  # run() ends by itself after the goodbye
    assert pub.outbox.waiting_for_broker() == 0
    retained = await read_retained(mosquitto.port, 2)
    assert retained["pen/v1/c1/device/SIM-0001/status"]["online"] is False
    assert retained["pen/v1/c1/device/SIM-0001/status"]["controller"] == "ctl"
    assert retained["pen/v1/c1/controller/ctl/status"]["online"] is False
    assert retained["pen/v1/c1/controller/ctl/status"]["ts_ns"] > 0  # not the will


async def read_retained(port: int, count: int) -> dict[str, dict[str, Any]]:
    """The retained messages under pen/v1/, once ``count`` of them have arrived."""
    found: dict[str, dict[str, Any]] = {}
    async with aiomqtt.Client("127.0.0.1", port, protocol=aiomqtt.ProtocolVersion.V5) as client:
        await client.subscribe("pen/v1/#", qos=1)
        async with asyncio.timeout(10):
            async for message in client.messages:
                if message.retain and message.payload:
                    found[str(message.topic)] = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                if len(found) >= count:
                    return found
    raise AssertionError("unreachable")
