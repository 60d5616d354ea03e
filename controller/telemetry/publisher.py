"""Telemetry publisher: samples and events -> durable outbox -> MQTT v5 broker.

The controller's pen callbacks call ``add_sample``/``add_event``/``set_status``;
these are synchronous and cheap. Samples are batched in memory per pen for at
most ``batch_interval`` (100 ms by default) and then committed to the outbox in
one transaction; events and statuses are committed at once. Only the outbox
feeds the broker, so the broker being down changes nothing upstream.

What a kill -9 can lose: the samples of the current, not yet committed batch
(at most ``batch_interval`` of telemetry), exactly like the bytes still in the
serial driver. Everything committed is published after restart.

The sender follows aiomqtt's documented reconnect loop: connect, publish,
and on ``MqttError`` wait (with backoff) and connect again. It takes up to
``inflight`` outbox rows at a time and publishes them at once (QoS 1), the
telemetry batches among them as one TelemetryBundle per clinic (see schema.py
for why); a row leaves the outbox only after the PUBACK of the message that
carried it, so a reconnect may publish a batch twice, which ingest absorbs
(deterministic timestamps).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from firmware_protocol.messages import Telemetry

from ..config import MqttSettings
from .outbox import NewMessage, Outbox, OutboxMessage
from .schema import (
    MAX_BUNDLE_BATCHES,
    ControllerStatus,
    DeviceStatus,
    EventKind,
    EventRecord,
    TelemetryBatch,
    bundle_payload,
    controller_status_topic,
    controller_telemetry_topic,
    device_topic,
    dump,
    parse_topic,
    sample_row,
)

log = structlog.get_logger(__name__)

SESSION_EXPIRY_S = 3600
NO_MATCHING_SUBSCRIBERS = 0x10
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 5.0
MAX_BUNDLE_BYTES = 256 * 1024  # well under any broker's message size limit


@dataclass
class PublisherCounters:
    samples: int = 0
    batches: int = 0
    events: int = 0
    published: int = 0
    connects: int = 0
    connect_failures: int = 0
    undelivered: int = 0  # PUBACKs saying "no matching subscribers" or refusing
    last_error: str = ""


@dataclass
class _Publication:
    """One MQTT message and the outbox rows it carries (several for a bundle)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    rows: list[OutboxMessage]

    def full(self, extra_bytes: int) -> bool:
        """Whether a bundle cannot take one more batch of ``extra_bytes``."""
        size = sum(len(r.payload) for r in self.rows)
        return len(self.rows) >= MAX_BUNDLE_BATCHES or size + extra_bytes > MAX_BUNDLE_BYTES


@dataclass
class _Pending:
    session: str | None
    zone: str | None
    rows: list[list[int]] = field(default_factory=list)


