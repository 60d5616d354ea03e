"""What the link says about a pen: connected, lost, refused, rebooted; our commands it
acknowledged; an Arm the runtime withdrew before sending.

The pen's own messages are in ``pen_events``.
"""

from __future__ import annotations

from controller.audit import AuditKind
from controller.contract import EventKind
from controller.safety.context import LinkStatus
from controller.safety.gate import RefusalReason
from firmware_protocol.messages import (
    Disarm,
    Identity,
    Message,
    QueryStatus,
    SetDepth,
    SetLiftOffGrace,
    SetTelemetryRate,
    Stop,
)

from . import wording
from .enforcement import (
    check_identity,
    enforce,
    lose_link,
)
from .outcome import LeaseAction, LeaseDirective
from .records import DepartedPen
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
            step.out.leases.append(LeaseDirective(port, LeaseAction.STOP_RENEWING))
            step.out.state_changed = True
        if pen.arm is ArmState.DISARMED and pen.stopping:
            # Our Stop is confirmed, also one sent to a pen we held disarmed (it ran
            # unapproved): a running sample from here on is the pen's own doing, and
            # the monitor and the unapproved-run rule must judge it again.
            pen.stopping = False
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
