"""Many simulated pens in one process and one event loop, driven by one timer.

Every pen's periodic work (control loop, telemetry) falls on a grid of its own
phase, as with real pens whose clocks are independent. A single ``call_at``
timer serves all pens: it wakes at the earliest next deadline of any pen, but
at most once per millisecond, and ticks every pen that is due. Bytes from a host are handled
as soon as they arrive (a Stop takes effect on the pen at once) and the pen's
answer is written in the same callback.

Per-tick cost is one ``next_deadline()`` per pen plus the work of the pens that
are due, so it scales linearly in pens; see the figures in the package README.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, TypeVar

from firmware_protocol.connection import LinkConfig

from .device import SimulatedPen
from .faults import LineNoise, ScriptEntry
from .firmware import FirmwareConfig
from .hand import HandConfig
from .transports import MemoryTransport, PtyTransport, TcpTransport, Transport

TransportKind = Literal["pty", "tcp", "memory"]
#: Least time between two timer wake-ups; a pen's periodic work is at most this late.
COALESCE_S = 0.001
T = TypeVar("T")


@dataclass
class PenSlot:
    """A running pen and the transport that carries its bytes."""

    pen: SimulatedPen
    transport: Transport

    @property
    def serial(self) -> str:
        return self.pen.serial

    @property
    def address(self) -> str:
        return self.transport.address


@dataclass
class RunnerStats:
    wakeups: int = 0  # timer callbacks
    ticks: int = 0  # pen.tick calls made by the timer
    received_chunks: int = 0  # reads from hosts
    lateness_max: float = 0.0  # how long after the earliest due deadline the timer ran
    lateness_sum: float = 0.0
    busy_s: float = 0.0  # wall time spent inside timer callbacks
    busy_max: float = 0.0  # the longest timer callback

    @property
    def lateness_mean(self) -> float:
        return self.lateness_sum / self.wakeups if self.wakeups else 0.0


class PenRunner:
    """Creates pens with their transports and runs them until closed.

    Use as ``async with PenRunner(...) as runner: await runner.start(4)``.
    Serials are ``{prefix}-{n:04d}`` from ``first_index`` on; each pen's randomness
    derives from ``seed`` and its serial. ``script`` entries apply at
    ``runner start + entry.at`` to the pens they name.
    """

    def __init__(
        self,
        *,
        seed: int | str = 0,
        prefix: str = "SIM",
        first_index: int = 1,
        config: FirmwareConfig | None = None,
        link_config: LinkConfig | None = None,
        line_noise: LineNoise | None = None,
        auto_hand: bool = False,
        hand_config: HandConfig | None = None,
        script: Iterable[ScriptEntry] = (),
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.seed = seed
        self.prefix = prefix
        self.config = config
        self.link_config = link_config
        self.line_noise = line_noise
        self.auto_hand = auto_hand
        self.hand_config = hand_config
        self.script = list(script)
        self.started_at = self.loop.time()
        self.stats = RunnerStats()
        self.slots: list[PenSlot] = []
        self._by_serial: dict[str, PenSlot] = {}
        self._next_index = first_index
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._closed = False

    async def __aenter__(self) -> PenRunner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def now(self) -> float:
        """The pens' clock: the event loop's monotonic time."""
        return self.loop.time()

    # -- creating pens ------------------------------------------------------------------

    async def add_pen(
        self, transport: TransportKind = "pty", *, host: str = "127.0.0.1", port: int = 0
    ) -> PenSlot:
        """Boot one more pen behind a new transport (``port`` only for TCP; 0 = any free)."""
        if self._closed:
            raise RuntimeError("runner is closed")
        serial = f"{self.prefix}-{self._next_index:04d}"
        if serial in self._by_serial:
            raise ValueError(f"duplicate serial {serial}")
        self._next_index += 1
        now = self.loop.time()
        script = [(self.started_at + e.at, e.fault) for e in self.script if e.applies_to(serial)]
        pen = SimulatedPen(
            serial,
            now=now,
            seed=self.seed,
            config=self.config,
            link_config=self.link_config,
            line_noise=self.line_noise,
            auto_hand=self.auto_hand,
            hand_config=self.hand_config,
            script=script,
        )
        holder: list[PenSlot] = []

        def on_receive(data: bytes) -> None:
            self._on_receive(holder[0], data)

        t: Transport
        if transport == "pty":
            t = PtyTransport(on_receive)
        elif transport == "tcp":
            t = await TcpTransport.start(on_receive, host, port)
        elif transport == "memory":
            t = MemoryTransport(on_receive, serial)
        else:
            raise ValueError(f"unknown transport {transport!r}")
        slot = PenSlot(pen, t)
        holder.append(slot)
        self.slots.append(slot)
        self._by_serial[serial] = slot
        self._write(slot)
        self._schedule(pen.next_deadline())
        return slot

    async def start(
        self,
        count: int,
        transport: TransportKind = "pty",
        *,
        host: str = "127.0.0.1",
        base_port: int = 0,
    ) -> list[PenSlot]:
        """Boot ``count`` pens. TCP pens listen on base_port, base_port+1, ... (0: any)."""
        slots = []
        for i in range(count):
            port = base_port + i if base_port else 0
            slots.append(await self.add_pen(transport, host=host, port=port))
        return slots

    # -- access -------------------------------------------------------------------------

    def slot(self, pen: str | SimulatedPen) -> PenSlot:
        serial = pen if isinstance(pen, str) else pen.serial
        return self._by_serial[serial]

    def apply(self, pen: str | SimulatedPen, action: Callable[[SimulatedPen, float], T]) -> T:
        """Run ``action(pen, now)`` (a physical input, a fault) and send what it caused."""
        slot = self.slot(pen)
        result = action(slot.pen, self.loop.time())
        self._write(slot)
        self._schedule(slot.pen.next_deadline())
        return result

    def close(self) -> None:
        """Stop the timer and close every transport."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for slot in self.slots:
            slot.transport.close()

    # -- the loop -----------------------------------------------------------------------

    def _write(self, slot: PenSlot) -> None:
        data = slot.pen.data_to_send()
        if data:
            slot.transport.write(data)

    def _on_receive(self, slot: PenSlot, data: bytes) -> None:
        if self._closed:
            return
        self.stats.received_chunks += 1
        pen = slot.pen
        pen.receive_data(data, self.loop.time())
        self._write(slot)
        self._schedule(pen.next_deadline())

    def _schedule(self, at: float) -> None:
        if self._closed or at >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        if self._closed:
            return
        now = self.loop.time()
        began = time.perf_counter()
        stats = self.stats
        stats.wakeups += 1
        earliest = math.inf
        first_due = math.inf
        ticks = 0
        for slot in self.slots:
            pen = slot.pen
            d = pen.next_deadline()
            if d <= now:
                if d < first_due:
                    first_due = d
                pen.tick(now)
                ticks += 1
                data = pen.data_to_send()
                if data:
                    slot.transport.write(data)
                d = pen.next_deadline()
            if d < earliest:
                earliest = d
        stats.ticks += ticks
        if ticks:
            late = now - first_due
            stats.lateness_sum += late
            if late > stats.lateness_max:
                stats.lateness_max = late
        # At most one wake-up per COALESCE_S: pens tick on grids of their own phase
        # (as real pens do), so without this the runner would wake once per pen per
        # period and scan every pen each time. Also never re-arms in the past, where
        # a pen whose deadline failed to move would spin the loop.
        self._schedule(max(earliest, now + COALESCE_S))
        busy = time.perf_counter() - began
        stats.busy_s += busy
        if busy > stats.busy_max:
            stats.busy_max = busy
