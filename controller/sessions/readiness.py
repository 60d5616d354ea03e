"""What a therapist may do in a session right now, and why not: for the tablet's buttons.

Pure: built from the session's record, the gate's context for its pen and the
pen's state, with the same checks (and the same sentences) the registry and the
gate apply when the action is actually asked for. The tablet disables a button
whose action would be refused and shows the reason beside it; the registry still
decides when the button is pressed, so a stale answer can never let anything
through, it can only show a button enabled a moment too long.
"""

from __future__ import annotations

from typing import Any, Final

from controller.safety.context import GateContext, SessionState
from controller.safety.gate import (
    RefusalReason,
    Refused,
    arming_refusal,
    check_command,
    link_not_usable,
    session_not_active,
)
from firmware_protocol.messages import SetDepth

from . import wording
from .records import PenState, Session
from .states import ArmState, SessionInput, session_transition

#: Life-cycle actions: the table input each one fires, and the verb of its refusal.
_LIFE_CYCLE: Final = {
    "start": (SessionInput.START, "start"),
    "pause": (SessionInput.PAUSE, "pause"),
    "resume": (SessionInput.RESUME, "resume"),
    "acknowledge_fault": (SessionInput.ACKNOWLEDGE_FAULT, "acknowledge a fault"),
    "end": (SessionInput.END, "end"),
}
#: What a link must be for these to pass the registry's guards.
_NEEDS_LINK: Final = frozenset({"start", "resume"})


def _plain(refusal: Refused | None) -> dict[str, str] | None:
    if refusal is None:
        return None
    return {
        "code": str(refusal.code),
        "message": refusal.message,
        "remediation": refusal.remediation,
    }


def session_controls(session: Session, ctx: GateContext, pen: PenState) -> dict[str, Any]:
    """Each action of the tablet, None if it would be allowed now, else the refusal.

    ``ctx`` must be the gate's context for ``session`` on its pen (the registry's
    ``gate_context(session.port)`` while the session is the pen's live one); for a
    session that is no longer live everything but STOP is refused.
    Plain data: ``{"actions": {name: None | {code, message, remediation}},
    "depth_range_um": [low, high] | None, "pen": {...}}``.
    """
    live = session.state is not SessionState.ENDED  # then it is its pen's live session
    actions: dict[str, Refused | None] = {}
    for name, (event, verb) in _LIFE_CYCLE.items():
        refusal: Refused | None = None
        if session_transition(session.state, event) is None:
            refusal = wording.not_now(verb, session.state)
        elif name in _NEEDS_LINK or name == "acknowledge_fault":
            refusal = link_not_usable(ctx, treatment=name in _NEEDS_LINK)
        actions[name] = refusal
    ended = session_not_active(GateContext(limits=ctx.limits, session_state=SessionState.ENDED))
    busy = pen.arm is not ArmState.DISARMED or pen.motor_running
    if not live:
        actions["select_zone"] = actions["set_depth"] = actions["arm"] = ended
    else:
        zone_refusal = session_not_active(ctx)
        if zone_refusal is None and busy:
            zone_refusal = wording.disarm_before_zone_change()
        actions["select_zone"] = zone_refusal
        depth = check_command(ctx, SetDepth(0))  # the value aside: 0 is always in range
        actions["set_depth"] = depth if isinstance(depth, Refused) else None
        if busy:
            actions["arm"] = Refused(
                RefusalReason.PEN_ARMED,
                "The pen is armed already.",
                "Treat the zone, or tap STOP to stop and disarm it.",
            )
        else:
            actions["arm"] = arming_refusal(ctx)
    # Stopping and disarming are never refused (product.md §4, §8).
    actions["stop"] = actions["disarm"] = None
    zone = ctx.zone if live else None
    depth_range = None
    if zone is not None:
        depth_range = [0, min(zone.max_depth_um, ctx.limits.device_ceiling_um)]
    return {
        "session_id": session.session_id,
        "state": str(session.state),
        "actions": {name: _plain(r) for name, r in actions.items()},
        "depth_range_um": depth_range,
        "pen": {
            "link": str(ctx.link) if live else None,
            "armed": str(pen.arm),
            "motor_running": pen.motor_running,
            "cartridge_id": pen.cartridge_id,
            "confirmed": pen.confirmed,
            "depth_set_um": pen.depth_set_um,
        },
    }
