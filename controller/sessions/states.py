################################################################################
# The session state machines
################################################################################
#
# Two small machines, each one table read top to bottom (in the manner of
# h11's _state.py):
#
#   1. the session life cycle: CREATED, ACTIVE, PAUSED, INTERRUPTED, FAULTED,
#      ENDED (SessionState, defined beside the gate context);
#   2. the pen's arming, as the controller believes it: DISARMED, ARMING,
#      ARMED. "Is the needle running" is not a state of its own: it is the pass
#      in progress, opened by MotorStarted and closed by MotorStopped.
#
# "Zone selected" and "depth set" are facts held beside the state (the selected
# zone, and the setpoint approved for it), not states: they do not change what
# the session may do next, only what the gate allows.
#
# Rules
# -----
#
# Rule 1: every change of state goes through `session_transition` and
#   `arm_transition`, using the tables below. Guards (conditions on facts, not
#   states) are listed under each table and checked by registry.py, the only
#   caller, *before* it fires the input.
#
# Rule 2: a therapist input missing from the life-cycle table is refused
#   (RefusalReason.NOT_ALLOWED_NOW) with a message naming the current state.
#   A pen, link or restart input missing from a table leaves the state as it is.
#
# Rule 3: nothing resumes treatment by itself. Every way into ACTIVE is a
#   therapist input (start, resume, acknowledge_fault), and no way into ACTIVE
#   arms the pen: arming is a separate therapist action, through the gate.
#
# Rule 4: leaving ACTIVE for PAUSED, INTERRUPTED, FAULTED or ENDED stops the pen
#   in the same outcome (Stop, and the lease is no longer renewed).
#
# Rule 5: ENDED is terminal. Ending spends, in the cartridge ledger, every
#   cartridge the session used: it never arms again (product.md §4.5).
#
# Rule 6: a link loss, or a controller restart, while the pen may be running
#   closes the pass in progress and counts it: a pass that started happened.

from __future__ import annotations

import enum
from typing import Final

from controller.safety.context import SessionState


class SessionInput(enum.StrEnum):
    # therapist (and manager) inputs
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    ACKNOWLEDGE_FAULT = "acknowledge_fault"
    END = "end"
    # pen, link and controller inputs
    LINK_LOST = "link_lost"  # LinkFailed, the port closed, or the handshake was refused
    PEN_REBOOTED = "pen_rebooted"  # same serial, new boot id (product.md §4.7)
    PEN_REPLACED = "pen_replaced"  # a different serial on the session's port (§4.7)
    SAFETY_FAULT = "safety_fault"  # overshoot, or the pen stopped for a fault reason
    CONTROLLER_RESTARTED = "controller_restarted"  # recovered from the journal


THERAPIST_INPUTS: Final = frozenset(
    {
        SessionInput.START,
        SessionInput.PAUSE,
        SessionInput.RESUME,
        SessionInput.ACKNOWLEDGE_FAULT,
        SessionInput.END,
    }
)

_S, _I = SessionState, SessionInput

# Guards, checked by the registry before firing:
#   START, RESUME:        the session's port has a handshaken link; for RESUME it
#                         must be the very pen (serial and boot id) it started on.
#   ACKNOWLEDGE_FAULT:    a handshaken link to a pen with the session's serial (a
#                         rebooted pen is accepted here, and its new boot id bound).
#   LINK_LOST, PEN_*:     only for sessions bound to a pen (CREATED is not).
#
# fmt: off
SESSION_TRANSITIONS: Final[dict[tuple[SessionState, SessionInput], SessionState]] = {
    # state            input                       next state
    (_S.CREATED,     _I.START):                  _S.ACTIVE,
    (_S.CREATED,     _I.END):                    _S.ENDED,

    (_S.ACTIVE,      _I.PAUSE):                  _S.PAUSED,
    (_S.ACTIVE,      _I.END):                    _S.ENDED,
    (_S.ACTIVE,      _I.LINK_LOST):              _S.INTERRUPTED,
    (_S.ACTIVE,      _I.CONTROLLER_RESTARTED):   _S.INTERRUPTED,
    (_S.ACTIVE,      _I.PEN_REBOOTED):           _S.FAULTED,
    (_S.ACTIVE,      _I.PEN_REPLACED):           _S.FAULTED,
    (_S.ACTIVE,      _I.SAFETY_FAULT):           _S.FAULTED,

    (_S.PAUSED,      _I.RESUME):                 _S.ACTIVE,
    (_S.PAUSED,      _I.END):                    _S.ENDED,
    (_S.PAUSED,      _I.LINK_LOST):              _S.INTERRUPTED,
    (_S.PAUSED,      _I.CONTROLLER_RESTARTED):   _S.INTERRUPTED,
    (_S.PAUSED,      _I.PEN_REBOOTED):           _S.FAULTED,
    (_S.PAUSED,      _I.PEN_REPLACED):           _S.FAULTED,
    (_S.PAUSED,      _I.SAFETY_FAULT):           _S.FAULTED,

    (_S.INTERRUPTED, _I.RESUME):                 _S.ACTIVE,
    (_S.INTERRUPTED, _I.END):                    _S.ENDED,
    (_S.INTERRUPTED, _I.PEN_REBOOTED):           _S.FAULTED,
    (_S.INTERRUPTED, _I.PEN_REPLACED):           _S.FAULTED,
    (_S.INTERRUPTED, _I.SAFETY_FAULT):           _S.FAULTED,

    (_S.FAULTED,     _I.ACKNOWLEDGE_FAULT):      _S.ACTIVE,
    (_S.FAULTED,     _I.END):                    _S.ENDED,
    # ENDED: terminal, no row.
}
# fmt: on


