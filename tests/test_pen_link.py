"""PenLink over both transports a clinic uses: a serial device path and socket://."""

from __future__ import annotations

import asyncio

import pytest

from controller.link import LinkDown, LinkUp, PenLink, PenLinkConfig
from controller.link.pen_link import LinkEvent
from firmware_protocol import MessageReceived
from firmware_protocol.messages import Telemetry
from simulated_pen.runner import PenRunner


@pytest.mark.parametrize("transport", ["pty", "tcp"])
async def test_link_comes_up_streams_and_notices_the_pen_going_away(transport: str) -> None:
    events: list[LinkEvent] = []
    got = asyncio.Event()

    def on_event(event: LinkEvent) -> None:
        events.append(event)
        got.set()

    runner = PenRunner(seed=3)
    (slot,) = await runner.start(1, "pty" if transport == "pty" else "tcp")
    link = PenLink(PenLinkConfig(url=slot.address, reconnect_initial=5.0), on_event)
    task = asyncio.create_task(link.run())
    try:
        async with asyncio.timeout(10):
            await link.wait_ready()
            while (
                sum(
                    isinstance(e, MessageReceived) and isinstance(e.message, Telemetry)
                    for e in events
                )
                < 20
            ):
                got.clear()
                await got.wait()
        assert isinstance(events[0], LinkUp)
        assert link.conn.stats.unreliable_lost == 0
        runner.close()  # the pen is switched off / the cable is pulled
        async with asyncio.timeout(5):
            while not any(isinstance(e, LinkDown) for e in events):
                got.clear()
                await got.wait()
        assert not link.ready
    finally:
        await link.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        runner.close()
