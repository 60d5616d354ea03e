"""The safety gate: every command to a pen passes through :func:`check_command`.

Pure: a decision depends only on a :class:`~controller.safety.context.GateContext`
snapshot and the proposed command (a ``firmware_protocol.messages`` object). The
answer is :data:`ALLOWED` or a :class:`Refused` carrying a :class:`RefusalReason`
and two sentences a therapist understands: what is wrong, and what to do.

Rules (product.md §4):

* Never clamps and never rewrites a command: a depth above the zone limit is
  refused, not lowered.
* Fail closed. ``Arm`` (and ``Renew``, which extends an arming) needs all of:
  an active session, a healthy link to the session's own pen, no unresolved
  fault, a selected zone with passes left, a cartridge that is in the pen and
  that the ledger says this session may use, a depth setpoint for that zone
  within the zone's effective limit and the pen's ceiling, and a lease no longer
  than the policy allows.
* ``Stop`` and ``Disarm`` are always allowed, whatever the context.
* Anything that is not a known host-to-pen command is refused.

Checks run in a fixed order, most fundamental first, and the first failure is
the answer, so the therapist sees one actionable message at a time.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from firmware_protocol.messages import (
    Arm,
    Disarm,
    Message,
    QueryStatus,
    Renew,
    Reset,
    SetDepth,
    SetLiftOffGrace,
    SetSpeed,
    SetTelemetryRate,
    Stop,
)

from .context import CartridgeStatus, GateContext, LinkStatus, SessionState, ZoneContext


class RefusalReason(enum.StrEnum):
    """Why a command or a therapist action was refused. Values are stable (audit, API)."""

    # -- the gate (commands to a pen) --
    SESSION_NOT_ACTIVE = "session_not_active"
    LINK_DOWN = "link_down"
    PEN_NOT_VERIFIED = "pen_not_verified"
    WRONG_PEN = "wrong_pen"
    UNEXPECTED_PEN = "unexpected_pen"
    FAULT_UNRESOLVED = "fault_unresolved"
    NO_ZONE_SELECTED = "no_zone_selected"
    ZONE_PASSES_USED = "zone_passes_used"
    NO_CARTRIDGE = "no_cartridge"
    CARTRIDGE_SPENT = "cartridge_spent"
    CARTRIDGE_OTHER_SESSION = "cartridge_other_session"
    CARTRIDGE_USED_ELSEWHERE = "cartridge_used_elsewhere"
    NO_DEPTH_SET = "no_depth_set"
    DEPTH_NOT_CONFIRMED = "depth_not_confirmed"
    PEN_STATE_UNCONFIRMED = "pen_state_unconfirmed"
    PEN_IMPRECISE = "pen_imprecise"
    TELEMETRY_TOO_SLOW = "telemetry_too_slow"
    DEPTH_INVALID = "depth_invalid"
    DEPTH_ABOVE_ZONE_LIMIT = "depth_above_zone_limit"
    DEPTH_ABOVE_CEILING = "depth_above_ceiling"
    PEN_RUNNING = "pen_running"
    PEN_ARMED = "pen_armed"
    SPEED_OUT_OF_RANGE = "speed_out_of_range"
    BAD_LEASE = "bad_lease"
    STALE_LEASE = "stale_lease"
    LIFT_OFF_GRACE_TOO_LONG = "lift_off_grace_too_long"
    TELEMETRY_RATE_TOO_LOW = "telemetry_rate_too_low"
    PEN_IN_USE = "pen_in_use"
    NOT_A_HOST_COMMAND = "not_a_host_command"
    # -- the session registry (therapist and manager actions) --
    BAD_REQUEST = "bad_request"
    UNKNOWN_SESSION = "unknown_session"
    SESSION_EXISTS = "session_exists"
    PEN_BUSY = "pen_busy"
    UNKNOWN_PEN = "unknown_pen"
    UNKNOWN_PLAN = "unknown_plan"
    UNKNOWN_ZONE = "unknown_zone"
    ZONE_NOT_IN_PLAN = "zone_not_in_plan"
    NOT_ALLOWED_NOW = "not_allowed_now"
    DISARM_FIRST = "disarm_first"
    ROLE_NOT_PERMITTED = "role_not_permitted"
    NOT_SESSION_OWNER = "not_session_owner"
    TAKE_OVER_NEEDS_REASON = "take_over_needs_reason"
    OVERRIDE_NEEDS_REASON = "override_needs_reason"
    OVERRIDE_ABOVE_CEILING = "override_above_ceiling"


#: The reasons check_command can return (the rest come from the session registry).
_R = RefusalReason
GATE_REASONS: Final = frozenset(
    {
        _R.SESSION_NOT_ACTIVE,
        _R.LINK_DOWN,
        _R.PEN_NOT_VERIFIED,
        _R.WRONG_PEN,
        _R.UNEXPECTED_PEN,
        _R.FAULT_UNRESOLVED,
        _R.NO_ZONE_SELECTED,
        _R.ZONE_PASSES_USED,
        _R.NO_CARTRIDGE,
        _R.CARTRIDGE_SPENT,
        _R.CARTRIDGE_OTHER_SESSION,
        _R.CARTRIDGE_USED_ELSEWHERE,
        _R.NO_DEPTH_SET,
        _R.DEPTH_NOT_CONFIRMED,
        _R.PEN_STATE_UNCONFIRMED,
        _R.PEN_IMPRECISE,
        _R.TELEMETRY_TOO_SLOW,
        _R.DEPTH_INVALID,
        _R.DEPTH_ABOVE_ZONE_LIMIT,
        _R.DEPTH_ABOVE_CEILING,
        _R.PEN_RUNNING,
        _R.PEN_ARMED,
        _R.SPEED_OUT_OF_RANGE,
        _R.BAD_LEASE,
        _R.STALE_LEASE,
        _R.LIFT_OFF_GRACE_TOO_LONG,
        _R.TELEMETRY_RATE_TOO_LOW,
        _R.PEN_IN_USE,
        _R.NOT_A_HOST_COMMAND,
    }
)


@dataclass(frozen=True, slots=True)
class Allowed:
    """The command may be sent exactly as proposed."""


@dataclass(frozen=True, slots=True)
class Refused:
    """The command (or action) must not happen. Both sentences are for the therapist."""

    code: RefusalReason
    message: str
    remediation: str


ALLOWED: Final = Allowed()
GateDecision = Allowed | Refused


def format_mm(um: int) -> str:
    """Micrometres as the tablet shows them: ``1200 -> '1.20 mm'``, ``1205 -> '1.205 mm'``."""
    sign = "-" if um < 0 else ""
    whole, frac = divmod(abs(um), 1000)
    digits = f"{frac:03d}"
    if digits.endswith("0"):
        digits = digits[:2]
    return f"{sign}{whole}.{digits} mm"


def _sentence(text: str) -> str:
    text = text.rstrip()
    return text if text.endswith((".", "!", "?")) else text + "."


# --- individual checks; each returns None when satisfied -----------------------------

_STATE_WORDS: Final[dict[SessionState | None, tuple[str, str]]] = {
    None: (
        "No treatment session is open on this pen.",
        "Start a session for this pen first.",
    ),
    SessionState.CREATED: (
        "The session has not started yet.",
        "Tap Start to begin the session.",
    ),
    SessionState.PAUSED: (
        "The session is paused.",
        "Tap Resume to continue.",
    ),
    SessionState.INTERRUPTED: (
        "The session was interrupted: the connection to the pen was lost.",
        "Check that the pen is on and connected, then tap Resume.",
    ),
    SessionState.FAULTED: (
        "The session stopped because of a fault.",
        "Check the pen, then acknowledge the fault to continue, or end the session.",
    ),
    SessionState.ENDED: (
        "This session has ended.",
        "Start a new session to treat again.",
    ),
}


def session_not_active(ctx: GateContext) -> Refused | None:
    if ctx.session_state is SessionState.ACTIVE:
        return None
    message, remediation = _STATE_WORDS[ctx.session_state]
    if ctx.session_state is SessionState.FAULTED and ctx.fault:
        message = _sentence(f"The session stopped because of a fault: {ctx.fault}")
    return Refused(RefusalReason.SESSION_NOT_ACTIVE, message, remediation)


def link_not_usable(ctx: GateContext, *, treatment: bool) -> Refused | None:
    """The link must be up; for treatment it must also be the session's own pen."""
    if ctx.link is LinkStatus.UP or (
        ctx.link in (LinkStatus.FOREIGN, LinkStatus.UNEXPECTED) and not treatment
    ):
        return None
    if ctx.link is LinkStatus.REFUSED:
        return Refused(
            RefusalReason.PEN_NOT_VERIFIED,
            "The pen failed its identity check: its firmware does not match this controller.",
            "Do not use this pen. Ask a manager to update the pen firmware or the controller.",
        )
    if ctx.link is LinkStatus.UNEXPECTED:
        return Refused(
            RefusalReason.UNEXPECTED_PEN,
            f"Pen {ctx.pen_serial} is connected where pen {ctx.expected_serial} is configured.",
            f"Connect pen {ctx.expected_serial}, or ask an administrator to change the "
            "configuration of this port.",
        )
    if ctx.link is LinkStatus.FOREIGN:
        return Refused(
            RefusalReason.WRONG_PEN,
            "This is not the pen the session started with, or it restarted since.",
            "Reconnect the session's own pen, or end this session and start a new one.",
        )
    return Refused(
        RefusalReason.LINK_DOWN,
        "The pen is not connected.",
        "Check that the pen is switched on and connected; it reconnects by itself.",
    )


