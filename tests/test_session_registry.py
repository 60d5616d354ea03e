"""The session registry, scenario by scenario, through the bench (real firmware + delivery)."""

from __future__ import annotations

import dataclasses
import json
from decimal import Decimal
from typing import Any

import pytest

from controller.audit import AuditKind
from controller.policy import PolicyError, load_policy, policy_from_mapping
from controller.safety import GATE_REASONS, RefusalReason, SessionState
from controller.sessions import (
    AcknowledgeFault,
    Actor,
    ArmPen,
    ArmState,
    CreateSession,
    DisarmPen,
    EndSession,
    EventKind,
    LeaseAction,
    Outcome,
    OverrideZone,
    PauseSession,
    ResumeSession,
    Role,
    SelectZone,
    SessionRegistry,
    SetStrokeRate,
    SetZoneDepth,
    StartSession,
    StopPen,
)
from controller.sessions.actions import TakeOverSession
from firmware_protocol.connection import (
    Connected,
    Delivered,
    HandshakeRefused,
    LinkFailed,
    MessageReceived,
    PeerRebooted,
)
from firmware_protocol.messages import (
    Arm,
    Armed,
    CartridgeRemoved,
    CommandRefused,
    Disarm,
    HostStopReason,
    MotorStarted,
    RefusalCode,
    SetDepth,
    Stop,
    StopReason,
    Telemetry,
    TelemetryFlag,
)

from .test_session_harness import ADMIN, MANAGER, PORT, PORTS, THERAPIST, Bench, identity

SID = "s1"


def stops(outcomes: list[Outcome] | Outcome) -> list[int]:
    items = outcomes if isinstance(outcomes, list) else [outcomes]
    return [c.message.reason for o in items for c in o.commands if isinstance(c.message, Stop)]


def treating(zone: str = "forehead", depth: int = 800, *, plan: str = "full_face") -> Bench:
    """A bench with an ACTIVE session, a zone, a depth, a cartridge and an armed pen."""
    bench = Bench.create()
    bench.connect()
    bench.pen_says(bench.pens[PORT].insert(42))
    assert bench.act(CreateSession(SID, PORT, "client-7", plan, THERAPIST)).refusal is None
    assert bench.act(StartSession(SID, THERAPIST)).refusal is None
    assert bench.act(SelectZone(SID, zone, THERAPIST)).refusal is None
    assert bench.act(SetZoneDepth(SID, depth, THERAPIST)).refusal is None
    assert bench.act(ArmPen(SID, THERAPIST)).refusal is None
    assert bench.pens[PORT].armed
    return bench


def one_pass(bench: Bench, depth: int = 790, *, strokes: int = 20) -> list[Outcome]:
    pen = bench.pens[PORT]
    out = bench.pen_says(pen.press())
    out += bench.pen_says(pen.sample(depth, strokes))
    out += bench.pen_says(pen.release())
    return out


def refused(bench: Bench, action: object) -> RefusalReason:
    outcome = bench.act(action)
    assert outcome.refusal is not None, action
    assert outcome.refusal.message and outcome.refusal.remediation
    records = [a for a in outcome.audit if a.kind is AuditKind.REFUSAL]
    assert records and records[0].details["code"] == outcome.refusal.code
    return outcome.refusal.code


def zone_of(bench: Bench, zone: str) -> Any:
    session = bench.registry.session(SID)
    assert session is not None
    return session.zones[zone]


# --- the treatment flow ------------------------------------------------------------------


def test_a_full_session_counts_passes_and_reports() -> None:
    bench = treating()
    for _ in range(2):
        one_pass(bench)
    session = bench.registry.session(SID)
    assert session is not None
    assert session.zones["forehead"].passes_done == 2
    assert [p.number for p in session.passes] == [1, 2]
    # The peak is the pen's deepest reading in the run: the needle stood at its 0.80 mm
    # setpoint between the samples (one of which read 0.79 mm).
    assert session.passes[0].strokes == 20 and session.passes[0].peak_depth_um == 800
    assert session.passes[0].cartridge_id == 42
    assert session.cartridges_used == [42]
    end = bench.act(EndSession(SID, THERAPIST))
    report = bench.registry.report(SID)
    assert report is not None
    forehead = next(z for z in report["zones"] if z["zone_id"] == "forehead")
    assert forehead["passes_done"] == 2 and forehead["max_depth_um"] == 1000
    assert forehead["deepest_setpoint_um"] == 800 and forehead["peak_depth_um"] == 800
    assert [e.kind for e in end.events if e.kind is EventKind.SESSION_REPORT]
    assert HostStopReason.SESSION_END in stops(end)  # the pen was still armed
    assert not bench.pens[PORT].armed
    assert bench.registry.live_session_id(PORT) is None


def test_the_pass_limit_disarms_the_pen_for_that_zone() -> None:
    bench = treating()
    outcomes: list[Outcome] = []
    for _ in range(3):
        outcomes = one_pass(bench)
    assert stops(outcomes) == [HostStopReason.PASS_LIMIT]
    assert not bench.pens[PORT].armed
    assert zone_of(bench, "forehead").passes_done == 3
    assert refused(bench, ArmPen(SID, THERAPIST)) is RefusalReason.ZONE_PASSES_USED
    assert refused(bench, SelectZone(SID, "forehead", THERAPIST)) is (
        RefusalReason.ZONE_PASSES_USED
    )
    # Another zone of the plan is fine, with its own depth.
    assert bench.act(SelectZone(SID, "cheeks", THERAPIST)).refusal is None
    assert refused(bench, ArmPen(SID, THERAPIST)) is RefusalReason.NO_DEPTH_SET
    bench.act(SetZoneDepth(SID, 1200, THERAPIST))
    assert bench.act(ArmPen(SID, THERAPIST)).refusal is None


