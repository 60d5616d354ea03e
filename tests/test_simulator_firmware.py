"""The pure firmware model: every rule of product.md section 3, on a controlled clock."""

from __future__ import annotations

import itertools
import math
import random
from typing import Any, TypeVar

import pytest

from firmware_protocol.messages import (
    Arm,
    Armed,
    CartridgeInserted,
    CartridgeRemoved,
    CommandRefused,
    Disarm,
    Disarmed,
    HostStopReason,
    Message,
    MotorStarted,
    MotorStopped,
    QueryStatus,
    RefusalCode,
    Renew,
    Reset,
    SetDepth,
    SetLiftOffGrace,
    SetSpeed,
    SetTelemetryRate,
    Status,
    Stop,
    StopReason,
    Telemetry,
    TelemetryFlag,
    counter_diff,
)
from simulated_pen.faults import Fault, FaultKind
from simulated_pen.firmware import FirmwareConfig, PenFirmware
from simulated_pen.firmware_core import TELEMETRY_FIFO

CARTRIDGE = 0xC0FFEE
CEILING = 2500
M = TypeVar("M", bound=Message)


def make(seed: int = 1, **config: Any) -> PenFirmware:
    return PenFirmware(random.Random(seed), 0.0, FirmwareConfig(**config))


def ready(fw: PenFirmware, now: float = 0.0, depth: int = 1000) -> None:
    """Cartridge in, depth set: everything but the Arm."""
    fw.insert_cartridge(CARTRIDGE, now)
    assert fw.handle(SetDepth(depth), now) == []


def arm(fw: PenFirmware, lease_ms: int, token: int, now: float, max_depth: int = CEILING) -> Armed:
    """Arm with the pen's own setpoint (as an approving host does); the Armed answer."""
    assert fw.depth_set_um is not None
    (answer,) = fw.handle(Arm(lease_ms, token, fw.depth_set_um, max_depth), now)
    assert isinstance(answer, Armed), answer
    assert (answer.token, answer.lease_ms) == (token, lease_ms)
    assert (answer.depth_um, answer.max_depth_um) == (fw.depth_set_um, max_depth)
    return answer


def armed_running(
    lease_ms: int = 250, token: int = 1, depth: int = 1000, max_depth: int = CEILING, **config: Any
) -> PenFirmware:
    fw = make(**config)
    ready(fw, depth=depth)
    arm(fw, lease_ms, token, 0.0, max_depth)
    fw.set_contact(True, 0.0)
    out = fw.press_button(0.0)
    assert [type(m) for m in out] == [MotorStarted]
    return fw


def run(fw: PenFirmware, start: float, end: float, dt: float = 0.001) -> list[Message]:
    """Step every dt from start (exclusive) to end (inclusive); all messages."""
    out: list[Message] = []
    n = round((end - start) / dt)
    for i in range(1, n + 1):
        out += fw.step(start + i * dt)
    return out


def events(messages: list[Message]) -> list[Message]:
    return [m for m in messages if not isinstance(m, Telemetry)]


def of(kind: type[M], messages: list[Message]) -> list[M]:
    return [m for m in messages if isinstance(m, kind)]


# --- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "lease_ms", "code"),
    [
        ("ready", 0, RefusalCode.BAD_LEASE),
        ("ready", 2001, RefusalCode.BAD_LEASE),
        ("no_cartridge", 250, RefusalCode.NO_CARTRIDGE),
        ("no_depth", 250, RefusalCode.NO_DEPTH),
        ("low_battery", 250, RefusalCode.LOW_BATTERY),
        ("hot", 250, RefusalCode.OVER_TEMPERATURE),
    ],
)
def test_arm_is_refused_with_the_reason(setup: str, lease_ms: int, code: RefusalCode) -> None:
    fw = make()
    if setup != "no_cartridge":
        fw.insert_cartridge(CARTRIDGE, 0.0)
    if setup != "no_depth":
        fw.handle(SetDepth(800), 0.0)
    if setup == "low_battery":
        fw.inject(Fault(FaultKind.LOW_BATTERY), 0.0)
    if setup == "hot":
        fw.inject(Fault(FaultKind.OVER_TEMPERATURE), 0.0)
    assert fw.handle(Arm(lease_ms, 9, 800, 1000), 0.001) == [CommandRefused(Arm.TYPE, code)]
    assert not fw.armed
    fw.set_contact(True, 0.002)
    assert fw.press_button(0.002) == []  # and the needle does not move


def test_the_lease_limit_itself_is_accepted() -> None:
    fw = make()
    ready(fw)
    arm(fw, 2000, 3, 0.0)


def test_depth_above_the_ceiling_is_refused_never_clamped() -> None:
    fw = make()
    assert fw.handle(SetDepth(2501), 0.0) == [
        CommandRefused(SetDepth.TYPE, RefusalCode.DEPTH_ABOVE_CEILING)
    ]
    assert fw.depth_set_um is None
    assert fw.handle(SetDepth(2500), 0.0) == []
    assert fw.depth_set_um == 2500
    assert fw.handle(SetDepth(3000), 0.0) == [
        CommandRefused(SetDepth.TYPE, RefusalCode.DEPTH_ABOVE_CEILING)
    ]
    assert fw.depth_set_um == 2500  # the refused setpoint changed nothing


