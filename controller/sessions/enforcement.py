"""The enforcement rules: stop, fault, fire a life-cycle input, re-check, lose a link, close a pass.

Shared by therapist actions (``therapist.py``), link events (``link_events.py``)
and pen messages (``pen_events.py``); each is a function of the :class:`~.step.Step` being
processed. The safety properties they keep are listed in ``registry.py``.
"""

from __future__ import annotations

from typing import Any, Final

from controller.audit import AuditKind
from controller.contract import EventKind
from controller.safety.context import LinkStatus, SessionState
from controller.safety.gate import RefusalReason, arming_refusal
from controller.safety.monitor import StopDecision
from firmware_protocol.messages import COUNTER_MOD, HostStopReason, Stop, counter_diff

from .outcome import LeaseAction, LeaseDirective, PenCommand
from .records import FaultRecord, PassRecord, Session
from .states import ArmInput, ArmState, SessionInput, arm_transition, session_transition
from .step import Step

#: Why the controller stops a pen that left ACTIVE, by the state it went to.
STOP_ON_LEAVING: Final = {
    SessionState.PAUSED: HostStopReason.THERAPIST,
    SessionState.INTERRUPTED: HostStopReason.LINK_LOSS,
    SessionState.FAULTED: HostStopReason.FAULT,
    SessionState.ENDED: HostStopReason.SESSION_END,
}


def stop(
    step: Step,
    port: str,
    session: Session | None,
    reason: HostStopReason,
    message: str,
    remediation: str,
    details: dict[str, Any],
    *,
    always_send: bool = False,
    force_record: bool = False,
) -> None:
    """Send Stop(reason), stop renewing, and record the stop once per stopping."""
    pen = step.pen(port)
    out = step.out
    if pen.link is LinkStatus.UP and (
        always_send or force_record or pen.arm is not ArmState.DISARMED or pen.motor_running
    ):
        out.command(PenCommand(port, Stop(int(reason))))
    out.leases.append(LeaseDirective(port, LeaseAction.STOP_RENEWING))
    if pen.stopping and not force_record:
        return
    pen.stopping = True
    out.state_changed = True
    step.event(
        EventKind.STOP_SENT,
        session,
        port=port,
        reason=reason.name.lower(),
        message=message,
    )
    step.audit(
        AuditKind.STOP,
        session,
        port,
        message,
        remediation,
        {"reason": reason.name.lower(), **details},
    )


def stop_for(step: Step, port: str, session: Session | None, decision: StopDecision) -> None:
    """Carry out the monitor's decision: stop now, and fault the session if it is a fault."""
    stop(
        step,
        port,
        session,
        decision.reason,
        decision.message,
        decision.remediation,
        dict(decision.details),
        always_send=True,
    )
    if decision.is_fault and session is not None:
        fault(
            step,
            session,
            decision.reason.name.lower(),
            decision.message,
            decision.remediation,
        )


def fault(
    step: Step,
    session: Session,
    kind: str,
    detail: str,
    remediation: str,
    *,
    event: SessionInput = SessionInput.SAFETY_FAULT,
) -> None:
    """Move the session to FAULTED (if the table allows) and record the fault once."""
    # The same fault reported twice (MotorStopped then Disarmed) is recorded once.
    is_new = session.fault is None or session.fault.kind != kind
    transitioned = fire(step, session, event, detail)
    if session.state is SessionState.FAULTED and session.fault is None:
        session.fault = FaultRecord(kind=kind, detail=detail, at=step.now)
        step.out.state_changed = True
    if transitioned or is_new:
        step.audit(
            AuditKind.FAULT,
            session,
            session.port,
            detail,
            remediation,
            {"fault_kind": kind, "state": str(session.state)},
        )
        step.event(
            EventKind.FAULT,
            session,
            kind=kind,
            message=detail,
            remediation=remediation,
        )


def fire(step: Step, session: Session, event: SessionInput, why: str) -> bool:
    """Apply the life-cycle table; stop the pen when leaving ACTIVE (Rule 4)."""
    new = session_transition(session.state, event)
    if new is None or new is session.state:
        return False
    old, session.state = session.state, new
    step.out.state_changed = True
    step.event(
        EventKind.STATE_CHANGED,
        session,
        previous=str(old),
        state=str(new),
        input=str(event),
        why=why,
    )
    if new is not SessionState.ACTIVE:
        pen = step.pen(session.port)
        if not pen.stopping and (pen.arm is not ArmState.DISARMED or pen.motor_running):
            stop(
                step,
                session.port,
                session,
                STOP_ON_LEAVING.get(new, HostStopReason.OTHER),
                f"The needle was stopped because the session is now {new}.",
                "",
                {"state": str(new)},
            )
    return True


