"""A session belongs to its therapist (issue 15.1): enforced by the registry itself.

Whatever calls the core (the tablet API today, a channel client tomorrow), only
the session's owner acts on it; anyone may stop or disarm its pen; a manager
may take it over with a reason, which the audit log keeps.
"""

from __future__ import annotations

import pytest

from controller.audit import AuditKind
from controller.safety import RefusalReason
from controller.sessions import (
    AcknowledgeFault,
    Actor,
    ArmPen,
    DisarmPen,
    EndSession,
    PauseSession,
    ResumeSession,
    Role,
    SelectZone,
    SetStrokeRate,
    SetZoneDepth,
    StartSession,
    StopPen,
)
from controller.sessions.actions import RecordSignIn, SignInResult, TakeOverSession
from firmware_protocol.messages import HostStopReason, Stop

from .test_session_harness import ADMIN, MANAGER, PORT, THERAPIST, Bench
from .test_session_registry import SID, treating

OTHER = Actor("th-02", Role.THERAPIST)

OWNER_ONLY = [
    StartSession(SID, OTHER),
    SelectZone(SID, "cheeks", OTHER),
    SetZoneDepth(SID, 500, OTHER),
    SetStrokeRate(SID, 100, OTHER),
    ArmPen(SID, OTHER),
    PauseSession(SID, OTHER),
    ResumeSession(SID, OTHER),
    AcknowledgeFault(SID, OTHER),
    EndSession(SID, OTHER),
]


@pytest.mark.parametrize("action", OWNER_ONLY, ids=lambda a: type(a).__name__)
def test_another_therapist_may_not_act_on_the_session(action: object) -> None:
    bench = treating()
    before = bench.registry.session(SID)
    outcome = bench.act(action)
    assert outcome.refusal is not None
    assert outcome.refusal.code is RefusalReason.NOT_SESSION_OWNER
    assert THERAPIST.actor_id in outcome.refusal.message
    assert "take the session over" in outcome.refusal.remediation
    assert outcome.commands == ()  # nothing reaches the pen
    [record] = [a for a in outcome.audit if a.kind is AuditKind.REFUSAL]
    assert record.details["actor"] == OTHER.actor_id
    after = bench.registry.session(SID)
    assert after is not None and before is not None
    assert after.model_dump(exclude={"refusals"}) == before.model_dump(exclude={"refusals"})


@pytest.mark.parametrize(
    ("actor", "words"),
    [(OTHER, "stopped by the therapist (th-02)"), (ADMIN, "stopped by the admin (ad-01)")],
)
def test_anyone_stops_and_the_record_names_their_role(actor: Actor, words: str) -> None:
    bench = treating()
    outcome = bench.act(StopPen(SID, actor))
    assert outcome.refusal is None
    stops = [c.message for c in outcome.commands if isinstance(c.message, Stop)]
    assert [s.reason for s in stops] == [HostStopReason.THERAPIST]
    [record] = [a for a in outcome.audit if a.kind is AuditKind.STOP]
    assert words in record.message
    assert record.details["role"] == str(actor.role)
    assert bench.act(DisarmPen(SID, actor)).refusal is None


def test_a_manager_takes_the_session_over_with_a_reason() -> None:
    bench = treating()
    # Not without a reason, not by a therapist or an admin.
    for actor, reason, code in [
        (MANAGER, "  ", RefusalReason.TAKE_OVER_NEEDS_REASON),
        (OTHER, "covering a colleague", RefusalReason.ROLE_NOT_PERMITTED),
        (ADMIN, "covering a colleague", RefusalReason.ROLE_NOT_PERMITTED),
    ]:
        outcome = bench.act(TakeOverSession(SID, actor, reason))
        assert outcome.refusal is not None and outcome.refusal.code is code
    session = bench.registry.session(SID)
    assert session is not None and session.therapist_id == THERAPIST.actor_id

    outcome = bench.act(TakeOverSession(SID, MANAGER, "th-01 called away to an emergency"))
    assert outcome.refusal is None and outcome.state_changed
    [record] = outcome.audit
    assert record.kind is AuditKind.SESSION
    assert record.details["reason"] == "th-01 called away to an emergency"
    assert record.details["previous_owner"] == THERAPIST.actor_id
    assert MANAGER.actor_id in record.message and "emergency" in record.message
    session = bench.registry.session(SID)
    assert session is not None and session.therapist_id == MANAGER.actor_id
    # The manager now treats; the therapist who opened it may not.
    assert bench.act(DisarmPen(SID, MANAGER)).refusal is None
    refusal = bench.act(ArmPen(SID, THERAPIST)).refusal
    assert refusal is not None and refusal.code is RefusalReason.NOT_SESSION_OWNER
    assert bench.act(SetZoneDepth(SID, 700, MANAGER)).refusal is None
    # Taking over one's own session changes and records nothing.
    again = bench.act(TakeOverSession(SID, MANAGER, "still mine"))
    assert again.refusal is None and not again.audit and not again.state_changed
    # The owner survives a restart (it is in the journal).
    restored = bench.registry.to_dict()
    assert restored["sessions"][SID]["therapist_id"] == MANAGER.actor_id


def test_an_ended_session_cannot_be_taken_over() -> None:
    bench = treating()
    assert bench.act(EndSession(SID, THERAPIST)).refusal is None
    outcome = bench.act(TakeOverSession(SID, MANAGER, "after the fact"))
    assert outcome.refusal is not None
    assert outcome.refusal.code is RefusalReason.NOT_ALLOWED_NOW


def test_a_sign_in_record_touches_nothing_but_the_audit_log() -> None:
    bench = Bench.create()
    bench.connect()
    outcome = bench.act(RecordSignIn(SignInResult.BAD_CREDENTIALS, "10.0.0.7"))
    assert outcome.refusal is None and not outcome.state_changed
    assert outcome.commands == () and outcome.events == ()
    [record] = outcome.audit
    assert record.kind is AuditKind.ACCESS and record.session_id is None
    assert record.details == {"result": "bad_credentials", "source": "10.0.0.7"}
    assert "10.0.0.7" in record.message and "unknown user name" in record.message
    ok = bench.act(RecordSignIn(SignInResult.SIGNED_IN, "10.0.0.7", "th-01", Role.THERAPIST))
    [record] = ok.audit
    assert record.details["actor"] == "th-01" and record.details["role"] == "therapist"
    assert PORT not in str(record.details)
