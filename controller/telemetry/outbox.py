"""The durable outbox: MQTT messages wait on local disk until they are safe.

Every message is committed to SQLite (WAL) before anyone tries to publish it. A
message carrying numbered stream entries (a telemetry bundle, an event) is
*acknowledged end to end*: it leaves the outbox only when ingest reports every
one of its ``(device, stream, seq)`` keys durably in InfluxDB
(:meth:`Outbox.acknowledge_keys`, fed by the ack topic; docs/MQTT.md). Other
messages (retained statuses) leave on the broker's PUBACK
(:meth:`Outbox.delivered`). A broker outage, a broker that loses what it
acknowledged, a missing subscriber or a killed process therefore loses nothing:
what is not acknowledged is published again, and the stream numbers and
deterministic timestamps make a repeat harmless downstream.

``synchronous=NORMAL`` in WAL mode survives a killed process (the product's
requirement); only an operating-system crash or power cut can lose the last
transactions, and ``durable_power_loss=True`` buys that too at an fsync per commit.

The outbox is bounded (messages and bytes). Overflow policy, explicit and
counted: telemetry and statuses are *droppable*, events are not. When full,
``DROP_OLDEST`` deletes the oldest droppable messages to make room;
``REJECT_NEW`` refuses new droppable messages instead. A non-droppable message
always evicts droppable ones if it must, and is refused (counted, and reported
to the caller) only when nothing droppable is left. A dropped or refused
message's numbers are never reused, so consumers see the gap.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..sqlite_wal import open_wal


class OverflowPolicy(enum.Enum):
    DROP_OLDEST = "drop_oldest"
    REJECT_NEW = "reject_new"


#: (device, stream): a numbered stream; (device, stream, seq): one entry of it.
StreamId = tuple[str, str]
Key = tuple[str, str, int]


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    acked_end_to_end: bool  # True: kept until ingest acknowledges its keys


@dataclass(frozen=True, slots=True)
class NewMessage:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    droppable: bool = True
    keys: tuple[Key, ...] = field(default=())  # set by put_numbered


@dataclass
class OutboxCounters:
    enqueued: int = 0
    acknowledged: int = 0  # removed: every key acknowledged by ingest
    delivered: int = 0  # removed on the broker's PUBACK (statuses)
    dropped_oldest: int = 0  # evicted by DROP_OLDEST or by a non-droppable message
    rejected: int = 0  # refused at put()
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
CREATE TABLE IF NOT EXISTS stream_seq (
    stream TEXT PRIMARY KEY,
    next   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox_keys (
    device TEXT    NOT NULL,
    stream TEXT    NOT NULL,
    seq    INTEGER NOT NULL,
    id     INTEGER NOT NULL,
    PRIMARY KEY (device, stream, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outbox_keys_id ON outbox_keys (id);
-- The replay window of the PUBACK-based outbox, superseded by end-to-end acks.
DROP TABLE IF EXISTS sent;
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
    ) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError("outbox bounds must be positive")
        self.path = path
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.policy = policy
        self._db = open_wal(path, "FULL" if durable_power_loss else "NORMAL")
        self._db.executescript(_SCHEMA)
        self.counters = OutboxCounters()
        self._recount()

    def close(self) -> None:
        self._db.close()

    # -- in -----------------------------------------------------------------------------

    def put(self, message: NewMessage) -> bool:
        """Store one message durably. False if the overflow policy refused it."""
        return self._store([message]) == 1

    def put_many(self, messages: Iterable[NewMessage]) -> int:
        """Store messages in one transaction; returns how many were accepted."""
        return self._store(list(messages))

    def put_numbered(
        self, streams: Sequence[StreamId], build: Callable[[list[int]], NewMessage]
    ) -> bool:
        """Store one message carrying the next number of each of ``streams``.

        ``build(seqs)`` makes the message from the numbers, one per entry of
        ``streams`` (a stream listed twice gets two consecutive numbers). The
        numbers are taken and the message stored atomically, so a crash can neither
        reuse nor skip one; a message refused by the overflow policy still consumes
        its numbers, so the consumer sees the gap. The message is kept until ingest
        acknowledges every ``(device, stream, seq)`` it carries.
        """
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            next_seq: dict[StreamId, int] = {}
            seqs: list[int] = []
            for stream in streams:
                if stream not in next_seq:
                    next_seq[stream] = self._read_seq(stream)
                seqs.append(next_seq[stream])
                next_seq[stream] += 1
            message = build(seqs)
            keys = tuple((d, s, n) for (d, s), n in zip(streams, seqs, strict=True))
            accepted = self._insert(message, keys)
            db.executemany(
                "INSERT INTO stream_seq (stream, next) VALUES (?, ?) "
                "ON CONFLICT (stream) DO UPDATE SET next = excluded.next",
                [(_stream_name(s), n) for s, n in next_seq.items()],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._recount()
            raise
        self.counters.enqueued += accepted
        return accepted == 1

    def next_seq(self, device: str, stream: str) -> int:
        """The number the stream's next message will carry."""
        return self._read_seq((device, stream))

    # -- out ----------------------------------------------------------------------------

    def pending(self, limit: int = 100, after_id: int = 0) -> list[OutboxMessage]:
        """The oldest waiting messages (ids greater than after_id), oldest first."""
        rows = self._db.execute(
            "SELECT id, topic, payload, qos, retain, "
            "EXISTS (SELECT 1 FROM outbox_keys k WHERE k.id = outbox.id) "
            "FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        ).fetchall()
        return [_message(r) for r in rows]

    def get(self, ids: Iterable[int]) -> list[OutboxMessage]:
        """The messages with these ids that are still waiting, oldest first."""
        out: list[OutboxMessage] = []
        for chunk in _chunks(sorted(ids)):
            marks = ",".join("?" * len(chunk))
            out += [
                _message(r)
                for r in self._db.execute(
                    "SELECT id, topic, payload, qos, retain, "
                    "EXISTS (SELECT 1 FROM outbox_keys k WHERE k.id = outbox.id) "
                    f"FROM outbox WHERE id IN ({marks}) ORDER BY id",
                    chunk,
                )
            ]
        return out

    def delivered(self, ids: Sequence[int]) -> None:
        """The broker has these messages (PUBACK); forget those not acked end to end."""
        if not ids:
            return
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        removed = 0
        for chunk in _chunks(list(ids)):
            marks = ",".join("?" * len(chunk))
            where = (
                f"id IN ({marks}) AND NOT EXISTS "
                "(SELECT 1 FROM outbox_keys k WHERE k.id = outbox.id)"
            )
            size = db.execute(
                f"SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM outbox WHERE {where}", chunk
            ).fetchone()[0]
            removed += db.execute(f"DELETE FROM outbox WHERE {where}", chunk).rowcount
            self.counters.bytes -= int(size)
        db.execute("COMMIT")
        self.counters.depth -= removed
        self.counters.delivered += removed

    def acknowledge_keys(
        self, device: str, stream: str, seqs: Iterable[tuple[int, int]]
    ) -> list[int]:
        """Ingest has these entries of a stream; returns the ids of messages now complete.

        A message leaves the outbox when the last of its keys is acknowledged.
        Unknown keys (acknowledged before, or dropped) are ignored.
        """
        return self.acknowledge_many([(device, stream, list(seqs))])

    def acknowledge_many(
        self, acks: Iterable[tuple[str, str, Sequence[tuple[int, int]]]]
    ) -> list[int]:
        """:meth:`acknowledge_keys` for several streams in one transaction."""
        db = self._db
        touched: set[int] = set()
        db.execute("BEGIN IMMEDIATE")
        try:
            for device, stream, ranges in acks:
                for first, last in ranges:
                    where = "device = ? AND stream = ? AND seq BETWEEN ? AND ?"
                    args = (device, stream, first, last)
                    touched.update(
                        r[0] for r in db.execute(f"SELECT id FROM outbox_keys WHERE {where}", args)
                    )
                    db.execute(f"DELETE FROM outbox_keys WHERE {where}", args)
            complete: list[int] = []
            for chunk in _chunks(sorted(touched)):
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    f"SELECT id, LENGTH(payload) FROM outbox WHERE id IN ({marks}) AND NOT EXISTS "
                    "(SELECT 1 FROM outbox_keys k WHERE k.id = outbox.id)",
                    chunk,
                ).fetchall()
                if rows:
                    done = [r[0] for r in rows]
                    db.execute(
                        f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(done))})", done
                    )
                    complete += done
                    self.counters.bytes -= sum(int(r[1]) for r in rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._recount()
            raise
        self.counters.depth -= len(complete)
        self.counters.acknowledged += len(complete)
        return complete

    def waiting_for_broker(self) -> int:
        """How many messages wait for a PUBACK only (statuses), not for ingest."""
        return int(
            self._db.execute(
                "SELECT COUNT(*) FROM outbox WHERE NOT EXISTS "
                "(SELECT 1 FROM outbox_keys k WHERE k.id = outbox.id)"
            ).fetchone()[0]
        )

    # -- internals ----------------------------------------------------------------------

    def _store(self, messages: list[NewMessage]) -> int:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            accepted = sum(self._insert(m, m.keys) for m in messages)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            self._recount()
            raise
        self.counters.enqueued += accepted
        return accepted

    def _insert(self, m: NewMessage, keys: tuple[Key, ...]) -> int:
        size = len(m.payload)
        if not self._make_room(size, m.droppable):
            self.counters.rejected += 1
            return 0
        cur = self._db.execute(
            "INSERT INTO outbox (topic, payload, qos, retain, droppable) VALUES (?, ?, ?, ?, ?)",
            (m.topic, m.payload, m.qos, int(m.retain), int(m.droppable)),
        )
        if keys:
            self._db.executemany(
                "INSERT OR REPLACE INTO outbox_keys (device, stream, seq, id) VALUES (?, ?, ?, ?)",
                [(d, s, n, cur.lastrowid) for d, s, n in keys],
            )
        self.counters.depth += 1
        self.counters.bytes += size
        return 1

    def _read_seq(self, stream: StreamId) -> int:
        row = self._db.execute(
            "SELECT next FROM stream_seq WHERE stream = ?", (_stream_name(stream),)
        ).fetchone()
        return int(row[0]) if row else 0

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
            self._db.execute("DELETE FROM outbox_keys WHERE id = ?", (row[0],))
            self.counters.depth -= 1
            self.counters.bytes -= int(row[1])
            self.counters.dropped_oldest += 1
        return True

    def _recount(self) -> None:
        depth, size = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox"
        ).fetchone()
        self.counters.depth, self.counters.bytes = int(depth), int(size)


def _stream_name(stream: StreamId) -> str:
    # The name the first outbox version used, so numbering survives an upgrade.
    return f"{stream[0]}/{stream[1]}"


def _message(row: tuple[int, str, bytes, int, int, int]) -> OutboxMessage:
    return OutboxMessage(row[0], row[1], bytes(row[2]), row[3], bool(row[4]), bool(row[5]))


def _chunks(items: list[int], size: int = 500) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