def unresolved_fault(ctx: GateContext) -> Refused | None:
    if ctx.fault is None:
        return None
    return Refused(
        RefusalReason.FAULT_UNRESOLVED,
        _sentence(f"There is an unresolved fault: {ctx.fault}"),
        "Check the pen, then acknowledge the fault before treating again.",
    )


def zone_missing(ctx: GateContext) -> tuple[ZoneContext | None, Refused | None]:
    if ctx.zone is None:
        return None, Refused(
            RefusalReason.NO_ZONE_SELECTED,
            "No treatment zone is selected.",
            "Choose the zone you are about to treat.",
        )
    return ctx.zone, None


def passes_used(zone: ZoneContext) -> Refused | None:
    if zone.passes_done < zone.max_passes:
        return None
    return Refused(
        RefusalReason.ZONE_PASSES_USED,
        f"All {zone.max_passes} passes allowed on the {zone.label} are done.",
        "Choose another zone, or ask a manager for an override if more passes are needed.",
    )


def cartridge_unusable(ctx: GateContext) -> Refused | None:
    status = ctx.cartridge
    if status in (CartridgeStatus.FRESH, CartridgeStatus.THIS_SESSION):
        return None
    if status is CartridgeStatus.SPENT:
        return Refused(
            RefusalReason.CARTRIDGE_SPENT,
            f"Cartridge {ctx.cartridge_id} was used in a finished session "
            "and may never be used again.",
            "Discard it and insert a new sterile cartridge.",
        )
    if status is CartridgeStatus.OTHER_SESSION:
        return Refused(
            RefusalReason.CARTRIDGE_OTHER_SESSION,
            f"Cartridge {ctx.cartridge_id} was already used on another client.",
            "Discard it and insert a new sterile cartridge for this client.",
        )
    if status is CartridgeStatus.USED_UNKNOWN:
        return Refused(
            RefusalReason.CARTRIDGE_USED_ELSEWHERE,
            f"Cartridge {ctx.cartridge_id} has been used before: its chip reports needle "
            "strokes on it.",
            "Discard it and insert a new sterile cartridge.",
        )
    return Refused(
        RefusalReason.NO_CARTRIDGE,
        "There is no cartridge in the pen.",
        "Insert a new sterile cartridge.",
    )


