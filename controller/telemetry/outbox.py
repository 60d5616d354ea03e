"""The durable outbox: MQTT messages wait on local disk until the broker has them.

Every message is committed to SQLite (WAL) before anyone tries to publish it and
is deleted only after the broker acknowledged it (PUBACK for QoS 1). A broker
outage or a killed process therefore loses nothing: on restart the publisher
simply drains what is still here, oldest first. Consumers must tolerate a
message published twice (a crash between PUBACK and delete); the stream sequence
numbers and deterministic timestamps make that harmless downstream.

``synchronous=NORMAL`` in WAL mode survives a killed process (the product's
requirement); only an operating-system crash or power cut can lose the last
transactions, and ``durable_power_loss=True`` buys that too at an fsync per commit.

The outbox is bounded (messages and bytes). Overflow policy, explicit and
counted: telemetry is *droppable*, events and session records are not. When full,
``DROP_OLDEST`` deletes the oldest droppable messages to make room;
``REJECT_NEW`` refuses new droppable messages instead. A non-droppable message
always evicts droppable ones if it must, and is refused (counted, and reported
to the caller) only when nothing droppable is left.

A PUBACK is not the end of the story: Mosquitto acknowledges a message before it
is on disk (it saves every ``autosave_interval``), so a broker killed right after
acknowledging loses what it held for subscribers. Acknowledged messages are
therefore kept for ``replay_s`` in a ``sent`` table, and ``requeue_recent()``
(the publisher calls it on every connect) puts those acknowledged within
``replay_s`` of the last acknowledgement back in the queue. Re-sending is
harmless downstream, for the same reason as above.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..sqlite_wal import open_wal


class OverflowPolicy(enum.Enum):
    DROP_OLDEST = "drop_oldest"
    REJECT_NEW = "reject_new"


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class NewMessage:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    droppable: bool = True


@dataclass
class OutboxCounters:
    enqueued: int = 0
    acknowledged: int = 0
    dropped_oldest: int = 0  # evicted by DROP_OLDEST or by a non-droppable message
    rejected: int = 0  # refused at put()
    requeued: int = 0  # acknowledged messages put back by requeue_recent()
    depth: int = 0  # messages waiting now
    bytes: int = 0  # payload bytes waiting now


_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    topic     TEXT    NOT NULL,
    payload   BLOB    NOT NULL,
    qos       INTEGER NOT NULL,
    retain    INTEGER NOT NULL,
    droppable INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_droppable ON outbox (droppable, id);
CREATE TABLE IF NOT EXISTS sent (
    id        INTEGER PRIMARY KEY,
    topic     TEXT    NOT NULL,
    payload   BLOB    NOT NULL,
    qos       INTEGER NOT NULL,
    retain    INTEGER NOT NULL,
    droppable INTEGER NOT NULL,
    acked_at  REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS sent_acked_at ON sent (acked_at);
CREATE TABLE IF NOT EXISTS stream_seq (
    stream TEXT PRIMARY KEY,
    next   INTEGER NOT NULL
);
"""


