"""The state tables themselves: the rules in states.py's header hold for every row."""

from __future__ import annotations

import pytest

from controller.safety import SessionState
from controller.sessions.states import (
    ARM_TRANSITIONS,
    LIVE_STATES,
    SESSION_TRANSITIONS,
    THERAPIST_INPUTS,
    ArmInput,
    ArmState,
    SessionInput,
    arm_transition,
    session_transition,
)


def test_nothing_resumes_treatment_by_itself() -> None:
    # Rule 3: every way into ACTIVE is a therapist input.
    into_active = {
        inp for (_, inp), new in SESSION_TRANSITIONS.items() if new is SessionState.ACTIVE
    }
    assert into_active == {
        SessionInput.START,
        SessionInput.RESUME,
        SessionInput.ACKNOWLEDGE_FAULT,
    }
    assert into_active <= THERAPIST_INPUTS


def test_ended_is_terminal_and_reachable_from_every_live_state() -> None:
    assert not [key for key in SESSION_TRANSITIONS if key[0] is SessionState.ENDED]
    for state in LIVE_STATES:
        assert session_transition(state, SessionInput.END) is SessionState.ENDED


@pytest.mark.parametrize("state", [SessionState.ACTIVE, SessionState.PAUSED])
def test_link_loss_and_restart_interrupt(state: SessionState) -> None:
    assert session_transition(state, SessionInput.LINK_LOST) is SessionState.INTERRUPTED
    assert session_transition(state, SessionInput.CONTROLLER_RESTARTED) is SessionState.INTERRUPTED


@pytest.mark.parametrize(
    "state", [SessionState.ACTIVE, SessionState.PAUSED, SessionState.INTERRUPTED]
)
@pytest.mark.parametrize(
    "event", [SessionInput.PEN_REBOOTED, SessionInput.PEN_REPLACED, SessionInput.SAFETY_FAULT]
)
def test_reboot_identity_change_and_safety_faults_fault(
    state: SessionState, event: SessionInput
) -> None:
    assert session_transition(state, event) is SessionState.FAULTED


def test_a_fault_only_clears_by_acknowledgement() -> None:
    exits = {inp for (state, inp) in SESSION_TRANSITIONS if state is SessionState.FAULTED}
    assert exits == {SessionInput.ACKNOWLEDGE_FAULT, SessionInput.END}
    assert session_transition(SessionState.FAULTED, SessionInput.RESUME) is None


def test_created_sessions_are_not_bound_to_a_pen_so_pen_events_do_not_move_them() -> None:
    for event in set(SessionInput) - THERAPIST_INPUTS:
        assert session_transition(SessionState.CREATED, event) is None


def test_every_state_is_reachable_from_created() -> None:
    seen, frontier = {SessionState.CREATED}, [SessionState.CREATED]
    while frontier:
        state = frontier.pop()
        for (source, _), target in SESSION_TRANSITIONS.items():
            if source is state and target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(SessionState)


def test_arming_table() -> None:
    assert arm_transition(ArmState.DISARMED, ArmInput.ARM_SENT) is ArmState.ARMING
    assert arm_transition(ArmState.ARMING, ArmInput.PEN_ARMED) is ArmState.ARMED
    assert arm_transition(ArmState.ARMING, ArmInput.ARM_REFUSED) is ArmState.DISARMED
    # A Disarmed answering an older command does not cancel the Arm in flight.
    assert arm_transition(ArmState.ARMING, ArmInput.PEN_DISARMED) is ArmState.ARMING
    assert arm_transition(ArmState.ARMED, ArmInput.PEN_DISARMED) is ArmState.DISARMED
    for state in ArmState:
        assert arm_transition(state, ArmInput.LINK_LOST) is ArmState.DISARMED
        assert arm_transition(state, ArmInput.PEN_REBOOTED) is ArmState.DISARMED
    # Only the pen's own word, or our Arm, leaves DISARMED.
    leaving = {inp for (s, inp), new in ARM_TRANSITIONS.items() if s is ArmState.DISARMED}
    assert leaving == {ArmInput.ARM_SENT, ArmInput.PEN_ARMED}


def test_a_pen_that_reports_itself_armed_is_believed_armed() -> None:
    """(DISARMED, PEN_ARMED): the pen knows best; until it says Disarmed the controller
    treats it as armed (it stops it, and changes no setting under it)."""
    assert arm_transition(ArmState.DISARMED, ArmInput.PEN_ARMED) is ArmState.ARMED


def test_an_arm_sent_again_keeps_waiting_for_the_answer() -> None:
    """(ARMING, ARM_SENT) and (ARMED, ARM_SENT): an Arm on its way is never believed
    disarmed, whether a previous Arm is still unanswered or a stop is unconfirmed."""
    assert arm_transition(ArmState.ARMING, ArmInput.ARM_SENT) is ArmState.ARMING
    assert arm_transition(ArmState.ARMED, ArmInput.ARM_SENT) is ArmState.ARMING


def test_an_arm_never_sent_leaves_the_pen_disarmed() -> None:
    """(ARMING, ARM_WITHDRAWN): the runtime withdrew the Arm (a stop overtook it)."""
    assert arm_transition(ArmState.ARMING, ArmInput.ARM_WITHDRAWN) is ArmState.DISARMED
