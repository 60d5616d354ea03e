"""Run the tablet API with uvicorn inside the controller's own event loop.

The limits uvicorn itself enforces are set here (the rest are in ``edge.py``):
request headers at most ``api.max_header_bytes``, WebSocket messages at most
``api.ws_max_message_bytes``, at most ``api.max_connections`` requests at once
(503 beyond), idle keep-alive connections closed after 5 s, and a connection
that has not sent a complete request head within ``api.request_timeout_s``
closed (uvicorn alone waits for ever: one socket per slow client). uvicorn's
own proxy-header handling is off: ``edge.py`` believes forwarded addresses
only from ``api.trusted_proxies``. With ``api.tls_certfile``/``tls_keyfile``
it serves HTTPS (and WSS) only.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from controller.config import ApiSettings

#: How often a connection checks that its client is making progress.
_WATCH_PERIOD_S = 0.25


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The owner of the event loop (penctl serve, a test) handles signals and
        # stops the controller and this server in its own order.
        yield


def _guarded_h11(head_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request head does not arrive in time."""

    class GuardedH11(H11Protocol):
        _waiting_since: float | None = None
        _watch: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._waiting_since = self.loop.time()
            self._watch = self.loop.call_later(_WATCH_PERIOD_S, self._check)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._watch is not None:
                self._watch.cancel()
            super().connection_lost(exc)

        def _check(self) -> None:
            transport = self.transport
            if transport.is_closing() or transport.get_protocol() is not self:
                return  # closed, or upgraded to a WebSocket (which has its own limits)
            now = self.loop.time()
            waiting = self.cycle is None or self.cycle.response_complete
            if not waiting:
                self._waiting_since = None
            elif self._waiting_since is None:
                self._waiting_since = now
            elif now - self._waiting_since > head_timeout_s:
                transport.close()  # a slow or silent client: free the socket
                return
            self._watch = self.loop.call_later(_WATCH_PERIOD_S, self._check)

    return GuardedH11


class ApiServer:
    """uvicorn on a socket bound here, so a busy port fails loudly at :meth:`start`."""

    def __init__(
        self,
        app: FastAPI,
        host: str = "127.0.0.1",
        port: int = 0,
        settings: ApiSettings | None = None,
    ) -> None:
        settings = settings or ApiSettings()
        self.host = host
        self.tls = settings.tls_certfile is not None
        self._sock = socket.create_server((host, port), reuse_port=False)
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            http=_guarded_h11(settings.request_timeout_s),
            ws="websockets-sansio",
            ws_max_size=settings.ws_max_message_bytes,
            h11_max_incomplete_event_size=settings.max_header_bytes,
            limit_concurrency=settings.max_connections,
            timeout_keep_alive=5,
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=2,
            ssl_certfile=settings.tls_certfile,
            ssl_keyfile=settings.tls_keyfile,
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]), name="api")
        async with asyncio.timeout(10):
            while not self._server.started:  # uvicorn offers no event to await
                if self._task.done():
                    await self._task  # raises what stopped it
                    raise RuntimeError("the API server stopped while starting")
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._sock.close()
