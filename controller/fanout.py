"""Where what the core decided goes: the edge over the channel, and in-process listeners.

Events reach :meth:`Fanout.publish` once their records are durable, in decision
order (the executor guarantees both); each is numbered with its decision index,
which is how a caller tells the answer to its own action from an earlier one.
Telemetry reaches :meth:`Fanout.telemetry` for every sample (the hot path: an
append for the edge, and a tablet-rate sample for in-process subscribers when
there are any). In-process listeners are the scripted therapist and the tests;
the tablet and MQTT are served by the edge process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Final

import structlog

from firmware_protocol.messages import Telemetry

from .channel.core_side import CoreChannel, PenTags
from .contract import EventKind
from .live import LiveTelemetry, Subscription
from .sessions import SessionEvent

log = structlog.get_logger(__name__)

#: Session events worth a line in the service log (telemetry-rate ones are not).
LOGGED_EVENTS: Final = frozenset(
    {
        EventKind.SESSION_CREATED,
        EventKind.STATE_CHANGED,
        EventKind.PASS_ENDED,
        EventKind.ZONE_COMPLETED,
        EventKind.OVERRIDE_APPLIED,
        EventKind.STOP_SENT,
        EventKind.REFUSED,
        EventKind.FAULT,
        EventKind.SESSION_REPORT,
    }
)

Waiter = tuple[Callable[[SessionEvent], bool], "asyncio.Future[SessionEvent]"]


class Fanout:
    """See the module docstring."""

    def __init__(self, live_rate_hz: float = 10.0) -> None:
        self.live_period = 1.0 / live_rate_hz
        self.channel: CoreChannel | None = None
        self.subscribers: set[Subscription] = set()
        self.waiters: list[Waiter] = []
        #: Events decided so far (the next one's index) and published so far.
        self.decided = 0
        self.published = 0
        self._last_live: dict[str, float] = {}

    # --- events ---------------------------------------------------------------------------

    def publish(self, events: Sequence[SessionEvent]) -> None:
        """Durable events, in decision order."""
        indexed = []
        for event in events:
            indexed.append((self.published, event))
            self.published += 1
            if event.kind in LOGGED_EVENTS:
                log.info(
                    event.kind.value,
                    port=event.port,
                    session=event.session_id,
                    **{k: v for k, v in event.detail.items() if isinstance(v, str | int | float)},
                )
            for sub in self.subscribers:
                sub.offer(event)
            for until, future in list(self.waiters):
                if not future.done() and until(event):
                    future.set_result(event)
        if self.channel is not None and indexed:
            self.channel.events(indexed)

    def state(self, parts: dict[str, Any]) -> None:
        """Durable records an outcome changed: the edge's mirror follows them."""
        if self.channel is not None:
            self.channel.state({"pens": parts["pens"], "sessions": parts["sessions"]})

    # --- telemetry ------------------------------------------------------------------------

    def telemetry(self, tags: PenTags, sample: Telemetry, now: float) -> None:
        """One sample of the pen ``tags[0]``; cheap when nobody listens in-process."""
        channel = self.channel
        if channel is not None:
            channel.telemetry(tags, now, sample.encode())
        if not self.subscribers:
            return
        port = tags[0]
        if now - self._last_live.get(port, 0.0) < self.live_period:
            return
        self._last_live[port] = now
        item = LiveTelemetry.of(port, tags[2], now, sample)
        for sub in self.subscribers:
            sub.offer(item)

    # --- in-process listeners ---------------------------------------------------------------

    def subscribe(self, maxsize: int) -> Subscription:
        sub = Subscription(maxsize)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self.subscribers.discard(sub)

    def add_waiter(self, waiter: Waiter) -> None:
        self.waiters.append(waiter)

    def remove_waiter(self, waiter: Waiter) -> None:
        with contextlib.suppress(ValueError):
            self.waiters.remove(waiter)
