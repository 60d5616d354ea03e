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

The pen is built in two layers and a configuration, one module each:
``firmware_config.py`` (``FirmwareConfig``, ``declared_identity``), ``firmware_core.py``
(``FirmwareCore``: the pen's state, its stop checks and what time does to it) and this
module (``PenFirmware``: host commands, the link and physical inputs). This module
re-exports the public names of the other two.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from firmware_protocol.messages import (
    Arm,
    Armed,
    CartridgeInserted,
    CartridgeRemoved,
    CommandRefused,
    Disarm,
    Message,
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
)

from .faults import Fault, FaultKind
from .firmware_config import FirmwareConfig, declared_identity
from .firmware_core import _U32, STRICT_NO_SETPOINT_UM, FirmwareCore
from .physics import PenPhysics

__all__ = [
    "STRICT_NO_SETPOINT_UM",
    "FirmwareConfig",
    "PenFirmware",
    "declared_identity",
]


class PenFirmware(FirmwareCore):
    """The pure device model. Feed it commands (``handle``), time (``step``) and physical
    inputs; it returns the messages the pen sends, in order.

    ``physics`` replaces the simulated hardware (a test may script the world);
    ``cartridge_chips`` is the stroke memory of every cartridge in the physical world,
    by id (shared between pens when cartridges move between them).
    """

    def __init__(
        self,
        rng: random.Random,
        now: float,
        config: FirmwareConfig | None = None,
        *,
        physics: PenPhysics | None = None,
        cartridge_chips: dict[int, int] | None = None,
    ) -> None:
        super().__init__(rng, now, config, physics=physics, cartridge_chips=cartridge_chips)
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