@pytest.mark.parametrize(
    "reason", [StopReason.LIFT_OFF, StopReason.BUTTON_RELEASED, StopReason.LEASE_EXPIRED]
)
def test_any_stop_ends_a_pass(reason: StopReason) -> None:
    bench = treating()
    pen = bench.pens[PORT]
    bench.pen_says(pen.press())
    bench.pen_says(pen.release(reason))
    assert zone_of(bench, "forehead").passes_done == 1
    session = bench.registry.session(SID)
    assert session is not None and session.passes[0].end_reason == reason.name.lower()


def test_a_pen_fault_stop_counts_the_pass_and_faults_the_session() -> None:
    bench = treating()
    pen = bench.pens[PORT]
    bench.pen_says(pen.press())
    outcomes = bench.pen_says(pen.fault(StopReason.OVER_TEMPERATURE))
    session = bench.registry.session(SID)
    assert session is not None
    assert session.state is SessionState.FAULTED
    assert session.fault is not None and "too hot" in session.fault.detail
    assert zone_of(bench, "forehead").passes_done == 1
    faults = [a for o in outcomes for a in o.audit if a.kind is AuditKind.FAULT]
    assert len(faults) == 1  # MotorStopped and Disarmed both say so; recorded once
    assert faults[0].remediation == "Let the pen cool down before continuing."


def test_puncture_budget_stops_the_pass_without_a_fault() -> None:
    data: dict[str, Any] = {
        "policy_version": 1,
        "zones": {
            "scalp": {"max_depth_mm": Decimal("1.0"), "max_passes": 3, "puncture_budget": 100}
        },
        "plans": {"scalp": {"zones": ["scalp"]}},
    }
    bench = Bench(SessionRegistry(policy_from_mapping(data), ports=PORTS))
    bench.pens[PORT] = bench.new_pen()
    bench.connect()
    bench.pen_says(bench.pens[PORT].insert(1))
    bench.act(CreateSession(SID, PORT, "c1", "scalp", THERAPIST))
    bench.act(StartSession(SID, THERAPIST))
    bench.act(SelectZone(SID, "scalp", THERAPIST))
    bench.act(SetZoneDepth(SID, 500, THERAPIST))
    bench.act(ArmPen(SID, THERAPIST))
    pen = bench.pens[PORT]
    bench.pen_says(pen.press())
    assert stops(bench.pen_says(pen.sample(500, 99))) == []
    outcomes = bench.pen_says(pen.sample(500, 1))
    # Stop on the sample that reached the budget, and on those in flight behind it.
    assert set(stops(outcomes)) == {HostStopReason.PUNCTURE_BUDGET}
    session = bench.registry.session(SID)
    assert session is not None
    assert session.state is SessionState.ACTIVE and session.fault is None
    assert session.zones["scalp"].passes_done == 1
    assert [a.kind for o in outcomes for a in o.audit] == [AuditKind.STOP]


def test_overshoot_stops_at_once_on_every_sample_and_is_recorded_once() -> None:
    bench = treating(zone="cheeks", depth=1000)
    pen = bench.pens[PORT]
    bench.pen_says(pen.press())
    (sample,) = pen.sample(1100)  # within the pen's own limit (1.50 mm + 20 um)
    first = bench.registry.pen_message(PORT, sample, bench.tick())
    (sample,) = pen.sample(1120)
    second = bench.registry.pen_message(PORT, sample, bench.tick())
    assert stops(first)[0] == HostStopReason.DEPTH_OVERSHOOT
    assert first.urgent_commands[0].message == Stop(HostStopReason.DEPTH_OVERSHOOT)
    assert stops(second) == [HostStopReason.DEPTH_OVERSHOOT]
    assert [a.kind for a in first.audit] == [AuditKind.STOP, AuditKind.FAULT]
    assert second.audit == ()
    assert first.leases[0].action is LeaseAction.STOP_RENEWING
    bench.feed(first)
    session = bench.registry.session(SID)
    assert session is not None and session.state is SessionState.FAULTED
    assert refused(bench, ArmPen(SID, THERAPIST)) is RefusalReason.SESSION_NOT_ACTIVE
    assert bench.act(AcknowledgeFault(SID, THERAPIST)).refusal is None
    assert bench.act(ArmPen(SID, THERAPIST)).refusal is None


def test_the_urgent_sink_gets_the_stop_before_the_outcome_is_built() -> None:
    """The runtime's sink sees the Stop while the registry still has bookkeeping to do;
    the outcome records it as sent early, so nobody sends it a second time."""
    bench = treating(zone="cheeks", depth=1000)
    pen = bench.pens[PORT]
    bench.pen_says(pen.press())
    early: list[object] = []
    bench.registry.urgent_sink = lambda command: early.append(command.message)
    (sample,) = pen.sample(1100)
    outcome = bench.registry.pen_message(PORT, sample, bench.tick())
    assert early == [Stop(HostStopReason.DEPTH_OVERSHOOT)]
    assert outcome.sent_early == tuple(c for c in outcome.commands if c.urgent)
    assert outcome.urgent_commands == ()
    assert Stop(HostStopReason.DEPTH_OVERSHOOT) in [c.message for c in outcome.commands]
    assert [a.kind for a in outcome.audit] == [AuditKind.STOP, AuditKind.FAULT]


def test_a_peak_depth_overshoot_between_samples_is_a_fault() -> None:
    bench = treating(zone="cheeks", depth=1000)
    pen = bench.pens[PORT]
    bench.pen_says(pen.press())
    assert pen.excursion(1200) == []  # deeper than any sample showed, within the pen's limit
    outcomes = bench.pen_says(pen.release())
    session = bench.registry.session(SID)
    assert session is not None and session.state is SessionState.FAULTED
    assert any("peak depth of 1.20 mm" in a.message for o in outcomes for a in o.audit)


