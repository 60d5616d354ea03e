"""Thin asyncio shells that carry a simulated pen's bytes: pseudo-terminal, TCP, memory.

Each transport delivers what the host writes to an ``on_receive(bytes)`` callback
and takes the pen's bytes with ``write``. None of them knows about the protocol.

* ``PtyTransport``: a pseudo-terminal in raw mode; the host opens ``path`` (e.g.
  ``/dev/pts/5``) with pyserial like any serial port. The simulator keeps its own
  handle on the slave side, so the host may close and reopen the path at will;
  bytes written while nobody listens wait in a bounded buffer (oldest dropped),
  like a UART FIFO, and the host's frame decoder skips any stale partial frame.
* ``TcpTransport``: one listening port per pen (pyserial URL ``socket://HOST:PORT``).
  One host at a time; a new connection replaces the old one (a restarted controller
  wins over its own half-dead socket). Bytes written with no host are discarded.
* ``MemoryTransport``: an in-memory pipe; the host end is ``transport.host``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import termios
import tty
from collections.abc import Callable
from typing import Protocol

Receiver = Callable[[bytes], None]

#: Bytes a transport holds for a host that is not reading, before it drops the oldest.
MAX_PENDING = 64 * 1024


class Transport(Protocol):
    """What the runner needs from a transport."""

    @property
    def address(self) -> str:
        """Where a host connects: a device path or a pyserial URL."""
        ...

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class PtyTransport:
    """A pseudo-terminal: the pen holds the master, the host opens ``path``."""

    def __init__(self, on_receive: Receiver, *, max_pending: int = MAX_PENDING) -> None:
        self._on_receive = on_receive
        self._loop = asyncio.get_running_loop()
        self._max_pending = max_pending
        self._pending = bytearray()
        self.dropped = 0  # bytes discarded because nobody read them in time
        master, slave = os.openpty()
        try:
            # Raw mode before any host opens it: no echo of our own bytes back to us,
            # no CR/LF translation, no signals from byte values such as 0x03.
            tty.setraw(slave, termios.TCSANOW)
            os.set_blocking(master, False)
            self.path = os.ttyname(slave)
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        self._master = master
        self._slave = slave  # kept open so a host closing the path never hangs up the pty
        self._closed = False
        self._writing = False
        self._loop.add_reader(master, self._on_readable)

    @property
    def address(self) -> str:
        return self.path

    def _on_readable(self) -> None:
        try:
            data = os.read(self._master, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.EIO:  # no slave open; we hold one, so only while closing
                return
            raise
        if data:
            self._on_receive(data)

    def write(self, data: bytes) -> None:
        if self._closed or not data:
            return
        if self._pending:
            self._pending += data
            self._trim()
            return
        try:
            n = os.write(self._master, data)
        except BlockingIOError:
            n = 0
        if n < len(data):
            self._pending += data[n:]
            self._trim()
            if not self._writing:
                self._writing = True
                self._loop.add_writer(self._master, self._on_writable)

    def _trim(self) -> None:
        excess = len(self._pending) - self._max_pending
        if excess > 0:
            del self._pending[:excess]
            self.dropped += excess

    def _on_writable(self) -> None:
        try:
            n = os.write(self._master, self._pending)
        except BlockingIOError:
            return
        del self._pending[:n]
        if not self._pending:
            self._writing = False
            self._loop.remove_writer(self._master)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._master)
        if self._writing:
            self._loop.remove_writer(self._master)
        os.close(self._master)
        os.close(self._slave)


class _TcpProtocol(asyncio.Protocol):
    def __init__(self, owner: TcpTransport) -> None:
        self._owner = owner
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._owner._attach(self)

    def data_received(self, data: bytes) -> None:
        if self._owner._client is self:
            self._owner._on_receive(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._detach(self)


class TcpTransport:
    """A TCP listener for one pen. Create with ``await TcpTransport.start(...)``."""

    def __init__(self, on_receive: Receiver, host: str, *, max_pending: int = MAX_PENDING) -> None:
        self._on_receive = on_receive
        self.host = host
        self.port = 0
        self._max_pending = max_pending
        self._server: asyncio.Server | None = None
        self._client: _TcpProtocol | None = None
        self.connections = 0  # hosts that connected, over the pen's life
        self.dropped = 0  # bytes discarded: no host, or a host that stopped reading

    @classmethod
    async def start(
        cls, on_receive: Receiver, host: str = "127.0.0.1", port: int = 0
    ) -> TcpTransport:
        """Listen on host:port (port 0: any free port)."""
        self = cls(on_receive, host)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _TcpProtocol(self), host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"socket://{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self._client is not None

    def _attach(self, client: _TcpProtocol) -> None:
        old = self._client
        self._client = client
        self.connections += 1
        if old is not None and old.transport is not None:
            old.transport.close()

    def _detach(self, client: _TcpProtocol) -> None:
        if self._client is client:
            self._client = None

    def write(self, data: bytes) -> None:
        client = self._client
        if client is None or client.transport is None:
            self.dropped += len(data)
            return
        transport = client.transport
        if transport.get_write_buffer_size() > self._max_pending:
            self.dropped += len(data)  # a host that stopped reading: like a UART overrun
            return
        transport.write(data)

    def close(self) -> None:
        if self._client is not None and self._client.transport is not None:
            self._client.transport.close()
        self._client = None
        if self._server is not None:
            self._server.close()
            self._server = None


class MemoryHostEnd:
    """The host's end of a MemoryTransport: ``write`` to the pen, ``await read()`` from it."""

    def __init__(self, transport: MemoryTransport) -> None:
        self._transport = transport
        self._buffer = bytearray()
        self._ready = asyncio.Event()
        self.on_data: Receiver | None = None  # if set, bytes are pushed here instead

    def write(self, data: bytes) -> None:
        """Send bytes to the pen; they arrive on the next loop iteration, like a real pipe."""
        if data and not self._transport.closed:
            self._transport._loop.call_soon(self._transport._deliver, bytes(data))

    async def read(self) -> bytes:
        """Wait for bytes from the pen; b"" once the transport is closed and drained."""
        while not self._buffer:
            if self._transport.closed:
                return b""
            self._ready.clear()
            await self._ready.wait()
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def _push(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data(data)
        else:
            self._buffer += data
            self._ready.set()


class MemoryTransport:
    """An in-memory byte pipe between a pen and a host in the same event loop."""

    def __init__(self, on_receive: Receiver, name: str = "pen") -> None:
        self._on_receive = on_receive
        self._loop = asyncio.get_running_loop()
        self.name = name
        self.closed = False
        self.host = MemoryHostEnd(self)

    @property
    def address(self) -> str:
        return f"memory:{self.name}"

    def write(self, data: bytes) -> None:
        if data and not self.closed:
            self.host._push(data)

    def _deliver(self, data: bytes) -> None:
        if not self.closed:
            self._on_receive(data)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            self.host._ready.set()