@pytest.mark.parametrize("rate", [0, 49, 151, 1000])
def test_stroke_rate_outside_50_to_150_hz_is_refused(rate: int) -> None:
    fw = make()
    assert fw.handle(SetSpeed(rate), 0.0) == [
        CommandRefused(SetSpeed.TYPE, RefusalCode.SPEED_OUT_OF_RANGE)
    ]
    assert fw.speed_hz == 100


@pytest.mark.parametrize("rate", [50, 150])
def test_stroke_rate_limits_are_accepted(rate: int) -> None:
    fw = make()
    assert fw.handle(SetSpeed(rate), 0.0) == []
    assert fw.speed_hz == rate


def test_telemetry_rate_is_configurable_and_bounded() -> None:
    fw = make()
    assert len(run(fw, 0.0, 1.0)) == 100  # default 100 Hz
    assert fw.handle(SetTelemetryRate(1001), 1.0) == [
        CommandRefused(SetTelemetryRate.TYPE, RefusalCode.RATE_OUT_OF_RANGE)
    ]
    fw.handle(SetTelemetryRate(20), 1.0)
    assert len(run(fw, 1.0, 2.0)) == 20
    fw.handle(SetTelemetryRate(0), 2.0)
    assert run(fw, 2.0, 3.0) == []  # 0 turns it off


def test_a_late_step_sends_the_timers_samples_up_to_its_fifo() -> None:
    fw = make()
    late = fw.step(0.5)  # half a second late: the last FIFO's worth, the rest skipped
    assert len(late) == TELEMETRY_FIFO
    stamps = [m.device_ms for m in late if isinstance(m, Telemetry)]
    assert [b - a for a, b in itertools.pairwise(stamps)] == [10] * (TELEMETRY_FIFO - 1)
    assert 490 <= stamps[-1] <= 500  # each stamped at its own tick, the last one just past
    # 49 or 50 ticks in all, depending on where in the 10 ms period this pen's clock ticks.
    assert fw.telemetry_skipped + TELEMETRY_FIFO in (49, 50)
    assert 0.5 < fw.next_deadline() <= 0.51 + 1e-9
    assert fw.step(0.502) == []  # nothing new is due until the next tick


def test_lift_off_grace_is_bounded() -> None:
    fw = make()
    assert fw.handle(SetLiftOffGrace(2001), 0.0) == [
        CommandRefused(SetLiftOffGrace.TYPE, RefusalCode.BAD_PAYLOAD)
    ]
    assert fw.lift_off_grace_ms == 300


# --- the motor runs only while armed ----------------------------------------------------------


def test_the_motor_never_runs_unarmed() -> None:
    fw = make()
    ready(fw)
    fw.set_contact(True, 0.0)
    assert fw.press_button(0.0) == []
    assert not fw.running
    tel = of(Telemetry, run(fw, 0.0, 0.5))
    assert tel
    assert all(not m.flags & TelemetryFlag.MOTOR_RUNNING for m in tel)


def test_arming_while_the_button_is_held_does_not_start_the_needle() -> None:
    fw = make()
    ready(fw)
    fw.press_button(0.0)
    arm(fw, 250, 1, 0.01, max_depth=1200)
    assert not fw.running
    fw.release_button(0.02)
    out = fw.press_button(0.03)
    assert [type(m) for m in out] == [MotorStarted]
    assert out[0] == MotorStarted(
        device_ms=30,
        depth_set_um=1000,
        max_depth_um=1200,
        runs=1,
        strokes=0,
        cartridge_id=CARTRIDGE,
        cartridge_strokes=0,
    )


def test_button_release_ends_the_pass_but_not_the_arming() -> None:
    fw = armed_running(lease_ms=2000)
    run(fw, 0.0, 0.5)
    out = fw.release_button(0.5)
    assert len(out) == 1
    stopped = out[0]
    assert isinstance(stopped, MotorStopped)
    assert stopped.reason == StopReason.BUTTON_RELEASED
    assert stopped.device_ms == 500
    assert 45 <= stopped.strokes <= 50  # 100 Hz for 0.5 s, minus spin-up
    assert 990 <= stopped.peak_depth_um <= 1005
    assert fw.armed
    assert [type(m) for m in fw.press_button(0.6)] == [MotorStarted]  # the next pass


# --- the lease ----------------------------------------------------------------------------------


def test_lease_expiry_stops_exactly_at_the_deadline() -> None:
    fw = armed_running(lease_ms=250)
    assert events(run(fw, 0.0, 0.249)) == []
    assert fw.running
    out = events(fw.step(0.25))
    assert [type(m) for m in out] == [MotorStopped, Disarmed]
    (stopped,) = of(MotorStopped, out)
    assert stopped.device_ms == 250
    assert stopped.reason == StopReason.LEASE_EXPIRED
    assert out[1] == Disarmed(StopReason.LEASE_EXPIRED)
    assert not fw.running
    assert not fw.armed
    assert fw.fault is None  # a lease expiry is not a fault: re-arming is a normal arm


def test_lease_expiry_takes_effect_at_the_deadline_even_when_stepped_late() -> None:
    on_time = armed_running(lease_ms=250)
    late = armed_running(lease_ms=250)
    exact = events(on_time.step(0.25))
    lagging = events(late.step(0.7))  # nobody stepped it for 450 ms past the deadline
    assert exact == lagging  # same stamp, same stroke count: the motor stopped at 250 ms
    assert late.next_deadline() > 0.7


def test_renew_extends_the_lease_from_its_arrival() -> None:
    fw = armed_running(lease_ms=250)
    for t in (0.2, 0.4, 0.6):
        assert events(run(fw, t - 0.2, t)) == []
        assert fw.handle(Renew(1), t) == []
    assert events(run(fw, 0.6, 0.849)) == []
    assert [type(m) for m in events(fw.step(0.85))] == [MotorStopped, Disarmed]


