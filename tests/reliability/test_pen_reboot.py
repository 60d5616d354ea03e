"""Scenario: the pen reboots mid-pass (a watchdog or power glitch), session after session.

Counted: reboots injected, sessions faulted, passes treated, and what a restarted
controller reads back from its journal. Asserted: each reboot faults its session,
the link comes back by itself but treatment does not, and the journal holds every
pass of every session exactly (moved here from test_controller_e2e and repeated).
"""

from __future__ import annotations

from pathlib import Path

from controller.safety.context import SessionState
from controller.sessions import (
    CreateSession,
    EndSession,
    EventKind,
    SelectZone,
    SetZoneDepth,
    StartSession,
)

from ..controller_rig import THERAPIST, Rig, start_rig, stop_rig
from .conftest import Record
from .figures import Figures

REBOOTS = 3


async def _new_session(rig: Rig) -> str:
    """A fresh cartridge and a new session on cheeks, armed."""
    svc = rig.service
    inserted = sum(e.kind is EventKind.CARTRIDGE_INSERTED for e in rig.events)
    rig.physical(0, lambda p, now: p.remove_cartridge(now))
    rig.physical(0, lambda p, now: p.insert_cartridge(now))
    await rig.wait_nth(EventKind.CARTRIDGE_INSERTED, inserted + 1)
    sid = svc.new_session_id()
    svc.act(CreateSession(sid, rig.port(), "client-ref-1", "full_face", THERAPIST))
    svc.act(StartSession(sid, THERAPIST))
    svc.act(SelectZone(sid, "cheeks", THERAPIST))
    svc.act(SetZoneDepth(sid, 1000, THERAPIST))
    await rig.arm(sid)
    return sid


async def test_pen_reboot_mid_pass_faults_and_never_resumes(tmp_path: Path, record: Record) -> None:
    rig, collector = await start_rig(tmp_path)
    assert rig.runner is not None
    runner, slots = rig.runner, rig.slots
    sids: list[str] = []
    resumed = faulted = 0
    began = runner.now()
    try:
        for n in range(1, REBOOTS + 1):
            sid = await _new_session(rig)
            sids.append(sid)
            await rig.one_pass()
            rig.physical(0, lambda p, now: p.set_contact(True, now))
            rig.physical(0, lambda p, now: p.press_button(now))
            await rig.wait_nth(EventKind.PASS_STARTED, 2 * n)
            rig.physical(0, lambda p, now: p.reboot(now, graceful=False))
            await rig.wait_nth(EventKind.FAULT, n)
            await rig.wait_nth(EventKind.PEN_CONNECTED, n + 1)  # the link comes back...
            session = rig.service.session(sid)
            assert session is not None
            faulted += session.state is SessionState.FAULTED
            resumed += rig.pen().armed  # ...treatment does not
            rig.physical(0, lambda p, now: p.release_button(now))
            rig.physical(0, lambda p, now: p.set_contact(False, now))
            rig.service.act(EndSession(sid, THERAPIST))
        window = runner.now() - began
        before = rig.service.registry.to_dict()
        journal_matches = rig.service.journaled_registry() == before
    finally:
        await stop_rig(rig, collector, close_runner=False)
    # A restarted controller reads every session back from the journal.
    rig, collector = await start_rig(tmp_path, runner=runner, slots=slots)
    try:
        recovered = [rig.service.session(sid) for sid in sids]
        passes = [len(s.passes) if s else 0 for s in recovered]
        figures = record(
            Figures(
                scenario="pen reboot",
                injected="the pen rebooted mid-pass (new boot id, link lost, motor stopped)",
                faults=REBOOTS,
                window_s=round(window, 2),
                unit="passes in the journal",
                sent=2 * REBOOTS,
                received=sum(passes),
                lost=sum(max(0, 2 - p) for p in passes),
                duplicated=sum(max(0, p - 2) for p in passes),
                detail={
                    "sessions_faulted": faulted,
                    "resumed_by_itself": resumed,
                    "journal_equals_registry": journal_matches,
                    "restart_equals_before": rig.service.registry.to_dict()["sessions"]
                    == before["sessions"],
                    "fault_records_in_journal": sum(
                        s is not None and s.fault is not None for s in recovered
                    ),
                },
            )
        )
        assert figures.detail["sessions_faulted"] == REBOOTS
        assert figures.detail["resumed_by_itself"] == 0
        assert figures.detail["fault_records_in_journal"] == REBOOTS
        assert figures.detail["journal_equals_registry"]
        assert figures.detail["restart_equals_before"]
        assert (figures.lost, figures.duplicated) == (0, 0)
        assert figures.received == figures.sent
    finally:
        await stop_rig(rig, collector)
