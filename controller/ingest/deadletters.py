"""Dead letters: messages and points that can never be ingested, kept for a human.

A SQLite table (WAL) under the worker's state directory. A row is committed
*before* the message is acknowledged, so nothing set aside is ever lost. The
key is a digest of (topic, payload, reason), so a redelivered bad message does
not add a row; it bumps ``times_seen`` instead.

Inspect with ``sqlite3 <state_dir>/dead_letters.sqlite3 'SELECT * FROM dead_letters'``.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    digest      TEXT PRIMARY KEY,
    first_seen  REAL NOT NULL,  -- Unix seconds
    last_seen   REAL NOT NULL,
    times_seen  INTEGER NOT NULL,
    worker      TEXT NOT NULL,
    topic       TEXT NOT NULL,
    reason      TEXT NOT NULL,  -- bad_json, schema, unknown_topic, topic_mismatch, rejected
    detail      TEXT NOT NULL,  -- validation errors, or InfluxDB's answer and the line
    payload     BLOB NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    payload: bytes
    reason: str
    detail: str


class DeadLetterStore:
    """Append-mostly store of dead letters. Use as a context manager."""

    def __init__(self, path: Path, worker: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.worker = worker
        # isolation_level=None: explicit transactions only, one per flush.
        self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # survives a killed process
        self._db.execute(_SCHEMA)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def add(self, letters: Iterable[DeadLetter]) -> int:
        """Commit letters in one transaction; returns how many were given."""
        now = time.time()
        rows = [
            (
                hashlib.sha256(
                    b"\0".join((d.topic.encode(), d.payload, d.reason.encode(), d.detail.encode()))
                ).hexdigest(),
                now,
                now,
                self.worker,
                d.topic,
                d.reason,
                d.detail,
                d.payload,
            )
            for d in letters
        ]
        if not rows:
            return 0
        with self._db:  # BEGIN ... COMMIT
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO dead_letters (digest, first_seen, last_seen, times_seen, worker,"
                " topic, reason, detail, payload) VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?)"
                " ON CONFLICT(digest) DO UPDATE SET last_seen = excluded.last_seen,"
                " times_seen = times_seen + 1",
                rows,
            )
        return len(rows)

    def all(self) -> list[tuple[str, str, str, bytes, int]]:
        """(topic, reason, detail, payload, times_seen) of every letter, oldest first."""
        cur = self._db.execute(
            "SELECT topic, reason, detail, payload, times_seen FROM dead_letters"
            " ORDER BY first_seen, rowid"
        )
        return [(str(t), str(r), str(d), bytes(p), int(n)) for t, r, d, p, n in cur]