def test_renew_with_a_stale_token_is_ignored() -> None:
    fw = armed_running(lease_ms=250, token=5)
    fw.handle(Renew(4), 0.2)
    assert fw.renews_ignored == 1
    out = events(fw.step(0.25))
    assert out[-1] == Disarmed(StopReason.LEASE_EXPIRED)


def test_renew_never_arms() -> None:
    fw = make()
    ready(fw)
    assert fw.handle(Renew(0), 0.0) == []
    assert not fw.armed
    fw = armed_running(lease_ms=250, token=7)
    fw.step(0.25)
    assert not fw.armed
    assert fw.handle(Renew(7), 0.26) == []  # the right token, but the lease is gone
    assert not fw.armed
    fw.release_button(0.27)
    assert fw.press_button(0.28) == []


def test_a_renew_arriving_at_the_deadline_is_too_late() -> None:
    fw = armed_running(lease_ms=250)
    out = fw.handle(Renew(1), 0.25)
    assert out[-1] == Disarmed(StopReason.LEASE_EXPIRED)
    assert not fw.armed


def test_rearming_replaces_the_token_lease_and_limit() -> None:
    fw = make()
    ready(fw)
    arm(fw, 250, 1, 0.0, max_depth=1000)
    arm(fw, 300, 2, 0.1, max_depth=1100)  # armed already, the motor idle: a new arming
    assert fw.status(0.1).token == 2
    assert fw.status(0.1).arm_max_depth_um == 1100
    fw.handle(Renew(1), 0.3)  # the old token no longer counts
    assert fw.renews_ignored == 1
    assert events(fw.step(0.399)) == []  # the new lease: 300 ms from 0.1
    assert events(fw.step(0.4))[-1] == Disarmed(StopReason.LEASE_EXPIRED)


def test_arm_while_the_motor_runs_is_refused() -> None:
    fw = armed_running(lease_ms=250, token=1)
    assert fw.handle(Arm(2000, 2, 1000, CEILING), 0.1) == [
        CommandRefused(Arm.TYPE, RefusalCode.MOTOR_RUNNING)
    ]
    assert fw.running and fw.token == 1  # the pass goes on under the old arming
    assert events(fw.step(0.25))[-1] == Disarmed(StopReason.LEASE_EXPIRED)


# --- host stops --------------------------------------------------------------------------------


def test_stop_stops_and_disarms() -> None:
    fw = armed_running()
    out = fw.handle(Stop(HostStopReason.DEPTH_OVERSHOOT), 0.1)
    assert [type(m) for m in out] == [MotorStopped, Disarmed]
    assert of(MotorStopped, out)[0].reason == StopReason.HOST_STOP
    assert out[1] == Disarmed(StopReason.HOST_STOP)
    assert fw.last_host_stop_reason == HostStopReason.DEPTH_OVERSHOOT
    assert fw.fault is None


def test_disarm_stops_and_disarms() -> None:
    fw = armed_running()
    out = fw.handle(Disarm(), 0.1)
    assert [type(m) for m in out] == [MotorStopped, Disarmed]
    assert out[1] == Disarmed(StopReason.HOST_DISARM)
    assert fw.handle(Disarm(), 0.2) == []  # nothing left to disarm


def test_stop_and_disarm_on_a_disarmed_pen_answer_nothing_and_change_nothing() -> None:
    fw = armed_running(lease_ms=2000)
    fw.inject(Fault(FaultKind.OVER_CURRENT), 0.1)
    assert fw.fault is StopReason.OVER_CURRENT
    before = fw.status(0.2)
    assert fw.handle(Stop(HostStopReason.THERAPIST), 0.2) == []
    assert fw.handle(Disarm(), 0.2) == []
    assert fw.status(0.2) == before  # the latched fault included


# --- faults latch until the host re-arms ---------------------------------------------------------


FAULTS = [
    (Fault(FaultKind.STALL), StopReason.STALL),
    (Fault(FaultKind.OVER_CURRENT), StopReason.OVER_CURRENT),
    (Fault(FaultKind.OVER_TEMPERATURE), StopReason.OVER_TEMPERATURE),
    (Fault(FaultKind.LOW_BATTERY), StopReason.LOW_BATTERY),
    (Fault(FaultKind.CARTRIDGE_PULLED), StopReason.CARTRIDGE_REMOVED),
    (Fault(FaultKind.DEPTH_OVERSHOOT, amount=300), StopReason.DEPTH_CEILING),
]
FAULT_DEPTH = {StopReason.DEPTH_CEILING: 2400}


