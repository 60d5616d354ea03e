"""The pen's firmware, as a pure model: commands and physical inputs in, messages out.

This module is the executable form of PROTOCOL.md section 10. Every rule of
product.md section 3 that must hold *without the host* lives here:

* The motor runs only while armed, with a cartridge, and starts only on a press of
  the run button (a button already held when the pen is armed, or still held after
  a stop, must be released and pressed again: arming never starts the needle).
* Arming is a lease: ``Arm(lease_ms, token, depth_um, max_depth_um)`` starts it,
  ``Renew(token)`` extends it. The Arm carries the setpoint the host approved (refused
  unless it is the pen's own) and the deepest the arming may ever drive (the zone's
  limit). A renew with a stale token, or while disarmed, is ignored and never
  re-arms. When the lease runs out the motor stops and the pen disarms
  (LEASE_EXPIRED). Refusals follow one table, read top to bottom (``_arm_refusal``).
* The setpoint cannot change under an arming (SetDepth while armed: ARMED), so the
  actuator never aims past the arming's maximum; a measured depth above that maximum
  plus the declared accuracy stops the needle at once (DEPTH_LIMIT), as does one above
  the absolute ceiling (DEPTH_CEILING). The motor starts only with the needle within
  the arming's limit; an idle needle gets ``arm_settle_ms`` after the Arm to get
  there (it may still be retracting from a deeper setpoint) before the limit stops it.
* Stall, over-current, over-temperature, low battery, cartridge removed and the two
  depth checks are faults: the motor stops, the pen disarms and the fault latches
  (flag FAULT_LATCHED) until the host arms it again successfully. The latch is kept
  in non-volatile memory: it survives a reboot.
* Button release ends the run (BUTTON_RELEASED); skin contact lost for longer than
  the lift-off grace ends it too (LIFT_OFF; the grace starts at motor start when the
  needle starts off the skin). Neither disarms: the next press is the next pass.
* The pen disarms when it gives up its link (LINK_LOST) and when it accepts a new
  host (NEW_HOST); the owner of the link calls ``link_lost`` and ``new_host``.
* Counters the host reconciles from: runs and strokes since boot (u32, wrapping) and
  the strokes on the inserted cartridge, which the cartridge's chip remembers (here:
  ``cartridge_chips``, part of the physical world, so it survives removal and
  re-insertion and a reboot). Strokes are counted while the motor is powered, so a
  run's strokes are exactly MotorStopped.strokes - MotorStarted.strokes.

Time is always an argument (``now``, seconds on any monotonic origin). Timed events
(lease expiry, lift-off) take effect at their exact deadline even when the caller
steps late: the physics is integrated up to the deadline, the stop is stamped with
it, and only then does time move on. There is no clock and no I/O in this module.

``FirmwareConfig(strict=True)`` makes the pen use every tolerance the protocol gives
it against the host (see the package README): measured depth anywhere within
the declared accuracy, unspecified fields filled with implausible values.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from firmware_protocol.messages import (
    PROTOCOL_VERSION,
    SCHEMA_HASH,
    Arm,
    Armed,
    CartridgeInserted,
    CartridgeRemoved,
    CommandRefused,
    Disarm,
    Disarmed,
    Identity,
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
)

from .faults import Fault, FaultKind
from .physics import PenPhysics, PhysicsConfig

_ARMED = int(TelemetryFlag.ARMED)
_RUNNING = int(TelemetryFlag.MOTOR_RUNNING)
_CONTACT = int(TelemetryFlag.SKIN_CONTACT)
_BUTTON = int(TelemetryFlag.BUTTON_PRESSED)
_CARTRIDGE = int(TelemetryFlag.CARTRIDGE_PRESENT)
_FAULT = int(TelemetryFlag.FAULT_LATCHED)
_DEPTH_SET = int(TelemetryFlag.DEPTH_SET)
_U32 = 0xFFFFFFFF
_INF = math.inf
# Deadlines are sums of floats (0.1 + 0.05 > 0.15): one due within a microsecond is due.
_EPS = 1e-6
#: What a strict pen puts in depth_set_um when it holds no setpoint (DEPTH_SET clear):
#: the field is meaningless then, and a host that reads it anyway should notice.
STRICT_NO_SETPOINT_UM = 0xFFFF


@dataclass(frozen=True, slots=True)
class FirmwareConfig:
    """Limits and defaults of the simulated firmware (declared in its Identity).

    Units are in the names.
    """

    max_depth_um: int = 2500
    # The accuracy the pen declares (Identity.depth_accuracy_um): a depth reading is
    # within this of the true needle depth. The physics (2 um of noise, an actuator
    # that approaches its target from below) stays well inside it; strict mode uses
    # all of it. The pen stops when a reading exceeds a limit by more than this.
    depth_accuracy_um: int = 20
    max_lease_ms: int = 2000
    min_speed_hz: int = 50
    max_speed_hz: int = 150
    default_speed_hz: int = 100
    telemetry_rate_hz: int = 100  # at boot; 0 turns telemetry off
    max_telemetry_rate_hz: int = 1000
    lift_off_grace_ms: int = 300  # at boot
    max_lift_off_grace_ms: int = 2000
    control_rate_hz: int = 100  # the sensor checks run at least this often
    stall_speed_fraction: float = 0.5  # below this share of the set rate, while driven...
    stall_time_s: float = 0.030  # ...for this long, the motor has stalled
    over_current_ma: int = 1500
    over_temperature_cdeg: int = 4500
    rearm_temperature_cdeg: int = 4200  # hysteresis: arming is refused until it cools below
    low_battery_mv: int = 3450  # stop below this (under load)
    arm_battery_mv: int = 3500  # refuse to arm below this
    # An idle needle gets this long after an Arm to come within the arming's limit (the
    # actuator may still be retracting from a deeper setpoint) before DEPTH_LIMIT stops
    # it; the motor never starts outside the limit. PROTOCOL.md section 10.3: <= 250 ms.
    arm_settle_ms: int = 250
    firmware_version: tuple[int, int, int] = (2, 0, 0)
    # The stroke counter's value at boot. Real pens start at 0; a test starts a pen near
    # 2**32 to see every counter comparison survive the wrap.
    strokes_at_boot: int = 0
    strict: bool = False  # use every tolerance PROTOCOL.md gives against the host
    physics: PhysicsConfig = field(default_factory=PhysicsConfig)

    def __post_init__(self) -> None:
        if not 0 < self.max_depth_um <= 0xFFFF:
            raise ValueError("max_depth_um must be in 1..65535")
        if not 0 <= self.depth_accuracy_um <= 0xFFFF:
            raise ValueError("depth_accuracy_um must be in 0..65535")
        if not 0 < self.max_lease_ms <= 0xFFFF:
            raise ValueError("max_lease_ms must be in 1..65535")
        if not 0 <= self.telemetry_rate_hz <= self.max_telemetry_rate_hz <= 0xFFFF:
            raise ValueError(f"telemetry_rate_hz must be in 0..{self.max_telemetry_rate_hz}")
        if not 0 <= self.lift_off_grace_ms <= self.max_lift_off_grace_ms <= 0xFFFF:
            raise ValueError(f"lift_off_grace_ms must be in 0..{self.max_lift_off_grace_ms}")
        if not 0 < self.min_speed_hz <= self.default_speed_hz <= self.max_speed_hz <= 0xFFFF:
            raise ValueError("default_speed_hz must lie in the speed range")
        if self.control_rate_hz <= 0:
            raise ValueError("control_rate_hz must be > 0")
        if not self.low_battery_mv <= self.arm_battery_mv <= 0xFFFF:
            raise ValueError("need low_battery_mv <= arm_battery_mv")
        if not -(2**15) <= self.rearm_temperature_cdeg <= self.over_temperature_cdeg < 2**15:
            raise ValueError("need rearm_temperature_cdeg <= over_temperature_cdeg")
        if not 0 <= self.arm_settle_ms <= 250:
            raise ValueError("arm_settle_ms must be in 0..250 (PROTOCOL.md section 10.3)")


def declared_identity(
    config: FirmwareConfig,
    *,
    serial: str,
    boot_id: int,
    host_nonce: int = 0,
    protocol_version: int = PROTOCOL_VERSION,
    schema_hash: int = SCHEMA_HASH,
) -> Identity:
    """The Identity a pen with this configuration declares (its accuracy and limits)."""
    major, minor, patch = config.firmware_version
    return Identity(
        protocol_version=protocol_version,
        serial=serial.encode("ascii"),
        fw_major=major,
        fw_minor=minor,
        fw_patch=patch,
        boot_id=boot_id,
        schema_hash=schema_hash,
        max_depth_um=config.max_depth_um,
        max_lease_ms=config.max_lease_ms,
        host_nonce=host_nonce,
        depth_accuracy_um=config.depth_accuracy_um,
        min_speed_hz=config.min_speed_hz,
        max_speed_hz=config.max_speed_hz,
        default_speed_hz=config.default_speed_hz,
        max_telemetry_rate_hz=config.max_telemetry_rate_hz,
        default_telemetry_rate_hz=config.telemetry_rate_hz,
        max_lift_off_grace_ms=config.max_lift_off_grace_ms,
        default_lift_off_grace_ms=config.lift_off_grace_ms,
        arm_battery_mv=config.arm_battery_mv,
        low_battery_mv=config.low_battery_mv,
        max_temperature_cdeg=config.over_temperature_cdeg,
        rearm_temperature_cdeg=config.rearm_temperature_cdeg,
    )


def _grid_after(now: float, rate: int, phase: float = 0.0) -> tuple[int, float]:
    """The first point of the grid (k + phase) / rate strictly after now, as (k, time).

    Each pen keeps its samples on a grid of its own phase, as real pens with
    independent clocks do: pens on one common grid would all send at the same
    instant, a burst no clinic produces, which made every host handle N frames
    at once every period.
    """
    k = math.floor(now * rate - phase) + 1
    t = (k + phase) / rate
    if t <= now:  # float rounding at a grid point
        k += 1
        t = (k + phase) / rate
    return k, t


class PenFirmware:
    """The pure device model. Feed it commands (``handle``), time (``step``) and physical
    inputs; it returns the messages the pen sends, in order.

    ``physics`` replaces the simulated hardware (a test may script the world);
    ``cartridge_chips`` is the stroke memory of every cartridge in the physical world,
    by id (shared between pens when cartridges move between them).
    """

    _tel_k: int
    _next_telemetry: float
    _ctl_k: int
    _next_control: float

    def __init__(
        self,
        rng: random.Random,
        now: float,
        config: FirmwareConfig | None = None,
        *,
        physics: PenPhysics | None = None,
        cartridge_chips: dict[int, int] | None = None,
    ) -> None:
        self.config = cfg = config or FirmwareConfig()
        self.physics = physics if physics is not None else PenPhysics(rng, now, cfg.physics)
        self._phase = rng.random()  # where in each period this pen's clock ticks
        # Physical state: survives a reboot.
        self.button = False
        self.contact = False
        self.cartridge_id: int | None = None
        self.cartridge_chips: dict[int, int] = {} if cartridge_chips is None else cartridge_chips
        # Non-volatile: the latched fault survives a reboot (cleared by a successful Arm).
        self.fault: StopReason | None = None
        # Counters for tests and reports.
        self.renews_ignored = 0
        self.telemetry_skipped = 0  # samples the caller stepped too late to take
        self.lease_expiries = 0
        #: (arrival of the Arm or Renew that set the lease, time it ran out), last expiry.
        self.last_lease_expiry: tuple[float, float] | None = None
        self._handlers: dict[type[Message], Callable[[Message, float, list[Message]], None]] = {
            SetDepth: self._on_set_depth,
            SetSpeed: self._on_set_speed,
            Arm: self._on_arm,
            Renew: self._on_renew,
            Disarm: self._on_disarm,
            Stop: self._on_stop,
            SetTelemetryRate: self._on_set_telemetry_rate,
            SetLiftOffGrace: self._on_set_lift_off_grace,
            QueryStatus: self._on_query_status,
            Reset: self._on_reset,
        }
        self._boot(now)

    def _boot(self, now: float) -> None:
        cfg = self.config
        self.boot_time = now
        self.depth_set_um: int | None = None
        self.speed_hz = cfg.default_speed_hz
        self.telemetry_rate_hz = cfg.telemetry_rate_hz
        self.lift_off_grace_ms = cfg.lift_off_grace_ms
        self.armed = False
        self.token = 0
        self.lease_ms = 0
        self.arm_max_depth_um = 0
        self.lease_deadline = _INF
        self.lease_granted_at = _INF
        self.armed_at = _INF
        self.running = False
        self.runs = 0  # motor runs since boot (wraps at 2**32 on the wire)
        self._strokes = self.config.strokes_at_boot  # strokes since boot
        self._stroke_mark = 0  # whole physical strokes already counted
        self.last_host_stop_reason: int | None = None
        self.reset_requested = False
        self._peak_um = 0
        self._contact_lost_at: float | None = None
        self._slow_since: float | None = None
        self._depth_reading = 0
        ph = self.physics
        ph.depth_target_um = 0.0  # the actuator homes at boot
        ph.motor_on = False
        ph.motor_rate_hz = float(self.speed_hz)
        ph.stalled = False
        ph.surge_ma = 0.0
        self._ctl_k, self._next_control = _grid_after(now, cfg.control_rate_hz, self._phase)
        self._schedule_telemetry(now)

    # -- public API -------------------------------------------------------------------

    def reboot(self, now: float) -> None:
        """Power-cycle the logic: settings back to defaults, disarmed, no messages.

        The physical world (cartridge and its chip, button, contact, heat, battery) is
        unchanged, and so is the latched fault (non-volatile). Counters restart at 0.
        """
        self.physics.advance(now)
        self._count_strokes()  # the strokes up to the power cut are on the cartridge
        self._boot(now)

    def handle(self, message: Message, now: float) -> list[Message]:
        """Apply one host command received at ``now``; return the messages it causes."""
        out: list[Message] = []
        self._advance(now, out)
        handler = self._handlers.get(type(message))
        if handler is None:
            out.append(CommandRefused(message.TYPE, RefusalCode.UNKNOWN_MESSAGE))
        else:
            handler(message, now, out)
        return out

    def step(self, now: float) -> list[Message]:
        """Advance to ``now``: timed stops, sensor checks, and telemetry when it is due."""
        out: list[Message] = []
        self._advance(now, out)
        if now >= self._next_control:
            self._ctl_k, self._next_control = _grid_after(
                now, self.config.control_rate_hz, self._phase
            )
        if now >= self._next_telemetry:
            out.append(self._telemetry(now))
            rate = self.telemetry_rate_hz
            k = self._tel_k + 1
            t = (k + self._phase) / rate
            if t <= now:  # the caller is more than a period late: skip, never burst
                k, t = _grid_after(now, rate, self._phase)
                self.telemetry_skipped += k - self._tel_k - 1
            self._tel_k, self._next_telemetry = k, t
        return out

    def sample(self, now: float) -> list[Message]:
        """Advance to ``now`` and take one telemetry sample there, off the periodic grid.

        For tests and benches that need the pen's report of one exact moment; the
        periodic schedule is not changed. Anything the sensor checks did comes first.
        """
        out: list[Message] = []
        self._advance(now, out)
        out.append(self._telemetry(now))
        return out

    def next_deadline(self) -> float:
        """The latest time by which ``step`` must be called next."""
        d = self._next_control
        if self._next_telemetry < d:
            d = self._next_telemetry
        if self.lease_deadline < d:
            d = self.lease_deadline
        lost = self._contact_lost_at
        if lost is not None:
            g = lost + self.lift_off_grace_ms / 1000.0
            if g < d:
                d = g
        return d

    def device_ms(self, now: float) -> int:
        """Milliseconds since boot as the pen counts them (u32, wraps)."""
        # The epsilon keeps an exact deadline such as boot + 0.25 s from reading 249 ms.
        return int((now - self.boot_time) * 1000.0 + 1e-6) & _U32

    @property
    def strokes(self) -> int:
        """Strokes since boot (u32, wraps), counted while the motor is powered."""
        return self._strokes & _U32

    @property
    def cartridge_strokes(self) -> int:
        """Strokes the inserted cartridge's chip has recorded (u32, wraps); 0 without one."""
        cid = self.cartridge_id
        return 0 if cid is None else self.cartridge_chips.get(cid, 0) & _U32

    @property
    def flags(self) -> int:
        f = 0
        if self.armed:
            f |= _ARMED
        if self.running:
            f |= _RUNNING
        if self.contact:
            f |= _CONTACT
        if self.button:
            f |= _BUTTON
        if self.cartridge_id is not None:
            f |= _CARTRIDGE
        if self.fault is not None:
            f |= _FAULT
        if self.depth_set_um is not None:
            f |= _DEPTH_SET
        return f

    def status(self, now: float) -> Status:
        """What the pen answers to QueryStatus."""
        lease_left = 0
        if self.armed:
            # Rounded down: the pen never claims more lease than it has.
            left_ms = math.floor((self.lease_deadline - now) * 1000.0 + 1e-6)
            lease_left = max(0, min(0xFFFF, left_ms))
        return Status(
            flags=self.flags,
            depth_set_um=self._depth_set_field(),
            speed_hz=self.speed_hz,
            cartridge_id=self.cartridge_id or 0,
            fault=int(self.fault or 0),
            lease_left_ms=lease_left,
            token=self.token if self.armed else 0,
            arm_max_depth_um=self.arm_max_depth_um if self.armed else 0,
            runs=self.runs & _U32,
            strokes=self.strokes,
            cartridge_strokes=self.cartridge_strokes,
            telemetry_rate_hz=self.telemetry_rate_hz,
            lift_off_grace_ms=self.lift_off_grace_ms,
            device_ms=self.device_ms(now),
        )

    # -- the link (called by the owner of the DeviceConnection) ---------------------------

    def link_lost(self, now: float) -> list[Message]:
        """The pen gave up its link: stop and disarm (LINK_LOST; not a fault).

        The messages are what the firmware produced; with no link nobody hears them,
        and a pen never queues them for a later link (the host asks with QueryStatus).
        """
        out: list[Message] = []
        self._advance(now, out)
        self._stop(StopReason.LINK_LOST, now, out, disarm=True)
        return out

    def new_host(self, now: float) -> list[Message]:
        """The pen accepted a Hello from a new host: stop and disarm (NEW_HOST).

        The messages go out on the new link, after the Identity.
        """
        out: list[Message] = []
        self._advance(now, out)
        self._stop(StopReason.NEW_HOST, now, out, disarm=True)
        return out

    # -- physical inputs ------------------------------------------------------------------

    def press_button(self, now: float) -> list[Message]:
        out: list[Message] = []
        self._advance(now, out)
        if not self.button:
            self.button = True
            self._try_start(now, out)
        return out

    def release_button(self, now: float) -> list[Message]:
        out: list[Message] = []
        self._advance(now, out)
        if self.button:
            self.button = False
            self._stop(StopReason.BUTTON_RELEASED, now, out, disarm=False)
        return out

    def set_contact(self, on: bool, now: float) -> list[Message]:
        out: list[Message] = []
        self._advance(now, out)
        if on != self.contact:
            self.contact = self.physics.contact = on
            if self.running:
                self._contact_lost_at = None if on else now
                self._timed(now, out)  # a grace of 0 ms stops at once
        return out

    def insert_cartridge(self, cartridge_id: int, now: float) -> list[Message]:
        """Click a cartridge in. Ignored while one is already in (there is one slot)."""
        if not 0 < cartridge_id < 2**64:
            raise ValueError("cartridge_id must be a non-zero u64")
        out: list[Message] = []
        self._advance(now, out)
        if self.cartridge_id is None:
            self.cartridge_id = cartridge_id
            self.cartridge_chips.setdefault(cartridge_id, 0)
            out.append(CartridgeInserted(cartridge_id, self.cartridge_strokes))
        return out

    def remove_cartridge(self, now: float) -> list[Message]:
        """Pull the cartridge: MotorStopped, Disarmed (if armed), then CartridgeRemoved."""
        out: list[Message] = []
        self._advance(now, out)
        cid = self.cartridge_id
        if cid is not None:
            if self.armed:
                # Stopped while the cartridge is still counted, so MotorStopped carries
                # the strokes of the cartridge that left.
                self._stop(StopReason.CARTRIDGE_REMOVED, now, out, disarm=True, latch=True)
            strokes = self.cartridge_strokes
            self.cartridge_id = None
            out.append(CartridgeRemoved(cid, strokes))
        return out

    def inject(self, fault: Fault, now: float) -> list[Message]:
        """Inject a physical fault. Link-level faults (silent, reboot, line noise, lost
        renewals) belong to SimulatedPen and are rejected here with ValueError.
        """
        out: list[Message] = []
        self._advance(now, out)
        ph = self.physics
        cfg = self.config
        kind = fault.kind
        if kind is FaultKind.STALL:
            ph.stalled = True
        elif kind is FaultKind.OVER_CURRENT:
            ph.surge_ma = fault.effective_amount
        elif kind is FaultKind.OVER_TEMPERATURE:
            ph.temperature_c = max(ph.temperature_c, cfg.over_temperature_cdeg / 100.0 + 2.0)
        elif kind is FaultKind.DEPTH_OVERSHOOT:
            ph.overshoot_target_um = fault.effective_amount
        elif kind is FaultKind.CARTRIDGE_PULLED:
            out += self.remove_cartridge(now)
        elif kind is FaultKind.LOW_BATTERY:
            ph.set_battery_voltage(cfg.low_battery_mv - 40)
        elif kind is FaultKind.CLEAR:
            ph.stalled = False
            ph.surge_ma = 0.0
            ph.overshoot_target_um = 0.0
            ph.temperature_c = ph.config.ambient_c
            ph.set_battery_voltage(ph.config.battery_full_mv)
        else:
            raise ValueError(f"{kind.value} is not a firmware fault")
        self._check_sensors(now, out)
        return out

    # -- time ---------------------------------------------------------------------------

    def _advance(self, now: float, out: list[Message]) -> None:
        self._timed(now, out)
        self.physics.advance(now)
        self._count_strokes()
        self._check_sensors(now, out)

    def _timed(self, now: float, out: list[Message]) -> None:
        """Fire the lease and lift-off deadlines that fall at or before now, in time order."""
        while True:
            at = self.lease_deadline
            reason = StopReason.LEASE_EXPIRED
            lost = self._contact_lost_at
            if lost is not None:
                g = lost + self.lift_off_grace_ms / 1000.0
                if g < at:
                    at, reason = g, StopReason.LIFT_OFF
            if at > now + _EPS:
                return
            self.physics.advance(at)  # the motor ran until the deadline, not a moment longer
            if reason is StopReason.LEASE_EXPIRED:
                self.lease_expiries += 1
                self.last_lease_expiry = (self.lease_granted_at, at)
            self._stop(reason, at, out, disarm=reason is StopReason.LEASE_EXPIRED)

    def _read_depth(self) -> int:
        ph = self.physics
        if not self.config.strict:
            return ph.read_depth_um()
        # Strict: anywhere within the declared accuracy of the true depth, uniformly, so
        # a host meets the full tolerance. The actuator approaches its target from below,
        # so a pen set exactly at a limit still never reads above limit + accuracy.
        accuracy = self.config.depth_accuracy_um
        return max(0, round(ph.depth_um + ph.rng.uniform(-accuracy, accuracy)))

    def _check_sensors(self, now: float, out: list[Message]) -> None:
        """The stop checks while armed: one table, read top to bottom; first match stops."""
        depth = self._depth_reading = self._read_depth()
        if not self.armed:
            return
        cfg = self.config
        ph = self.physics
        if self.running and depth > self._peak_um:
            self._peak_um = depth
        accuracy = cfg.depth_accuracy_um
        settled = self.running or now - self.armed_at >= cfg.arm_settle_ms / 1000.0 - _EPS
        # fmt: off
        checks: tuple[tuple[StopReason, bool], ...] = (
            (StopReason.DEPTH_CEILING,    depth > cfg.max_depth_um + accuracy),
            (StopReason.DEPTH_LIMIT,      depth > self.arm_max_depth_um + accuracy and settled),
            (StopReason.OVER_CURRENT,     ph.current_ma > cfg.over_current_ma),
            (StopReason.STALL,            self.running and self._stalled(now)),
            (StopReason.OVER_TEMPERATURE, ph.temperature_c * 100.0 > cfg.over_temperature_cdeg),
            (StopReason.LOW_BATTERY,      ph.battery_mv < cfg.low_battery_mv),
        )
        # fmt: on
        for reason, tripped in checks:
            if tripped:
                self._stop(reason, now, out, disarm=True, latch=True)
                return

    def _stalled(self, now: float) -> bool:
        if self.physics.speed_hz >= self.config.stall_speed_fraction * self.speed_hz:
            self._slow_since = None
            return False
        if self._slow_since is None:
            self._slow_since = now
        return now - self._slow_since >= self.config.stall_time_s

    # -- counters -----------------------------------------------------------------------

    def _count_strokes(self) -> None:
        """Count the whole strokes driven since the last count, while the motor is powered,
        on the pen and on the cartridge's chip."""
        if not self.running:
            return
        whole = math.floor(self.physics.strokes)
        delta = whole - self._stroke_mark
        if delta <= 0:
            return
        self._stroke_mark = whole
        self._strokes += delta
        cid = self.cartridge_id
        if cid is not None:
            self.cartridge_chips[cid] = self.cartridge_chips.get(cid, 0) + delta

    # -- run state --------------------------------------------------------------------

    def _in_position(self) -> bool:
        """The needle reads within the arming's limit (plus the accuracy)."""
        return self._depth_reading <= self.arm_max_depth_um + self.config.depth_accuracy_um

    def _try_start(self, now: float, out: list[Message]) -> None:
        if (
            self.running
            or not self.armed
            or not self.button
            or self.cartridge_id is None
            or self.fault is not None
            or not self._in_position()  # still settling: this press does nothing
        ):
            return
        self.running = True
        self.runs += 1
        ph = self.physics
        ph.motor_on = True
        ph.motor_rate_hz = float(self.speed_hz)
        self._stroke_mark = math.floor(ph.strokes)
        self._peak_um = self._depth_reading
        self._slow_since = None
        # Off the skin at the start: the lift-off grace runs from the motor start.
        self._contact_lost_at = None if self.contact else now
        out.append(
            MotorStarted(
                self.device_ms(now),
                self._depth_set_field(),
                self.arm_max_depth_um,
                self.runs & _U32,
                self.strokes,
                self.cartridge_id,
                self.cartridge_strokes,
            )
        )
        self._timed(now, out)

    def _stop(
        self,
        reason: StopReason,
        now: float,
        out: list[Message],
        *,
        disarm: bool,
        latch: bool = False,
    ) -> None:
        if self.running:
            self._count_strokes()
            self.running = False
            ph = self.physics
            ph.motor_on = False
            # Cutting motor power ends a jam or a surge; a new run starts clean.
            ph.stalled = False
            ph.surge_ma = 0.0
            self._contact_lost_at = None
            self._slow_since = None
            out.append(
                MotorStopped(
                    self.device_ms(now),
                    reason,
                    self.runs & _U32,
                    self.strokes,
                    self._peak_um,
                    self.cartridge_strokes,
                )
            )
        if disarm and self.armed:
            self.armed = False
            self.token = 0
            self.arm_max_depth_um = 0
            self.lease_deadline = _INF
            self.lease_granted_at = _INF
            self.armed_at = _INF
            out.append(Disarmed(reason))
        if latch:
            self.fault = reason

    # -- telemetry --------------------------------------------------------------------

    def _depth_set_field(self) -> int:
        """depth_set_um as sent: meaningful only with DEPTH_SET (strict: implausible without)."""
        if self.depth_set_um is not None:
            return self.depth_set_um
        return STRICT_NO_SETPOINT_UM if self.config.strict else 0

    def _schedule_telemetry(self, now: float) -> None:
        if self.telemetry_rate_hz:
            self._tel_k, self._next_telemetry = _grid_after(
                now, self.telemetry_rate_hz, self._phase
            )
        else:
            self._tel_k, self._next_telemetry = 0, _INF

    def _telemetry(self, now: float) -> Telemetry:
        ph = self.physics
        return Telemetry(
            self.device_ms(now),
            self._depth_set_field(),
            min(0xFFFF, self._depth_reading),
            round(ph.speed_hz),
            min(0xFFFF, ph.read_current_ma()),
            ph.read_temperature_cdeg(),
            min(0xFFFF, ph.read_battery_mv()),
            self.strokes,
            self.flags,
            self.runs & _U32,
        )

    # -- commands -----------------------------------------------------------------------

    def _on_set_depth(self, message: Message, now: float, out: list[Message]) -> None:
        assert isinstance(message, SetDepth)
        # fmt: off
        refusals: tuple[tuple[RefusalCode, bool], ...] = (
            (RefusalCode.ARMED,               self.armed),
            (RefusalCode.DEPTH_ABOVE_CEILING, message.depth_um > self.config.max_depth_um),
        )
        # fmt: on
        for code, refused in refusals:
            if refused:
                out.append(CommandRefused(SetDepth.TYPE, code))
                return
        self.depth_set_um = message.depth_um
        self.physics.depth_target_um = float(message.depth_um)

    def _on_set_speed(self, message: Message, now: float, out: list[Message]) -> None:
        assert isinstance(message, SetSpeed)
        cfg = self.config
        if not cfg.min_speed_hz <= message.rate_hz <= cfg.max_speed_hz:
            out.append(CommandRefused(SetSpeed.TYPE, RefusalCode.SPEED_OUT_OF_RANGE))
            return
        self.speed_hz = message.rate_hz
        self.physics.motor_rate_hz = float(message.rate_hz)

    def _on_arm(self, message: Message, now: float, out: list[Message]) -> None:
        assert isinstance(message, Arm)
        refusal = self._arm_refusal(message)
        if refusal is not None:
            out.append(CommandRefused(Arm.TYPE, refusal))
            return
        self.armed = True
        self.fault = None
        self.token = message.token
        self.lease_ms = message.lease_ms
        self.arm_max_depth_um = message.max_depth_um
        self.armed_at = self.lease_granted_at = now
        self.lease_deadline = now + message.lease_ms / 1000.0
        out.append(
            Armed(
                message.token,
                message.lease_ms,
                message.depth_um,
                message.max_depth_um,
                self.runs & _U32,
                self.strokes,
                self.cartridge_id or 0,
                self.cartridge_strokes,
            )
        )

    def _arm_refusal(self, arm: Arm) -> RefusalCode | None:
        """Why an Arm is refused: PROTOCOL.md section 10's table, top to bottom."""
        cfg = self.config
        ph = self.physics
        setpoint = self.depth_set_um
        # fmt: off
        rows: tuple[tuple[RefusalCode, bool], ...] = (
            (RefusalCode.MOTOR_RUNNING,     self.running),
            (RefusalCode.BAD_LEASE,         not 0 < arm.lease_ms <= cfg.max_lease_ms),
            (RefusalCode.NO_CARTRIDGE,      self.cartridge_id is None),
            (RefusalCode.NO_DEPTH,          setpoint is None),
            (RefusalCode.SETPOINT_MISMATCH, arm.depth_um != setpoint),
            (RefusalCode.BAD_LIMIT,         not arm.depth_um <= arm.max_depth_um
                                            <= cfg.max_depth_um),
            (RefusalCode.LOW_BATTERY,       ph.battery_mv < cfg.arm_battery_mv),
            (RefusalCode.OVER_TEMPERATURE,  ph.temperature_c * 100.0
                                            > cfg.rearm_temperature_cdeg),
        )
        # fmt: on
        for code, refused in rows:
            if refused:
                return code
        return None

    def _on_renew(self, message: Message, now: float, out: list[Message]) -> None:
        assert isinstance(message, Renew)
        # Renew travels unreliably and may arrive late or twice: only the current lease
        # is extended, and a renew never arms a disarmed pen.
        if self.armed and message.token == self.token:
            self.lease_granted_at = now
            self.lease_deadline = now + self.lease_ms / 1000.0
        else:
            self.renews_ignored += 1

    def _on_disarm(self, message: Message, now: float, out: list[Message]) -> None:
        # On a disarmed pen: nothing to stop, nothing sent (the ACK says it arrived).
        self._stop(StopReason.HOST_DISARM, now, out, disarm=True)

    def _on_stop(self, message: Message, now: float, out: list[Message]) -> None:
        assert isinstance(message, Stop)
        self.last_host_stop_reason = message.reason
        self._stop(StopReason.HOST_STOP, now, out, disarm=True)

    def _on_set_telemetry_rate(self, message: Message, now: float, out: list[Message]) -> None:
        assert isinstance(message, SetTelemetryRate)
        if message.rate_hz > self.config.max_telemetry_rate_hz:
            out.append(CommandRefused(SetTelemetryRate.TYPE, RefusalCode.RATE_OUT_OF_RANGE))
            return
        self.telemetry_rate_hz = message.rate_hz
        self._schedule_telemetry(now)

    def _on_set_lift_off_grace(self, message: Message, now: float, out: list[Message]) -> None:
        assert isinstance(message, SetLiftOffGrace)
        if message.grace_ms > self.config.max_lift_off_grace_ms:
            out.append(CommandRefused(SetLiftOffGrace.TYPE, RefusalCode.BAD_PAYLOAD))
            return
        self.lift_off_grace_ms = message.grace_ms
        self._timed(now, out)  # a shorter grace may already have run out

    def _on_query_status(self, message: Message, now: float, out: list[Message]) -> None:
        out.append(self.status(now))

    def _on_reset(self, message: Message, now: float, out: list[Message]) -> None:
        # Stop cleanly and tell the host why; the owner of the link then reboots us
        # (it must flush the ACK of this Reset and these messages first).
        self._stop(StopReason.REBOOT, now, out, disarm=True)
        self.reset_requested = True