def depth_not_allowed(ctx: GateContext, zone: ZoneContext, depth_um: int) -> Refused | None:
    """A depth must be 0 or more, within the zone's effective limit and the pen's ceiling."""
    if depth_um < 0:
        return Refused(
            RefusalReason.DEPTH_INVALID,
            f"Depth {format_mm(depth_um)} is not a needle depth.",
            f"Choose a depth between 0.00 mm and {format_mm(zone.max_depth_um)}.",
        )
    if depth_um > zone.max_depth_um:
        return Refused(
            RefusalReason.DEPTH_ABOVE_ZONE_LIMIT,
            f"Depth {format_mm(depth_um)} is deeper than the {zone.label} allows "
            f"({format_mm(zone.max_depth_um)}).",
            f"Choose {format_mm(zone.max_depth_um)} or less, or ask a manager for an override.",
        )
    ceiling = ctx.limits.device_ceiling_um
    if depth_um > ceiling:
        return Refused(
            RefusalReason.DEPTH_ABOVE_CEILING,
            f"Depth {format_mm(depth_um)} is beyond this pen's maximum ({format_mm(ceiling)}).",
            f"Choose {format_mm(ceiling)} or less.",
        )
    return None


def _treatment_preconditions(ctx: GateContext) -> tuple[ZoneContext | None, Refused | None]:
    """Session, link, fault and zone: what every treatment command needs first."""
    refusal = (
        session_not_active(ctx) or link_not_usable(ctx, treatment=True) or unresolved_fault(ctx)
    )
    if refusal:
        return None, refusal
    return zone_missing(ctx)