def session_transition(state: SessionState, event: SessionInput) -> SessionState | None:
    """The next state, or None when the table has no row (see Rule 2)."""
    return SESSION_TRANSITIONS.get((state, event))


#: States in which a session holds its pen: at most one per port.
LIVE_STATES: Final = frozenset(
    {
        SessionState.CREATED,
        SessionState.ACTIVE,
        SessionState.PAUSED,
        SessionState.INTERRUPTED,
        SessionState.FAULTED,
    }
)


class ArmState(enum.StrEnum):
    """The controller's belief about the pen's arming; conservative (when unsure: armed)."""

    DISARMED = "disarmed"
    ARMING = "arming"  # Arm sent; neither Armed nor a refusal has come back yet
    ARMED = "armed"  # the pen said Armed; it stays armed until it says Disarmed


class ArmInput(enum.StrEnum):
    ARM_SENT = "arm_sent"
    ARM_WITHDRAWN = "arm_withdrawn"  # the runtime never sent it (a stop overtook it)
    PEN_ARMED = "pen_armed"  # Armed event, or Status.armed
    ARM_REFUSED = "arm_refused"  # CommandRefused for our Arm
    PEN_DISARMED = "pen_disarmed"  # Disarmed event, Status not armed, Renew refused
    STOP_CONFIRMED = "stop_confirmed"  # the pen acknowledged a Stop or Disarm: applied
    LINK_LOST = "link_lost"  # the pen disarms within its lease by itself (§4.6)
    PEN_REBOOTED = "pen_rebooted"


_A, _AI = ArmState, ArmInput

# Stop and Disarm are *not* inputs: sending one changes nothing until the pen
# confirms with Disarmed (until then the pen may still be armed).
# An Armed(token) for a token other than the latest Arm's answers an older Arm
# and is not PEN_ARMED while ARMING.
# An ARMING pen that reports Disarmed stays ARMING: that Disarmed answers an
# older command, and the Arm in flight is still to be answered (the link keeps
# order).
#
# fmt: off
ARM_TRANSITIONS: Final[dict[tuple[ArmState, ArmInput], ArmState]] = {
    # state          input                 next state
    (_A.DISARMED,  _AI.ARM_SENT):         _A.ARMING,
    (_A.DISARMED,  _AI.PEN_ARMED):        _A.ARMED,     # the pen knows best
    (_A.ARMING,    _AI.ARM_SENT):         _A.ARMING,
    (_A.ARMING,    _AI.PEN_ARMED):        _A.ARMED,
    (_A.ARMING,    _AI.ARM_REFUSED):      _A.DISARMED,
    (_A.ARMING,    _AI.ARM_WITHDRAWN):    _A.DISARMED,
    (_A.ARMING,    _AI.LINK_LOST):        _A.DISARMED,
    (_A.ARMING,    _AI.PEN_REBOOTED):     _A.DISARMED,
    (_A.ARMED,     _AI.ARM_SENT):         _A.ARMING,    # re-arm after an unconfirmed stop
    (_A.ARMED,     _AI.PEN_DISARMED):     _A.DISARMED,
    (_A.ARMED,     _AI.STOP_CONFIRMED):   _A.DISARMED,
    # (ARMING, STOP_CONFIRMED): no row. That Stop went out before the Arm in flight
    # (the link keeps order), so the Arm's answer is still to come.
    (_A.ARMED,     _AI.LINK_LOST):        _A.DISARMED,
    (_A.ARMED,     _AI.PEN_REBOOTED):     _A.DISARMED,
}
# fmt: on


def arm_transition(state: ArmState, event: ArmInput) -> ArmState:
    """The next arming state; inputs without a row leave it unchanged."""
    return ARM_TRANSITIONS.get((state, event), state)
