"""The audit log: append-only, hash-chained, verifiable (product.md §4.8).

Every refusal, stop, override and fault becomes one record. Each record carries
its sequence number, the caller's timestamp, a kind, pseudonymous session and
device ids, a plain-language message and remediation, structured details, the
previous record's hash and its own hash::

    hash = SHA-256( canonical_json( every field except "hash" ) )

``canonical_json`` is JSON with sorted keys, no whitespace, UTF-8 and no NaN,
so any implementation can recompute it. The first record's ``prev_hash`` is 64
zeros. Editing, deleting, inserting or reordering records breaks either a
record's own hash, its link to its predecessor, or the sequence, and
:func:`verify` names the first record where that happens.

Storage: SQLite in WAL mode, one row per record, rather than JSON lines:

* an append is one transaction, so a crash or kill -9 mid-write leaves either
  the whole record or nothing (a JSON-lines file can be left with a torn last
  line, indistinguishable from tampering);
* ``BEGIN IMMEDIATE`` serialises writers, so two writers can never fork the
  chain by reading the same head;
* readers (``penctl audit show``, a report) run beside the writer in WAL mode;
* the controller already keeps its session journal and MQTT outbox in SQLite;
* triggers refuse UPDATE and DELETE, so an honest program cannot rewrite
  history by mistake. They are no defence against someone editing the file;
  the hash chain is.

Limits, stated plainly: a hash chain without a secret detects any change to a
*part* of the log, but someone who rewrites the file can recompute every hash
after the point they changed, or cut records off the end. Publishing the chain
head somewhere else and checking the file against it with
``verify(path, expected_head=...)`` closes both gaps. :func:`read_head` and
:func:`hash_at` are what a publisher needs for that (``controller/audit_anchor.py``
publishes the head, retained, over MQTT, from outside the safety loop), and
:class:`PublishedHead` is what it publishes.

No personal data: records hold pseudonymous ids only (session, device serial,
actor ids), never a client's name.
"""

from __future__ import annotations

import enum
import hashlib
import json
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .sqlite_wal import open_wal

GENESIS_HASH = "0" * 64
FORMAT_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    seq          INTEGER PRIMARY KEY,
    at           TEXT NOT NULL,
    kind         TEXT NOT NULL,
    session_id   TEXT,
    device_id    TEXT,
    message      TEXT NOT NULL,
    remediation  TEXT NOT NULL,
    details      TEXT NOT NULL,
    prev_hash    TEXT NOT NULL,
    hash         TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- A session's records without reading the whole log (the tablet's audit view).
CREATE INDEX IF NOT EXISTS audit_log_session ON audit_log (session_id, seq);
CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""

_HEAD_SQL = "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1"
_COLUMNS = "seq, at, kind, session_id, device_id, message, remediation, details, prev_hash, hash"


class AuditKind(enum.StrEnum):
    REFUSAL = "refusal"  # a command or an action was refused
    STOP = "stop"  # the controller stopped the needle
    OVERRIDE = "override"  # a manager changed a zone limit for one session
    FAULT = "fault"  # pen fault, link loss, reboot, identity change; and their resolution
    SESSION = "session"  # session life cycle: created, started, ended
    RECOVERY = "recovery"  # the controller restarted and restored sessions
    ACCESS = "access"  # sign-ins, failed sign-ins and sign-outs on the tablet API


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """What a caller appends. ``at`` is seconds since the Unix epoch (UTC), caller's clock."""

    kind: AuditKind
    at: float
    message: str
    remediation: str = ""
    session_id: str | None = None
    device_id: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """A stored record. ``at`` is ISO 8601 UTC with microseconds."""

    seq: int
    at: str
    kind: str
    session_id: str | None
    device_id: str | None
    message: str
    remediation: str
    details: Mapping[str, Any]
    prev_hash: str
    hash: str

    def body(self) -> dict[str, Any]:
        """Every field the hash covers (all but ``hash``)."""
        return {
            "seq": self.seq,
            "at": self.at,
            "kind": self.kind,
            "session_id": self.session_id,
            "device_id": self.device_id,
            "message": self.message,
            "remediation": self.remediation,
            "details": dict(self.details),
            "prev_hash": self.prev_hash,
        }

    def as_dict(self) -> dict[str, Any]:
        return {**self.body(), "hash": self.hash}


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The last record's sequence number and hash: publish it elsewhere to anchor the log."""

    seq: int
    hash: str

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"

    @classmethod
    def parse(cls, text: str) -> ChainHead:
        seq, sep, digest = text.partition(":")
        if not sep or not seq.isdigit() or len(digest) != 64:
            raise ValueError(f"expected SEQ:SHA256HEX, got {text!r}")
        return cls(int(seq), digest.lower())


