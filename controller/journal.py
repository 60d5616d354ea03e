"""The session journal: the controller's durable memory, in SQLite (WAL).

Every state change of a session (zone selected, arming, a pass counted, a
cartridge used, an override) is written here, in the order the registry made
them, and before any command that depends on it goes to the pen (an Arm waits
for its cartridge record). A controller killed at any moment therefore restarts
knowing every session, pass count and cartridge, up to the commits still queued
on the writer thread when it died (a millisecond or so; see durable_writer.py).

Documents are JSON, keyed by (kind, id), encoded with orjson: the encoding runs
on the safety core's loop for every decision (a session's document is ~10 KB
after twenty passes) and orjson takes a tenth of the standard library's time;
``json`` reads them back. ``synchronous=FULL``: a treatment
record is worth an fsync, and the write rate is that of therapist actions and
passes, not of telemetry.

Backups: ``sqlite3 journal.db ".backup copy.db"`` (or :meth:`Journal.backup`)
takes a consistent copy while the controller runs.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from .sqlite_wal import open_wal

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    kind    TEXT NOT NULL,
    id      TEXT NOT NULL,
    body    TEXT NOT NULL,
    updated INTEGER NOT NULL,
    PRIMARY KEY (kind, id)
);
"""


JournalRow = tuple[str, str, str, int]  # kind, id, JSON body, version


class Journal:
    """Durable JSON documents by kind and id. One owner; not thread-safe (the
    service encodes on its event loop and writes on its DurableWriter thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = open_wal(path, "FULL")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT COALESCE(MAX(updated), 0) FROM documents").fetchone()
        self._version = int(row[0])

    def close(self) -> None:
        self._db.close()

    def save(self, kind: str, doc_id: str, body: Mapping[str, Any]) -> None:
        self.save_many([(kind, doc_id, body)])

    def save_many(self, docs: list[tuple[str, str, Mapping[str, Any]]]) -> None:
        """Write several documents atomically (all or none survive a crash)."""
        self.write(self.encode(docs))

    def encode(self, docs: list[tuple[str, str, Mapping[str, Any]]]) -> list[JournalRow]:
        """The rows ``write`` stores for ``docs``: serialised now, so the caller may
        change its objects while another thread writes the rows."""
        rows = []
        for kind, doc_id, body in docs:
            self._version += 1
            text = orjson.dumps(body, option=orjson.OPT_SORT_KEYS).decode()
            rows.append((kind, doc_id, text, self._version))
        return rows

    def write(self, rows: Sequence[JournalRow]) -> None:
        """Store encoded rows in one transaction. Rows must be written in encode order."""
        if not rows:
            return
        with self._transaction():
            self._db.executemany(
                "INSERT INTO documents (kind, id, body, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (kind, id) DO UPDATE SET body = excluded.body, "
                "updated = excluded.updated",
                rows,
            )

    def load(self, kind: str, doc_id: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT body FROM documents WHERE kind = ? AND id = ?", (kind, doc_id)
        ).fetchone()
        return json.loads(row[0]) if row else None

    def load_all(self, kind: str) -> dict[str, dict[str, Any]]:
        """Every document of a kind, in the order they were last written."""
        rows = self._db.execute(
            "SELECT id, body FROM documents WHERE kind = ? ORDER BY updated", (kind,)
        ).fetchall()
        return {doc_id: json.loads(body) for doc_id, body in rows}

    def backup(self, target: Path) -> None:
        """A consistent copy of the journal, safe while the controller writes."""
        dest = sqlite3.connect(target)
        try:
            self._db.backup(dest)
        finally:
            dest.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
