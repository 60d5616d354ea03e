"""The outcome executor: an Arm waits for its own record, nothing else waits, Stop never."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.executor import OutcomeExecutor
from controller.sessions import (
    EventKind,
    LeaseAction,
    LeaseDirective,
    Outcome,
    PenCommand,
    SessionEvent,
)
from firmware_protocol.messages import Arm, HostStopReason, SetDepth, SetSpeed, Stop

Commit = concurrent.futures.Future[Any]


@dataclass
class World:
    """The executor's surroundings, recorded: what left for each pen, in order."""

    sent: list[tuple[str, str]] = field(default_factory=list)  # (port, message or lease)
    published: list[str] = field(default_factory=list)
    withdrawn: list[tuple[str, int]] = field(default_factory=list)
    commits: list[Commit] = field(default_factory=list)
    posted: list[Callable[[], None]] = field(default_factory=list)
    next_commit_done: bool = False
    executor: OutcomeExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.executor = OutcomeExecutor(
            send=lambda c: self.sent.append((c.port, type(c.message).__name__)),
            apply_lease=lambda lease: self.sent.append((lease.port, str(lease.action))),
            commit=self.commit,
            publish=self.publish,
            withdraw=lambda port, token, why: self.withdrawn.append((port, token)),
            call_soon_threadsafe=self.posted.append,
        )

    def commit(self, outcome: Outcome, port: str | None) -> Commit | None:
        if not outcome.state_changed:
            return None
        future: Commit = concurrent.futures.Future()
        if self.next_commit_done:
            future.set_result(None)
        self.commits.append(future)
        return future

    def publish(self, events: Sequence[SessionEvent]) -> None:
        self.published += [str(e.detail["n"]) for e in events]

    def land(self, commit: Commit, error: Exception | None = None) -> None:
        """The writer thread finishes ``commit``; its callbacks run on the 'loop'."""
        if error is None:
            commit.set_result(None)
        else:
            commit.set_exception(error)
        posted = list(self.posted)
        self.posted.clear()
        for callback in posted:
            callback()


def outcome(*commands: PenCommand, leases: Sequence[LeaseDirective] = (), n: int = 0) -> Outcome:
    event = SessionEvent(EventKind.STATE_CHANGED, 0.0, "p", None, {"n": n})
    return Outcome(commands=commands, leases=tuple(leases), events=(event,), state_changed=True)


def arm(port: str, token: int = 7) -> PenCommand:
    return PenCommand(port, Arm(250, token, 500, 1000))


def test_an_arm_waits_for_its_record_and_no_other_pen_waits() -> None:
    w = World()
    w.executor.execute(outcome(arm("p1"), n=1), "p1")
    w.executor.execute(outcome(PenCommand("p2", SetDepth(500)), n=2), "p2")
    assert w.sent == [("p2", "SetDepth")]  # pen 2 went at once
    w.land(w.commits[0])
    assert w.sent == [("p2", "SetDepth"), ("p1", "Arm")]
    assert w.executor.held_for("p1") == 0


def test_what_follows_a_held_arm_on_the_same_pen_keeps_its_order() -> None:
    w = World()
    keep = LeaseDirective("p1", LeaseAction.KEEP_RENEWING, 7, 250)
    w.executor.execute(outcome(arm("p1"), n=1), "p1")
    w.executor.execute(outcome(PenCommand("p1", SetSpeed(120)), leases=[keep], n=2), "p1")
    assert w.sent == []
    w.land(w.commits[1])  # the later record landing first changes nothing
    assert w.sent == []
    w.land(w.commits[0])
    assert w.sent == [("p1", "Arm"), ("p1", "SetSpeed"), ("p1", "keep_renewing")]


def test_a_stop_leaves_at_once_and_withdraws_the_held_arm() -> None:
    w = World()
    w.executor.execute(outcome(arm("p1", token=9), n=1), "p1")
    w.executor.urgent(PenCommand("p1", Stop(HostStopReason.THERAPIST)))
    assert w.sent == [("p1", "Stop")]
    assert w.withdrawn == []  # told after the outcome that decided the stop, not during it
    w.executor.execute(outcome(n=2), "p1")
    assert w.withdrawn == [("p1", 9)]
    w.land(w.commits[0])
    assert ("p1", "Arm") not in w.sent
    assert w.executor.counters.withdrawn == 1


def test_an_arm_whose_record_failed_is_never_sent() -> None:
    w = World()
    w.executor.execute(outcome(arm("p1", token=3), n=1), "p1")
    w.land(w.commits[0], OSError("disk full"))
    assert w.sent == []
    assert w.withdrawn == [("p1", 3)]


def test_stopping_renewal_never_waits_behind_a_held_arm() -> None:
    w = World()
    stop_renewing = LeaseDirective("p1", LeaseAction.STOP_RENEWING)
    w.executor.execute(outcome(arm("p1"), n=1), "p1")
    w.executor.execute(outcome(leases=[stop_renewing], n=2), "p1")
    assert w.sent == [("p1", "stop_renewing")]


def test_events_are_published_once_durable_and_in_decision_order() -> None:
    w = World()
    w.executor.execute(outcome(n=1), "p1")
    w.executor.execute(outcome(n=2), "p2")
    assert w.published == []
    w.land(w.commits[1])
    assert w.published == []  # 2 may not overtake 1
    w.land(w.commits[0])
    assert w.published == ["1", "2"]


def test_an_arm_already_durable_goes_at_once() -> None:
    w = World(next_commit_done=True)
    w.executor.execute(outcome(arm("p1"), n=1), "p1")
    assert w.sent == [("p1", "Arm")]
    assert w.published == ["1"]
