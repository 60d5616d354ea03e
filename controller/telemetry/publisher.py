"""Telemetry publisher: samples, events and statuses -> durable outbox -> MQTT v5 broker.

Input (synchronous and cheap, the whole interface a controller needs):
``add_sample`` per pen sample, ``add_event`` per registry event (shaped here:
codes, pseudonyms, no free text; :mod:`.events`), ``set_status`` per pen status.
Samples are kept in memory per pen and, every ``batch_interval`` (50 ms by
default), committed as **one** TelemetryBundle of every pen's batch in one
outbox transaction; events and statuses are committed at once. Only the outbox
feeds the broker, so the broker or ingest being down changes nothing upstream.

What a kill -9 can lose: the samples of the current, not yet committed flush
(at most ``batch_interval`` of telemetry), exactly like the bytes still in the
serial driver. Everything committed is published after restart.

Delivery is acknowledged end to end (docs/MQTT.md): ingest publishes on
``{root}/{clinic}/controller/{controller}/ack`` which ``(device, stream, seq)``
it has durably written, and a bundle or event leaves the outbox only then.
:class:`.delivery.DeliveryWindow` decides what is sent again and when (after a
reconnect, when later messages were acknowledged, after a timeout), so nothing
depends on PUBACK reason codes, on who else subscribes, or on what a broker
keeps across a crash. Statuses are retained state, refreshed by the controller
every few seconds: they leave the outbox on the broker's PUBACK.

The sender follows aiomqtt's documented reconnect loop: connect, work, and on
``MqttError`` wait (with backoff) and connect again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import structlog
from pydantic import ValidationError

from firmware_protocol.messages import Telemetry

from ..config import MqttSettings
from ..tls import settings_context
from .delivery import DeliveryWindow
from .events import Pseudonymizer, shape_event
from .outbox import NewMessage, Outbox, OutboxMessage
from .schema import (
    MAX_BUNDLE_BATCHES,
    Ack,
    ControllerStatus,
    DeviceStatus,
    EventKind,
    EventRecord,
    TelemetryBatch,
    TelemetryBundle,
    ack_topic,
    controller_status_topic,
    controller_telemetry_topic,
    device_topic,
    dump,
    sample_row,
)

log = structlog.get_logger(__name__)

MAX_BUNDLE_SAMPLES = 2_000  # ~170 KiB of JSON: well under any broker's message limit
CLOSE_TIMEOUT_S = 2.0


@dataclass
class PublisherCounters:
    samples: int = 0
    batches: int = 0
    bundles: int = 0
    events: int = 0
    statuses: int = 0
    invalid: int = 0  # events or statuses that failed the schema (a bug; logged)
    published: int = 0  # MQTT messages sent, resends included
    acks: int = 0  # ack messages from ingest
    bad_acks: int = 0  # ack messages that were not for us or not valid
    connects: int = 0
    connect_failures: int = 0
    last_error: str = ""


@dataclass
class _Pending:
    session: str | None
    zone: str | None
    rows: list[list[int]] = field(default_factory=list)


class _Closed(Exception):  # noqa: N818 - control flow inside the connection's TaskGroup
    pass


class TelemetryPublisher:
    """See the module docstring. One per controller process."""

    def __init__(
        self,
        settings: MqttSettings,
        outbox: Outbox,
        *,
        clinic_id: str,
        controller_id: str,
        pseudonymize: Pseudonymizer,
        batch_interval: float | None = None,
        max_batch: int = 500,
        inflight: int = 100,
        reconnect_max: float = 5.0,
    ) -> None:
        self.settings = settings
        self.outbox = outbox
        self.clinic_id = clinic_id
        self.controller_id = controller_id
        self.pseudonymize = pseudonymize
        self.batch_interval = (
            settings.batch_interval_s if batch_interval is None else batch_interval
        )
        self.max_batch = max_batch
        self.inflight = inflight
        self.reconnect_max = reconnect_max
        self.counters = PublisherCounters()
        self.window = DeliveryWindow(
            max_in_flight=settings.max_in_flight,
            reorder_s=settings.reorder_s,
            rto_s=settings.ack_timeout_s,
            rto_max_s=settings.ack_timeout_max_s,
        )
        self.connected = asyncio.Event()
        root = settings.topic_root
        self._status_topic = controller_status_topic(root, clinic_id, controller_id)
        self._ack_topic = ack_topic(root, clinic_id, controller_id)
        self._pending: dict[str, list[_Pending]] = {}
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()  # something left the outbox or was sent
        self._closing = asyncio.Event()
        self._done = asyncio.Event()
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
        """Queue one telemetry sample; it is committed with the next flush."""
        ts = self._timestamp(device, ts_ns)
        batches = self._pending.setdefault(device, [])
        last = batches[-1] if batches else None
        if (
            last is None
            or (last.session, last.zone) != (session, zone)
            or len(last.rows) >= self.max_batch
        ):
            last = _Pending(session, zone)
            batches.append(last)
        last.rows.append(sample_row(ts, telemetry))
        self.counters.samples += 1

    def add_event(
        self,
        device: str,
        kind: EventKind,
        detail: Mapping[str, Any],
        *,
        session: str | None = None,
        therapist: str | None = None,
        plan: str | None = None,
        zone: str | None = None,
        ts_ns: int | None = None,
    ) -> None:
        """Commit one session event now, shaped for MQTT (:func:`.events.shape_event`).

        ``detail`` is the registry event's detail as it is; ``zone`` the pen's zone,
        used when the detail names none. Events are never dropped by the outbox.
        """
        ts = self._timestamp(device, ts_ns)
        shaped = shape_event(kind, detail, self.pseudonymize)
        topic = device_topic(self.settings.topic_root, self.clinic_id, device, "events")
        fields = {
            "clinic": self.clinic_id,
            "device": device,
            "controller": self.controller_id,
            "ts_ns": ts,
            "kind": kind,
            "session": session,
            "therapist": therapist,
            "plan": plan,
            "zone": shaped.zone or zone,
            "code": shaped.code,
            "values": shaped.values,
        }

        def build(seqs: list[int]) -> NewMessage:
            record = EventRecord.model_validate({**fields, "seq": seqs[0]})
            return NewMessage(topic, dump(record), droppable=False)

        try:
            self.outbox.put_numbered([(device, "events")], build)
        except ValidationError as exc:  # a bug, but never one that stops a pen
            self.counters.invalid += 1
            log.error("event not publishable", kind=kind, device=device, error=str(exc))
            return
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
        link: Mapping[str, Any] | None = None,
    ) -> None:
        """Commit the pen's retained status message (call again to refresh it).

        ``link`` is the link's statistics; the numeric ones are published.
        """
        try:
            status = DeviceStatus(
                clinic=self.clinic_id,
                device=device,
                controller=self.controller_id,
                ts_ns=time.time_ns(),
                online=online,
                state=state,
                firmware=firmware,
                session=session,
                link={
                    k: v
                    for k, v in (link or {}).items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                },
            )
        except ValidationError as exc:
            self.counters.invalid += 1
            log.error("status not publishable", device=device, error=str(exc))
            return
        topic = device_topic(self.settings.topic_root, self.clinic_id, device, "status")
        # Droppable: a newer status replaces it on the broker anyway.
        self.outbox.put(NewMessage(topic, dump(status), retain=True))
        self.counters.statuses += 1
        self._wake.set()

    def flush(self) -> None:
        """Commit every pending sample batch to the outbox, as bundles."""
        if not self._pending:
            return
        pending = [(d, p) for d, batches in self._pending.items() for p in batches if p.rows]
        self._pending.clear()
        bundle: list[tuple[str, _Pending]] = []
        samples = 0
        for device, batch in pending:
            if bundle and (
                samples + len(batch.rows) > MAX_BUNDLE_SAMPLES or len(bundle) >= MAX_BUNDLE_BATCHES
            ):
                self._commit_bundle(bundle)
                bundle, samples = [], 0
            bundle.append((device, batch))
            samples += len(batch.rows)
        if bundle:
            self._commit_bundle(bundle)

    # -- sender ----------------------------------------------------------------------

    async def run(self) -> None:
        """Flush batches and publish the outbox until cancelled or closed."""
        flusher = asyncio.create_task(self._flush_loop())
        try:
            await self._connection_loop()
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            self.flush()
            self._done.set()

    async def close(self) -> None:
        """Say goodbye: publish what waits for the broker (the statuses just set), then
        the controller's retained offline status, and disconnect cleanly.

        ``run()`` returns afterwards. Without a broker, nothing waits: the outbox
        keeps the statuses for the next start.
        """
        self.flush()
        self._closing.set()
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S + 1.0):
                await self._done.wait()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.batch_interval)
            self.flush()

    async def _connection_loop(self) -> None:
        delay = 0.1
        offline = ControllerStatus(
            clinic=self.clinic_id, controller=self.controller_id, online=False, ts_ns=0
        )
        will = aiomqtt.Will(self._status_topic, dump(offline), qos=1, retain=True)
        while not self._closing.is_set():
            failed = False
            try:
                async with aiomqtt.Client(
                    self.settings.host,
                    self.settings.port,
                    username=self.settings.username,
                    password=self.settings.password,
                    tls_context=settings_context(self.settings.tls),
                    identifier=f"controller-{self.clinic_id}-{self.controller_id}",
                    protocol=aiomqtt.ProtocolVersion.V5,
                    # No session to keep: acknowledgements missed while away are
                    # replaced by sending everything unacknowledged again.
                    clean_start=True,
                    will=will,
                    keepalive=10,
                    timeout=10,
                ) as client:
                    self.counters.connects += 1
                    delay = 0.1
                    client.pending_calls_threshold = self.inflight + 10  # our own window
                    await self._connected(client)
            except* _Closed:
                pass  # the goodbye is said; the loop ends
            except* aiomqtt.MqttError as group:
                failed = True
                self.counters.last_error = str(group.exceptions[0])
            self.connected.clear()
            if failed:
                self.counters.connect_failures += 1
                log.warning("mqtt unavailable; retrying", error=self.counters.last_error)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._closing.wait()
                delay = min(delay * 2, self.reconnect_max)
        self.connected.clear()

    async def _connected(self, client: aiomqtt.Client) -> None:
        await client.subscribe(self._ack_topic, qos=1)
        online = ControllerStatus(
            clinic=self.clinic_id, controller=self.controller_id, online=True, ts_ns=time.time_ns()
        )
        await client.publish(self._status_topic, dump(online), qos=1, retain=True)
        resent = self.window.reset()  # the broker may have lost anything unacknowledged
        self.connected.set()
        log.info("mqtt connected", host=self.settings.host, port=self.settings.port, resend=resent)
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._receive_acks(client))
                tasks.create_task(self._send(client))
                tasks.create_task(self._goodbye(client))
        finally:
            self.connected.clear()

    async def _receive_acks(self, client: aiomqtt.Client) -> None:
        # Also the connection's watchdog: the iterator ends as soon as paho notices
        # a dead connection, while a publish would wait for its PUBACK until timeout.
        async for message in client.messages:
            payload = message.payload
            try:
                if not isinstance(payload, bytes | bytearray):
                    raise ValueError("not bytes")
                ack = Ack.model_validate_json(payload)
                if (ack.clinic, ack.controller) != (self.clinic_id, self.controller_id):
                    raise ValueError(f"an ack for {ack.clinic}/{ack.controller}")
            except ValueError as exc:  # ValidationError is one
                self.counters.bad_acks += 1
                log.warning("bad ack", error=str(exc)[:200])
                continue
            self.counters.acks += 1
            done = self.outbox.acknowledge_many((r.device, r.stream, r.seqs) for r in ack.ranges)
            self.window.acked(done, asyncio.get_running_loop().time())
            self._progress.set()
            self._wake.set()
        raise aiomqtt.MqttError("message stream ended")

    async def _send(self, client: aiomqtt.Client) -> None:
        loop = asyncio.get_running_loop()
        cursor = 0  # rows up to this id were sent on this connection
        window = self.window
        while True:
            now = loop.time()
            again = window.due(now)
            rows: list[OutboxMessage] = []
            if again:
                rows = self.outbox.get(again)
                window.forget(set(again) - {r.id for r in rows})  # acknowledged meanwhile
            room = min(window.room(), self.inflight)
            if room > 0:
                new = self.outbox.pending(room, after_id=cursor)
                if new:
                    cursor = new[-1].id
                rows += new
            if not rows:
                self._wake.clear()
                deadline = window.next_deadline()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        await self._wake.wait()
                continue
            await asyncio.gather(*(self._publish(client, r) for r in rows))
            self.counters.published += len(rows)
            window.sent((r.id for r in rows if r.acked_end_to_end), now)
            self.outbox.delivered([r.id for r in rows if not r.acked_end_to_end])
            self._progress.set()

    async def _publish(self, client: aiomqtt.Client, row: OutboxMessage) -> None:
        await client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain)

    async def _goodbye(self, client: aiomqtt.Client) -> None:
        await self._closing.wait()
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                while self.outbox.waiting_for_broker():
                    self._progress.clear()
                    await self._progress.wait()
                offline = ControllerStatus(
                    clinic=self.clinic_id,
                    controller=self.controller_id,
                    online=False,
                    ts_ns=time.time_ns(),
                )
                await client.publish(self._status_topic, dump(offline), qos=1, retain=True)
                log.info("mqtt goodbye", waiting=self.outbox.counters.depth)
        raise _Closed

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

    def _commit_bundle(self, batches: list[tuple[str, _Pending]]) -> None:
        topic = controller_telemetry_topic(
            self.settings.topic_root, self.clinic_id, self.controller_id
        )

        def build(seqs: list[int]) -> NewMessage:
            bundle = TelemetryBundle(
                clinic=self.clinic_id,
                controller=self.controller_id,
                batches=[
                    TelemetryBatch(
                        clinic=self.clinic_id,
                        device=device,
                        seq=seq,
                        session=p.session,
                        zone=p.zone,
                        samples=p.rows,
                    )
                    for (device, p), seq in zip(batches, seqs, strict=True)
                ],
            )
            return NewMessage(topic, dump(bundle))

        self.outbox.put_numbered([(device, "telemetry") for device, _ in batches], build)
        self.counters.batches += len(batches)
        self.counters.bundles += 1
        self._wake.set()
