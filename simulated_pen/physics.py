"""Plausible, deterministic physics of one pen: actuator, motor, heat, battery.

Pure: no clock, no I/O. ``advance(now)`` integrates from the last time it was
called; every first-order lag is integrated exactly (``exp(-dt/tau)``), so the
result does not depend on how finely the caller slices time. Sensor noise comes
only from the ``random.Random`` handed in, never the global generator, and is
drawn only when a reading is taken.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PhysicsConfig:
    """Constants of the simulated hardware. Units are in the names."""

    depth_tau_s: float = 0.020  # needle-depth actuator lag
    overshoot_tau_s: float = 0.150  # an injected overshoot creeps in, it does not jump
    motor_tau_s: float = 0.015  # spin-up / spin-down of the stroke motor
    depth_noise_um: float = 2.0
    current_noise_ma: float = 4.0
    temperature_noise_c: float = 0.03
    battery_noise_mv: float = 2.0
    idle_current_ma: float = 35.0  # electronics, motor off
    motor_base_ma: float = 110.0
    motor_ma_per_hz: float = 2.0
    motor_ma_per_mm: float = 80.0  # deeper needles push harder
    contact_ma: float = 90.0  # load of the skin while in contact
    stall_current_ma: float = 950.0  # locked rotor, below the over-current trip on purpose
    ambient_c: float = 24.0
    thermal_tau_s: float = 240.0
    heat_c_per_ma: float = 0.025  # steady-state rise above ambient per mA drawn
    battery_capacity_mah: float = 650.0
    battery_empty_mv: float = 3400.0  # open-circuit voltage at 0 % charge
    battery_full_mv: float = 4200.0
    battery_internal_mohm: float = 180.0  # sag under load
    initial_charge_min: float = 0.75  # initial state of charge is drawn in [min, max]
    initial_charge_max: float = 1.0


class PenPhysics:
    """State of the hardware, advanced in time by the firmware.

    Inputs (set by the firmware or by fault injection): ``depth_target_um``,
    ``motor_on``, ``motor_rate_hz``, ``contact``, ``stalled``, ``surge_ma``,
    ``overshoot_target_um``. Outputs: the true values below and noisy readings.
    """

    __slots__ = (
        "charge_mah",
        "config",
        "contact",
        "depth_target_um",
        "depth_um",
        "motor_on",
        "motor_rate_hz",
        "overshoot_target_um",
        "overshoot_um",
        "rng",
        "speed_hz",
        "stalled",
        "strokes",
        "surge_ma",
        "t",
        "temperature_c",
    )

    def __init__(self, rng: random.Random, now: float, config: PhysicsConfig | None = None) -> None:
        cfg = config or PhysicsConfig()
        self.config = cfg
        self.rng = rng
        self.t = now
        self.depth_um = 0.0
        self.depth_target_um = 0.0
        self.overshoot_um = 0.0
        self.overshoot_target_um = 0.0
        self.speed_hz = 0.0
        self.motor_on = False
        self.motor_rate_hz = 0.0
        self.contact = False
        self.stalled = False
        self.surge_ma = 0.0
        self.strokes = 0.0
        self.temperature_c = cfg.ambient_c + rng.uniform(-0.5, 0.5)
        soc = rng.uniform(cfg.initial_charge_min, cfg.initial_charge_max)
        self.charge_mah = soc * cfg.battery_capacity_mah

    # -- integration -----------------------------------------------------------

    def advance(self, now: float) -> None:
        """Integrate the state from the last call to ``now`` (a no-op if time went back)."""
        dt = now - self.t
        if dt <= 0.0:
            return
        self.t = now
        cfg = self.config
        i_before = self.current_ma

        # Depth actuator: first-order lag toward setpoint plus any overshoot drift.
        k = math.exp(-dt / cfg.overshoot_tau_s)
        self.overshoot_um = (
            self.overshoot_target_um + (self.overshoot_um - self.overshoot_target_um) * k
        )
        target = self.depth_target_um + self.overshoot_um
        self.depth_um = target + (self.depth_um - target) * math.exp(-dt / cfg.depth_tau_s)

        # Motor speed: first-order lag; strokes are its exact integral over dt.
        goal = self.motor_rate_hz if self.motor_on and not self.stalled else 0.0
        v0 = self.speed_hz
        tau = cfg.motor_tau_s
        k = math.exp(-dt / tau)
        self.speed_hz = goal + (v0 - goal) * k
        self.strokes += goal * dt + (v0 - goal) * tau * (1.0 - k)

        # Heat and charge use the mean of the current before and after the step.
        i_mean = 0.5 * (i_before + self.current_ma)
        t_ss = cfg.ambient_c + cfg.heat_c_per_ma * max(0.0, i_mean - cfg.idle_current_ma)
        self.temperature_c = t_ss + (self.temperature_c - t_ss) * math.exp(-dt / cfg.thermal_tau_s)
        self.charge_mah = max(0.0, self.charge_mah - i_mean * dt / 3600.0)

    # -- true values -------------------------------------------------------------

    @property
    def current_ma(self) -> float:
        """Instantaneous battery current."""
        cfg = self.config
        if not self.motor_on:
            return cfg.idle_current_ma
        if self.stalled:
            return cfg.idle_current_ma + cfg.stall_current_ma + self.surge_ma
        load = cfg.motor_base_ma + cfg.motor_ma_per_hz * self.speed_hz
        load += cfg.motor_ma_per_mm * self.depth_um / 1000.0
        if self.contact:
            load += cfg.contact_ma
        return cfg.idle_current_ma + load + self.surge_ma

    @property
    def battery_mv(self) -> float:
        """Terminal voltage: open-circuit voltage from the charge, minus the sag under load."""
        cfg = self.config
        soc = self.charge_mah / cfg.battery_capacity_mah
        ocv = cfg.battery_empty_mv + (cfg.battery_full_mv - cfg.battery_empty_mv) * soc
        return ocv - cfg.battery_internal_mohm * self.current_ma / 1000.0

    def set_battery_voltage(self, open_circuit_mv: float) -> None:
        """Set the charge so the open-circuit voltage is ``open_circuit_mv`` (fault injection)."""
        cfg = self.config
        span = cfg.battery_full_mv - cfg.battery_empty_mv
        soc = min(1.0, max(0.0, (open_circuit_mv - cfg.battery_empty_mv) / span))
        self.charge_mah = soc * cfg.battery_capacity_mah

    # -- noisy readings (each draws from the rng) -----------------------------------

    def _noise(self, amplitude: float) -> float:
        # Triangular noise in [-amplitude, +amplitude]: bounded, so a reading can never
        # stray far enough to trip a limit on its own.
        r = self.rng.random
        return (r() - r()) * amplitude

    def read_depth_um(self) -> int:
        return max(0, round(self.depth_um + self._noise(self.config.depth_noise_um)))

    def read_current_ma(self) -> int:
        return max(0, round(self.current_ma + self._noise(self.config.current_noise_ma)))

    def read_temperature_cdeg(self) -> int:
        return round((self.temperature_c + self._noise(self.config.temperature_noise_c)) * 100.0)

    def read_battery_mv(self) -> int:
        return max(0, round(self.battery_mv + self._noise(self.config.battery_noise_mv)))
