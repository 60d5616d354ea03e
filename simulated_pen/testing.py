"""Host-side helpers for driving simulated pens in tests, benchmarks and demos.

* ``PenHarness``: a SimulatedPen and a HostConnection wired together in memory on a
  controlled clock. Pure and deterministic: it records every byte both ways.
* ``AsyncHost``: a HostConnection driven by asyncio over any byte transport (a
  pyserial port, a TCP stream, an in-memory pipe); await messages with a timeout.

Neither is the controller: they send exactly what they are told and nothing else
(no automatic renewals), which is what a test of the pen needs.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any, TypeVar

from firmware_protocol.connection import (
    Connected,
    Event,
    HandshakeRefused,
    HostConnection,
    LinkConfig,
    LinkFailed,
    MessageReceived,
)
from firmware_protocol.messages import Identity, Message

from .device import SimulatedPen

M = TypeVar("M", bound=Message)


class HarnessStuckError(RuntimeError):
    """The harness made no progress in time (a deadline that never moves forward)."""


class PenHarness:
    """One pen and one host on a perfect in-memory wire, on a clock the test controls."""

    def __init__(
        self,
        pen: SimulatedPen | None = None,
        *,
        now: float = 0.0,
        host_config: LinkConfig | None = None,
        **pen_kwargs: Any,
    ) -> None:
        self.now = now
        if pen is None:
            pen_kwargs.setdefault("serial", "SIM-0001")
            pen = SimulatedPen(now=now, **pen_kwargs)
        self.pen = pen
        self.host = HostConnection(host_config)
        self.received: list[tuple[float, Message]] = []
        self.events: list[tuple[float, Event]] = []
        self.to_host = bytearray()  # every byte the pen wrote
        self.to_pen = bytearray()  # every byte the host wrote
        self.host_silent = False  # drop what the host writes (a pulled cable, host side)

    # -- driving ----------------------------------------------------------------------

    def pump(self) -> None:
        """Move bytes both ways at the current time until nobody has anything to say."""
        pen, host, now = self.pen, self.host, self.now
        for _ in range(1000):
            down = pen.data_to_send()
            if down:
                self.to_host += down
                self._record(host.receive_data(down, now))
            up = host.data_to_send()
            if up and not self.host_silent:
                self.to_pen += up
                pen.receive_data(up, now)
            if not down and not up:
                return
        raise HarnessStuckError("the two ends kept talking for 1000 rounds at one instant")

    def run(self, until: float, stop: Callable[[], bool] | None = None) -> bool:
        """Advance time to ``until`` deadline by deadline. Returns True if ``stop`` fired."""
        self.pump()
        if stop is not None and stop():
            return True
        spins = 0
        while True:
            t = min(self.pen.next_deadline(), until)
            hd = self.host.next_deadline()
            if hd is not None and hd < t:
                t = hd
            if t > self.now:
                self.now, spins = t, 0
            else:
                spins += 1
                if spins > 1000:
                    raise HarnessStuckError(f"deadline stuck at {self.now}")
            self.pen.tick(self.now)
            if hd is not None and hd <= self.now:
                self._record(self.host.handle_timeout(self.now))
            self.pump()
            if stop is not None and stop():
                return True
            if self.now >= until:
                return False

    def advance(self, seconds: float) -> None:
        self.run(self.now + seconds)

    def send(self, message: Message) -> int | None:
        """Send from the host now and deliver at once."""
        seq = self.host.send(message, self.now)
        self.pump()
        return seq

    def request(self, message: Message, answer: type[M], within: float = 1.0) -> M:
        """Send ``message`` and return the first ``answer`` that arrives after it."""
        start = len(self.received)
        self.send(message)
        return self.wait_for(answer, within=within, start=start)[1]

    def handshake(self, nonce: int = 0x5EED, within: float = 2.0) -> Identity:
        self.host.start_handshake(nonce, self.now)
        if not self.run(self.now + within, lambda: self.host.identity is not None):
            raise TimeoutError("no handshake")
        ident = self.host.identity
        assert ident is not None
        return ident

    def wait_for(
        self,
        kind: type[M],
        predicate: Callable[[M], bool] = lambda m: True,
        within: float = 1.0,
        *,
        start: int | None = None,
    ) -> tuple[float, M]:
        """Run until a message of ``kind`` satisfying ``predicate`` has arrived at index
        ``start`` or later (default: from now on); returns it with its arrival time.
        """
        if start is None:
            start = len(self.received)
        found: list[tuple[float, M]] = []

        def seen() -> bool:
            for t, m in self.received[start:]:
                if isinstance(m, kind) and predicate(m):
                    found.append((t, m))
                    return True
            return False

        if not self.run(self.now + within, seen):
            raise TimeoutError(f"no {kind.__name__} within {within} s")
        return found[0]

    def of(self, kind: type[M]) -> list[M]:
        """Every received message of one type, in order."""
        return [m for _, m in self.received if isinstance(m, kind)]

    def _record(self, events: list[Event]) -> None:
        for event in events:
            self.events.append((self.now, event))
            if isinstance(event, MessageReceived):
                self.received.append((self.now, event.message))


class AsyncHost:
    """A HostConnection over any byte transport, driven by the running event loop.

    Give it a ``write`` function; call ``feed`` with whatever the transport reads.
    Timestamps are ``loop.time()``.
    """

    def __init__(self, write: Callable[[bytes], object], config: LinkConfig | None = None) -> None:
        self._write = write
        self.loop = asyncio.get_running_loop()
        self.conn = HostConnection(config)
        self.received: list[tuple[float, Message]] = []
        self.events: list[tuple[float, Event]] = []
        self._changed = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None

    def feed(self, data: bytes) -> None:
        now = self.loop.time()
        for event in self.conn.receive_data(data, now):
            self.events.append((now, event))
            if isinstance(event, MessageReceived):
                self.received.append((now, event.message))
        self._flush()
        self._changed.set()

    def send(self, message: Message) -> int | None:
        seq = self.conn.send(message, self.loop.time())
        self._flush()
        return seq

    async def connect(self, nonce: int = 0x5EED, within: float = 2.0) -> Identity:
        """Handshake; HandshakeRefused or LinkFailed raise RuntimeError."""
        start = len(self.events)
        self.conn.start_handshake(nonce, self.loop.time())
        self._flush()
        _, event = await self.wait_event(
            lambda e: isinstance(e, Connected | HandshakeRefused | LinkFailed),
            within,
            start=start,
        )
        if not isinstance(event, Connected) or event.identity is None:
            raise RuntimeError(f"handshake failed: {event}")
        return event.identity

    async def wait_for(
        self,
        kind: type[M],
        predicate: Callable[[M], bool] = lambda m: True,
        within: float = 1.0,
        *,
        start: int | None = None,
    ) -> tuple[float, M]:
        """The first message of ``kind`` matching ``predicate`` received from index ``start``
        on (default: from now), with its arrival time. TimeoutError after ``within`` s.
        """
        index = len(self.received) if start is None else start

        def scan() -> tuple[float, M] | None:
            nonlocal index
            while index < len(self.received):
                t, m = self.received[index]
                index += 1
                if isinstance(m, kind) and predicate(m):
                    return t, m
            return None

        async with asyncio.timeout(within):
            while (hit := scan()) is None:
                self._changed.clear()
                await self._changed.wait()
        return hit

    async def wait_event(
        self, predicate: Callable[[Event], bool], within: float = 1.0, *, start: int | None = None
    ) -> tuple[float, Event]:
        index = len(self.events) if start is None else start
        async with asyncio.timeout(within):
            while True:
                while index < len(self.events):
                    t, e = self.events[index]
                    index += 1
                    if predicate(e):
                        return t, e
                self._changed.clear()
                await self._changed.wait()

    async def wait_until(self, condition: Callable[[], bool], within: float = 1.0) -> None:
        """Wait until ``condition()`` holds, re-checked whenever bytes or timeouts arrive."""
        async with asyncio.timeout(within):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    def of(self, kind: type[M]) -> list[M]:
        return [m for _, m in self.received if isinstance(m, kind)]

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self._write(data)
        deadline = self.conn.next_deadline()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None and math.isfinite(deadline):
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.loop.time()
        for event in self.conn.handle_timeout(now):
            self.events.append((now, event))
        self._flush()
        self._changed.set()
