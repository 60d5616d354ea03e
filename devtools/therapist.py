"""The scripted therapist: a program at one pen's tablet.

The demo's clinic, the benchmarks' breaching pens and the end-to-end tests all
need someone who opens a session, picks a zone and a depth, arms, and after a
fault or an interruption gets the pen back into treatment. This is that someone,
written once. It drives the controller only as a tablet does, through the
service's public calls (:class:`Tablet`), one tap at a time, and it waits on
what the controller announces: session events (delivered per pen by an
:class:`EventFeed`), the answer to an Arm (``act_and_wait``), or a change of
the pen's view (``wait_for_pen``). It never polls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol

from controller.errors import ActionRefused
from controller.live import PenCondition, PenView, Subscription
from controller.safety.context import LinkStatus, SessionState
from controller.sessions import (
    AcknowledgeFault,
    Action,
    Actor,
    ArmPen,
    CreateSession,
    DisarmPen,
    EndSession,
    EventKind,
    ResumeSession,
    SelectZone,
    SessionEvent,
    SetZoneDepth,
    StartSession,
)


class Tablet(Protocol):
    """The calls a therapist's tablet makes to the controller (``ControllerService`` has them)."""

    def act(self, action: Action) -> object:
        """Apply an action; raises ``ActionRefused`` with the reason."""
        ...

    async def act_and_wait(
        self, action: Action, until: Callable[[SessionEvent], bool], within: float = ...
    ) -> SessionEvent:
        """Act, then wait for the first session event that satisfies ``until``."""
        ...

    def new_session_id(self) -> str:
        """A fresh session id."""
        ...

    def pen_view(self, port: str) -> PenView:
        """What the tablet shows of the pen now."""
        ...

    async def wait_for_pen(self, port: str, until: PenCondition, within: float = ...) -> PenView:
        """The pen's first view that satisfies ``until``."""
        ...

    def subscribe(self, maxsize: int = ...) -> Subscription:
        """Live events and telemetry of every pen."""
        ...

    def unsubscribe(self, sub: Subscription) -> None:
        """Stop a subscription."""
        ...


def _ready(view: PenView) -> bool:
    """Connected, its state reported, its cartridge known and its telemetry measured."""
    return (
        view.link is LinkStatus.UP
        and view.cartridge_id is not None
        and view.pen_confirmed
        and view.telemetry_rate_hz is not None
    )


