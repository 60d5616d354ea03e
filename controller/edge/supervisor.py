"""The core keeps its edge process running, without ever waiting for it.

:class:`EdgeSupervisor` starts ``python -m controller.edge`` beside the safety core,
restarts it with backoff whenever it exits (a crash, a kill, an out-of-memory),
and stops it on the way out. The edge reaches the core only through the
channel's socket; if it stalls, floods or dies, the pens notice nothing (the
channel drops an edge that does not read, and answers "busy" to one that asks too
much). The settings travel to the child as a file only this user may read: the
same values the core runs with, secrets included.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pydantic import SecretStr

from controller.config import ServiceSettings
from controller.cpus import move_off_core

log = structlog.get_logger(__name__)

BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 10.0
#: An edge that ran this long before dying is restarted at once: it was healthy.
HEALTHY_AFTER_S = 30.0
STOP_GRACE_S = 5.0


@dataclass
class SupervisorCounters:
    starts: int = 0
    exits: int = 0
    last_exit: int | None = None


def settings_file(settings: ServiceSettings) -> Path:
    """Write ``settings`` for the edge (JSON, mode 0600, secrets in clear) and return it."""
    path = settings.state_dir / "edge-settings.json"

    def plain(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, Path):
            return str(value)
        raise TypeError(f"cannot write {type(value).__name__} for the edge")

    text = json.dumps(settings.model_dump(mode="python"), default=plain)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(path, 0o600)
    return path


class EdgeSupervisor:
    """See the module docstring."""

    def __init__(
        self, settings: ServiceSettings, socket: str, *, log_format: str = "console"
    ) -> None:
        self.settings = settings
        self.socket = socket
        self.log_format = log_format
        self.counters = SupervisorCounters()
        self.process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        self._settings_path = settings_file(self.settings)
        self._task = asyncio.create_task(self._keep_running(), name="edge supervisor")

    async def stop(self) -> None:
        self._stopping = True
        process = self.process
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STOP_GRACE_S)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _keep_running(self) -> None:
        delay = BACKOFF_INITIAL_S
        while not self._stopping:
            started = time.monotonic()
            try:
                self.process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "controller.edge",
                    "--settings",
                    str(self._settings_path),
                    "--socket",
                    self.socket,
                    "--parent",
                    str(os.getpid()),
                    "--log-format",
                    self.log_format,
                    # Its own session: a Ctrl-C in the core's terminal reaches only the
                    # core, which lets the edge secure what is left before stopping it
                    # (and a core that dies takes the edge with it: PDEATHSIG).
                    start_new_session=True,
                )
            except OSError as exc:
                log.error("cannot start the edge process", error=str(exc))
            else:
                self.counters.starts += 1
                move_off_core(self.process.pid, self.settings.core_cpus)
                code = await self.process.wait()
                self.counters.exits += 1
                self.counters.last_exit = code
                if self._stopping:
                    return
                log.warning("edge process exited; restarting", code=code, backoff_s=delay)
            if time.monotonic() - started > HEALTHY_AFTER_S:
                delay = BACKOFF_INITIAL_S
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)
