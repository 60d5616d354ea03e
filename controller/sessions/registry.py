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

import re
from typing import Any, Final

from controller.audit import AuditEntry, AuditKind
from controller.policy import PolicyError, TreatmentPolicy
from controller.safety.context import (
    CartridgeStatus,
    GateContext,
    LinkStatus,
    SafetyLimits,
    SessionState,
    ZoneContext,
)
from controller.safety.gate import (
    RefusalReason,
    Refused,
    arming_refusal,
    check_command,
    format_mm,
    link_not_usable,
    passes_used,
    session_not_active,
)
from controller.safety.monitor import StopDecision, check_telemetry
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
    FAULT_REASONS,
    Arm,
    Armed,
    CartridgeInserted,
    CartridgeRemoved,
    CommandRefused,
    Disarm,
    Disarmed,
    HostStopReason,
    Identity,
    Message,
    MotorStarted,
    MotorStopped,
    QueryStatus,
    RefusalCode,
    Renew,
    SetDepth,
    SetLiftOffGrace,
    SetSpeed,
    SetTelemetryRate,
    Status,
    Stop,
    StopReason,
    Telemetry,
    TelemetryFlag,
)

from .actions import (
    AcknowledgeFault,
    Action,
    Actor,
    ArmPen,
    CreateSession,
    DisarmPen,
    EndSession,
    OverrideZone,
    PauseSession,
    ResumeSession,
    Role,
    SelectZone,
    SetStrokeRate,
    SetZoneDepth,
    StartSession,
    StopPen,
)
from .ledger import CartridgeLedger
from .outcome import (
    EMPTY,
    EventKind,
    LeaseAction,
    LeaseDirective,
    Outcome,
    OutcomeBuilder,
    PenCommand,
    SessionEvent,
    UrgentSink,
)
from .records import FaultRecord, PassRecord, PenState, Session, ZoneOverride, ZoneProgress
from .states import (
    LIVE_STATES,
    ArmInput,
    ArmState,
    SessionInput,
    arm_transition,
    session_transition,
)

FORMAT_VERSION: Final = 1
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_TREATING_ROLES: Final = frozenset({Role.THERAPIST, Role.MANAGER})

#: Why the controller stops a pen that left ACTIVE, by the state it went to.
_STOP_ON_LEAVING: Final = {
    SessionState.PAUSED: HostStopReason.THERAPIST,
    SessionState.INTERRUPTED: HostStopReason.LINK_LOSS,
    SessionState.FAULTED: HostStopReason.FAULT,
    SessionState.ENDED: HostStopReason.SESSION_END,
}

#: Plain words for the pen's own stop reasons (MotorStopped/Disarmed.reason).
_PEN_STOP_WORDS: Final[dict[int, tuple[str, str]]] = {
    StopReason.STALL: (
        "The pen's motor stalled.",
        "Check the cartridge is seated and the needle moves freely; replace the cartridge "
        "if in doubt.",
    ),
    StopReason.OVER_CURRENT: (
        "The pen's motor drew too much current.",
        "Let the pen rest and check the cartridge; if it happens again, stop using this pen.",
    ),
    StopReason.OVER_TEMPERATURE: (
        "The pen became too hot.",
        "Let the pen cool down before continuing.",
    ),
    StopReason.LOW_BATTERY: (
        "The pen's battery is too low.",
        "Charge or swap the battery, then continue.",
    ),
    StopReason.CARTRIDGE_REMOVED: (
        "The cartridge was removed while the pen was armed.",
        "Insert the cartridge again (only this client's own), then continue.",
    ),
    StopReason.DEPTH_CEILING: (
        "The pen measured a depth above its absolute maximum.",
        "Inspect the client's skin and the pen; do not use the pen again until it is checked.",
    ),
    StopReason.DEPTH_LIMIT: (
        "The pen measured a depth above the zone's limit and stopped itself.",
        "Inspect the client's skin and the pen, then acknowledge the fault to continue.",
    ),
    StopReason.LEASE_EXPIRED: (
        "The pen stopped because it stopped hearing from the controller.",
        "Check the pen's connection, then arm again.",
    ),
}

_PEN_REFUSAL_WORDS: Final[dict[int, str]] = {
    RefusalCode.NO_CARTRIDGE: "Insert a new sterile cartridge.",
    RefusalCode.NO_DEPTH: "Set the depth for this zone, then arm again.",
    RefusalCode.DEPTH_ABOVE_CEILING: "Choose a shallower depth.",
    RefusalCode.SPEED_OUT_OF_RANGE: "Choose another stroke rate.",
    RefusalCode.LOW_BATTERY: "Charge or swap the battery.",
    RefusalCode.OVER_TEMPERATURE: "Let the pen cool down.",
}


