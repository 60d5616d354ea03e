"""The edge's end of the channel: the core as the tablet API sees it, from another process.

:class:`CoreClient` connects to the safety core's Unix socket and keeps a mirror
of what the core tells: pens and sessions (SNAPSHOT, then STATE as outcomes become
durable), session events and telemetry (STREAM), link statistics (STATS). Every
read the tablet API makes is answered from that mirror, here; the only thing it
asks the core is to apply an action (REQUEST/RESPONSE). It implements
:class:`controller.api.deps.ControllerApi`, so the routers do not know which
process they run in.

Ended sessions older than this process come from the journal file, read-only.
A lost connection is retried with backoff; meanwhile actions fail fast with
:class:`CoreUnavailableError` (the API answers 503) and reads show the last state.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from controller.audit import AuditRecord, read_recent
from controller.channel.framing import FrameReader, FrameTooLargeError, encode_frame
from controller.channel.messages import (
    ChannelDecodeError,
    Kind,
    StreamItem,
    decode_json,
    decode_stream,
    encode_action,
    encode_json,
)
from controller.errors import ActionRefused, CoreBusyError, CoreUnavailableError
from controller.live import LiveTelemetry, Subscription
from controller.policy import Plan, TreatmentPolicy, ZoneLimits, policy_from_dict
from controller.safety.gate import RefusalReason, Refused
from controller.sessions import Action, SessionEvent
from controller.sessions.records import PenState, Session
from controller.sessions.report import build_report
from firmware_protocol.messages import Telemetry, decode_message

log = structlog.get_logger(__name__)

REQUEST_ID_BYTES = 4
#: How long a session's controls (asked of the core) are reused for the tablet.
CONTROLS_TTL_S = 0.2
StreamHandler = Callable[[StreamItem], Awaitable[None]]


@dataclass
class ClientCounters:
    connects: int = 0
    disconnects: int = 0
    stream_items: int = 0
    samples: int = 0
    events: int = 0
    gaps: int = 0  # stream items the core dropped before we could take them


@dataclass
class _Pen:
    endpoint: Mapping[str, Any]
    state: PenState | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    last_live: float = 0.0


class CoreClient:
    """See the module docstring. ``await start()``; reads work at once (from the mirror,
    empty until the first snapshot), actions once :attr:`ready` is set."""

    def __init__(
        self,
        path: Path,
        *,
        state_dir: Path,
        on_stream: StreamHandler | None = None,
        live_rate_hz: float = 10.0,
        request_timeout: float = 5.0,
        max_frame: int = 64 * 1024 * 1024,
    ) -> None:
        self.path = path
        #: The treatment policy in force, as the core announced it (HELLO).
        self.policy: TreatmentPolicy | None = None
        self.state_dir = state_dir
        self.on_stream = on_stream
        self.live_rate_hz = live_rate_hz
        self.request_timeout = request_timeout
        self.max_frame = max_frame
        self.counters = ClientCounters()
        self.ready = asyncio.Event()
        self.hello: dict[str, Any] = {}
        self._pens: dict[str, _Pen] = {}
        self._controls: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._sessions: dict[str, Session] = {}
        self._subscribers: set[Subscription] = set()
        self._event_waiters: list[Callable[[int, SessionEvent], None]] = []
        self._requests: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._stream: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._stream_task: asyncio.Task[None] | None = None
        self._last_seq = 0
        self._history_loaded = False
        self._snapshot_docs: list[dict[str, Any]] = []

    # === life ============================================================================

    async def start(self) -> None:
        self._task = asyncio.create_task(self._connect_forever(), name="core-client")
        self._stream_task = asyncio.create_task(self._deliver_stream(), name="core-stream")

    async def stop(self) -> None:
        for task in (self._task, self._stream_task):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._task, self._stream_task) if t), return_exceptions=True
        )
        if self._transport is not None:
            self._transport.close()

    async def _connect_forever(self) -> None:
        delay = 0.05
        loop = asyncio.get_running_loop()
        while True:
            lost: asyncio.Future[None] = loop.create_future()
            try:
                transport, _ = await loop.create_unix_connection(
                    functools.partial(_CoreProtocol, self, lost), str(self.path)
                )
            except OSError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            assert isinstance(transport, asyncio.Transport)
            self._transport = transport
            self.counters.connects += 1
            try:
                await lost
            finally:
                transport.close()  # also when cancelled: the core must see the edge go
                self._transport = None
                self.ready.clear()
                self.counters.disconnects += 1
                for future in self._requests.values():
                    if not future.done():
                        future.set_exception(CoreUnavailableError("the connection was lost"))
                self._requests.clear()

    # === ControllerApi: the one request ===================================================

    async def act(self, action: Action) -> dict[str, Any]:
        """Apply an action in the core. ActionRefused with the reason; CoreBusyError or
        CoreUnavailableError when the core cannot take it now."""
        answer = await self._request({"op": "act", "action": encode_action(action)})
        self._controls.clear()  # even a refusal may change them (a refusal is recorded)
        refusal = answer.get("refusal")
        if refusal is not None:
            raise ActionRefused(
                Refused(RefusalReason(refusal["code"]), refusal["message"], refusal["remediation"])
            )
        return answer

    async def act_and_wait(
        self, action: Action, until: Callable[[SessionEvent], bool], within: float = 2.0
    ) -> SessionEvent:
        """Act, then the first event of this action's outcome or later that satisfies
        ``until`` (events decided before the action never answer it)."""
        loop = asyncio.get_running_loop()
        found: asyncio.Future[SessionEvent] = loop.create_future()
        first: list[int] = []
        early: list[tuple[int, SessionEvent]] = []

        def listen(index: int, event: SessionEvent) -> None:
            if found.done():
                return
            if not first:
                early.append((index, event))  # the answer has not told us where to start
            elif index >= first[0] and until(event):
                found.set_result(event)

        self._event_waiters.append(listen)
        try:
            answer = await self.act(action)
            first.append(int(answer.get("first_event", 0)))
            for index, event in early:
                listen(index, event)
            async with asyncio.timeout(within):
                return await found
        finally:
            self._event_waiters.remove(listen)

    async def _request(self, body: dict[str, Any]) -> dict[str, Any]:
        transport = self._transport
        if transport is None or not self.ready.is_set():
            raise CoreUnavailableError("the safety core is not connected")
        request_id = next(self._ids) & 0xFFFFFFFF
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = future
        transport.write(
            encode_frame(Kind.REQUEST, request_id.to_bytes(4, "big") + encode_json(body))
        )
        try:
            async with asyncio.timeout(self.request_timeout):
                answer = await future
        except TimeoutError:
            raise CoreUnavailableError("the safety core did not answer in time") from None
        finally:
            self._requests.pop(request_id, None)
        if answer.get("error") == "busy":
            raise CoreBusyError("the safety core is busy")
        if "error" in answer:
            raise CoreUnavailableError(f"the safety core refused the request: {answer}")
        return answer

    # === ControllerApi: reads, from the mirror ==============================================

    def new_session_id(self) -> str:
        return "s-" + secrets.token_hex(6)

    def session(self, session_id: str) -> Session | None:
        found = self._sessions.get(session_id)
        return found.model_copy(deep=True) if found else None

    def sessions(self) -> list[Session]:
        return [s.model_copy(deep=True) for s in self._sessions.values()]

    def report(self, session_id: str) -> dict[str, Any] | None:
        session = self._sessions.get(session_id)
        return build_report(session) if session else None

    def plans(self) -> list[Plan]:
        return list(self.policy.plans.values()) if self.policy else []

    def zones(self) -> Mapping[str, ZoneLimits]:
        return self.policy.zones if self.policy else {}

    async def controls(self, session_id: str) -> dict[str, Any] | None:
        """What the tablet may do in the session now, with each refusal's reason: asked of
        the core (its gate decides), at most every ``CONTROLS_TTL_S`` per session."""
        now = time.monotonic()
        cached = self._controls.get(session_id)
        if cached is not None and now - cached[0] < CONTROLS_TTL_S:
            return cached[1]
        answer = await self._request({"op": "controls", "session_id": session_id})
        controls: dict[str, Any] | None = answer.get("controls")
        self._controls[session_id] = (now, controls)
        return controls

    async def audit_records(self, session_id: str | None, limit: int) -> list[AuditRecord]:
        path = self.state_dir / "audit.db"
        if not path.is_file():
            return []  # the core has recorded nothing yet
        return await asyncio.to_thread(read_recent, path, session_id=session_id, limit=limit)

    def devices(self) -> list[dict[str, Any]]:
        out = []
        for port, pen in self._pens.items():
            state = pen.state
            live = next(
                (s.session_id for s in self._sessions.values() if s.port == port and _live(s)),
                None,
            )
            out.append(
                {
                    "port": port,
                    "url": pen.endpoint.get("url", ""),
                    "name": pen.endpoint.get("name", port),
                    "serial": state.serial if state else None,
                    "firmware": state.firmware if state else None,
                    "link": str(state.link) if state else "down",
                    "armed": state.arm.value if state else "disarmed",
                    "motor_running": state.motor_running if state else False,
                    "cartridge_id": state.cartridge_id if state else None,
                    "session_id": live,
                    "link_stats": dict(pen.stats),
                }
            )
        return out

    def pen_state(self, port: str) -> PenState | None:
        pen = self._pens.get(port)
        return pen.state if pen else None

    def subscribe(self, maxsize: int = 256) -> Subscription:
        sub = Subscription(maxsize)
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    # === what the core tells ==================================================================

    def _on_frame(self, kind: int, body: bytes) -> None:
        if kind == Kind.STREAM:
            item = decode_stream(body)
            self._on_stream_item(item)
        elif kind == Kind.STATE:
            self._apply_docs(decode_json(kind, body))
        elif kind == Kind.RESPONSE:
            request_id = int.from_bytes(body[:REQUEST_ID_BYTES], "big")
            future = self._requests.get(request_id)
            if future is not None and not future.done():
                future.set_result(decode_json(kind, body[REQUEST_ID_BYTES:]))
        elif kind == Kind.STATS:
            for port, stats in decode_json(kind, body).get("pens", {}).items():
                if port in self._pens:
                    self._pens[port].stats = stats
        elif kind == Kind.SNAPSHOT:
            snapshot = decode_json(kind, body)
            for doc in snapshot.get("docs", []):
                self._apply_docs(doc)
            if snapshot.get("last"):
                if not self._history_loaded:
                    self._history_loaded = True
                    self._load_history()  # once, after the live state: never older over newer
                self.ready.set()
        elif kind == Kind.HELLO:
            self.hello = decode_json(kind, body)
            self._take_hello(self.hello)
            first = int(self.hello.get("first_seq", 1))
            if self._last_seq and first > self._last_seq + 1:
                self.counters.gaps += first - self._last_seq - 1
        else:
            log.warning("unknown frame from the core", kind=kind)

    def _take_hello(self, hello: Mapping[str, Any]) -> None:
        """Who the core is: its pens, and its policy (kept only if it rebuilds exactly)."""
        for pen in hello.get("pens", []):
            name = str(pen["name"])
            if name not in self._pens:
                self._pens[name] = _Pen(pen)
        try:
            self.policy = policy_from_dict(hello["policy"], str(hello["policy_fingerprint"]))
        except (KeyError, ValueError) as exc:
            log.error("the core's policy did not rebuild here", error=str(exc))

    def _apply_docs(self, parts: Mapping[str, Any]) -> None:
        self._controls.clear()  # something changed: what the tablet may do, ask again
        for port, body in parts.get("pens", {}).items():
            pen = self._pens.get(port)
            if pen is not None:
                pen.state = PenState.model_validate(body)
        for sid, body in parts.get("sessions", {}).items():
            self._sessions[sid] = Session.model_validate(body)

    def _on_stream_item(self, item: StreamItem) -> None:
        if item.seq <= self._last_seq:
            return  # resent after a reconnect, and already taken
        self._last_seq = item.seq
        self.counters.stream_items += 1
        self._offer_live(item)  # the samples were taken before the item's events
        for index, event in item.events:
            self.counters.events += 1
            for sub in self._subscribers:
                sub.offer(event)
            for listen in list(self._event_waiters):
                listen(index, event)
        self._stream.put_nowait(item)

    def _offer_live(self, item: StreamItem) -> None:
        self.counters.samples += len(item.records)
        if not self._subscribers or not item.records:
            return
        period = 1.0 / self.live_rate_hz
        for record in item.records:
            port, _serial, session_id, _zone = item.pens[record.pen]
            pen = self._pens.get(port)
            if pen is None or record.received_at - pen.last_live < period:
                continue
            pen.last_live = record.received_at
            sample = decode_message(Telemetry.TYPE, record.payload)
            assert isinstance(sample, Telemetry)
            live = LiveTelemetry.of(port, session_id, record.received_at, sample)
            for sub in self._subscribers:
                sub.offer(live)

    async def _deliver_stream(self) -> None:
        """Hand each stream item to the publisher, then tell the core it is secured."""
        while True:
            item = await self._stream.get()
            if self.on_stream is not None:
                await self.on_stream(item)
            transport = self._transport
            if transport is not None and self._stream.empty():
                transport.write(encode_frame(Kind.ACK, encode_json({"upto": item.seq})))

    def _load_history(self) -> None:
        """Sessions the journal holds (ended ones included), read-only."""
        path = self.state_dir / "journal.db"
        if not path.exists():
            return
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute(
                "SELECT id, body FROM documents WHERE kind = 'session' ORDER BY updated"
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            log.warning("cannot read the journal's history", error=str(exc))
            rows = []
        finally:
            db.close()
        for sid, body in rows:
            if sid in self._sessions:
                continue  # the core told us of it: that is the newer word
            with contextlib.suppress(ValueError):
                self._sessions[sid] = Session.model_validate_json(body)


def _live(session: Session) -> bool:
    return session.state.value != "ended"


class _CoreProtocol(asyncio.Protocol):
    def __init__(self, client: CoreClient, lost: asyncio.Future[None]) -> None:
        self.client = client
        self.lost = lost
        self.reader = FrameReader(client.max_frame)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
            for kind, body in frames:
                self.client._on_frame(kind, body)
        except (FrameTooLargeError, ChannelDecodeError) as exc:
            log.error("bad data from the core; reconnecting", error=str(exc))
            transport = self.client._transport
            if transport is not None:
                transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
