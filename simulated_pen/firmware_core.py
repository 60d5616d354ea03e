"""The pen firmware's state and what time does to it: the base of ``PenFirmware``.

Boot, the motor's start and stop, the sensors' stop checks (one table, read top to
bottom), the lease and lift-off deadlines, the stroke counters and telemetry; ``step``,
``sample`` and ``next_deadline`` drive them. ``firmware.py`` adds what comes from
outside: host commands, the link and physical inputs. No clock and no I/O here.
"""

from __future__ import annotations

import math
import random

from firmware_protocol.messages import (
    Disarmed,
    Message,
    MotorStarted,
    MotorStopped,
    StopReason,
    Telemetry,
    TelemetryFlag,
)

from .firmware_config import FirmwareConfig
from .physics import PenPhysics

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
#: Samples a late-stepped pen still sends (its transmit FIFO): 80 ms at 100 Hz.
TELEMETRY_FIFO = 8


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


class FirmwareCore:
    """The pen's state and its timed behaviour. ``PenFirmware`` adds the inputs; this
    class is not used on its own. The constructor is ``PenFirmware``'s.
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

    # -- public: time and what the pen reads out -----------------------------------

    def step(self, now: float) -> list[Message]:
        """Advance to ``now``: timed stops, sensor checks, and telemetry when it is due."""
        out: list[Message] = []
        self._advance(now, out)
        if now >= self._next_control:
            self._ctl_k, self._next_control = _grid_after(
                now, self.config.control_rate_hz, self._phase
            )
        if now >= self._next_telemetry:
            # A real pen samples on a hardware timer, whatever the host's load; the
            # simulator runs when its process is scheduled. Stepped late, it sends the
            # samples its timer took meanwhile (each stamped at its own tick, with the
            # readings of now), up to a transmit FIFO's worth; older ones are skipped.
            rate = self.telemetry_rate_hz
            next_k, next_t = _grid_after(now, rate, self._phase)  # ticks before it are due
            first = max(self._tel_k, next_k - TELEMETRY_FIFO)
            self.telemetry_skipped += first - self._tel_k
            for k in range(first, next_k):
                out.append(self._telemetry(now, at=(k + self._phase) / rate))
            self._tel_k, self._next_telemetry = next_k, next_t
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

    def _telemetry(self, now: float, at: float | None = None) -> Telemetry:
        """The sample of ``now``'s readings, stamped at ``at`` (its timer tick) or now."""
        ph = self.physics
        return Telemetry(
            self.device_ms(now if at is None else at),
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