def enforce(step: Step, port: str) -> None:
    """Stop a pen that may be armed or running but would no longer be allowed to arm."""
    pen = step.pen(port)
    if pen.link is not LinkStatus.UP or pen.stopping:
        return
    if pen.arm is ArmState.DISARMED and not pen.motor_running:
        return
    session = step.live(port)
    ctx = step.context(port, session)
    refusal = arming_refusal(ctx)
    if refusal is None:
        return
    stop(
        step,
        port,
        session,
        _stop_reason_for(refusal.code, ctx.session_state),
        f"The pen was stopped: {refusal.message}",
        refusal.remediation,
        {"code": str(refusal.code)},
    )


def lose_link(step: Step, port: str, reason: str, link: LinkStatus, *, audit: bool = True) -> None:
    """The link is gone (or refused): the pen stops within its lease; the session is
    interrupted and its pass in progress counted."""
    pen = step.pen(port)
    out = step.out
    was_up = pen.link is LinkStatus.UP
    pen.link = link
    step.store.rate(port).reset()  # the next link's samples start a new window
    pen.arm = arm_transition(pen.arm, ArmInput.LINK_LOST)
    pen.lease_token = None
    pen.motor_running = pen.stopping = False
    out.state_changed = True
    out.leases.append(LeaseDirective(port, LeaseAction.STOP_RENEWING))
    if was_up:
        step.event(EventKind.PEN_DISCONNECTED, None, port=port, reason=reason)
    session = step.live(port)
    if session is None or session.pen_serial is None:
        return
    if session.current_pass is not None:
        # The pass goes on counting strokes on the cartridge after the link is gone; it is
        # counted here, so the chip's later count must not make another pass of it.
        pen.cartridge_strokes = None
    close_pass(step, session, "link_lost")
    if fire(step, session, SessionInput.LINK_LOST, reason) and audit:
        step.audit(
            AuditKind.FAULT,
            session,
            port,
            f"The connection to the pen was lost ({reason}). The pen stops by itself "
            "within its lease; the session is interrupted.",
            "Check that the pen is on and connected, then tap Resume and arm again.",
            {"fault_kind": "link_lost"},
        )


def check_identity(step: Step, session: Session, *, news: bool) -> None:
    """A bound session whose pen changed serial or boot id is a fault (§4.7)."""
    pen = step.pen(session.port)
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
    close_pass(step, session, kind)
    # A restarted or different pen does not hold the depth approved for this session.
    session.depth_setpoint_um = None
    session.speed_hz = None
    transitioned = fire(step, session, event, detail)
    if session.state is SessionState.FAULTED and session.fault is None:
        session.fault = FaultRecord(kind=kind, detail=detail, at=step.now)
    if news or transitioned:
        step.audit(
            AuditKind.FAULT,
            session,
            session.port,
            detail,
            remediation,
            {"fault_kind": kind, "serial": pen.serial, "boot_id": pen.boot_id},
        )
        step.event(
            EventKind.FAULT,
            session,
            kind=kind,
            message=detail,
            remediation=remediation,
        )


def close_pass(
    step: Step,
    session: Session,
    reason: str,
    *,
    strokes: int | None = None,
    peak_depth_um: int | None = None,
) -> None:
    """End the pass in progress, if any, and count it (Rule 6)."""
    record = session.current_pass
    if record is None:
        return
    record.ended_at = step.now
    record.strokes = strokes
    record.peak_depth_um = peak_depth_um
    record.end_reason = reason
    session.passes.append(record)
    session.current_pass = None
    zone = session.zones[record.zone_id]
    zone.passes_done += 1
    step.out.state_changed = True
    step.event(
        EventKind.PASS_ENDED,
        session,
        zone_id=zone.zone_id,
        number=record.number,
        passes_done=zone.passes_done,
        max_passes=zone.max_passes,
        reason=reason,
        strokes=strokes,
        peak_depth_um=peak_depth_um,
    )


def _stop_reason_for(code: RefusalReason, state: SessionState | None) -> HostStopReason:
    if code is RefusalReason.ZONE_PASSES_USED:
        return HostStopReason.PASS_LIMIT
    if code is RefusalReason.SESSION_NOT_ACTIVE:
        return STOP_ON_LEAVING.get(state, HostStopReason.OTHER) if state else HostStopReason.OTHER
    if code in (
        RefusalReason.LINK_DOWN,
        RefusalReason.WRONG_PEN,
        RefusalReason.UNEXPECTED_PEN,
        RefusalReason.PEN_NOT_VERIFIED,
    ):
        return HostStopReason.LINK_LOSS
    if code is RefusalReason.FAULT_UNRESOLVED:
        return HostStopReason.FAULT
    return HostStopReason.OTHER


# --- what the pen did that the controller did not approve or did not hear ----------------


