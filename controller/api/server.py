"""Run the tablet API with uvicorn inside the controller's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The owner of the event loop (penctl serve, a test) handles signals and
        # stops the controller and this server in its own order.
        yield


class ApiServer:
    """uvicorn on a socket bound here, so a busy port fails loudly at :meth:`start`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._sock = socket.create_server((host, port), reuse_port=False)
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="off",
            ws="websockets-sansio",
            timeout_graceful_shutdown=2,
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

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
