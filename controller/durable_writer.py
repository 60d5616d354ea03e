"""The journal's and audit log's commits, on one background thread, in order.

An fsync'd SQLite commit (``synchronous=FULL``) takes 0.4-1.5 ms here. Made on
the event loop, every such commit held up whatever else was due: a breaching
frame of another pen arriving meanwhile waited for it, which was most of the
safety reaction's tail. The sqlite3 module releases the GIL while SQLite writes
and syncs, so a thread lets the loop carry on.

One thread and a FIFO queue: records land in the order the registry decided
them, and waiting for the latest write means every earlier one has landed.
The service waits (see ControllerService._execute) only where a command depends
on the record being durable, as an Arm does on its cartridge being marked used.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")


class DurableWriter:
    """Runs writes on one thread, first in first out. ``failures`` counts raised writes."""

    def __init__(self, name: str = "durable-writer") -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name
        )
        self.failures = 0
        self.last_error = ""

    def submit(self, write: Callable[[], T], what: str) -> concurrent.futures.Future[T]:
        """Queue ``write``; a failure is logged and counted even if nobody waits for it."""
        future = self._executor.submit(write)

        def report(done: concurrent.futures.Future[T]) -> None:
            error = done.exception()
            if error is not None:
                self.failures += 1
                self.last_error = f"{what}: {error}"
                log.error("durable write failed", what=what, error=str(error))

        future.add_done_callback(report)
        return future

    def call(self, work: Callable[[], T], what: str) -> T:
        """Run ``work`` after everything queued before it, and wait for its result."""
        return self.submit(work, what).result()

    def close(self) -> None:
        """Finish every queued write, then stop the thread."""
        self._executor.shutdown(wait=True)
