"""The telemetry monitor: given a context and one Telemetry sample, stop now or not.

Pure and stateless, so it can run on every sample (100 Hz per pen) in the same
event-loop turn that received it (product.md §10 measures that path). Only a
running needle is judged: while the motor is idle the measured depth is the
actuator's position, not a puncture, and a stale deeper setpoint left over from
the previous zone must not trigger a stop during a zone change.

A sample is a reason to stop at once when the needle is running and:

1. there is no zone or no approved depth setpoint for it -> ``FAULT``, unless the
   controller's own Stop is on its way (see 4);
2. the measured depth is above the zone's effective limit by more than the pen's
   declared accuracy -> ``DEPTH_OVERSHOOT``;
3. the measured depth is above the approved setpoint by more than the pen's
   declared accuracy -> ``DEPTH_OVERSHOOT``;
4. the session is not active, or has an unresolved fault -> ``FAULT``; unless the
   controller's own Stop is on its way and not yet confirmed: the pen sends every
   frame after applying a Stop, so a running sample before the confirmation was
   taken before the Stop landed (a pause mid-pass), and is no reason to fault.
   Should the pen run on once it confirmed the Stop, the registry faults it.
   Rules 1 and 4 go by the sample's own MOTOR_RUNNING flag, not by the MotorStarted
   last heard: once a Stop is confirmed, a sample showing the motor idle is the
   pen's word that it stopped, even if its MotorStopped was lost and is yet to come
   again (judged by our belief, such a sample faulted the session a second time,
   "running without an approved setting");
5. the pen's own setpoint is deeper than the zone allows (the pen disagrees
   with what was approved) -> ``FAULT``;
6. the pen's measured telemetry rate fell below the policy's minimum -> ``FAULT``;
7. the strokes of this pass reached the zone's puncture budget (compared modulo
   2**32, as the counter wraps) -> ``PUNCTURE_BUDGET``.

The caller sends ``Stop(decision.reason)`` on *every* breaching sample (a Stop
is idempotent and cheap), and records the decision once per stop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from firmware_protocol.messages import (
    HostStopReason,
    Stop,
    Telemetry,
    TelemetryFlag,
    counter_diff,
)

from .context import GateContext, SessionState
from .gate import format_mm


@dataclass(frozen=True, slots=True)
class StopDecision:
    """Stop the needle now. ``message``/``remediation`` are for the audit log and tablet."""

    reason: HostStopReason
    message: str
    remediation: str
    details: Mapping[str, Any] = field(default_factory=dict)
    #: True when the stop means something went wrong (it faults the session);
    #: False for a normal end of pass such as the puncture budget.
    is_fault: bool = True

    @property
    def command(self) -> Stop:
        return Stop(int(self.reason))


def check_telemetry(ctx: GateContext, sample: Telemetry) -> StopDecision | None:
    """A StopDecision when the sample breaches a limit (see the module docstring), else None."""
    says_running = bool(sample.flags & TelemetryFlag.MOTOR_RUNNING)
    if not (ctx.motor_running or says_running):
        return None
    # Rules 1 and 4 (a run with no approval) go by the pen's own word, and wait while
    # our Stop is on its way; see the module docstring.
    judge_unapproved = says_running and not ctx.stop_sent
    details: dict[str, Any] = {
        "depth_um": sample.depth_um,
        "pen_depth_set_um": sample.depth_set_um,
        "strokes": sample.strokes,
        "device_ms": sample.device_ms,
    }
    zone = ctx.zone
    setpoint = ctx.depth_setpoint_um
    if zone is None or setpoint is None:
        return _unapproved(details) if judge_unapproved else None
    details.update(
        zone_id=zone.zone_id,
        zone_limit_um=zone.max_depth_um,
        setpoint_um=setpoint,
        tolerance_um=ctx.limits.depth_tolerance_um,
    )
    tolerance = ctx.limits.depth_tolerance_um
    # Depth first: the most specific reason, even when the session is no longer active.
    # A reading counts as deeper only beyond the pen's declared accuracy, so a healthy pen
    # set exactly at the zone's limit completes its passes (product.md §4.2).
    if sample.depth_um > zone.max_depth_um + tolerance:
        return StopDecision(
            HostStopReason.DEPTH_OVERSHOOT,
            f"The needle reached {format_mm(sample.depth_um)}, deeper than the {zone.label} "
            f"allows ({format_mm(zone.max_depth_um)}, and the pen measures to within "
            f"{format_mm(tolerance)}). The needle was stopped.",
            "Inspect the client's skin and the pen. Do not continue with this pen until it "
            "has been checked; acknowledge the fault to continue.",
            details,
        )
    allowed = setpoint + tolerance
    if sample.depth_um > allowed:
        return StopDecision(
            HostStopReason.DEPTH_OVERSHOOT,
            f"The needle reached {format_mm(sample.depth_um)}, more than the set "
            f"{format_mm(setpoint)} allows ({format_mm(allowed)} with the pen's accuracy). "
            "The needle was stopped.",
            "Inspect the client's skin and the pen, then acknowledge the fault to continue.",
            details,
        )
    if ctx.session_state is not SessionState.ACTIVE or ctx.fault is not None:
        return _unapproved(details) if judge_unapproved else None
    if sample.depth_set_um > zone.max_depth_um:
        return StopDecision(
            HostStopReason.FAULT,
            f"The pen is set to {format_mm(sample.depth_set_um)}, deeper than the {zone.label} "
            f"allows ({format_mm(zone.max_depth_um)}). The needle was stopped.",
            "Set the depth again for this zone; if it happens again, stop using this pen.",
            details,
        )
    rate = ctx.telemetry_rate_hz
    if rate is not None and rate < ctx.limits.min_telemetry_rate_hz:
        details["telemetry_rate_hz"] = round(rate, 1)
        return StopDecision(
            HostStopReason.FAULT,
            f"The pen's depth measurements slowed to {rate:.0f} a second (at least "
            f"{ctx.limits.min_telemetry_rate_hz} are needed to watch the needle). "
            "The needle was stopped.",
            "Check the pen's connection; if it repeats, use another pen.",
            details,
        )
    budget = zone.puncture_budget
    start = ctx.pass_start_strokes
    if budget is not None and start is not None:
        done = counter_diff(sample.strokes, start)  # the counter wraps at 2**32
        if done >= budget:
            details.update(pass_strokes=done, puncture_budget=budget)
            return StopDecision(
                HostStopReason.PUNCTURE_BUDGET,
                f"This pass reached the {zone.label}'s puncture budget of {budget} strokes; "
                "the pass was ended.",
                "Continue with the next pass if passes are left.",
                details,
                is_fault=False,
            )
    return None


def _unapproved(details: Mapping[str, Any]) -> StopDecision:
    return StopDecision(
        HostStopReason.FAULT,
        "The needle was running without an approved treatment setting.",
        "Check the pen and the session; start or resume the session and arm again.",
        details,
    )