def unapproved(step: Step, port: str, session: Session | None, what: str) -> None:
    """The pen is armed or running without the controller's approval: stop it, fault the
    session (product.md §4.9). Every repetition sends Stop again; it is recorded once."""
    remediation = "Check the pen; do not treat with it again until it has been inspected."
    stop(
        step,
        port,
        session,
        HostStopReason.FAULT,
        f"{what} The needle was stopped.",
        remediation,
        {"unapproved": what},
        always_send=True,
    )
    if session is not None:
        fault(step, session, "unapproved_run", what, remediation)


def reconcile_counters(
    step: Step,
    port: str,
    *,
    runs: int,
    strokes: int,
    cartridge_id: int | None,
    cartridge_strokes: int | None,
) -> None:
    """Compare the pen's counters with what the controller counted; count what it missed.

    ``runs`` and ``strokes`` are the pen's counters since boot (Status, Armed). Runs the
    controller never heard of (a MotorStarted lost with a link, or decided while it was
    restarting) become passes of the zone the pen was last armed for, each recorded as
    recovered, with the cartridge bound to the session (product.md §4.9). After a reboot
    the counters restarted: the cartridge's own chip tells whether the needle ran.
    """
    pen = step.pen(port)
    same_boot = pen.counters_boot == pen.boot_id and pen.runs_counted is not None
    if same_boot and pen.runs_counted is not None:
        missed = counter_diff(runs, pen.runs_counted)
        strokes_since = (
            counter_diff(strokes, pen.strokes_seen) if pen.strokes_seen is not None else None
        )
        if missed >= COUNTER_MOD // 2:
            missed = 0  # behind what was counted: an older report, nothing new
        if missed:
            _recover_passes(step, port, missed, strokes_since, cartridge_id)
        elif strokes_since:
            _complete_cut_pass(step, port, strokes)
    elif (
        cartridge_id is not None
        and cartridge_id == pen.cartridge_id
        and pen.cartridge_strokes is not None
        and cartridge_strokes is not None
        and cartridge_strokes > pen.cartridge_strokes
    ):
        # The pen rebooted after runs nobody heard: at least one pass happened.
        _recover_passes(step, port, 1, cartridge_strokes - pen.cartridge_strokes, cartridge_id)
    pen.counters_boot = pen.boot_id
    pen.runs_counted = runs
    pen.strokes_seen = strokes
    step.out.state_changed = True


def _recover_passes(
    step: Step, port: str, count: int, strokes: int | None, cartridge_id: int | None
) -> None:
    """Count ``count`` runs nobody heard as passes of the session whose arming they ran
    under, whether it is still live or has ended since (its cartridge then spent)."""
    pen = step.pen(port)
    arming = pen.arming
    session = step.store.sessions.get(arming.session_id) if arming else None
    if arming is None or session is None or session.port != port:
        what = (
            f"The pen ran {count} time(s) while the controller was not listening, "
            "without an arming approved for this session."
        )
        unapproved(step, port, step.live(port), what)
        return
    zone = session.zones[arming.zone_id]
    first_run = (pen.runs_counted or 0) + 1
    for n in range(count):
        session.current_pass = PassRecord(
            zone_id=zone.zone_id,
            number=zone.passes_done + 1,
            cartridge_id=cartridge_id,
            depth_setpoint_um=arming.depth_um,
            started_at=step.now,
            start_strokes=pen.strokes_seen or 0,
            run=(first_run + n) % COUNTER_MOD,
            recovered=True,
        )
        close_pass(step, session, "recovered", strokes=strokes if count == 1 else None)
    ledger = step.store.ledger
    if cartridge_id is not None and ledger.mark_used(cartridge_id, session.session_id, step.now):
        session.cartridges_used.append(cartridge_id)
    if session.state is SessionState.ENDED:
        ledger.spend_session(session.session_id, step.now)  # a finished client's: spent
        step.out.also_changed.add(session.session_id)
    step.audit(
        AuditKind.RECOVERY,
        session,
        port,
        f"{count} pass(es) on the {zone.label} were recovered from the pen's counters: the "
        "controller did not hear them while the link was down or it was restarting"
        + (f" ({strokes} strokes)." if strokes is not None else "."),
        "Check the session's pass count before continuing.",
        {"zone_id": zone.zone_id, "passes": count, "strokes": strokes, "recovered": True},
    )
    if zone.passes_done >= zone.max_passes:
        step.event(
            EventKind.ZONE_COMPLETED, session, zone_id=zone.zone_id, passes_done=zone.passes_done
        )


def _complete_cut_pass(step: Step, port: str, strokes: int) -> None:
    """A pass cut by a link loss or a restart was counted without its strokes: now that the
    pen reports its counter, and no run was missed, they are known."""
    session = step.live(port)
    if session is None or not session.passes:
        return
    record = session.passes[-1]
    if record.strokes is None and not record.recovered and record.run is not None:
        record.strokes = counter_diff(strokes, record.start_strokes)
