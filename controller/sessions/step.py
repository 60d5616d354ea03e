"""One input being processed: the state it may change and the outcome it is building.

Every rule of the registry is a function of a :class:`Step`: it reads the
store, asks the gate, changes records and appends commands, audit entries and
events to ``step.out``. The step is made by the registry facade for one input
and thrown away once its :class:`Outcome` is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from controller.audit import AuditEntry, AuditKind
from controller.contract import EventKind
from controller.policy import TreatmentPolicy
from controller.safety.context import GateContext, LinkStatus, SafetyLimits, ZoneContext
from controller.safety.gate import RefusalReason, Refused, check_command
from firmware_protocol.messages import Message

from .actions import Action, OverrideZone, SelectZone, SetZoneDepth
from .outcome import OutcomeBuilder, PenCommand, SessionEvent
from .records import PenState, Session, ZoneProgress
from .states import ArmState
from .store import RegistryStore
from .wording import not_now


def zone_context(zone: ZoneProgress) -> ZoneContext:
    """The gate's view of a zone: its effective limits (overrides applied) and progress."""
    return ZoneContext(
        zone_id=zone.zone_id,
        label=zone.label,
        max_depth_um=zone.max_depth_um,
        max_passes=zone.max_passes,
        passes_done=zone.passes_done,
        puncture_budget=zone.puncture_budget,
        overridden=zone.override is not None,
    )


@dataclass
class Step:
    """See the module docstring. ``now`` stamps records; nothing is timed with it."""

    store: RegistryStore
    policy: TreatmentPolicy
    lease_ms: int
    #: The configured pens: port -> the serial expected there (None: any serial).
    ports: Mapping[str, str | None]
    now: float
    out: OutcomeBuilder = field(default_factory=OutcomeBuilder)

    # --- lookups -------------------------------------------------------------------------

    def pen(self, port: str) -> PenState:
        return self.store.pen(port)

    def live(self, port: str) -> Session | None:
        return self.store.live(port)

    def limits(self, port: str) -> SafetyLimits:
        """The policy's limits narrowed by what the pen declared (cached until it connects
        again: they change only with its Identity)."""
        cached = self.store.limits.get(port)
        if cached is not None:
            return cached
        pen = self.pen(port)
        limits = self.store.limits[port] = SafetyLimits.from_policy(
            self.policy,
            pen.max_depth_um,
            pen.max_lease_ms,
            pen_accuracy_um=pen.depth_accuracy_um,
            pen_min_speed_hz=pen.min_speed_hz,
            pen_max_speed_hz=pen.max_speed_hz,
        )
        return limits

    def context(self, port: str, session: Session | None) -> GateContext:
        """The snapshot the gate and the monitor judge this pen and session by."""
        pen = self.pen(port)
        expected = self.ports.get(port)
        if pen.link is LinkStatus.REFUSED:
            link = LinkStatus.REFUSED
        elif pen.link is not LinkStatus.UP:
            link = LinkStatus.DOWN
        elif expected is not None and pen.serial != expected:
            link = LinkStatus.UNEXPECTED
        elif (
            session is not None
            and session.pen_serial is not None
            and (pen.serial != session.pen_serial or pen.boot_id != session.pen_boot_id)
        ):
            link = LinkStatus.FOREIGN
        else:
            link = LinkStatus.UP
        ledger = self.store.ledger
        zone = None
        if session is not None and session.current_zone is not None:
            progress = session.zones.get(session.current_zone)
            zone = zone_context(progress) if progress else None
        current = session.current_pass if session is not None else None
        return GateContext(
            limits=self.limits(port),
            session_state=session.state if session is not None else None,
            zone=zone,
            depth_setpoint_um=session.depth_setpoint_um if session is not None else None,
            cartridge_id=pen.cartridge_id,
            cartridge=ledger.status(
                pen.cartridge_id,
                session.session_id if session is not None else None,
                pen.cartridge_strokes,
            ),
            link=link,
            fault=session.fault.detail if session is not None and session.fault else None,
            motor_running=pen.motor_running,
            stop_sent=pen.stopping,
            lease_token=pen.lease_token,
            pass_start_strokes=current.start_strokes if current is not None else None,
            pen_serial=pen.serial,
            expected_serial=expected,
            armed=pen.arm is not ArmState.DISARMED,
            pen_confirmed=pen.confirmed,
            pen_depth_set_um=pen.depth_set_um,
            pen_depth_pending_um=pen.depth_pending_um,
            telemetry_rate_hz=self.store.rate(port).rate(),
        )

    # --- what the step produces ----------------------------------------------------------

    def send(self, port: str, session: Session | None, message: Message) -> Refused | None:
        """Queue ``message`` if the gate allows it now; the refusal otherwise."""
        decision = check_command(self.context(port, session), message)
        if isinstance(decision, Refused):
            return decision
        self.out.command(PenCommand(port, message))
        return None

    def audit(
        self,
        kind: AuditKind,
        session: Session | None,
        port: str | None,
        message: str,
        remediation: str,
        details: dict[str, Any],
    ) -> None:
        pens = self.store.pens
        device = pens[port].serial if port in pens else None
        device = device or (session.pen_serial if session else None)
        self.out.audit.append(
            AuditEntry(
                kind=kind,
                at=self.now,
                message=message,
                remediation=remediation,
                session_id=session.session_id if session else None,
                device_id=device,
                details={"port": port, **details} if port else details,
            )
        )

    def event(self, kind: EventKind, session: Session | None, /, **detail: Any) -> None:
        port = session.port if session else str(detail.get("port", ""))
        detail.pop("port", None)
        self.out.events.append(
            SessionEvent(kind, self.now, port, session.session_id if session else None, detail)
        )

    def refuse(
        self,
        session: Session | None,
        port: str | None,
        action: Action,
        refusal: Refused | None,
    ) -> None:
        """Answer ``action`` with ``refusal``: recorded in the audit log and as an event."""
        refusal = refusal or Refused(  # pragma: no cover - callers pass one
            RefusalReason.BAD_REQUEST, "The request was refused.", "Try again."
        )
        out = self.out
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
        self.audit(AuditKind.REFUSAL, session, port, refusal.message, refusal.remediation, details)
        self.event(
            EventKind.REFUSED,
            session,
            port=port,
            code=str(refusal.code),
            message=refusal.message,
            remediation=refusal.remediation,
        )

    def refuse_not_now(self, session: Session, action: Action, what: str) -> None:
        self.refuse(session, session.port, action, not_now(what, session.state))