def test_idle_telemetry_never_stops() -> None:
    bench = treating()
    pen = bench.pens[PORT]
    # Deeper than the zone (1.00 mm) and the setpoint allow, yet within the pen's own limit
    # (the arming's 1.00 mm + its 20 um accuracy): while idle the host never judges it.
    (sample,) = pen.sample(1020)
    assert not pen.running
    assert bench.registry.pen_message(PORT, sample, bench.tick()) == Outcome()


# --- depth and zone rules ------------------------------------------------------------------


def test_a_refused_depth_is_never_sent_nor_clamped() -> None:
    bench = treating()
    sent_before = len(bench.wire)
    outcome = bench.act(SetZoneDepth(SID, 1200, THERAPIST))
    assert outcome.refusal is not None
    assert outcome.refusal.message == "Depth 1.20 mm is deeper than the forehead allows (1.00 mm)."
    assert outcome.commands == ()
    assert len(bench.wire) == sent_before
    session = bench.registry.session(SID)
    assert session is not None and session.depth_setpoint_um == 800


def test_the_depth_belongs_to_the_zone_it_was_set_for() -> None:
    bench = treating(zone="cheeks", depth=1400)
    assert refused(bench, SelectZone(SID, "periorbital", THERAPIST)) is RefusalReason.DISARM_FIRST
    bench.act(DisarmPen(SID, THERAPIST))
    assert bench.registry.pen(PORT).arm is ArmState.DISARMED
    assert bench.act(SelectZone(SID, "periorbital", THERAPIST)).refusal is None
    assert refused(bench, ArmPen(SID, THERAPIST)) is RefusalReason.NO_DEPTH_SET


def test_depth_cannot_change_during_a_pass() -> None:
    bench = treating()
    bench.pen_says(bench.pens[PORT].press())
    assert refused(bench, SetZoneDepth(SID, 500, THERAPIST)) is RefusalReason.PEN_RUNNING


def test_the_pen_refusing_a_depth_unsets_it() -> None:
    bench = treating()
    bench.pen_says([CommandRefused(SetDepth.TYPE, RefusalCode.DEPTH_ABOVE_CEILING)])
    session = bench.registry.session(SID)
    assert session is not None and session.depth_setpoint_um is None


# --- overrides -------------------------------------------------------------------------------


def test_override_rules() -> None:
    bench = treating()
    zone = "forehead"
    assert refused(bench, OverrideZone(SID, zone, THERAPIST, "thick skin", 1200)) is (
        RefusalReason.ROLE_NOT_PERMITTED
    )
    assert refused(bench, OverrideZone(SID, zone, MANAGER, "  ", 1200)) is (
        RefusalReason.OVERRIDE_NEEDS_REASON
    )
    assert refused(bench, OverrideZone(SID, zone, MANAGER, "thick skin", 2600)) is (
        RefusalReason.OVERRIDE_ABOVE_CEILING
    )
    assert refused(bench, OverrideZone(SID, zone, MANAGER, "thick skin", None, 9)) is (
        RefusalReason.OVERRIDE_ABOVE_CEILING
    )
    assert refused(bench, OverrideZone(SID, zone, MANAGER, "thick skin")) is (
        RefusalReason.BAD_REQUEST
    )
    assert refused(bench, OverrideZone(SID, zone, MANAGER, "thick skin", 0)) is (
        RefusalReason.BAD_REQUEST
    )
    assert refused(bench, OverrideZone(SID, "neck", MANAGER, "thick skin", 1200)) is (
        RefusalReason.ZONE_NOT_IN_PLAN
    )
    outcome = bench.act(OverrideZone(SID, zone, MANAGER, "thick skin", 1200, 4))
    assert outcome.refusal is None
    [record] = outcome.audit
    assert record.kind is AuditKind.OVERRIDE
    assert record.details["before"] == {"max_depth_um": 1000, "max_passes": 3}
    assert record.details["after"] == {"max_depth_um": 1200, "max_passes": 4}
    assert record.details["manager"] == "mg-01" and record.details["reason"] == "thick skin"
    assert "thick skin" in record.message
    bench.act(DisarmPen(SID, THERAPIST))
    assert bench.act(SetZoneDepth(SID, 1200, THERAPIST)).refusal is None
    assert refused(bench, SetZoneDepth(SID, 1201, THERAPIST)) is (
        RefusalReason.DEPTH_ABOVE_ZONE_LIMIT
    )


def test_an_override_is_for_one_session_only() -> None:
    bench = treating()
    bench.act(OverrideZone(SID, "forehead", MANAGER, "thick skin", 1200))
    bench.act(EndSession(SID, THERAPIST))
    bench.act(CreateSession("s2", PORT, "client-8", "full_face", THERAPIST))
    bench.act(StartSession("s2", THERAPIST))
    bench.act(SelectZone("s2", "forehead", THERAPIST))
    outcome = bench.act(SetZoneDepth("s2", 1200, THERAPIST))
    assert outcome.refusal is not None
    assert outcome.refusal.code is RefusalReason.DEPTH_ABOVE_ZONE_LIMIT


def test_lowering_a_limit_below_the_setpoint_stops_an_armed_pen() -> None:
    bench = treating(depth=900)
    outcome = bench.act(OverrideZone(SID, "forehead", MANAGER, "sensitive skin", 700))
    assert stops(outcome) == [HostStopReason.OTHER]
    assert not bench.pens[PORT].armed


# --- cartridges -------------------------------------------------------------------------------


