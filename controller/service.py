"""The controller service: pens, the session registry, journal, audit log and telemetry.

A thin asyncio shell around :class:`controller.sessions.SessionRegistry`, which
makes every decision. This module only moves things: link events into the
registry, and each resulting :class:`Outcome` out, in the order its contract
demands (urgent Stop/Disarm first, then the journal and audit log, then other
commands, leases and events). Journal and audit commits run on a DurableWriter
thread, in order; an outcome whose commands depend on its record (an Arm on its
cartridge being marked used) waits for the commit before sending them.

The in-process interface the tablet API calls is the ``act`` family below:
build an action, hand it over, get the session back or a ``ActionRefused``
carrying the therapist-readable reason.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from firmware_protocol import LinkFailed, MessageReceived, NotReadyError
from firmware_protocol.connection import LinkBusyError
from firmware_protocol.messages import Telemetry

from .audit import AuditLog, AuditRecord, read_recent
from .config import PenEndpoint, ServiceSettings
from .durable_writer import DurableWriter
from .errors import ActionRefused
from .executor import OutcomeExecutor
from .journal import Journal
from .link import LinkDown, LinkUp, PenLink, PenLinkConfig
from .link.pen_link import LinkEvent
from .live import LiveTelemetry, PenCondition, PenView, PenWatchers, Subscription
from .policy import Plan, TreatmentPolicy, ZoneLimits, load_policy
from .sessions import (
    Action,
    CreateSession,
    EventKind,
    LeaseAction,
    LeaseDirective,
    Outcome,
    PenCommand,
    SessionEvent,
    SessionRegistry,
)
from .sessions.readiness import session_controls
from .sessions.records import Session
from .telemetry.events import Pseudonymizer
from .telemetry.outbox import Outbox
from .telemetry.publisher import TelemetryPublisher

log = structlog.get_logger(__name__)

REGISTRY_DOC = ("registry", "main")
# Session events worth a line in the service log (telemetry-rate ones are not).
_LOGGED_EVENTS = frozenset(
    {
        EventKind.SESSION_CREATED,
        EventKind.STATE_CHANGED,
        EventKind.PASS_ENDED,
        EventKind.ZONE_COMPLETED,
        EventKind.OVERRIDE_APPLIED,
        EventKind.STOP_SENT,
        EventKind.REFUSED,
        EventKind.FAULT,
        EventKind.SESSION_REPORT,
    }
)


@dataclass
class _PenRuntime:
    port: str
    endpoint: PenEndpoint
    link: PenLink
    serial: str | None = None
    session_id: str | None = None
    zone: str | None = None
    last_live: float = 0.0


@dataclass
class ServiceCounters:
    telemetry: int = 0
    commands_sent: int = 0
    commands_unsent: int = 0
    journal_writes: int = 0
    audit_records: int = 0


@dataclass
class ControllerService:
    """Runs the configured pens. ``await start()``, use, ``await stop()``."""

    settings: ServiceSettings
    policy: TreatmentPolicy | None = None
    controller_id: str = "controller-1"
    live_rate_hz: float = 10.0
    counters: ServiceCounters = field(default_factory=ServiceCounters)

    def __post_init__(self) -> None:
        if self.policy is None:
            self.policy = load_policy(self.settings.policy_file)
        state = self.settings.state_dir
        state.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(state / "journal.db")
        self.audit = AuditLog(state / "audit.db")
        self.writer = DurableWriter()
        self.executor = OutcomeExecutor(
            send=self._send,
            apply_lease=self._apply_lease,
            commit=self._commit,
            publish=self._publish_events,
            withdraw=self._withdraw_arm,
        )
        lease_ms = self.settings.link.lease_ms
        ports = {
            _port_name(index, endpoint): endpoint.expected_serial
            for index, endpoint in enumerate(self.settings.pens)
        }
        saved = self.journaled_registry()
        if saved is None:
            self.registry = SessionRegistry(self.policy, ports=ports, lease_ms=lease_ms)
        else:
            self.registry = SessionRegistry.from_dict(
                self.policy, saved, ports=ports, lease_ms=lease_ms
            )
        self._journaled_live: dict[str, str] = {}  # port -> live session last journaled
        # A Stop leaves the moment the registry decides it, not after the outcome
        # (events, audit entries) is built: that is the safety reaction.
        self.registry.urgent_sink = self.executor.urgent
        self.pens: dict[str, _PenRuntime] = {}
        for index, endpoint in enumerate(self.settings.pens):
            port = _port_name(index, endpoint)
            if port in self.pens:
                raise ValueError(f"pens.{index}.name: {port!r} is used twice")
            link = PenLink(
                PenLinkConfig(
                    url=endpoint.url,
                    baudrate=self.settings.link.baudrate,
                    reconnect_max=self.settings.link.reconnect_max_s,
                ),
                self._link_callback(port),
            )
            self.pens[port] = _PenRuntime(port, endpoint, link)
        self.publisher: TelemetryPublisher | None = None
        if self.settings.mqtt.enabled:
            self.outbox = Outbox(state / "outbox.db")
            self.publisher = TelemetryPublisher(
                self.settings.mqtt,
                self.outbox,
                clinic_id=self.settings.clinic_id,
                controller_id=self.controller_id,
                pseudonymize=Pseudonymizer.configured(self.settings.pseudonym_key, state),
            )
        self._subscribers: set[Subscription] = set()
        self._meta: dict[str, tuple[str | None, str | None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._waiters: list[
            tuple[Callable[[SessionEvent], bool], asyncio.Future[SessionEvent]]
        ] = []
        self._pen_watchers = PenWatchers(self.pen_view)

    # === lifecycle ====================================================================

    async def start(self) -> None:
        """Recover from the journal, then connect every pen (and the broker)."""
        self.executor.set_loop_callback(asyncio.get_running_loop().call_soon_threadsafe)
        self._execute(self.registry.recover(time.time()), None)
        # Everything built so far (modules, policy, registry) lives as long as the
        # process: take it out of the collector's sight, so a full collection walks
        # only what treatment allocates and stalls every pen for less time.
        gc.collect()
        gc.freeze()
        for pen in self.pens.values():
            self._tasks.append(asyncio.create_task(pen.link.run(), name=f"link-{pen.port}"))
        if self.publisher is not None:
            self._tasks.append(asyncio.create_task(self.publisher.run(), name="publisher"))
            self._status_task = asyncio.create_task(self._status_loop(), name="pen statuses")
            self._tasks.append(self._status_task)

    async def stop(self) -> None:
        for pen in self.pens.values():
            await pen.link.close()
        if self.publisher is not None:
            # Retained statuses stay true: every pen and the controller say offline,
            # and no refresh may come after that.
            self._status_task.cancel()
            self.sync_records()
            self._publish_statuses(stopping=True)
            await self.publisher.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.writer.close()  # every queued record lands, then its events go out
        self.executor.publish_ready_events()
        if self.publisher is not None:
            self.publisher.flush()
            self.outbox.close()
        self.journal.close()
        self.audit.close()

    # === in-process interface (the tablet API calls these) ===========================

    def act(self, action: Action) -> Outcome:
        """Apply a therapist or manager action. Raises ActionRefused with the reason."""
        port = (
            action.port
            if isinstance(action, CreateSession)
            else self.registry.port_of(action.session_id)
        )
        outcome = self.registry.handle(action, time.time())
        self._execute(outcome, port)
        if outcome.refusal is not None:
            raise ActionRefused(outcome.refusal)
        return outcome

    async def act_and_wait(
        self, action: Action, until: Callable[[SessionEvent], bool], within: float = 2.0
    ) -> SessionEvent:
        """Act, then wait for the first session event that satisfies ``until``.

        For actions the pen must confirm (arming): the registry answers at once,
        the pen a round trip later.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[SessionEvent] = loop.create_future()
        waiter = (until, future)

        def listen() -> None:
            if not future.done():
                self._waiters.append(waiter)

        # Events of earlier outcomes may still wait for their commit: start listening
        # where this action's events begin, or an earlier answer would be taken for its.
        self.executor.listen_from_here(listen)
        try:
            self.act(action)
            async with asyncio.timeout(within):
                return await future
        finally:
            future.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def session(self, session_id: str) -> Session | None:
        return self.registry.session(session_id)

    def sessions(self) -> list[Session]:
        """Every session held, live and ended (copies)."""
        return self.registry.sessions()

    def report(self, session_id: str) -> dict[str, Any] | None:
        """The session's report (final once it ended); None if there is no such session."""
        return self.registry.report(session_id)

    def plans(self) -> list[Plan]:
        """The treatment plans of the policy in force, in its order."""
        return list(self.registry.policy.plans.values())

    def zones(self) -> Mapping[str, ZoneLimits]:
        """Every zone of the policy in force, by id, in its order."""
        return self.registry.policy.zones

    async def audit_records(self, session_id: str | None, limit: int) -> list[AuditRecord]:
        """The newest ``limit`` audit records (of one session), oldest first; off the loop."""
        path = self.settings.state_dir / "audit.db"
        return await asyncio.to_thread(read_recent, path, session_id=session_id, limit=limit)

    def controls(self, session_id: str) -> dict[str, Any] | None:
        """What the tablet may do in the session now, each refusal with its reason (plain
        data: ``controller.sessions.readiness``); None if there is no such session."""
        registry = self.registry
        session = registry.session(session_id)
        if session is None:
            return None
        context = registry.gate_context(session.port)
        return session_controls(session, context, registry.pen(session.port))

    def pen_view(self, port: str) -> PenView:
        """What the tablet shows of the pen now; cheap (no copy of the session)."""
        registry = self.registry
        return PenView.of(port, registry.gate_context(port), registry.live_session_id(port))

    async def wait_for_pen(self, port: str, until: PenCondition, within: float = 30.0) -> PenView:
        """The pen's first view that satisfies ``until``; TimeoutError after ``within`` s.

        Checked after each input the registry handles, never polled: for what no event
        announces, such as the cartridge a pen reports in answer to the status query.
        """
        return await self._pen_watchers.wait(port, until, within)

    def new_session_id(self) -> str:
        return "s-" + secrets.token_hex(6)

    def devices(self) -> list[dict[str, Any]]:
        out = []
        for port, pen in self.pens.items():
            state = self.registry.pen(port)
            out.append(
                {
                    "port": port,
                    "url": pen.endpoint.url,
                    "name": pen.endpoint.name,
                    "serial": state.serial,
                    "firmware": state.firmware,
                    "link": state.link,
                    "armed": state.arm.value,
                    "motor_running": state.motor_running,
                    "cartridge_id": state.cartridge_id,
                    "session_id": self.registry.live_session_id(port),
                    "link_stats": pen.link.stats(),
                }
            )
        return out

    def subscribe(self, maxsize: int = 256) -> Subscription:
        """Live events and tablet-rate telemetry for every pen; unsubscribe() when done."""
        sub = Subscription(maxsize)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    # === link events ==================================================================

    def _link_callback(self, port: str) -> Callable[[LinkEvent], None]:
        def on_event(event: LinkEvent) -> None:
            self._on_link_event(port, event)

        return on_event

    def _on_link_event(self, port: str, event: LinkEvent) -> None:
        now = time.time()
        pen = self.pens[port]
        if isinstance(event, MessageReceived) and isinstance(event.message, Telemetry):
            # The hot path: one call per sample per pen, 100 Hz each.
            outcome = self.registry.handle_link_event(port, event, now)
            if outcome.commands or outcome.events or outcome.state_changed:
                self._execute(outcome, port)
            self._on_telemetry(pen, event.message, now)
            return
        if isinstance(event, LinkUp):
            pen.serial = event.identity.serial_text
            log.info(
                "pen connected",
                port=port,
                serial=pen.serial,
                firmware=event.identity.firmware_version,
                boot_id=event.identity.boot_id,
            )
            outcome = self.registry.pen_connected(port, event.identity, now)
        elif isinstance(event, LinkDown):
            log.warning("pen link down", port=port, serial=pen.serial, reason=event.reason)
            outcome = self.registry.link_down(port, event.reason, now)
        elif isinstance(event, LinkFailed):
            return  # LinkDown follows from the link shell with the same reason
        else:
            outcome = self.registry.handle_link_event(port, event, now)
        self._execute(outcome, port)
        if isinstance(event, LinkUp | LinkDown):
            self._publish_statuses([port])

    async def _status_loop(self) -> None:
        # Retained statuses stay true: refreshed link counters, and a controller
        # that stops refreshing them is noticed (docs/MQTT.md).
        while True:
            await asyncio.sleep(self.settings.mqtt.status_interval_s)
            self._publish_statuses()

    def _publish_statuses(
        self, ports: Iterable[str] | None = None, *, stopping: bool = False
    ) -> None:
        if self.publisher is None:
            return
        for port in self.pens if ports is None else ports:
            pen, state = self.pens[port], self.registry.pen(port)
            if pen.serial:
                self.publisher.set_status(
                    pen.serial,
                    online=state.link == "up" and not stopping,
                    state="stopped" if stopping else state.link,
                    firmware=state.firmware,
                    session=pen.session_id,
                    link=pen.link.stats(),
                )

    def _on_telemetry(self, pen: _PenRuntime, sample: Telemetry, now: float) -> None:
        self.counters.telemetry += 1
        if self._pen_watchers:  # someone waits for the pen's telemetry rate to be known
            self._pen_watchers.changed(pen.port)
        if self.publisher is not None and pen.serial:
            self.publisher.add_sample(pen.serial, sample, session=pen.session_id, zone=pen.zone)
        if self._subscribers and now - pen.last_live >= 1.0 / self.live_rate_hz:
            pen.last_live = now
            item = LiveTelemetry(
                pen.port,
                pen.session_id,
                now,
                sample.depth_set_um,
                sample.depth_um,
                sample.speed_hz,
                sample.strokes,
                sample.flags,
            )
            for sub in self._subscribers:
                sub.offer(item)

    # === outcomes =====================================================================

    def _execute(self, outcome: Outcome, port: str | None) -> None:
        """Carry out an outcome (see controller/executor.py); wake whoever waits on the pen."""
        self.executor.execute(outcome, port)
        if self._pen_watchers:  # rarely anyone: a test or a scripted therapist
            self._pen_watchers.changed(port)

    def _commit(self, outcome: Outcome, port: str | None) -> concurrent.futures.Future[Any] | None:
        """Queue the outcome's journal and audit records; the future of the last one."""
        commit: concurrent.futures.Future[Any] | None = None
        if outcome.state_changed:
            commit = self._save_registry(port, outcome.also_changed)
        if outcome.audit:
            entries = list(outcome.audit)
            commit = self.writer.submit(lambda: self.audit.extend(entries), "audit")
            self.counters.audit_records += len(entries)
        return commit

    def _publish_events(self, events: Sequence[SessionEvent]) -> None:
        for event in events:
            self._publish_event(event)

    def _withdraw_arm(self, port: str, token: int, why: str) -> None:
        self._execute(self.registry.arm_withdrawn(port, token, why, time.time()), port)

    def _apply_lease(self, lease: LeaseDirective) -> None:
        pen = self.pens.get(lease.port)
        if pen is None:
            return
        if lease.action is LeaseAction.KEEP_RENEWING and lease.token is not None:
            pen.link.keep_armed(lease.token, lease.lease_ms or self.settings.link.lease_ms)
        else:
            pen.link.stop_renewing()

    def _send(self, command: PenCommand) -> None:
        pen = self.pens.get(command.port)
        message = command.message
        if pen is None:
            return
        try:
            pen.link.send(message)
            self.counters.commands_sent += 1
        except (NotReadyError, LinkBusyError) as exc:
            # Nothing to do for a Stop here: the pen stops by its lease. The
            # registry learns about the link through LinkDown.
            self.counters.commands_unsent += 1
            log.warning(
                "command not sent",
                port=command.port,
                message=type(message).__name__,
                error=str(exc),
            )

    def sync_records(self) -> None:
        """Wait until every journal and audit record decided so far is on disk, and
        publish the events that were waiting for them."""
        self.writer.call(lambda: None, "sync")
        self.executor.publish_ready_events()

    def journaled_registry(self) -> dict[str, Any] | None:
        """Reassemble what _save_registry stored piecewise (see SessionRegistry.to_parts),
        once every record queued before the call has landed."""
        return self.writer.call(self._read_journal, "journal read")

    def _read_journal(self) -> dict[str, Any] | None:
        meta = self.journal.load(*REGISTRY_DOC)
        if meta is None:
            return None
        return {
            **meta,
            "pens": self.journal.load_all("pen"),
            "sessions": self.journal.load_all("session"),
            "ledger": self.journal.load_all("cartridge"),
        }

    def _save_registry(
        self, port: str | None, also: Iterable[str] = ()
    ) -> concurrent.futures.Future[None]:
        """Journal what the input on ``port`` can have changed (None: everything live).

        Whole-registry snapshots grew with the clinic's history and stalled every
        pen's event loop for milliseconds; an input changes one port's pen, the
        session live there before or after it, and that session's cartridges.
        """
        registry = self.registry
        sessions: set[str | None]
        if port is None:
            ports = set(registry.to_dict()["pens"])
            sessions = {*registry.live_session_ids(), *self._journaled_live.values()}
        else:
            ports = {port}
            sessions = {registry.live_session_id(port), self._journaled_live.get(port)}
        parts = registry.to_parts({s for s in (*sessions, *also) if s}, ports)
        docs: list[tuple[str, str, Mapping[str, Any]]] = [
            (
                *REGISTRY_DOC,
                {
                    "format": parts["format"],
                    "next_token": parts["next_token"],
                    "departed": parts["departed"],
                },
            )
        ]
        docs += [("pen", p, body) for p, body in parts["pens"].items()]
        docs += [("session", sid, body) for sid, body in parts["sessions"].items()]
        docs += [("cartridge", cid, body) for cid, body in parts["ledger"].items()]
        rows = self.journal.encode(docs)
        commit = self.writer.submit(lambda: self.journal.write(rows), "journal")
        for p in ports:
            live = registry.live_session_id(p)
            if live is None:
                self._journaled_live.pop(p, None)
            else:
                self._journaled_live[p] = live
        self.counters.journal_writes += 1
        self._refresh_tags(ports)
        return commit

    def _refresh_tags(self, ports: Iterable[str]) -> None:
        for port in ports:
            pen = self.pens.get(port)
            if pen is None:
                continue
            # Cheap lookups only: this runs on every state change, at pass rate.
            pen.session_id = self.registry.live_session_id(port)
            zone = self.registry.gate_context(port).zone
            pen.zone = zone.zone_id if zone else None

    def _session_meta(self, session_id: str | None) -> tuple[str | None, str | None]:
        """(therapist, plan) of a session; fixed for its life, so looked up once."""
        if session_id is None:
            return None, None
        meta = self._meta.get(session_id)
        if meta is None:
            session = self.registry.session(session_id)
            meta = (session.therapist_id, session.plan_id) if session else (None, None)
            self._meta[session_id] = meta
        return meta

    def _publish_event(self, event: SessionEvent) -> None:
        if event.kind in _LOGGED_EVENTS:
            log.info(
                event.kind.value,
                port=event.port,
                session=event.session_id,
                **{k: v for k, v in event.detail.items() if isinstance(v, str | int | float)},
            )
        for sub in self._subscribers:
            sub.offer(event)
        for until, future in list(self._waiters):
            if not future.done() and until(event):
                future.set_result(event)
        if self.publisher is None:
            return
        pen = self.pens.get(event.port)
        serial = pen.serial if pen else None
        if not serial:
            return
        therapist, plan = self._session_meta(event.session_id)
        self.publisher.add_event(
            serial,
            event.kind.value,
            event.detail,
            session=event.session_id,
            therapist=therapist,
            plan=plan,
            zone=pen.zone if pen else None,
        )


def _port_name(index: int, endpoint: PenEndpoint) -> str:
    """The registry's name for a configured pen: its name, or pen1, pen2, ..."""
    return endpoint.name or f"pen{index + 1}"
