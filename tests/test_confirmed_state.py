"""Decisions rest on the pen's confirmed state: issue 11's sequences, end to end.

A real controller against simulated pens over pseudo-terminals. Each test is one
sequence that once broke a rule of product.md §4; the pen misbehaves only through
the simulator's own fault scripts (silence, a stale frame, a crafted sample).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.audit import AuditKind, read_records
from controller.errors import ActionRefused
from controller.safety.context import SessionState
from controller.safety.gate import RefusalReason
from controller.sessions import (
    ArmPen,
    CreateSession,
    DisarmPen,
    EndSession,
    EventKind,
    ResumeSession,
    SelectZone,
    SetZoneDepth,
    StartSession,
    StopPen,
)
from firmware_protocol.messages import MotorStarted, Telemetry, TelemetryFlag
from simulated_pen.device import SimulatedPen
from simulated_pen.faults import Fault, FaultKind
from simulated_pen.firmware import FirmwareConfig
from simulated_pen.runner import PenRunner

from .controller_rig import THERAPIST, Rig, eventually, policy_with, start_rig, stop_rig

RUNNING = int(TelemetryFlag.ARMED | TelemetryFlag.MOTOR_RUNNING | TelemetryFlag.DEPTH_SET)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig, collector = await start_rig(tmp_path)
    yield rig
    await stop_rig(rig, collector)


def sample_like(pen: SimulatedPen, now: float, *, depth_um: int, flags: int) -> Telemetry:
    """A telemetry sample of this pen's current run, with the given reading and flags."""
    fw = pen.firmware
    return Telemetry(
        fw.device_ms(now),
        fw.depth_set_um or 0,
        depth_um,
        100,
        400,
        2500,
        4000,
        fw.strokes,
        flags,
        fw.runs,
    )


def audit(rig: Rig) -> list[AuditKind]:
    rig.service.sync_records()
    return [r.kind for r in read_records(rig.service.settings.state_dir / "audit.db")]


async def relinked(rig: Rig, after: int) -> None:
    """The link went down and came back (after event index ``after``), pen ready again."""
    await rig.wait_after(after, EventKind.PEN_DISCONNECTED, within=5.0)
    await rig.wait_after(after, EventKind.PEN_CONNECTED, within=5.0)
    await rig.therapist().pen_ready(within=5.0)


async def test_1_a_setdepth_lost_in_an_outage_is_never_taken_for_confirmed(rig: Rig) -> None:
    svc = rig.service
    sid = await rig.start_treating("cheeks", 1500)
    svc.act(DisarmPen(sid, THERAPIST))
    await eventually(lambda: not rig.pen().armed, within=2.0)
    svc.act(SelectZone(sid, "periorbital", THERAPIST))
    mark = len(rig.events)
    rig.physical(0, lambda p, now: p.inject(Fault(FaultKind.SILENT, duration=0.8), now))
    svc.act(SetZoneDepth(sid, 400, THERAPIST))  # sent as the pen goes silent
    await relinked(rig, mark)
    assert rig.pen().firmware.depth_set_um == 1500  # the pen never took the new depth
    # Reconciled on the pen's Status: the depth it does not hold is no longer approved.
    await eventually(lambda: svc.registry.pen(rig.port()).confirmed, within=2.0)
    session = svc.session(sid)
    assert session is not None and session.depth_setpoint_um is None
    svc.act(ResumeSession(sid, THERAPIST))
    with pytest.raises(ActionRefused) as info:
        svc.act(ArmPen(sid, THERAPIST))
    assert info.value.refusal.code in (
        RefusalReason.NO_DEPTH_SET,
        RefusalReason.DEPTH_NOT_CONFIRMED,
    )
    assert not rig.pen().armed
    cleared = await rig.wait_after(mark, EventKind.REFUSED)
    assert cleared.detail["code"] == "depth_not_confirmed"
    assert "holds 1.50 mm" in cleared.detail["message"]
    # Set and confirmed again, the pen arms at the zone's depth and no deeper.
    svc.act(SetZoneDepth(sid, 400, THERAPIST))
    await rig.arm(sid)
    assert rig.pen().firmware.depth_set_um == 400
    assert rig.pen().firmware.arm_max_depth_um == 500


