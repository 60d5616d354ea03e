"""Records serialised once per pen per window, after the loop's I/O, before what depends on them.

See controller/commit_window.py. The rig is the real core (journal and audit files,
writer thread) with simulated pens on pseudo-terminals.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from controller import commit_window
from controller.audit import AuditEntry
from controller.commit_window import CommitWindow
from controller.config import load_settings
from controller.contract import EventKind
from controller.journal import JournalRow
from controller.persistence import RegistryJournal
from controller.service import ControllerService
from controller.sessions import SessionRegistry

from .controller_rig import Rig, start_rig, stop_rig


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig, collector = await start_rig(tmp_path)
    yield rig
    await stop_rig(rig, collector)


def _journaled_session(state_dir: Path, session_id: str) -> dict[str, Any] | None:
    """The session as the journal file holds it, read by another connection."""
    db = sqlite3.connect(state_dir / "journal.db")
    try:
        row = db.execute(
            "SELECT body FROM documents WHERE kind = 'session' AND id = ?", (session_id,)
        ).fetchone()
    finally:
        db.close()
    return None if row is None else dict(json.loads(row[0]))


def _count_saves(monkeypatch: pytest.MonkeyPatch, records: RegistryJournal) -> list[dict[str, Any]]:
    """Every serialisation of the registry from now on: the parts it wrote."""
    saved: list[dict[str, Any]] = []
    original = records.serialise

    def serialise(registry: SessionRegistry, port: str | None, also: Iterable[str] = ()) -> Any:
        rows, parts = original(registry, port, also)
        saved.append(parts)
        return rows, parts

    monkeypatch.setattr(records, "serialise", serialise)
    return saved


async def test_decisions_of_one_turn_are_serialised_once_and_announced_once_durable(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, therapist = rig.service, rig.therapist()
    state_dir = svc.settings.state_dir
    saved = _count_saves(monkeypatch, svc.records)
    sid = therapist.open_session("client-ref-1", "full_face")  # created, then started
    therapist.select_zone(sid, "cheeks")
    # Three decisions, nothing serialised in the turn that made them, nothing on disk.
    assert svc.window.pending and saved == []
    assert _journaled_session(state_dir, sid) is None
    await rig.wait_event(EventKind.ZONE_SELECTED)
    # Announced only once on disk; the one serialisation holds all three decisions.
    journaled = _journaled_session(state_dir, sid)
    assert journaled is not None and journaled["current_zone"] == "cheeks"
    assert saved[0]["sessions"][sid]["current_zone"] == "cheeks"
    assert journaled["state"] == "active"


async def test_audit_entries_land_after_the_state_they_describe(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, therapist = rig.service, rig.therapist()
    landed: list[str] = []
    write, extend = svc.journal.write, svc.audit.extend

    def journal_write(rows: list[JournalRow]) -> None:
        write(rows)
        landed.extend(f"journal {row[0]}" for row in rows)

    def audit_extend(entries: Iterable[AuditEntry]) -> Any:
        entries = list(entries)
        landed.extend(f"audit {e.kind}" for e in entries)
        return extend(entries)

    monkeypatch.setattr(svc.journal, "write", journal_write)
    monkeypatch.setattr(svc.audit, "extend", audit_extend)
    therapist.open_session("client-ref-1", "full_face")
    svc.sync_records()  # a sync serialises what the window holds at once
    assert not svc.window.pending
    assert "journal session" in landed and any(x.startswith("audit") for x in landed)
    first_audit = next(i for i, x in enumerate(landed) if x.startswith("audit"))
    assert landed.index("journal session") < first_audit, landed


@pytest.fixture
async def two_pens(tmp_path: Path) -> AsyncIterator[Rig]:
    rig, collector = await start_rig(tmp_path, pens=2)
    yield rig
    await stop_rig(rig, collector)


def _fail_for(monkeypatch: pytest.MonkeyPatch, records: RegistryJournal, port: str) -> None:
    original = records.serialise

    def serialise(registry: SessionRegistry, which: str | None, also: Iterable[str] = ()) -> Any:
        if which == port:
            raise ValueError("cannot encode")
        return original(registry, which, also)

    monkeypatch.setattr(records, "serialise", serialise)


async def test_a_pen_that_cannot_be_serialised_fails_its_window_not_the_other_pens(
    two_pens: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while serialising one pen: what waits for the window fails (an Arm would be
    withdrawn), and everything else noted in it is still written."""
    rig, svc = two_pens, two_pens.service
    _fail_for(monkeypatch, svc.records, rig.port(0))
    failing, _ = svc.window.add(rig.port(0), state=True)
    sid = rig.therapist(1).open_session("client-ref-2", "full_face")
    rig.therapist(1).end_session(sid)
    svc.sync_records()
    with pytest.raises(ValueError, match="cannot encode"):
        failing.result(5)
    journaled = _journaled_session(svc.settings.state_dir, sid)
    assert journaled is not None and journaled["state"] == "ended"
    # The next window is written as usual.
    monkeypatch.undo()
    other = rig.therapist(0).open_session("client-ref-1", "full_face")
    svc.sync_records()
    assert _journaled_session(svc.settings.state_dir, other) is not None