def test_a_cartridge_used_in_a_finished_session_never_arms_again() -> None:
    bench = treating()
    one_pass(bench)
    bench.act(EndSession(SID, THERAPIST))
    assert bench.registry.ledger.status(42, "s2") == "spent"
    bench.act(CreateSession("s2", PORT, "client-8", "full_face", THERAPIST))
    bench.act(StartSession("s2", THERAPIST))
    bench.act(SelectZone("s2", "forehead", THERAPIST))
    bench.act(SetZoneDepth("s2", 500, THERAPIST))
    outcome = bench.act(ArmPen("s2", THERAPIST))
    assert outcome.refusal is not None
    assert outcome.refusal.code is RefusalReason.CARTRIDGE_SPENT
    bench.pen_says(bench.pens[PORT].insert(43))
    assert bench.act(ArmPen("s2", THERAPIST)).refusal is None


def test_an_unused_cartridge_may_serve_the_next_client() -> None:
    bench = treating()
    bench.act(EndSession(SID, THERAPIST))  # armed but never ran
    assert bench.registry.ledger.status(42, "s2") == "fresh"


def test_a_cartridge_used_on_one_client_is_refused_for_another_live_session() -> None:
    bench = treating()
    one_pass(bench)
    other = "/dev/ttyPEN1"
    bench.pens[other] = bench.new_pen(serial="PEN0002")
    bench.connect(other)
    bench.pen_says(bench.pens[PORT].remove())
    bench.pen_says(bench.pens[other].insert(42), other)
    bench.feed(
        bench.registry.handle(
            CreateSession("s2", other, "c2", "full_face", THERAPIST), bench.tick()
        )
    )
    for action in (
        StartSession("s2", THERAPIST),
        SelectZone("s2", "forehead", THERAPIST),
        SetZoneDepth("s2", 500, THERAPIST),
    ):
        assert bench.registry.handle(action, bench.tick()).refusal is None
    outcome = bench.registry.handle(ArmPen("s2", THERAPIST), bench.tick())
    assert outcome.refusal is not None
    assert outcome.refusal.code is RefusalReason.CARTRIDGE_OTHER_SESSION


def test_removing_the_cartridge_while_armed_is_a_pen_fault() -> None:
    bench = treating()
    assert bench.renewing[PORT] is not None
    bench.pen_says(bench.pens[PORT].remove())  # the pen stops: CARTRIDGE_REMOVED
    assert bench.renewing[PORT] is None
    session = bench.registry.session(SID)
    assert session is not None and session.state is SessionState.FAULTED
    assert bench.act(AcknowledgeFault(SID, THERAPIST)).refusal is None
    assert refused(bench, ArmPen(SID, THERAPIST)) is RefusalReason.NO_CARTRIDGE


def test_without_a_cartridge_report_the_registry_still_stops_renewing() -> None:
    # A pen that never says it stopped: the registry's own re-check stops it.
    bench = treating()
    outcome = bench.registry.pen_message(PORT, CartridgeRemoved(42, 0), bench.tick())
    assert stops(outcome) == [HostStopReason.OTHER]
    assert outcome.leases[-1].action is LeaseAction.STOP_RENEWING


# --- link, reboot, identity ----------------------------------------------------------------------


def test_link_loss_interrupts_and_only_the_therapist_resumes() -> None:
    bench = treating()
    bench.pen_says(bench.pens[PORT].press())
    outcomes = bench.disconnect()
    session = bench.registry.session(SID)
    assert session is not None and session.state is SessionState.INTERRUPTED
    assert session.zones["forehead"].passes_done == 1  # the cut-short pass counts
    assert any(a.kind is AuditKind.FAULT for o in outcomes for a in o.audit)
    assert bench.renewing[PORT] is None
    bench.connect()
    session = bench.registry.session(SID)
    assert session is not None and session.state is SessionState.INTERRUPTED
    assert not bench.pens[PORT].armed
    assert refused(bench, ArmPen(SID, THERAPIST)) is RefusalReason.SESSION_NOT_ACTIVE
    assert bench.act(ResumeSession(SID, THERAPIST)).refusal is None
    assert not bench.pens[PORT].armed  # resuming does not arm
    assert bench.act(ArmPen(SID, THERAPIST)).refusal is None


def test_resume_needs_the_pen_back() -> None:
    bench = treating()
    bench.disconnect()
    assert refused(bench, ResumeSession(SID, THERAPIST)) is RefusalReason.LINK_DOWN


def test_a_reboot_is_a_fault_that_never_resumes_by_itself() -> None:
    bench = treating()
    bench.pen_says(bench.pens[PORT].press())
    bench.reboot()
    session = bench.registry.session(SID)
    assert session is not None
    assert session.state is SessionState.FAULTED
    assert session.fault is not None and session.fault.kind == "pen_rebooted"
    assert session.zones["forehead"].passes_done == 1
    assert refused(bench, ResumeSession(SID, THERAPIST)) is RefusalReason.NOT_ALLOWED_NOW
    bench.pen_says(bench.pens[PORT].insert(42))
    assert refused(bench, ArmPen(SID, THERAPIST)) is RefusalReason.SESSION_NOT_ACTIVE
    assert bench.act(AcknowledgeFault(SID, THERAPIST)).refusal is None
    session = bench.registry.session(SID)
    assert session is not None and session.pen_boot_id == 2
    assert refused(bench, ArmPen(SID, THERAPIST)) is RefusalReason.NO_DEPTH_SET  # pen forgot it
    bench.act(SetZoneDepth(SID, 800, THERAPIST))
    assert bench.act(ArmPen(SID, THERAPIST)).refusal is None


def test_another_pen_on_the_port_is_a_fault_until_the_right_pen_returns() -> None:
    bench = treating()
    original = bench.pens[PORT]
    bench.disconnect()
    bench.pens[PORT] = bench.new_pen(serial="PEN0999")
    bench.connect()
    session = bench.registry.session(SID)
    assert session is not None and session.state is SessionState.FAULTED
    assert refused(bench, AcknowledgeFault(SID, THERAPIST)) is RefusalReason.WRONG_PEN
    assert refused(bench, ArmPen(SID, THERAPIST)) is RefusalReason.SESSION_NOT_ACTIVE
    bench.disconnect()
    bench.pens[PORT] = original
    bench.connect()
    assert bench.act(AcknowledgeFault(SID, THERAPIST)).refusal is None


