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

Group commit (:class:`GroupCommit`): records decided while the previous commit
is still being written join one pending commit, written as one transaction per
file. A slow disk (an fsync of 200 ms) then delays a record by at most about
two commits, whatever the rate of decisions; one commit per decision would let
the queue, and with it every held Arm and every event, fall further behind for
as long as decisions come faster than the disk.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")
A = TypeVar("A")
B = TypeVar("B")


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


class GroupCommit(Generic[A, B]):
    """Two kinds of records (the journal's rows, the audit log's entries) committed
    together: ``add`` queues records and returns the future of the commit that will
    hold them. While no commit is waiting to start, ``add`` queues one on the writer;
    until it starts, later records join it. It writes every pending ``A`` with
    ``write_a`` (one transaction), then every pending ``B`` with ``write_b``, even if
    the first failed; the future fails if either did.
    """

    def __init__(
        self,
        writer: DurableWriter,
        write_a: Callable[[Sequence[A]], object],
        write_b: Callable[[Sequence[B]], object],
        what: str,
    ) -> None:
        self._writer = writer
        self._write_a = write_a
        self._write_b = write_b
        self._what = what
        self._lock = threading.Lock()
        self._a: list[A] = []
        self._b: list[B] = []
        self._waiting: concurrent.futures.Future[None] | None = None
        self.commits = 0

    def add(self, a: Sequence[A] = (), b: Sequence[B] = ()) -> concurrent.futures.Future[None]:
        """Queue ``a`` and ``b``; the future of the commit that holds them."""
        with self._lock:
            self._a.extend(a)
            self._b.extend(b)
            if self._waiting is None:
                self._waiting = self._writer.submit(self._commit, self._what)
            return self._waiting

    def _commit(self) -> None:
        with self._lock:  # from here on, new records wait for the next commit
            a, b = self._a, self._b
            self._a, self._b, self._waiting = [], [], None
            self.commits += 1
        try:
            if a:
                self._write_a(a)
        finally:
            if b:
                self._write_b(b)
