"""Therapist and manager actions: one handler per action type, dispatched from a table.

``handle_action`` is the only entry: it finds the session, checks the actor's
role and that the session is theirs, runs the action's handler
(``ACTION_HANDLERS``, read top to bottom), then re-checks the pen against the
arming rules (``enforcement.enforce``). Every handler either changes state and
records it, or refuses with a sentence from ``wording.py``; none fails silently.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from controller.audit import AuditKind
from controller.contract import ID_RE, EventKind
from controller.safety.context import LinkStatus, SessionState
from controller.safety.gate import (
    Refused,
    format_mm,
    link_not_usable,
    passes_used,
    session_not_active,
)
from firmware_protocol.messages import Arm, Disarm, HostStopReason, SetDepth, SetSpeed

from . import wording
from .actions import (
    AcknowledgeFault,
    Action,
    ArmPen,
    CreateSession,
    DisarmPen,
    EndSession,
    OverrideZone,
    PauseSession,
    RecordSignIn,
    ResumeSession,
    Role,
    SelectZone,
    SetStrokeRate,
    SetZoneDepth,
    StartSession,
    StopPen,
    TakeOverSession,
)
from .enforcement import close_pass, enforce, fire, stop
from .outcome import LeaseAction, LeaseDirective, PenCommand
from .records import ArmingRecord, Session, ZoneOverride, ZoneProgress
from .report import build_report
from .states import ArmInput, ArmState, SessionInput, arm_transition, session_transition
from .step import Step, zone_context

_TREATING_ROLES: Final = frozenset({Role.THERAPIST, Role.MANAGER})


def handle_action(step: Step, action: Action) -> None:
    """Apply one therapist or manager action; a refusal lands in ``step.out.refusal``."""
    if isinstance(action, CreateSession):
        _create(step, action)
        return
    if isinstance(action, RecordSignIn):
        _record_sign_in(step, action)
        return
    session = step.store.sessions.get(action.session_id)
    if session is None:
        step.refuse(None, None, action, wording.unknown_session(action.session_id))
        return
    if not _role_ok(step, session, action):
        return
    ACTION_HANDLERS[type(action)](step, session, action)
    enforce(step, session.port)


def _role_ok(step: Step, session: Session, action: Action) -> bool:
    """The role may do this, and the session is the actor's own where that matters.

    A session belongs to whoever opened it (``Session.therapist_id``) until a
    manager takes it over. Stop and Disarm only lower risk: anyone may. An
    override is a manager's decision on a therapist's session, so it needs the
    role, not ownership.
    """
    actor = action.actor
    if isinstance(action, StopPen | DisarmPen):
        return True  # stopping the needle is never refused, whoever asks
    if isinstance(action, OverrideZone):
        if actor.role is Role.MANAGER:
            return True
        refusal = wording.role_may_not_override()
    elif isinstance(action, TakeOverSession):
        if actor.role is Role.MANAGER:
            return True
        refusal = wording.role_may_not_take_over(str(actor.role))
    elif actor.role not in _TREATING_ROLES:
        refusal = wording.role_may_not_operate(str(actor.role))
    elif actor.actor_id != session.therapist_id:
        refusal = wording.not_session_owner(session.therapist_id)
    else:
        return True
    step.refuse(session, session.port, action, refusal)
    return False


def _create(step: Step, action: CreateSession) -> None:
    problem = None
    if not ID_RE.match(action.session_id):
        problem = "session id"
    elif not ID_RE.match(action.client_ref):
        problem = "client reference (a pseudonymous code, never a name)"
    elif not 0 < len(action.port) <= 200:
        problem = "pen port"
    if problem:
        step.refuse(None, None, action, wording.bad_identifier(problem))
        return
    if action.actor.role not in _TREATING_ROLES:
        step.refuse(None, action.port, action, wording.role_may_not_open(str(action.actor.role)))
        return
    store, policy = step.store, step.policy
    refusal = None
    plan = policy.plan(action.plan_id)
    if action.session_id in store.sessions:
        refusal = wording.session_exists(action.session_id)
    elif plan is None:
        refusal = wording.unknown_plan(action.plan_id, list(policy.plans))
    elif action.port not in step.ports:
        refusal = wording.unknown_pen(action.port, list(step.ports))
    elif action.port in store.live_by_port:
        refusal = wording.pen_busy()
    if refusal or plan is None:
        step.refuse(None, action.port, action, refusal)
        return
    zones = {}
    for zone_id in plan.zone_ids:
        limits = policy.zones[zone_id]
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
        policy_fingerprint=policy.fingerprint,
        created_at=step.now,
        zones=zones,
    )
    store.sessions[session.session_id] = session
    store.live_by_port[session.port] = session.session_id
    step.out.state_changed = True
    step.event(EventKind.SESSION_CREATED, session, plan=plan.plan_id)
    step.audit(
        AuditKind.SESSION,
        session,
        session.port,
        # The client's code goes in the details, which the tablet API shows only to the
        # session's owner; the sentence is for everyone who reads the log.
        f"Session created with plan {plan.label}.",
        "",
        {"plan_id": plan.plan_id, "actor": action.actor.actor_id, "client_ref": session.client_ref},
    )


def _start(step: Step, session: Session, action: Any) -> None:
    assert isinstance(action, StartSession)
    if session_transition(session.state, SessionInput.START) is None:
        step.refuse_not_now(session, action, "start")
        return
    pen = step.pen(session.port)
    refusal = link_not_usable(step.context(session.port, session), treatment=True)
    if refusal or pen.serial is None:
        step.refuse(session, session.port, action, refusal or wording.link_down())
        return
    session.pen_serial, session.pen_boot_id = pen.serial, pen.boot_id
    session.started_at = step.now
    fire(step, session, SessionInput.START, f"started by {action.actor.actor_id}")
    step.audit(
        AuditKind.SESSION,
        session,
        session.port,
        f"Session started on pen {pen.serial}.",
        "",
        {"actor": action.actor.actor_id, "boot_id": pen.boot_id, "firmware": pen.firmware},
    )


def _select_zone(step: Step, session: Session, action: Any) -> None:
    assert isinstance(action, SelectZone)
    refusal = session_not_active(step.context(session.port, session))
    zone = session.zones.get(action.zone_id)
    pen = step.pen(session.port)
    if refusal is None and zone is None:
        refusal = _zone_refusal(step, action.zone_id)
    if refusal is None and (pen.arm is not ArmState.DISARMED or pen.motor_running):
        refusal = wording.disarm_before_zone_change()
    if refusal is None and zone is not None:
        refusal = passes_used(zone_context(zone))
    if refusal or zone is None:
        step.refuse(session, session.port, action, refusal)
        return
    if session.current_zone != zone.zone_id:
        # A setpoint belongs to one zone: never carry it to another.
        session.current_zone = zone.zone_id
        session.depth_setpoint_um = None
        step.out.state_changed = True
    step.event(
        EventKind.ZONE_SELECTED,
        session,
        zone_id=zone.zone_id,
        max_depth_um=zone.max_depth_um,
        max_passes=zone.max_passes,
        passes_done=zone.passes_done,
    )


def _zone_refusal(step: Step, zone_id: str) -> Refused:
    if step.policy.zone(zone_id) is None:
        return wording.unknown_zone(zone_id)
    return wording.zone_not_in_plan(step.policy.zones[zone_id].label)


def _set_depth(step: Step, session: Session, action: Any) -> None:
    assert isinstance(action, SetZoneDepth)
    if not isinstance(action.depth_um, int) or isinstance(action.depth_um, bool):
        step.refuse(session, session.port, action, wording.bad_number("depth"))
        return
    refusal = step.send(session.port, session, SetDepth(action.depth_um))
    if refusal:
        step.refuse(session, session.port, action, refusal)
        return
    session.depth_setpoint_um = action.depth_um  # approved; the pen confirms it by its ACK
    step.pen(session.port).depth_pending_um = action.depth_um
    step.out.state_changed = True
    step.event(
        EventKind.DEPTH_SET,
        session,
        zone_id=session.current_zone,
        depth_um=action.depth_um,
    )


def _set_speed(step: Step, session: Session, action: Any) -> None:
    assert isinstance(action, SetStrokeRate)
    if not isinstance(action.rate_hz, int) or isinstance(action.rate_hz, bool):
        step.refuse(session, session.port, action, wording.bad_number("stroke rate"))
        return
    refusal = None
    if session.state is SessionState.ENDED:
        refusal = session_not_active(step.context(session.port, session))
    refusal = refusal or step.send(session.port, session, SetSpeed(action.rate_hz))
    if refusal:
        step.refuse(session, session.port, action, refusal)
        return
    session.speed_hz = action.rate_hz
    step.out.state_changed = True
    step.event(EventKind.SPEED_SET, session, rate_hz=action.rate_hz)


def _arm(step: Step, session: Session, action: Any) -> None:
    assert isinstance(action, ArmPen)
    pen = step.pen(session.port)
    if pen.arm is not ArmState.DISARMED and not pen.stopping:
        # Already armed (or arming) under a live lease: nothing to do.
        step.event(EventKind.ARMING, session, already=True)
        return
    token = step.store.next_token  # taken below only if the gate lets the Arm out
    zone = session.zones.get(session.current_zone or "")  # the gate refuses an Arm without
    limit = zone.max_depth_um if zone else 0  # a zone or a depth: these 0s never leave
    arm = Arm(step.lease_ms, token, session.depth_setpoint_um or 0, limit)
    refusal = step.send(session.port, session, arm)
    if refusal:
        step.refuse(session, session.port, action, refusal)
        return
    step.store.take_token()
    pen.arm = arm_transition(pen.arm, ArmInput.ARM_SENT)
    pen.lease_token = token
    assert session.current_zone is not None  # the gate allowed the Arm
    pen.arming = ArmingRecord(
        session_id=session.session_id,
        zone_id=session.current_zone,
        token=token,
        depth_um=arm.depth_um,
        limit_um=arm.max_depth_um,
    )
    pen.stopping = False
    step.out.state_changed = True
    step.event(
        EventKind.ARMING,
        session,
        zone_id=session.current_zone,
        depth_um=session.depth_setpoint_um,
        token=token,
    )


def _disarm(step: Step, session: Session, action: Any) -> None:
    pen = step.pen(session.port)
    out = step.out
    if pen.link is LinkStatus.UP:
        out.command(PenCommand(session.port, Disarm()))
        if pen.arm is not ArmState.DISARMED or pen.motor_running:
            pen.stopping = True  # until the pen confirms with Disarmed
            out.state_changed = True
    out.leases.append(LeaseDirective(session.port, LeaseAction.STOP_RENEWING))
    step.event(EventKind.DISARMED, session, requested=True)


def _stop_by_therapist(step: Step, session: Session, action: Any) -> None:
    assert isinstance(action, StopPen)
    actor = action.actor
    stop(
        step,
        session.port,
        session,
        # The pen knows one reason for a stop pressed on the tablet; the audit names who.
        HostStopReason.THERAPIST,
        wording.stopped_by(str(actor.role), actor.actor_id),
        "",
        {"actor": actor.actor_id, "role": str(actor.role)},
        force_record=True,
    )


def _pause(step: Step, session: Session, action: Any) -> None:
    if session_transition(session.state, SessionInput.PAUSE) is None:
        step.refuse_not_now(session, action, "pause")
        return
    fire(step, session, SessionInput.PAUSE, f"pause by {action.actor.actor_id}")


def _resume(step: Step, session: Session, action: Any) -> None:
    assert isinstance(action, ResumeSession)
    if session_transition(session.state, SessionInput.RESUME) is None:
        step.refuse_not_now(session, action, "resume")
        return
    refusal = link_not_usable(step.context(session.port, session), treatment=True)
    if refusal:
        step.refuse(session, session.port, action, refusal)
        return
    before = session.state
    fire(step, session, SessionInput.RESUME, f"resumed by {action.actor.actor_id}")
    if before is SessionState.INTERRUPTED:
        step.audit(
            AuditKind.SESSION,
            session,
            session.port,
            f"Session resumed by {action.actor.actor_id} after an interruption.",
            "",
            {"actor": action.actor.actor_id},
        )


def _acknowledge(step: Step, session: Session, action: Any) -> None:
    assert isinstance(action, AcknowledgeFault)
    if session_transition(session.state, SessionInput.ACKNOWLEDGE_FAULT) is None:
        step.refuse_not_now(session, action, "acknowledge a fault")
        return
    pen = step.pen(session.port)
    if pen.link is not LinkStatus.UP:
        refusal = link_not_usable(step.context(session.port, session), treatment=True)
        step.refuse(session, session.port, action, refusal or wording.link_down())
        return
    if pen.serial != session.pen_serial:
        step.refuse(
            session, session.port, action, wording.wrong_pen(pen.serial, session.pen_serial)
        )
        return
    fault = session.fault
    # A rebooted pen is the same pen: the therapist has seen the fault; bind its new boot.
    session.pen_boot_id = pen.boot_id
    session.fault = None
    fire(step, session, SessionInput.ACKNOWLEDGE_FAULT, "fault acknowledged")
    step.audit(
        AuditKind.FAULT,
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


def _end(step: Step, session: Session, action: Any) -> None:
    assert isinstance(action, EndSession)
    if session_transition(session.state, SessionInput.END) is None:
        step.refuse_not_now(session, action, "end")
        return
    close_pass(step, session, "session_end")
    fire(step, session, SessionInput.END, f"ended by {action.actor.actor_id}")
    session.ended_at = step.now
    spent = step.store.ledger.spend_session(session.session_id, step.now)
    step.store.live_by_port.pop(session.port, None)
    step.event(EventKind.SESSION_REPORT, session, **build_report(session))
    step.audit(
        AuditKind.SESSION,
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


def _override(step: Step, session: Session, action: Any) -> None:
    assert isinstance(action, OverrideZone)
    limits = step.limits(session.port)
    zone = session.zones.get(action.zone_id)
    ceiling = step.policy.max_passes_ceiling
    refusal: Refused | None = None
    if session.state is SessionState.ENDED:
        refusal = session_not_active(step.context(session.port, session))
    elif zone is None:
        refusal = _zone_refusal(step, action.zone_id)
    elif len(action.reason.strip()) < 3:
        refusal = wording.override_needs_reason()
    elif action.max_depth_um is None and action.max_passes is None:
        refusal = wording.override_changes_nothing()
    elif action.max_depth_um is not None and (
        not isinstance(action.max_depth_um, int) or action.max_depth_um <= 0
    ):
        refusal = wording.bad_number("depth limit")
    elif action.max_passes is not None and (
        not isinstance(action.max_passes, int) or action.max_passes < 1
    ):
        refusal = wording.bad_number("number of passes")
    elif action.max_depth_um is not None and action.max_depth_um > limits.device_ceiling_um:
        refusal = wording.override_above_ceiling(action.max_depth_um, limits.device_ceiling_um)
    elif action.max_passes is not None and action.max_passes > ceiling:
        refusal = wording.override_too_many_passes(action.max_passes, ceiling)
    if refusal or zone is None:
        step.refuse(session, session.port, action, refusal)
        return
    before = {"max_depth_um": zone.max_depth_um, "max_passes": zone.max_passes}
    zone.override = ZoneOverride(
        max_depth_um=action.max_depth_um or zone.max_depth_um,
        max_passes=action.max_passes or zone.max_passes,
        manager_id=action.actor.actor_id,
        reason=action.reason.strip(),
        at=step.now,
    )
    after = {"max_depth_um": zone.max_depth_um, "max_passes": zone.max_passes}
    step.out.state_changed = True
    step.event(EventKind.OVERRIDE_APPLIED, session, zone_id=zone.zone_id, **after)
    step.audit(
        AuditKind.OVERRIDE,
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


def _take_over(step: Step, session: Session, action: Any) -> None:
    assert isinstance(action, TakeOverSession)
    reason = action.reason.strip() if isinstance(action.reason, str) else ""
    if session.state is SessionState.ENDED:
        step.refuse_not_now(session, action, "be taken over")
        return
    if len(reason) < 3:
        step.refuse(session, session.port, action, wording.take_over_needs_reason())
        return
    previous = session.therapist_id
    if previous == action.actor.actor_id:
        return  # already theirs: nothing changes, nothing to record
    session.therapist_id = action.actor.actor_id
    step.out.state_changed = True
    # No session event: the dashboards count state_changed events as life-cycle steps.
    step.audit(
        AuditKind.SESSION,
        session,
        session.port,
        wording.taken_over(action.actor.actor_id, previous, reason),
        "",
        {
            "action": "take_over",
            "actor": action.actor.actor_id,
            "role": str(action.actor.role),
            "previous_owner": previous,
            "reason": reason,
        },
    )


def _record_sign_in(step: Step, action: RecordSignIn) -> None:
    """An access record for the audit log; no session, pen or state is touched."""
    who = action.actor_id or "an unknown user name"
    message, remediation = wording.sign_in_sentence(
        str(action.result), who, action.source, action.attempts
    )
    details: dict[str, Any] = {"result": str(action.result), "source": action.source}
    if action.actor_id is not None:
        details["actor"] = action.actor_id
        details["role"] = str(action.role)
    if action.attempts != 1:
        details["attempts"] = action.attempts
    step.audit(AuditKind.ACCESS, None, None, message, remediation, details)


ActionHandler = Callable[[Step, Session, Any], None]

#: One row per action on an existing session. CreateSession has no session yet and is
#: handled before the table is consulted.
# fmt: off
ACTION_HANDLERS: Final[dict[type, ActionHandler]] = {
    StartSession:     _start,
    SelectZone:       _select_zone,
    SetZoneDepth:     _set_depth,
    SetStrokeRate:    _set_speed,
    ArmPen:           _arm,
    DisarmPen:        _disarm,
    StopPen:          _stop_by_therapist,
    PauseSession:     _pause,
    ResumeSession:    _resume,
    AcknowledgeFault: _acknowledge,
    EndSession:       _end,
    OverrideZone:     _override,
    TakeOverSession:  _take_over,
}
# fmt: on