def test_a_pen_failing_the_handshake_cannot_start_a_session() -> None:
    bench = Bench.create()
    bench.act(CreateSession(SID, PORT, "client-7", "full_face", THERAPIST))
    outcome = bench.registry.handshake_refused(PORT, "schema mismatch", identity(), bench.tick())
    assert [a.kind for a in outcome.audit] == [AuditKind.REFUSAL]
    again = bench.registry.handshake_refused(PORT, "schema mismatch", identity(), bench.tick())
    assert again.audit == ()  # a retrying link is not a new refusal
    assert refused(bench, StartSession(SID, THERAPIST)) is RefusalReason.PEN_NOT_VERIFIED


def test_the_pen_running_without_a_session_is_stopped() -> None:
    bench = Bench.create()
    bench.connect()
    outcome = bench.registry.pen_message(PORT, MotorStarted(1, 500, 1000, 1, 0, 0, 0), bench.tick())
    assert stops(outcome) == [HostStopReason.FAULT]
    assert [a.kind for a in outcome.audit] == [AuditKind.STOP]


def test_a_pen_that_runs_on_after_confirming_our_stop_is_stopped_again() -> None:
    """The Stop for an unapproved run is confirmed, and the pen keeps running (a faulty
    pen): each running sample after the confirmation is stopped again. (The flag "our
    Stop is on its way" was cleared only for a pen that had been armed, so here it
    stayed set and the monitor and the unapproved-run rule both stood aside.)"""
    bench = Bench.create()
    bench.connect()
    first = bench.registry.pen_message(PORT, MotorStarted(1, 500, 1000, 1, 0, 0, 0), bench.tick())
    assert stops(first) == [HostStopReason.FAULT]
    bench.registry.handle_link_event(PORT, Delivered(1, Stop(HostStopReason.FAULT)), bench.tick())
    assert not bench.registry.pen(PORT).stopping  # confirmed: nothing of ours on the way
    running = Telemetry(1100, 0, 400, 100, 400, 3500, 3900, 20, TelemetryFlag.MOTOR_RUNNING, 1)
    again = bench.registry.pen_message(PORT, running, bench.tick())
    assert stops(again) == [HostStopReason.FAULT]


def test_an_idle_sample_before_a_late_motor_stopped_is_not_taken_for_a_run() -> None:
    """Our Stop after an overshoot is confirmed, and the pen's MotorStopped is lost on the
    line (it comes again later). Until then we still believe the motor runs; the pen's
    next samples show it idle, and the pen applies a Stop before it sends any later
    frame. Those samples must not be judged a run without approval: no second Stop, no
    fault "running without an approved setting" on the therapist's tablet and in the
    audit log. The resent MotorStopped then closes the pass once."""
    bench = treating(depth=800)
    pen = bench.pens[PORT]
    bench.pen_says(pen.press())
    breach = [m for m in pen.sample(900, strokes=10) if isinstance(m, Telemetry)][-1]
    stopped = bench.registry.handle_link_event(PORT, MessageReceived(breach), bench.tick())
    assert stops(stopped) == [HostStopReason.DEPTH_OVERSHOOT]
    stop = next(c.message for c in stopped.commands if isinstance(c.message, Stop))
    answers = pen.apply(stop)  # MotorStopped and Disarmed: lost on the line, for now
    bench.registry.handle_link_event(PORT, Delivered(1, stop), bench.tick())
    assert bench.registry.pen(PORT).motor_running  # what we last heard
    pen.pending_telemetry.clear()
    pen.advance(bench.tick(0.05))
    idle = pen.pending_telemetry[-1]
    assert not idle.flags & TelemetryFlag.MOTOR_RUNNING
    judged = bench.registry.handle_link_event(PORT, MessageReceived(idle), bench.tick())
    assert stops(judged) == [] and not judged.audit and not judged.events
    for message in answers:  # the pen resends them
        bench.registry.handle_link_event(PORT, MessageReceived(message), bench.tick())
    session = bench.registry.session(SID)
    assert session is not None and session.fault is not None
    assert session.fault.kind == "depth_overshoot"
    assert [p.number for p in session.passes] == [1] and session.current_pass is None


def test_firmware_protocol_events_are_accepted_directly() -> None:
    registry = SessionRegistry(load_policy(), ports=PORTS)
    now = 1_800_000_000.0
    connected = registry.handle_link_event(PORT, Connected(identity(), 7), now)
    assert registry.pen(PORT).link == "up" and connected.commands
    registry.handle_link_event(PORT, MessageReceived(MotorStarted(1, 0, 0, 1, 0, 0, 0)), now)
    assert registry.pen(PORT).motor_running
    # The MotorStarted was stopped (no session); the pen confirming it changes only state.
    delivered = registry.handle_link_event(PORT, Delivered(1, Disarm()), now)
    assert delivered == Outcome(state_changed=True) and not registry.pen(PORT).stopping
    registry.handle_link_event(PORT, PeerRebooted(identity(), identity(boot_id=2)), now)
    assert registry.pen(PORT).boot_id == 2 and registry.pen(PORT).link == "down"
    registry.handle_link_event(PORT, LinkFailed("gone"), now)
    registry.handle_link_event(PORT, HandshakeRefused("bad schema", identity()), now)
    assert registry.pen(PORT).link == "refused"


# --- restart and serialisation ------------------------------------------------------------------


