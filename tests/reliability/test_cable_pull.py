"""Scenario: cable pull mid-pass, and the cable plugged back in.

The controller reaches the pen through socat, which joins the controller's own
pseudo-terminal to the pen's: killing socat is pulling the cable (the controller's
tty hangs up, the pen hears nothing more), starting it again is plugging it back.
Counted per pull: how long the running pen took to stop by itself against its
lease. Asserted: the session goes INTERRUPTED, the pen stays disarmed after the
link returns until the therapist resumes and arms, and every pass is recorded once.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from controller.safety.context import SessionState
from controller.sessions import EventKind, ResumeSession
from simulated_pen.runner import PenRunner

from ..controller_rig import THERAPIST, Rig, eventually, start_rig, stop_rig
from .conftest import Record
from .figures import Figures

LEASE_MS = 250
PULLS = 3
STOP_MARGIN_MS = 50  # one control period plus event-loop latency


class Cable:
    """A socat process between two pseudo-terminals."""

    def __init__(self, pen_path: str, host_path: Path) -> None:
        self.pen_path = pen_path
        self.host_path = host_path
        self.proc: asyncio.subprocess.Process | None = None

    async def plug(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "socat",
            f"PTY,link={self.host_path},raw,echo=0",
            f"OPEN:{self.pen_path},raw,echo=0",
        )
        await eventually(self.host_path.exists, within=5.0)  # socat makes the link

    async def pull(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)  # its tty closes; socat removes the link
        await self.proc.wait()


async def _session(rig: Rig, sid: str) -> SessionState:
    session = rig.service.session(sid)
    assert session is not None
    return session.state


async def test_cable_pull_stops_the_pen_and_only_the_therapist_resumes(
    tmp_path: Path, record: Record
) -> None:
    runner = PenRunner(seed=31)
    (slot,) = await runner.start(1, "pty")
    pen = slot.pen
    cable = Cable(slot.address, tmp_path / "cable")
    await cable.plug()
    rig, collector = await start_rig(tmp_path, urls=[str(cable.host_path)], runner=runner)
    rig.slots.append(slot)
    stops_ms: list[float] = []
    resumed_by_itself = 0
    started = asyncio.get_running_loop().time()
    try:
        sid = await rig.start_treating("cheeks", 1000)
        for n in range(1, PULLS + 1):
            rig.physical(0, lambda p, now: p.set_contact(True, now))
            rig.physical(0, lambda p, now: p.press_button(now))
            await rig.wait_nth(EventKind.PASS_STARTED, n)
            assert pen.running
            pulled_at = runner.now()
            await cable.pull()
            await eventually(lambda: not pen.running, within=2.0)
            stops_ms.append(round((runner.now() - pulled_at) * 1000, 1))
            await rig.wait_nth(EventKind.PEN_DISCONNECTED, n)
            assert await _session(rig, sid) is SessionState.INTERRUPTED
            # The therapist lets go; then the cable goes back in.
            rig.physical(0, lambda p, now: p.release_button(now))
            rig.physical(0, lambda p, now: p.set_contact(False, now))
            await cable.plug()
            await rig.wait_nth(EventKind.PEN_CONNECTED, n + 1, within=10.0)
            await eventually(lambda: rig.service.registry.pen(rig.port()).cartridge_id is not None)
            if pen.armed or await _session(rig, sid) is not SessionState.INTERRUPTED:
                resumed_by_itself += 1
            rig.service.act(ResumeSession(sid, THERAPIST))
            await rig.arm(sid)
        await rig.one_pass()  # the link works as before
        window = asyncio.get_running_loop().time() - started
        session = rig.service.session(sid)
        assert session is not None
        ended = [e for e in rig.events if e.kind is EventKind.PASS_ENDED]
        figures = record(
            Figures(
                scenario="cable pull",
                injected="the serial cable pulled mid-pass (socat between two ptys killed), "
                "then plugged back in",
                faults=PULLS,
                window_s=round(window, 2),
                unit="passes",
                sent=PULLS + 1,
                received=session.zones["cheeks"].passes_done,
                lost=PULLS + 1 - len(ended),
                duplicated=len(ended) - len({e.detail["number"] for e in ended}),
                pen_stop_ms=stops_ms,
                lease_ms=LEASE_MS,
                detail={
                    "interrupted_by_pull": sum(
                        e.detail.get("reason") != "button_released" for e in ended
                    ),
                    "resumed_by_itself": resumed_by_itself,
                    "reconnects": rig.service.pens[rig.port()].link.connects - 1,
                    "pass_end_reasons": [e.detail.get("reason") for e in ended],
                },
            )
        )
        assert len(figures.pen_stop_ms) == PULLS
        assert figures.pen_stop_ms_max <= LEASE_MS + STOP_MARGIN_MS
        assert figures.detail["resumed_by_itself"] == 0
        assert figures.detail["reconnects"] == PULLS
        assert (figures.lost, figures.duplicated) == (0, 0)
        assert figures.received == figures.sent
    finally:
        await stop_rig(rig, collector)
        if cable.proc is not None and cable.proc.returncode is None:
            await cable.pull()