class Outbox:
    """A bounded, crash-safe FIFO of MQTT messages. Not thread-safe; one owner."""

    def __init__(
        self,
        path: Path,
        *,
        max_messages: int = 2_000_000,
        max_bytes: int = 512 * 1024 * 1024,
        policy: OverflowPolicy = OverflowPolicy.DROP_OLDEST,
        durable_power_loss: bool = False,
        replay_s: float = 5.0,
    ) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("outbox bounds must be positive")
        if replay_s < 0:
            raise ValueError("replay_s must not be negative")
        self.path = path
        self.replay_s = replay_s
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.policy = policy
        self._db = open_wal(path, "FULL" if durable_power_loss else "NORMAL")
        self._db.executescript(_SCHEMA)
        depth, size = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
        ).fetchone()
        self.counters = OutboxCounters(depth=int(depth), bytes=int(size))

    def close(self) -> None:
        self._db.close()

    def put(self, message: NewMessage) -> bool:
        """Store one message durably. False if the overflow policy refused it."""
        return self.put_many([message]) == 1

    def put_many(self, messages: Iterable[NewMessage]) -> int:
        """Store messages in one transaction; returns how many were accepted."""
        return self.put_sequenced((None, m) for m in messages)

    def put_sequenced(
        self, items: Iterable[tuple[str | None, NewMessage | Callable[[int], NewMessage]]]
    ) -> int:
        """Store messages in one transaction, numbering streams as it goes.

        Each item is ``(stream, message)`` or ``(stream, build)`` where ``build(seq)``
        makes the message carrying the stream's next sequence number. The number is
        taken and the message stored atomically, so a crash can neither reuse nor
        skip a number; a message refused by the overflow policy still consumes its
        number, so the consumer sees the gap.
        """
        accepted = 0
        db = self._db
        c = self.counters
        seqs: dict[str, int] = {}
        db.execute("BEGIN IMMEDIATE")
        try:
            for stream, item in items:
                if callable(item):
                    assert stream is not None, "a numbered message needs a stream"
                    if stream not in seqs:
                        row = db.execute(
                            "SELECT next FROM stream_seq WHERE stream = ?", (stream,)
                        ).fetchone()
                        seqs[stream] = int(row[0]) if row else 0
                    m = item(seqs[stream])
                    seqs[stream] += 1
                else:
                    m = item
                size = len(m.payload)
                if not self._make_room(size, m.droppable):
                    c.rejected += 1
                    continue
                db.execute(
                    "INSERT INTO outbox (topic, payload, qos, retain, droppable) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (m.topic, m.payload, m.qos, int(m.retain), int(m.droppable)),
                )
                c.depth += 1
                c.bytes += size
                accepted += 1
            db.executemany(
                "INSERT INTO stream_seq (stream, next) VALUES (?, ?) "
                "ON CONFLICT (stream) DO UPDATE SET next = excluded.next",
                seqs.items(),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._recount()
            raise
        c.enqueued += accepted
        return accepted

    def next_seq(self, stream: str) -> int:
        """The number the stream's next message will carry."""
        row = self._db.execute("SELECT next FROM stream_seq WHERE stream = ?", (stream,)).fetchone()
        return int(row[0]) if row else 0

    def pending(self, limit: int = 100, after_id: int = 0) -> list[OutboxMessage]:
        """The oldest waiting messages (ids greater than after_id), oldest first."""
        rows = self._db.execute(
            "SELECT id, topic, payload, qos, retain FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()
        return [OutboxMessage(r[0], r[1], bytes(r[2]), r[3], bool(r[4])) for r in rows]

    def acknowledge(self, ids: Sequence[int], now: float | None = None) -> None:
        """The broker has these: move them to the replay window (or forget them)."""
        if not ids:
            return
        now = time.time() if now is None else now
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        removed = 0
        for chunk_start in range(0, len(ids), 500):
            chunk = list(ids[chunk_start : chunk_start + 500])
            marks = ",".join("?" * len(chunk))
            size = db.execute(
                f"SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM outbox WHERE id IN ({marks})",
                chunk,
            ).fetchone()[0]
            if self.replay_s:
                db.execute(
                    "INSERT OR REPLACE INTO sent "
                    "SELECT id, topic, payload, qos, retain, droppable, ? FROM outbox "
                    f"WHERE id IN ({marks})",
                    [now, *chunk],
                )
            cur = db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)
            removed += cur.rowcount
            self.counters.bytes -= int(size)
        db.execute("DELETE FROM sent WHERE acked_at < ?", (now - self.replay_s,))
        db.execute("COMMIT")
        self.counters.depth -= removed
        self.counters.acknowledged += removed

    def requeue_recent(self) -> int:
        """Queue again what was acknowledged within ``replay_s`` of the last acknowledgement.

        Measured from the last acknowledgement, not from now, so that a broker that
        was down for longer than ``replay_s`` still gets the messages it acknowledged
        just before it died. Returns how many messages were put back.
        """
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            newest = db.execute("SELECT MAX(acked_at) FROM sent").fetchone()[0]
            if newest is None:
                db.execute("COMMIT")
                return 0
            since = float(newest) - self.replay_s
            count, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM sent WHERE acked_at >= ?",
                (since,),
            ).fetchone()
            db.execute(
                "INSERT INTO outbox (id, topic, payload, qos, retain, droppable) "
                "SELECT id, topic, payload, qos, retain, droppable FROM sent WHERE acked_at >= ?",
                (since,),
            )
            db.execute("DELETE FROM sent")  # older ones are past their window anyway
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.counters.depth += int(count)
        self.counters.bytes += int(size)
        self.counters.requeued += int(count)
        return int(count)

    # -- internals ----------------------------------------------------------------

    def _full(self, extra_bytes: int) -> bool:
        c = self.counters
        return c.depth + 1 > self.max_messages or c.bytes + extra_bytes > self.max_bytes

    def _make_room(self, size: int, droppable: bool) -> bool:
        if size > self.max_bytes:
            return False
        if not self._full(size):
            return True
        if droppable and self.policy is OverflowPolicy.REJECT_NEW:
            return False
        while self._full(size):
            row = self._db.execute(
                "SELECT id, LENGTH(payload) FROM outbox WHERE droppable = 1 ORDER BY id LIMIT 1"
            ).fetchone()
            if row is None:
                return False
            self._db.execute("DELETE FROM outbox WHERE id = ?", (row[0],))
            self.counters.depth -= 1
            self.counters.bytes -= int(row[1])
            self.counters.dropped_oldest += 1
        return True

    def _recount(self) -> None:
        depth, size = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
        ).fetchone()
        self.counters.depth, self.counters.bytes = int(depth), int(size)