@pytest.mark.parametrize(("fault", "reason"), FAULTS, ids=[r.name for _, r in FAULTS])
def test_a_fault_stops_disarms_and_latches_until_rearmed(fault: Fault, reason: StopReason) -> None:
    fw = armed_running(lease_ms=2000, depth=FAULT_DEPTH.get(reason, 1000))
    run(fw, 0.0, 0.2)
    out = fw.inject(fault, 0.2) + run(fw, 0.2, 0.5)
    stops = [m for m in out if isinstance(m, MotorStopped)]
    assert [m.reason for m in stops] == [reason]
    # At once, except what physics delays: a stall takes 30 ms to tell apart from a
    # spin-up, an overshoot takes time to drift past the ceiling.
    allowed_ms = {StopReason.STALL: 60, StopReason.DEPTH_CEILING: 150}.get(reason, 0)
    assert 200 <= stops[0].device_ms <= 200 + allowed_ms
    assert Disarmed(reason) in out
    assert fw.fault is reason
    assert fw.status(0.5).fault == reason
    latest = [m for m in out if isinstance(m, Telemetry)][-1]
    assert latest.flags & TelemetryFlag.FAULT_LATCHED
    assert not latest.flags & (TelemetryFlag.ARMED | TelemetryFlag.MOTOR_RUNNING)

    # Stays stopped: pressing again does nothing, with or without a release.
    assert fw.press_button(0.5) == []
    fw.release_button(0.51)
    assert fw.press_button(0.52) == []
    assert fw.fault is reason

    # Remedy the cause (cool down, new battery, cartridge back, actuator fixed)...
    fw.inject(Fault(FaultKind.CLEAR), 0.6)
    if reason is StopReason.CARTRIDGE_REMOVED:
        fw.insert_cartridge(CARTRIDGE + 1, 0.6)
    run(fw, 0.6, 1.0)  # the overshoot drifts back down
    fw.release_button(1.0)
    assert fw.press_button(1.0) == []  # still latched: only the host can re-arm
    fw.release_button(1.0)
    # ...and the host re-arms: the latch clears and the next press runs the needle.
    arm(fw, 250, 2, 1.0)
    assert fw.fault is None
    assert not of(Telemetry, fw.step(1.01))[0].flags & TelemetryFlag.FAULT_LATCHED
    assert [type(m) for m in fw.press_button(1.02)] == [MotorStarted]


def test_cartridge_pulled_stops_disarms_then_reports_the_cartridge() -> None:
    fw = armed_running()
    out = events(run(fw, 0.0, 0.1)) + fw.remove_cartridge(0.1)
    assert [type(m) for m in out] == [MotorStopped, Disarmed, CartridgeRemoved]
    stopped, removed = of(MotorStopped, out)[0], of(CartridgeRemoved, out)[0]
    assert stopped.reason == StopReason.CARTRIDGE_REMOVED
    assert stopped.cartridge_strokes == stopped.strokes > 0  # counted on the cartridge that left
    assert removed == CartridgeRemoved(CARTRIDGE, stopped.cartridge_strokes)
    assert fw.status(0.1).cartridge_id == 0
    assert fw.handle(Arm(250, 3, 1000, CEILING), 0.2) == [
        CommandRefused(Arm.TYPE, RefusalCode.NO_CARTRIDGE)
    ]
    assert fw.insert_cartridge(CARTRIDGE + 1, 0.3) == [CartridgeInserted(CARTRIDGE + 1, 0)]


def test_a_fault_while_disarmed_refuses_the_next_arm_instead() -> None:
    fw = make()
    ready(fw)
    assert fw.inject(Fault(FaultKind.OVER_TEMPERATURE), 0.0) == []
    assert fw.fault is None  # nothing was running: nothing to latch
    assert fw.handle(Arm(250, 1, 1000, CEILING), 0.1) == [
        CommandRefused(Arm.TYPE, RefusalCode.OVER_TEMPERATURE)
    ]


def test_an_injected_stall_waits_for_the_next_run() -> None:
    fw = make()
    ready(fw)
    fw.inject(Fault(FaultKind.STALL), 0.0)
    arm(fw, 1000, 1, 0.0)
    fw.press_button(0.1)
    out = run(fw, 0.1, 0.3)
    assert [m.reason for m in out if isinstance(m, MotorStopped)] == [StopReason.STALL]


def test_still_too_hot_refuses_the_rearm() -> None:
    fw = armed_running(lease_ms=2000)
    fw.inject(Fault(FaultKind.OVER_TEMPERATURE), 0.1)
    assert fw.fault is StopReason.OVER_TEMPERATURE
    assert fw.handle(Arm(250, 2, 1000, CEILING), 0.2) == [
        CommandRefused(Arm.TYPE, RefusalCode.OVER_TEMPERATURE)
    ]
    assert fw.fault is StopReason.OVER_TEMPERATURE  # a refused arm clears nothing


# --- depth ---------------------------------------------------------------------------------------


def test_measured_depth_above_the_ceiling_stops_in_the_same_step() -> None:
    fw = armed_running(lease_ms=2000, depth=2500)
    run(fw, 0.0, 0.2)
    fw.inject(Fault(FaultKind.DEPTH_OVERSHOOT, amount=100), 0.2)
    stepped_at = 0.2
    out: list[Message] = []
    while not out:
        stepped_at += 0.001
        before = fw.physics.depth_um
        out = events(fw.step(stepped_at))
        if not out:
            assert before < 2520 + 2 * fw.physics.config.depth_noise_um
    stopped = out[0]
    assert isinstance(stopped, MotorStopped)
    assert stopped.reason == StopReason.DEPTH_CEILING
    assert stopped.peak_depth_um > 2520
    assert stopped.device_ms == round(stepped_at * 1000)


def test_a_small_overshoot_is_left_to_the_host() -> None:
    fw = armed_running(lease_ms=2000, depth=1000)
    out = fw.inject(Fault(FaultKind.DEPTH_OVERSHOOT, amount=80), 0.0) + run(fw, 0.0, 1.0)
    tel = [m for m in out if isinstance(m, Telemetry)]
    assert events(out) == []  # the pen keeps going: 1080 um is below its ceiling
    assert 1070 <= tel[-1].depth_um <= 1090
    assert tel[-1].depth_set_um == 1000
    assert tel[0].depth_um < tel[30].depth_um  # it drifts in, it does not jump


