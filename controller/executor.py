"""Carrying out an Outcome in the order its contract demands, never blocking the loop.

The registry decides; this module only orders. For one outcome (see
``controller/sessions/outcome.py``):

1. Urgent commands (Stop, Disarm) go out at once: most already left through the
   registry's urgent sink while the outcome was being built. They never wait.
2. Its records (journal and audit) are handed to the writer thread, which
   commits them in decision order.
3. Its other commands go out in order, per pen. An outcome that carries an
   ``Arm`` is *held* until its own records are durable (a crash must never
   leave a pen armed by a decision the journal does not know); everything
   decided later for the same pen queues behind it, so nothing overtakes it;
   other pens are not held up at all. A Stop or Disarm decided while an Arm is
   held withdraws it: it is never sent, and the registry is told
   (``arm_withdrawn``), so its belief stays true.
4. Lease directives follow their pen's commands: stopping a renewal is never
   held; keeping a pen armed waits behind that pen's held commands.
5. Events are published once their records are durable, in decision order
   across all pens (what a tablet has seen survives a crash).

Nothing here waits: a commit's completion arrives as a callback on the loop.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from firmware_protocol.messages import Arm

from .sessions import LeaseAction, LeaseDirective, Outcome, PenCommand, SessionEvent

log = structlog.get_logger(__name__)

Commit = concurrent.futures.Future[Any]  # a journal or audit commit on the writer thread


@dataclass
class _Held:
    """What one outcome has for one pen, waiting for that outcome's commit."""

    commit: Commit | None
    commands: list[PenCommand] = field(default_factory=list)
    leases: list[LeaseDirective] = field(default_factory=list)


@dataclass
class ExecutorCounters:
    outcomes: int = 0
    held: int = 0  # outcomes whose commands waited for their commit
    withdrawn: int = 0  # held Arms cancelled by a later Stop/Disarm or a failed commit


