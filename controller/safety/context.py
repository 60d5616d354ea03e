"""What the safety gate knows when it decides: an immutable snapshot, built per decision.

The gate never reads state of its own. Whoever asks it a question (the session
registry, a test) builds a :class:`GateContext` describing the pen, its session
and the policy limits at that instant, so every decision is reproducible from
its inputs alone. The session state enum lives here, beside the context, so the
gate never imports the session machine (the dependency points one way:
sessions -> safety).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from controller.policy import TreatmentPolicy


class SessionState(enum.StrEnum):
    """Life-cycle state of a treatment session (transitions: controller/sessions/states.py)."""

    CREATED = "created"  # client, plan and pen chosen; not started
    ACTIVE = "active"  # treating: zones may be selected, depth set, the pen armed
    PAUSED = "paused"  # the therapist paused; the pen is stopped
    INTERRUPTED = "interrupted"  # the pen link was lost (or the controller restarted)
    FAULTED = "faulted"  # a safety fault; only a therapist's acknowledgement continues
    ENDED = "ended"  # terminal


class LinkStatus(enum.StrEnum):
    """The pen link as far as treatment is concerned."""

    DOWN = "down"  # no handshaken link
    REFUSED = "refused"  # the pen failed the handshake (protocol or schema mismatch)
    UP = "up"  # handshaken; it is the session's pen (or no session is bound yet)
    FOREIGN = "foreign"  # handshaken, but not the pen (serial or boot) the session started on
    UNEXPECTED = "unexpected"  # handshaken, but not the serial configured for this port


class CartridgeStatus(enum.StrEnum):
    """The ledger's verdict on the cartridge in the pen, for this session."""

    ABSENT = "absent"
    FRESH = "fresh"  # never used
    THIS_SESSION = "this_session"  # used earlier in this same session: still usable here
    OTHER_SESSION = "other_session"  # used on another client whose session is not over
    SPENT = "spent"  # used in a finished session: never arms again (product.md §4.5)
    USED_UNKNOWN = "used_unknown"  # its chip reports strokes the ledger knows nothing of


#: Cartridge statuses that may arm.
USABLE_CARTRIDGES = frozenset({CartridgeStatus.FRESH, CartridgeStatus.THIS_SESSION})


@dataclass(frozen=True, slots=True)
class SafetyLimits:
    """Policy-wide limits, already narrowed by what the connected pen declares.

    ``depth_tolerance_um`` is how far a measured depth may read above what was
    approved before it counts as an overshoot: the pen's own declared accuracy
    (Identity.depth_accuracy_um), so that a healthy pen set exactly at a zone's limit
    completes its passes. ``max_depth_accuracy_um`` is the coarsest accuracy the
    clinic accepts (the policy's ``depth_tolerance_mm``): a pen declaring worse is
    never armed.
    """

    device_ceiling_um: int
    depth_tolerance_um: int
    max_depth_accuracy_um: int
    min_speed_hz: int
    max_speed_hz: int
    max_lease_ms: int
    lift_off_grace_ms: int
    telemetry_rate_hz: int
    min_telemetry_rate_hz: int

    @classmethod
    def from_policy(
        cls,
        policy: TreatmentPolicy,
        pen_max_depth_um: int | None = None,
        pen_max_lease_ms: int | None = None,
        *,
        pen_accuracy_um: int | None = None,
        pen_min_speed_hz: int | None = None,
        pen_max_speed_hz: int | None = None,
    ) -> SafetyLimits:
        """The policy's limits; a pen that declares narrower ones narrows them further."""
        ceiling = policy.device_ceiling_um
        if pen_max_depth_um:
            ceiling = min(ceiling, pen_max_depth_um)
        lease = policy.max_lease_ms
        if pen_max_lease_ms:
            lease = min(lease, pen_max_lease_ms)
        return cls(
            device_ceiling_um=ceiling,
            depth_tolerance_um=(
                policy.depth_tolerance_um if pen_accuracy_um is None else pen_accuracy_um
            ),
            max_depth_accuracy_um=policy.depth_tolerance_um,
            min_speed_hz=max(policy.min_speed_hz, pen_min_speed_hz or 0),
            max_speed_hz=min(policy.max_speed_hz, pen_max_speed_hz or policy.max_speed_hz),
            max_lease_ms=lease,
            lift_off_grace_ms=policy.lift_off_grace_ms,
            telemetry_rate_hz=policy.telemetry_rate_hz,
            min_telemetry_rate_hz=policy.min_telemetry_rate_hz,
        )


@dataclass(frozen=True, slots=True)
class ZoneContext:
    """The selected zone with its *effective* limits (manager overrides applied)."""

    zone_id: str
    label: str
    max_depth_um: int
    max_passes: int
    passes_done: int
    puncture_budget: int | None = None
    overridden: bool = False

    @property
    def passes_left(self) -> int:
        return max(0, self.max_passes - self.passes_done)


@dataclass(frozen=True, slots=True)
class GateContext:
    """Everything the gate may look at. Defaults describe a pen with nothing going on.

    ``session_state`` is None when no session is open on the pen.
    ``depth_setpoint_um`` is the setpoint the controller approved for the
    *selected zone* (cleared whenever the zone changes), not what the pen reports.
    ``pass_start_strokes`` is the pen's cumulative stroke count when the
    current pass began (None when no pass is running). The ``pen_*`` fields and
    ``telemetry_rate_hz`` are what the pen confirmed or what was measured of it,
    never what the controller sent.
    """

    limits: SafetyLimits
    session_state: SessionState | None = None
    zone: ZoneContext | None = None
    depth_setpoint_um: int | None = None
    cartridge_id: int | None = None
    cartridge: CartridgeStatus = CartridgeStatus.ABSENT
    link: LinkStatus = LinkStatus.DOWN
    fault: str | None = None
    motor_running: bool = False
    #: The controller's Stop is on its way to the pen, not yet confirmed: a running
    #: sample taken before the pen applied it shows an approved run that is ending.
    stop_sent: bool = False
    lease_token: int | None = None
    pass_start_strokes: int | None = None
    pen_serial: str | None = None
    expected_serial: str | None = None
    #: The pen is armed or arming as far as the controller knows (settings may not change).
    armed: bool = False
    #: The pen has reported its whole state since its link came up.
    pen_confirmed: bool = False
    #: The setpoint the pen itself confirmed (None: unknown or none).
    pen_depth_set_um: int | None = None
    #: A SetDepth on its way on the current link, not yet acknowledged.
    pen_depth_pending_um: int | None = None
    #: Telemetry samples per second of the pen's clock, over the last window; None until
    #: a window is full.
    telemetry_rate_hz: float | None = None