def restart(bench: Bench) -> Outcome:
    """kill -9 and start again: the journal (to_dict, through JSON) is all that survives."""
    journal = json.loads(json.dumps(bench.registry.to_dict()))
    for port, pen in bench.pens.items():
        pen.lose_host()
        bench.connected[port] = False
        bench.renewing[port] = None
    bench.registry = SessionRegistry.from_dict(load_policy(), journal, ports=PORTS)
    assert bench.registry.to_dict() == journal
    return bench.registry.recover(bench.tick())


def test_a_running_session_recovers_interrupted_with_its_pass_counted() -> None:
    bench = treating()
    one_pass(bench)
    bench.pen_says(bench.pens[PORT].press())
    recovery = restart(bench)
    session = bench.registry.session(SID)
    assert session is not None
    assert session.state is SessionState.INTERRUPTED
    assert session.zones["forehead"].passes_done == 2
    assert session.current_pass is None
    assert [a.kind for a in recovery.audit] == [AuditKind.RECOVERY]
    assert bench.registry.pen(PORT).arm is ArmState.DISARMED
    assert bench.registry.ledger.status(42, SID) == "this_session"
    bench.connect()
    assert refused(bench, ArmPen(SID, THERAPIST)) is RefusalReason.SESSION_NOT_ACTIVE
    assert bench.act(ResumeSession(SID, THERAPIST)).refusal is None
    assert bench.act(ArmPen(SID, THERAPIST)).refusal is None


def test_spent_cartridges_survive_a_restart() -> None:
    bench = treating()
    one_pass(bench)
    bench.act(EndSession(SID, THERAPIST))
    restart(bench)
    assert bench.registry.ledger.status(42, "s2") == "spent"
    assert bench.registry.session(SID) is not None


def test_from_dict_refuses_what_it_does_not_understand() -> None:
    bench = treating()
    journal = bench.registry.to_dict()
    with pytest.raises(ValueError, match="format"):
        SessionRegistry.from_dict(load_policy(), {**journal, "format": 99}, ports=PORTS)
    broken = json.loads(json.dumps(journal))
    broken["sessions"][SID]["surprise"] = 1
    with pytest.raises(ValueError, match="surprise"):
        SessionRegistry.from_dict(load_policy(), broken, ports=PORTS)
    twin = json.loads(json.dumps(journal))
    twin["sessions"]["s2"] = {**twin["sessions"][SID], "session_id": "s2"}
    with pytest.raises(ValueError, match="both hold port"):
        SessionRegistry.from_dict(load_policy(), twin, ports=PORTS)


def test_archive_drops_only_ended_sessions() -> None:
    bench = treating()
    assert bench.registry.archive(SID) is None
    bench.act(EndSession(SID, THERAPIST))
    archived = bench.registry.archive(SID)
    assert archived is not None and archived["state"] == "ended"
    assert bench.registry.session(SID) is None


# --- refusals of actions -------------------------------------------------------------------------


def _session_refusal_cases() -> dict[RefusalReason, tuple[Bench, object]]:
    def fresh() -> Bench:
        bench = Bench.create()
        bench.connect()
        return bench

    def created() -> Bench:
        bench = fresh()
        bench.act(CreateSession(SID, PORT, "client-7", "full_face", THERAPIST))
        return bench

    return {
        RefusalReason.BAD_REQUEST: (
            fresh(),
            CreateSession("s 1", PORT, "c", "full_face", THERAPIST),
        ),
        RefusalReason.UNKNOWN_SESSION: (fresh(), StartSession("nope", THERAPIST)),
        RefusalReason.SESSION_EXISTS: (
            created(),
            CreateSession(SID, "/dev/other", "c", "full_face", THERAPIST),
        ),
        RefusalReason.PEN_BUSY: (created(), CreateSession("s2", PORT, "c", "full_face", THERAPIST)),
        RefusalReason.UNKNOWN_PEN: (
            fresh(),
            CreateSession(SID, "room9", "c", "full_face", THERAPIST),
        ),
        RefusalReason.UNKNOWN_PLAN: (
            fresh(),
            CreateSession(SID, PORT, "c", "everything", THERAPIST),
        ),
        RefusalReason.UNKNOWN_ZONE: (treating(), SelectZone(SID, "elbow", THERAPIST)),
        RefusalReason.ZONE_NOT_IN_PLAN: (treating(), SelectZone(SID, "neck", THERAPIST)),
        RefusalReason.NOT_ALLOWED_NOW: (created(), ResumeSession(SID, THERAPIST)),
        RefusalReason.DISARM_FIRST: (treating(), SelectZone(SID, "cheeks", THERAPIST)),
        RefusalReason.ROLE_NOT_PERMITTED: (created(), StartSession(SID, ADMIN)),
        RefusalReason.OVERRIDE_NEEDS_REASON: (
            treating(),
            OverrideZone(SID, "forehead", MANAGER, "", 1100),
        ),
        RefusalReason.OVERRIDE_ABOVE_CEILING: (
            treating(),
            OverrideZone(SID, "forehead", MANAGER, "why not", 2501),
        ),
        # Ownership and take-over: tests/test_session_ownership.py.
        RefusalReason.NOT_SESSION_OWNER: (
            treating(),
            ArmPen(SID, Actor("th-02", Role.THERAPIST)),
        ),
        RefusalReason.TAKE_OVER_NEEDS_REASON: (treating(), TakeOverSession(SID, MANAGER, " ")),
    }


def test_every_session_refusal_code_is_exercised() -> None:
    cases = _session_refusal_cases()
    assert set(cases) == set(RefusalReason) - GATE_REASONS
    for code, (bench, action) in cases.items():
        assert refused(bench, action) is code, code


