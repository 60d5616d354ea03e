"""What the service hands its in-process clients besides answers: live items and pen views.

* :class:`Subscription`: a bounded queue of :data:`LiveItem` (session events and
  tablet-rate telemetry) that the service fills for a tablet's live stream.
* :class:`PenView`: what a therapist at the tablet sees of one pen at one
  instant (link, cartridge, the live session's state, zone, passes left,
  depth), a cheap snapshot with no copy of the session.
* :class:`PenWatchers`: waits for a pen's view to satisfy a condition, woken by
  the service whenever the registry's state changes (no polling), for facts no
  session event announces (a cartridge reported in a status answer).

They are plain values and queues, so a client of the safety core in another
process (issue 12) can offer the same interface over a channel.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from firmware_protocol.messages import Telemetry

from .safety.context import GateContext, LinkStatus, SessionState
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

    @classmethod
    def of(cls, port: str, session_id: str | None, at: float, sample: Telemetry) -> LiveTelemetry:
        """What the live view shows of ``sample``, received at ``at``."""
        return cls(
            port,
            session_id,
            at,
            sample.depth_set_um,
            sample.depth_um,
            sample.speed_hz,
            sample.strokes,
            sample.flags,
        )


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


@dataclass(frozen=True, slots=True)
class PenView:
    """What a therapist's tablet shows of one pen; session fields are None without one."""

    port: str
    link: LinkStatus
    cartridge_id: int | None
    session_id: str | None
    session_state: SessionState | None
    zone_id: str | None
    passes_left: int | None
    depth_setpoint_um: int | None
    #: The pen has reported its state since it connected, and its telemetry rate has
    #: been measured: what arming needs besides the session's own facts.
    pen_confirmed: bool = False
    telemetry_rate_hz: float | None = None

    @classmethod
    def of(cls, port: str, context: GateContext, session_id: str | None) -> PenView:
        """The view of the pen the gate ``context`` describes, live session ``session_id``."""
        zone = context.zone
        return cls(
            port=port,
            link=context.link,
            cartridge_id=context.cartridge_id,
            session_id=session_id,
            session_state=context.session_state,
            zone_id=zone.zone_id if zone else None,
            passes_left=zone.passes_left if zone else None,
            depth_setpoint_um=context.depth_setpoint_um,
            pen_confirmed=context.pen_confirmed,
            telemetry_rate_hz=context.telemetry_rate_hz,
        )


PenCondition = Callable[[PenView], bool]


class PenWatchers:
    """Tasks waiting for a pen's view to satisfy a condition.

    The owner calls :meth:`changed` after every input that may have changed a
    pen; each waiter's condition is checked again then, and only then.
    """

    def __init__(self, view: Callable[[str], PenView]) -> None:
        self._view = view
        self._waiting: list[tuple[str, PenCondition, asyncio.Future[PenView]]] = []

    def __bool__(self) -> bool:
        return bool(self._waiting)

    async def wait(self, port: str, until: PenCondition, within: float) -> PenView:
        """The first view of ``port`` that satisfies ``until`` (TimeoutError after ``within``)."""
        view = self._view(port)
        if until(view):
            return view
        future: asyncio.Future[PenView] = asyncio.get_running_loop().create_future()
        waiter = (port, until, future)
        self._waiting.append(waiter)
        try:
            async with asyncio.timeout(within):
                return await future
        finally:
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiter)

    def changed(self, port: str | None) -> None:
        """Check again the waiters of ``port`` (None: of every pen)."""
        for waiting_port, until, future in list(self._waiting):
            if future.done() or (port is not None and waiting_port != port):
                continue
            view = self._view(waiting_port)
            if until(view):
                future.set_result(view)
