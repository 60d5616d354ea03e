"""How fast a pen's telemetry really arrives, measured on the pen's own clock. Pure.

The overshoot monitor can only stop a needle on a sample it receives: a pen that
streams slowly (misconfigured, refusing SetTelemetryRate, or on a failing line)
leaves it blind between samples. The rate is measured from the ``device_ms`` of
the samples received in order, so host scheduling does not distort it and lost
frames lower it, as they should: what counts is what the monitor gets to see.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from firmware_protocol.messages import COUNTER_MOD, counter_diff

#: Samples per measurement: 0.15 s at 100 Hz; long enough that a burst of a few lost
#: frames does not read as a slow pen, short enough to notice one within a pass.
WINDOW: Final = 16


class RateMeter:
    """Samples per second of the pen's clock over the last :data:`WINDOW` samples."""

    __slots__ = ("_times",)

    def __init__(self) -> None:
        self._times: deque[int] = deque(maxlen=WINDOW)

    def add(self, device_ms: int) -> None:
        """One sample received in order, stamped by the pen."""
        times = self._times
        if times and counter_diff(device_ms, times[-1]) >= COUNTER_MOD // 2:
            return  # older than the newest: not a new sample of the pen's clock
        times.append(device_ms)

    def rate(self) -> float | None:
        """Samples per second over the window; None until the window is full."""
        times = self._times
        if len(times) < WINDOW:
            return None
        span = counter_diff(times[-1], times[0])
        return (WINDOW - 1) * 1000.0 / span if span else None

    def reset(self) -> None:
        """A new link (or a rebooted pen): its clock starts again; so does the window."""
        self._times.clear()