def test_depth_actuator_lags_the_setpoint() -> None:
    fw = make()
    fw.handle(SetDepth(1000), 0.0)
    tel = [m for m in run(fw, 0.0, 0.2) if isinstance(m, Telemetry)]
    # The pen's samples fall where its own clock ticks; take the first after 20 ms
    # and compare with a 20 ms first-order lag (one time constant: 1 - 1/e of the way).
    first = next(m for m in tel if m.device_ms >= 20)
    expected = 1000 * (1 - math.exp(-first.device_ms / 20))
    assert abs(first.depth_um - expected) <= 35
    assert all(m.depth_um >= 990 for m in tel if m.device_ms >= 100)
    assert all(m.depth_set_um == 1000 for m in tel)


# --- lift-off ------------------------------------------------------------------------------------


def test_a_short_lift_within_the_grace_does_not_stop() -> None:
    fw = armed_running(lease_ms=2000)
    fw.set_contact(False, 0.1)
    assert events(run(fw, 0.1, 0.399)) == []
    fw.set_contact(True, 0.399)
    assert events(run(fw, 0.399, 1.0)) == []
    assert fw.running


def test_lift_off_past_the_grace_stops_the_pass_at_the_grace() -> None:
    fw = armed_running(lease_ms=2000)
    fw.set_contact(False, 0.1)
    out = events(fw.step(0.6))
    assert len(out) == 1
    (stopped,) = of(MotorStopped, out)
    assert stopped.reason == StopReason.LIFT_OFF
    assert stopped.device_ms == 400
    assert fw.armed
    fw.set_contact(True, 0.7)
    assert not fw.running  # the button is still held from the last pass: release first
    fw.release_button(0.8)
    assert [type(m) for m in fw.press_button(0.9)] == [MotorStarted]


def test_lift_off_grace_is_configurable() -> None:
    fw = armed_running(lease_ms=2000)
    fw.handle(SetLiftOffGrace(50), 0.0)
    fw.set_contact(False, 0.1)
    assert events(run(fw, 0.1, 0.149)) == []
    assert [m.device_ms for m in of(MotorStopped, fw.step(0.15))] == [150]


def test_pressing_without_skin_contact_runs_only_for_the_grace() -> None:
    fw = make()
    ready(fw)
    arm(fw, 2000, 1, 0.0)
    fw.press_button(0.0)
    assert fw.running
    out = events(run(fw, 0.0, 0.5))
    assert len(out) == 1
    assert [(m.reason, m.device_ms) for m in of(MotorStopped, out)] == [(StopReason.LIFT_OFF, 300)]


# --- status, reset, physics ----------------------------------------------------------------------


def test_query_status_describes_the_pen() -> None:
    fw = armed_running(lease_ms=250, token=7, max_depth=1100)
    fw.handle(SetSpeed(120), 0.0)
    fw.handle(SetLiftOffGrace(400), 0.0)
    (status,) = fw.handle(QueryStatus(), 0.1)
    assert status == Status(
        flags=int(
            TelemetryFlag.ARMED
            | TelemetryFlag.MOTOR_RUNNING
            | TelemetryFlag.SKIN_CONTACT
            | TelemetryFlag.BUTTON_PRESSED
            | TelemetryFlag.CARTRIDGE_PRESENT
            | TelemetryFlag.DEPTH_SET
        ),
        depth_set_um=1000,
        speed_hz=120,
        cartridge_id=CARTRIDGE,
        fault=0,
        lease_left_ms=150,
        token=7,
        arm_max_depth_um=1100,
        runs=1,
        strokes=fw.strokes,
        cartridge_strokes=fw.strokes,
        telemetry_rate_hz=100,
        lift_off_grace_ms=400,
        device_ms=100,
    )
    assert status.strokes > 0
    fw.handle(Stop(HostStopReason.THERAPIST), 0.1)
    disarmed = fw.status(0.1)
    assert (disarmed.token, disarmed.arm_max_depth_um, disarmed.lease_left_ms) == (0, 0, 0)
    assert disarmed.flags & (TelemetryFlag.ARMED | TelemetryFlag.MOTOR_RUNNING) == 0


def test_lease_left_is_rounded_down() -> None:
    fw = make()
    ready(fw)
    arm(fw, 250, 1, 0.0)
    assert fw.status(0.0995).lease_left_ms == 150  # 150.5 ms left: never claim more


def test_reset_stops_and_asks_for_a_reboot() -> None:
    fw = armed_running()
    out = fw.handle(Reset(), 0.1)
    assert [type(m) for m in out] == [MotorStopped, Disarmed]
    assert out[1] == Disarmed(StopReason.REBOOT)
    assert fw.reset_requested
    fw.reboot(0.2)
    assert not fw.reset_requested
    assert not fw.armed
    assert fw.depth_set_um is None
    assert fw.device_ms(0.3) == 100
    assert fw.cartridge_id == CARTRIDGE  # physical things survive a reboot
    assert fw.strokes == 0  # strokes count since boot


