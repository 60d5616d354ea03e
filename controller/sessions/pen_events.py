"""What the pen and its link say: link up/down/refused/rebooted and the pen's messages.

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
from controller.safety.context import CartridgeStatus, LinkStatus
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
    SetTelemetryRate,
    Status,
    Stop,
    StopReason,
    TelemetryFlag,
    counter_diff,
)

from . import wording
from .enforcement import (
    check_identity,
    close_pass,
    enforce,
    fault,
    lose_link,
    reconcile_counters,
    stop,
    stop_for,
    unapproved,
)
from .outcome import LeaseAction, LeaseDirective
from .records import DepartedPen, PassRecord, Session
from .states import ArmInput, ArmState, arm_transition
from .step import Step

# --- the link --------------------------------------------------------------------------


def pen_connected(step: Step, port: str, identity: Identity) -> None:
    """The handshake succeeded: the pen is identified. Configure it and ask its state."""
    pen = step.pen(port)
    serial = identity.serial_text
    known = (pen.serial, pen.boot_id)
    if pen.serial != serial:
        _swap_pens(step, port, serial)
    pen.link = LinkStatus.UP
    pen.serial, pen.boot_id = serial, identity.boot_id
    pen.firmware = identity.firmware_version
    pen.max_depth_um = identity.max_depth_um or None
    pen.max_lease_ms = identity.max_lease_ms or None
    pen.depth_accuracy_um = identity.depth_accuracy_um
    pen.min_speed_hz = identity.min_speed_hz or None
    pen.max_speed_hz = identity.max_speed_hz or None
    pen.max_telemetry_rate_hz = identity.max_telemetry_rate_hz or None
    step.store.limits.pop(port, None)  # the pen's declared limits may have changed
    # A pen disarms when it accepts a new host (PROTOCOL.md §10): nothing it held before
    # is assumed until it reports its state (Status, asked below). Until then it is
    # never armed.
    pen.arm, pen.lease_token = ArmState.DISARMED, None
    pen.motor_running = pen.stopping = False
    _forget_confirmations(step, port)
    step.out.state_changed = True
    step.event(EventKind.PEN_CONNECTED, None, port=port, serial=serial)
    expected = step.ports.get(port)
    if expected is not None and serial != expected:
        text, remediation = wording.unexpected_pen_connected(serial, expected)
        step.audit(
            AuditKind.REFUSAL,
            step.live(port),
            port,
            text,
            remediation,
            {"code": str(RefusalReason.UNEXPECTED_PEN), "serial": serial, "expected": expected},
        )
    session = step.live(port)
    if session is not None:
        check_identity(step, session, news=known != (serial, identity.boot_id))
    for message in (
        SetLiftOffGrace(step.policy.lift_off_grace_ms),
        SetTelemetryRate(step.policy.telemetry_rate_hz),
        QueryStatus(),
    ):
        step.send(port, session, message)
    enforce(step, port)


def _swap_pens(step: Step, port: str, serial: str) -> None:
    """Another pen on the port: keep what was counted of the one that left, by its serial,
    and take up what was counted of the one that came (if it was here before)."""
    pen = step.pen(port)
    departed = step.store.departed
    if pen.serial is not None:
        departed[pen.serial] = DepartedPen(
            boot_id=pen.counters_boot,
            runs_counted=pen.runs_counted,
            strokes_seen=pen.strokes_seen,
            arming=pen.arming,
            cartridge_id=pen.cartridge_id,
            cartridge_strokes=pen.cartridge_strokes,
        )
    back = departed.pop(serial, None) or DepartedPen()
    pen.counters_boot, pen.runs_counted = back.boot_id, back.runs_counted
    pen.strokes_seen, pen.arming = back.strokes_seen, back.arming
    pen.cartridge_id, pen.cartridge_strokes = back.cartridge_id, back.cartridge_strokes


def link_down(step: Step, port: str, reason: str) -> None:
    """The link is gone. The pen stops within its lease."""
    lose_link(step, port, reason, LinkStatus.DOWN)


def handshake_refused(step: Step, port: str, reason: str, identity: Identity) -> None:
    """The pen failed the handshake (protocol/schema mismatch): it must never be armed."""
    pen = step.pen(port)
    news = pen.link is not LinkStatus.REFUSED
    lose_link(step, port, reason, LinkStatus.REFUSED, audit=False)
    pen.serial, pen.boot_id = identity.serial_text, identity.boot_id
    if news:
        step.audit(
            AuditKind.REFUSAL,
            step.live(port),
            port,
            f"Pen {identity.serial_text} failed its identity check and will not be armed: {reason}",
            "Do not use this pen. Ask a manager to update the pen firmware or the controller.",
            {
                "code": str(RefusalReason.PEN_NOT_VERIFIED),
                "firmware": identity.firmware_version,
            },
        )


def pen_rebooted(step: Step, port: str, current: Identity) -> None:
    """The pen announced a new boot id. Treatment never resumes by itself."""
    pen = step.pen(port)
    lose_link(step, port, "the pen restarted", LinkStatus.DOWN, audit=False)
    pen.serial, pen.boot_id = current.serial_text, current.boot_id
    session = step.live(port)
    if session is not None:
        check_identity(step, session, news=True)


def _forget_confirmations(step: Step, port: str) -> None:
    """What the pen confirmed belongs to the link it was confirmed on."""
    pen = step.pen(port)
    pen.confirmed = False
    pen.confirmed_at_ms = None
    pen.depth_set_um = None
    pen.depth_pending_um = None
    step.store.rate(port).reset()


def delivered(step: Step, port: str, message: Message) -> bool:
    """The pen acknowledged (and so applied) one of our commands. False: nothing learned."""
    pen = step.pen(port)
    if isinstance(message, SetDepth):
        pen.depth_set_um = message.depth_um
        if pen.depth_pending_um == message.depth_um:
            pen.depth_pending_um = None
        step.out.state_changed = True
        return True
    if isinstance(message, Stop | Disarm):
        # Applied: the pen is disarmed now, and reports so in every later frame.
        before = pen.arm
        pen.arm = arm_transition(pen.arm, ArmInput.STOP_CONFIRMED)
        if pen.arm is ArmState.DISARMED and before is not ArmState.DISARMED:
            pen.lease_token = None
            pen.stopping = False
            step.out.leases.append(LeaseDirective(port, LeaseAction.STOP_RENEWING))
            step.out.state_changed = True
        return True
    return False


def arm_withdrawn(step: Step, port: str, token: int, why: str) -> None:
    """The runtime did not send the Arm with ``token`` (a stop overtook it, or its record
    could not be saved): the pen was never asked to arm."""
    pen = step.pen(port)
    if pen.lease_token != token or pen.arm is not ArmState.ARMING:
        return  # a later Arm (or the pen's answer) has moved on: nothing to undo
    pen.arm = arm_transition(pen.arm, ArmInput.ARM_WITHDRAWN)
    pen.lease_token = None
    pen.stopping = False
    step.out.state_changed = True
    step.event(EventKind.DISARMED, step.live(port), port=port, reason="arm_withdrawn", why=why)


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