class OutcomeExecutor:
    """See the module docstring. Every callable is called on the event loop.

    ``send(command)`` hands one command to its pen's link; ``apply_lease`` one
    directive; ``commit(outcome, port)`` queues the outcome's records and returns
    the future of the last one (None when it has nothing to record);
    ``publish(events)`` announces durable events; ``withdraw(port, token, why)``
    tells the registry an Arm was not sent and carries out what it answers;
    ``call_soon_threadsafe`` brings a commit's completion back to the loop.
    """

    def __init__(
        self,
        *,
        send: Callable[[PenCommand], None],
        apply_lease: Callable[[LeaseDirective], None],
        commit: Callable[[Outcome, str | None], Commit | None],
        publish: Callable[[Sequence[SessionEvent]], None],
        withdraw: Callable[[str, int, str], None],
        call_soon_threadsafe: Callable[[Callable[[], None]], Any] | None = None,
    ) -> None:
        self._send = send
        self._apply_lease = apply_lease
        self._commit = commit
        self._publish = publish
        self._withdraw = withdraw
        self._call_soon_threadsafe = call_soon_threadsafe
        self._held: dict[str, collections.deque[_Held]] = {}
        self._events: collections.deque[tuple[Commit | None, Callable[[], None]]] = (
            collections.deque()
        )
        self._withdrawals: collections.deque[tuple[str, int, str]] = collections.deque()
        self.counters = ExecutorCounters()

    def set_loop_callback(self, call_soon_threadsafe: Callable[[Callable[[], None]], Any]) -> None:
        """Where commit completions are delivered (the running loop's call_soon_threadsafe)."""
        self._call_soon_threadsafe = call_soon_threadsafe

    # === inputs =========================================================================

    def urgent(self, command: PenCommand) -> None:
        """A Stop or Disarm, the moment the registry decides it: out now, and any Arm
        still held for that pen is withdrawn."""
        self._send(command)
        held = self._held.get(command.port)
        if held:
            self._withdraw_arms(command.port, held, "a stop was decided after it")
            self._release(command.port)

    def execute(self, outcome: Outcome, port: str | None) -> None:
        """Carry out ``outcome`` (see the module docstring). ``port``: the pen the input
        concerned (None: any, as after a restart)."""
        self.counters.outcomes += 1
        for command in outcome.urgent_commands:
            self.urgent(command)
        commit = self._commit(outcome, port)
        per_pen: dict[str, _Held] = {}
        for command in outcome.other_commands:
            per_pen.setdefault(command.port, _Held(None)).commands.append(command)
        for lease in outcome.leases:
            if lease.action is LeaseAction.STOP_RENEWING:
                self._apply_lease(lease)  # lowering risk never waits
            else:
                per_pen.setdefault(lease.port, _Held(None)).leases.append(lease)
        for pen, item in per_pen.items():
            if commit is not None and any(isinstance(c.message, Arm) for c in item.commands):
                item.commit = commit  # an Arm goes out only once its own record is durable
            if item.commit is None and not self._held.get(pen):
                self._carry_out(item)
                continue
            if item.commit is not None:
                self.counters.held += 1
            self._held.setdefault(pen, collections.deque()).append(item)
            if item.commit is not None and not item.commit.done():
                self._when_done(item.commit, functools.partial(self._on_durable, pen))
            else:
                self._release(pen)
        if outcome.events:
            events = tuple(outcome.events)
            self._events.append((commit, lambda: self._publish(events)))
            if commit is not None and not commit.done():
                self._when_done(commit, self.publish_ready_events)
            self.publish_ready_events()
        self._run_withdrawals()

    def listen_from_here(self, start: Callable[[], None]) -> None:
        """Run ``start`` once every event decided so far has been published: a caller
        that waits for an answer must not take an earlier outcome's event for it."""
        self.after(None, start)

    def after(self, commit: Commit | None, then: Callable[[], None]) -> None:
        """Run ``then`` once ``commit`` is durable (None: at once), in order with every
        announcement queued before it (what the edge is told of a record, say)."""
        self._events.append((commit, then))
        if commit is not None and not commit.done():
            self._when_done(commit, self.publish_ready_events)
        self.publish_ready_events()

    def publish_ready_events(self) -> None:
        """Publish queued events in decision order, up to the first not yet committed."""
        queue = self._events
        while queue and (queue[0][0] is None or queue[0][0].done()):
            queue.popleft()[1]()

    def held_for(self, port: str) -> int:
        """How many outcomes' commands wait for a commit on this pen (for tests and stats)."""
        return len(self._held.get(port, ()))

    # === internals ======================================================================

    def _when_done(self, commit: Commit, then: Callable[[], None]) -> None:
        post = self._call_soon_threadsafe
        if post is None:
            concurrent.futures.wait([commit])  # no loop (pure use): the writer is in order
            then()
            return
        commit.add_done_callback(lambda _: post(then))

    def _release(self, port: str) -> None:
        """Carry out this pen's held items, in order, up to the first not yet durable."""
        queue = self._held.get(port)
        while queue:
            item = queue[0]
            commit = item.commit
            if commit is not None and not commit.done():
                return
            queue.popleft()
            if commit is not None and commit.exception() is not None:
                self._withdraw_arms(
                    port, [item], f"its record could not be saved ({commit.exception()})"
                )
            self._carry_out(item)
        self._held.pop(port, None)

    def _on_durable(self, port: str) -> None:
        """A commit landed (on the loop, outside any registry call)."""
        self._release(port)
        self._run_withdrawals()

    def _carry_out(self, item: _Held) -> None:
        for command in item.commands:
            self._send(command)
        for lease in item.leases:
            self._apply_lease(lease)

    def _withdraw_arms(self, port: str, items: Iterable[_Held], why: str) -> None:
        """Take the Arms (and the renewals that would follow them) out of held items.

        The registry is told later (``_run_withdrawals``): this may run while the
        registry is still building the outcome whose Stop caused it.
        """
        for item in items:
            arms = [c for c in item.commands if isinstance(c.message, Arm)]
            if not arms:
                continue
            item.commands = [c for c in item.commands if not isinstance(c.message, Arm)]
            item.leases = [
                lease for lease in item.leases if lease.action is not LeaseAction.KEEP_RENEWING
            ]
            item.commit = None  # what is left never needed the record
            for command in arms:
                assert isinstance(command.message, Arm)
                self.counters.withdrawn += 1
                log.warning("arm withdrawn", port=port, why=why)
                self._withdrawals.append((port, command.message.token, why))

    def _run_withdrawals(self) -> None:
        while self._withdrawals:
            self._withdraw(*self._withdrawals.popleft())