def _arming_refusal(ctx: GateContext) -> Refused | None:
    """Everything §4.1 requires before the needle may run (shared by Arm and Renew)."""
    zone, refusal = _treatment_preconditions(ctx)
    if refusal or zone is None:
        return refusal
    refusal = passes_used(zone) or cartridge_unusable(ctx)
    if refusal:
        return refusal
    if ctx.depth_setpoint_um is None:
        return Refused(
            RefusalReason.NO_DEPTH_SET,
            f"No needle depth is set for the {zone.label}.",
            "Set the depth for this zone before arming.",
        )
    return (
        depth_not_allowed(ctx, zone, ctx.depth_setpoint_um)
        or pen_not_confirmed(ctx)
        or monitor_not_assured(ctx)
    )


def pen_not_confirmed(ctx: GateContext) -> Refused | None:
    """The pen must have reported its state, and confirmed the approved depth itself."""
    if not ctx.pen_confirmed:
        return Refused(
            RefusalReason.PEN_STATE_UNCONFIRMED,
            "The pen has not reported its state since it connected.",
            "Wait a moment and arm again; if it repeats, check the pen's connection.",
        )
    # An Arm may follow its SetDepth before the acknowledgement: the link applies them in
    # order (a lost SetDepth takes the Arm with it), and the pen refuses an Arm whose
    # setpoint is not its own. Otherwise only what the pen confirmed counts.
    pending = ctx.pen_depth_pending_um
    held = ctx.pen_depth_set_um if pending is None else pending
    if held != ctx.depth_setpoint_um:
        holds = "no depth" if held is None else format_mm(held)
        approved = format_mm(ctx.depth_setpoint_um or 0)
        return Refused(
            RefusalReason.DEPTH_NOT_CONFIRMED,
            f"The pen has not confirmed the depth of {approved}: it holds {holds}.",
            "Set the depth again, then arm.",
        )
    return None


def monitor_not_assured(ctx: GateContext) -> Refused | None:
    """The depth monitor needs a precise enough pen that streams fast enough."""
    limits = ctx.limits
    if limits.depth_tolerance_um > limits.max_depth_accuracy_um:
        return Refused(
            RefusalReason.PEN_IMPRECISE,
            f"This pen measures depth to within {format_mm(limits.depth_tolerance_um)}; "
            f"the clinic requires {format_mm(limits.max_depth_accuracy_um)} or better.",
            "Use another pen, or ask a manager to check the clinic's depth tolerance.",
        )
    rate = ctx.telemetry_rate_hz
    if rate is None:
        return Refused(
            RefusalReason.TELEMETRY_TOO_SLOW,
            "The pen's depth measurements have not started flowing yet.",
            "Wait a moment and arm again; if it repeats, check the pen's connection.",
        )
    if rate < limits.min_telemetry_rate_hz:
        return Refused(
            RefusalReason.TELEMETRY_TOO_SLOW,
            f"The pen sends its depth {rate:.0f} times a second; the controller needs at "
            f"least {limits.min_telemetry_rate_hz} to watch the needle.",
            "Check the pen's connection; if it repeats, use another pen.",
        )
    return None


# --- one function per command ---------------------------------------------------------


def _check_arm(ctx: GateContext, command: Arm) -> GateDecision:
    refusal = _arming_refusal(ctx)
    if refusal:
        return refusal
    if not 0 < command.lease_ms <= ctx.limits.max_lease_ms:
        return Refused(
            RefusalReason.BAD_LEASE,
            f"An arming lease of {command.lease_ms} ms is not allowed "
            f"(at most {ctx.limits.max_lease_ms} ms).",
            "This is a controller setting: ask an administrator to set the arming lease "
            f"(link.lease_ms) between 1 and {ctx.limits.max_lease_ms} ms.",
        )
    return ALLOWED


def _check_renew(ctx: GateContext, command: Renew) -> GateDecision:
    refusal = _arming_refusal(ctx)
    if refusal:
        return refusal
    if ctx.lease_token is None or command.token != ctx.lease_token:
        return Refused(
            RefusalReason.STALE_LEASE,
            "The pen is not armed under this lease.",
            "Arm the pen again.",
        )
    return ALLOWED


