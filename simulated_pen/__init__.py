"""The simulated pen: firmware rules, physics, scriptable faults, and transports.

Pure core (no clock, no I/O): ``PenFirmware`` (firmware.py on firmware_core.py and
firmware_config.py, with physics.py), ``SimulatedPen`` (device.py: firmware + the
protocol's DeviceConnection + line noise + a hand). Thin asyncio shells:
transports.py (pseudo-terminal, TCP, memory) and runner.py (many pens, one timer).
``penctl simulate`` is cli.py.
"""

from .device import PenStats, SimulatedPen
from .faults import Fault, FaultKind, LineNoise, ScriptEntry, load_script, parse_script
from .firmware import FirmwareConfig, PenFirmware
from .hand import Hand, HandConfig
from .physics import PenPhysics, PhysicsConfig

__all__ = [
    "Fault",
    "FaultKind",
    "FirmwareConfig",
    "Hand",
    "HandConfig",
    "LineNoise",
    "PenFirmware",
    "PenPhysics",
    "PenStats",
    "PhysicsConfig",
    "ScriptEntry",
    "SimulatedPen",
    "load_script",
    "parse_script",
]
