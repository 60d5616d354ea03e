"""The registry's state, as plain serialisable records (pydantic v2 models).

Everything the registry knows lives in these models, so ``model_dump(mode="json")``
is the whole state and ``model_validate`` restores it exactly. Validation on
restore is strict (``extra="forbid"``): a journal that does not fit fails to
load rather than being half-understood.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from controller.safety.context import LinkStatus, SessionState

from .states import ArmState


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class ZoneOverride(_Record):
    """A manager's limits for one zone in one session (product.md §4.4)."""

    max_depth_um: int
    max_passes: int
    manager_id: str
    reason: str
    at: float


class ZoneProgress(_Record):
    """One zone of the session's plan: the policy's limits when the session was
    created (a later policy change does not move limits under a live session),
    any override, and the passes done."""

    zone_id: str
    label: str
    policy_max_depth_um: int
    policy_max_passes: int
    puncture_budget: int | None = None
    passes_done: int = 0
    override: ZoneOverride | None = None

    @property
    def max_depth_um(self) -> int:
        return self.override.max_depth_um if self.override else self.policy_max_depth_um

    @property
    def max_passes(self) -> int:
        return self.override.max_passes if self.override else self.policy_max_passes


class PassRecord(_Record):
    """One run of the needle in a zone, motor start to stop (product.md §4.3)."""

    zone_id: str
    number: int  # 1-based within the zone
    cartridge_id: int | None
    depth_setpoint_um: int | None
    started_at: float
    start_strokes: int
    #: The pen's run counter for this run (MotorStarted.runs); None for passes recorded
    #: before protocol v2 or recovered without one.
    run: int | None = None
    #: True when the controller never heard the run and counted it from the pen's
    #: counters after an outage (product.md §4.9).
    recovered: bool = False
    ended_at: float | None = None
    strokes: int | None = None
    peak_depth_um: int | None = None
    end_reason: str | None = None


class FaultRecord(_Record):
    kind: str
    detail: str
    at: float


class Session(_Record):
    """One client's treatment on one pen."""

    session_id: str
    port: str
    client_ref: str
    therapist_id: str
    plan_id: str
    policy_fingerprint: str
    state: SessionState = SessionState.CREATED
    created_at: float
    started_at: float | None = None
    ended_at: float | None = None
    # The pen the session is bound to, from START (boot id rebound on acknowledging a reboot).
    pen_serial: str | None = None
    pen_boot_id: int | None = None
    zones: dict[str, ZoneProgress]
    current_zone: str | None = None
    depth_setpoint_um: int | None = None  # approved for current_zone; cleared on zone change
    speed_hz: int | None = None
    current_pass: PassRecord | None = None
    passes: list[PassRecord] = []
    fault: FaultRecord | None = None
    cartridges_used: list[int] = []
    refusals: int = 0


class ArmingRecord(_Record):
    """One Arm the controller approved: for which session and zone, at what depth."""

    session_id: str
    zone_id: str
    token: int
    depth_um: int
    limit_um: int


class DepartedPen(_Record):
    """What the controller knew of a pen that left its port for another pen: kept by
    serial, so that when it comes back (here or on another port) the runs it made while
    nobody listened are still counted from its counters."""

    boot_id: int | None = None
    runs_counted: int | None = None
    strokes_seen: int | None = None
    arming: ArmingRecord | None = None
    cartridge_id: int | None = None
    cartridge_strokes: int | None = None


class PenState(_Record):
    """What the controller knows about the pen on one port.

    Facts the pen has *confirmed* are kept apart from what the controller sent:
    ``depth_set_um`` is the setpoint the pen acknowledged or reported, never the
    one a command merely carried; ``confirmed`` says the pen has reported its whole
    state (Status) since the link came up. Until then nothing may be armed.
    """

    port: str
    # DOWN, UP or REFUSED; FOREIGN is the gate's judgement against a session, never stored.
    link: LinkStatus = LinkStatus.DOWN
    serial: str | None = None
    boot_id: int | None = None
    firmware: str | None = None
    max_depth_um: int | None = None
    max_lease_ms: int | None = None
    #: The pen's declared depth accuracy (Identity): the monitor's tolerance.
    depth_accuracy_um: int | None = None
    #: The pen's declared stroke-rate range and fastest telemetry (Identity).
    min_speed_hz: int | None = None
    max_speed_hz: int | None = None
    max_telemetry_rate_hz: int | None = None
    cartridge_id: int | None = None
    #: What the inserted cartridge's chip reports it has done (strokes), last heard.
    cartridge_strokes: int | None = None
    arm: ArmState = ArmState.DISARMED
    lease_token: int | None = None
    motor_running: bool = False
    # A Stop/Disarm is on its way: do not record the same stop again on every sample.
    stopping: bool = False
    #: The pen reported its state (Status) since the link came up.
    confirmed: bool = False
    #: The pen's own device clock when it did (Status.device_ms): older samples predate it.
    confirmed_at_ms: int | None = None
    #: The setpoint the pen confirmed (SetDepth acknowledged, Status, Armed); None: unknown.
    depth_set_um: int | None = None
    #: A SetDepth sent and not yet acknowledged: a Status older than it does not show it.
    depth_pending_um: int | None = None
    #: What the latest Arm approved: where runs the controller did not hear of are
    #: counted (reconciliation), and what the pen's Armed must echo.
    arming: ArmingRecord | None = None
    #: The pen's counters as last reconciled: boot they belong to, the last run counted
    #: as a pass, and the stroke counter then.
    counters_boot: int | None = None
    runs_counted: int | None = None
    strokes_seen: int | None = None


class CartridgeRecord(_Record):
    """A cartridge that has been used: bound to the session it was used in."""

    cartridge_id: int
    session_id: str
    first_used_at: float
    spent_at: float | None = None