def test_every_refusal_is_audited_with_who_and_what() -> None:
    bench = treating()
    outcome = bench.act(SetZoneDepth(SID, 1500, THERAPIST))
    [record] = outcome.audit
    assert record.kind is AuditKind.REFUSAL
    assert record.session_id == SID and record.device_id == "PEN0001"
    assert record.details["code"] == "depth_above_zone_limit"
    assert record.details["depth_um"] == 1500 and record.details["zone_id"] == "forehead"
    assert record.details["actor"] == "th-01"
    assert record.remediation == "Choose 1.00 mm or less, or ask a manager for an override."
    session = bench.registry.session(SID)
    assert session is not None and session.refusals == 1


def test_lifecycle_actions_follow_the_table() -> None:
    bench = treating()
    assert bench.act(PauseSession(SID, THERAPIST)).refusal is None
    assert not bench.pens[PORT].armed  # leaving ACTIVE stops the pen
    assert refused(bench, PauseSession(SID, THERAPIST)) is RefusalReason.NOT_ALLOWED_NOW
    assert refused(bench, AcknowledgeFault(SID, THERAPIST)) is RefusalReason.NOT_ALLOWED_NOW
    assert bench.act(ResumeSession(SID, THERAPIST)).refusal is None
    assert refused(bench, StartSession(SID, THERAPIST)) is RefusalReason.NOT_ALLOWED_NOW
    bench.act(EndSession(SID, THERAPIST))
    assert refused(bench, EndSession(SID, THERAPIST)) is RefusalReason.NOT_ALLOWED_NOW
    assert refused(bench, SetStrokeRate(SID, 100, THERAPIST)) is RefusalReason.SESSION_NOT_ACTIVE


def test_stop_button_and_speed() -> None:
    bench = treating()
    assert bench.act(SetStrokeRate(SID, 120, THERAPIST)).refusal is None
    assert bench.pens[PORT].speed_hz == 120
    assert refused(bench, SetStrokeRate(SID, 200, THERAPIST)) is RefusalReason.SPEED_OUT_OF_RANGE
    outcome = bench.act(StopPen(SID, THERAPIST))
    assert stops(outcome) == [HostStopReason.THERAPIST]
    assert [a.kind for a in outcome.audit] == [AuditKind.STOP]
    assert not bench.pens[PORT].armed


def test_lease_directives_follow_the_pen() -> None:
    bench = treating()
    token = bench.registry.pen(PORT).lease_token
    assert token is not None and bench.renewing[PORT] == token
    arms = [m for _, m in bench.wire if isinstance(m, Arm)]
    assert arms == [Arm(250, token, 800, 1000)]  # the approved setpoint, the zone's limit
    bench.renew()  # the link renews as told; the pen accepts
    assert bench.pens[PORT].armed
    bench.act(DisarmPen(SID, THERAPIST))
    assert bench.renewing[PORT] is None


def test_a_therapist_arm_while_armed_is_a_no_op() -> None:
    bench = treating()
    outcome = bench.act(ArmPen(SID, THERAPIST))
    assert outcome.refusal is None and outcome.commands == ()


def test_actor_roles() -> None:
    bench = Bench.create()
    bench.connect()
    assert refused(bench, CreateSession(SID, PORT, "c", "full_face", ADMIN)) is (
        RefusalReason.ROLE_NOT_PERMITTED
    )
    manager_treats = bench.act(CreateSession(SID, PORT, "c", "full_face", MANAGER))
    assert manager_treats.refusal is None
    assert Actor("x", Role.THERAPIST).role == "therapist"


def test_anyone_may_stop_the_needle() -> None:
    bench = treating()
    outcome = bench.act(StopPen(SID, ADMIN))
    assert outcome.refusal is None
    assert stops(outcome) == [HostStopReason.THERAPIST]
    assert bench.act(DisarmPen(SID, ADMIN)).refusal is None


def test_a_lease_longer_than_the_policy_allows_refuses_to_start() -> None:
    with pytest.raises(PolicyError, match=r"link.lease_ms: 600 must be between 1 and .* \(500\)"):
        SessionRegistry(load_policy(), lease_ms=600, ports=PORTS)


def test_a_session_only_opens_on_a_configured_pen() -> None:
    bench = Bench.create()
    outcome = bench.act(CreateSession(SID, "room9", "client-7", "full_face", THERAPIST))
    assert outcome.refusal is not None
    assert outcome.refusal.code is RefusalReason.UNKNOWN_PEN
    assert "room9" in outcome.refusal.message
    assert PORT in outcome.refusal.remediation  # names the pens that do exist
    assert bench.registry.session(SID) is None


def test_a_pen_other_than_the_configured_serial_is_refused_and_audited() -> None:
    bench = Bench(SessionRegistry(load_policy(), ports={PORT: "PEN-00042"}))
    bench.pens[PORT] = bench.new_pen()
    outcomes = bench.connect()
    audit = [r for o in outcomes for r in o.audit if r.kind is AuditKind.REFUSAL]
    assert len(audit) == 1
    assert "PEN0001" in audit[0].message and "PEN-00042" in audit[0].message
    assert audit[0].details["code"] == "unexpected_pen"
    bench.act(CreateSession(SID, PORT, "client-7", "full_face", THERAPIST))
    start = bench.act(StartSession(SID, THERAPIST))
    assert start.refusal is not None and start.refusal.code is RefusalReason.UNEXPECTED_PEN
    assert "PEN0001" in start.refusal.message and "PEN-00042" in start.refusal.message
    assert not bench.pens[PORT].armed


# --- confirmed state (issue 11) ----------------------------------------------------------