async def test_2_a_run_the_controller_never_heard_of_is_a_counted_pass(rig: Rig) -> None:
    svc = rig.service
    sid = await rig.start_treating("cheeks", 1000)
    cartridge = rig.pen().firmware.cartridge_id
    mark = len(rig.events)
    # The pen goes silent; the therapist presses within the lease: the needle runs,
    # and nothing it says reaches the controller before the link is made again.
    rig.physical(0, lambda p, now: p.inject(Fault(FaultKind.SILENT, duration=0.8), now))
    rig.physical(0, lambda p, now: p.set_contact(True, now))
    rig.physical(0, lambda p, now: p.press_button(now))
    assert rig.pen().running
    await relinked(rig, mark)
    rig.physical(0, lambda p, now: p.release_button(now))
    recovered = await rig.wait_after(mark, EventKind.PASS_ENDED)
    assert recovered.detail["reason"] == "recovered"
    session = svc.session(sid)
    assert session is not None
    assert session.zones["cheeks"].passes_done == 1
    assert session.passes[-1].recovered and (session.passes[-1].strokes or 0) > 0
    assert cartridge in session.cartridges_used  # bound to this client
    assert AuditKind.RECOVERY in audit(rig)
    # The next client is refused the cartridge the needle ran with.
    svc.act(EndSession(sid, THERAPIST))
    sid2 = svc.new_session_id()
    svc.act(CreateSession(sid2, rig.port(), "client-ref-2", "full_face", THERAPIST))
    svc.act(StartSession(sid2, THERAPIST))
    svc.act(SelectZone(sid2, "cheeks", THERAPIST))
    svc.act(SetZoneDepth(sid2, 1000, THERAPIST))
    with pytest.raises(ActionRefused) as info:
        svc.act(ArmPen(sid2, THERAPIST))
    assert info.value.refusal.code is RefusalReason.CARTRIDGE_SPENT


async def test_3_a_sample_behind_the_counter_is_judged_too(rig: Rig) -> None:
    await rig.start_treating("cheeks", 1000)
    rig.physical(0, lambda p, now: p.set_contact(True, now))
    rig.physical(0, lambda p, now: p.press_button(now))
    await rig.wait_event(EventKind.PASS_STARTED)
    # 0.3 mm over the setpoint, numbered 500 frames behind: the link marks it stale.
    rig.physical(
        0,
        lambda p, now: p.emit_stale(
            sample_like(p, now, depth_um=1300, flags=RUNNING), now, behind=500
        ),
    )
    stop = await rig.wait_event(EventKind.STOP_SENT, reason="depth_overshoot")
    assert "1.30 mm" in stop.detail["message"]
    await eventually(lambda: not rig.pen().running, within=1.0)
    link = rig.service.pens[rig.port()].link
    assert link.conn.stats.unreliable_stale >= 1  # counted as stale, judged all the same


async def test_4_a_pen_running_after_a_confirmed_stop_is_stopped_and_faulted(rig: Rig) -> None:
    svc = rig.service
    sid = await rig.start_treating("cheeks", 1000)
    svc.act(StopPen(sid, THERAPIST))
    await rig.wait_event(EventKind.STOP_SENT, reason="therapist")
    await eventually(lambda: svc.registry.pen(rig.port()).arm == "disarmed", within=2.0)
    mark = len(rig.events)
    # The pen claims, in order, to be armed and running although it confirmed the Stop.
    rig.physical(0, lambda p, now: p.emit(sample_like(p, now, depth_um=900, flags=RUNNING), now))
    fault = await rig.wait_after(mark, EventKind.FAULT)
    assert fault.detail["kind"] == "unapproved_run"
    stop = await rig.wait_after(mark, EventKind.STOP_SENT)
    assert stop.detail["reason"] == "fault"
    session = svc.session(sid)
    assert session is not None and session.state is SessionState.FAULTED