class SessionRegistry:
    """All sessions, pens and the cartridge ledger. See the module docstring."""

    def __init__(self, policy: TreatmentPolicy, *, lease_ms: int = 250) -> None:
        """``lease_ms``: the arming lease to ask for; PolicyError if the policy forbids it."""
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
        #: The lease each Arm asks for (the service's link.lease_ms).
        self.lease_ms = lease_ms
        self._sessions: dict[str, Session] = {}
        self._pens: dict[str, PenState] = {}
        self._ledger = CartridgeLedger()
        self._live_by_port: dict[str, str] = {}
        self._next_token = 1
        #: Called with each Stop or Disarm the moment it is decided, before the rest
        #: of the outcome (events, audit entries, state) is built: the runtime sends
        #: it at once, so the safety reaction does not wait for the bookkeeping.
        #: None (pure use, tests): urgent commands are only in the outcome.
        self.urgent_sink: UrgentSink | None = None

    # === queries ==========================================================================

    def session(self, session_id: str) -> Session | None:
        """A copy of the session's record (mutating it changes nothing here)."""
        found = self._sessions.get(session_id)
        return found.model_copy(deep=True) if found else None

    def sessions(self) -> list[Session]:
        return [s.model_copy(deep=True) for s in self._sessions.values()]

    def pen(self, port: str) -> PenState:
        return self._pen(port).model_copy()

    def live_session_id(self, port: str) -> str | None:
        return self._live_by_port.get(port)

    @property
    def ledger(self) -> CartridgeLedger:
        return self._ledger

    def gate_context(self, port: str) -> GateContext:
        """The context the gate sees for this pen right now."""
        return self._context(port, self._live(port))

    def report(self, session_id: str) -> dict[str, Any] | None:
        """The end-of-session report: zones, passes, depths against limits, cartridges."""
        session = self._sessions.get(session_id)
        return _report(session) if session else None

    # === persistence ======================================================================

    def to_dict(self) -> dict[str, Any]:
        """The whole state as plain JSON-able data; :meth:`from_dict` restores it exactly."""
        return {
            "format": FORMAT_VERSION,
            "next_token": self._next_token,
            "pens": {port: pen.model_dump(mode="json") for port, pen in self._pens.items()},
            "sessions": {
                sid: session.model_dump(mode="json") for sid, session in self._sessions.items()
            },
            "ledger": self._ledger.to_dict(),
        }

    def live_session_ids(self) -> set[str]:
        """Sessions not yet ENDED: the only ones any input can still change."""
        return set(self._live_by_port.values())

    def port_of(self, session_id: str) -> str | None:
        """The port a session is on (cheap: no copy)."""
        session = self._sessions.get(session_id)
        return session.port if session else None

    def to_parts(self, session_ids: set[str], ports: set[str]) -> dict[str, Any]:
        """The part of :meth:`to_dict` that one input can have changed.

        Every input concerns one port: a pen event, or an action on a session bound
        to a port. It can change that port's pen, the session live on the port
        before or after it (ENDED is terminal), and the cartridges that session
        used. A journal that stores ``to_parts`` of exactly those after every change
        holds, in total, what ``to_dict()`` would, at the cost of one pen and one
        session per input instead of the clinic's whole history.
        """
        sessions = {sid: self._sessions[sid] for sid in session_ids if sid in self._sessions}
        records = (self._ledger.record(cid) for s in sessions.values() for cid in s.cartridges_used)
        return {
            "format": FORMAT_VERSION,
            "next_token": self._next_token,
            "pens": {p: self._pens[p].model_dump(mode="json") for p in ports if p in self._pens},
            "sessions": {sid: s.model_dump(mode="json") for sid, s in sessions.items()},
            "ledger": {str(r.cartridge_id): r.model_dump(mode="json") for r in records if r},
        }

    @classmethod
    def from_dict(
        cls, policy: TreatmentPolicy, data: dict[str, Any], *, lease_ms: int = 250
    ) -> SessionRegistry:
        """Restore exactly what :meth:`to_dict` produced. Call :meth:`recover` after a restart.

        Raises ValueError (pydantic's ValidationError is one) if the data does not fit.
        """
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"unknown registry format {data.get('format')!r}")
        registry = cls(policy, lease_ms=lease_ms)
        registry._next_token = int(data["next_token"])
        registry._pens = {port: PenState.model_validate(pen) for port, pen in data["pens"].items()}
        registry._sessions = {sid: Session.model_validate(s) for sid, s in data["sessions"].items()}
        registry._ledger = CartridgeLedger.from_dict(data["ledger"])
        for sid, session in registry._sessions.items():
            if session.session_id != sid:
                raise ValueError(f"session entry {sid} holds session {session.session_id}")
            if session.state in LIVE_STATES:
                other = registry._live_by_port.setdefault(session.port, sid)
                if other != sid:
                    raise ValueError(f"sessions {other} and {sid} both hold port {session.port}")
        return registry

    def recover(self, now: float) -> Outcome:
        """After a restart: no link is up, no pen is armed, no pass is running.

        A session that was ACTIVE or PAUSED comes back INTERRUPTED; the pass that
        was running (if any) is closed and counted. The pen stopped by itself
        within its lease. Only a therapist resumes, and arms again.
        """
        out = OutcomeBuilder(urgent_sink=self.urgent_sink)
        for pen in self._pens.values():
            pen.link = "down"
            pen.arm = ArmState.DISARMED
            pen.lease_token = None
            pen.motor_running = False
            pen.stopping = False
            pen.cartridge_id = None  # unknown until the pen reports its Status
            out.leases.append(LeaseDirective(pen.port, LeaseAction.STOP_RENEWING))
        for session in list(self._sessions.values()):
            if session.state not in LIVE_STATES:
                continue
            before = session.state
            self._close_pass(out, session, now, "controller_restart")
            self._fire(out, session, SessionInput.CONTROLLER_RESTARTED, now, "controller restart")
            self._audit(
                out,
                AuditKind.RECOVERY,
                now,
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
        session = self._sessions.get(session_id)
        if session is None or session.state is not SessionState.ENDED:
            return None
        del self._sessions[session_id]
        return session.model_dump(mode="json")

    # === therapist and manager actions ====================================================

    def handle(self, action: Action, now: float) -> Outcome:
        """Apply one therapist or manager action. A refusal is in ``Outcome.refusal``."""
        out = OutcomeBuilder(urgent_sink=self.urgent_sink)
        if isinstance(action, CreateSession):
            self._create(out, action, now)
        else:
            session = self._sessions.get(action.session_id)
            if session is None:
                self._refuse(
                    out,
                    now,
                    None,
                    None,
                    action,
                    Refused(
                        RefusalReason.UNKNOWN_SESSION,
                        f"There is no session {action.session_id!r}.",
                        "Check the session on the tablet, or start a new one.",
                    ),
                )
            elif not self._role_ok(out, now, session, action):
                pass
            else:
                self._dispatch(out, session, action, now)
                self._enforce(out, session.port, now)
        return out.build()

    def _dispatch(self, out: OutcomeBuilder, session: Session, action: Action, now: float) -> None:
        match action:
            case StartSession():
                self._start(out, session, action, now)
            case SelectZone():
                self._select_zone(out, session, action, now)
            case SetZoneDepth():
                self._set_depth(out, session, action, now)
            case SetStrokeRate():
                self._set_speed(out, session, action, now)
            case ArmPen():
                self._arm(out, session, action, now)
            case DisarmPen():
                self._disarm(out, session, now)
            case StopPen():
                self._stop_by_therapist(out, session, action, now)
            case PauseSession():
                self._lifecycle(out, session, action, SessionInput.PAUSE, now)
            case ResumeSession():
                self._resume(out, session, action, now)
            case AcknowledgeFault():
                self._acknowledge(out, session, action, now)
            case EndSession():
                self._end(out, session, action, now)
            case OverrideZone():
                self._override(out, session, action, now)
            case CreateSession():  # pragma: no cover - handled before dispatch
                raise AssertionError("CreateSession is not dispatched")

    def _role_ok(self, out: OutcomeBuilder, now: float, session: Session, action: Action) -> bool:
        actor: Actor = action.actor
        if isinstance(action, StopPen | DisarmPen):
            return True  # stopping the needle is never refused, whoever asks
        if isinstance(action, OverrideZone):
            if actor.role is Role.MANAGER:
                return True
            refusal = Refused(
                RefusalReason.ROLE_NOT_PERMITTED,
                "Only a clinic manager may change a zone's limits.",
                "Ask a manager to sign in and make the override, with a reason.",
            )
        elif actor.role in _TREATING_ROLES:
            return True
        else:
            refusal = Refused(
                RefusalReason.ROLE_NOT_PERMITTED,
                f"The {actor.role} role may not operate a pen.",
                "Sign in as a therapist to treat.",
            )
        self._refuse(out, now, session, session.port, action, refusal)
        return False

    def _create(self, out: OutcomeBuilder, action: CreateSession, now: float) -> None:
        problem = None
        if not _ID.match(action.session_id):
            problem = "session id"
        elif not _ID.match(action.client_ref):
            problem = "client reference (a pseudonymous code, never a name)"
        elif not 0 < len(action.port) <= 200:
            problem = "pen port"
        if problem:
            self._refuse(
                out,
                now,
                None,
                None,
                action,
                Refused(
                    RefusalReason.BAD_REQUEST,
                    f"The {problem} is not valid.",
                    "Use letters, digits, '.', '_', ':' or '-' (at most 64).",
                ),
            )
            return
        if action.actor.role not in _TREATING_ROLES:
            self._refuse(
                out,
                now,
                None,
                action.port,
                action,
                Refused(
                    RefusalReason.ROLE_NOT_PERMITTED,
                    f"The {action.actor.role} role may not open a treatment session.",
                    "Sign in as a therapist to treat.",
                ),
            )
            return
        refusal = None
        plan = self.policy.plan(action.plan_id)
        if action.session_id in self._sessions:
            refusal = Refused(
                RefusalReason.SESSION_EXISTS,
                f"A session {action.session_id!r} already exists.",
                "Open that session, or create a new one with another id.",
            )
        elif plan is None:
            refusal = Refused(
                RefusalReason.UNKNOWN_PLAN,
                f"There is no treatment plan {action.plan_id!r}.",
                "Choose one of the clinic's plans: " + ", ".join(sorted(self.policy.plans)) + ".",
            )
        elif action.port in self._live_by_port:
            refusal = Refused(
                RefusalReason.PEN_BUSY,
                "This pen is already in use by another session.",
                "End the other session first, or choose another pen.",
            )
        if refusal or plan is None:
            self._refuse(out, now, None, action.port, action, refusal)
            return
        zones = {}
        for zone_id in plan.zone_ids:
            limits = self.policy.zones[zone_id]
            zones[zone_id] = ZoneProgress(
                zone_id=zone_id,
                label=limits.label,
                policy_max_depth_um=limits.max_depth_um,
                policy_max_passes=limits.max_passes,
                puncture_budget=limits.puncture_budget,
            )
        session = Session(
            session_id=action.session_id,
            port=action.port,
            client_ref=action.client_ref,
            therapist_id=action.actor.actor_id,
            plan_id=plan.plan_id,
            policy_fingerprint=self.policy.fingerprint,
            created_at=now,
            zones=zones,
        )
        self._sessions[session.session_id] = session
        self._live_by_port[session.port] = session.session_id
        out.state_changed = True
        self._event(out, EventKind.SESSION_CREATED, now, session, plan=plan.plan_id)
        self._audit(
            out,
            AuditKind.SESSION,
            now,
            session,
            session.port,
            f"Session created for client {session.client_ref} with plan {plan.label}.",
            "",
            {"plan_id": plan.plan_id, "actor": action.actor.actor_id},
        )

    def _start(
        self, out: OutcomeBuilder, session: Session, action: StartSession, now: float
    ) -> None:
        if session_transition(session.state, SessionInput.START) is None:
            self._refuse_not_now(out, now, session, action, "start")
            return
        pen = self._pen(session.port)
        refusal = link_not_usable(self._context(session.port, session), treatment=True)
        if refusal or pen.serial is None:
            self._refuse(out, now, session, session.port, action, refusal or _link_down())
            return
        session.pen_serial, session.pen_boot_id = pen.serial, pen.boot_id
        session.started_at = now
        self._fire(out, session, SessionInput.START, now, f"started by {action.actor.actor_id}")
        self._audit(
            out,
            AuditKind.SESSION,
            now,
            session,
            session.port,
            f"Session started on pen {pen.serial}.",
            "",
            {"actor": action.actor.actor_id, "boot_id": pen.boot_id, "firmware": pen.firmware},
        )

    def _select_zone(
        self, out: OutcomeBuilder, session: Session, action: SelectZone, now: float
    ) -> None:
        ctx = self._context(session.port, session)
        refusal = session_not_active(ctx)
        zone = session.zones.get(action.zone_id)
        pen = self._pen(session.port)
        if refusal is None and zone is None:
            refusal = self._zone_refusal(session, action.zone_id)
        if refusal is None and (pen.arm is not ArmState.DISARMED or pen.motor_running):
            refusal = Refused(
                RefusalReason.DISARM_FIRST,
                "The pen is armed for the current zone.",
                "Disarm the pen (or let the pass finish), then choose the next zone.",
            )
        if refusal is None and zone is not None:
            refusal = passes_used(_zone_context(zone))
        if refusal or zone is None:
            self._refuse(out, now, session, session.port, action, refusal)
            return
        if session.current_zone != zone.zone_id:
            # A setpoint belongs to one zone: never carry it to another.
            session.current_zone = zone.zone_id
            session.depth_setpoint_um = None
            out.state_changed = True
        self._event(
            out,
            EventKind.ZONE_SELECTED,
            now,
            session,
            zone_id=zone.zone_id,
            max_depth_um=zone.max_depth_um,
            max_passes=zone.max_passes,
            passes_done=zone.passes_done,
        )

    def _zone_refusal(self, session: Session, zone_id: str) -> Refused:
        if self.policy.zone(zone_id) is None:
            return Refused(
                RefusalReason.UNKNOWN_ZONE,
                f"There is no zone {zone_id!r}.",
                "Choose one of the zones listed for this session.",
            )
        return Refused(
            RefusalReason.ZONE_NOT_IN_PLAN,
            f"The {self.policy.zones[zone_id].label} is not part of this session's plan.",
            "Choose one of the plan's zones, or start a session with a plan that includes it.",
        )

    def _set_depth(
        self, out: OutcomeBuilder, session: Session, action: SetZoneDepth, now: float
    ) -> None:
        if not isinstance(action.depth_um, int) or isinstance(action.depth_um, bool):
            self._refuse(out, now, session, session.port, action, _bad_number("depth"))
            return
        refusal = self._send(out, session.port, session, SetDepth(action.depth_um))
        if refusal:
            self._refuse(out, now, session, session.port, action, refusal)
            return
        session.depth_setpoint_um = action.depth_um
        out.state_changed = True
        self._event(
            out,
            EventKind.DEPTH_SET,
            now,
            session,
            zone_id=session.current_zone,
            depth_um=action.depth_um,
        )

    def _set_speed(
        self, out: OutcomeBuilder, session: Session, action: SetStrokeRate, now: float
    ) -> None:
        if not isinstance(action.rate_hz, int) or isinstance(action.rate_hz, bool):
            self._refuse(out, now, session, session.port, action, _bad_number("stroke rate"))
            return
        refusal = None
        if session.state is SessionState.ENDED:
            refusal = session_not_active(self._context(session.port, session))
        refusal = refusal or self._send(out, session.port, session, SetSpeed(action.rate_hz))
        if refusal:
            self._refuse(out, now, session, session.port, action, refusal)
            return
        session.speed_hz = action.rate_hz
        out.state_changed = True
        self._event(out, EventKind.SPEED_SET, now, session, rate_hz=action.rate_hz)

    def _arm(self, out: OutcomeBuilder, session: Session, action: ArmPen, now: float) -> None:
        pen = self._pen(session.port)
        if pen.arm is not ArmState.DISARMED and not pen.stopping:
            # Already armed (or arming) under a live lease: nothing to do.
            self._event(out, EventKind.ARMING, now, session, already=True)
            return
        token = self._next_token  # taken below only if the gate lets the Arm out
        zone = session.zones.get(session.current_zone or "")  # the gate refuses an Arm without
        limit = zone.max_depth_um if zone else 0  # a zone or a depth: these 0s never leave
        arm = Arm(self.lease_ms, token, session.depth_setpoint_um or 0, limit)
        refusal = self._send(out, session.port, session, arm)
        if refusal:
            self._refuse(out, now, session, session.port, action, refusal)
            return
        self._take_token()
        pen.arm = arm_transition(pen.arm, ArmInput.ARM_SENT)
        pen.lease_token = token
        pen.stopping = False
        out.state_changed = True
        self._event(
            out,
            EventKind.ARMING,
            now,
            session,
            zone_id=session.current_zone,
            depth_um=session.depth_setpoint_um,
            token=token,
        )

    def _disarm(self, out: OutcomeBuilder, session: Session, now: float) -> None:
        pen = self._pen(session.port)
        if pen.link == "up":
            out.command(PenCommand(session.port, Disarm()))
            if pen.arm is not ArmState.DISARMED or pen.motor_running:
                pen.stopping = True  # until the pen confirms with Disarmed
                out.state_changed = True
        out.leases.append(LeaseDirective(session.port, LeaseAction.STOP_RENEWING))
        self._event(out, EventKind.DISARMED, now, session, requested=True)

    def _stop_by_therapist(
        self, out: OutcomeBuilder, session: Session, action: StopPen, now: float
    ) -> None:
        self._stop(
            out,
            session.port,
            session,
            HostStopReason.THERAPIST,
            now,
            f"The needle was stopped by the therapist ({action.actor.actor_id}).",
            "",
            {"actor": action.actor.actor_id},
            force_record=True,
        )

    def _lifecycle(
        self,
        out: OutcomeBuilder,
        session: Session,
        action: Action,
        event: SessionInput,
        now: float,
    ) -> bool:
        if session_transition(session.state, event) is None:
            self._refuse_not_now(out, now, session, action, str(event).replace("_", " "))
            return False
        self._fire(out, session, event, now, f"{event} by {action.actor.actor_id}")
        return True

    def _resume(
        self, out: OutcomeBuilder, session: Session, action: ResumeSession, now: float
    ) -> None:
        if session_transition(session.state, SessionInput.RESUME) is None:
            self._refuse_not_now(out, now, session, action, "resume")
            return
        refusal = link_not_usable(self._context(session.port, session), treatment=True)
        if refusal:
            self._refuse(out, now, session, session.port, action, refusal)
            return
        before = session.state
        self._fire(out, session, SessionInput.RESUME, now, f"resumed by {action.actor.actor_id}")
        if before is SessionState.INTERRUPTED:
            self._audit(
                out,
                AuditKind.SESSION,
                now,
                session,
                session.port,
                f"Session resumed by {action.actor.actor_id} after an interruption.",
                "",
                {"actor": action.actor.actor_id},
            )

    def _acknowledge(
        self, out: OutcomeBuilder, session: Session, action: AcknowledgeFault, now: float
    ) -> None:
        if session_transition(session.state, SessionInput.ACKNOWLEDGE_FAULT) is None:
            self._refuse_not_now(out, now, session, action, "acknowledge a fault")
            return
        pen = self._pen(session.port)
        if pen.link != "up":
            refusal = link_not_usable(self._context(session.port, session), treatment=True)
            self._refuse(out, now, session, session.port, action, refusal or _link_down())
            return
        if pen.serial != session.pen_serial:
            self._refuse(
                out,
                now,
                session,
                session.port,
                action,
                Refused(
                    RefusalReason.WRONG_PEN,
                    f"The connected pen ({pen.serial}) is not this session's pen "
                    f"({session.pen_serial}).",
                    "Reconnect the session's own pen, or end this session.",
                ),
            )
            return
        fault = session.fault
        # A rebooted pen is the same pen: the therapist has seen the fault; bind its new boot.
        session.pen_boot_id = pen.boot_id
        session.fault = None
        self._fire(out, session, SessionInput.ACKNOWLEDGE_FAULT, now, "fault acknowledged")
        self._audit(
            out,
            AuditKind.FAULT,
            now,
            session,
            session.port,
            f"Fault acknowledged by {action.actor.actor_id}: "
            f"{fault.detail if fault else 'no detail recorded'}",
            "",
            {
                "actor": action.actor.actor_id,
                "fault_kind": fault.kind if fault else None,
                "resolved": True,
            },
        )

    def _end(self, out: OutcomeBuilder, session: Session, action: EndSession, now: float) -> None:
        if session_transition(session.state, SessionInput.END) is None:
            self._refuse_not_now(out, now, session, action, "end")
            return
        self._close_pass(out, session, now, "session_end")
        self._fire(out, session, SessionInput.END, now, f"ended by {action.actor.actor_id}")
        session.ended_at = now
        spent = self._ledger.spend_session(session.session_id, now)
        self._live_by_port.pop(session.port, None)
        report = _report(session)
        self._event(out, EventKind.SESSION_REPORT, now, session, **report)
        self._audit(
            out,
            AuditKind.SESSION,
            now,
            session,
            session.port,
            f"Session ended by {action.actor.actor_id}: {len(session.passes)} passes; "
            f"{len(spent)} cartridge(s) spent.",
            "",
            {
                "actor": action.actor.actor_id,
                "spent_cartridges": spent,
                "passes": len(session.passes),
            },
        )

    def _override(
        self, out: OutcomeBuilder, session: Session, action: OverrideZone, now: float
    ) -> None:
        limits = self._limits(session.port)
        zone = session.zones.get(action.zone_id)
        refusal: Refused | None = None
        if session.state is SessionState.ENDED:
            refusal = session_not_active(self._context(session.port, session))
        elif zone is None:
            refusal = self._zone_refusal(session, action.zone_id)
        elif len(action.reason.strip()) < 3:
            refusal = Refused(
                RefusalReason.OVERRIDE_NEEDS_REASON,
                "An override needs a reason.",
                "Write why this client needs a different limit; it is kept in the audit log.",
            )
        elif action.max_depth_um is None and action.max_passes is None:
            refusal = Refused(
                RefusalReason.BAD_REQUEST,
                "The override changes nothing.",
                "Give a new depth limit, a new number of passes, or both.",
            )
        elif action.max_depth_um is not None and (
            not isinstance(action.max_depth_um, int) or action.max_depth_um <= 0
        ):
            refusal = _bad_number("depth limit")
        elif action.max_passes is not None and (
            not isinstance(action.max_passes, int) or action.max_passes < 1
        ):
            refusal = _bad_number("number of passes")
        elif action.max_depth_um is not None and action.max_depth_um > limits.device_ceiling_um:
            refusal = Refused(
                RefusalReason.OVERRIDE_ABOVE_CEILING,
                f"{format_mm(action.max_depth_um)} is beyond the device ceiling "
                f"({format_mm(limits.device_ceiling_um)}); no override may exceed it.",
                f"Choose {format_mm(limits.device_ceiling_um)} or less.",
            )
        elif action.max_passes is not None and action.max_passes > self.policy.max_passes_ceiling:
            refusal = Refused(
                RefusalReason.OVERRIDE_ABOVE_CEILING,
                f"{action.max_passes} passes is more than the clinic allows in any zone "
                f"({self.policy.max_passes_ceiling}).",
                f"Choose {self.policy.max_passes_ceiling} passes or fewer.",
            )
        if refusal or zone is None:
            self._refuse(out, now, session, session.port, action, refusal)
            return
        before = {"max_depth_um": zone.max_depth_um, "max_passes": zone.max_passes}
        zone.override = ZoneOverride(
            max_depth_um=action.max_depth_um or zone.max_depth_um,
            max_passes=action.max_passes or zone.max_passes,
            manager_id=action.actor.actor_id,
            reason=action.reason.strip(),
            at=now,
        )
        after = {"max_depth_um": zone.max_depth_um, "max_passes": zone.max_passes}
        out.state_changed = True
        self._event(out, EventKind.OVERRIDE_APPLIED, now, session, zone_id=zone.zone_id, **after)
        self._audit(
            out,
            AuditKind.OVERRIDE,
            now,
            session,
            session.port,
            f"Manager {action.actor.actor_id} set the {zone.label} to "
            f"{format_mm(zone.max_depth_um)} and {zone.max_passes} passes for this session "
            f"(was {format_mm(before['max_depth_um'])} and {before['max_passes']}). "
            f"Reason: {zone.override.reason}",
            "",
            {
                "zone_id": zone.zone_id,
                "before": before,
                "after": after,
                "manager": action.actor.actor_id,
                "reason": zone.override.reason,
            },
        )

    # === the pen link =====================================================================

    def handle_link_event(self, port: str, event: Event, now: float) -> Outcome:
        """Feed one ``firmware_protocol`` link event (from HostConnection or PenLink)."""
        match event:
            case MessageReceived():
                return self.pen_message(port, event.message, now)
            case Connected() if event.identity is not None:
                return self.pen_connected(port, event.identity, now)
            case LinkFailed():
                return self.link_down(port, event.reason, now)
            case PeerRebooted():
                return self.pen_rebooted(port, event.previous, event.current, now)
            case HandshakeRefused():
                return self.handshake_refused(port, event.reason, event.identity, now)
            case Delivered() | ProtocolViolation() | Connected():
                return EMPTY
        return EMPTY  # pragma: no cover - the union is exhausted above

    def pen_connected(self, port: str, identity: Identity, now: float) -> Outcome:
        """The handshake succeeded (``Connected``/``LinkUp``): the pen is identified."""
        out = OutcomeBuilder(urgent_sink=self.urgent_sink)
        pen = self._pen(port)
        serial = identity.serial_text
        known = (pen.serial, pen.boot_id)
        if known != (serial, identity.boot_id):
            pen.cartridge_id = None  # a different pen, or it restarted: ask, do not assume
        pen.link = "up"
        pen.serial, pen.boot_id = serial, identity.boot_id
        pen.firmware = identity.firmware_version
        pen.max_depth_um = identity.max_depth_um or None
        pen.max_lease_ms = identity.max_lease_ms or None
        pen.arm, pen.lease_token = ArmState.DISARMED, None
        pen.motor_running = pen.stopping = False
        out.state_changed = True
        self._event(out, EventKind.PEN_CONNECTED, now, None, port=port, serial=serial)
        session = self._live(port)
        if session is not None:
            self._check_identity(out, session, now, news=known != (serial, identity.boot_id))
        for message in (
            SetLiftOffGrace(self.policy.lift_off_grace_ms),
            SetTelemetryRate(self.policy.telemetry_rate_hz),
            QueryStatus(),
        ):
            self._send(out, port, session, message)
        self._enforce(out, port, now)
        return out.build()

    def link_down(self, port: str, reason: str, now: float) -> Outcome:
        """The link is gone (``LinkFailed``, ``LinkDown``). The pen stops within its lease."""
        out = OutcomeBuilder(urgent_sink=self.urgent_sink)
        self._lose_link(out, port, now, reason, "down")
        return out.build()

    def handshake_refused(self, port: str, reason: str, identity: Identity, now: float) -> Outcome:
        """The pen failed the handshake (protocol/schema mismatch): it must never be armed."""
        out = OutcomeBuilder(urgent_sink=self.urgent_sink)
        pen = self._pen(port)
        news = pen.link != "refused"
        self._lose_link(out, port, now, reason, "refused", audit=False)
        pen.serial, pen.boot_id = identity.serial_text, identity.boot_id
        if news:
            session = self._live(port)
            self._audit(
                out,
                AuditKind.REFUSAL,
                now,
                session,
                port,
                f"Pen {identity.serial_text} failed its identity check and will not be armed: "
                f"{reason}",
                "Do not use this pen. Ask a manager to update the pen firmware or the controller.",
                {
                    "code": str(RefusalReason.PEN_NOT_VERIFIED),
                    "firmware": identity.firmware_version,
                },
            )
        return out.build()

    def pen_rebooted(self, port: str, previous: Identity, current: Identity, now: float) -> Outcome:
        """``PeerRebooted``: the pen announced a new boot id. Treatment never resumes by itself."""
        out = OutcomeBuilder(urgent_sink=self.urgent_sink)
        pen = self._pen(port)
        self._lose_link(out, port, now, "the pen restarted", "down", audit=False)
        pen.serial, pen.boot_id = current.serial_text, current.boot_id
        pen.cartridge_id = None
        session = self._live(port)
        if session is not None:
            self._check_identity(out, session, now, news=True)
        return out.build()

    def pen_message(self, port: str, message: Message, now: float) -> Outcome:
        """A message from the pen (``MessageReceived.message``)."""
        if isinstance(message, Telemetry):
            return self._on_telemetry(port, message, now)
        out = OutcomeBuilder(urgent_sink=self.urgent_sink)
        session = self._live(port)
        match message:
            case MotorStarted():
                self._on_motor_started(out, port, session, message, now)
            case MotorStopped():
                self._on_motor_stopped(out, port, session, message, now)
            case Armed():
                self._on_armed(out, port, session, message, now)
            case Disarmed():
                self._on_disarmed(out, port, session, message, now)
            case CartridgeInserted():
                self._pen(port).cartridge_id = message.cartridge_id
                out.state_changed = True
                status = self._ledger.status(
                    message.cartridge_id, session.session_id if session else None
                )
                self._event(
                    out,
                    EventKind.CARTRIDGE_INSERTED,
                    now,
                    session,
                    port=port,
                    cartridge_id=message.cartridge_id,
                    status=str(status),
                )
            case CartridgeRemoved():
                self._pen(port).cartridge_id = None
                out.state_changed = True
                self._event(
                    out,
                    EventKind.CARTRIDGE_REMOVED,
                    now,
                    session,
                    port=port,
                    cartridge_id=message.cartridge_id,
                )
            case CommandRefused():
                self._on_command_refused(out, port, session, message, now)
            case Status():
                self._on_status(out, port, message)
            case _:
                return EMPTY
        self._enforce(out, port, now)
        return out.build()

    # --- pen message handlers ---------------------------------------------------------------

    def _on_telemetry(self, port: str, sample: Telemetry, now: float) -> Outcome:
        if not self._pen(port).motor_running and not sample.flags & TelemetryFlag.MOTOR_RUNNING:
            return EMPTY  # an idle needle is not judged (see monitor.py): skip the context
        session = self._live(port)
        decision = check_telemetry(self._context(port, session), sample)
        if decision is None:
            return EMPTY  # the common case: nothing changes, nothing to journal
        out = OutcomeBuilder(urgent_sink=self.urgent_sink)
        self._stop_for(out, port, session, decision, now)
        return out.build()

    def _stop_for(
        self,
        out: OutcomeBuilder,
        port: str,
        session: Session | None,
        decision: StopDecision,
        now: float,
    ) -> None:
        self._stop(
            out,
            port,
            session,
            decision.reason,
            now,
            decision.message,
            decision.remediation,
            dict(decision.details),
            always_send=True,
        )
        if decision.is_fault and session is not None:
            self._fault(
                out,
                session,
                now,
                decision.reason.name.lower(),
                decision.message,
                decision.remediation,
            )

    def _on_motor_started(
        self,
        out: OutcomeBuilder,
        port: str,
        session: Session | None,
        message: MotorStarted,
        now: float,
    ) -> None:
        pen = self._pen(port)
        pen.motor_running = True
        pen.stopping = False  # a new run: a stop for it is news
        out.state_changed = True
        if session is None or session.current_zone is None:
            self._stop(
                out,
                port,
                session,
                HostStopReason.FAULT,
                now,
                "The pen started without a treatment session and zone. The needle was stopped.",
                "Start a session and choose a zone before treating.",
                {"depth_set_um": message.depth_set_um},
            )
            return
        zone = session.zones[session.current_zone]
        if session.current_pass is not None:  # a stop we never heard of: count it
            self._close_pass(out, session, now, "missed_stop")
        session.current_pass = PassRecord(
            zone_id=zone.zone_id,
            number=zone.passes_done + 1,
            cartridge_id=pen.cartridge_id,
            depth_setpoint_um=session.depth_setpoint_um,
            started_at=now,
            start_strokes=message.strokes,
        )
        self._event(
            out,
            EventKind.PASS_STARTED,
            now,
            session,
            zone_id=zone.zone_id,
            number=zone.passes_done + 1,
            max_passes=zone.max_passes,
        )
        cartridge = pen.cartridge_id
        if cartridge is not None:
            status = self._ledger.status(cartridge, session.session_id)
            if self._ledger.mark_used(cartridge, session.session_id, now):
                session.cartridges_used.append(cartridge)
            elif status is not CartridgeStatus.THIS_SESSION:
                self._stop(
                    out,
                    port,
                    session,
                    HostStopReason.FAULT,
                    now,
                    f"The pen ran with cartridge {cartridge}, which may not be used for this "
                    "client. The needle was stopped.",
                    "Discard the cartridge, inspect the client's skin, and insert a new sterile "
                    "cartridge.",
                    {"cartridge_id": cartridge, "status": str(status)},
                )
                self._fault(
                    out,
                    session,
                    now,
                    "cartridge",
                    "A used cartridge ran on this client.",
                    "Insert a new sterile cartridge, then acknowledge the fault.",
                )
        if message.depth_set_um > zone.max_depth_um:
            decision = StopDecision(
                HostStopReason.FAULT,
                f"The pen started at {format_mm(message.depth_set_um)}, deeper than the "
                f"{zone.label} allows ({format_mm(zone.max_depth_um)}). The needle was stopped.",
                "Set the depth again for this zone; if it happens again, stop using this pen.",
                {"depth_set_um": message.depth_set_um, "zone_limit_um": zone.max_depth_um},
            )
            self._stop_for(out, port, session, decision, now)

    def _on_motor_stopped(
        self,
        out: OutcomeBuilder,
        port: str,
        session: Session | None,
        message: MotorStopped,
        now: float,
    ) -> None:
        pen = self._pen(port)
        pen.motor_running = False
        out.state_changed = True
        if session is None or session.current_pass is None:
            return
        record = session.current_pass
        zone = session.zones[record.zone_id]
        reason = _stop_reason_name(message.reason)
        self._close_pass(
            out,
            session,
            now,
            reason,
            strokes=message.strokes - record.start_strokes,
            peak_depth_um=message.peak_depth_um,
        )
        setpoint = record.depth_setpoint_um
        allowed = min(
            zone.max_depth_um,
            (setpoint if setpoint is not None else 0) + self.policy.depth_tolerance_um,
        )
        if message.peak_depth_um > allowed:
            # Between two samples the needle went too deep: the pass is over, record it.
            self._fault(
                out,
                session,
                now,
                "depth_overshoot",
                f"The pen reports a peak depth of {format_mm(message.peak_depth_um)} in this "
                f"pass, more than the {format_mm(allowed)} allowed on the {zone.label}.",
                "Inspect the client's skin and the pen, then acknowledge the fault to continue.",
            )
        if message.reason in FAULT_REASONS:
            message_text, remediation = _PEN_STOP_WORDS[message.reason]
            self._fault(out, session, now, reason, message_text, remediation)
        elif message.reason == StopReason.LEASE_EXPIRED:
            message_text, remediation = _PEN_STOP_WORDS[message.reason]
            self._audit(
                out,
                AuditKind.STOP,
                now,
                session,
                port,
                message_text,
                remediation,
                {"pen_reason": reason},
            )
        if zone.passes_done >= zone.max_passes:
            self._event(
                out,
                EventKind.ZONE_COMPLETED,
                now,
                session,
                zone_id=zone.zone_id,
                passes_done=zone.passes_done,
            )
            if pen.arm is not ArmState.DISARMED:
                self._stop(
                    out,
                    port,
                    session,
                    HostStopReason.PASS_LIMIT,
                    now,
                    f"The {zone.label} has had all {zone.max_passes} passes; the pen was "
                    "disarmed for this zone.",
                    "Choose the next zone.",
                    {"zone_id": zone.zone_id, "passes_done": zone.passes_done},
                )

    def _on_armed(
        self, out: OutcomeBuilder, port: str, session: Session | None, message: Armed, now: float
    ) -> None:
        pen = self._pen(port)
        out.state_changed = True
        if message.token != pen.lease_token:
            if pen.arm is ArmState.ARMING:
                return  # answers an older Arm; ours is still in flight (the link keeps order)
            # Armed under a lease we are not keeping: believe it, and take it back.
            pen.arm = arm_transition(pen.arm, ArmInput.PEN_ARMED)
            out.command(PenCommand(port, Disarm()))
            pen.stopping = True
            return
        pen.arm = arm_transition(pen.arm, ArmInput.PEN_ARMED)
        self._event(out, EventKind.ARMED, now, session, port=port, lease_ms=message.lease_ms)
        if not pen.stopping:
            out.leases.append(
                LeaseDirective(port, LeaseAction.KEEP_RENEWING, message.token, message.lease_ms)
            )

    def _on_disarmed(
        self,
        out: OutcomeBuilder,
        port: str,
        session: Session | None,
        message: Disarmed,
        now: float,
    ) -> None:
        pen = self._pen(port)
        pen.arm = arm_transition(pen.arm, ArmInput.PEN_DISARMED)
        out.state_changed = True
        if pen.arm is ArmState.DISARMED:
            pen.lease_token = None
            pen.stopping = False
            out.leases.append(LeaseDirective(port, LeaseAction.STOP_RENEWING))
        self._event(
            out,
            EventKind.DISARMED,
            now,
            session,
            port=port,
            reason=_stop_reason_name(message.reason),
        )
        if message.reason in FAULT_REASONS and session is not None:
            text, remediation = _PEN_STOP_WORDS[message.reason]
            self._fault(out, session, now, _stop_reason_name(message.reason), text, remediation)

    def _on_command_refused(
        self,
        out: OutcomeBuilder,
        port: str,
        session: Session | None,
        message: CommandRefused,
        now: float,
    ) -> None:
        pen = self._pen(port)
        out.state_changed = True
        if message.msg_type in (Arm.TYPE, Renew.TYPE):
            event = ArmInput.ARM_REFUSED if message.msg_type == Arm.TYPE else ArmInput.PEN_DISARMED
            pen.arm = arm_transition(pen.arm, event)
            if pen.arm is ArmState.DISARMED:
                pen.lease_token = None
            out.leases.append(LeaseDirective(port, LeaseAction.STOP_RENEWING))
        if message.msg_type == SetDepth.TYPE and session is not None:
            session.depth_setpoint_um = None  # the pen did not take it: it is not set
        command = _COMMAND_NAMES.get(message.msg_type, f"command {message.msg_type:#04x}")
        try:
            why = RefusalCode(message.reason).name.lower().replace("_", " ")
        except ValueError:
            why = f"reason {message.reason}"
        remediation = _PEN_REFUSAL_WORDS.get(
            message.reason, "Try again; if it repeats, restart the pen."
        )
        text = f"The pen refused {command}: {why}."
        self._event(out, EventKind.REFUSED, now, session, port=port, by="pen", message=text)
        self._audit(
            out,
            AuditKind.REFUSAL,
            now,
            session,
            port,
            text,
            remediation,
            {"by": "pen", "msg_type": message.msg_type, "pen_reason": message.reason},
        )

    def _on_status(self, out: OutcomeBuilder, port: str, message: Status) -> None:
        pen = self._pen(port)
        pen.cartridge_id = message.cartridge_id or None
        if message.flags & TelemetryFlag.ARMED:
            pen.arm = arm_transition(pen.arm, ArmInput.PEN_ARMED)
        elif pen.arm is ArmState.ARMED:
            pen.arm = arm_transition(pen.arm, ArmInput.PEN_DISARMED)
            pen.lease_token = None
        out.state_changed = True

    # === internals ========================================================================

    def _pen(self, port: str) -> PenState:
        pen = self._pens.get(port)
        if pen is None:
            pen = self._pens[port] = PenState(port=port)
        return pen

    def _live(self, port: str) -> Session | None:
        sid = self._live_by_port.get(port)
        return self._sessions[sid] if sid is not None else None

    def _take_token(self) -> int:
        token = self._next_token
        self._next_token = token % 0xFFFF + 1  # u16, never 0
        return token

    def _limits(self, port: str) -> SafetyLimits:
        pen = self._pen(port)
        return SafetyLimits.from_policy(self.policy, pen.max_depth_um, pen.max_lease_ms)

    def _context(self, port: str, session: Session | None) -> GateContext:
        pen = self._pen(port)
        if pen.link == "refused":
            link = LinkStatus.REFUSED
        elif pen.link != "up":
            link = LinkStatus.DOWN
        elif (
            session is not None
            and session.pen_serial is not None
            and (pen.serial != session.pen_serial or pen.boot_id != session.pen_boot_id)
        ):
            link = LinkStatus.FOREIGN
        else:
            link = LinkStatus.UP
        if session is None:
            return GateContext(
                limits=self._limits(port),
                cartridge_id=pen.cartridge_id,
                cartridge=self._ledger.status(pen.cartridge_id, None),
                link=link,
                motor_running=pen.motor_running,
                lease_token=pen.lease_token,
            )
        zone = session.zones.get(session.current_zone) if session.current_zone else None
        return GateContext(
            limits=self._limits(port),
            session_state=session.state,
            zone=_zone_context(zone) if zone else None,
            depth_setpoint_um=session.depth_setpoint_um,
            cartridge_id=pen.cartridge_id,
            cartridge=self._ledger.status(pen.cartridge_id, session.session_id),
            link=link,
            fault=session.fault.detail if session.fault else None,
            motor_running=pen.motor_running,
            lease_token=pen.lease_token,
            pass_start_strokes=session.current_pass.start_strokes if session.current_pass else None,
        )

    def _send(
        self, out: OutcomeBuilder, port: str, session: Session | None, message: Message
    ) -> Refused | None:
        """Queue ``message`` if the gate allows it now; the refusal otherwise."""
        decision = check_command(self._context(port, session), message)
        if isinstance(decision, Refused):
            return decision
        out.command(PenCommand(port, message))
        return None

    def _stop(
        self,
        out: OutcomeBuilder,
        port: str,
        session: Session | None,
        reason: HostStopReason,
        now: float,
        message: str,
        remediation: str,
        details: dict[str, Any],
        *,
        always_send: bool = False,
        force_record: bool = False,
    ) -> None:
        """Send Stop(reason), stop renewing, and record the stop once per stopping."""
        pen = self._pen(port)
        if pen.link == "up" and (
            always_send or force_record or pen.arm is not ArmState.DISARMED or pen.motor_running
        ):
            out.command(PenCommand(port, Stop(int(reason))))
        out.leases.append(LeaseDirective(port, LeaseAction.STOP_RENEWING))
        if pen.stopping and not force_record:
            return
        pen.stopping = True
        out.state_changed = True
        self._event(
            out,
            EventKind.STOP_SENT,
            now,
            session,
            port=port,
            reason=reason.name.lower(),
            message=message,
        )
        self._audit(
            out,
            AuditKind.STOP,
            now,
            session,
            port,
            message,
            remediation,
            {"reason": reason.name.lower(), **details},
        )

    def _fault(
        self,
        out: OutcomeBuilder,
        session: Session,
        now: float,
        kind: str,
        detail: str,
        remediation: str,
        *,
        event: SessionInput = SessionInput.SAFETY_FAULT,
    ) -> None:
        """Move the session to FAULTED (if the table allows) and record the fault once."""
        # The same fault reported twice (MotorStopped then Disarmed) is recorded once.
        is_new = session.fault is None or session.fault.kind != kind
        transitioned = self._fire(out, session, event, now, detail)
        if session.state is SessionState.FAULTED and session.fault is None:
            session.fault = FaultRecord(kind=kind, detail=detail, at=now)
            out.state_changed = True
        if transitioned or is_new:
            self._audit(
                out,
                AuditKind.FAULT,
                now,
                session,
                session.port,
                detail,
                remediation,
                {"fault_kind": kind, "state": str(session.state)},
            )
            self._event(
                out,
                EventKind.FAULT,
                now,
                session,
                kind=kind,
                message=detail,
                remediation=remediation,
            )

    def _fire(
        self, out: OutcomeBuilder, session: Session, event: SessionInput, now: float, why: str
    ) -> bool:
        """Apply the life-cycle table; stop the pen when leaving ACTIVE (Rule 4)."""
        new = session_transition(session.state, event)
        if new is None or new is session.state:
            return False
        old, session.state = session.state, new
        out.state_changed = True
        self._event(
            out,
            EventKind.STATE_CHANGED,
            now,
            session,
            previous=str(old),
            state=str(new),
            input=str(event),
            why=why,
        )
        if new is not SessionState.ACTIVE:
            pen = self._pen(session.port)
            if not pen.stopping and (pen.arm is not ArmState.DISARMED or pen.motor_running):
                reason = _STOP_ON_LEAVING.get(new, HostStopReason.OTHER)
                self._stop(
                    out,
                    session.port,
                    session,
                    reason,
                    now,
                    f"The needle was stopped because the session is now {new}.",
                    "",
                    {"state": str(new)},
                )
        return True

    def _enforce(self, out: OutcomeBuilder, port: str, now: float) -> None:
        """Stop a pen that may be armed or running but would no longer be allowed to arm."""
        pen = self._pen(port)
        if pen.link != "up" or pen.stopping:
            return
        if pen.arm is ArmState.DISARMED and not pen.motor_running:
            return
        session = self._live(port)
        ctx = self._context(port, session)
        refusal = arming_refusal(ctx)
        if refusal is None:
            return
        self._stop(
            out,
            port,
            session,
            _stop_reason_for(refusal.code, ctx.session_state),
            now,
            f"The pen was stopped: {refusal.message}",
            refusal.remediation,
            {"code": str(refusal.code)},
        )

    def _lose_link(
        self,
        out: OutcomeBuilder,
        port: str,
        now: float,
        reason: str,
        link: str,
        *,
        audit: bool = True,
    ) -> None:
        pen = self._pen(port)
        was_up = pen.link == "up"
        pen.link = link
        pen.arm = arm_transition(pen.arm, ArmInput.LINK_LOST)
        pen.lease_token = None
        pen.motor_running = pen.stopping = False
        out.state_changed = True
        out.leases.append(LeaseDirective(port, LeaseAction.STOP_RENEWING))
        if was_up:
            self._event(out, EventKind.PEN_DISCONNECTED, now, None, port=port, reason=reason)
        session = self._live(port)
        if session is None or session.pen_serial is None:
            return
        self._close_pass(out, session, now, "link_lost")
        if self._fire(out, session, SessionInput.LINK_LOST, now, reason) and audit:
            self._audit(
                out,
                AuditKind.FAULT,
                now,
                session,
                port,
                f"The connection to the pen was lost ({reason}). The pen stops by itself "
                "within its lease; the session is interrupted.",
                "Check that the pen is on and connected, then tap Resume and arm again.",
                {"fault_kind": "link_lost"},
            )

    def _check_identity(
        self, out: OutcomeBuilder, session: Session, now: float, *, news: bool
    ) -> None:
        """A bound session whose pen changed serial or boot id is a fault (§4.7)."""
        pen = self._pen(session.port)
        if session.pen_serial is None:
            return
        if pen.serial != session.pen_serial:
            event, kind = SessionInput.PEN_REPLACED, "pen_replaced"
            detail = (
                f"A different pen ({pen.serial}) is connected in place of this session's pen "
                f"({session.pen_serial})."
            )
            remediation = "Reconnect the session's own pen and acknowledge, or end the session."
        elif pen.boot_id != session.pen_boot_id:
            event, kind = SessionInput.PEN_REBOOTED, "pen_rebooted"
            detail = "The pen restarted during the session."
            remediation = "Check the pen and the client, then acknowledge the fault and arm again."
        else:
            return
        self._close_pass(out, session, now, kind)
        # A restarted or different pen does not hold the depth approved for this session.
        session.depth_setpoint_um = None
        session.speed_hz = None
        transitioned = self._fire(out, session, event, now, detail)
        if session.state is SessionState.FAULTED and session.fault is None:
            session.fault = FaultRecord(kind=kind, detail=detail, at=now)
        if news or transitioned:
            self._audit(
                out,
                AuditKind.FAULT,
                now,
                session,
                session.port,
                detail,
                remediation,
                {"fault_kind": kind, "serial": pen.serial, "boot_id": pen.boot_id},
            )
            self._event(
                out,
                EventKind.FAULT,
                now,
                session,
                kind=kind,
                message=detail,
                remediation=remediation,
            )

    def _close_pass(
        self,
        out: OutcomeBuilder,
        session: Session,
        now: float,
        reason: str,
        *,
        strokes: int | None = None,
        peak_depth_um: int | None = None,
    ) -> None:
        """End the pass in progress, if any, and count it (Rule 6)."""
        record = session.current_pass
        if record is None:
            return
        record.ended_at = now
        record.strokes = strokes
        record.peak_depth_um = peak_depth_um
        record.end_reason = reason
        session.passes.append(record)
        session.current_pass = None
        zone = session.zones[record.zone_id]
        zone.passes_done += 1
        out.state_changed = True
        self._event(
            out,
            EventKind.PASS_ENDED,
            now,
            session,
            zone_id=zone.zone_id,
            number=record.number,
            passes_done=zone.passes_done,
            max_passes=zone.max_passes,
            reason=reason,
            strokes=strokes,
            peak_depth_um=peak_depth_um,
        )

    def _refuse(
        self,
        out: OutcomeBuilder,
        now: float,
        session: Session | None,
        port: str | None,
        action: Action,
        refusal: Refused | None,
    ) -> None:
        refusal = refusal or Refused(  # pragma: no cover - callers pass one
            RefusalReason.BAD_REQUEST, "The request was refused.", "Try again."
        )
        out.refusal = refusal
        if session is not None:
            session.refusals += 1
            out.state_changed = True
        details: dict[str, Any] = {
            "code": str(refusal.code),
            "action": type(action).__name__,
            "actor": action.actor.actor_id,
            "role": str(action.actor.role),
        }
        if isinstance(action, SetZoneDepth):
            details["depth_um"] = action.depth_um
        if isinstance(action, SelectZone | OverrideZone):
            details["zone_id"] = action.zone_id
        if session is not None and session.current_zone:
            details.setdefault("zone_id", session.current_zone)
        self._audit(
            out,
            AuditKind.REFUSAL,
            now,
            session,
            port,
            refusal.message,
            refusal.remediation,
            details,
        )
        self._event(
            out,
            EventKind.REFUSED,
            now,
            session,
            port=port,
            code=str(refusal.code),
            message=refusal.message,
            remediation=refusal.remediation,
        )

    def _refuse_not_now(
        self, out: OutcomeBuilder, now: float, session: Session, action: Action, what: str
    ) -> None:
        self._refuse(
            out,
            now,
            session,
            session.port,
            action,
            Refused(
                RefusalReason.NOT_ALLOWED_NOW,
                f"The session cannot {what} now: it is {session.state}.",
                _NOT_NOW_HINTS[session.state],
            ),
        )

    def _audit(
        self,
        out: OutcomeBuilder,
        kind: AuditKind,
        now: float,
        session: Session | None,
        port: str | None,
        message: str,
        remediation: str,
        details: dict[str, Any],
    ) -> None:
        device = self._pens[port].serial if port in self._pens else None
        device = device or (session.pen_serial if session else None)
        out.audit.append(
            AuditEntry(
                kind=kind,
                at=now,
                message=message,
                remediation=remediation,
                session_id=session.session_id if session else None,
                device_id=device,
                details={"port": port, **details} if port else details,
            )
        )

    def _event(
        self,
        out: OutcomeBuilder,
        kind: EventKind,
        now: float,
        session: Session | None,
        /,
        **detail: Any,
    ) -> None:
        port = session.port if session else str(detail.get("port", ""))
        detail.pop("port", None)
        out.events.append(
            SessionEvent(kind, now, port, session.session_id if session else None, detail)
        )


# === helpers ===============================================================================

_COMMAND_NAMES: Final = {
    cls.TYPE: cls.__name__
    for cls in (
        Arm,
        Renew,
        SetDepth,
        SetSpeed,
        Disarm,
        Stop,
        SetLiftOffGrace,
        SetTelemetryRate,
        QueryStatus,
    )
}

_NOT_NOW_HINTS: Final = {
    SessionState.CREATED: "Start the session first.",
    SessionState.ACTIVE: "The session is already running.",
    SessionState.PAUSED: "Resume the session, or end it.",
    SessionState.INTERRUPTED: "Reconnect the pen and tap Resume, or end the session.",
    SessionState.FAULTED: "Acknowledge the fault, or end the session.",
    SessionState.ENDED: "Start a new session.",
}


def _zone_context(zone: ZoneProgress) -> ZoneContext:
    return ZoneContext(
        zone_id=zone.zone_id,
        label=zone.label,
        max_depth_um=zone.max_depth_um,
        max_passes=zone.max_passes,
        passes_done=zone.passes_done,
        puncture_budget=zone.puncture_budget,
        overridden=zone.override is not None,
    )


def _stop_reason_name(reason: int) -> str:
    try:
        return StopReason(reason).name.lower()
    except ValueError:
        return f"reason_{reason}"


def _stop_reason_for(code: RefusalReason, state: SessionState | None) -> HostStopReason:
    if code is RefusalReason.ZONE_PASSES_USED:
        return HostStopReason.PASS_LIMIT
    if code is RefusalReason.SESSION_NOT_ACTIVE:
        return _STOP_ON_LEAVING.get(state, HostStopReason.OTHER) if state else HostStopReason.OTHER
    if code in (RefusalReason.LINK_DOWN, RefusalReason.WRONG_PEN, RefusalReason.PEN_NOT_VERIFIED):
        return HostStopReason.LINK_LOSS
    if code is RefusalReason.FAULT_UNRESOLVED:
        return HostStopReason.FAULT
    return HostStopReason.OTHER


def _link_down() -> Refused:
    return Refused(
        RefusalReason.LINK_DOWN,
        "The pen is not connected.",
        "Check that the pen is switched on and connected; it reconnects by itself.",
    )


def _bad_number(what: str) -> Refused:
    return Refused(
        RefusalReason.BAD_REQUEST,
        f"The {what} is not a valid number.",
        f"Enter the {what} again.",
    )


def _report(session: Session) -> dict[str, Any]:
    zones = []
    for zone in session.zones.values():
        passes = [p for p in session.passes if p.zone_id == zone.zone_id]
        peaks = [p.peak_depth_um for p in passes if p.peak_depth_um is not None]
        setpoints = [p.depth_setpoint_um for p in passes if p.depth_setpoint_um is not None]
        zones.append(
            {
                "zone_id": zone.zone_id,
                "label": zone.label,
                "passes_done": zone.passes_done,
                "max_passes": zone.max_passes,
                "max_depth_um": zone.max_depth_um,
                "policy_max_depth_um": zone.policy_max_depth_um,
                "deepest_setpoint_um": max(setpoints, default=None),
                "peak_depth_um": max(peaks, default=None),
                "override": zone.override.model_dump(mode="json") if zone.override else None,
            }
        )
    return {
        "session_id": session.session_id,
        "client_ref": session.client_ref,
        "therapist_id": session.therapist_id,
        "plan_id": session.plan_id,
        "state": str(session.state),
        "pen_serial": session.pen_serial,
        "started_at": session.started_at,
        "ended_at": session.ended_at,
        "zones": zones,
        "passes": len(session.passes),
        "cartridges": list(session.cartridges_used),
        "refusals": session.refusals,
        "policy_fingerprint": session.policy_fingerprint,
    }