async def test_a_window_is_written_as_one_transaction(
    two_pens: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every pen of a window lands together with the meta document (the next arming
    token, the pens that left their port): a crash leaves the journal at one window's
    end state or the one before, never a mix of pens from different moments."""
    rig, svc = two_pens, two_pens.service
    queued: list[set[tuple[str, str]]] = []  # the journal rows of each commit queued
    add = svc.commits.add

    def commits_add(a: Sequence[JournalRow] = (), b: Sequence[AuditEntry] = ()) -> Any:
        queued.append({(row[0], row[1]) for row in a})
        return add(a, b)

    monkeypatch.setattr(svc.commits, "add", commits_add)
    first = rig.therapist(0).open_session("client-ref-1", "full_face")
    second = rig.therapist(1).open_session("client-ref-2", "full_face")
    svc.sync_records()
    assert queued == [
        {
            ("registry", "main"),
            ("pen", rig.port(0)),
            ("pen", rig.port(1)),
            ("session", first),
            ("session", second),
        }
    ]


async def test_a_window_is_written_while_notes_keep_coming(two_pens: Rig) -> None:
    """Notes made once a window is sealed go to the next one: a stream of changes to
    the pens in turn (a flood of actions through the edge) never holds a window, and
    the Arms and events waiting for it, open."""
    rig, svc = two_pens, two_pens.service
    first, _ = svc.window.add(rig.port(0), state=True)
    done = asyncio.wrap_future(first)
    noted = 0
    async with asyncio.timeout(5):
        while not done.done():
            for pen in (0, 1):
                svc.window.add(rig.port(pen), state=True)
                noted += 1
            await asyncio.sleep(0)
    await done
    assert noted > 1 and svc.window.pending  # the stream goes on into later windows


def test_without_a_running_loop_records_are_queued_at_once(tmp_path: Path) -> None:
    """Pure use (a tool, a test without a loop): nothing waits for a timer that never fires."""
    settings = load_settings(None, state_dir=tmp_path / "state", pens=[])
    svc = ControllerService(settings, channel=False)
    try:
        window: CommitWindow = svc.window
        commit, serialised = window.add(None, state=True)
        commit.result(5)
        assert not window.pending
        assert serialised is not None and serialised.parts is not None
        assert svc.records.read() is not None
    finally:
        svc.writer.close()
        svc.journal.close()
        svc.audit.close()


async def test_a_session_created_and_ended_within_one_window_is_journaled(rig: Rig) -> None:
    svc, therapist = rig.service, rig.therapist()
    sid = therapist.open_session("client-ref-1", "full_face")
    therapist.end_session(sid)
    assert svc.window.pending
    await rig.wait_event(EventKind.STATE_CHANGED, state="ended")
    journaled = _journaled_session(svc.settings.state_dir, sid)
    assert journaled is not None and journaled["state"] == "ended"


async def test_a_window_whose_commit_failed_is_written_again_by_the_next(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One disk error on the window that ends S1: the next window writes S1's end, so
    a restart does not find S1 and its successor both live on the pen's port."""
    service, therapist = rig.service, rig.therapist()
    state = service.settings.state_dir
    first = therapist.open_session("client-ref-1", "full_face")
    service.sync_records()
    real, failed = service.journal.write, []

    def fails_once(rows: Sequence[JournalRow]) -> None:
        if not failed:
            failed.append(rows)
            raise sqlite3.OperationalError("disk I/O error")
        real(rows)

    monkeypatch.setattr(service.journal, "write", fails_once)
    therapist.end_session(first)
    service.sync_records()
    assert (
        failed
        and service.writer.failures == 1
        and (_journaled_session(state, first) or {})["state"] == "active"
    )
    second = therapist.open_session("client-ref-2", "full_face")
    service.sync_records()
    assert (_journaled_session(state, first) or {})["state"] == "ended"
    assert (_journaled_session(state, second) or {})["state"] == "active"
    saved = service.journaled_registry()
    restored = SessionRegistry.from_dict(service.registry.policy, saved, ports={rig.port(0): None})
    assert first not in restored.live_session_ids()


async def test_a_failure_while_reporting_a_failure_neither_hides_it_nor_stalls_the_windows(
    two_pens: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logging that raises (stderr gone) while a pen cannot be serialised: what waits
    for that window still fails, and later windows are still sealed on time."""
    rig, svc = two_pens, two_pens.service

    class BrokenLog:
        def exception(self, *args: object, **kwargs: object) -> None:
            raise BrokenPipeError("stderr is gone")

    monkeypatch.setattr(commit_window, "log", BrokenLog())
    _fail_for(monkeypatch, svc.records, rig.port(0))
    failing, _ = svc.window.add(rig.port(0), state=True)
    with pytest.raises(ValueError, match="cannot encode"):
        await asyncio.wait_for(asyncio.wrap_future(failing), 2)
    later, _ = svc.window.add(rig.port(1), state=True)
    await asyncio.wait_for(asyncio.wrap_future(later), 2)  # no flush: the timer seals it
