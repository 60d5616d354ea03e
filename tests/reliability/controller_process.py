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
from controller.sessions import (
    Actor,
    ArmPen,
    CreateSession,
    EventKind,
    ResumeSession,
    Role,
    SelectZone,
    SessionEvent,
    SetZoneDepth,
    StartSession,
)

THERAPIST = Actor("t-0001", Role.THERAPIST)


async def main(state_dir: Path, url: str, zone: str, depth_um: int) -> None:
    settings = load_settings(
        None, state_dir=state_dir, pens=[{"url": url, "name": "room1"}], mqtt={"enabled": False}
    )
    service = ControllerService(settings)
    sub = service.subscribe(10_000)
    await service.start()
    await service.pens["room1"].link.wait_ready()
    while service.registry.pen("room1").cartridge_id is None:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    sid = service.registry.live_session_id("room1")
    if sid is None:
        sid = service.new_session_id()
        service.act(CreateSession(sid, "room1", "client-ref-9", "full_face", THERAPIST))
        service.act(StartSession(sid, THERAPIST))
        service.act(SelectZone(sid, zone, THERAPIST))
        service.act(SetZoneDepth(sid, depth_um, THERAPIST))
    else:
        session = service.session(sid)
        assert session is not None
        print(f"recovered {sid} {session.state.value}", flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # the therapist taps Resume
        service.act(ResumeSession(sid, THERAPIST))
    await service.act_and_wait(ArmPen(sid, THERAPIST), lambda e: e.kind == EventKind.ARMED)
    print(f"armed {sid}", flush=True)
    while True:
        item = await sub.queue.get()
        if isinstance(item, SessionEvent) and item.kind in (
            EventKind.PASS_STARTED,
            EventKind.PASS_ENDED,
        ):
            print(f"{item.kind.value} {item.detail.get('number')}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])))
