"""Outcomes' records, serialised once per pen per short window, after the loop's pending I/O.

Every outcome that changes state used to serialise its pen's documents (the pen,
its session with every zone and pass, the cartridges) at once, in the callback
that decided it: 0.3 ms on the core's loop after every Stop, and again for each
of the pen's answers to it (Stop acknowledged, motor stopped, disarmed), which
arrive within a millisecond. Another pen's breaching frame that arrived
meanwhile waited for all of it (penctl bench reaction: the tail of the quiet row).

Here an outcome only notes what it changed; :meth:`CommitWindow.add` returns the
future of the commit that will hold it. ``window_s`` after the first note, the
pens noted are serialised (the state *then*, which includes every outcome noted)
and handed to the writer with the audit entries, in the order they were decided;
one pen per loop turn, each after the I/O that is ready by then, so a breaching
frame never waits for more than one pen's serialisation.

What this changes, and why it is safe: a record reaches the writer up to
``window_s`` later. Nothing that depends on a record happens before it is
durable (an Arm is held for its commit, events are published after it), and a
Stop never waits for any of this. A crash inside the window loses the same
thing a crash before the writer's commit always could: decisions nobody acted on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog

from .audit import AuditEntry
from .durable_writer import GroupCommit
from .journal import JournalRow
from .persistence import RegistryJournal
from .sessions import SessionRegistry

log = structlog.get_logger(__name__)

#: How long a pen's records gather before they are serialised: the pen's answers to
#: a Stop (acknowledged, motor stopped, disarmed) come within about a millisecond.
WINDOW_S: Final = 0.002

Commit = concurrent.futures.Future[Any]
Parts = dict[str, Any]
ALL: Final = "*"  # the key for "every live pen" (a save after a restart)


@dataclass
class Serialised:
    """A pen's documents as written, once its window is serialised (None until then)."""

    parts: Parts | None = None


class CommitWindow:
    """See the module docstring. Every method is called on the event loop (or with none
    running, when each call is carried out at once)."""

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
        self._future: Commit | None = None
        #: Pens to serialise (ALL: every live one), with the other sessions each changed;
        #: in the order first noted.
        self._ports: dict[str, set[str]] = {}
        self._slots: dict[str, Serialised] = {}
        self._audit: list[AuditEntry] = []
        self._last: Commit | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.flushes = 0

    @property
    def pending(self) -> bool:
        return self._future is not None

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
        will be once serialised (None when already noted, or no state)."""
        future = self._future
        if future is None:
            future = self._future = concurrent.futures.Future()
            self._schedule(self.window_s)
        slot = None
        if state:
            key = ALL if port is None else port
            # The session live there now goes too, even if it has ended by the time the
            # window is serialised: a session created and ended within one window was
            # never journaled as the port's live one, and would otherwise be left out.
            registry = self._registry()
            live = registry.live_session_ids() if port is None else {registry.live_session_id(port)}
            self._ports.setdefault(key, set()).update(also, (s for s in live if s))
            if key not in self._slots:
                slot = self._slots[key] = Serialised()
        self._audit.extend(audit)
        if not self._loop_running():
            self.flush()
        return future, slot

    def flush(self) -> None:
        """Serialise and queue everything noted so far, now (a clean stop, a sync)."""
        self._cancel_timer()
        while self._future is not None:
            self._step()

    # === internals ======================================================================

    def _loop_running(self) -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def _schedule(self, delay: float) -> None:
        if not self._loop_running():
            return
        loop = asyncio.get_running_loop()
        # A timer, not call_soon: timers run after the I/O that is ready in the same
        # turn, so a pen's breaching frame goes before this bookkeeping.
        self._timer = loop.call_at(loop.time() + delay, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        self._step()
        if self._future is not None:
            self._schedule(0.0)  # the next pen after the I/O that came meanwhile

    def _step(self) -> None:
        """Serialise one noted pen; once none is left, queue the window's audit entries
        after them (the audit never holds what the journal does not) and finish."""
        future = self._future
        assert future is not None
        try:
            if self._ports:
                key = next(iter(self._ports))
                also = self._ports.pop(key)
                slot = self._slots.pop(key)
                commit, slot.parts = self._records.save(
                    self._registry(), None if key == ALL else key, also
                )
                self._last = commit
                if self._ports:
                    return
            if self._audit:
                entries, self._audit = self._audit, []
                self._last = self._commits.add(b=entries)
        except Exception as exc:  # a bug while serialising: fail what waits, loudly
            log.exception("records could not be serialised")
            self._finish(future, exc)
            return
        self._finish(future, None)

    def _finish(self, future: Commit, error: BaseException | None) -> None:
        self._future = None
        self._ports.clear()
        self._slots.clear()
        self.flushes += 1
        last, self._last = self._last, None
        if error is not None:
            future.set_exception(error)
            return
        if last is None:
            future.set_result(None)
            return

        def settle(done: Commit) -> None:
            exc = done.exception()
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(None)

        # The writer is in order: its last commit of this window landing means all did.
        last.add_done_callback(settle)