async def test_4_a_motor_start_while_disarmed_is_stopped_and_still_counted(rig: Rig) -> None:
    svc = rig.service
    sid = await rig.start_treating("cheeks", 1000)
    svc.act(DisarmPen(sid, THERAPIST))
    await rig.wait_event(EventKind.DISARMED, reason="host_disarm")
    mark = len(rig.events)

    def motor_started(p: SimulatedPen, now: float) -> None:
        fw = p.firmware
        p.emit(
            MotorStarted(
                fw.device_ms(now),
                1000,
                1500,
                fw.runs + 1,
                fw.strokes,
                fw.cartridge_id or 0,
                0,
            ),
            now,
        )

    rig.physical(0, motor_started)
    fault = await rig.wait_after(mark, EventKind.FAULT)
    assert fault.detail["kind"] == "unapproved_run"
    await rig.wait_after(mark, EventKind.STOP_SENT)
    started = await rig.wait_after(mark, EventKind.PASS_STARTED)
    assert started.detail["zone_id"] == "cheeks"  # every run on the pen is a pass


async def test_5_the_puncture_budget_holds_across_the_stroke_counter_wrapping(
    tmp_path: Path,
) -> None:
    runner = PenRunner(seed=5, config=FirmwareConfig(strokes_at_boot=2**32 - 30))
    slots = await runner.start(1, "pty")
    policy = policy_with(tmp_path, "puncture_budget = 60\n")
    rig, collector = await start_rig(tmp_path, runner=runner, slots=slots, policy=policy)
    try:
        await rig.start_treating("forehead", 800)
        rig.physical(0, lambda p, now: p.set_contact(True, now))
        rig.physical(0, lambda p, now: p.press_button(now))
        stop = await rig.wait_event(EventKind.STOP_SENT, reason="puncture_budget")
        assert "60 strokes" in stop.detail["message"]
        ended = await rig.wait_event(EventKind.PASS_ENDED)
        assert 60 <= int(ended.detail["strokes"]) < 80  # across 2**32, never negative
        assert rig.pen().firmware.strokes < 1000  # the pen's counter did wrap
    finally:
        await stop_rig(rig, collector)


async def test_7_a_pen_relinked_while_armed_disarms_and_the_session_is_interrupted(
    rig: Rig,
) -> None:
    svc = rig.service
    sid = await rig.start_treating("cheeks", 1000)
    mark = len(rig.events)
    svc.pens[rig.port()].link._close_transport()  # the host drops and remakes the link
    await relinked(rig, mark)
    assert not rig.pen().armed
    session = svc.session(sid)
    assert session is not None and session.state is SessionState.INTERRUPTED
    assert not [e for e in rig.events[mark:] if e.kind is EventKind.FAULT]


async def test_8_a_healthy_strict_pen_set_exactly_at_the_zone_limit_completes_its_passes(
    tmp_path: Path,
) -> None:
    runner = PenRunner(seed=8, config=FirmwareConfig(strict=True))
    slots = await runner.start(1, "pty")
    rig, collector = await start_rig(tmp_path, runner=runner, slots=slots)
    try:
        sid = await rig.start_treating("nose", 750)  # the nose's limit, exactly
        for _ in range(2):
            await rig.one_pass(hold=0.3)
        session = rig.service.session(sid)
        assert session is not None
        assert session.zones["nose"].passes_done == 2
        assert session.state is SessionState.ACTIVE and session.fault is None
        assert not [
            e
            for e in rig.events
            if e.kind in (EventKind.FAULT, EventKind.STOP_SENT)
            and e.detail.get("reason") != "pass_limit"
        ]
        peaks = [p.peak_depth_um or 0 for p in session.passes]
        assert max(peaks) > 750  # the readings did go above the limit, within accuracy
    finally:
        await stop_rig(rig, collector)


async def test_8_a_real_overshoot_beyond_the_accuracy_is_stopped(tmp_path: Path) -> None:
    runner = PenRunner(seed=8, config=FirmwareConfig(strict=True))
    slots = await runner.start(1, "pty")
    rig, collector = await start_rig(tmp_path, runner=runner, slots=slots)
    try:
        await rig.start_treating("cheeks", 1500)
        rig.physical(0, lambda p, now: p.set_contact(True, now))
        rig.physical(0, lambda p, now: p.press_button(now))
        await rig.wait_event(EventKind.PASS_STARTED)
        rig.physical(0, lambda p, now: p.inject(Fault(FaultKind.DEPTH_OVERSHOOT, amount=200), now))
        stop = await rig.wait_event(EventKind.STOP_SENT)
        assert stop.detail["reason"] in ("depth_overshoot", "fault")
        await eventually(lambda: not rig.pen().running, within=1.0)
    finally:
        await stop_rig(rig, collector)