def test_physics_running_heats_drains_and_counts_strokes() -> None:
    fw = armed_running(lease_ms=2000)
    fw.handle(SetSpeed(150), 0.0)
    tel = [m for m in run(fw, 0.0, 1.9, dt=0.01) if isinstance(m, Telemetry)]
    assert tel[-1].strokes == pytest.approx(150 * 1.9, abs=4)
    assert tel[-1].speed_hz == 150
    assert 300 <= tel[-1].current_ma <= 700
    idle = make()
    idle_tel = [m for m in run(idle, 0.0, 1.9, dt=0.01) if isinstance(m, Telemetry)]
    assert idle_tel[-1].current_ma < 50
    assert tel[-1].battery_mv < idle_tel[-1].battery_mv  # same seed, same battery: sag
    assert fw.physics.temperature_c > idle.physics.temperature_c
    assert fw.physics.charge_mah < idle.physics.charge_mah


def test_same_seed_same_readings_other_seed_other_readings() -> None:
    def trace(seed: int) -> list[Message]:
        fw = make(seed)
        ready(fw)
        return run(fw, 0.0, 0.3)

    assert trace(5) == trace(5)
    assert trace(5) != trace(6)


# --- version 2: the arming carries the approved setpoint and the zone's limit ----------------


def _precedence_setup(row: RefusalCode) -> tuple[PenFirmware, Arm]:
    """A pen and an Arm for which ``row`` and as many rows below it as can hold at once
    all refuse: the code answered must be ``row``'s (the table is read top to bottom)."""
    fw = make()
    if row is RefusalCode.MOTOR_RUNNING:
        fw = armed_running(lease_ms=2000)  # rows below it need an idle pen or a cartridge
        return fw, Arm(0, 2, 999, 500)  # bad lease, other setpoint, bad limit as well
    order = list(ARM_REFUSAL_ORDER)
    below = order[order.index(row) :]
    if RefusalCode.LOW_BATTERY in below:
        fw.inject(Fault(FaultKind.LOW_BATTERY), 0.0)
    fw.inject(Fault(FaultKind.OVER_TEMPERATURE), 0.0)  # the last row: always below
    if RefusalCode.NO_CARTRIDGE not in below:
        fw.insert_cartridge(CARTRIDGE, 0.0)
    if RefusalCode.NO_DEPTH not in below:
        fw.handle(SetDepth(800), 0.0)
    lease = 0 if RefusalCode.BAD_LEASE in below else 250
    depth = 900 if RefusalCode.SETPOINT_MISMATCH in below else 800
    limit = 700 if RefusalCode.BAD_LIMIT in below else 1000
    return fw, Arm(lease, 2, depth, limit)


ARM_REFUSAL_ORDER = (
    RefusalCode.MOTOR_RUNNING,
    RefusalCode.BAD_LEASE,
    RefusalCode.NO_CARTRIDGE,
    RefusalCode.NO_DEPTH,
    RefusalCode.SETPOINT_MISMATCH,
    RefusalCode.BAD_LIMIT,
    RefusalCode.LOW_BATTERY,
    RefusalCode.OVER_TEMPERATURE,
)


@pytest.mark.parametrize("row", ARM_REFUSAL_ORDER, ids=lambda r: r.name)
def test_arm_refusals_follow_the_table_top_to_bottom(row: RefusalCode) -> None:
    fw, message = _precedence_setup(row)
    was_armed = fw.armed
    assert fw.handle(message, 0.01) == [CommandRefused(Arm.TYPE, row)]
    assert fw.armed == was_armed


@pytest.mark.parametrize(
    ("depth", "limit", "ok"),
    [(800, 800, True), (800, CEILING, True), (800, 799, False), (800, CEILING + 1, False)],
)
def test_the_arming_limit_lies_between_the_setpoint_and_the_ceiling(
    depth: int, limit: int, ok: bool
) -> None:
    fw = make()
    ready(fw, depth=depth)
    out = fw.handle(Arm(250, 1, depth, limit), 0.0)
    if ok:
        assert isinstance(out[0], Armed) and out[0].max_depth_um == limit
    else:
        assert out == [CommandRefused(Arm.TYPE, RefusalCode.BAD_LIMIT)]


def test_an_arm_must_carry_the_pens_own_setpoint() -> None:
    fw = make()
    ready(fw, depth=800)
    assert fw.handle(Arm(250, 1, 801, 1000), 0.0) == [
        CommandRefused(Arm.TYPE, RefusalCode.SETPOINT_MISMATCH)
    ]
    assert not fw.armed


def test_the_setpoint_cannot_change_under_an_arming() -> None:
    fw = make()
    ready(fw, depth=800)
    arm(fw, 250, 1, 0.0, max_depth=1000)
    assert fw.handle(SetDepth(900), 0.01) == [CommandRefused(SetDepth.TYPE, RefusalCode.ARMED)]
    assert fw.handle(SetDepth(3000), 0.01) == [CommandRefused(SetDepth.TYPE, RefusalCode.ARMED)]
    assert fw.depth_set_um == 800
    assert fw.physics.depth_target_um == 800  # the actuator never aimed elsewhere
    fw.handle(Disarm(), 0.02)
    assert fw.handle(SetDepth(900), 0.03) == []


def test_a_successful_arm_answers_with_the_counters_and_clears_a_latched_fault() -> None:
    fw = armed_running(lease_ms=2000)
    run(fw, 0.0, 0.3)
    fw.inject(Fault(FaultKind.OVER_CURRENT), 0.3)
    assert fw.fault is StopReason.OVER_CURRENT
    armed = arm(fw, 250, 9, 0.4, max_depth=1000)
    assert fw.fault is None
    assert (armed.runs, armed.strokes) == (1, fw.strokes)
    assert (armed.cartridge_id, armed.cartridge_strokes) == (CARTRIDGE, fw.strokes)
    assert armed.strokes > 20


