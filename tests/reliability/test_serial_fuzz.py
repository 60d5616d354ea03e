"""Scenario: fuzzed serial bytes into both ends of a live link.

While a pen is armed and streaming over a real pseudo-terminal, random garbage
and near-frames (real frames with one bit flipped, so the CRC must reject them)
are written into the controller's side of the pty and into the pen's side.
The near-frames carry what would be dangerous if accepted: a depth of 2.4 mm, an
Arm, a telemetry sample far too deep. Counted: chunks injected each way, frames
each end rejected. Asserted: no crash, every near-frame rejected and counted,
no command outside the zone's limits reached the pen, and the link then treats.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

from controller.sessions import EventKind
from firmware_protocol.connection import LinkStats
from firmware_protocol.framing import HEADER_SIZE, FrameKind, encode_frame
from firmware_protocol.messages import Arm, Message, SetDepth, Telemetry, encode_message

from ..controller_rig import start_rig, stop_rig
from .conftest import Record
from .figures import Figures
from .probes import probe

ROUNDS = 300
DEPTH_UM = 1000  # what the controller sets; cheeks allows 1500
TO_PEN = (SetDepth(2400), Arm(7, 250, 2400, 2500))
TO_HOST = (Telemetry(1, 1000, 2400, 100, 300, 3000, 3900, 5, 0x47, 1),)


def near_frame(rng: random.Random, message: Message) -> bytes:
    """A well-formed frame with one bit flipped after the header: only the CRC can tell."""
    frame = bytearray(
        encode_frame(
            FrameKind.RELIABLE, rng.randrange(1 << 16), message.TYPE, encode_message(message)
        )
    )
    at = rng.randrange(HEADER_SIZE, len(frame))
    frame[at] ^= 1 << rng.randrange(8)
    return bytes(frame)


def garbage(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randrange(1, 64))


def _rejected(stats: LinkStats) -> int:
    return int(stats.crc_errors) + int(stats.header_errors)


async def test_fuzzed_serial_bytes_are_rejected_and_the_link_recovers(
    tmp_path: Path, record: Record
) -> None:
    rng = random.Random(77)
    rig, collector = await start_rig(tmp_path)
    slot = rig.slots[0]
    pen = slot.pen
    link = rig.service.pens[rig.port()].link
    pen_side = os.open(slot.address, os.O_WRONLY | os.O_NOCTTY)  # a second writer on the cable
    try:
        await rig.start_treating("cheeks", DEPTH_UM)
        seen = probe(pen)
        host_before, pen_before = _rejected(link.conn.stats), _rejected(pen.connection.stats)
        near_host = near_pen = 0
        began = time.monotonic()
        for i in range(ROUNDS):
            if i % 2:
                slot.transport.write(near_frame(rng, rng.choice(TO_HOST)))
                near_host += 1
                os.write(pen_side, near_frame(rng, rng.choice(TO_PEN)))
                near_pen += 1
            else:
                slot.transport.write(garbage(rng))
                os.write(pen_side, garbage(rng))
            await asyncio.sleep(0.005)  # the injection rate: ~200 chunks/s each way
        window = time.monotonic() - began
        host_rejected = _rejected(link.conn.stats) - host_before
        pen_rejected = _rejected(pen.connection.stats) - pen_before
        await link.wait_ready()  # may have dropped and come back
        if rig.service.registry.pen(rig.port()).arm.value != "armed":
            sid = rig.service.registry.live_session_id(rig.port())
            assert sid is not None
            await rig.arm(sid)
        ended = await rig.one_pass()  # the link treats again
        dangerous: list[object] = [d for d in seen.depths_set() if d != DEPTH_UM]
        dangerous += [m for m in seen.commands(Arm) if isinstance(m, Arm) and m.token == 7]
        figures = record(
            Figures(
                scenario="fuzzed serial bytes",
                injected="random bytes and one-bit-damaged frames (SetDepth 2.4 mm, Arm, "
                "telemetry at 2.4 mm) written into both sides of the pty",
                faults=2 * ROUNDS,
                window_s=round(window, 2),
                unit="near-frames (must all be rejected)",
                sent=near_host + near_pen,
                received=len(dangerous),  # near-frames that got through as commands
                lost=0,
                duplicated=0,
                detail={
                    "chunks_to_host": ROUNDS,
                    "chunks_to_pen": ROUNDS,
                    "near_frames_to_host": near_host,
                    "near_frames_to_pen": near_pen,
                    "host_frames_rejected": host_rejected,
                    "pen_frames_rejected": pen_rejected,
                    "host_bytes_discarded": link.conn.stats.discarded_bytes,
                    "link_reconnects": link.connects - 1,
                    "dangerous_commands_applied": len(dangerous),
                    "pass_after_fuzz": ended.detail.get("reason"),
                    "controller_tasks_alive": all(not t.done() for t in rig.service._tasks),
                },
            )
        )
        assert figures.detail["controller_tasks_alive"]
        assert figures.detail["host_frames_rejected"] >= near_host
        assert figures.detail["pen_frames_rejected"] >= near_pen
        assert figures.received == 0  # nothing outside the limits reached the pen
        assert all(d <= DEPTH_UM for d in seen.depths_set())
        assert not any(e.kind is EventKind.STOP_SENT for e in rig.events)  # no false overshoot
        assert figures.detail["pass_after_fuzz"] == "button_released"
    finally:
        os.close(pen_side)
        await stop_rig(rig, collector)
