"""A controller in its own process, for tests that kill it.

Usage: python -m tests.reliability.controller_process STATE_DIR PEN_URL ZONE DEPTH_UM

Starts a controller for one pen. With a fresh journal it opens a session, selects
ZONE at DEPTH_UM and arms. With a journal holding a session on the pen it prints
``recovered SID STATE`` and waits for a line on stdin, the therapist's "resume",
before it resumes and arms (a restarted controller never does that by itself).
Then it prints one line per event (``armed SID``, ``pass_started N``,
``pass_ended N``) until it is killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from controller.config import load_settings
from controller.service import ControllerService
from controller.sessions import Actor, EventKind, Role
from devtools.therapist import EventFeed

THERAPIST = Actor("t-0001", Role.THERAPIST)


async def main(state_dir: Path, url: str, zone: str, depth_um: int) -> None:
    settings = load_settings(
        None, state_dir=state_dir, pens=[{"url": url, "name": "room1"}], mqtt={"enabled": False}
    )
    service = ControllerService(settings)
    feed = EventFeed(service, 10_000)
    therapist = feed.therapist("room1", THERAPIST)
    async with feed:
        await service.start()
        await therapist.pen_ready()
        sid = therapist.view().session_id
        if sid is None:
            sid = therapist.open_session("client-ref-9", "full_face")
            therapist.select_zone(sid, zone)
            therapist.set_depth(sid, depth_um)
        else:
            print(f"recovered {sid} {therapist.view().session_state}", flush=True)
            await asyncio.to_thread(sys.stdin.readline)  # the therapist taps Resume
            therapist.resume(sid)
        await therapist.arm(sid)
        print(f"armed {sid}", flush=True)
        while True:
            event = await therapist.next_event(EventKind.PASS_STARTED, EventKind.PASS_ENDED)
            print(f"{event.kind.value} {event.detail.get('number')}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])))
