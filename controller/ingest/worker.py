"""The ingest worker: MQTT (shared subscription) -> batches -> InfluxDB, at least once.

Flow, per broker connection::

    broker --PUBLISH (QoS 1)--> aiomqtt queue (bounded) --> reader --> batcher --> writers
    batcher: parse + map to points (points.py); a batch closes when a writer is
             free (nothing else waits for one), or by count or age
    writers: ``ingest.writers`` of them, each writes a batch to InfluxDB and
             dead-letters what can never be written (writer.py), then tells the
             controllers what of their streams is durable (the ack topic); PUBACKs
             go out in arrival order once every earlier batch is done too

Guarantees and why they hold:

* Nothing is acknowledged, to the broker or to a controller, before its points
  are in InfluxDB (or its dead letter is committed), so a killed worker, a lost
  connection or an InfluxDB outage can only cause redelivery, never loss.
  Redelivery is harmless: timestamps come from the payload, so the same points
  are overwritten, whichever writer writes them and in whatever order (a point's
  content is fixed by its stream entry, so concurrent writers need no ordering).
* While InfluxDB is unavailable the batcher retries the same batch with bounded
  exponential backoff. The broker stops sending once ``receive_maximum``
  messages are unacknowledged and queues the rest in our durable session.
* A message that can never be ingested (bad JSON, schema violation, unknown
  topic) or a point InfluxDB refuses (found by bisecting the batch) is set aside
  in the dead-letter store, counted, and acknowledged: it cannot block the stream.

Broker specifics (Mosquitto 2.0.11, measured; see docs/MQTT.md): the session is
durable (clean start off, session expiry set) so the broker queues for a worker
that is briefly away; the shared subscription is made again after *every*
connect, because 2.0.11 forgets durable ``$share`` subscriptions across a broker
restart; and since 2.0.11 stops honouring Receive Maximum once acknowledgements
flow, the incoming buffer is bounded (``max_buffered``): what does not fit is
dropped unacknowledged and fetched again by reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from ..influx import InfluxClient, InfluxError
from ..telemetry.aiomqtt_compat import manual_acks
from ..telemetry.schema import ack_topic, dump
from ..tls import settings_context
from .deadletters import DeadLetterStore
from .points import AUDIT_HEAD_STREAM, MalformedMessage, message_points
from .settings import IngestSettings
from .writer import BatchWriter, Received, acks

log = structlog.get_logger(__name__)

STATS_SCHEMA_VERSION = 1
_PARSE_SLICE_LINES = 2_000  # lines parsed between yields to the event loop (~2 ms)
_PARSE_MESSAGE_LINES = 10  # what parsing one message costs besides its lines, in lines


class IngestError(RuntimeError):
    """The worker cannot run as configured (for example its id is already in use)."""


class SubscriptionRefused(aiomqtt.MqttError):
    """The broker refused a subscription (usually an ACL); retried like a lost connection."""


@dataclass
class IngestCounters:
    """What the worker has done since it started (redeliveries included)."""

    messages: int = 0  # received from the broker
    acked: int = 0  # PUBACKs sent (each after its points were written or dead-lettered)
    points_written: int = 0  # lines InfluxDB accepted (a rewrite counts again)
    written_at_ns: int = 0  # wall time InfluxDB accepted the last write (with points_written)
    batches: int = 0  # flushed batches
    write_retries: int = 0  # writes retried after InfluxUnavailable
    write_rejections: int = 0  # InfluxRejected answers (bisection steps included)
    malformed: int = 0  # messages that could not be parsed or mapped
    rejected_points: int = 0  # single lines InfluxDB refused
    dead_letters: int = 0  # malformed + rejected_points, all committed
    controller_acks: int = 0  # ack messages published to controllers
    pens_marked_offline: int = 0  # device_status points derived from a controller's will
    connects: int = 0
    connection_losses: int = 0
    newest_ts_ns: int = 0  # newest sample/event time written so far
    last_batch_s: float = 0.0  # wall time of the last flush (write + acks)
    buffered_peak: int = 0  # most received messages waiting to be parsed at once
    overflow_drops: int = 0  # dropped by the full buffer, to be redelivered (see _writer)
    resyncs: int = 0  # reconnections made to get those redelivered
    by_reason: dict[str, int] = field(default_factory=dict)  # dead letters per reason

    def lag_s(self, now_ns: int | None = None) -> float | None:
        """now - newest written sample time, in seconds; None before the first write."""
        if not self.newest_ts_ns:
            return None
        return ((now_ns or time.time_ns()) - self.newest_ts_ns) / 1e9

    def snapshot(self) -> dict[str, Any]:
        data = asdict(self)
        lag = self.lag_s()
        data["lag_s"] = None if lag is None else round(lag, 3)
        data["last_batch_s"] = round(self.last_batch_s, 4)
        return data


@dataclass(slots=True)
class _Overflow:
    dropped: int = 0


def _bounded_queue(overflow: _Overflow) -> type[asyncio.Queue[aiomqtt.Message]]:
    """aiomqtt's incoming-queue class for one connection: bounded, counting drops.

    A dropped message is never acknowledged, so the broker still holds it for our
    session; dropping silently here (instead of raising QueueFull) spares aiomqtt
    logging a warning per message.
    """

    class BoundedQueue(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            if self.full():
                overflow.dropped += 1
                return
            super().put_nowait(item)

    return BoundedQueue


class _Resync(aiomqtt.MqttError):
    """Reconnect to have the broker redeliver what the worker had to drop."""


class IngestWorker:
    """One ingest worker. ``await run()`` until ``stop()``; counters in ``counters``.

    Several workers with the same ``ingest.group`` and different ``ingest.worker_id``
    split the load; a worker must keep its id across restarts to get back the
    messages the broker holds in its durable session.
    """

    def __init__(self, settings: IngestSettings) -> None:
        self.settings = settings
        self.counters = IngestCounters()
        self.ready = asyncio.Event()  # set once subscribed (after each connect, too)
        self._stopping = asyncio.Event()
        self._writer: BatchWriter | None = None
        self._live_client: aiomqtt.Client | None = None  # while connected, for the goodbye
        cfg = settings.ingest
        self.client_id = f"penctl-ingest-{cfg.group}-{cfg.worker_id}"
        self.root = settings.mqtt.topic_root
        clinic = cfg.clinic or "+"
        share = f"$share/{cfg.group}/{self.root}/{clinic}"
        self.subscriptions = [f"{share}/device/+/{stream}" for stream in cfg.streams]
        if "telemetry" in cfg.streams:  # controllers publish telemetry in bundles
            self.subscriptions.append(f"{share}/controller/+/telemetry")
        if "status" in cfg.streams:  # a controller's will takes its pens offline
            self.subscriptions.append(f"{share}/controller/+/status")
        if "events" in cfg.streams:  # each controller's audit-log head (docs/SECURITY.md)
            self.subscriptions.append(f"{share}/controller/+/{AUDIT_HEAD_STREAM}")
        self.stats_topic = f"{self.root}/{cfg.clinic or '_ingest'}/ingest/{cfg.worker_id}/stats"

    @property
    def dead_letter_path(self) -> Path:
        return self.settings.state_dir / "dead_letters.sqlite3"

    def stop(self) -> None:
        """Ask ``run()`` to return. Unacknowledged messages are redelivered later."""
        self._stopping.set()

    # --- lifecycle -----------------------------------------------------------------

    async def run(self) -> None:
        """Ingest until ``stop()``; reconnects to the broker and retries InfluxDB forever."""
        await self._lifecycle(self._connection_loop())

    async def retire(self, idle_s: float = 2.0) -> None:
        """Leave the group for good and end this worker's durable session.

        Mosquitto keeps routing a share of the messages to a member's session while
        it is offline, until the session expires; a worker taken out of service
        must therefore unsubscribe, ingest what its session still holds (until
        ``idle_s`` pass without a message), and delete the session.
        """
        await self._lifecycle(self._retire(idle_s))

    async def _lifecycle(self, main: Coroutine[Any, Any, None]) -> None:
        self._stopping.clear()  # a worker object may run again after a stop
        with self._state_lock():
            async with InfluxClient(self.settings.influx_settings()) as influx:
                with DeadLetterStore(self.dead_letter_path, self.settings.ingest.worker_id) as dead:
                    cfg = self.settings.ingest
                    self._writer = BatchWriter(
                        influx,
                        dead,
                        self.counters,
                        backoff_initial_s=cfg.backoff_initial_s,
                        backoff_max_s=cfg.backoff_max_s,
                    )
                    await self._prepare_database(influx)
                    log.info(
                        "ingest_started",
                        worker=self.settings.ingest.worker_id,
                        client_id=self.client_id,
                        subscriptions=self.subscriptions,
                    )
                    logger = asyncio.create_task(self._log_loop())
                    try:
                        await self._until_stopped(main)
                    finally:
                        await cancel_and_wait([logger])
                        log.info("ingest_stopped", **self.counters.snapshot())

    async def _until_stopped(self, main: Coroutine[Any, Any, None]) -> None:
        # Stopping cancels wherever the worker is: nothing unacknowledged is lost. Not a
        # TaskGroup, for the reason given at _consume.
        task = asyncio.create_task(main)
        stop = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
            if stop.done():
                await self._goodbye()
        finally:
            await cancel_and_wait([task, stop])
        if not task.cancelled():
            task.result()  # re-raises what the main coroutine died of

    @contextlib.contextmanager
    def _state_lock(self) -> Iterator[None]:
        """One process per worker id and state dir: two would steal each other's session."""
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.settings.state_dir / f"ingest-{self.settings.ingest.worker_id}.lock"
        handle: TextIO = path.open("w")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise IngestError(
                    f"ingest worker {self.settings.ingest.worker_id!r} already runs on "
                    f"{self.settings.state_dir} (lock {path})"
                ) from None
            yield
        finally:
            handle.close()  # releases the lock (the kernel does so on SIGKILL too)

    async def _goodbye(self) -> None:
        """A clean stop leaves the retained stats saying offline (the will does not fire)."""
        client = self._live_client
        if client is None:
            return
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
            async with asyncio.timeout(2.0):
                await client.publish(
                    self.stats_topic, self._stats_payload(online=False), qos=1, retain=True
                )

    async def _prepare_database(self, influx: InfluxClient) -> None:
        if not self.settings.ingest.create_database:
            return
        try:
            await influx.create_database()
        except InfluxError as exc:
            # Not fatal: InfluxDB may be down (writes will wait for it) or the user may
            # lack admin rights on a database that already exists.
            log.warning("influx_create_database_failed", error=str(exc))

    # --- MQTT ----------------------------------------------------------------------

    def _new_client(
        self, *, clean: bool = False
    ) -> tuple[aiomqtt.Client, Callable[[aiomqtt.Message], None], _Overflow]:
        cfg, mqtt = self.settings.ingest, self.settings.mqtt
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        # Durable session: the broker queues for us while we are briefly away.
        props.SessionExpiryInterval = 0 if clean else cfg.session_expiry_s
        # Flow control: at most this many unacknowledged messages in flight to us.
        props.ReceiveMaximum = cfg.receive_maximum
        overflow = _Overflow()
        will = aiomqtt.Will(self.stats_topic, self._stats_payload(online=False), qos=1, retain=True)
        # A fresh client per connection (aiomqtt's reconnect pattern): the inbox and
        # the message ids of a dead connection must not leak into the next one.
        client = aiomqtt.Client(
            mqtt.host,
            mqtt.port,
            username=mqtt.username,
            password=mqtt.password,
            tls_context=settings_context(mqtt.tls),
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=clean,
            properties=props,
            keepalive=cfg.keepalive_s,
            will=None if clean else will,
            queue_type=_bounded_queue(overflow),
            max_queued_incoming_messages=cfg.max_buffered,
        )
        puback = manual_acks(client)

        def ack(message: aiomqtt.Message) -> None:
            puback(message)
            self.counters.acked += 1  # counted where it happens, so tests can trust it

        return client, ack, overflow

    async def _connection_loop(self) -> None:
        cfg = self.settings.ingest
        delay = cfg.backoff_initial_s
        while True:
            client, ack, overflow = self._new_client()
            try:
                async with client:
                    self.counters.connects += 1
                    await self._subscribe(client)
                    delay = cfg.backoff_initial_s
                    log.info("mqtt_connected", client_id=self.client_id)
                    self._live_client = client
                    try:
                        await self._consume(client, ack, overflow)
                    finally:
                        self._live_client = None
            except _Resync as exc:
                self.ready.clear()
                self.counters.resyncs += 1
                log.info("mqtt_resync", reason=str(exc))
            except aiomqtt.MqttError as exc:
                self.ready.clear()
                self.counters.connection_losses += 1
                log.warning("mqtt_connection_lost", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, cfg.backoff_max_s)

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        # Explicitly on every connect: Mosquitto 2.0.11 does not restore a durable
        # client's $share subscriptions after a broker restart (fixed in 2.0.12);
        # subscribing again to an existing subscription is harmless.
        granted = await client.subscribe(
            [(topic, SubscribeOptions(qos=1)) for topic in self.subscriptions]
        )
        refused = [
            f"{topic}: {code}"
            for topic, code in zip(self.subscriptions, granted, strict=False)
            if _refused(code)
        ]
        if refused:
            raise SubscriptionRefused(f"subscription refused: {', '.join(refused)}")
        self.ready.set()

    async def _consume(
        self,
        client: aiomqtt.Client,
        ack: Callable[[aiomqtt.Message], None],
        overflow: _Overflow,
        idle_s: float = 0,
    ) -> None:
        cfg = self.settings.ingest
        # A short hand-over queue; the backlog waits in aiomqtt's bounded queue.
        inbox: asyncio.Queue[aiomqtt.Message] = asyncio.Queue(maxsize=cfg.batch_messages)
        # Batches being written concurrently while the next is parsed; at most one waits.
        flushes: asyncio.Queue[tuple[int, list[Received]]] = asyncio.Queue(maxsize=1)
        in_order = _InOrder(ack)
        tasks = [
            asyncio.create_task(self._receive(client, inbox)),
            asyncio.create_task(
                self._batch_loop(inbox, flushes, idle_s, lambda: len(client.messages), overflow)
            ),
            *(
                asyncio.create_task(self._write_loop(client, flushes, in_order))
                for _ in range(cfg.writers)
            ),
        ]
        if not idle_s:
            tasks.append(asyncio.create_task(self._stats_loop(client)))
        # Not a TaskGroup: it cancels once, and on Python 3.11 a task inside aiomqtt's
        # wait_for can swallow that cancellation and hang the shutdown (cancel_and_wait).
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # the first exception (usually MqttError) propagates
        finally:
            await cancel_and_wait(tasks)

    async def _receive(self, client: aiomqtt.Client, inbox: asyncio.Queue[aiomqtt.Message]) -> None:
        # Never cancelled while the connection lives, so no message is lost between
        # aiomqtt's queue and ours (and asyncio.Queue.get is itself cancel-safe).
        messages = client.messages
        async for message in messages:
            buffered = len(messages) + inbox.qsize() + 1
            self.counters.buffered_peak = max(self.counters.buffered_peak, buffered)
            await inbox.put(message)
        raise aiomqtt.MqttError("message stream ended")

    # --- batching ------------------------------------------------------------------

    async def _batch_loop(
        self,
        inbox: asyncio.Queue[aiomqtt.Message],
        flushes: asyncio.Queue[tuple[int, list[Received]]],
        idle_s: float,
        buffered: Callable[[], int],
        overflow: _Overflow,
    ) -> None:
        cfg = self.settings.ingest
        loop = asyncio.get_running_loop()
        batch: list[Received] = []
        points = 0
        deadline = 0.0
        index = 0  # batches are acknowledged to the broker in this order
        while True:
            if batch:
                timeout: float | None = deadline - loop.time()
            else:
                timeout = idle_s or None
            try:
                async with asyncio.timeout(timeout):
                    message = await inbox.get()
            except TimeoutError:
                if not batch:
                    await flushes.join()  # idle (retire mode only): all written and acked
                    return
                await flushes.put((index, batch))
                index += 1
                batch, points = [], 0
                continue
            unyielded = 0
            while True:  # take everything already waiting, up to the batch limits
                received = self._parse(message)
                if not batch:
                    deadline = loop.time() + cfg.batch_seconds
                batch.append(received)
                lines = len(received.points.lines) if received.points else 0
                points += lines
                if len(batch) >= cfg.batch_messages or points >= cfg.batch_points:
                    break
                unyielded += lines + _PARSE_MESSAGE_LINES
                if unyielded >= _PARSE_SLICE_LINES:
                    # Let the writer send the next batch the moment InfluxDB answers
                    # the last one: parsing a whole batch in one go idled InfluxDB
                    # for up to ~70 ms per write (ingest ratio 0.75 -> 0.9).
                    await asyncio.sleep(0)
                    unyielded = 0
                try:
                    message = inbox.get_nowait()
                except asyncio.QueueEmpty:
                    break
            full = len(batch) >= cfg.batch_messages or points >= cfg.batch_points
            # Nothing else waits, not even in aiomqtt's queue, and no batch waits for
            # a writer: write now, so a quiet stream is not held for batch_seconds
            # (end-to-end latency). With a backlog, batches fill up to their limits:
            # InfluxDB takes big writes for less CPU per point (throughput).
            drained = inbox.empty() and not buffered()
            if full or (drained and (flushes.empty() or overflow.dropped)):
                await flushes.put((index, batch))
                index += 1
                batch, points = [], 0
            if drained and overflow.dropped:
                # The broker overran our buffer (Mosquitto 2.0.11 stops honouring
                # Receive Maximum once acknowledgements flow) and the dropped messages
                # are unacknowledged: once what was kept is written and acknowledged,
                # reconnecting makes the broker send them again.
                await flushes.join()
                self.counters.overflow_drops += overflow.dropped
                raise _Resync(f"{overflow.dropped} messages dropped by a full buffer")

    async def _write_loop(
        self,
        client: aiomqtt.Client,
        flushes: asyncio.Queue[tuple[int, list[Received]]],
        in_order: _InOrder,
    ) -> None:
        # Several per connection: batches are written concurrently and acknowledged
        # to the broker in arrival order (_InOrder).
        assert self._writer is not None
        while True:
            index, batch = await flushes.get()
            started = time.monotonic()
            durable = await self._writer.write(batch)
            for message in acks(durable, self.settings.ingest.worker_id, time.time_ns()):
                topic = ack_topic(self.root, message.clinic, message.controller)
                await client.publish(topic, dump(message), qos=1)
                self.counters.controller_acks += 1
            in_order.done(index, batch)
            self.counters.batches += 1
            self.counters.last_batch_s = time.monotonic() - started
            flushes.task_done()

    def _parse(self, message: aiomqtt.Message) -> Received:
        self.counters.messages += 1
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            payload = str(payload).encode()
        try:
            return Received(
                message, message_points(str(message.topic), bytes(payload), self.root), None
            )
        except MalformedMessage as exc:
            return Received(message, None, exc)

    # --- stats ---------------------------------------------------------------------

    def _stats_payload(self, *, online: bool = True) -> bytes:
        cfg = self.settings.ingest
        data: dict[str, Any] = {
            "v": STATS_SCHEMA_VERSION,
            "worker": cfg.worker_id,
            "group": cfg.group,
            "online": online,
            "ts_ns": time.time_ns(),
        }
        if online:
            data.update(self.counters.snapshot())
        return json.dumps(data, separators=(",", ":")).encode()

    async def _stats_loop(self, client: aiomqtt.Client) -> None:
        while True:
            if not self._stopping.is_set():  # the goodbye's offline stats must stay last
                await client.publish(self.stats_topic, self._stats_payload(), qos=1, retain=True)
            await asyncio.sleep(self.settings.ingest.stats_interval_s)

    async def _log_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.ingest.stats_interval_s)
            log.info("ingest_stats", **self.counters.snapshot())

    # --- retirement ----------------------------------------------------------------

    async def _retire(self, idle_s: float) -> None:
        while True:
            client, ack, overflow = self._new_client()
            async with client:
                self.counters.connects += 1
                await client.unsubscribe(self.subscriptions)  # no new messages routed to us
                try:
                    await self._consume(client, ack, overflow, idle_s=idle_s)
                except _Resync:
                    continue  # the broker redelivers the dropped ones on the next connect
            break
        clean, _, _ = self._new_client(clean=True)
        async with clean:  # clean start + expiry 0: the broker deletes the session
            await clean.publish(self.stats_topic, b"", qos=1, retain=True)  # clear stats
        log.info("ingest_retired", client_id=self.client_id, **self.counters.snapshot())


