"""The telemetry monitor: overshoot, puncture budget, and running without approval."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.policy import load_policy
from controller.safety import (
    CartridgeStatus,
    GateContext,
    LinkStatus,
    SafetyLimits,
    SessionState,
    ZoneContext,
    check_telemetry,
)
from firmware_protocol.messages import HostStopReason, Stop, Telemetry, TelemetryFlag

LIMITS = SafetyLimits.from_policy(load_policy())  # tolerance 50 µm
CHEEKS = ZoneContext("cheeks", "cheeks", max_depth_um=1500, max_passes=4, passes_done=0)


def running(**changes: object) -> GateContext:
    base = GateContext(
        limits=LIMITS,
        session_state=SessionState.ACTIVE,
        zone=CHEEKS,
        depth_setpoint_um=1000,
        cartridge_id=1,
        cartridge=CartridgeStatus.THIS_SESSION,
        link=LinkStatus.UP,
        motor_running=True,
        lease_token=1,
        pass_start_strokes=100,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def sample(depth: int, *, pen_set: int = 1000, strokes: int = 150, run: bool = True) -> Telemetry:
    flags = TelemetryFlag.ARMED | (TelemetryFlag.MOTOR_RUNNING if run else 0)
    return Telemetry(1234, pen_set, depth, 120, 300, 3000, 3900, strokes, int(flags), 1)


def test_within_setpoint_and_tolerance_is_fine() -> None:
    assert check_telemetry(running(), sample(1000)) is None
    assert check_telemetry(running(), sample(1050)) is None  # exactly setpoint + tolerance


def test_above_setpoint_plus_tolerance_is_an_overshoot() -> None:
    decision = check_telemetry(running(), sample(1051))
    assert decision is not None
    assert decision.reason is HostStopReason.DEPTH_OVERSHOOT
    assert decision.command == Stop(HostStopReason.DEPTH_OVERSHOOT)
    assert decision.is_fault
    assert "1.051 mm" in decision.message and "1.05 mm with the pen's accuracy" in decision.message
    assert decision.remediation
    assert decision.details["depth_um"] == 1051
    assert decision.details["setpoint_um"] == 1000


def test_set_exactly_at_the_zone_limit_a_healthy_pen_is_not_stopped() -> None:
    # Product.md §4.2: readings within the pen's declared accuracy of the limit are noise.
    ctx = running(depth_setpoint_um=1500)
    for depth in (1480, 1500, 1530, 1550):
        assert check_telemetry(ctx, sample(depth, pen_set=1500)) is None, depth


def test_beyond_the_zone_limit_by_more_than_the_accuracy_is_an_overshoot() -> None:
    ctx = running(depth_setpoint_um=1500)
    decision = check_telemetry(ctx, sample(1551, pen_set=1500))
    assert decision is not None
    assert decision.reason is HostStopReason.DEPTH_OVERSHOOT
    assert "deeper than the cheeks allows (1.50 mm" in decision.message
    assert "measures to within 0.05 mm" in decision.message


def test_a_pen_sending_too_few_samples_is_stopped_mid_pass() -> None:
    decision = check_telemetry(running(telemetry_rate_hz=5.0), sample(1000))
    assert decision is not None and decision.reason is HostStopReason.FAULT
    assert "slowed to 5 a second" in decision.message
    assert check_telemetry(running(telemetry_rate_hz=60.0), sample(1000)) is None


def test_the_budget_is_counted_across_the_stroke_counter_wrapping() -> None:
    ctx = running(
        zone=dataclasses.replace(CHEEKS, puncture_budget=100), pass_start_strokes=2**32 - 60
    )
    assert check_telemetry(ctx, sample(1000, strokes=2**32 - 1)) is None  # 59 strokes
    decision = check_telemetry(ctx, sample(1000, strokes=39))  # wrapped: 99 strokes
    assert decision is None
    decision = check_telemetry(ctx, sample(1000, strokes=40))  # 100 strokes
    assert decision is not None and decision.reason is HostStopReason.PUNCTURE_BUDGET
    assert decision.details["pass_strokes"] == 100


def test_pen_setpoint_deeper_than_the_zone_is_a_fault_stop() -> None:
    decision = check_telemetry(running(), sample(900, pen_set=1600))
    assert decision is not None
    assert decision.reason is HostStopReason.FAULT


def test_puncture_budget_ends_the_pass_without_a_fault() -> None:
    ctx = running(zone=dataclasses.replace(CHEEKS, puncture_budget=50))
    assert check_telemetry(ctx, sample(1000, strokes=149)) is None
    decision = check_telemetry(ctx, sample(1000, strokes=150))
    assert decision is not None
    assert decision.reason is HostStopReason.PUNCTURE_BUDGET
    assert not decision.is_fault
    assert decision.details["pass_strokes"] == 50


def test_an_idle_needle_is_not_judged() -> None:
    # While idle the measured depth is the actuator position (e.g. a stale setpoint).
    assert check_telemetry(running(motor_running=False), sample(2400, run=False)) is None


@pytest.mark.parametrize(
    "ctx",
    [
        running(session_state=SessionState.PAUSED),
        running(session_state=None, zone=None, depth_setpoint_um=None),
        running(zone=None),
        running(depth_setpoint_um=None),
        running(fault="stall"),
    ],
)
def test_running_without_approval_is_stopped(ctx: GateContext) -> None:
    decision = check_telemetry(ctx, sample(500))
    assert decision is not None
    assert decision.reason is HostStopReason.FAULT


@pytest.mark.parametrize(
    "ctx",
    [
        running(session_state=SessionState.PAUSED, stop_sent=True),
        running(session_state=None, zone=None, depth_setpoint_um=None, stop_sent=True),
        running(fault="stall", stop_sent=True),
    ],
)
def test_a_sample_taken_before_our_stop_landed_is_no_fault(ctx: GateContext) -> None:
    # Paused mid-pass: the Stop is on its way, and the pen's frames sent before it
    # applied it still show the run the controller approved. Found by the state machine.
    assert check_telemetry(ctx, sample(500)) is None


def test_while_our_stop_is_on_its_way_depth_is_still_judged() -> None:
    ctx = running(session_state=SessionState.PAUSED, stop_sent=True)
    decision = check_telemetry(ctx, sample(1051))
    assert decision is not None and decision.reason is HostStopReason.DEPTH_OVERSHOOT


def test_the_running_flag_alone_is_enough() -> None:
    ctx = running(motor_running=False)  # the controller has not seen MotorStarted yet
    decision = check_telemetry(ctx, sample(1200))
    assert decision is not None and decision.reason is HostStopReason.DEPTH_OVERSHOOT


@settings(max_examples=400, deadline=None)
@given(
    limit=st.integers(100, 2500),
    setpoint=st.integers(0, 2500),
    depth=st.integers(0, 3000),
    tolerance=st.integers(0, 500),
)
def test_overshoot_always_stops(limit: int, setpoint: int, depth: int, tolerance: int) -> None:
    ctx = running(
        limits=dataclasses.replace(LIMITS, depth_tolerance_um=tolerance),
        zone=dataclasses.replace(CHEEKS, max_depth_um=limit),
        depth_setpoint_um=min(setpoint, limit),
    )
    decision = check_telemetry(ctx, sample(depth, pen_set=min(setpoint, limit)))
    breach = depth > limit + tolerance or depth > min(setpoint, limit) + tolerance
    assert (decision is not None) == breach
    if decision is not None:
        assert decision.reason is HostStopReason.DEPTH_OVERSHOOT
