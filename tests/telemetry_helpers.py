"""The one place tests build firmware Telemetry messages (protocol v2 adds ``runs``)."""

from __future__ import annotations

from firmware_protocol.messages import Telemetry


def telemetry(i: int, *, depth_um: int = 500, flags: int = 3) -> Telemetry:
    """Sample ``i`` of a pen at rest-ish: device clock and strokes grow with ``i``."""
    return Telemetry(i, depth_um, depth_um + i % 3, 100, 300, 3600, 3900, i * 2, flags, runs=1)
