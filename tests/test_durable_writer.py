"""Journal and audit commits off the event loop: in order, and before what depends on them."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from controller.durable_writer import DurableWriter, GroupCommit
from controller.sessions import EventKind, SessionEvent

from .controller_rig import Rig, start_rig, stop_rig


def test_records_decided_during_a_slow_commit_share_the_next_one() -> None:
    """A disk that takes long per commit: everything decided meanwhile lands in one
    more commit, not one each (the queue would grow for as long as decisions come)."""
    writer = DurableWriter()
    started, release = threading.Event(), threading.Event()
    rows: list[list[int]] = []
    entries: list[list[str]] = []

    def slow_rows(batch: Sequence[int]) -> None:
        started.set()
        release.wait()
        rows.append(list(batch))

    group: GroupCommit[int, str] = GroupCommit(
        writer, slow_rows, lambda b: entries.append(list(b)), "test"
    )
    first = group.add(a=[0])
    assert started.wait(5)  # the first commit is on the disk now
    later = [group.add(a=[i], b=[f"e{i}"]) for i in range(1, 50)]
    assert all(f is later[0] for f in later) and later[0] is not first
    release.set()
    later[0].result(5)
    assert group.commits == 2
    assert rows == [[0], list(range(1, 50))]  # in decision order
    assert entries == [[f"e{i}" for i in range(1, 50)]]
    writer.close()


def test_a_failed_journal_write_still_writes_the_audit_and_fails_the_commit() -> None:
    writer = DurableWriter()
    entries: list[str] = []

    def broken(batch: Sequence[int]) -> None:
        raise OSError("disk full")

    group: GroupCommit[int, str] = GroupCommit(writer, broken, entries.extend, "test")
    commit = group.add(a=[1], b=["refused"])
    with pytest.raises(OSError, match="disk full"):
        commit.result(5)
    assert entries == ["refused"]
    assert writer.failures == 1
    writer.close()


def test_writes_land_in_submission_order_and_call_waits_for_all() -> None:
    writer = DurableWriter()
    landed: list[int] = []
    gate = threading.Event()
    writer.submit(gate.wait, "held")  # everything after it queues up
    for i in range(100):
        writer.submit(lambda i=i: landed.append(i), f"write {i}")
    assert landed == []
    gate.set()
    assert writer.call(lambda: len(landed), "count") == 100
    assert landed == list(range(100))
    writer.close()


def test_a_failed_write_is_counted_and_the_next_ones_still_land() -> None:
    writer = DurableWriter()

    def disk_full() -> None:
        raise sqlite3.OperationalError("database or disk is full")

    failed = writer.submit(disk_full, "journal")
    assert writer.call(lambda: "after", "next") == "after"
    with pytest.raises(sqlite3.OperationalError):
        failed.result()
    assert writer.failures == 1
    assert "journal: database or disk is full" in writer.last_error
    writer.close()


def _journaled_passes(state_dir: Path, session_id: str) -> int:
    """The number of the session's latest pass (the running one included) as the journal
    file holds it, read by another connection."""
    db = sqlite3.connect(state_dir / "journal.db")
    try:
        row = db.execute(
            "SELECT body FROM documents WHERE kind = 'session' AND id = ?", (session_id,)
        ).fetchone()
    finally:
        db.close()
    if row is None:
        return 0
    session = json.loads(row[0])
    running = session["current_pass"]
    return int(running["number"]) if running else int(session["zones"]["cheeks"]["passes_done"])


async def test_an_event_is_announced_only_once_its_record_is_on_disk(tmp_path: Path) -> None:
    rig: Rig
    rig, collector = await start_rig(tmp_path)
    sub = rig.service.subscribe(1000)
    seen: list[tuple[int, int]] = []  # (pass number announced, passes in the journal then)

    async def watch(sid: str) -> None:
        while True:
            item = await sub.queue.get()
            if isinstance(item, SessionEvent) and item.kind is EventKind.PASS_STARTED:
                state = rig.service.settings.state_dir
                seen.append((int(item.detail["number"]), _journaled_passes(state, sid)))

    try:
        sid = await rig.start_treating("cheeks", 1000)
        watcher = asyncio.create_task(watch(sid))
        waits_before = rig.service.executor.counters.held
        for _ in range(3):
            await rig.one_pass(hold=0.05)
        watcher.cancel()
        assert [n for n, _ in seen] == [1, 2, 3]
        assert all(journaled >= n for n, journaled in seen), seen
        # Passes wait for nothing on the loop; only commands that need their record do.
        assert rig.service.executor.counters.held == waits_before
    finally:
        await stop_rig(rig, collector)
