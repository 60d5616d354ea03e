"""The session registry: every session, pen and cartridge of one controller, as a pure object.

Sans-I/O, like ``firmware_protocol``: inputs in, an :class:`Outcome` out, and
time is always an argument (``now``: seconds since the Unix epoch, the
caller's wall clock; it stamps records and audit entries, nothing is timed
with it). Nothing here touches a socket, a file or a clock.

Inputs:

* therapist and manager actions: :meth:`SessionRegistry.handle` with an
  ``actions`` dataclass;
* the pen link: :meth:`pen_connected`, :meth:`link_down`,
  :meth:`handshake_refused`, :meth:`pen_rebooted`, :meth:`pen_message`, or
  :meth:`handle_link_event` with a ``firmware_protocol`` link event;
* a restart: :meth:`from_dict` then :meth:`recover`.

Outputs: see :mod:`controller.sessions.outcome` for what the runtime does
with an Outcome, and in which order.

Safety properties (product.md §4), and where they come from:

* Every command in an Outcome went through :func:`controller.safety.check_command`
  with a context built from this registry's state at that instant; Stop and
  Disarm are the only commands that need no permission.
* After every input, a pen that may be armed or running is re-checked against
  the arming rules; if it would no longer be allowed to arm, it is stopped and
  its lease is no longer renewed. The gate's verdict can only change when an
  input arrives, so this is as strong as checking every Renew.
* Every telemetry sample of a running pen goes through
  :func:`controller.safety.check_telemetry`; a breach sends Stop on every
  breaching sample and is recorded once.
* Passes are counted from pen events (MotorStarted to MotorStopped, any
  reason); a pass cut short by a link loss, a reboot or a controller restart
  still counts.
* A recovered session that was treating comes back INTERRUPTED, disarmed:
  only the therapist resumes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from controller.audit import AuditKind
from controller.policy import PolicyError, TreatmentPolicy
from controller.safety.context import GateContext, LinkStatus, SessionState
from controller.safety.monitor import check_telemetry
from firmware_protocol.connection import (
    Connected,
    Delivered,
    Event,
    HandshakeRefused,
    LinkFailed,
    MessageReceived,
    PeerRebooted,
    ProtocolViolation,
)
from firmware_protocol.messages import (
    COUNTER_MOD,
    Identity,
    Message,
    Telemetry,
    TelemetryFlag,
    counter_diff,
)

from . import link_events, pen_events
from .actions import Action
from .enforcement import close_pass, fire, stop_for, unapproved
from .ledger import CartridgeLedger
from .outcome import EMPTY, LeaseAction, LeaseDirective, Outcome, OutcomeBuilder, UrgentSink
from .records import PenState, Session
from .report import build_report
from .states import LIVE_STATES, ArmState, SessionInput
from .step import Step, zone_context
from .store import FORMAT_VERSION, RegistryStore
from .therapist import handle_action

__all__ = ["FORMAT_VERSION", "SessionRegistry"]


class SessionRegistry:
    """All sessions, pens and the cartridge ledger: a facade over the parts of this
    package (see the module docstring and ``__init__.py``)."""

    def __init__(
        self,
        policy: TreatmentPolicy,
        *,
        ports: Mapping[str, str | None],
        lease_ms: int = 250,
    ) -> None:
        """``ports``: the configured pens, port -> the serial expected there (None: any);
        a session may only be opened on one of them. ``lease_ms``: the arming lease to
        ask for; PolicyError if the policy forbids it."""
        if not 0 < lease_ms <= policy.max_lease_ms:
            # Fail closed at start (product.md §4.1) rather than refuse every Arm later.
            raise PolicyError(
                "settings",
                [
                    f"link.lease_ms: {lease_ms} must be between 1 and the policy's "
                    f"max_lease_ms ({policy.max_lease_ms})"
                ],
            )
        self.policy = policy
        self.ports: Mapping[str, str | None] = dict(ports)
        #: The lease each Arm asks for (the service's link.lease_ms).
        self.lease_ms = lease_ms
        self._store = RegistryStore()
        #: Called with each Stop or Disarm the moment it is decided, before the rest
        #: of the outcome (events, audit entries, state) is built: the runtime sends
        #: it at once, so the safety reaction does not wait for the bookkeeping.
        #: None (pure use, tests): urgent commands are only in the outcome.
        self.urgent_sink: UrgentSink | None = None

    def _step(self, now: float) -> Step:
        return Step(
            self._store,
            self.policy,
            self.lease_ms,
            self.ports,
            now,
            OutcomeBuilder(urgent_sink=self.urgent_sink),
        )

    # === queries ==========================================================================

    def session(self, session_id: str) -> Session | None:
        """A copy of the session's record (mutating it changes nothing here)."""
        found = self._store.sessions.get(session_id)
        return found.model_copy(deep=True) if found else None

    def sessions(self) -> list[Session]:
        return [s.model_copy(deep=True) for s in self._store.sessions.values()]

    def pen(self, port: str) -> PenState:
        return self._store.pen(port).model_copy()

    def live_session_id(self, port: str) -> str | None:
        return self._store.live_by_port.get(port)

    @property
    def ledger(self) -> CartridgeLedger:
        return self._store.ledger

    def current_zone(self, port: str) -> str | None:
        """The zone the session live on ``port`` is treating, if any (cheap: no context
        is built; it tags every telemetry sample)."""
        session = self._store.live(port)
        if session is None or session.current_zone not in session.zones:
            return None
        return session.current_zone

    def gate_context(self, port: str) -> GateContext:
        """The context the gate sees for this pen right now."""
        return self._step(0.0).context(port, self._store.live(port))

    def report(self, session_id: str) -> dict[str, Any] | None:
        """The end-of-session report: zones, passes, depths against limits, cartridges."""
        session = self._store.sessions.get(session_id)
        return build_report(session) if session else None

    # === persistence ======================================================================

    def to_dict(self) -> dict[str, Any]:
        """The whole state as plain JSON-able data; :meth:`from_dict` restores it exactly."""
        return self._store.to_dict()

    def live_session_ids(self) -> set[str]:
        """Sessions not yet ENDED: the only ones any input can still change."""
        return set(self._store.live_by_port.values())

    def port_of(self, session_id: str) -> str | None:
        """The port a session is on (cheap: no copy)."""
        session = self._store.sessions.get(session_id)
        return session.port if session else None

    def to_parts(self, session_ids: set[str], ports: set[str]) -> dict[str, Any]:
        """The part of :meth:`to_dict` that one input can have changed (see RegistryStore)."""
        return self._store.to_parts(session_ids, ports)

    @classmethod
    def from_dict(
        cls,
        policy: TreatmentPolicy,
        data: dict[str, Any],
        *,
        ports: Mapping[str, str | None],
        lease_ms: int = 250,
    ) -> SessionRegistry:
        """Restore exactly what :meth:`to_dict` produced. Call :meth:`recover` after a restart.

        Raises ValueError (pydantic's ValidationError is one) if the data does not fit.
        """
        registry = cls(policy, ports=ports, lease_ms=lease_ms)
        registry._store = RegistryStore.from_dict(data)
        return registry

    def recover(self, now: float) -> Outcome:
        """After a restart: no link is up, no pen is armed, no pass is running.

        A session that was ACTIVE or PAUSED comes back INTERRUPTED; the pass that
        was running (if any) is closed and counted. The pen stopped by itself
        within its lease. Only a therapist resumes, and arms again.
        """
        step = self._step(now)
        out = step.out
        for pen in self._store.pens.values():
            pen.link = LinkStatus.DOWN
            pen.arm = ArmState.DISARMED
            pen.lease_token = None
            pen.motor_running = False
            pen.stopping = False
            # Nothing the pen confirmed before is assumed until it reports again (Status);
            # its counters and last arming stay, to reconcile what happened meanwhile.
            pen.confirmed = False
            pen.confirmed_at_ms = None
            pen.depth_set_um = None
            pen.depth_pending_um = None
            out.leases.append(LeaseDirective(pen.port, LeaseAction.STOP_RENEWING))
        for session in list(self._store.sessions.values()):
            if session.state not in LIVE_STATES:
                continue
            before = session.state
            close_pass(step, session, "controller_restart")
            fire(step, session, SessionInput.CONTROLLER_RESTARTED, "controller restart")
            step.audit(
                AuditKind.RECOVERY,
                session,
                session.port,
                f"The controller restarted; the session was {before} and is now "
                f"{session.state}. The pen stopped by itself.",
                "Check the pen and the client, then tap Resume and arm again to continue."
                if session.state is SessionState.INTERRUPTED
                else "",
                {"before": str(before), "after": str(session.state)},
            )
        out.state_changed = True
        return out.build()

    def archive(self, session_id: str) -> dict[str, Any] | None:
        """Remove an ENDED session from memory and return its record (store it first)."""
        sessions = self._store.sessions
        session = sessions.get(session_id)
        if session is None or session.state is not SessionState.ENDED:
            return None
        del sessions[session_id]
        return session.model_dump(mode="json")

    # === therapist and manager actions ====================================================

    def handle(self, action: Action, now: float) -> Outcome:
        """Apply one therapist or manager action. A refusal is in ``Outcome.refusal``."""
        step = self._step(now)
        handle_action(step, action)
        return step.out.build()

    # === the pen link =====================================================================

    def handle_link_event(self, port: str, event: Event, now: float) -> Outcome:
        """Feed one ``firmware_protocol`` link event (from HostConnection or PenLink)."""
        match event:
            case MessageReceived():
                if isinstance(event.message, Telemetry):
                    return self._on_telemetry(port, event.message, now, event.in_order)
                return self.pen_message(port, event.message, now)
            case Delivered():
                step = self._step(now)
                if not link_events.delivered(step, port, event.message):
                    return EMPTY
                return step.out.build()
            case Connected() if event.identity is not None:
                return self.pen_connected(port, event.identity, now)
            case LinkFailed():
                return self.link_down(port, event.reason, now)
            case PeerRebooted():
                return self.pen_rebooted(port, event.previous, event.current, now)
            case HandshakeRefused():
                return self.handshake_refused(port, event.reason, event.identity, now)
            case ProtocolViolation() | Connected():
                return EMPTY
        return EMPTY  # pragma: no cover - the union is exhausted above

    def pen_connected(self, port: str, identity: Identity, now: float) -> Outcome:
        """The handshake succeeded (``Connected``/``LinkUp``): the pen is identified."""
        step = self._step(now)
        link_events.pen_connected(step, port, identity)
        return step.out.build()

    def link_down(self, port: str, reason: str, now: float) -> Outcome:
        """The link is gone (``LinkFailed``, ``LinkDown``). The pen stops within its lease."""
        step = self._step(now)
        link_events.link_down(step, port, reason)
        return step.out.build()

    def handshake_refused(self, port: str, reason: str, identity: Identity, now: float) -> Outcome:
        """The pen failed the handshake (protocol/schema mismatch): it must never be armed."""
        step = self._step(now)
        link_events.handshake_refused(step, port, reason, identity)
        return step.out.build()

    def pen_rebooted(self, port: str, previous: Identity, current: Identity, now: float) -> Outcome:
        """``PeerRebooted``: the pen announced a new boot id. Treatment never resumes by itself."""
        step = self._step(now)
        link_events.pen_rebooted(step, port, current)
        return step.out.build()

    def arm_withdrawn(self, port: str, token: int, why: str, now: float) -> Outcome:
        """The runtime did not send the Arm with ``token``: the pen was never asked to arm."""
        step = self._step(now)
        link_events.arm_withdrawn(step, port, token, why)
        return step.out.build()

    def pen_message(self, port: str, message: Message, now: float) -> Outcome:
        """A message from the pen (``MessageReceived.message``)."""
        if isinstance(message, Telemetry):
            return self._on_telemetry(port, message, now)
        step = self._step(now)
        if not pen_events.pen_message(step, port, message):
            return EMPTY
        return step.out.build()

    def _on_telemetry(
        self, port: str, sample: Telemetry, now: float, in_order: bool = True
    ) -> Outcome:
        # The hot path (every sample of every pen): no Step unless something must be done.
        store = self._store
        pen = store.pen(port)
        flags = sample.flags
        if in_order:
            store.rate(port).add(sample.device_ms)
        if (
            not pen.motor_running
            and not flags & TelemetryFlag.MOTOR_RUNNING
            and (not flags & TelemetryFlag.ARMED or pen.arm is not ArmState.DISARMED)
        ):
            return EMPTY  # an idle needle, armed as far as we know or not at all
        step = self._step(now)
        session = store.live(port)
        if in_order and _runs_unapproved(pen, sample):
            unapproved(
                step,
                port,
                session,
                "The pen reports itself armed or running after it confirmed it was disarmed.",
            )
            return step.out.build()
        if in_order:
            ctx = step.context(port, session)
        else:
            # An older sample (duplicated or overtaken on the line) is judged too, against
            # the pass it was taken in; an idle one was not a puncture.
            if not flags & TelemetryFlag.MOTOR_RUNNING:
                return EMPTY
            ctx = _context_of_run(step, port, session, sample.runs)
        decision = check_telemetry(ctx, sample)
        if decision is None:
            return EMPTY  # the common case: nothing changes, nothing to journal
        stop_for(step, port, session, decision)
        return step.out.build()


