"""What the service hands its in-process clients besides answers: live items.

:class:`Subscription` is a bounded queue of :data:`LiveItem` (session events
and tablet-rate telemetry) that the service fills for a tablet's live stream.
Plain values and a queue, so a client of the safety core in another process
(issue 12) can offer the same interface over a channel.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from .sessions import SessionEvent


@dataclass
class LiveTelemetry:
    """A tablet-rate telemetry sample for the live view."""

    port: str
    session_id: str | None
    at: float
    depth_set_um: int
    depth_um: int
    speed_hz: int
    strokes: int
    flags: int


LiveItem = SessionEvent | LiveTelemetry


class Subscription:
    """Live items for one listener; the service offers, the listener reads ``queue``."""

    def __init__(self, maxsize: int) -> None:
        self.queue: asyncio.Queue[LiveItem] = asyncio.Queue(maxsize)

    def offer(self, item: LiveItem) -> None:
        """Queue ``item``, dropping the oldest one if the listener has fallen behind."""
        if self.queue.full():
            # A slow tablet loses old samples, never the newest state or an event.
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
        self.queue.put_nowait(item)
