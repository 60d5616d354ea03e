"""The safety core's end of the channel: tell the edge everything, wait for it never.

The core (pens, registry, journal) runs alone on its event loop. The edge
process (tablet API, MQTT publisher, reports) connects to a Unix socket the
core listens on. What the core does for it, all of it bounded and none of it
waiting:

* on connect: HELLO, then SNAPSHOT (pens and live sessions), then every stream
  item the previous edge had not acknowledged;
* after each durable outcome: STATE (the records it changed) and its events in
  the STREAM;
* telemetry: each sample's payload appended to the current STREAM item, which
  leaves every ``flush_interval`` (one ``transport.write`` per item);
* STATS every ``stats_interval``;
* REQUEST: decoded and applied at once (``handle_request``), answered with
  RESPONSE. More than ``max_requests_per_read`` in one read are answered "busy"
  without being decoded, so a flood costs the core a few microseconds a frame.

Stream items stay in memory until the edge acknowledges them (ACK, once they
are in its durable outbox), up to ``max_unacked_bytes``; beyond that the oldest
telemetry is dropped and counted (events never). When the edge stops reading
and the socket's buffer passes ``max_write_buffer``, the core closes the
connection: the edge reconnects and catches up from the snapshot and the
unacknowledged items. Only one edge is served at a time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from controller.sessions import SessionEvent

from .framing import FrameReader, FrameTooLargeError, encode_frame
from .messages import Kind, StreamItem, TelemetryRecord, decode_json, encode_json, encode_stream

log = structlog.get_logger(__name__)

#: Longest Unix socket path the kernel takes (sun_path is 108 bytes with the NUL).
MAX_SOCKET_PATH: Final = 100
REQUEST_ID: Final = struct.Struct("!I")

PenTags = tuple[str, str | None, str | None, str | None]  # port, serial, session, zone
#: Takes a request and a ``reply`` to call with the answer, now or once the request's
#: outcome is durable and announced (so the edge's mirror already shows it).
RequestHandler = Callable[[dict[str, Any], Callable[[dict[str, Any]], None]], None]


def socket_path(state_dir: Path) -> Path:
    """Where the core listens: in its state directory, or a private temporary one when
    that path is too long for a Unix socket."""
    path = state_dir / "core.sock"
    if len(str(path)) <= MAX_SOCKET_PATH:
        return path
    return Path(tempfile.mkdtemp(prefix="penctl-")) / "core.sock"  # mode 0700


@dataclass
class ChannelCounters:
    connects: int = 0
    requests: int = 0
    busy: int = 0
    bad_frames: int = 0
    items_sent: int = 0
    samples: int = 0
    samples_dropped: int = 0
    overflow_disconnects: int = 0


@dataclass
class _Pending:
    """The stream item being filled."""

    events: list[tuple[int, SessionEvent]] = field(default_factory=list)
    records: list[TelemetryRecord] = field(default_factory=list)
    pens: dict[str, int] = field(default_factory=dict)
    tags: list[PenTags] = field(default_factory=list)


class CoreChannel:
    """See the module docstring. ``hello``, ``snapshot``, ``stats`` and ``handle_request``
    are the core's answers; every one runs on the core's loop and must be quick."""

    def __init__(
        self,
        path: Path,
        *,
        hello: Callable[[], dict[str, Any]],
        snapshot: Callable[[], list[dict[str, Any]]],
        stats: Callable[[], dict[str, Any]],
        handle_request: RequestHandler,
        payload_size: int,
        flush_interval: float = 0.05,
        stats_interval: float = 1.0,
        max_request_bytes: int = 64 * 1024,
        max_requests_per_read: int = 64,
        max_unacked_bytes: int = 64 * 1024 * 1024,
        max_write_buffer: int = 16 * 1024 * 1024,
    ) -> None:
        self.path = path
        self._hello = hello
        self._snapshot = snapshot
        self._stats = stats
        self._handle_request = handle_request
        self._payload_size = payload_size
        self.flush_interval = flush_interval
        self.stats_interval = stats_interval
        self.max_request_bytes = max_request_bytes
        self.max_requests_per_read = max_requests_per_read
        self.max_unacked_bytes = max_unacked_bytes
        self.max_write_buffer = max_write_buffer
        self.counters = ChannelCounters()
        self._server: asyncio.AbstractServer | None = None
        self._edge: _EdgeConnection | None = None
        #: Until the edge has its snapshot and every unacknowledged item, in order,
        #: nothing newer may overtake them: STATE waits here, new items in _unacked.
        self._catching_up = False
        self._held_state: list[bytes] = []
        self._pending = _Pending()
        self._next_seq = 1
        #: (seq, encoded frame, has events) not yet acknowledged, oldest first.
        self._unacked: collections.deque[tuple[int, bytes, bool]] = collections.deque()
        self._unacked_bytes = 0
        self._all_acked = asyncio.Event()
        self._all_acked.set()
        self._tasks: list[asyncio.Task[None]] = []

    # === life ============================================================================

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket of a killed core
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _EdgeConnection(self), self.path)
        os.chmod(self.path, 0o600)  # only this user's processes may act on the pens
        self._tasks = [
            asyncio.create_task(self._every(self.flush_interval, self.flush), name="channel"),
            asyncio.create_task(self._every(self.stats_interval, self._send_stats), name="stats"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.flush()
        if self._edge is not None:
            self._edge.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    @property
    def connected(self) -> bool:
        return self._edge is not None

    @property
    def has_unacknowledged(self) -> bool:
        """Something told (flushed or not) that no edge has secured yet."""
        pending = self._pending
        return bool(self._unacked or pending.events or pending.records)

    async def drained(self) -> None:
        """Return once the edge has secured everything told so far (tests, benchmarks)."""
        self.flush()
        await self._all_acked.wait()

    # === what the core tells (called on the core's loop) ====================================

    def telemetry(self, tags: PenTags, received_at: float, payload: bytes) -> None:
        """One sample of the pen ``tags[0]`` (hot path: an append)."""
        pending = self._pending
        index = pending.pens.get(tags[0])
        if index is None or pending.tags[index] != tags:
            if index is not None:
                self.flush()  # the session or zone changed mid-item: start a new one
                pending = self._pending
            index = pending.pens[tags[0]] = len(pending.tags)
            pending.tags.append(tags)
        pending.records.append(TelemetryRecord(index, received_at, payload))
        self.counters.samples += 1

    def events(self, events: Sequence[tuple[int, SessionEvent]]) -> None:
        """Durable events, in decision order: they leave at once (the tablet waits on them)."""
        self._pending.events.extend(events)
        self.flush()

    def state(self, parts: dict[str, Any]) -> None:
        """Durable records an outcome changed (pens, sessions): the edge's mirror."""
        edge = self._edge
        if edge is None:
            return
        frame = encode_frame(Kind.STATE, encode_json(parts))
        if self._catching_up:
            self._held_state.append(frame)  # newer than the snapshot still on its way
        else:
            edge.send(frame)

    def flush(self) -> None:
        """Close the stream item being filled and send it."""
        pending = self._pending
        if not pending.events and not pending.records:
            return
        self._pending = _Pending()
        seq = self._next_seq
        self._next_seq += 1
        item = StreamItem(seq, tuple(pending.events), tuple(pending.tags), tuple(pending.records))
        frame = encode_frame(Kind.STREAM, encode_stream(item, self._payload_size))
        self._unacked.append((seq, frame, bool(pending.events)))
        self._unacked_bytes += len(frame)
        self._all_acked.clear()
        self._bound_unacked()
        if self._edge is not None and not self._catching_up:
            self._edge.send(frame)
            self.counters.items_sent += 1

    # === internals ==========================================================================

    async def _every(self, interval: float, work: Callable[[], None]) -> None:
        while True:
            await asyncio.sleep(interval)
            work()

    def _send_stats(self) -> None:
        if self._edge is not None:
            self._edge.send(encode_frame(Kind.STATS, encode_json(self._stats())))

    def _bound_unacked(self) -> None:
        """Past the bound, drop the oldest telemetry-only items (events are kept)."""
        while self._unacked_bytes > self.max_unacked_bytes:
            victim = next((i for i, (_, _, ev) in enumerate(self._unacked) if not ev), None)
            if victim is None:
                return  # only events left: keep them (they are few, and never dropped)
            _, frame, _ = self._unacked[victim]
            del self._unacked[victim]
            self._unacked_bytes -= len(frame)
            self.counters.samples_dropped += 1

    def _acknowledged(self, upto: int) -> None:
        while self._unacked and self._unacked[0][0] <= upto:
            _, frame, _ = self._unacked.popleft()
            self._unacked_bytes -= len(frame)
        if not self._unacked:
            self._all_acked.set()

    def _connected(self, edge: _EdgeConnection) -> bool:
        if self._edge is not None:
            return False
        self._edge = edge
        self._catching_up = True
        self._held_state.clear()  # the snapshot below holds what they said
        self.counters.connects += 1
        self.flush()
        first = self._unacked[0][0] if self._unacked else self._next_seq
        edge.send(encode_frame(Kind.HELLO, encode_json({**self._hello(), "first_seq": first})))
        # The snapshot goes out a few records per loop turn: a large clinic never holds
        # the loop for long, and whatever changes meanwhile follows as STATE.
        asyncio.get_running_loop().call_soon(self._send_snapshot, edge, self._snapshot(), 0)
        return True

    def _send_snapshot(self, edge: _EdgeConnection, docs: list[dict[str, Any]], start: int) -> None:
        if edge is not self._edge:
            return
        chunk = docs[start : start + 16]
        last = start + 16 >= len(docs)
        edge.send(encode_frame(Kind.SNAPSHOT, encode_json({"docs": chunk, "last": last})))
        if not last:
            asyncio.get_running_loop().call_soon(self._send_snapshot, edge, docs, start + 16)
            return
        self._send_stats()  # the link statistics at once, not a stats interval later
        for frame in self._held_state:  # what changed while the snapshot went out
            edge.send(frame)
        self._held_state.clear()
        # Everything the last edge did not secure and everything decided since, in
        # order: had a newer item gone first, the edge would take the older ones for
        # resent and acknowledge past them, and they would be deleted unsecured.
        for _, frame, _ in self._unacked:
            edge.send(frame)
            self.counters.items_sent += 1
        self._catching_up = False

    def _disconnected(self, edge: _EdgeConnection) -> None:
        if self._edge is edge:
            self._edge = None
            self._catching_up = False
            self._held_state.clear()

    def _on_frames(self, edge: _EdgeConnection, frames: list[tuple[int, bytes]]) -> None:
        handled = 0
        for kind, body in frames:
            if kind == Kind.ACK:
                try:
                    self._acknowledged(int(decode_json(kind, body)["upto"]))
                except (ValueError, KeyError, TypeError):
                    self.counters.bad_frames += 1
            elif kind == Kind.REQUEST and len(body) >= REQUEST_ID.size:
                (request_id,) = REQUEST_ID.unpack_from(body)
                reply = self._replier(edge, request_id)
                handled += 1
                if handled > self.max_requests_per_read:
                    self.counters.busy += 1
                    reply({"error": "busy"})
                else:
                    self.counters.requests += 1
                    self._answer(kind, body[REQUEST_ID.size :], reply)
            else:
                self.counters.bad_frames += 1

    def _replier(self, edge: _EdgeConnection, request_id: int) -> Callable[[dict[str, Any]], None]:
        def reply(answer: dict[str, Any]) -> None:
            edge.send(
                encode_frame(Kind.RESPONSE, REQUEST_ID.pack(request_id) + encode_json(answer))
            )

        return reply

    def _answer(self, kind: int, body: bytes, reply: Callable[[dict[str, Any]], None]) -> None:
        try:
            self._handle_request(decode_json(kind, body), reply)
        except ValueError as exc:  # ChannelDecodeError is one: bad input changes nothing
            self.counters.bad_frames += 1
            reply({"error": "bad_request", "detail": str(exc)})


class _EdgeConnection(asyncio.Protocol):
    def __init__(self, channel: CoreChannel) -> None:
        self.channel = channel
        self.reader = FrameReader(channel.max_request_bytes)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self.channel._connected(self):
            log.warning("a second edge connected; refused")
            transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except FrameTooLargeError as exc:
            log.warning("edge sent an oversized frame; closing", error=str(exc))
            self.channel.counters.bad_frames += 1
            self.close()
            return
        self.channel._on_frames(self, frames)

    def connection_lost(self, exc: Exception | None) -> None:
        self.channel._disconnected(self)
        self.transport = None

    def send(self, frame: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() > self.channel.max_write_buffer:
            # The edge does not read: do not queue without bound. It reconnects and
            # catches up from the snapshot and the unacknowledged stream.
            self.channel.counters.overflow_disconnects += 1
            log.warning("edge not reading; dropping the connection")
            transport.abort()  # close() would wait to flush what it does not read
            return
        transport.write(frame)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
