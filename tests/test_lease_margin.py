"""The lease margin PROTOCOL.md section 10 states, proven over a real pseudo-terminal.

The controller's PenLink renews the arming four times per lease (every 62.5 ms of
250 ms). A strict simulated pen (FirmwareConfig(strict=True): the lease runs out
exactly lease_ms after the arrival of the Arm or the last Renew) loses exactly the
next N Renew frames on its way in (FaultKind.DROP_RENEWS), deterministically:

* two lost in a row, in 20 trials: the pen never lets its lease run out (the third
  Renew arrives with about 62.5 ms to spare);
* three lost in a row: the pen stops by itself, exactly one lease after the last
  Renew it heard.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from controller.link import PenLink, PenLinkConfig
from controller.link.lease import RENEWALS_PER_LEASE
from controller.link.pen_link import LinkEvent
from firmware_protocol import MessageReceived
from firmware_protocol.messages import (
    Arm,
    Armed,
    Disarmed,
    Message,
    MotorStarted,
    MotorStopped,
    Renew,
    SetDepth,
    StopReason,
)
from simulated_pen.device import SimulatedPen
from simulated_pen.faults import Fault, FaultKind
from simulated_pen.firmware import FirmwareConfig
from simulated_pen.runner import PenRunner

LEASE_MS = 250
TRIALS = 20
DEPTH_UM = 1000
LOSE_TWO = Fault(FaultKind.DROP_RENEWS, amount=2)
LOSE_THREE = Fault(FaultKind.DROP_RENEWS, amount=3)


class Watch:
    """What the host heard and the Renews the pen's firmware took, each awaitable."""

    def __init__(self, pen: SimulatedPen) -> None:
        self.messages: list[Message] = []
        self.renews: list[float] = []  # arrival times of Renews the firmware handled
        self.changed = asyncio.Event()
        handle = pen.firmware.handle

        def counting(message: Message, now: float) -> list[Message]:
            if isinstance(message, Renew):
                self.renews.append(now)
                self.changed.set()
            return handle(message, now)

        pen.firmware.handle = counting  # type: ignore[method-assign]

    def on_event(self, event: LinkEvent) -> None:
        if isinstance(event, MessageReceived):
            self.messages.append(event.message)
            self.changed.set()

    async def until(self, condition: Callable[[], bool], within: float = 5.0) -> None:
        async with asyncio.timeout(within):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


async def test_two_lost_renewals_never_expire_the_lease_three_stop_the_pen_within_it() -> None:
    assert RENEWALS_PER_LEASE == 4
    async with PenRunner(seed=11, config=FirmwareConfig(strict=True)) as runner:
        (slot,) = await runner.start(1, "pty")
        pen = slot.pen
        watch = Watch(pen)
        link = PenLink(PenLinkConfig(url=slot.address, reconnect_initial=5.0), watch.on_event)
        task = asyncio.create_task(link.run())
        try:
            async with asyncio.timeout(10):
                await link.wait_ready()
            link.send(SetDepth(DEPTH_UM))
            link.send(Arm(LEASE_MS, 7, DEPTH_UM, DEPTH_UM))  # armed exactly at the limit
            await watch.until(lambda: any(isinstance(m, Armed) for m in watch.messages))
            link.keep_armed(7, LEASE_MS)
            await watch.until(lambda: len(watch.renews) >= 3)  # renewing steadily

            gaps: list[float] = []
            for trial in range(TRIALS):
                heard = len(watch.renews)
                runner.apply(pen, lambda p, now: p.inject(LOSE_TWO, now))
                # The Renew that ends the gap, and one more to see the pen through it.
                await watch.until(lambda heard=heard: len(watch.renews) >= heard + 2)
                gaps.append(watch.renews[heard] - watch.renews[heard - 1])
                assert pen.stats.renews_dropped == 2 * (trial + 1)
                assert pen.armed, f"trial {trial}: the pen disarmed"
            margins_ms = sorted(round((LEASE_MS / 1000 - g) * 1000, 1) for g in gaps)
            assert pen.firmware.lease_expiries == 0, f"margins left (ms): {margins_ms}"
            assert not [m for m in watch.messages if isinstance(m, Disarmed)]
            # The gap is three renewal periods (187.5 ms), so the margin is about 62.5 ms.
            assert all(g < LEASE_MS / 1000 for g in gaps), margins_ms
            assert all(g > 0.75 * LEASE_MS / 1000 - 0.005 for g in gaps), margins_ms

            # Three lost in a row: the needle, running now, stops within the lease.
            runner.apply(pen, lambda p, now: p.set_contact(True, now))
            runner.apply(pen, lambda p, now: p.press_button(now))
            await watch.until(lambda: any(isinstance(m, MotorStarted) for m in watch.messages))
            heard = len(watch.renews)
            runner.apply(pen, lambda p, now: p.inject(LOSE_THREE, now))
            await watch.until(lambda: Disarmed(StopReason.LEASE_EXPIRED) in watch.messages)
            stops = [m for m in watch.messages if isinstance(m, MotorStopped)]
            assert [m.reason for m in stops] == [StopReason.LEASE_EXPIRED]
            assert pen.firmware.lease_expiries == 1
            assert pen.firmware.last_lease_expiry is not None
            granted, expired = pen.firmware.last_lease_expiry
            assert granted == watch.renews[heard - 1]  # the last Renew the pen heard...
            assert abs(expired - granted - LEASE_MS / 1000) < 1e-9  # ...plus the lease
            assert not pen.running and not pen.armed
        finally:
            link.stop_renewing()
            await link.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