def _check_set_depth(ctx: GateContext, command: SetDepth) -> GateDecision:
    zone, refusal = _treatment_preconditions(ctx)
    if refusal or zone is None:
        return refusal or ALLOWED  # pragma: no cover - zone is None only with a refusal
    if ctx.motor_running:
        return Refused(
            RefusalReason.PEN_RUNNING,
            "The needle is running; the depth cannot change during a pass.",
            "Release the pen's button, then change the depth.",
        )
    refusal = depth_not_allowed(ctx, zone, command.depth_um)
    if refusal:
        return refusal  # the most useful answer first: this depth is never allowed here
    if ctx.armed:
        return Refused(
            RefusalReason.PEN_ARMED,
            "The pen is armed at the depth already set; it cannot change under an arming.",
            "Disarm the pen, change the depth, then arm again.",
        )
    return ALLOWED


def _check_set_speed(ctx: GateContext, command: SetSpeed) -> GateDecision:
    refusal = link_not_usable(ctx, treatment=False)
    if refusal:
        return refusal
    low, high = ctx.limits.min_speed_hz, ctx.limits.max_speed_hz
    if not low <= command.rate_hz <= high:
        return Refused(
            RefusalReason.SPEED_OUT_OF_RANGE,
            f"A stroke rate of {command.rate_hz} Hz is outside the allowed {low} to {high} Hz.",
            f"Choose a stroke rate between {low} and {high} Hz.",
        )
    return ALLOWED


def _check_lift_off_grace(ctx: GateContext, command: SetLiftOffGrace) -> GateDecision:
    refusal = link_not_usable(ctx, treatment=False)
    if refusal:
        return refusal
    if not 0 <= command.grace_ms <= ctx.limits.lift_off_grace_ms:
        return Refused(
            RefusalReason.LIFT_OFF_GRACE_TOO_LONG,
            f"A lift-off grace of {command.grace_ms} ms is not allowed "
            f"(at most {ctx.limits.lift_off_grace_ms} ms).",
            "Use the policy's lift-off grace; ask an administrator if it must change.",
        )
    return ALLOWED


def _check_telemetry_rate(ctx: GateContext, command: SetTelemetryRate) -> GateDecision:
    refusal = link_not_usable(ctx, treatment=False)
    if refusal:
        return refusal
    if command.rate_hz < ctx.limits.telemetry_rate_hz:
        return Refused(
            RefusalReason.TELEMETRY_RATE_TOO_LOW,
            f"Telemetry at {command.rate_hz} Hz is too slow for the depth monitor "
            f"(it needs {ctx.limits.telemetry_rate_hz} Hz).",
            f"Keep the telemetry rate at {ctx.limits.telemetry_rate_hz} Hz or more.",
        )
    return ALLOWED


def _check_query_status(ctx: GateContext, command: QueryStatus) -> GateDecision:
    return link_not_usable(ctx, treatment=False) or ALLOWED


#: Sessions under way on the pen, which a Reset would cut short: deliberately
#: narrower than the registry's LIVE_STATES (every session holding its port, created
#: and faulted ones too), which this pure module does not import.
_UNDER_WAY: Final = frozenset({SessionState.ACTIVE, SessionState.PAUSED, SessionState.INTERRUPTED})


def _check_reset(ctx: GateContext, command: Reset) -> GateDecision:
    refusal = link_not_usable(ctx, treatment=False)
    if refusal:
        return refusal
    if ctx.session_state in _UNDER_WAY or ctx.motor_running:
        return Refused(
            RefusalReason.PEN_IN_USE,
            "The pen cannot be restarted while a session is using it.",
            "End the session first.",
        )
    return ALLOWED


def check_command(ctx: GateContext, command: Message) -> GateDecision:
    """Allowed, or Refused with a reason, a message and a remediation. Never modifies."""
    match command:
        case Stop() | Disarm():
            return ALLOWED  # stopping is always safe
        case Arm():
            return _check_arm(ctx, command)
        case Renew():
            return _check_renew(ctx, command)
        case SetDepth():
            return _check_set_depth(ctx, command)
        case SetSpeed():
            return _check_set_speed(ctx, command)
        case SetLiftOffGrace():
            return _check_lift_off_grace(ctx, command)
        case SetTelemetryRate():
            return _check_telemetry_rate(ctx, command)
        case QueryStatus():
            return _check_query_status(ctx, command)
        case Reset():
            return _check_reset(ctx, command)
    # Hello is the link layer's business; everything else goes the other way.
    return Refused(
        RefusalReason.NOT_A_HOST_COMMAND,
        f"{type(command).__name__} is not a command the controller may send to a pen.",
        "This is a software fault: report it to your administrator.",
    )


def arming_refusal(ctx: GateContext) -> Refused | None:
    """Would an arming (or its renewal) be refused right now, lease aside? For re-checks."""
    return _arming_refusal(ctx)