async def cancel_and_wait(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel tasks and wait until every one has finished, cancelling again if needed.

    Python 3.11's asyncio.wait_for (used inside aiomqtt's publish and subscribe)
    can swallow a cancellation that races with its result (fixed in 3.12); a task
    that did so would otherwise keep running and hang the shutdown.
    """
    interrupted = False
    while pending := [t for t in tasks if not t.done()]:
        for task in pending:
            task.cancel()
        try:
            await asyncio.wait(pending, timeout=0.5)
        except asyncio.CancelledError:
            interrupted = True  # finish the clean-up first: no task may be orphaned
    for task in tasks:  # retrieve exceptions so asyncio does not log them as lost
        if not task.cancelled():
            task.exception()
    if interrupted:
        raise asyncio.CancelledError


class _InOrder:
    """PUBACKs in arrival order although batches finish in any order (MQTT 5 §4.6)."""

    def __init__(self, ack: Callable[[aiomqtt.Message], None]) -> None:
        self._ack = ack
        self._next = 0
        self._done: dict[int, list[Received]] = {}

    def done(self, index: int, batch: list[Received]) -> None:
        self._done[index] = batch
        while self._next in self._done:
            for received in self._done.pop(self._next):
                self._ack(received.message)
            self._next += 1


def _refused(code: object) -> bool:
    # MQTT 5 SUBACK reason codes: 0x00-0x02 grant a QoS, 0x80 and above refuse.
    return code.is_failure if isinstance(code, ReasonCode) else int(str(code)) >= 0x80
