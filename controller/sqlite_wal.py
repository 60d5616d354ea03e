"""SQLite in WAL mode, the way every store of the controller opens it.

The journal, the audit log, the MQTT outbox and the ingest dead letters are all
single-writer SQLite databases in WAL mode. Opening them goes through here so
that they agree on one thing that matters for latency: SQLite's automatic
checkpoint runs *inside* the commit that crosses the WAL threshold, copying the
log back into the database and syncing it, which stalled the event loop (and
every pen's safety reaction) for 10-20 ms now and then. Checkpoints run instead
on a background thread with its own connection; the sqlite3 module releases the
GIL while SQLite works, so the event loop carries on.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import ClassVar, Literal

Synchronous = Literal["FULL", "NORMAL"]


def open_wal(
    path: Path,
    synchronous: Synchronous,
    *,
    background_checkpoints: bool = True,
    busy_timeout_s: float = 30.0,
) -> sqlite3.Connection:
    """Open (creating) a WAL database in autocommit mode for explicit transactions.

    ``synchronous="FULL"`` survives power loss, ``"NORMAL"`` a killed process.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s
    )
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    if background_checkpoints:
        db.execute("PRAGMA wal_autocheckpoint=0")
        _Checkpointer.for_path(path)
    return db


class _Checkpointer:
    """One daemon thread per database file, checkpointing every ``interval`` seconds."""

    _running: ClassVar[dict[Path, _Checkpointer]] = {}
    _lock = threading.Lock()

    def __init__(self, path: Path, interval: float) -> None:
        self.path = path
        self.interval = interval
        self._wake = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"wal-checkpoint:{path.name}", daemon=True
        )
        self._thread.start()

    @classmethod
    def for_path(cls, path: Path, interval: float = 1.0) -> None:
        key = path.resolve()
        with cls._lock:
            current = cls._running.get(key)
            if current is None or not current._thread.is_alive():
                cls._running[key] = cls(key, interval)

    def _run(self) -> None:
        try:
            db = sqlite3.connect(self.path, check_same_thread=True, timeout=30)
        except sqlite3.Error:
            return
        try:
            while not self._wake.wait(self.interval):
                if not self.path.exists():
                    return  # the store was deleted (a test's temporary directory)
                try:
                    # PASSIVE never blocks the writer; what it cannot copy now waits
                    # for the next round.
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    continue
        finally:
            db.close()