class Therapist:
    """One pen's therapist. ``actor`` may change between clients (a shift changes hands).

    Every method is one tap on the tablet, except :meth:`prepare`, which taps
    until the pen can be armed for a zone, and the waits. Refusals come back as
    the service raises them (``ActionRefused``), for the caller to judge.
    """

    def __init__(self, tablet: Tablet, port: str, actor: Actor) -> None:
        self.tablet = tablet
        self.port = port
        self.actor = actor
        #: This pen's session events, in order, when an :class:`EventFeed` delivers them.
        self.inbox: asyncio.Queue[SessionEvent] = asyncio.Queue()

    # --- what the tablet shows ------------------------------------------------------

    def view(self) -> PenView:
        """The pen as the tablet shows it now."""
        return self.tablet.pen_view(self.port)

    async def wait_for(self, until: PenCondition, within: float = 30.0) -> PenView:
        """Wait until the pen's view satisfies ``until`` (TimeoutError after ``within``)."""
        return await self.tablet.wait_for_pen(self.port, until, within)

    async def pen_ready(self, within: float = 30.0) -> PenView:
        """Wait until the pen is connected, has reported its state and cartridge, and its
        telemetry rate is measured (arming needs all of them)."""
        return await self.wait_for(_ready, within)

    # --- taps ---------------------------------------------------------------------------

    def open_session(self, client_ref: str, plan_id: str) -> str:
        """Create a session for ``client_ref`` on this pen and start it; its id."""
        sid = self.tablet.new_session_id()
        self.tablet.act(CreateSession(sid, self.port, client_ref, plan_id, self.actor))
        self.tablet.act(StartSession(sid, self.actor))
        return sid

    def select_zone(self, sid: str, zone_id: str) -> None:
        """Select the zone to treat."""
        self.tablet.act(SelectZone(sid, zone_id, self.actor))

    def set_depth(self, sid: str, depth_um: int) -> None:
        """Set the needle depth for the selected zone."""
        self.tablet.act(SetZoneDepth(sid, depth_um, self.actor))

    def acknowledge_fault(self, sid: str) -> None:
        """The pen and the client were checked after a fault."""
        self.tablet.act(AcknowledgeFault(sid, self.actor))

    def resume(self, sid: str) -> None:
        """Continue a paused or interrupted session (does not arm)."""
        self.tablet.act(ResumeSession(sid, self.actor))

    def disarm(self, sid: str) -> None:
        """Disarm the pen."""
        self.tablet.act(DisarmPen(sid, self.actor))

    def end_session(self, sid: str) -> None:
        """End the session; its report is then final."""
        self.tablet.act(EndSession(sid, self.actor))

    async def arm(self, sid: str, within: float = 2.0) -> SessionEvent:
        """Arm once the tablet shows the pen ready (connected, its state reported, its
        telemetry flowing), and return once the pen has confirmed the arming
        (TimeoutError after ``within``)."""
        await self.pen_ready(within=within)
        return await self.tablet.act_and_wait(
            ArmPen(sid, self.actor),
            lambda e: e.kind == EventKind.ARMED and e.session_id == sid,
            within=within,
        )

    def end_open_session(self) -> str | None:
        """End whatever session is open on the pen (an abandoned client, one recovered
        as interrupted after a restart); its id, or None if there was none."""
        sid = self.view().session_id
        if sid is not None:
            with contextlib.suppress(ActionRefused):
                self.end_session(sid)
        return sid

    async def prepare(
        self,
        sid: str,
        zone_id: str,
        depth_um: int,
        *,
        fault_check_s: Callable[[], float] | None = None,
    ) -> bool:
        """Tap until the pen can be armed for ``zone_id`` at ``depth_um``.

        Acknowledges a fault (after ``fault_check_s()`` seconds of checking the pen
        and the client), resumes a paused or interrupted session once the pen is
        back, selects the zone and sets the depth, each tap in its own turn of the
        event loop, as separate tablet requests are. False if the zone has no
        passes left (nothing to arm for), True when the pen is ready to arm.
        """
        while True:
            view = self.view()
            if view.session_state is SessionState.FAULTED:
                if fault_check_s is not None:
                    await asyncio.sleep(fault_check_s())
                self.acknowledge_fault(sid)
            elif view.session_state in (SessionState.PAUSED, SessionState.INTERRUPTED):
                await self.wait_for(lambda v: v.link is LinkStatus.UP)
                self.resume(sid)
            elif view.zone_id != zone_id:
                self.select_zone(sid, zone_id)
            elif view.passes_left == 0:
                return False
            elif view.depth_setpoint_um is None:
                self.set_depth(sid, depth_um)
            else:
                return True
            await asyncio.sleep(0)

    # --- events -------------------------------------------------------------------------

    async def next_event(self, *kinds: EventKind, within: float | None = None) -> SessionEvent:
        """The pen's next session event (of one of ``kinds``, if given); others are skipped."""
        async with asyncio.timeout(within):
            while True:
                event = await self.inbox.get()
                if not kinds or event.kind in kinds:
                    return event

    def drain(self) -> None:
        """Forget the events delivered so far: what follows is the answer to what comes next."""
        while not self.inbox.empty():
            self.inbox.get_nowait()


class EventFeed:
    """One subscription to the controller; each session event goes to its pen's therapist.

    One listener for all the therapists of a process: with a subscription each,
    every tablet-rate telemetry sample of every pen would be queued once per
    therapist on the controller's event loop, and the benchmarks run hundreds
    of pens. Subscribes at once, so nothing announced after construction is
    missed; ``async with`` (or a task running :meth:`run`) delivers.
    """

    def __init__(self, tablet: Tablet, maxsize: int = 100_000) -> None:
        self._tablet = tablet
        self._sub: Subscription | None = tablet.subscribe(maxsize)
        self._therapists: dict[str, Therapist] = {}
        self._task: asyncio.Task[None] | None = None

    def therapist(self, port: str, actor: Actor) -> Therapist:
        """The therapist of ``port``, whose inbox this feed fills."""
        therapist = self._therapists[port] = Therapist(self._tablet, port, actor)
        return therapist

    async def run(self) -> None:
        """Deliver events until cancelled, then unsubscribe."""
        try:
            sub = self._sub
            assert sub is not None, "the feed was closed"
            while True:
                item = await sub.queue.get()
                if isinstance(item, SessionEvent):
                    therapist = self._therapists.get(item.port)
                    if therapist is not None:
                        therapist.inbox.put_nowait(item)
        finally:
            self.close()

    def close(self) -> None:
        """Unsubscribe (idempotent)."""
        if self._sub is not None:
            self._tablet.unsubscribe(self._sub)
            self._sub = None

    async def __aenter__(self) -> EventFeed:
        self._task = asyncio.create_task(self.run(), name="event-feed")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.close()