def test_a_run_made_while_the_link_was_down_is_recovered_from_the_counters() -> None:
    bench = treating()
    pen = bench.pens[PORT]
    bench.connected[PORT] = False  # the host hears nothing; the pen is still armed
    pen.press()
    pen.sample(800, strokes=25)
    pen.release()
    bench.registry.link_down(PORT, "silent", bench.tick())
    outcomes = bench.connect()
    ended = [e for o in outcomes for e in o.events if e.kind is EventKind.PASS_ENDED]
    assert [e.detail["reason"] for e in ended] == ["recovered"]
    session = bench.registry.session(SID)
    assert session is not None
    assert zone_of(bench, "forehead").passes_done == 1
    assert session.passes[-1].recovered and session.passes[-1].strokes == 25
    assert 42 in session.cartridges_used
    recovery = [a for o in outcomes for a in o.audit if a.kind is AuditKind.RECOVERY]
    assert recovery and "recovered from the pen's counters" in recovery[0].message


def test_a_pen_that_reports_itself_armed_on_a_new_link_is_stopped_and_faulted() -> None:
    bench = treating()
    bench.disconnect()
    bench.connect()
    session = bench.registry.session(SID)
    assert session is not None and session.state is SessionState.INTERRUPTED
    status = bench.pens[PORT].firmware.status(bench.now)
    lying = dataclasses.replace(status, flags=status.flags | TelemetryFlag.ARMED)
    outcome = bench.registry.pen_message(PORT, lying, bench.tick())
    assert stops(outcome) == [HostStopReason.FAULT]
    session = bench.registry.session(SID)
    assert session is not None and session.state is SessionState.FAULTED
    assert session.fault is not None and session.fault.kind == "unapproved_run"


def test_an_armed_answer_with_other_values_than_approved_is_stopped() -> None:
    bench = Bench.create()
    bench.connect()
    bench.pen_says(bench.pens[PORT].insert(42))
    bench.act(CreateSession(SID, PORT, "client-7", "full_face", THERAPIST))
    bench.act(StartSession(SID, THERAPIST))
    bench.act(SelectZone(SID, "forehead", THERAPIST))
    bench.act(SetZoneDepth(SID, 800, THERAPIST))
    outcome = bench.registry.handle(ArmPen(SID, THERAPIST), bench.tick())  # not delivered
    (arm,) = [c.message for c in outcome.commands if isinstance(c.message, Arm)]
    deeper = Armed(arm.token, arm.lease_ms, 900, 1000, 0, 0, 42, 0)
    answer = bench.registry.pen_message(PORT, deeper, bench.tick())
    assert stops(answer) == [HostStopReason.FAULT]
    assert not [d for d in answer.leases if d.action is LeaseAction.KEEP_RENEWING]


def test_an_acknowledged_stop_confirms_the_pen_disarmed() -> None:
    bench = treating()
    outcome = bench.registry.handle(StopPen(SID, THERAPIST), bench.tick())
    (stop,) = [c.message for c in outcome.commands if isinstance(c.message, Stop)]
    assert bench.registry.pen(PORT).arm is ArmState.ARMED  # sent is not confirmed
    bench.registry.handle_link_event(PORT, Delivered(0, stop), bench.tick())
    assert bench.registry.pen(PORT).arm is ArmState.DISARMED


def test_a_cartridge_whose_chip_reports_strokes_is_refused_for_a_new_client() -> None:
    bench = Bench.create()
    bench.pens[PORT] = bench.new_pen(chips={77: 500})  # used somewhere the ledger never saw
    bench.connect()
    bench.pen_says(bench.pens[PORT].insert(77))
    bench.act(CreateSession(SID, PORT, "client-7", "full_face", THERAPIST))
    bench.act(StartSession(SID, THERAPIST))
    bench.act(SelectZone(SID, "forehead", THERAPIST))
    bench.act(SetZoneDepth(SID, 800, THERAPIST))
    assert refused(bench, ArmPen(SID, THERAPIST)) is RefusalReason.CARTRIDGE_USED_ELSEWHERE
    assert not bench.pens[PORT].armed


def test_a_setdepth_is_refused_while_the_pen_is_armed() -> None:
    bench = treating()
    assert refused(bench, SetZoneDepth(SID, 700, THERAPIST)) is RefusalReason.PEN_ARMED
    assert bench.pens[PORT].depth_set_um == 800


def test_a_withdrawn_arm_leaves_the_pen_disarmed_and_a_zone_may_be_chosen() -> None:
    bench = treating()
    bench.act(DisarmPen(SID, THERAPIST))
    outcome = bench.registry.handle(ArmPen(SID, THERAPIST), bench.tick())  # decided, not sent
    (arm,) = [c.message for c in outcome.commands if isinstance(c.message, Arm)]
    assert bench.registry.pen(PORT).arm is ArmState.ARMING
    bench.feed(bench.registry.arm_withdrawn(PORT, arm.token, "a stop overtook it", bench.tick()))
    assert bench.registry.pen(PORT).arm is ArmState.DISARMED
    assert bench.registry.pen(PORT).lease_token is None
    assert bench.act(SelectZone(SID, "cheeks", THERAPIST)).refusal is None


def test_a_run_of_a_pen_that_left_the_port_is_counted_when_it_comes_back() -> None:
    bench = treating()
    first = bench.pens[PORT]
    bench.connected[PORT] = False  # the host hears nothing; the pen is still armed
    first.press()
    first.sample(800, strokes=12)
    first.release()
    bench.registry.link_down(PORT, "silent", bench.tick())
    bench.pens[PORT] = bench.new_pen(serial="PEN0002")  # the therapist takes another pen
    bench.connect()
    assert zone_of(bench, "forehead").passes_done == 0  # not this pen's run
    bench.disconnect()
    bench.pens[PORT] = first  # and brings the first one back
    outcomes = bench.connect()
    ended = [e for o in outcomes for e in o.events if e.kind is EventKind.PASS_ENDED]
    assert [e.detail["reason"] for e in ended] == ["recovered"]
    assert zone_of(bench, "forehead").passes_done == 1
