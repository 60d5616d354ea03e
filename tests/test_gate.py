"""The safety gate: one case per refusal code, fail-closed properties, never modifies."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.policy import load_policy
from controller.safety import (
    ALLOWED,
    GATE_REASONS,
    USABLE_CARTRIDGES,
    Allowed,
    CartridgeStatus,
    GateContext,
    LinkStatus,
    RefusalReason,
    Refused,
    SafetyLimits,
    SessionState,
    ZoneContext,
    check_command,
    format_mm,
)
from firmware_protocol.messages import (
    Arm,
    Disarm,
    Hello,
    HostStopReason,
    Message,
    QueryStatus,
    Renew,
    Reset,
    SetDepth,
    SetLiftOffGrace,
    SetSpeed,
    SetTelemetryRate,
    Stop,
    Telemetry,
)
from simulated_pen.firmware import FirmwareConfig, declared_identity

LIMITS = SafetyLimits.from_policy(load_policy())
FOREHEAD = ZoneContext("forehead", "forehead", max_depth_um=1000, max_passes=3, passes_done=1)


def ready(**changes: Any) -> GateContext:
    """A context in which arming is allowed; each test breaks one thing."""
    base = GateContext(
        limits=LIMITS,
        session_state=SessionState.ACTIVE,
        zone=FOREHEAD,
        depth_setpoint_um=800,
        cartridge_id=42,
        cartridge=CartridgeStatus.FRESH,
        link=LinkStatus.UP,
        lease_token=5,
        pen_confirmed=True,
        pen_depth_set_um=800,
        telemetry_rate_hz=100.0,
    )
    return dataclasses.replace(base, **changes)


ARM = Arm(250, 5, 1000, 1500)

# code -> (context, command, a phrase the therapist must read)
CASES: dict[RefusalReason, list[tuple[GateContext, Message, str]]] = {
    RefusalReason.SESSION_NOT_ACTIVE: [
        (ready(session_state=None), ARM, "No treatment session is open"),
        (ready(session_state=SessionState.CREATED), ARM, "not started yet"),
        (ready(session_state=SessionState.PAUSED), ARM, "paused"),
        (ready(session_state=SessionState.INTERRUPTED), ARM, "connection to the pen was lost"),
        (ready(session_state=SessionState.FAULTED, fault="pen hot"), ARM, "fault: pen hot"),
        (ready(session_state=SessionState.ENDED), SetDepth(500), "has ended"),
    ],
    RefusalReason.LINK_DOWN: [
        (ready(link=LinkStatus.DOWN), ARM, "not connected"),
        (ready(link=LinkStatus.DOWN), SetSpeed(100), "not connected"),
    ],
    RefusalReason.PEN_NOT_VERIFIED: [(ready(link=LinkStatus.REFUSED), ARM, "identity check")],
    RefusalReason.WRONG_PEN: [(ready(link=LinkStatus.FOREIGN), SetDepth(500), "not the pen")],
    RefusalReason.CARTRIDGE_USED_ELSEWHERE: [
        (ready(cartridge=CartridgeStatus.USED_UNKNOWN), ARM, "its chip reports needle strokes")
    ],
    RefusalReason.PEN_STATE_UNCONFIRMED: [
        (ready(pen_confirmed=False), ARM, "has not reported its state"),
    ],
    RefusalReason.DEPTH_NOT_CONFIRMED: [
        (ready(pen_depth_set_um=None), ARM, "has not confirmed the depth of 0.80 mm: it holds no"),
        (ready(pen_depth_set_um=1500), ARM, "it holds 1.50 mm"),
    ],
    RefusalReason.PEN_IMPRECISE: [
        (
            ready(limits=dataclasses.replace(LIMITS, depth_tolerance_um=80)),
            ARM,
            "measures depth to within 0.08 mm; the clinic requires 0.05 mm",
        ),
    ],
    RefusalReason.TELEMETRY_TOO_SLOW: [
        (ready(telemetry_rate_hz=None), ARM, "have not started flowing"),
        (ready(telemetry_rate_hz=5.0), ARM, "sends its depth 5 times a second"),
    ],
    RefusalReason.PEN_ARMED: [
        (ready(armed=True), SetDepth(500), "cannot change under an arming"),
    ],
    RefusalReason.UNEXPECTED_PEN: [
        (
            ready(link=LinkStatus.UNEXPECTED, pen_serial="SIM-0001", expected_serial="PEN-00042"),
            ARM,
            "Pen SIM-0001 is connected where pen PEN-00042 is configured",
        )
    ],
    RefusalReason.FAULT_UNRESOLVED: [(ready(fault="motor stalled"), ARM, "motor stalled")],
    RefusalReason.NO_ZONE_SELECTED: [
        (ready(zone=None), ARM, "No treatment zone"),
        (ready(zone=None), SetDepth(100), "No treatment zone"),
    ],
    RefusalReason.ZONE_PASSES_USED: [
        (
            ready(zone=dataclasses.replace(FOREHEAD, passes_done=3)),
            ARM,
            "All 3 passes allowed on the forehead",
        ),
        (
            ready(zone=dataclasses.replace(FOREHEAD, passes_done=3)),
            Renew(5),
            "All 3 passes",
        ),
    ],
    RefusalReason.NO_CARTRIDGE: [
        (ready(cartridge=CartridgeStatus.ABSENT, cartridge_id=None), ARM, "no cartridge"),
    ],
    RefusalReason.CARTRIDGE_SPENT: [
        (ready(cartridge=CartridgeStatus.SPENT), ARM, "Cartridge 42 was used in a finished"),
    ],
    RefusalReason.CARTRIDGE_OTHER_SESSION: [
        (ready(cartridge=CartridgeStatus.OTHER_SESSION), ARM, "another client"),
    ],
    RefusalReason.NO_DEPTH_SET: [(ready(depth_setpoint_um=None), ARM, "No needle depth")],
    RefusalReason.DEPTH_INVALID: [(ready(), SetDepth(-10), "-0.01 mm is not a needle depth")],
    RefusalReason.DEPTH_ABOVE_ZONE_LIMIT: [
        (ready(), SetDepth(1200), "Depth 1.20 mm is deeper than the forehead allows (1.00 mm)."),
        (ready(depth_setpoint_um=1001), ARM, "deeper than the forehead allows"),
    ],
    RefusalReason.DEPTH_ABOVE_CEILING: [
        (
            ready(limits=dataclasses.replace(LIMITS, device_ceiling_um=800)),
            SetDepth(900),
            "beyond this pen's maximum (0.80 mm)",
        ),
    ],
    RefusalReason.PEN_RUNNING: [(ready(motor_running=True), SetDepth(500), "running")],
    RefusalReason.SPEED_OUT_OF_RANGE: [
        (ready(), SetSpeed(49), "49 Hz is outside the allowed 50 to 150 Hz"),
        (ready(), SetSpeed(151), "151 Hz"),
    ],
    RefusalReason.BAD_LEASE: [
        (ready(), Arm(0, 5, 1000, 1500), "lease of 0 ms"),
        (ready(), Arm(501, 5, 1000, 1500), "at most 500 ms"),
    ],
    RefusalReason.STALE_LEASE: [
        (ready(), Renew(6), "not armed under this lease"),
        (ready(lease_token=None), Renew(5), "not armed under this lease"),
    ],
    RefusalReason.LIFT_OFF_GRACE_TOO_LONG: [(ready(), SetLiftOffGrace(301), "301 ms")],
    RefusalReason.TELEMETRY_RATE_TOO_LOW: [(ready(), SetTelemetryRate(99), "99 Hz is too slow")],
    RefusalReason.PEN_IN_USE: [
        (ready(), Reset(), "cannot be restarted"),
        (ready(session_state=None, motor_running=True), Reset(), "cannot be restarted"),
    ],
    RefusalReason.NOT_A_HOST_COMMAND: [
        (ready(), Hello(1, 2), "Hello is not a command"),
        (ready(), Telemetry(0, 0, 0, 0, 0, 0, 0, 0, 0, 0), "Telemetry is not a command"),
    ],
}

FLAT_CASES = [
    pytest.param(code, ctx, command, phrase, id=f"{code}-{i}")
    for code, cases in CASES.items()
    for i, (ctx, command, phrase) in enumerate(cases)
]


def test_every_gate_refusal_code_has_a_case() -> None:
    assert set(CASES) == GATE_REASONS


@pytest.mark.parametrize(("code", "ctx", "command", "phrase"), FLAT_CASES)
def test_refusal(code: RefusalReason, ctx: GateContext, command: Message, phrase: str) -> None:
    decision = check_command(ctx, command)
    assert isinstance(decision, Refused), decision
    assert decision.code is code
    assert phrase in decision.message
    assert decision.message.endswith(".")
    assert decision.remediation.strip() and decision.remediation.endswith(".")


def test_the_briefs_example_wording() -> None:
    decision = check_command(ready(), SetDepth(1200))
    assert decision == Refused(
        RefusalReason.DEPTH_ABOVE_ZONE_LIMIT,
        "Depth 1.20 mm is deeper than the forehead allows (1.00 mm).",
        "Choose 1.00 mm or less, or ask a manager for an override.",
    )


@pytest.mark.parametrize(
    "command",
    [
        ARM,
        Renew(5),
        SetDepth(0),
        SetDepth(1000),
        SetSpeed(50),
        SetSpeed(150),
        SetLiftOffGrace(300),
        SetTelemetryRate(100),
        QueryStatus(),
        Stop(HostStopReason.THERAPIST),
        Disarm(),
    ],
)
def test_a_ready_context_allows_every_command(command: Message) -> None:
    assert check_command(ready(), command) is ALLOWED


def test_housekeeping_reaches_a_foreign_pen_but_treatment_does_not() -> None:
    foreign = ready(link=LinkStatus.FOREIGN)
    for command in (SetSpeed(100), QueryStatus(), SetTelemetryRate(100), SetLiftOffGrace(100)):
        assert check_command(foreign, command) is ALLOWED
    for command in (ARM, Renew(5), SetDepth(100)):
        decision = check_command(foreign, command)
        assert isinstance(decision, Refused)
        assert decision.code is RefusalReason.WRONG_PEN


def test_reset_is_allowed_only_when_no_session_uses_the_pen() -> None:
    assert check_command(ready(session_state=None), Reset()) is ALLOWED
    assert check_command(ready(session_state=SessionState.ENDED), Reset()) is ALLOWED


def test_checks_run_most_fundamental_first() -> None:
    everything_wrong = ready(
        session_state=SessionState.PAUSED,
        link=LinkStatus.DOWN,
        fault="hot",
        zone=None,
        cartridge=CartridgeStatus.SPENT,
        depth_setpoint_um=None,
        pen_confirmed=False,
        telemetry_rate_hz=None,
    )
    order = []
    ctx = everything_wrong
    for fix in (
        {"session_state": SessionState.ACTIVE},
        {"link": LinkStatus.UP},
        {"fault": None},
        {"zone": FOREHEAD},
        {"cartridge": CartridgeStatus.FRESH},
        {"depth_setpoint_um": 800},
        {"pen_confirmed": True},
        {"telemetry_rate_hz": 100.0},
    ):
        decision = check_command(ctx, ARM)
        assert isinstance(decision, Refused)
        order.append(decision.code)
        ctx = dataclasses.replace(ctx, **fix)
    assert check_command(ctx, ARM) is ALLOWED
    assert order == [
        RefusalReason.SESSION_NOT_ACTIVE,
        RefusalReason.LINK_DOWN,
        RefusalReason.FAULT_UNRESOLVED,
        RefusalReason.NO_ZONE_SELECTED,
        RefusalReason.CARTRIDGE_SPENT,
        RefusalReason.NO_DEPTH_SET,
        RefusalReason.PEN_STATE_UNCONFIRMED,
        RefusalReason.TELEMETRY_TOO_SLOW,
    ]


@pytest.mark.parametrize(
    ("um", "text"),
    [(1200, "1.20 mm"), (1000, "1.00 mm"), (750, "0.75 mm"), (1205, "1.205 mm"), (0, "0.00 mm")],
)
def test_format_mm(um: int, text: str) -> None:
    assert format_mm(um) == text


# --- properties over random contexts ---------------------------------------------------

zones = st.builds(
    ZoneContext,
    zone_id=st.just("cheeks"),
    label=st.just("cheeks"),
    max_depth_um=st.integers(1, 2500),
    max_passes=st.integers(1, 8),
    passes_done=st.integers(0, 9),
    puncture_budget=st.none() | st.integers(1, 100),
    overridden=st.booleans(),
)
_bare_contexts = st.builds(
    GateContext,
    limits=st.builds(
        SafetyLimits,
        device_ceiling_um=st.integers(500, 2500),
        depth_tolerance_um=st.just(50),
        max_depth_accuracy_um=st.sampled_from([25, 50, 100]),
        min_telemetry_rate_hz=st.just(50),
        min_speed_hz=st.just(50),
        max_speed_hz=st.just(150),
        max_lease_ms=st.just(500),
        lift_off_grace_ms=st.just(300),
        telemetry_rate_hz=st.just(100),
    ),
    session_state=st.none() | st.sampled_from(SessionState),
    zone=st.none() | zones,
    depth_setpoint_um=st.none() | st.integers(-100, 3000),
    cartridge_id=st.none() | st.integers(1, 5),
    cartridge=st.sampled_from(CartridgeStatus),
    link=st.sampled_from(LinkStatus),
    fault=st.none() | st.just("a fault"),
    motor_running=st.booleans(),
    lease_token=st.none() | st.integers(1, 3),
    pass_start_strokes=st.none() | st.integers(0, 10),
)


def _with_pen_reports(
    ctx: GateContext, confirmed: bool, held: str, other: int, rate: float | None
) -> GateContext:
    """What the pen confirmed: often exactly the approved setpoint, sometimes not."""
    pen_depth = {"approved": ctx.depth_setpoint_um, "none": None, "other": other}[held]
    return dataclasses.replace(
        ctx, pen_confirmed=confirmed, pen_depth_set_um=pen_depth, telemetry_rate_hz=rate
    )


_random_contexts = st.builds(
    _with_pen_reports,
    _bare_contexts,
    st.booleans(),
    st.sampled_from(["approved", "approved", "none", "other"]),
    st.integers(-100, 3000),
    st.none() | st.sampled_from([10.0, 49.9, 50.0, 100.0]),
)


@st.composite
def _ready_contexts(draw: st.DrawFn) -> GateContext:
    """A pen that may arm (every §4.1 condition holds), with none, one or two of the
    conditions then spoiled: random contexts almost never reach the boundary."""
    ctx = draw(_bare_contexts)
    max_passes = draw(st.integers(1, 8))
    zone = ZoneContext(
        "cheeks",
        "cheeks",
        max_depth_um=draw(st.integers(1, 2500)),
        max_passes=max_passes,
        passes_done=draw(st.integers(0, max_passes - 1)),
        puncture_budget=draw(st.none() | st.integers(1, 100)),
        overridden=draw(st.booleans()),
    )
    ceiling = min(zone.max_depth_um, ctx.limits.device_ceiling_um)
    setpoint = draw(st.integers(0, ceiling))
    ctx = dataclasses.replace(
        ctx,
        limits=dataclasses.replace(
            ctx.limits, max_depth_accuracy_um=draw(st.sampled_from([50, 100]))
        ),
        session_state=SessionState.ACTIVE,
        link=LinkStatus.UP,
        fault=None,
        zone=zone,
        cartridge=draw(st.sampled_from(sorted(USABLE_CARTRIDGES))),
        depth_setpoint_um=setpoint,
        pen_confirmed=True,
        pen_depth_set_um=setpoint,
        telemetry_rate_hz=draw(st.sampled_from([50.0, 100.0])),
    )
    spoilers = {
        "paused": {"session_state": SessionState.PAUSED},
        "link down": {"link": LinkStatus.DOWN},
        "faulted": {"fault": "a fault"},
        "passes used": {"zone": dataclasses.replace(zone, passes_done=max_passes)},
        "cartridge spent": {"cartridge": CartridgeStatus.SPENT},
        "no setpoint": {"depth_setpoint_um": None},
        "too deep": {"depth_setpoint_um": ceiling + 1},
        "unconfirmed": {"pen_confirmed": False},
        "pen holds another depth": {"pen_depth_set_um": setpoint + 10},
        "imprecise": {"limits": dataclasses.replace(ctx.limits, max_depth_accuracy_um=25)},
        "slow telemetry": {"telemetry_rate_hz": 49.9},
        "no telemetry": {"telemetry_rate_hz": None},
    }
    for name in draw(st.lists(st.sampled_from(sorted(spoilers)), max_size=2, unique=True)):
        ctx = dataclasses.replace(ctx, **spoilers[name])
    return ctx


contexts = _random_contexts | _ready_contexts()


def _may_arm(ctx: GateContext) -> bool:
    """product.md §4.1, written out independently of the gate."""
    zone = ctx.zone
    return (
        ctx.session_state is SessionState.ACTIVE
        and ctx.link is LinkStatus.UP
        and ctx.fault is None
        and zone is not None
        and zone.passes_done < zone.max_passes
        and ctx.cartridge in USABLE_CARTRIDGES
        and ctx.depth_setpoint_um is not None
        and 0 <= ctx.depth_setpoint_um <= min(zone.max_depth_um, ctx.limits.device_ceiling_um)
        # Issue 11: from what the pen confirmed and what was measured of it.
        and ctx.pen_confirmed
        and ctx.pen_depth_set_um == ctx.depth_setpoint_um
        and ctx.limits.depth_tolerance_um <= ctx.limits.max_depth_accuracy_um
        and ctx.telemetry_rate_hz is not None
        and ctx.telemetry_rate_hz >= ctx.limits.min_telemetry_rate_hz
    )


@settings(max_examples=400, deadline=None)
@given(ctx=contexts, lease=st.integers(-1, 2000))
def test_arm_is_allowed_exactly_when_section_4_1_holds(ctx: GateContext, lease: int) -> None:
    decision = check_command(ctx, Arm(lease, 1, 1000, 1500))
    expected = _may_arm(ctx) and 0 < lease <= ctx.limits.max_lease_ms
    assert isinstance(decision, Allowed) == expected, (ctx, decision)
    if isinstance(decision, Refused):
        assert decision.message and decision.remediation


@settings(max_examples=300, deadline=None)
@given(ctx=contexts, token=st.integers(1, 3))
def test_renew_is_allowed_only_for_the_current_lease_while_arming_is(
    ctx: GateContext, token: int
) -> None:
    allowed = isinstance(check_command(ctx, Renew(token)), Allowed)
    assert allowed == (_may_arm(ctx) and ctx.lease_token == token)


@settings(max_examples=300, deadline=None)
@given(ctx=contexts, depth=st.integers(-500, 5000))
def test_set_depth_is_never_clamped_and_never_above_a_limit(ctx: GateContext, depth: int) -> None:
    command = SetDepth(depth)
    decision = check_command(ctx, command)
    assert command == SetDepth(depth)  # untouched
    if isinstance(decision, Allowed):
        assert ctx.zone is not None
        assert 0 <= depth <= ctx.zone.max_depth_um
        assert depth <= ctx.limits.device_ceiling_um
        assert ctx.session_state is SessionState.ACTIVE and ctx.link is LinkStatus.UP
        assert not ctx.motor_running


@settings(max_examples=200, deadline=None)
@given(ctx=contexts, reason=st.sampled_from(HostStopReason))
def test_stop_and_disarm_are_always_allowed(ctx: GateContext, reason: HostStopReason) -> None:
    assert check_command(ctx, Stop(reason)) is ALLOWED
    assert check_command(ctx, Disarm()) is ALLOWED


def test_device_messages_are_never_commands() -> None:
    identity = declared_identity(FirmwareConfig(), serial="PEN", boot_id=1)
    decision = check_command(ready(), identity)
    assert isinstance(decision, Refused)
    assert decision.code is RefusalReason.NOT_A_HOST_COMMAND
