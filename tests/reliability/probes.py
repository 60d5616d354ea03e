"""Probes on a simulated pen: what its firmware was commanded, what its link sent.

They wrap two methods of one pen instance (nothing else changes), so a test can
say exactly which commands reached the pen and how many telemetry frames it put
on the wire, the ground truth the controller's own counters are checked against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from firmware_protocol.messages import (
    Message,
    MotorStarted,
    MotorStopped,
    SetDepth,
    Telemetry,
    counter_diff,
)
from simulated_pen.device import SimulatedPen


@dataclass
class PenProbe:
    handled: list[Message] = field(default_factory=list)  # every command the firmware applied
    sent: list[Message] = field(default_factory=list)  # messages the pen's link took
    telemetry_sent: int = 0  # counted apart: telemetry is most of the traffic

    def pass_strokes(self) -> list[int]:
        """Strokes of each run of the motor, as the pen itself reported start and stop."""
        starts = [m.strokes for m in self.sent if isinstance(m, MotorStarted)]
        stops = [m.strokes for m in self.sent if isinstance(m, MotorStopped)]
        return [counter_diff(stop, start) for start, stop in zip(starts, stops, strict=True)]

    def commands(self, kind: type[Message]) -> list[Message]:
        return [m for m in self.handled if isinstance(m, kind)]

    def depths_set(self) -> list[int]:
        return [m.depth_um for m in self.handled if isinstance(m, SetDepth)]


def probe(pen: SimulatedPen) -> PenProbe:
    """Start recording ``pen``'s commands and sends (its current link; a reboot replaces it)."""
    found = PenProbe()
    handle = pen.firmware.handle
    send = pen.connection.send

    def handle_and_record(message: Message, now: float) -> list[Message]:
        found.handled.append(message)
        return handle(message, now)

    def send_and_count(message: Message, now: float) -> int | None:
        seq = send(message, now)
        if isinstance(message, Telemetry):
            found.telemetry_sent += 1
        else:
            found.sent.append(message)
        return seq

    pen.firmware.handle = handle_and_record  # type: ignore[method-assign]
    pen.connection.send = send_and_count  # type: ignore[method-assign]
    return found
