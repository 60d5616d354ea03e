"""The safety core: pens, the session registry, the journal and the audit log, wired.

A thin asyncio shell around :class:`controller.sessions.SessionRegistry`, which
makes every decision. This module wires the parts and moves things between them:

* link events from each pen's :class:`PenLink` into the registry;
* each resulting :class:`Outcome` to the :class:`OutcomeExecutor`, which carries
  it out in the order its contract demands (Stop at once, an Arm only once its
  record is durable, events after their records);
* records to the journal (:class:`RegistryJournal`) and the audit log, on one
  writer thread;
* what was decided to the :class:`Fanout`: the edge process over the channel,
  in-process listeners.

Nothing else runs on this loop (product.md §4.10): the tablet API, the MQTT
publisher and reports live in the edge process (``controller/edge``), which
reaches the core only through the channel (``controller/channel``): it is told
everything, and may ask one thing, to apply an action. The in-process ``act``
family below serves the channel's requests, the scripted therapist and tests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from firmware_protocol import LinkFailed, MessageReceived, NotReadyError
from firmware_protocol.connection import LinkBusyError
from firmware_protocol.messages import Telemetry

from .audit import AuditEntry, AuditLog, AuditRecord, read_recent
from .channel.core_side import CoreChannel, PenTags, socket_path
from .channel.messages import decode_action
from .commit_window import CommitWindow, Serialised
from .config import PenEndpoint, ServiceSettings
from .cpus import pin_core
from .durable_writer import DurableWriter, GroupCommit
from .errors import ActionRefused
from .executor import OutcomeExecutor
from .fanout import Fanout
from .gil import prefer_loop, restore
from .journal import Journal, JournalRow
from .link import LinkDown, LinkUp, PenLink, PenLinkConfig
from .link.pen_link import LinkEvent
from .live import PenCondition, PenView, PenWatchers, Subscription
from .persistence import RegistryJournal
from .policy import Plan, TreatmentPolicy, ZoneLimits, load_policy, policy_as_dict
from .sessions import (
    Action,
    CreateSession,
    LeaseAction,
    LeaseDirective,
    Outcome,
    PenCommand,
    SessionEvent,
    SessionRegistry,
)
from .sessions.readiness import session_controls
from .sessions.records import Session

log = structlog.get_logger(__name__)

#: How long a clean stop waits for the edge to secure the last events and samples.
WIND_DOWN_S = 5.0


@dataclass
class _PenRuntime:
    port: str
    endpoint: PenEndpoint
    link: PenLink
    serial: str | None = None
    #: (port, serial, live session, zone): how its telemetry is tagged for the edge.
    tags: PenTags = ("", None, None, None)


@dataclass
class ServiceCounters:
    telemetry: int = 0
    commands_sent: int = 0
    commands_unsent: int = 0
    audit_records: int = 0


@dataclass
class ControllerService:
    """Runs the configured pens. ``await start()``, use, ``await stop()``.

    ``channel``: listen for the edge process (the tablet API and MQTT) on a Unix
    socket in the state directory; off only for tests of the core alone.
    """

    settings: ServiceSettings
    policy: TreatmentPolicy | None = None
    live_rate_hz: float = 10.0
    channel: bool = True
    counters: ServiceCounters = field(default_factory=ServiceCounters)

    @property
    def controller_id(self) -> str:
        return self.settings.controller_id

    def __post_init__(self) -> None:
        # First, so every thread the core starts (writer, checkpoints) inherits it.
        pin_core(self.settings.core_cpus)
        self._switch_interval: float | None = None  # the process's own, while start()ed
        if self.policy is None:
            self.policy = load_policy(self.settings.policy_file)
        state = self.settings.state_dir
        state.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(state / "journal.db")
        self.audit = AuditLog(state / "audit.db")
        self.writer = DurableWriter()
        # Late-bound (lambdas): a test or bench may slow one of them down in place.
        self.commits: GroupCommit[JournalRow, AuditEntry] = GroupCommit(
            self.writer,
            lambda rows: self.journal.write(rows),
            lambda entries: self.audit.extend(entries),
            "journal and audit",
        )
        self.records = RegistryJournal(self.journal, self.writer, self.commits)
        self.window = CommitWindow(self.records, self.commits, lambda: self.registry)
        self.fanout = Fanout(self.live_rate_hz)
        self.executor = OutcomeExecutor(
            send=self._send,
            apply_lease=self._apply_lease,
            commit=self._commit,
            publish=self.fanout.publish,
            withdraw=self._withdraw_arm,
        )
        lease_ms = self.settings.link.lease_ms
        ports = {
            _port_name(index, endpoint): endpoint.expected_serial
            for index, endpoint in enumerate(self.settings.pens)
        }
        saved = self.records.read()
        if saved is None:
            self.registry = SessionRegistry(self.policy, ports=ports, lease_ms=lease_ms)
        else:
            self.registry = SessionRegistry.from_dict(
                self.policy, saved, ports=ports, lease_ms=lease_ms
            )
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
            self.pens[port] = _PenRuntime(port, endpoint, link, tags=(port, None, None, None))
        self.core_channel: CoreChannel | None = None
        if self.channel:
            self.core_channel = CoreChannel(
                socket_path(state),
                hello=self._hello,
                snapshot=self._snapshot,
                stats=self._stats,
                handle_request=self._handle_request,
                payload_size=Telemetry.FORMAT.size,
            )
            self.fanout.channel = self.core_channel
        self._tasks: list[asyncio.Task[None]] = []
        self._pen_watchers = PenWatchers(self.pen_view)

    # === lifecycle ====================================================================

    async def start(self) -> None:
        """Recover from the journal, listen for the edge, then connect every pen."""
        if self._switch_interval is None:
            self._switch_interval = prefer_loop()
        self.executor.set_loop_callback(asyncio.get_running_loop().call_soon_threadsafe)
        self._execute(self.registry.recover(time.time()), None)
        if self.core_channel is not None:
            await self.core_channel.start()
        # Everything built so far (modules, policy, registry) lives as long as the
        # process: take it out of the collector's sight, so a full collection walks
        # only what treatment allocates and stalls every pen for less time.
        gc.collect()
        gc.freeze()
        for pen in self.pens.values():
            self._tasks.append(asyncio.create_task(pen.link.run(), name=f"link-{pen.port}"))

    async def wind_down(self, within: float | None = None) -> bool:
        """Before a clean stop: let go of the pens (nothing new is decided after this),
        make every record durable and wait, up to ``within`` seconds (None: as long as
        it takes), until the edge has secured every event and sample told so far. True
        if it did (or the core has no channel). Call before the edge is stopped: the
        channel forgets what the edge has not acknowledged when it closes."""
        for pen in self.pens.values():
            await pen.link.close()
        self.sync_records()
        channel = self.core_channel
        if channel is None:
            return True
        try:
            # Also when no edge is connected right now (not yet up, or being restarted
            # after a crash): the next one catches up and secures it, if in time.
            await asyncio.wait_for(channel.drained(), within)
        except TimeoutError:
            log.warning("the edge did not secure the last records before the stop")
            return False
        return True

    async def stop(self) -> None:
        for pen in self.pens.values():
            await pen.link.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.window.close()
        self.writer.close()  # every queued record lands, then its events go out
        self.executor.publish_ready_events()
        if self.core_channel is not None:
            await self.core_channel.stop()
        self.journal.close()
        self.audit.close()
        if self._switch_interval is not None:
            restore(self._switch_interval)
            self._switch_interval = None

    @property
    def socket_path(self) -> str:
        """Where the edge connects (empty without a channel)."""
        return str(self.core_channel.path) if self.core_channel is not None else ""

    # === in-process interface (the channel, the scripted therapist, tests) ============

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
                self.fanout.add_waiter(waiter)

        # Events of earlier outcomes may still wait for their commit: start listening
        # where this action's events begin, or an earlier answer would be taken for its.
        self.executor.listen_from_here(listen)
        try:
            self.act(action)
            async with asyncio.timeout(within):
                return await future
        finally:
            future.cancel()
            self.fanout.remove_waiter(waiter)

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
        return self.fanout.subscribe(maxsize)

    def unsubscribe(self, sub: Subscription) -> None:
        self.fanout.unsubscribe(sub)

    def sync_records(self) -> None:
        """Wait until every journal and audit record decided so far is on disk, and
        publish the events that were waiting for them (tests; never on a running loop's
        hot path)."""
        self.window.flush()
        self.writer.call(lambda: None, "sync")
        self.executor.publish_ready_events()

    def journaled_registry(self) -> dict[str, Any] | None:
        """The registry as the journal holds it (see controller/persistence.py), with
        every record decided so far."""
        self.window.flush()
        return self.records.read()

    # === the channel: what the edge is told, and the one thing it may ask ==============

    def _hello(self) -> dict[str, Any]:
        policy = self.registry.policy
        return {
            "controller_id": self.settings.controller_id,
            "clinic_id": self.settings.clinic_id,
            "pens": [{"name": p.port, "url": p.endpoint.url} for p in self.pens.values()],
            "policy": policy_as_dict(policy),
            "policy_fingerprint": policy.fingerprint,
            "lease_ms": self.settings.link.lease_ms,
        }

    def _snapshot(self) -> list[dict[str, Any]]:
        """Every pen and live session, one document each (sent a few per loop turn)."""
        parts = self.registry.to_parts(self.registry.live_session_ids(), set(self.pens))
        docs: list[dict[str, Any]] = [
            {"pens": {port: body}} for port, body in parts["pens"].items()
        ]
        docs += [{"sessions": {sid: body}} for sid, body in parts["sessions"].items()]
        return docs

    def _stats(self) -> dict[str, Any]:
        return {
            "pens": {
                port: {
                    k: v
                    for k, v in pen.link.stats().items()
                    if isinstance(v, int | float | str) and not isinstance(v, bool)
                }
                for port, pen in self.pens.items()
            }
        }

    def _handle_request(
        self, body: dict[str, Any], reply: Callable[[dict[str, Any]], None]
    ) -> None:
        """One request from the edge: apply an action (or read a session's controls).

        An action is answered once its records are durable and announced, so the edge's
        mirror shows its outcome by the time the tablet gets the answer.
        """
        op = body.get("op")
        if op == "controls":
            reply({"ok": True, "controls": self.controls(str(body.get("session_id", "")))})
            return
        if op != "act":
            reply({"error": "bad_request", "detail": f"unknown op {op!r}"})
            return
        action = decode_action(body.get("action") or {})  # ValueError: answered bad_request
        first = self.fanout.decided
        answer: dict[str, Any]
        try:
            self.act(action)
            answer = {"ok": True, "first_event": first}
        except ActionRefused as exc:
            refusal = exc.refusal
            answer = {
                "refusal": {
                    "code": str(refusal.code),
                    "message": refusal.message,
                    "remediation": refusal.remediation,
                },
                "first_event": first,
            }
        self.executor.after(None, lambda: reply(answer))

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
            self.counters.telemetry += 1
            if self._pen_watchers:  # someone waits for the pen's telemetry rate to be known
                self._pen_watchers.changed(port)
            self.fanout.telemetry(pen.tags, event.message, now)
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

    # === outcomes =====================================================================

    def _execute(self, outcome: Outcome, port: str | None) -> None:
        """Carry out an outcome (see controller/executor.py); wake whoever waits on the pen."""
        self.fanout.decided += len(outcome.events)
        self.executor.execute(outcome, port)
        if self._pen_watchers:  # rarely anyone: a test or a scripted therapist
            self._pen_watchers.changed(port)

    def _commit(self, outcome: Outcome, port: str | None) -> concurrent.futures.Future[Any] | None:
        """Note the outcome's journal and audit records (see controller/commit_window.py);
        the future of the commit that will hold them."""
        if not outcome.state_changed and not outcome.audit:
            return None
        commit, serialised = self.window.add(
            port,
            also=outcome.also_changed,
            state=outcome.state_changed,
            audit=outcome.audit,
        )
        self.counters.audit_records += len(outcome.audit)
        if outcome.state_changed:
            self._refresh_tags(self.pens if port is None else (port,))
        if serialised is not None:

            def tell_edge(parts: Serialised = serialised) -> None:
                if parts.parts is not None:  # None: its serialisation failed (logged)
                    self.fanout.state(parts.parts)

            self.executor.after(commit, tell_edge)
        return commit

    def _refresh_tags(self, ports: Iterable[str]) -> None:
        for port in ports:
            pen = self.pens.get(port)
            if pen is None:
                continue
            # Cheap lookups only: this runs on every state change, at pass rate.
            pen.tags = (
                port,
                pen.serial,
                self.registry.live_session_id(port),
                self.registry.current_zone(port),
            )

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


def _port_name(index: int, endpoint: PenEndpoint) -> str:
    """The registry's name for a configured pen: its name, or pen1, pen2, ..."""
    return endpoint.name or f"pen{index + 1}"


__all__ = ["ActionRefused", "ControllerService", "ServiceCounters"]
