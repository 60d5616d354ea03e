"""Outcomes' records, serialised once per pen per short window, after the loop's pending I/O.

Every outcome that changes state used to serialise its pen's documents (the pen,
its session with every zone and pass, the cartridges) at once, in the callback
that decided it: 0.3 ms on the core's loop after every Stop, and again for each
of the pen's answers to it (Stop acknowledged, motor stopped, disarmed), which
arrive within a millisecond. Another pen's breaching frame that arrived
meanwhile waited for all of it (penctl bench reaction: the tail of the quiet row).

Here an outcome only notes what it changed; :meth:`CommitWindow.add` returns the
future of the commit that will hold it. ``window_s`` after its first note a
window is sealed (later notes open the next one) and its pens are serialised,
the state *then*, which includes every outcome noted: one pen per loop turn, on
a timer, so after the I/O that is ready by then; a breaching frame waits for at
most one pen's serialisation. A sealed window's rows and audit entries are
queued as one commit (one journal transaction, then the audit entries, written
even if the journal's failed), windows in the order they opened. A window whose
commit fails is noted again into the next window: its pens and sessions are
serialised afresh (their state then) instead of being taken for journaled.

What this changes, and why it is safe: a record reaches the writer a few
milliseconds later. Nothing that depends on a record happens before it is
durable (an Arm is held for its commit, events are published after it), and a
Stop never waits for any of this. A crash before the commit loses the same
thing a crash before the writer's commit always could: decisions nobody acted
on; the journal moves from one window's end state to the next, never to a mix.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from .audit import AuditEntry
from .durable_writer import GroupCommit
from .journal import JournalRow
from .persistence import RegistryJournal
from .sessions import SessionRegistry

log = structlog.get_logger(__name__)

#: How long a window takes notes before it is serialised: the pen's answers to a
#: Stop (acknowledged, motor stopped, disarmed) come within about a millisecond.
WINDOW_S: Final = 0.002

Commit = concurrent.futures.Future[Any]
Parts = dict[str, Any]
ALL: Final = "*"  # the key for "every live pen" (a save after a restart)


@dataclass
class Serialised:
    """A pen's documents as written, once its window is serialised (None until then,
    and for good if its serialisation failed)."""

    parts: Parts | None = None


@dataclass
class _Window:
    future: Commit
    deadline: float = 0.0  # loop time at which it is sealed
    #: Pens to serialise (ALL: every live one), with the sessions each must include.
    ports: dict[str, set[str]] = field(default_factory=dict)
    slots: dict[str, Serialised] = field(default_factory=dict)
    audit: list[AuditEntry] = field(default_factory=list)
    rows: list[JournalRow] = field(default_factory=list)
    #: What was serialised, for a resend if the commit fails.
    noted: list[tuple[str, set[str]]] = field(default_factory=list)
    error: BaseException | None = None


class CommitWindow:
    """See the module docstring. Every method is called on the event loop (or with none
    running, when each note is serialised and queued at once)."""

    def __init__(
        self,
        records: RegistryJournal,
        commits: GroupCommit[JournalRow, AuditEntry],
        registry: Callable[[], SessionRegistry],
        window_s: float = WINDOW_S,
    ) -> None:
        self._records = records
        self._commits = commits
        self._registry = registry
        self.window_s = window_s
        self._open: _Window | None = None
        self._sealed: collections.deque[_Window] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.windows = 0
        # What failed commits held, to be noted again (appended on the writer's thread).
        self._resend: collections.deque[tuple[str, set[str]]] = collections.deque()

    @property
    def pending(self) -> bool:
        """Records are noted that are not yet queued for the writer."""
        return self._open is not None or bool(self._sealed)

    def add(
        self,
        port: str | None,
        *,
        also: frozenset[str] = frozenset(),
        state: bool = False,
        audit: Sequence[AuditEntry] = (),
    ) -> tuple[Commit, Serialised | None]:
        """Note an outcome's records: the state of ``port`` (None: every live pen) if
        ``state``, and ``audit`` entries. Returns the future of the commit that will
        hold them and, the first time this window notes the pen, where its documents
        will be once serialised (None when already noted, or no state).

        RuntimeError once closed: nothing can be recorded any more.
        """
        if self._closed:
            raise RuntimeError("records cannot be saved: the journal is closed")
        window = self._open
        running = _running_loop()
        if window is None:
            window = self._open = _Window(concurrent.futures.Future())
            if running is not None:
                window.deadline = running.time() + self.window_s
                if self._timer is None:
                    self._schedule(running, window.deadline)
        slot = None
        if state:
            key = ALL if port is None else port
            # The session live there now goes too, even if it has ended by the time the
            # window is serialised: a session created and ended within one window was
            # never journaled as the port's live one, and would otherwise be left out.
            registry = self._registry()
            live = registry.live_session_ids() if port is None else {registry.live_session_id(port)}
            window.ports.setdefault(key, set()).update(also, (s for s in live if s))
            if key not in window.slots:
                slot = window.slots[key] = Serialised()
        while self._resend:
            key, sessions = self._resend.popleft()
            window.ports.setdefault(key, set()).update(sessions)
            window.slots.setdefault(key, Serialised())
        window.audit.extend(audit)
        if running is None:
            self.flush()
        return window.future, slot

    def flush(self) -> None:
        """Serialise and queue everything noted so far, now (a clean stop, a sync)."""
        self._cancel_timer()
        self._seal()
        while self._sealed:
            self._step()

    def close(self) -> None:
        """Flush, and refuse any later note (the writer is about to stop)."""
        self.flush()
        self._closed = True

    # === internals ======================================================================

    def _schedule(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        # A timer, not call_soon: timers run after the I/O that is ready in the same
        # turn, so a pen's breaching frame goes before this bookkeeping.
        self._timer = loop.call_at(when, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _seal(self) -> None:
        if self._open is not None:
            self._sealed.append(self._open)
            self._open = None

    def _on_timer(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        try:
            if self._open is not None and loop.time() >= self._open.deadline:
                self._seal()
            if self._sealed:
                self._step()
        finally:  # whatever raised, later windows are still sealed and queued
            if self._sealed:
                self._schedule(loop, loop.time())  # the next pen, after the I/O that came
            elif self._open is not None:
                self._schedule(loop, self._open.deadline)

    def _step(self) -> None:
        """Serialise one pen of the oldest sealed window; queue the window once done."""
        window = self._sealed[0]
        if window.ports:
            key = next(iter(window.ports))
            also = window.ports.pop(key)
            slot = window.slots.pop(key)
            try:
                rows, slot.parts = self._records.serialise(
                    self._registry(), None if key == ALL else key, also
                )
                window.rows += rows
                window.noted.append((key, also | set(slot.parts["sessions"])))
            except Exception as exc:  # a bug: the other pens are still written
                window.error = window.error or exc  # before logging, which can raise too
                log.exception("records could not be serialised", port=key)
            if window.ports:
                return
        self._sealed.popleft()
        self.windows += 1
        self._queue(window)

    def _queue(self, window: _Window) -> None:
        future, error = window.future, window.error
        if not window.rows and not window.audit:
            _settle(future, error)
            return
        try:
            commit = self._commits.add(a=window.rows, b=window.audit)
        except Exception as exc:  # the writer has stopped
            future.set_exception(exc)  # before logging, which can raise too
            log.exception("records could not be queued")
            return
        noted = window.noted

        def landed(done: Commit) -> None:  # on the writer's thread
            failed = done.exception()
            if failed is not None:  # not on disk: the next window writes them afresh
                self._resend.extend(noted)
            # A failure to serialise fails what waits for this window (an Arm is
            # withdrawn), but only once the rest of it is durable.
            _settle(future, error or failed)

        commit.add_done_callback(landed)


def _settle(future: Commit, error: BaseException | None) -> None:
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(None)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
