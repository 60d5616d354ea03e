"""A child process run under asyncio, restarted whenever it dies, with bounded backoff.

:class:`SupervisedProcess` starts a command, waits until it is ready (a probe,
or at once), then awaits its exit (``await proc.wait()``: asyncio's child
watcher reports it, nothing polls). When it dies it logs the exit status and
the backoff, sleeps the backoff, and starts the same command again; a start
that fails (the process exits before it is ready, or is not ready in time) is
one more failure and backs off further. It never gives up: the local stack's
parts are worth nothing dead, and a developer watching the demo wants them
back as soon as whatever killed them is gone. :meth:`SupervisedProcess.stop`
ends the supervision first, then the process (SIGTERM, SIGKILL after a grace).

The policy is :class:`Backoff`; every restart is kept as a :class:`Restart`
(tests and figures read them), and :meth:`SupervisedProcess.restarted` awaits
the n-th one.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import structlog

log = structlog.get_logger("devtools.stack")

Probe = Callable[[], Awaitable[bool]]

#: How often a start-up probe asks whether the child is ready. A server has no
#: event for "listening" that another process can await, so this one thing polls.
PROBE_INTERVAL_S = 0.05


@dataclass(frozen=True)
class Backoff:
    """Bounded exponential backoff between restarts, with no ceiling on their number.

    The n-th consecutive failure (n from 0) waits ``min(max_s, initial_s * factor**n)``
    before the next start: 0.25, 0.5, 1, 2, 4, 8, 10, 10 ... s by default. A child
    that stayed up ``reset_after_s`` after a restart counts as healthy again, so a
    crash once an hour always waits only ``initial_s``, while a crash loop (a bad
    configuration, a port someone else holds) settles at one attempt per ``max_s``.
    """

    initial_s: float = 0.25
    factor: float = 2.0
    max_s: float = 10.0
    reset_after_s: float = 30.0

    def delay(self, consecutive: int) -> float:
        """Seconds to wait after ``consecutive`` failures in a row (0 for the first)."""
        # The exponent is capped: float powers overflow long before "never gives up" ends.
        return min(self.max_s, self.initial_s * self.factor ** min(consecutive, 64))


@dataclass(frozen=True)
class Restart:
    """One death of a supervised child and its replacement."""

    child: str
    number: int  # 1 for the first restart of this child
    pid: int  # of the process that died
    returncode: int
    status: str  # the exit status in words: "exit status 1", "killed by SIGKILL"
    uptime_s: float  # how long the dead process had run
    backoff_s: float  # the first wait before starting it again
    attempts: int  # starts it took (more than 1: a start failed and backed off further)
    exited_at: float  # time.monotonic() when its exit was seen
    ready_at: float  # time.monotonic() when the replacement was ready
    new_pid: int

    @property
    def downtime_s(self) -> float:
        """From the exit being seen to the replacement being ready."""
        return self.ready_at - self.exited_at


def describe(returncode: int) -> str:
    """An exit status in words (asyncio gives -N for death by signal N)."""
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class StartError(RuntimeError):
    """The child exited before it was ready, or was not ready in time."""


def tcp_probe(port: int, host: str = "127.0.0.1") -> Probe:
    """Ready when something accepts TCP connections on ``host:port``."""

    async def probe() -> bool:
        try:
            async with asyncio.timeout(0.5):
                _, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    return probe


def http_probe(url: str) -> Probe:
    """Ready when ``url`` answers 2xx (influxd's ``/ping`` answers 204 once it serves)."""

    async def probe() -> bool:
        try:
            async with httpx.AsyncClient(timeout=0.5) as client:
                return (await client.get(url)).is_success
        except httpx.HTTPError:
            return False

    return probe


@dataclass
class SupervisedProcess:
    """``argv`` kept running: :meth:`start` it, it is restarted on death, :meth:`stop` ends it."""

    name: str
    argv: Sequence[str]
    log_path: Path  # the child's stdout and stderr, appended across restarts
    ready: Probe | None = None  # None: ready as soon as it runs
    ready_timeout_s: float = 30.0
    env: Mapping[str, str] | None = None  # None: this process's environment
    backoff: Backoff = field(default_factory=Backoff)
    #: Called after every start (the first and each restart), e.g. to record pids.
    on_start: Callable[[SupervisedProcess], None] | None = None
    stop_timeout_s: float = 10.0
    #: Every restart so far, in order (no ceiling: supervision never gives up).
    restarts: list[Restart] = field(default_factory=list, init=False)
    #: Starts of a replacement that failed and were retried after a longer backoff.
    failed_starts: int = field(default=0, init=False)
    proc: asyncio.subprocess.Process | None = field(default=None, init=False, repr=False)
    _started_at: float = field(default=0.0, init=False, repr=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition, init=False, repr=False)

    @property
    def pid(self) -> int | None:
        """The running process's pid (None before the first start or once it has exited)."""
        proc = self.proc
        return proc.pid if proc is not None and proc.returncode is None else None

    async def start(self) -> None:
        """Start it and wait until it is ready, then supervise it in the background.

        A failure of this *first* start raises (:class:`StartError`, ``OSError``):
        a stack that cannot come up at all (a missing binary, a broken
        configuration) should say so instead of retrying for ever.
        """
        if self._task is not None:
            raise RuntimeError(f"{self.name} is already supervised")
        await self._spawn()
        self._task = asyncio.create_task(self._supervise(), name=f"supervise-{self.name}")

    async def restarted(self, count: int = 1) -> Restart:
        """The ``count``-th restart of this child, once its replacement is ready."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.restarts) >= count)
            return self.restarts[count - 1]

    async def halt(self) -> None:
        """Stop supervising: no restart after this (the process, if alive, runs on)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def stop(self) -> None:
        """No more restarts; then SIGTERM, and SIGKILL after ``stop_timeout_s``."""
        await self.halt()
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), self.stop_timeout_s)
        except TimeoutError:
            log.warning("child ignored SIGTERM; killing it", child=self.name, pid=proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _supervise(self) -> None:
        consecutive = 0  # failures since the child last stayed up reset_after_s
        while True:
            dead = self.proc
            assert dead is not None
            returncode = await dead.wait()  # asyncio's child watcher wakes us: no polling
            exited_at = time.monotonic()
            uptime = exited_at - self._started_at
            if uptime >= self.backoff.reset_after_s:
                consecutive = 0
            backoffs: list[float] = []
            while True:
                backoff = self.backoff.delay(consecutive)
                consecutive += 1
                backoffs.append(backoff)
                if len(backoffs) == 1:
                    log.warning(
                        "stack child exited; restarting after a backoff",
                        child=self.name,
                        pid=dead.pid,
                        status=describe(returncode),
                        returncode=returncode,
                        uptime_s=round(uptime, 2),
                        backoff_s=backoff,
                        restart=len(self.restarts) + 1,
                        log=str(self.log_path),
                    )
                await asyncio.sleep(backoff)  # the backoff itself: a deliberate wait
                try:
                    await self._spawn()
                    break
                except Exception as exc:  # whatever it was: try again later
                    # Counted and retried with a longer backoff, for ever: the cause
                    # (a port still held, a disk full) may well go away.
                    self.failed_starts += 1
                    log.warning(
                        "stack child did not start again; backing off further",
                        child=self.name,
                        error=str(exc),
                        backoff_s=self.backoff.delay(consecutive),
                        restart=len(self.restarts) + 1,
                        attempt=len(backoffs),
                        log=str(self.log_path),
                    )
            assert self.proc is not None
            restart = Restart(
                child=self.name,
                number=len(self.restarts) + 1,
                pid=dead.pid,
                returncode=returncode,
                status=describe(returncode),
                uptime_s=round(uptime, 3),
                backoff_s=backoffs[0],
                attempts=len(backoffs),
                exited_at=exited_at,
                ready_at=time.monotonic(),
                new_pid=self.proc.pid,
            )
            log.info(
                "stack child restarted",
                child=self.name,
                pid=restart.new_pid,
                restart=restart.number,
                down_s=round(restart.downtime_s, 3),
                attempts=restart.attempts,
            )
            async with self._changed:
                self.restarts.append(restart)
                self._changed.notify_all()

    async def _spawn(self) -> None:
        """Start the process and return once it is ready; StartError if it is not."""
        # Taken before the fork: the spawn may return a few ms after the child began
        # (slower on a loaded machine), and an uptime must never read shorter than
        # the child's own life.
        started_at = time.monotonic()
        with self.log_path.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                env=self.env,
                # Its own session: Ctrl-C in the demo's terminal reaches only the demo,
                # which then stops the children in order.
                start_new_session=True,
            )
        self.proc, self._started_at = proc, started_at
        if self.on_start is not None:
            try:
                self.on_start(self)
            except Exception:
                # Bookkeeping (the pid file) failing is no reason to kill a good child.
                log.exception("stack child's start hook failed", child=self.name)
        if self.ready is not None:
            await self._until_ready(proc, self.ready)

    async def _until_ready(self, proc: asyncio.subprocess.Process, ready: Probe) -> None:
        async def probing() -> None:
            while not await ready():  # noqa: ASYNC110 - no event says "listening"
                await asyncio.sleep(PROBE_INTERVAL_S)

        probe = asyncio.create_task(probing())
        exit_ = asyncio.create_task(proc.wait())
        try:
            done, _ = await asyncio.wait(
                {probe, exit_}, timeout=self.ready_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for task in (probe, exit_):
                task.cancel()
            await asyncio.gather(probe, exit_, return_exceptions=True)
        if exit_ in done or proc.returncode is not None:
            assert proc.returncode is not None
            raise StartError(f"{describe(proc.returncode)} before it was ready")
        if probe in done and probe.exception() is None:
            return
        reason = (
            f"its readiness probe failed: {probe.exception()!r}"
            if probe in done
            else f"not ready after {self.ready_timeout_s:.0f} s"
        )
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise StartError(f"{reason} (killed)")
