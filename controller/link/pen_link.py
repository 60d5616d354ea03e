"""One pen's serial link: an asyncio shell around firmware_protocol.HostConnection.

Opens a device path or a ``socket://host:port`` URL through pyserial-asyncio-fast,
runs the handshake, feeds bytes to the sans-I/O core, fires its timers, renews the
arming lease, and reconnects with backoff. A hang-up or read error is a
disconnect (``LinkDown``), never a crash.

Events are handed to ``on_event`` synchronously, inside the read callback, so the
safety monitor can answer a breaching telemetry frame with a Stop in the same
event-loop turn (product.md §10 measures exactly that path).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import serial
import serial_asyncio_fast
import structlog

from firmware_protocol import (
    Connected,
    Event,
    HandshakeRefused,
    HostConnection,
    LinkConfig,
    LinkFailed,
    LinkState,
    PeerRebooted,
)
from firmware_protocol.messages import HostStopReason, Identity, Message, Renew, Stop

from .lease import LeaseKeeper

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class PenLinkConfig:
    url: str
    baudrate: int = 1_000_000
    protocol: LinkConfig = field(default_factory=lambda: LinkConfig(peer_silence_timeout=0.3))
    reconnect_initial: float = 0.1
    reconnect_max: float = 5.0


@dataclass(frozen=True, slots=True)
class LinkUp:
    """The handshake succeeded: the pen is identified and its schema matches."""

    identity: Identity


@dataclass(frozen=True, slots=True)
class LinkDown:
    """The link is gone (cable pulled, device closed, peer silent, handshake refused)."""

    reason: str


LinkEvent = LinkUp | LinkDown | Event


class _SerialProtocol(asyncio.Protocol):
    def __init__(self, link: PenLink) -> None:
        self._link = link

    def data_received(self, data: bytes) -> None:
        self._link._on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._link._on_connection_lost(exc)


class PenLink:
    """Keeps one pen connected; see the module docstring."""

    def __init__(self, config: PenLinkConfig, on_event: Callable[[LinkEvent], None]) -> None:
        self.config = config
        self._on_event = on_event
        self.conn = HostConnection(config.protocol)
        self.lease = LeaseKeeper()
        self.connects = 0
        self.disconnects = 0
        self.last_error = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when: float | None = None
        self._closed_future: asyncio.Future[str] | None = None
        self._ready = asyncio.Event()
        self._handshaken = False
        self._stopping = False

    # -- public -------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._transport is not None and self.conn.state is LinkState.READY

    @property
    def identity(self) -> Identity | None:
        return self.conn.identity if self.ready else None

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = self.conn.stats.as_dict()
        out.update(
            state=self.conn.state.value,
            connects=self.connects,
            disconnects=self.disconnects,
            last_error=self.last_error,
        )
        return out

    async def wait_ready(self) -> None:
        await self._ready.wait()

    def send(self, message: Message) -> int | None:
        """Send a message now. NotReadyError if the link is not up; LinkBusyError if full."""
        seq = self.conn.send(message, self._now())
        self._flush()
        return seq

    def keep_armed(self, token: int, lease_ms: int) -> None:
        """Renew the lease for ``token`` until stop_renewing() or the link drops."""
        self.lease.start(token, lease_ms, self._now())
        self._reschedule()

    def stop_renewing(self) -> None:
        self.lease.stop()

    async def run(self) -> None:
        """Connect, and reconnect with backoff, until close()."""
        self._loop = asyncio.get_running_loop()
        delay = self.config.reconnect_initial
        while not self._stopping:
            reason = await self._connect_once()
            if self._stopping:
                break
            self.last_error = reason
            self.disconnects += 1
            self._emit(LinkDown(reason))
            if self._handshaken:  # a link that worked retries promptly; a bad one backs off
                delay = self.config.reconnect_initial
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.reconnect_max)

    async def close(self) -> None:
        self._stopping = True
        self._close_transport()
        if self._closed_future is not None and not self._closed_future.done():
            self._closed_future.set_result("closed by controller")

    # -- internals ----------------------------------------------------------------

    def _now(self) -> float:
        loop = self._loop
        return loop.time() if loop is not None else asyncio.get_running_loop().time()

    async def _connect_once(self) -> str:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await serial_asyncio_fast.create_serial_connection(
                loop,
                lambda: _SerialProtocol(self),
                self.config.url,
                baudrate=self.config.baudrate,
                # With pyserial's default VMIN=0 a tty answers a read that finds no
                # data with 0 bytes, which pyserial reports as a hang-up; with VMIN=1
                # (set through inter_byte_timeout) it answers EAGAIN, which it ignores.
                # Seen when a second process read the same port: it stole the bytes
                # poll() had announced and the link dropped.
                inter_byte_timeout=0.1,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            return f"cannot open {self.config.url}: {exc}"
        _read_without_select(transport.serial)
        self._transport = transport
        self._handshaken = False
        self._closed_future = loop.create_future()
        self.conn = HostConnection(self.config.protocol)
        self.lease.stop()
        self.conn.start_handshake(_nonce(), self._now())
        self._flush()
        self._reschedule()
        try:
            return await self._closed_future
        finally:
            self._ready.clear()
            self.lease.stop()
            self._cancel_timer()
            self._close_transport()

    def _on_data(self, data: bytes) -> None:
        events = self.conn.receive_data(data, self._now())
        for event in events:
            self._handle(event)
        self._flush()
        self._reschedule()

    def _handle(self, event: Event) -> None:
        if isinstance(event, Connected) and event.identity is not None:
            self.connects += 1
            self._handshaken = True
            self._ready.set()
            self._emit(LinkUp(event.identity))
            return
        if isinstance(event, HandshakeRefused):
            self._emit(event)
            self._finish(f"handshake refused: {event.reason}")
            return
        if isinstance(event, LinkFailed):
            self._emit(event)
            self._finish(f"link failed: {event.reason}")
            return
        if isinstance(event, PeerRebooted):
            self._ready.clear()
            self.lease.stop()
            self._emit(event)
            self.conn.start_handshake(_nonce(), self._now())
            return
        self._emit(event)

    def _emit(self, event: LinkEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            # A bug above the link must not leave a needle running: fail closed.
            log.exception("link event handler failed; stopping the pen", url=self.config.url)
            self.lease.stop()
            if self.conn.state is LinkState.READY:
                with contextlib.suppress(Exception):
                    self.conn.send(Stop(HostStopReason.FAULT), self._now())

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = None
        now = self._now()
        for event in self.conn.handle_timeout(now):
            self._handle(event)
        token = self.lease.due(now)
        if token is not None and self.conn.state is LinkState.READY:
            self.conn.send(Renew(token), now)
        self._flush()
        self._reschedule()

    def _reschedule(self) -> None:
        if self._transport is None:
            return
        deadlines = [d for d in (self.conn.next_deadline(), self.lease.next_deadline()) if d]
        when = min(deadlines) if deadlines else None
        if when is not None and self._timer_when is not None and self._timer_when <= when:
            # An earlier timer is already set; when it fires it reschedules. Keeping it
            # avoids a cancel and a new handle for every received frame (the silence
            # deadline moves with each one).
            return
        self._cancel_timer()
        if when is not None:
            self._timer_when = when
            self._timer = asyncio.get_running_loop().call_at(when, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_when = None

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        transport = self._transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)  # type: ignore[attr-defined]

    def _on_connection_lost(self, exc: Exception | None) -> None:
        self._finish(f"connection lost: {exc}" if exc else "connection closed by the device")

    def _finish(self, reason: str) -> None:
        fut = self._closed_future
        if fut is not None and not fut.done():
            fut.set_result(reason)

    def _close_transport(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None and not transport.is_closing():
            transport.close()


def _nonce() -> int:
    return secrets.randbits(32) or 1


def _read_without_select(port: Any) -> None:
    """Make the port's read a single non-blocking read(2) or recv(2).

    pyserial's read() calls select() before reading, although the event loop has
    just said the descriptor is readable: a system call per frame wasted, and
    select() cannot take descriptors numbered 1024 or more, which a controller
    serving a few hundred pens reaches (three descriptors per port). A read that
    finds the device gone raises SerialException, which the transport turns into
    connection_lost, as pyserial's own read does.
    """
    sock = getattr(port, "_socket", None)
    if sock is not None:  # socket:// (pyserial's socket port is non-blocking)

        def read_socket(size: int = 1) -> bytes:
            try:
                data: bytes = sock.recv(size)
            except BlockingIOError:
                return b""
            except OSError as exc:
                raise serial.SerialException(f"read failed: {exc}") from exc
            if not data:
                raise serial.SerialException("the peer closed the connection")
            return data

        port.read = read_socket
        return
    fd = getattr(port, "fd", None)
    if fd is None:
        return  # another kind of port: keep pyserial's read

    def read_fd(size: int = 1) -> bytes:
        try:
            data = os.read(fd, size)
        except BlockingIOError:
            return b""
        except OSError as exc:
            raise serial.SerialException(f"read failed: {exc}") from exc
        if not data:
            # With VMIN=1 (see _connect_once) "no data" is EAGAIN; 0 bytes is a hang-up.
            raise serial.SerialException("the device hung up")
        return data

    port.read = read_fd
