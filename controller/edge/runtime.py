"""The edge process's work: everything the clinic sees of the core, none of it on its loop.

:class:`Edge` joins the safety core's channel (:class:`CoreClient`) and serves,
from the mirror it keeps:

* the MQTT publisher: every telemetry sample and event of the core's stream goes
  into the durable outbox, and only then is the stream acknowledged to the core,
  so nothing is lost if this process dies (the core sends again what was not
  acknowledged); pen statuses, retained, refreshed from the core's STATS;
* the audit log's anchor (its head published over MQTT);
* the tablet API (uvicorn), whose reads are answered here and whose actions are
  the only requests that reach the core.

``python -m controller.edge`` runs it as the process the core supervises; tests
may run it in their own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from controller.api import UserStore, create_app
from controller.api.server import ApiServer
from controller.audit_anchor import AuditAnchor
from controller.channel.messages import StreamItem
from controller.config import ServiceSettings
from controller.influx import InfluxSettings
from controller.telemetry.events import Pseudonymizer
from controller.telemetry.outbox import Outbox
from controller.telemetry.publisher import TelemetryPublisher
from firmware_protocol.messages import Telemetry, decode_message

from .client import CoreClient

log = structlog.get_logger(__name__)


@dataclass
class EdgeCounters:
    samples: int = 0
    events: int = 0
    secured: int = 0  # stream items committed to the outbox (then acknowledged)


@dataclass
class Edge:
    """See the module docstring. ``api``/``mqtt`` default to the settings' ``enabled``."""

    settings: ServiceSettings
    socket: Path
    users: UserStore | None = None
    api: bool | None = None
    mqtt: bool | None = None
    #: Where the manager's charts are read from; default: the settings' ``[influx]``.
    charts: InfluxSettings | None = None
    counters: EdgeCounters = field(default_factory=EdgeCounters)

    def __post_init__(self) -> None:
        settings = self.settings
        self.client = CoreClient(self.socket, state_dir=settings.state_dir, on_stream=self._secure)
        self.publisher: TelemetryPublisher | None = None
        self.outbox: Outbox | None = None
        self.server: ApiServer | None = None
        self.anchor: AuditAnchor | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._meta: dict[str, tuple[str | None, str | None]] = {}
        if self.mqtt if self.mqtt is not None else settings.mqtt.enabled:
            self.outbox = Outbox(settings.state_dir / "outbox.db")
            self.publisher = TelemetryPublisher(
                settings.mqtt,
                self.outbox,
                clinic_id=settings.clinic_id,
                controller_id=settings.controller_id,
                pseudonymize=Pseudonymizer.configured(settings.pseudonym_key, settings.state_dir),
            )

    async def start(self) -> None:
        """Join the core (waits for its first snapshot), then serve."""
        settings = self.settings
        if self.api if self.api is not None else settings.api.enabled:
            users = self.users or UserStore()
            if not users.users:
                log.warning("no API users: set api.users_file (or api.demo_users for a demo)")
            charts = self.charts or _charts_influx(settings)
            app = create_app(self.client, users, settings.api, influx=charts)
            # Bound before anything else: a taken port stops the start, loudly.
            self.server = ApiServer(app, settings.api.host, settings.api.port, settings.api)
        await self.client.start()
        async with asyncio.timeout(30):
            await self.client.ready.wait()
        if self.publisher is not None:
            anchor = self.anchor = AuditAnchor(
                settings.state_dir / "audit.db",
                settings.clinic_id,
                settings.controller_id,
                settings.mqtt,
            )
            self._tasks += [
                asyncio.create_task(self.publisher.run(), name="publisher"),
                asyncio.create_task(self._statuses(), name="pen statuses"),
                asyncio.create_task(anchor.run(), name="audit-anchor"),
                asyncio.create_task(anchor.follow(self.client), name="audit-anchor-events"),
            ]
        if self.server is not None:
            await self.server.start()
            log.info("tablet API listening", url=self.server.url)

    async def stop(self) -> None:
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.stop()
        publisher = self.publisher
        if publisher is not None:
            for task in self._tasks[1:]:  # statuses and anchor first: no refresh after goodbye
                task.cancel()
            await asyncio.gather(*self._tasks[1:], return_exceptions=True)
            self._publish_statuses(stopping=True)
            await publisher.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.stop()
        if publisher is not None:
            publisher.flush()
        if self.outbox is not None:
            self.outbox.close()

    # --- the core's stream into the outbox ----------------------------------------------

    async def _secure(self, item: StreamItem) -> None:
        """Put one stream item into the durable outbox (the client acknowledges it after)."""
        publisher = self.publisher
        if publisher is None:
            return
        for record in item.records:
            _port, serial, session, zone = item.pens[record.pen]
            if not serial:
                continue
            sample = decode_message(Telemetry.TYPE, record.payload)
            assert isinstance(sample, Telemetry)
            publisher.add_sample(serial, sample, session=session, zone=zone)
            self.counters.samples += 1
        for _, event in item.events:
            state = self.client.pen_state(event.port)
            serial = state.serial if state else None
            if not serial:
                continue
            therapist, plan = self._session_meta(event.session_id)
            publisher.add_event(
                serial,
                event.kind.value,
                event.detail,
                session=event.session_id,
                therapist=therapist,
                plan=plan,
                zone=self._zone_of(event.port),
            )
            self.counters.events += 1
        publisher.flush()  # committed: now the core may forget it
        self.counters.secured += 1

    def _session_meta(self, session_id: str | None) -> tuple[str | None, str | None]:
        """(therapist, plan) of a session; fixed for its life, so looked up once."""
        if session_id is None:
            return None, None
        meta = self._meta.get(session_id)
        if meta is None:
            session = self.client.session(session_id)
            meta = (session.therapist_id, session.plan_id) if session else (None, None)
            self._meta[session_id] = meta
        return meta

    def _zone_of(self, port: str) -> str | None:
        for device in self.client.devices():
            if device["port"] == port and device["session_id"]:
                session = self.client.session(device["session_id"])
                return session.current_zone if session else None
        return None

    # --- statuses -------------------------------------------------------------------------

    async def _statuses(self) -> None:
        # Retained statuses stay true: refreshed link counters, and a controller that
        # stops refreshing them is noticed (docs/MQTT.md).
        while True:
            self._publish_statuses()
            await asyncio.sleep(self.settings.mqtt.status_interval_s)

    def _publish_statuses(self, *, stopping: bool = False) -> None:
        publisher = self.publisher
        if publisher is None:
            return
        for device in self.client.devices():
            if device["serial"]:
                link: Mapping[str, Any] = device["link_stats"]
                publisher.set_status(
                    device["serial"],
                    online=device["link"] == "up" and not stopping,
                    state="stopped" if stopping else device["link"],
                    firmware=device["firmware"],
                    session=device["session_id"],
                    link=link,
                )


def _charts_influx(settings: ServiceSettings) -> InfluxSettings:
    """Where the manager's charts are read from: the ``[influx]`` the ingest workers fill."""
    influx = settings.influx
    return InfluxSettings(
        url=influx.url,
        database=influx.database,
        username=influx.username,
        password=influx.password,
        token=influx.token,
        timeout=5.0,
    )
