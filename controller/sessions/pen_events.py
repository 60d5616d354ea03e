"""What the pen says: its reliable messages (the link's own events are in ``link_events``).

Pen messages are dispatched from ``PEN_MESSAGE_HANDLERS``, a table keyed by
message type (in the manner of Klipper's ``serialhdl.py``). A message type
with no row is an explicit no-op (``_ignore``), never silence by accident.
Telemetry is not in the table: it is the hot path and goes straight to the
monitor (``on_telemetry``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from controller.audit import AuditKind
from controller.contract import EventKind
from controller.safety.context import CartridgeStatus
from controller.safety.gate import RefusalReason, format_mm
from controller.safety.monitor import StopDecision
from firmware_protocol.messages import (
    COUNTER_MOD,
    FAULT_REASONS,
    Arm,
    Armed,
    CartridgeInserted,
    CartridgeRemoved,
    CommandRefused,
    Disarmed,
    HostStopReason,
    Message,
    MotorStarted,
    MotorStopped,
    RefusalCode,
    Renew,
    SetDepth,
    Status,
    StopReason,
    TelemetryFlag,
    counter_diff,
)

from . import wording
from .enforcement import (
    close_pass,
    enforce,
    fault,
    reconcile_counters,
    stop,
    stop_for,
    unapproved,
)
from .outcome import LeaseAction, LeaseDirective
from .records import PassRecord, Session
from .states import ArmInput, ArmState, arm_transition
from .step import Step

# --- pen messages ----------------------------------------------------------------------


def pen_message(step: Step, port: str, message: Message) -> bool:
    """Apply one reliable message from the pen. False: nothing happened (no outcome)."""
    handler = PEN_MESSAGE_HANDLERS.get(type(message), _ignore)
    if handler is _ignore:
        return False
    handler(step, port, step.live(port), message)
    enforce(step, port)
    return True


def _on_motor_started(step: Step, port: str, session: Session | None, message: Any) -> None:
    assert isinstance(message, MotorStarted)
    pen = step.pen(port)
    approved = pen.arm is not ArmState.DISARMED
    pen.motor_running = True
    pen.stopping = False  # a new run: a stop for it is news
    step.out.state_changed = True
    if pen.runs_counted is not None and pen.counters_boot == pen.boot_id:
        gap = counter_diff(message.runs, pen.runs_counted)
        if 1 < gap < COUNTER_MOD // 2:  # runs between the last one counted and this one
            reconcile_counters(
                step,
                port,
                runs=(message.runs - 1) % COUNTER_MOD,
                strokes=message.strokes,
                cartridge_id=message.cartridge_id or None,
                cartridge_strokes=message.cartridge_strokes,
            )
    pen.counters_boot, pen.runs_counted = pen.boot_id, message.runs
    pen.strokes_seen = message.strokes
    if message.cartridge_id:
        pen.cartridge_id, pen.cartridge_strokes = message.cartridge_id, message.cartridge_strokes
    if not approved:
        # Confirmed disarmed (Disarmed, an acknowledged Stop, a new link): the pen may not
        # run. Stop it, fault the session, and still count the pass below: it happened.
        unapproved(step, port, session, "The pen started the needle while it was disarmed.")
    elif session is None or session.current_zone is None:
        stop(
            step,
            port,
            session,
            HostStopReason.FAULT,
            "The pen started without a treatment session and zone. The needle was stopped.",
            "Start a session and choose a zone before treating.",
            {"depth_set_um": message.depth_set_um},
        )
    if session is None or session.current_zone is None:
        return
    zone = session.zones[session.current_zone]
    if session.current_pass is not None:  # a stop we never heard of: count it
        close_pass(step, session, "missed_stop")
    session.current_pass = PassRecord(
        zone_id=zone.zone_id,
        number=zone.passes_done + 1,
        cartridge_id=pen.cartridge_id,
        depth_setpoint_um=session.depth_setpoint_um,
        started_at=step.now,
        start_strokes=message.strokes,
        run=message.runs,
    )
    step.event(
        EventKind.PASS_STARTED,
        session,
        zone_id=zone.zone_id,
        number=zone.passes_done + 1,
        max_passes=zone.max_passes,
    )
    cartridge = pen.cartridge_id
    ledger = step.store.ledger
    if cartridge is not None:
        status = ledger.status(cartridge, session.session_id)
        if ledger.mark_used(cartridge, session.session_id, step.now):
            session.cartridges_used.append(cartridge)
        elif status is not CartridgeStatus.THIS_SESSION:
            stop(
                step,
                port,
                session,
                HostStopReason.FAULT,
                f"The pen ran with cartridge {cartridge}, which may not be used for this "
                "client. The needle was stopped.",
                "Discard the cartridge, inspect the client's skin, and insert a new sterile "
                "cartridge.",
                {"cartridge_id": cartridge, "status": str(status)},
            )
            fault(
                step,
                session,
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
        stop_for(step, port, session, decision)


def _on_motor_stopped(step: Step, port: str, session: Session | None, message: Any) -> None:
    assert isinstance(message, MotorStopped)
    pen = step.pen(port)
    pen.motor_running = False
    pen.strokes_seen = message.strokes
    if pen.cartridge_id is not None:
        pen.cartridge_strokes = message.cartridge_strokes
    step.out.state_changed = True
    if session is None or session.current_pass is None:
        return
    record = session.current_pass
    zone = session.zones[record.zone_id]
    reason = wording.stop_reason_name(message.reason)
    close_pass(
        step,
        session,
        reason,
        strokes=counter_diff(message.strokes, record.start_strokes),  # the counter wraps
        peak_depth_um=message.peak_depth_um,
    )
    setpoint = record.depth_setpoint_um
    tolerance = step.limits(port).depth_tolerance_um
    allowed = min(zone.max_depth_um, setpoint if setpoint is not None else 0) + tolerance
    if message.peak_depth_um > allowed:
        # Between two samples the needle went too deep: the pass is over, record it.
        fault(
            step,
            session,
            "depth_overshoot",
            f"The pen reports a peak depth of {format_mm(message.peak_depth_um)} in this "
            f"pass, more than the {format_mm(allowed)} allowed on the {zone.label}.",
            "Inspect the client's skin and the pen, then acknowledge the fault to continue.",
        )
    if message.reason in FAULT_REASONS:
        message_text, remediation = wording.PEN_STOP_WORDS[message.reason]
        fault(step, session, reason, message_text, remediation)
    elif message.reason == StopReason.LEASE_EXPIRED:
        message_text, remediation = wording.PEN_STOP_WORDS[message.reason]
        step.audit(
            AuditKind.STOP,
            session,
            port,
            message_text,
            remediation,
            {"pen_reason": reason},
        )
    if zone.passes_done >= zone.max_passes:
        step.event(
            EventKind.ZONE_COMPLETED,
            session,
            zone_id=zone.zone_id,
            passes_done=zone.passes_done,
        )
        if pen.arm is not ArmState.DISARMED:
            stop(
                step,
                port,
                session,
                HostStopReason.PASS_LIMIT,
                f"The {zone.label} has had all {zone.max_passes} passes; the pen was "
                "disarmed for this zone.",
                "Choose the next zone.",
                {"zone_id": zone.zone_id, "passes_done": zone.passes_done},
            )


def _on_armed(step: Step, port: str, session: Session | None, message: Any) -> None:
    assert isinstance(message, Armed)
    pen = step.pen(port)
    out = step.out
    out.state_changed = True
    if message.token != pen.lease_token:
        if pen.arm is ArmState.ARMING:
            return  # answers an older Arm; ours is still in flight (the link keeps order)
        # Armed under a lease the controller did not grant (or no longer keeps).
        pen.arm = arm_transition(pen.arm, ArmInput.PEN_ARMED)
        unapproved(step, port, session, "The pen armed itself without the controller's Arm.")
        return
    pen.arm = arm_transition(pen.arm, ArmInput.PEN_ARMED)
    pen.cartridge_id = message.cartridge_id or None
    pen.cartridge_strokes = message.cartridge_strokes if message.cartridge_id else None
    arming = pen.arming
    if arming is None or (message.depth_um, message.max_depth_um) != (
        arming.depth_um,
        arming.limit_um,
    ):
        approved = (
            f"{format_mm(arming.depth_um)} (limit {format_mm(arming.limit_um)})"
            if arming
            else "nothing"
        )
        unapproved(
            step,
            port,
            session,
            f"The pen armed at {format_mm(message.depth_um)} (limit "
            f"{format_mm(message.max_depth_um)}); the controller approved {approved}.",
        )
        return
    pen.depth_set_um = message.depth_um  # the pen confirms the setpoint it armed with
    reconcile_counters(
        step,
        port,
        runs=message.runs,
        strokes=message.strokes,
        cartridge_id=message.cartridge_id or None,
        cartridge_strokes=message.cartridge_strokes,
    )
    step.event(EventKind.ARMED, session, port=port, lease_ms=message.lease_ms)
    if not pen.stopping:
        out.leases.append(
            LeaseDirective(port, LeaseAction.KEEP_RENEWING, message.token, message.lease_ms)
        )


def _on_disarmed(step: Step, port: str, session: Session | None, message: Any) -> None:
    assert isinstance(message, Disarmed)
    pen = step.pen(port)
    pen.arm = arm_transition(pen.arm, ArmInput.PEN_DISARMED)
    step.out.state_changed = True
    if pen.arm is ArmState.DISARMED:
        pen.lease_token = None
        pen.stopping = False
        step.out.leases.append(LeaseDirective(port, LeaseAction.STOP_RENEWING))
    step.event(
        EventKind.DISARMED,
        session,
        port=port,
        reason=wording.stop_reason_name(message.reason),
    )
    if message.reason in FAULT_REASONS and session is not None:
        text, remediation = wording.PEN_STOP_WORDS[message.reason]
        fault(step, session, wording.stop_reason_name(message.reason), text, remediation)


def _on_cartridge_inserted(step: Step, port: str, session: Session | None, message: Any) -> None:
    assert isinstance(message, CartridgeInserted)
    pen = step.pen(port)
    pen.cartridge_id = message.cartridge_id
    pen.cartridge_strokes = message.cartridge_strokes
    step.out.state_changed = True
    status = step.store.ledger.status(
        message.cartridge_id, session.session_id if session else None, message.cartridge_strokes
    )
    step.event(
        EventKind.CARTRIDGE_INSERTED,
        session,
        port=port,
        cartridge_id=message.cartridge_id,
        status=str(status),
    )


def _on_cartridge_removed(step: Step, port: str, session: Session | None, message: Any) -> None:
    assert isinstance(message, CartridgeRemoved)
    pen = step.pen(port)
    pen.cartridge_id = None
    pen.cartridge_strokes = None
    step.out.state_changed = True
    step.event(
        EventKind.CARTRIDGE_REMOVED,
        session,
        port=port,
        cartridge_id=message.cartridge_id,
    )


def _on_command_refused(step: Step, port: str, session: Session | None, message: Any) -> None:
    assert isinstance(message, CommandRefused)
    pen = step.pen(port)
    step.out.state_changed = True
    if message.msg_type in (Arm.TYPE, Renew.TYPE):
        event = ArmInput.ARM_REFUSED if message.msg_type == Arm.TYPE else ArmInput.PEN_DISARMED
        pen.arm = arm_transition(pen.arm, event)
        if pen.arm is ArmState.DISARMED:
            pen.lease_token = None
        step.out.leases.append(LeaseDirective(port, LeaseAction.STOP_RENEWING))
    if message.msg_type == SetDepth.TYPE:
        pen.depth_pending_um = None
        if session is not None:
            session.depth_setpoint_um = None  # the pen did not take it: it is not set
    command = wording.COMMAND_NAMES.get(message.msg_type, f"command {message.msg_type:#04x}")
    try:
        why = RefusalCode(message.reason).name.lower().replace("_", " ")
    except ValueError:
        why = f"reason {message.reason}"
    remediation = wording.PEN_REFUSAL_WORDS.get(
        message.reason, "Try again; if it repeats, restart the pen."
    )
    text = f"The pen refused {command}: {why}."
    step.event(EventKind.REFUSED, session, port=port, by="pen", message=text)
    step.audit(
        AuditKind.REFUSAL,
        session,
        port,
        text,
        remediation,
        {"by": "pen", "msg_type": message.msg_type, "pen_reason": message.reason},
    )


def _on_status(step: Step, port: str, session: Session | None, message: Any) -> None:
    """The pen's whole state: the controller's records are compared with it (§4.9)."""
    assert isinstance(message, Status)
    pen = step.pen(port)
    step.out.state_changed = True
    active = message.flags & (TelemetryFlag.ARMED | TelemetryFlag.MOTOR_RUNNING)
    if active and pen.arm is ArmState.DISARMED:
        pen.arm = arm_transition(pen.arm, ArmInput.PEN_ARMED)
        unapproved(
            step, port, session, "The pen reports itself armed; the controller did not arm it."
        )
    elif message.flags & TelemetryFlag.ARMED:
        pen.arm = arm_transition(pen.arm, ArmInput.PEN_ARMED)
    elif pen.arm is ArmState.ARMED:
        pen.arm = arm_transition(pen.arm, ArmInput.PEN_DISARMED)
        pen.lease_token = None
    if pen.depth_pending_um is None:  # a SetDepth sent after the query is not in it yet
        pen.depth_set_um = message.depth_set_um if message.flags & TelemetryFlag.DEPTH_SET else None
        _reconcile_setpoint(step, port, session)
    cartridge = message.cartridge_id or None
    chip = message.cartridge_strokes if cartridge else None
    reconcile_counters(
        step,
        port,
        runs=message.runs,
        strokes=message.strokes,
        cartridge_id=cartridge,
        cartridge_strokes=chip,
    )
    pen.cartridge_id, pen.cartridge_strokes = cartridge, chip
    pen.confirmed = True
    pen.confirmed_at_ms = message.device_ms


def _reconcile_setpoint(step: Step, port: str, session: Session | None) -> None:
    """An approved depth the pen does not hold is no longer approved: set it again."""
    pen = step.pen(port)
    if session is None or session.depth_setpoint_um is None:
        return
    if session.depth_setpoint_um == pen.depth_set_um:
        return
    held = "no depth" if pen.depth_set_um is None else format_mm(pen.depth_set_um)
    message = (
        f"The pen holds {held}, not the {format_mm(session.depth_setpoint_um)} approved for "
        "this zone; the depth is cleared."
    )
    session.depth_setpoint_um = None
    step.audit(
        AuditKind.REFUSAL,
        session,
        port,
        message,
        "Set the depth again before arming.",
        {"code": str(RefusalReason.DEPTH_NOT_CONFIRMED), "pen_depth_set_um": pen.depth_set_um},
    )
    step.event(
        EventKind.REFUSED,
        session,
        code=str(RefusalReason.DEPTH_NOT_CONFIRMED),
        message=message,
        remediation="Set the depth again before arming.",
    )


def _ignore(step: Step, port: str, session: Session | None, message: Any) -> None:
    """Messages with no effect on sessions (none today but those the link consumes)."""


PenHandler = Callable[[Step, str, "Session | None", Any], None]

#: Every reliable pen message and what it does to the registry, read top to bottom.
# fmt: off
PEN_MESSAGE_HANDLERS: Final[dict[type[Message], PenHandler]] = {
    MotorStarted:      _on_motor_started,
    MotorStopped:      _on_motor_stopped,
    Armed:             _on_armed,
    Disarmed:          _on_disarmed,
    CartridgeInserted: _on_cartridge_inserted,
    CartridgeRemoved:  _on_cartridge_removed,
    CommandRefused:    _on_command_refused,
    Status:            _on_status,
}
# fmt: on