def test_measured_depth_above_the_arming_limit_stops_and_latches() -> None:
    fw = armed_running(lease_ms=2000, depth=1000, max_depth=1000)
    run(fw, 0.0, 0.2)
    assert fw.running
    fw.inject(Fault(FaultKind.DEPTH_OVERSHOOT, amount=100), 0.2)
    out = run(fw, 0.2, 0.8)
    stops = of(MotorStopped, out)
    assert [m.reason for m in stops] == [StopReason.DEPTH_LIMIT]
    assert Disarmed(StopReason.DEPTH_LIMIT) in out
    assert fw.fault is StopReason.DEPTH_LIMIT
    samples = of(Telemetry, out)
    last_running = [m for m in samples if m.flags & TelemetryFlag.MOTOR_RUNNING][-1]
    assert last_running.depth_um <= 1020  # it stopped on the first reading above 1000 + 20
    assert 1020 < stops[0].peak_depth_um <= 1020 + 2 * 2 + 5  # one control step of drift


def test_the_depth_limit_holds_while_armed_even_between_runs() -> None:
    fw = make()
    ready(fw, depth=1000)
    arm(fw, 2000, 1, 0.5, max_depth=1000)
    fw.inject(Fault(FaultKind.DEPTH_OVERSHOOT, amount=100), 0.5)
    out = events(run(fw, 0.5, 1.2))
    assert out == [Disarmed(StopReason.DEPTH_LIMIT)]  # no run, no host: the pen still acts


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
def test_a_healthy_pen_set_exactly_at_the_limit_never_trips(strict: bool) -> None:
    fw = make(seed=3, strict=strict)
    ready(fw, depth=1000)
    run(fw, 0.0, 0.3)  # the actuator settles (it approaches from below)
    arm(fw, 2000, 1, 0.3, max_depth=1000)
    fw.set_contact(True, 0.3)
    fw.press_button(0.3)
    readings: list[int] = []
    t = 0.3
    for _ in range(30):  # 30 renewals: 6 s of running at the limit
        out = run(fw, t, t + 0.2)
        t += 0.2
        fw.handle(Renew(1), t)
        assert events(out) == []
        readings += [m.depth_um for m in of(Telemetry, out)]
    assert fw.running
    assert max(readings) <= 1000 + 20
    if strict:  # the strict pen really uses the declared accuracy, both ways
        assert max(readings) >= 1000 + 17 and min(readings) <= 1000 - 17
    else:
        assert min(readings) >= 995 and max(readings) <= 1002


def test_strict_pen_reports_an_implausible_setpoint_without_depth_set() -> None:
    strict = make(strict=True)
    sample = of(Telemetry, strict.step(0.5))[0]
    assert not sample.flags & TelemetryFlag.DEPTH_SET
    assert sample.depth_set_um == 0xFFFF
    assert strict.status(0.5).depth_set_um == 0xFFFF
    plain = make()
    assert of(Telemetry, plain.step(0.5))[0].depth_set_um == 0
    strict.handle(SetDepth(0), 0.5)  # a setpoint of 0 is a setpoint
    sample = of(Telemetry, strict.step(0.6))[0]
    assert sample.flags & TelemetryFlag.DEPTH_SET and sample.depth_set_um == 0


# --- counters -----------------------------------------------------------------------------------


def _one_run(fw: PenFirmware, start: float, seconds: float) -> tuple[MotorStarted, MotorStopped]:
    fw.handle(Renew(fw.token), start)
    (started,) = fw.press_button(start)
    assert isinstance(started, MotorStarted)
    run(fw, start, start + seconds)
    (stopped,) = events(fw.release_button(start + seconds))
    assert isinstance(stopped, MotorStopped)
    return started, stopped


def test_runs_and_strokes_count_exactly_and_only_while_the_motor_runs() -> None:
    fw = make()
    ready(fw)
    arm(fw, 2000, 1, 0.0)
    fw.set_contact(True, 0.0)
    s1, e1 = _one_run(fw, 0.0, 0.5)
    idle = of(Telemetry, run(fw, 0.5, 0.9))  # the motor spins down: no stroke is counted
    s2, e2 = _one_run(fw, 0.9, 0.3)
    assert (s1.runs, e1.runs, s2.runs, e2.runs) == (1, 1, 2, 2)
    assert s1.strokes == 0 and e1.strokes > 40
    assert {m.strokes for m in idle} == {e1.strokes}
    assert {m.runs for m in idle} == {1}
    assert s2.strokes == e1.strokes  # nothing happened between the runs
    assert counter_diff(e2.strokes, s2.strokes) > 20
    assert e2.cartridge_strokes == e2.strokes  # one cartridge since boot
    status = fw.status(1.3)
    assert (status.runs, status.strokes, status.cartridge_strokes) == (2, e2.strokes, e2.strokes)