def _runs_unapproved(pen: PenState, sample: Telemetry) -> bool:
    """An in-order sample showing the pen armed or running while the controller holds it
    confirmed disarmed, taken after the pen last reported its state.

    The pen applies a Stop before it sends any later frame (PROTOCOL.md §10), and the
    line keeps order, so such a sample is the pen acting without approval.
    """
    if pen.arm is not ArmState.DISARMED or pen.stopping or not pen.confirmed:
        return False
    if not sample.flags & (TelemetryFlag.ARMED | TelemetryFlag.MOTOR_RUNNING):
        return False
    since = pen.confirmed_at_ms
    return since is None or counter_diff(sample.device_ms, since) < COUNTER_MOD // 2


def _context_of_run(step: Step, port: str, session: Session | None, run: int) -> GateContext:
    """The gate context as it was during the pen's run ``run`` (for a late sample)."""
    ctx = step.context(port, session)
    if session is None:
        return ctx
    passes = [session.current_pass] if session.current_pass else []
    record = next((p for p in [*passes, *reversed(session.passes)] if p.run == run), None)
    if record is None:
        return ctx
    zone = session.zones[record.zone_id]
    return dataclasses.replace(
        ctx,
        session_state=SessionState.ACTIVE,
        fault=None,
        zone=zone_context(zone),
        depth_setpoint_um=record.depth_setpoint_um,
        pass_start_strokes=record.start_strokes,
        motor_running=True,
        telemetry_rate_hz=None,  # the rate is judged on samples in order only
    )
