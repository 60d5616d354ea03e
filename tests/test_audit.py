"""The audit log: the chain verifies, and any tampering is found at the right record."""

from __future__ import annotations

import json
import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.audit import (
    GENESIS_HASH,
    AuditEntry,
    AuditFileError,
    AuditKind,
    AuditLog,
    ChainHead,
    canonical_json,
    read_recent,
    read_records,
    record_hash,
    verify,
)
from penctl.cli import main

T0 = 1_800_000_000.0


def entry(i: int) -> AuditEntry:
    return AuditEntry(
        kind=list(AuditKind)[i % len(AuditKind)],
        at=T0 + i * 0.5,
        message=f"Depth 1.20 mm is deeper than the forehead allows ({i}).",
        remediation="Choose 1.00 mm or less.",
        session_id=f"s{i % 3}",
        device_id="PEN0001",
        details={"i": i, "zone_id": "forehead", "ünïcode": "décolletage", "nested": {"a": [1, 2]}},
    )


def write_log(path: Path, n: int) -> list[str]:
    with AuditLog(path) as log:
        records = log.extend(entry(i) for i in range(n))
    return [r.hash for r in records]


def raw(path: Path) -> sqlite3.Connection:
    """The file as an attacker sees it: no triggers in the way."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP TRIGGER audit_log_no_update")
    db.execute("DROP TRIGGER audit_log_no_delete")
    return db


def test_an_untouched_chain_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    hashes = write_log(path, 5)
    report = verify(path)
    assert report.ok
    assert report.records == 5
    assert report.head == ChainHead(5, hashes[-1])


def test_records_are_chained_and_hashed_over_canonical_json(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with AuditLog(path) as log:
        first = log.append(entry(0))
        second = log.append(entry(1))
        assert log.head() == ChainHead(2, second.hash)
    assert first.seq == 1 and first.prev_hash == GENESIS_HASH
    assert second.prev_hash == first.hash
    assert first.at == "2027-01-15T08:00:00.000000+00:00"
    body = first.body()
    assert "hash" not in body
    assert first.hash == record_hash(body)
    assert canonical_json(body).startswith(b'{"at":')
    stored = read_records(path)
    assert [r.as_dict() for r in stored] == [first.as_dict(), second.as_dict()]


def test_appending_continues_the_chain_across_writers(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    write_log(path, 2)
    a, b = AuditLog(path), AuditLog(path)
    try:
        for i in range(3):
            a.append(entry(10 + i))
            b.append(entry(20 + i))
    finally:
        a.close()
        b.close()
    report = verify(path)
    assert report.ok and report.records == 8


def test_the_log_refuses_updates_and_deletes(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    write_log(path, 2)
    db = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE audit_log SET message = 'x' WHERE seq = 1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM audit_log WHERE seq = 1")
    db.close()


def test_details_must_be_json(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "audit.db") as log, pytest.raises(ValueError, match="JSON"):
        log.append(AuditEntry(AuditKind.FAULT, T0, "m", details={"x": object()}))
    with AuditLog(tmp_path / "audit.db") as log, pytest.raises(ValueError, match="not JSON"):
        log.append(AuditEntry(AuditKind.FAULT, T0, "m", details={"x": float("nan")}))
    assert verify(tmp_path / "audit.db").records == 0


# --- tampering -------------------------------------------------------------------------


def edit(path: Path, seq: int) -> None:
    raw(path).execute("UPDATE audit_log SET message = 'nothing happened' WHERE seq = ?", (seq,))


def edit_and_rehash(path: Path, seq: int) -> None:
    db = raw(path)
    row = db.execute(
        "SELECT seq, at, kind, session_id, device_id, message, remediation, details, prev_hash "
        "FROM audit_log WHERE seq = ?",
        (seq,),
    ).fetchone()
    names = ("seq", "at", "kind", "session_id", "device_id", "message", "remediation")
    body = dict(zip(names, row[:7], strict=True))
    body.update(message="nothing happened", details=json.loads(row[7]), prev_hash=row[8])
    db.execute(
        "UPDATE audit_log SET message = ?, hash = ? WHERE seq = ?",
        ("nothing happened", record_hash(body), seq),
    )


def delete(path: Path, seq: int) -> None:
    raw(path).execute("DELETE FROM audit_log WHERE seq = ?", (seq,))


def swap(path: Path, seq: int) -> None:
    """Reorder: records seq and seq+1 trade places."""
    db = raw(path)
    db.execute("UPDATE audit_log SET seq = -1 WHERE seq = ?", (seq,))
    db.execute("UPDATE audit_log SET seq = ? WHERE seq = ?", (seq, seq + 1))
    db.execute("UPDATE audit_log SET seq = ? WHERE seq = -1", (seq + 1,))


def insert(path: Path, seq: int, *, forged_well: bool) -> None:
    """A new record at position seq; later records are renumbered to make room."""
    db = raw(path)
    for later in reversed(
        [r[0] for r in db.execute("SELECT seq FROM audit_log WHERE seq >= ?", (seq,))]
    ):
        db.execute("UPDATE audit_log SET seq = ? WHERE seq = ?", (later + 1, later))
    prev = db.execute("SELECT hash FROM audit_log WHERE seq = ?", (seq - 1,)).fetchone()
    prev_hash = prev[0] if prev else GENESIS_HASH
    body = {
        "seq": seq,
        "at": "2027-01-15T08:00:00.000000+00:00",
        "kind": "override",
        "session_id": "s0",
        "device_id": "PEN0001",
        "message": "forged",
        "remediation": "",
        "details": {},
        "prev_hash": prev_hash if forged_well else "f" * 64,
    }
    digest = record_hash(body) if forged_well else "e" * 64
    db.execute(
        "INSERT INTO audit_log VALUES (?,?,?,?,?,?,?,?,?,?)",
        (
            seq,
            body["at"],
            body["kind"],
            "s0",
            "PEN0001",
            "forged",
            "",
            "{}",
            body["prev_hash"],
            digest,
        ),
    )


@pytest.mark.parametrize("seq", [1, 3, 6])
def test_an_edited_record_is_found(tmp_path: Path, seq: int) -> None:
    path = tmp_path / "audit.db"
    write_log(path, 6)
    edit(path, seq)
    report = verify(path)
    assert report.first_bad is not None
    assert report.first_bad.seq == seq
    assert "edited" in report.first_bad.reason
    assert report.records == seq - 1


@pytest.mark.parametrize("seq", [1, 3])
def test_an_edited_and_rehashed_record_breaks_the_next_link(tmp_path: Path, seq: int) -> None:
    path = tmp_path / "audit.db"
    write_log(path, 6)
    edit_and_rehash(path, seq)
    report = verify(path)
    assert report.first_bad is not None
    assert report.first_bad.seq == seq + 1
    assert f"does not follow record {seq}" in report.first_bad.reason


@pytest.mark.parametrize("seq", [1, 3, 5])
def test_a_deleted_record_is_found(tmp_path: Path, seq: int) -> None:
    path = tmp_path / "audit.db"
    write_log(path, 6)
    delete(path, seq)
    report = verify(path)
    assert report.first_bad is not None
    assert report.first_bad.seq == seq
    assert f"record {seq} is missing" in report.first_bad.reason


@pytest.mark.parametrize("seq", [1, 3, 5])
def test_reordered_records_are_found(tmp_path: Path, seq: int) -> None:
    path = tmp_path / "audit.db"
    write_log(path, 6)
    swap(path, seq)
    report = verify(path)
    assert report.first_bad is not None
    assert report.first_bad.seq == seq


@pytest.mark.parametrize("seq", [1, 3, 6])
def test_an_inserted_record_is_found(tmp_path: Path, seq: int) -> None:
    path = tmp_path / "audit.db"
    write_log(path, 6)
    insert(path, seq, forged_well=False)
    report = verify(path)
    assert report.first_bad is not None and report.first_bad.seq == seq


@pytest.mark.parametrize("seq", [1, 3, 6])
def test_a_well_forged_insertion_breaks_the_record_after_it(tmp_path: Path, seq: int) -> None:
    # The forgery itself hashes and links correctly; the record it displaced no longer does.
    path = tmp_path / "audit.db"
    write_log(path, 6)
    insert(path, seq, forged_well=True)
    report = verify(path)
    assert report.first_bad is not None and report.first_bad.seq == seq + 1


def test_cutting_the_tail_needs_an_anchor_to_be_seen(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    hashes = write_log(path, 6)
    anchor = ChainHead(6, hashes[-1])
    assert verify(path, expected_head=anchor).ok
    delete(path, 6)
    assert verify(path).ok  # a plain hash chain cannot see a clean cut at the end
    report = verify(path, expected_head=anchor)
    assert report.first_bad is not None
    assert "cut off the end" in report.first_bad.reason


def test_a_rewritten_log_differs_from_its_anchor(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    hashes = write_log(path, 4)
    edit_and_rehash(path, 4)
    report = verify(path, expected_head=ChainHead(4, hashes[-1]))
    assert report.first_bad is not None and report.first_bad.seq == 4


def test_malformed_details_are_tampering(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    write_log(path, 3)
    raw(path).execute("UPDATE audit_log SET details = '{not json' WHERE seq = 2")
    report = verify(path)
    assert report.first_bad is not None and report.first_bad.seq == 2
    assert "malformed" in report.first_bad.reason


def test_missing_or_foreign_files_are_not_reported_as_tampering(tmp_path: Path) -> None:
    with pytest.raises(AuditFileError):
        verify(tmp_path / "nope.db")
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(AuditFileError, match="not an audit log"):
        verify(other)
    assert not (tmp_path / "nope.db").exists()  # verifying never creates a file


TAMPERS = {
    "edit": lambda p, k: edit(p, k),
    "delete": lambda p, k: delete(p, k),
    "swap": lambda p, k: swap(p, k),
    "insert": lambda p, k: insert(p, k, forged_well=False),
}


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 10),
    data=st.data(),
    kind=st.sampled_from(sorted(TAMPERS)),
)
def test_any_single_tampering_is_found_at_its_record(
    n: int, data: st.DataObject, kind: str
) -> None:
    last = n - 1 if kind == "swap" else n
    k = data.draw(st.integers(1, last), label="record")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.db"
        write_log(path, n)
        TAMPERS[kind](path, k)
        report = verify(path)
        if kind == "delete" and k == n:
            assert report.ok  # a clean cut at the end: see the anchor test
            return
        assert report.first_bad is not None
        assert report.first_bad.seq == k
        assert report.records == k - 1


# --- the command line ----------------------------------------------------------------


def test_cli_verify_intact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.db"
    hashes = write_log(path, 3)
    assert main(["audit", "verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK:") and "3 records" in out and hashes[-1] in out
    assert main(["audit", "verify", str(path), "--expect-head", f"3:{hashes[-1]}"]) == 0


def test_cli_verify_tampered(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.db"
    write_log(path, 4)
    edit(path, 2)
    assert main(["audit", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("TAMPERED:") and "record 2:" in out and "edited" in out


def test_cli_verify_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(tmp_path / "missing.db")]) == 2
    assert "no such audit log" in capsys.readouterr().err


def test_cli_rejects_a_malformed_anchor(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["audit", "verify", str(tmp_path / "a.db"), "--expect-head", "nonsense"])
    assert caught.value.code == 2


def test_cli_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.db"
    write_log(path, 6)
    assert main(["audit", "show", str(path)]) == 0
    text = capsys.readouterr().out
    assert "#1 2027-01-15T08:00:00.000000+00:00 REFUSAL session=s0 device=PEN0001" in text
    assert "what to do: Choose 1.00 mm or less." in text
    assert main(["audit", "show", str(path), "--json", "--kind", "stop"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [2]
    assert main(["audit", "show", str(path), "--session", "s1", "--last", "1", "--json"]) == 0
    assert [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()] == [5]


@pytest.mark.parametrize("session_id", [None, "s1", "s-none"])
@pytest.mark.parametrize("limit", [1, 4, 200])
def test_read_recent_is_the_tail_of_read_records(
    tmp_path: Path, session_id: str | None, limit: int
) -> None:
    """What the tablet's audit view reads: the newest records of a session (or all),
    exactly what filtering every record would give, malformed rows skipped."""
    path = tmp_path / "audit.db"
    write_log(path, 30)
    raw(path).execute("UPDATE audit_log SET details = 'not json' WHERE seq = 29")
    every = [r for r in read_records(path) if session_id is None or r.session_id == session_id]
    assert read_recent(path, session_id=session_id, limit=limit) == every[-limit:]