class TelemetryPublisher:
    """See the module docstring. One per controller process."""

    def __init__(
        self,
        settings: MqttSettings,
        outbox: Outbox,
        *,
        clinic_id: str,
        controller_id: str,
        batch_interval: float = 0.1,
        max_batch: int = 500,
        inflight: int = 100,
        reconnect_max: float = 5.0,
    ) -> None:
        self.settings = settings
        self.outbox = outbox
        self.clinic_id = clinic_id
        self.controller_id = controller_id
        self.batch_interval = batch_interval
        self.max_batch = max_batch
        self.inflight = inflight
        self.reconnect_max = reconnect_max
        self.counters = PublisherCounters()
        self.connected = asyncio.Event()
        self._pending: dict[str, _Pending] = {}
        self._wake = asyncio.Event()
        self._last_ts: dict[str, int] = {}

    # -- producer side (synchronous) -------------------------------------------------

    def add_sample(
        self,
        device: str,
        telemetry: Telemetry,
        *,
        session: str | None = None,
        zone: str | None = None,
        ts_ns: int | None = None,
    ) -> None:
        """Queue one telemetry sample; it is committed with the next batch."""
        ts = self._timestamp(device, ts_ns)
        pending = self._pending.get(device)
        if pending is None or pending.session != session or pending.zone != zone:
            if pending is not None:
                self._commit_samples(device)
            pending = self._pending[device] = _Pending(session, zone)
        pending.rows.append(sample_row(ts, telemetry))
        self.counters.samples += 1
        if len(pending.rows) >= self.max_batch:
            self._commit_samples(device)

    def add_event(
        self,
        device: str,
        kind: EventKind,
        *,
        ts_ns: int | None = None,
        **fields: object,
    ) -> None:
        """Commit one event record now (events are never dropped by the outbox)."""
        ts = self._timestamp(device, ts_ns)
        topic = device_topic(self.settings.topic_root, self.clinic_id, device, "events")

        def build(seq: int) -> NewMessage:
            record = EventRecord.model_validate(
                {
                    "clinic": self.clinic_id,
                    "device": device,
                    "seq": seq,
                    "ts_ns": ts,
                    "kind": kind,
                    **fields,
                }
            )
            return NewMessage(topic, dump(record), droppable=False)

        self.outbox.put_sequenced([(f"{device}/events", build)])
        self.counters.events += 1
        self._wake.set()

    def set_status(
        self,
        device: str,
        *,
        online: bool,
        state: str,
        firmware: str | None = None,
        session: str | None = None,
        link: dict[str, int | float] | None = None,
    ) -> None:
        """Commit the pen's retained status message."""
        status = DeviceStatus(
            clinic=self.clinic_id,
            device=device,
            ts_ns=time.time_ns(),
            online=online,
            state=state,
            firmware=firmware,
            session=session,
            link=link or {},
        )
        topic = device_topic(self.settings.topic_root, self.clinic_id, device, "status")
        self.outbox.put(NewMessage(topic, dump(status), retain=True, droppable=False))
        self._wake.set()

    def flush(self) -> None:
        """Commit every pending sample batch to the outbox."""
        for device in list(self._pending):
            self._commit_samples(device)

    # -- sender ----------------------------------------------------------------------

    async def run(self) -> None:
        """Flush batches and publish the outbox until cancelled."""
        flusher = asyncio.create_task(self._flush_loop())
        try:
            await self._send_loop()
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            self.flush()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.batch_interval)
            self.flush()

    async def _send_loop(self) -> None:
        delay = 0.1
        status_topic = controller_status_topic(
            self.settings.topic_root, self.clinic_id, self.controller_id
        )
        offline = ControllerStatus(
            clinic=self.clinic_id, controller=self.controller_id, online=False, ts_ns=0
        )
        will = aiomqtt.Will(status_topic, dump(offline), qos=1, retain=True)
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        while True:
            try:
                async with aiomqtt.Client(
                    self.settings.host,
                    self.settings.port,
                    username=self.settings.username,
                    password=self.settings.password,
                    identifier=f"controller-{self.clinic_id}-{self.controller_id}",
                    protocol=aiomqtt.ProtocolVersion.V5,
                    will=will,
                    properties=properties,
                    keepalive=10,
                    timeout=10,
                ) as client:
                    self.counters.connects += 1
                    delay = 0.1
                    online = ControllerStatus(
                        clinic=self.clinic_id,
                        controller=self.controller_id,
                        online=True,
                        ts_ns=time.time_ns(),
                    )
                    await client.publish(status_topic, dump(online), qos=1, retain=True)
                    # The broker may have died holding what it had acknowledged but
                    # not saved yet (see outbox.py): send the last moments again.
                    replayed = self.outbox.requeue_recent()
                    self.connected.set()
                    log.info(
                        "mqtt connected",
                        host=self.settings.host,
                        port=self.settings.port,
                        replayed=replayed,
                    )
                    await _until_disconnected(client, self._drain(client))
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                self.counters.connect_failures += 1
                self.counters.last_error = str(exc)
                log.warning("mqtt unavailable; retrying", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max)

    async def _drain(self, client: aiomqtt.Client) -> None:
        confirmations = _PublishConfirmations(client)
        retry_in = RETRY_INITIAL_S
        while True:
            rows = self.outbox.pending(self.inflight)
            if not rows:
                self._wake.clear()
                await self._wake.wait()
                continue
            publications = self._publications(rows)
            codes = await asyncio.gather(
                *(confirmations.publish(p.topic, p.payload, p.qos, p.retain) for p in publications)
            )
            delivered = [
                row.id
                for p, code in zip(publications, codes, strict=True)
                if _delivered(code, p.retain)
                for row in p.rows
            ]
            self.outbox.acknowledge(delivered)
            self.counters.published += len(delivered)
            refused = len(rows) - len(delivered)
            if not refused:
                retry_in = RETRY_INITIAL_S
                continue
            # The broker took the messages but has nobody to give them to (or refused
            # them): they stay in the outbox and go again, without spinning.
            self.counters.undelivered += refused
            self.counters.last_error = f"PUBACK reason codes {sorted(set(codes) - {0})}"
            log.warning(
                "broker did not deliver; keeping messages",
                refused=refused,
                retry_in=retry_in,
                codes=sorted(set(codes)),
            )
            await asyncio.sleep(retry_in)
            retry_in = min(retry_in * 2, RETRY_MAX_S)

    def _publications(self, rows: list[OutboxMessage]) -> list[_Publication]:
        """Outbox rows as MQTT messages: telemetry batches bundled, the rest one by one.

        A bundle takes the place of its first batch; bundles never mix clinics.
        """
        root = self.settings.topic_root
        out: list[_Publication] = []
        bundles: list[tuple[str, _Publication]] = []
        open_bundles: dict[str, _Publication] = {}  # per clinic, until full
        for row in rows:
            parsed = parse_topic(row.topic, root)
            if parsed is None or (parsed[1], parsed[3]) != ("device", "telemetry"):
                out.append(_Publication(row.topic, row.payload, row.qos, row.retain, [row]))
                continue
            clinic = parsed[0]
            bundle = open_bundles.get(clinic)
            if bundle is None or bundle.full(len(row.payload)):
                topic = controller_telemetry_topic(root, clinic, self.controller_id)
                bundle = open_bundles[clinic] = _Publication(topic, b"", row.qos, False, [])
                bundles.append((clinic, bundle))
                out.append(bundle)
            bundle.rows.append(row)
        for clinic, bundle in bundles:
            bundle.payload = bundle_payload(
                clinic, self.controller_id, [r.payload for r in bundle.rows]
            )
        return out

    # -- internals -------------------------------------------------------------------

    def _timestamp(self, device: str, ts_ns: int | None) -> int:
        # Strictly increasing per pen, so two points never share a timestamp and
        # silently overwrite each other in InfluxDB.
        ts = ts_ns if ts_ns is not None else time.time_ns()
        last = self._last_ts.get(device, 0)
        if ts <= last:
            ts = last + 1
        self._last_ts[device] = ts
        return ts

    def _commit_samples(self, device: str) -> None:
        pending = self._pending.pop(device, None)
        if pending is None or not pending.rows:
            return
        topic = device_topic(self.settings.topic_root, self.clinic_id, device, "telemetry")
        rows = pending.rows

        def build(seq: int) -> NewMessage:
            batch = TelemetryBatch(
                clinic=self.clinic_id,
                device=device,
                seq=seq,
                session=pending.session,
                zone=pending.zone,
                samples=rows,
            )
            return NewMessage(topic, dump(batch))

        self.outbox.put_sequenced([(f"{device}/telemetry", build)])
        self.counters.batches += 1
        self._wake.set()


