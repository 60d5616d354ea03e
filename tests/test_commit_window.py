"""Records serialised once per pen per window, after the loop's I/O, before what depends on them.

See controller/commit_window.py. The rig is the real core (journal and audit files,
writer thread) with simulated pens on pseudo-terminals.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest

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
    original = records.save

    def save(registry: SessionRegistry, port: str | None, also: Iterable[str] = ()) -> Any:
        commit, parts = original(registry, port, also)
        saved.append(parts)
        return commit, parts

    monkeypatch.setattr(records, "save", save)
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


async def test_a_failed_serialisation_fails_what_waits_for_it_and_the_next_window_works(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, therapist = rig.service, rig.therapist()
    sid = therapist.open_session("client-ref-1", "full_face")
    svc.sync_records()
    original = svc.records.save

    def broken(registry: SessionRegistry, port: str | None, also: Iterable[str] = ()) -> Any:
        raise ValueError("cannot encode")

    monkeypatch.setattr(svc.records, "save", broken)
    commit, _ = svc.window.add(rig.port(), state=True)
    svc.window.flush()
    with pytest.raises(ValueError, match="cannot encode"):
        commit.result(5)
    monkeypatch.setattr(svc.records, "save", original)
    therapist.select_zone(sid, "cheeks")
    await rig.wait_event(EventKind.ZONE_SELECTED)
    journaled = _journaled_session(svc.settings.state_dir, sid)
    assert journaled is not None and journaled["current_zone"] == "cheeks"


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