def test_the_cartridge_chip_remembers_its_strokes_across_removal_reboot_and_pens() -> None:
    chips: dict[int, int] = {}
    fw = PenFirmware(random.Random(1), 0.0, FirmwareConfig(), cartridge_chips=chips)
    ready(fw)
    arm(fw, 2000, 1, 0.0)
    fw.set_contact(True, 0.0)
    _, first = _one_run(fw, 0.0, 0.4)
    n = first.cartridge_strokes
    assert n == first.strokes > 30
    fw.handle(Disarm(), 0.5)
    assert fw.remove_cartridge(0.5) == [CartridgeRemoved(CARTRIDGE, n)]
    assert fw.insert_cartridge(CARTRIDGE, 0.6) == [CartridgeInserted(CARTRIDGE, n)]
    fw.reboot(0.7)
    assert (fw.strokes, fw.runs, fw.cartridge_strokes) == (0, 0, n)  # the chip, not the pen
    fw.handle(SetDepth(1000), 0.7)
    arm(fw, 2000, 2, 0.7)
    fw.release_button(0.7)
    started, second = _one_run(fw, 0.8, 0.3)
    assert (started.runs, started.strokes, started.cartridge_strokes) == (1, 0, n)
    assert second.cartridge_strokes == n + second.strokes
    fw.handle(Disarm(), 1.2)
    fw.remove_cartridge(1.2)
    other = PenFirmware(random.Random(2), 1.3, FirmwareConfig(), cartridge_chips=chips)
    assert other.insert_cartridge(CARTRIDGE, 1.3) == [
        CartridgeInserted(CARTRIDGE, n + second.strokes)
    ]
    assert other.insert_cartridge(CARTRIDGE + 1, 1.3) == []  # one slot
    other.remove_cartridge(1.4)
    assert other.insert_cartridge(CARTRIDGE + 1, 1.4) == [CartridgeInserted(CARTRIDGE + 1, 0)]


def test_counters_wrap_at_2_to_the_32() -> None:
    fw = make()
    ready(fw)
    fw.cartridge_chips[CARTRIDGE] = 2**32 - 3
    arm(fw, 2000, 1, 0.0)
    fw.runs = 2**32 - 1
    fw.set_contact(True, 0.0)
    started, stopped = _one_run(fw, 0.0, 0.3)
    assert started.runs == 0  # 2**32 runs: wrapped
    assert started.cartridge_strokes == 2**32 - 3
    assert counter_diff(stopped.cartridge_strokes, started.cartridge_strokes) == stopped.strokes
    assert stopped.cartridge_strokes < 100  # wrapped


# --- faults across reboots, the link's rules ---------------------------------------------


def test_a_latched_fault_survives_a_reboot_until_a_successful_arm() -> None:
    fw = armed_running(lease_ms=2000)
    fw.inject(Fault(FaultKind.OVER_CURRENT), 0.1)
    fw.reboot(0.2)
    status = fw.status(0.2)
    assert status.fault == StopReason.OVER_CURRENT
    assert status.flags & TelemetryFlag.FAULT_LATCHED
    assert of(Telemetry, fw.step(0.3))[0].flags & TelemetryFlag.FAULT_LATCHED
    fw.handle(SetDepth(1000), 0.3)
    fw.release_button(0.3)
    arm(fw, 250, 2, 0.3)
    assert fw.status(0.3).fault == 0
    assert [type(m) for m in fw.press_button(0.31)] == [MotorStarted]


def test_a_reset_reports_its_stop_before_the_reboot() -> None:
    fw = armed_running()
    out = fw.handle(Reset(), 0.1)
    assert [(type(m), getattr(m, "reason", None)) for m in out] == [
        (MotorStopped, StopReason.REBOOT),
        (Disarmed, StopReason.REBOOT),
    ]
    assert fw.reset_requested and fw.fault is None  # a reset is not a fault


@pytest.mark.parametrize(
    ("call", "reason"),
    [("link_lost", StopReason.LINK_LOST), ("new_host", StopReason.NEW_HOST)],
)
def test_the_pen_disarms_when_the_link_fails_or_a_new_host_arrives(
    call: str, reason: StopReason
) -> None:
    fw = armed_running(lease_ms=2000)
    out = getattr(fw, call)(0.1)
    assert [type(m) for m in out] == [MotorStopped, Disarmed]
    assert of(MotorStopped, out)[0].reason == reason
    assert out[1] == Disarmed(reason)
    assert fw.fault is None  # not a fault: the host decides what it means
    assert getattr(fw, call)(0.2) == []  # nothing left to stop


def test_a_needle_retracting_after_a_lower_setpoint_is_not_a_fault_and_cannot_start() -> None:
    fw = make()
    ready(fw, depth=1500)
    run(fw, 0.0, 0.5)  # settled at 1.5 mm
    assert fw.handle(SetDepth(500), 0.5) == []
    arm(fw, 2000, 1, 0.501, max_depth=500)  # at once: the needle is still far too deep
    fw.set_contact(True, 0.502)
    assert fw.press_button(0.502) == []  # not in position: the motor does not start
    assert events(run(fw, 0.502, 1.0)) == []  # and retracting is no fault
    assert fw.armed and fw.fault is None
    fw.release_button(1.0)
    assert [type(m) for m in fw.press_button(1.01)] == [MotorStarted]  # in position now


def test_a_needle_that_does_not_come_within_the_limit_stops_when_the_settle_time_ends() -> None:
    fw = make()
    ready(fw, depth=1000)
    fw.inject(Fault(FaultKind.DEPTH_OVERSHOOT, amount=300), 0.0)
    run(fw, 0.0, 1.0)  # the actuator has drifted to about 1.3 mm
    arm(fw, 2000, 1, 1.0, max_depth=1000)
    out = events(run(fw, 1.0, 1.249))
    assert out == []
    assert events(fw.step(1.25)) == [Disarmed(StopReason.DEPTH_LIMIT)]  # 250 ms after the Arm
    assert fw.fault is StopReason.DEPTH_LIMIT
