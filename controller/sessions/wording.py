"""What the therapist reads: every refusal and stop sentence the registry writes, in one place.

Each sentence pair is (what is wrong, what to do). The gate's own sentences
live beside its checks in ``controller/safety/gate.py``; everything the session
registry adds is here, so wording can be reviewed (and translated) in one file.
"""

from __future__ import annotations

from typing import Final

from controller.safety.context import SessionState
from controller.safety.gate import RefusalReason, Refused, format_mm
from firmware_protocol.messages import (
    Arm,
    Disarm,
    QueryStatus,
    RefusalCode,
    Renew,
    SetDepth,
    SetLiftOffGrace,
    SetSpeed,
    SetTelemetryRate,
    Stop,
    StopReason,
)

#: Plain words for the pen's own stop reasons (MotorStopped/Disarmed.reason).
PEN_STOP_WORDS: Final[dict[int, tuple[str, str]]] = {
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

#: What to do when the pen itself refuses a command (CommandRefused.reason).
PEN_REFUSAL_WORDS: Final[dict[int, str]] = {
    RefusalCode.NO_CARTRIDGE: "Insert a new sterile cartridge.",
    RefusalCode.NO_DEPTH: "Set the depth for this zone, then arm again.",
    RefusalCode.DEPTH_ABOVE_CEILING: "Choose a shallower depth.",
    RefusalCode.SPEED_OUT_OF_RANGE: "Choose another stroke rate.",
    RefusalCode.LOW_BATTERY: "Charge or swap the battery.",
    RefusalCode.OVER_TEMPERATURE: "Let the pen cool down.",
    RefusalCode.SETPOINT_MISMATCH: "Set the depth again, then arm.",
    RefusalCode.BAD_LIMIT: "Set the depth again for this zone, then arm.",
    RefusalCode.ARMED: "Disarm the pen, change the depth, then arm again.",
    RefusalCode.MOTOR_RUNNING: "Release the pen's button, then arm.",
}

#: Command names as the audit log and the tablet show them.
COMMAND_NAMES: Final = {
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

#: What to do when a therapist input does not fit the session's state.
NOT_NOW_HINTS: Final = {
    SessionState.CREATED: "Start the session first.",
    SessionState.ACTIVE: "The session is already running.",
    SessionState.PAUSED: "Resume the session, or end it.",
    SessionState.INTERRUPTED: "Reconnect the pen and tap Resume, or end the session.",
    SessionState.FAULTED: "Acknowledge the fault, or end the session.",
    SessionState.ENDED: "Start a new session.",
}


def stop_reason_name(reason: int) -> str:
    """A pen StopReason as a lower-case word (``reason_N`` for a value we do not know)."""
    try:
        return StopReason(reason).name.lower()
    except ValueError:
        return f"reason_{reason}"


# --- refusals the registry adds to the gate's --------------------------------------------


def link_down() -> Refused:
    return Refused(
        RefusalReason.LINK_DOWN,
        "The pen is not connected.",
        "Check that the pen is switched on and connected; it reconnects by itself.",
    )


def bad_number(what: str) -> Refused:
    return Refused(
        RefusalReason.BAD_REQUEST,
        f"The {what} is not a valid number.",
        f"Enter the {what} again.",
    )


def bad_identifier(problem: str) -> Refused:
    return Refused(
        RefusalReason.BAD_REQUEST,
        f"The {problem} is not valid.",
        "Use letters, digits, '.', '_', ':' or '-' (at most 64).",
    )


def unknown_session(session_id: str) -> Refused:
    return Refused(
        RefusalReason.UNKNOWN_SESSION,
        f"There is no session {session_id!r}.",
        "Check the session on the tablet, or start a new one.",
    )


def role_may_not_override() -> Refused:
    return Refused(
        RefusalReason.ROLE_NOT_PERMITTED,
        "Only a clinic manager may change a zone's limits.",
        "Ask a manager to sign in and make the override, with a reason.",
    )


def role_may_not_operate(role: str) -> Refused:
    return Refused(
        RefusalReason.ROLE_NOT_PERMITTED,
        f"The {role} role may not operate a pen.",
        "Sign in as a therapist to treat.",
    )


def not_session_owner(owner_id: str) -> Refused:
    return Refused(
        RefusalReason.NOT_SESSION_OWNER,
        f"This session belongs to {owner_id}; only they may treat in it or see its client.",
        "Ask them to continue, or ask a manager to take the session over. Anyone may still "
        "press STOP.",
    )


def role_may_not_take_over(role: str) -> Refused:
    return Refused(
        RefusalReason.ROLE_NOT_PERMITTED,
        f"The {role} role may not take a session over.",
        "Ask a clinic manager to take the session over, with a reason.",
    )


def take_over_needs_reason() -> Refused:
    return Refused(
        RefusalReason.TAKE_OVER_NEEDS_REASON,
        "Taking a session over needs a reason.",
        "Write why you are taking this session over; it is kept in the audit log.",
    )


def taken_over(manager_id: str, previous_id: str, reason: str) -> str:
    """The audit sentence for a take-over."""
    return f"Manager {manager_id} took the session over from {previous_id}. Reason: {reason}"


def stopped_by(role: str, actor_id: str) -> str:
    """The audit sentence for a STOP pressed on the tablet, naming the role as it is."""
    return f"The needle was stopped by the {role} ({actor_id})."


def sign_in_sentence(result: str, who: str, source: str, attempts: int) -> tuple[str, str]:
    """The audit sentences for a sign-in attempt (``who``: an actor id or 'an unknown name')."""
    if result == "signed_in":
        return f"{who} signed in from {source}.", ""
    if result == "signed_out":
        return f"{who} signed out from {source}.", ""
    if result == "throttled":
        return (
            f"{attempts} sign-in attempt(s) for {who} from {source} were refused unheard: "
            "too many failures.",
            "If this was not a colleague mistyping, check who is on the clinic network.",
        )
    return (
        f"A sign-in for {who} from {source} failed: wrong user name or password.",
        "Repeated failures from one address are throttled; check the audit log for a pattern.",
    )


def role_may_not_open(role: str) -> Refused:
    return Refused(
        RefusalReason.ROLE_NOT_PERMITTED,
        f"The {role} role may not open a treatment session.",
        "Sign in as a therapist to treat.",
    )


def session_exists(session_id: str) -> Refused:
    return Refused(
        RefusalReason.SESSION_EXISTS,
        f"A session {session_id!r} already exists.",
        "Open that session, or create a new one with another id.",
    )


def unknown_plan(plan_id: str, plans: list[str]) -> Refused:
    return Refused(
        RefusalReason.UNKNOWN_PLAN,
        f"There is no treatment plan {plan_id!r}.",
        "Choose one of the clinic's plans: " + ", ".join(sorted(plans)) + ".",
    )


def pen_busy() -> Refused:
    return Refused(
        RefusalReason.PEN_BUSY,
        "This pen is already in use by another session.",
        "End the other session first, or choose another pen.",
    )


def unknown_pen(port: str, ports: list[str]) -> Refused:
    return Refused(
        RefusalReason.UNKNOWN_PEN,
        f"There is no pen {port!r} in this clinic.",
        "Choose one of the clinic's pens: " + ", ".join(sorted(ports)) + ".",
    )


def unexpected_pen_connected(serial: str, expected: str) -> tuple[str, str]:
    return (
        f"Pen {serial} is connected where pen {expected} is configured; it will not be armed.",
        f"Connect pen {expected}, or ask an administrator to change the configuration of "
        "this port.",
    )


def unknown_zone(zone_id: str) -> Refused:
    return Refused(
        RefusalReason.UNKNOWN_ZONE,
        f"There is no zone {zone_id!r}.",
        "Choose one of the zones listed for this session.",
    )


def zone_not_in_plan(label: str) -> Refused:
    return Refused(
        RefusalReason.ZONE_NOT_IN_PLAN,
        f"The {label} is not part of this session's plan.",
        "Choose one of the plan's zones, or start a session with a plan that includes it.",
    )


def disarm_before_zone_change() -> Refused:
    return Refused(
        RefusalReason.DISARM_FIRST,
        "The pen is armed for the current zone.",
        "Disarm the pen (or let the pass finish), then choose the next zone.",
    )


def wrong_pen(connected: str | None, expected: str | None) -> Refused:
    return Refused(
        RefusalReason.WRONG_PEN,
        f"The connected pen ({connected}) is not this session's pen ({expected}).",
        "Reconnect the session's own pen, or end this session.",
    )


def override_needs_reason() -> Refused:
    return Refused(
        RefusalReason.OVERRIDE_NEEDS_REASON,
        "An override needs a reason.",
        "Write why this client needs a different limit; it is kept in the audit log.",
    )


def override_changes_nothing() -> Refused:
    return Refused(
        RefusalReason.BAD_REQUEST,
        "The override changes nothing.",
        "Give a new depth limit, a new number of passes, or both.",
    )


def override_above_ceiling(depth_um: int, ceiling_um: int) -> Refused:
    return Refused(
        RefusalReason.OVERRIDE_ABOVE_CEILING,
        f"{format_mm(depth_um)} is beyond the device ceiling "
        f"({format_mm(ceiling_um)}); no override may exceed it.",
        f"Choose {format_mm(ceiling_um)} or less.",
    )


def override_too_many_passes(passes: int, ceiling: int) -> Refused:
    return Refused(
        RefusalReason.OVERRIDE_ABOVE_CEILING,
        f"{passes} passes is more than the clinic allows in any zone ({ceiling}).",
        f"Choose {ceiling} passes or fewer.",
    )


def not_now(what: str, state: SessionState) -> Refused:
    return Refused(
        RefusalReason.NOT_ALLOWED_NOW,
        f"The session cannot {what} now: it is {state}.",
        NOT_NOW_HINTS[state],
    )