@dataclass(frozen=True, slots=True)
class PublishedHead:
    """A chain head as published: which controller's log, when, and whether the log
    still held the previously published head when this one was read (``agrees``)."""

    clinic: str
    controller: str
    head: ChainHead
    at: float
    agrees: bool = True

    def payload(self) -> bytes:
        return canonical_json(
            {
                "clinic": self.clinic,
                "controller": self.controller,
                "seq": self.head.seq,
                "hash": self.head.hash,
                "at": self.at,
                "agrees": self.agrees,
            }
        )

    @classmethod
    def parse(cls, payload: bytes) -> PublishedHead:
        """The published head in ``payload``; ValueError saying what is wrong with it."""
        try:
            data = json.loads(payload)
            head = ChainHead.parse(f"{int(data['seq'])}:{data['hash']}")
            return cls(
                clinic=str(data["clinic"]),
                controller=str(data["controller"]),
                head=head,
                at=float(data["at"]),
                agrees=bool(data.get("agrees", True)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a published audit head: {exc}") from exc


def canonical_json(value: Any) -> bytes:
    """The byte encoding hashed: sorted keys, no whitespace, UTF-8, no NaN/Infinity."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def record_hash(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(body)).hexdigest()


def format_timestamp(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="microseconds")


class AuditLog:
    """The writer. One per process; appends are atomic and chained.

    ``append``/``extend`` raise ``ValueError`` if details are not JSON-able, and
    sqlite3 errors if the disk refuses: the caller must not treat an unwritten
    record as written.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        # FULL: an audit record acknowledged to the caller survives power loss.
        self._db = open_wal(self.path, "FULL")
        self._db.executescript(_SCHEMA)
        self._db.execute(
            "INSERT OR IGNORE INTO audit_meta VALUES ('format', ?), ('hash', ?)",
            (str(FORMAT_VERSION), "sha256-canonical-json"),
        )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(self, entry: AuditEntry) -> AuditRecord:
        return self.extend([entry])[0]

    def extend(self, entries: Iterable[AuditEntry]) -> list[AuditRecord]:
        """Append several entries in one transaction (all or none)."""
        pending = list(entries)
        if not pending:
            return []
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(_HEAD_SQL).fetchone()
            seq, prev = (row[0], row[1]) if row else (0, GENESIS_HASH)
            written = []
            for entry in pending:
                seq += 1
                record = _seal(seq, prev, entry)
                db.execute(
                    f"INSERT INTO audit_log ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    _row(record),
                )
                written.append(record)
                prev = record.hash
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return written

    def head(self) -> ChainHead | None:
        row = self._db.execute(_HEAD_SQL).fetchone()
        return ChainHead(row[0], row[1]) if row else None


def _seal(seq: int, prev_hash: str, entry: AuditEntry) -> AuditRecord:
    try:
        details = json.loads(canonical_json(dict(entry.details)))  # JSON-able, normalised
    except TypeError as exc:
        raise ValueError(f"audit details must be JSON data: {exc}") from exc
    unsealed = AuditRecord(
        seq=seq,
        at=format_timestamp(entry.at),
        kind=str(entry.kind),
        session_id=entry.session_id,
        device_id=entry.device_id,
        message=entry.message,
        remediation=entry.remediation,
        details=details,
        prev_hash=prev_hash,
        hash="",
    )
    return AuditRecord(**{**_fields(unsealed), "hash": record_hash(unsealed.body())})


def _fields(record: AuditRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in AuditRecord.__dataclass_fields__}


def _row(record: AuditRecord) -> tuple[Any, ...]:
    return (
        record.seq,
        record.at,
        record.kind,
        record.session_id,
        record.device_id,
        record.message,
        record.remediation,
        canonical_json(dict(record.details)).decode("utf-8"),
        record.prev_hash,
        record.hash,
    )


class AuditFileError(Exception):
    """The file is missing or is not an audit log (distinct from a tampered log)."""


def _open_read_only(path: Path | str) -> sqlite3.Connection:
    p = Path(path)
    if not p.is_file():
        raise AuditFileError(f"{p}: no such audit log")
    try:
        db = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True)
        db.execute("SELECT 1 FROM audit_log LIMIT 1").fetchall()
    except sqlite3.DatabaseError as exc:
        raise AuditFileError(f"{p}: not an audit log ({exc})") from exc
    return db


def read_head(path: Path | str) -> ChainHead | None:
    """The last record's sequence number and hash, read-only and cheap (one row).

    Nothing is verified: compare it with a published head, or run :func:`verify`.
    """
    db = _open_read_only(path)
    try:
        row = db.execute(_HEAD_SQL).fetchone()
    finally:
        db.close()
    return ChainHead(int(row[0]), str(row[1])) if row else None


def hash_at(path: Path | str, seq: int) -> str | None:
    """The stored hash of record ``seq`` (None if there is no such record); one row."""
    db = _open_read_only(path)
    try:
        row = db.execute("SELECT hash FROM audit_log WHERE seq = ?", (seq,)).fetchone()
    finally:
        db.close()
    return str(row[0]) if row else None


@dataclass(frozen=True, slots=True)
class RawRow:
    """A stored row as found, before anything is trusted."""

    seq: Any
    at: Any
    kind: Any
    session_id: Any
    device_id: Any
    message: Any
    remediation: Any
    details: Any
    prev_hash: Any
    hash: Any


def _raw_rows(db: sqlite3.Connection) -> Iterator[RawRow]:
    # rowid order is the physical order of the table (seq is the rowid).
    for row in db.execute(f"SELECT {_COLUMNS} FROM audit_log ORDER BY seq"):
        yield RawRow(*row)


def _parse(raw: RawRow) -> AuditRecord:
    """A typed record, or ValueError describing what is malformed."""
    text_fields = ("at", "kind", "message", "remediation", "prev_hash", "hash", "details")
    for name in text_fields:
        if not isinstance(getattr(raw, name), str):
            raise ValueError(f"field {name} is not text")
    for name in ("session_id", "device_id"):
        if getattr(raw, name) is not None and not isinstance(getattr(raw, name), str):
            raise ValueError(f"field {name} is not text")
    try:
        details = json.loads(raw.details)
    except json.JSONDecodeError as exc:
        raise ValueError(f"details are not JSON ({exc.msg})") from exc
    if not isinstance(details, dict):
        raise ValueError("details are not a JSON object")
    return AuditRecord(
        seq=raw.seq,
        at=raw.at,
        kind=raw.kind,
        session_id=raw.session_id,
        device_id=raw.device_id,
        message=raw.message,
        remediation=raw.remediation,
        details=details,
        prev_hash=raw.prev_hash,
        hash=raw.hash,
    )


def read_records(path: Path | str) -> list[AuditRecord]:
    """Every well-formed record in stored order (for ``show``); verify() for trust."""
    db = _open_read_only(path)
    try:
        out = []
        for raw in _raw_rows(db):
            try:
                out.append(_parse(raw))
            except ValueError:
                continue
        return out
    finally:
        db.close()


def read_recent(
    path: Path | str, *, session_id: str | None = None, limit: int = 200
) -> list[AuditRecord]:
    """The newest ``limit`` well-formed records (of one session, if given), in stored order.

    Reads backwards from the end and stops once it has them, so asking for the
    last few records costs the same however long the log has grown.
    """
    db = _open_read_only(path)
    try:
        sql = f"SELECT {_COLUMNS} FROM audit_log ORDER BY seq DESC"
        params: tuple[str, ...] = ()
        if session_id is not None:
            sql = f"SELECT {_COLUMNS} FROM audit_log WHERE session_id = ? ORDER BY seq DESC"
            params = (session_id,)
        rows = db.execute(sql, params)
        newest_first: list[AuditRecord] = []
        for row in rows:
            if len(newest_first) >= limit:
                break
            try:
                newest_first.append(_parse(RawRow(*row)))
            except ValueError:
                continue
        return newest_first[::-1]
    finally:
        db.close()


@dataclass(frozen=True, slots=True)
class TamperFinding:
    """The first record that fails verification, and why, in words."""

    seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """``ok`` with the record count and head, or the first bad record."""

    records: int
    head: ChainHead | None
    first_bad: TamperFinding | None = None

    @property
    def ok(self) -> bool:
        return self.first_bad is None


def verify(path: Path | str, expected_head: ChainHead | None = None) -> VerifyReport:
    """Walk the chain from the first record; report the first record that fails.

    Per record, in this order: its sequence number must be the next one (else a
    record was deleted); its content must hash to its stored hash (else it was
    edited, or moved, since the hash covers the sequence number); its prev_hash
    must equal the previous record's hash (else a record before it was
    rewritten, inserted or removed). With ``expected_head`` the log must also
    still contain that record, unchanged (catches cutting records off the end).

    Raises AuditFileError if the file is missing or not an audit log.
    """
    db = _open_read_only(path)
    try:
        count = 0
        prev_hash = GENESIS_HASH
        head: ChainHead | None = None
        anchor_seen = False
        for raw in _raw_rows(db):
            expected_seq = count + 1
            if raw.seq != expected_seq:
                if isinstance(raw.seq, int) and raw.seq > expected_seq:
                    missing = (
                        f"record {expected_seq} is missing"
                        if raw.seq == expected_seq + 1
                        else f"records {expected_seq} to {raw.seq - 1} are missing"
                    )
                    reason = f"{missing} (deleted): the next record found is {raw.seq}"
                else:
                    reason = f"sequence number {raw.seq!r} is out of place"
                return VerifyReport(count, head, TamperFinding(expected_seq, reason))
            try:
                record = _parse(raw)
            except ValueError as exc:
                return VerifyReport(
                    count, head, TamperFinding(expected_seq, f"malformed record: {exc}")
                )
            if record_hash(record.body()) != record.hash:
                return VerifyReport(
                    count,
                    head,
                    TamperFinding(
                        expected_seq,
                        "its contents do not match its hash: it was edited, or moved here "
                        "from another position",
                    ),
                )
            if record.prev_hash != prev_hash:
                before = f"record {expected_seq - 1}" if expected_seq > 1 else "the start"
                return VerifyReport(
                    count,
                    head,
                    TamperFinding(
                        expected_seq,
                        f"it does not follow {before}: a record before it was rewritten, "
                        "inserted or removed",
                    ),
                )
            if expected_head is not None and record.seq == expected_head.seq:
                anchor_seen = True
                if record.hash != expected_head.hash:
                    return VerifyReport(
                        count,
                        head,
                        TamperFinding(
                            expected_seq,
                            "it differs from the anchored chain head: the log was rewritten "
                            "up to here",
                        ),
                    )
            count += 1
            prev_hash = record.hash
            head = ChainHead(record.seq, record.hash)
        if expected_head is not None and not anchor_seen:
            return VerifyReport(
                count,
                head,
                TamperFinding(
                    count + 1,
                    f"the log ends at record {count}, but record {expected_head.seq} "
                    "was anchored: records were cut off the end",
                ),
            )
        return VerifyReport(count, head)
    finally:
        db.close()