async def _until_disconnected(client: aiomqtt.Client, work: Coroutine[Any, Any, None]) -> None:
    """Run work until the connection drops, then raise MqttError at once.

    paho queues QoS 1 publishes on a dead connection and aiomqtt would wait for
    their PUBACK until its timeout; the message iterator, by contrast, raises as
    soon as the client notices the disconnect, so it serves as the watchdog.
    """

    async def watch() -> None:
        async for _ in client.messages:
            pass

    watcher = asyncio.create_task(watch())
    worker = asyncio.create_task(work)
    try:
        done, _ = await asyncio.wait({watcher, worker}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
        raise aiomqtt.MqttError("connection closed")
    finally:
        for task in (watcher, worker):
            task.cancel()
        await asyncio.gather(watcher, worker, return_exceptions=True)


def _delivered(reason_code: int, retain: bool) -> bool:
    """Whether a PUBACK means the broker has the message for someone.

    Mosquitto 2.0.x answers 0x10 "no matching subscribers" when no ingest worker
    holds a subscription, for instance right after a broker restart before the
    workers have subscribed again: the message would be dropped, so it is kept.
    A retained message is kept by the broker itself, subscribers or not.
    """
    if reason_code >= 0x80:
        return False
    return reason_code != NO_MATCHING_SUBSCRIBERS or retain


class _PublishConfirmations:
    """QoS 1 publishes that return the PUBACK's reason code.

    aiomqtt waits for the PUBACK but drops its reason code (MQTT 5), and the
    code is what says whether anyone will receive the message. This wraps
    paho's on_publish (chaining aiomqtt's own) and paho's publish.
    """

    def __init__(self, client: aiomqtt.Client) -> None:
        self._paho = client._client
        self._waiting: dict[int, asyncio.Future[int]] = {}
        chained: Any = self._paho.on_publish  # aiomqtt's own, a v2 (5-argument) callback

        def on_publish(
            paho: Any, userdata: Any, mid: int, reason_code: Any, properties: Any
        ) -> None:
            future = self._waiting.pop(mid, None)
            if future is not None and not future.done():
                future.set_result(int(getattr(reason_code, "value", reason_code)))
            if chained is not None:
                chained(paho, userdata, mid, reason_code, properties)

        self._paho.on_publish = on_publish

    async def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> int:
        info = self._paho.publish(topic, payload, qos, retain)
        if info.rc != 0:
            raise aiomqtt.MqttError(f"could not publish to {topic}: paho rc {info.rc}")
        if qos == 0:
            return 0
        # paho calls on_publish from the event loop's socket callbacks, never
        # inside publish() for QoS 1, so registering now cannot miss it.
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[info.mid] = future
        return await future
