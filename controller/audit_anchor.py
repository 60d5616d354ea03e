"""Anchor the audit log: publish its head, retained, over MQTT, away from the safety loop.

A hash chain shows an edited record, but not records cut off the end, nor a
file rewritten from the start with fresh hashes. A copy of the head kept
somewhere the controller's disk cannot reach closes both: the chain's central
broker keeps the last head each controller published (retained), ingest writes
every published head into InfluxDB (``audit_head``), ``penctl audit verify
--published`` checks a file against the retained head, and the Safety events
dashboard shows any disagreement.

:class:`AuditAnchor` is the publisher's side. It runs wherever the MQTT
publisher runs (today beside the controller, in its process; once issue 12
moves the publisher to an edge process, there), reads the head from the file
(``controller.audit.read_head``, one row, on a worker thread) and never
touches the safety core: it is poked by safety events from a subscription,
and otherwise publishes every ``interval_s``.

Before publishing a new head it checks that the file still holds the head it
published before (``hash_at``; the whole chain against the retained head at
start). If not, the log was cut or rewritten: it keeps publishing the *old*
head with ``agrees: false`` and the file's head beside it, never the new one,
so a rewrite is never laundered into a new anchor. (If a log was replaced on
purpose, an operator clears the retained topic; docs/SECURITY.md.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiomqtt
import structlog

from .audit import AuditFileError, ChainHead, PublishedHead, hash_at, read_head, verify
from .config import MqttSettings
from .contract import EventKind
from .live import Subscription
from .tls import settings_context

log = structlog.get_logger(__name__)

#: Session events that come with a safety record (refusal, stop, fault, override).
SAFETY_EVENTS = frozenset(
    {EventKind.REFUSED, EventKind.STOP_SENT, EventKind.FAULT, EventKind.OVERRIDE_APPLIED}
)


def head_topic(root: str, clinic: str, controller: str) -> str:
    """Where a controller's audit head is published (retained)."""
    return f"{root}/{clinic}/controller/{controller}/audit-head"


def mqtt_client(settings: MqttSettings, identifier: str, **kwargs: Any) -> aiomqtt.Client:
    """An MQTT v5 client for ``settings`` (TLS and credentials included)."""
    return aiomqtt.Client(
        settings.host,
        settings.port,
        username=settings.username,
        password=settings.password,
        identifier=identifier,
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=settings_context(settings.tls),
        **kwargs,
    )


async def fetch_published(
    settings: MqttSettings, clinic: str, controller: str, within: float = 3.0
) -> PublishedHead | None:
    """The retained head for this controller, or None if none was ever published."""
    topic = head_topic(settings.topic_root, clinic, controller)
    async with mqtt_client(settings, f"audit-verify-{time.monotonic_ns()}") as client:
        await client.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(within):
                async for message in client.messages:
                    payload = message.payload
                    if isinstance(payload, bytes | bytearray) and payload:
                        return PublishedHead.parse(bytes(payload))
                    return None  # a cleared retained topic
        except TimeoutError:
            return None
    return None  # pragma: no cover - the loop returns


class _Subscribable(Protocol):
    def subscribe(self, maxsize: int = ...) -> Subscription: ...
    def unsubscribe(self, sub: Subscription) -> None: ...


@dataclass
class AuditAnchor:
    """See the module docstring. ``run()`` until cancelled; ``poke()`` after a safety record."""

    audit_path: Path
    clinic: str
    controller: str
    mqtt: MqttSettings
    interval_s: float = 30.0
    clock: Callable[[], float] = time.time
    published: int = 0
    disagreements: int = 0
    _anchored: ChainHead | None = None
    _checked_at_start: bool = False
    _intact_at_start: bool = True
    _poked: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def topic(self) -> str:
        return head_topic(self.mqtt.topic_root, self.clinic, self.controller)

    def poke(self) -> None:
        """A safety record was written: publish the head now rather than at the interval."""
        self._poked.set()

    async def run(self) -> None:
        delay = 0.5
        while True:
            try:
                async with mqtt_client(
                    self.mqtt, f"anchor-{self.clinic}-{self.controller}", keepalive=30
                ) as client:
                    delay = 0.5
                    if not self._checked_at_start:
                        await self._load_retained(client)
                    while True:
                        await self._publish_once(client)
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(self.interval_s):
                                await self._poked.wait()
                        self._poked.clear()
            except aiomqtt.MqttError as exc:
                log.warning("audit anchor: broker unreachable", error=str(exc), retry_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def follow(self, source: _Subscribable) -> None:
        """Poke on every safety event of ``source`` (the controller's live events)."""
        sub = source.subscribe(maxsize=1024)
        try:
            while True:
                item = await sub.queue.get()
                if getattr(item, "kind", None) in SAFETY_EVENTS:
                    self.poke()
        finally:
            source.unsubscribe(sub)

    async def _load_retained(self, client: aiomqtt.Client) -> None:
        """Take the retained head as the anchor and check the whole file against it."""
        await client.subscribe(self.topic, qos=1)
        retained: PublishedHead | None = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                async for message in client.messages:
                    payload = message.payload
                    if isinstance(payload, bytes | bytearray) and payload:
                        try:
                            retained = PublishedHead.parse(bytes(payload))
                        except ValueError as exc:
                            log.warning("audit anchor: retained head unreadable", error=str(exc))
                    break
        await client.unsubscribe(self.topic)
        self._checked_at_start = True
        if retained is None:
            return
        self._anchored = retained.head
        try:
            report = await asyncio.to_thread(verify, self.audit_path, retained.head)
        except AuditFileError as exc:
            self._intact_at_start = False
            log.error("audit log missing, though a head was published", error=str(exc))
            return
        if not report.ok:
            assert report.first_bad is not None
            self._intact_at_start = False
            log.error(
                "audit log disagrees with its published head",
                published=str(retained.head),
                record=report.first_bad.seq,
                reason=report.first_bad.reason,
            )

    async def _publish_once(self, client: aiomqtt.Client) -> None:
        try:
            head = await asyncio.to_thread(read_head, self.audit_path)
        except AuditFileError as exc:
            log.warning("audit anchor: no audit log yet", error=str(exc))
            return
        if head is None:
            return
        anchored = self._anchored
        agrees = anchored is None or (
            self._intact_at_start
            and head.seq >= anchored.seq
            and await asyncio.to_thread(hash_at, self.audit_path, anchored.seq) == anchored.hash
        )
        if agrees:
            self._anchored = head
            published = PublishedHead(self.clinic, self.controller, head, self.clock())
            payload = published.payload()
        else:
            assert anchored is not None
            self.disagreements += 1
            log.error(
                "audit log no longer holds its published head",
                published=str(anchored),
                local=str(head),
            )
            published = PublishedHead(
                self.clinic, self.controller, anchored, self.clock(), agrees=False
            )
            payload = json.dumps(
                {**json.loads(published.payload()), "local_seq": head.seq, "local_hash": head.hash}
            ).encode()
        await client.publish(self.topic, payload, qos=1, retain=True)
        self.published += 1
