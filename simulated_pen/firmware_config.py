"""What a simulated pen is configured with and declares: ``FirmwareConfig`` (its limits
and defaults) and ``declared_identity`` (the Identity that announces them to a host).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from firmware_protocol.messages import PROTOCOL_VERSION, SCHEMA_HASH, Identity

from .physics import PhysicsConfig


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
