"""What the registry hands back for every input: an :class:`Outcome`.

The runtime's whole job with an outcome, in this order:

1. send ``urgent_commands`` (Stop, Disarm) to their pens at once;
2. if ``state_changed``, journal ``registry.to_dict()`` durably; append
   ``audit`` to the audit log;
3. send the remaining ``commands``, in order (each was already allowed by the
   gate; the runtime must not alter or reorder them);
4. apply ``leases`` to the link (``keep_armed(token, lease_ms)`` /
   ``stop_renewing()``);
5. publish ``events`` (tablet WebSocket, MQTT events stream) and show
   ``refusal`` to whoever asked.

Sending a risk-reducing command before the journal write keeps the safety
reaction fast (product.md §10); sending a risk-increasing one (Arm, SetDepth)
only after it means a crash can never leave the pen armed by a decision the
journal does not know about.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from controller.audit import AuditEntry
from controller.contract import EventKind
from controller.safety.gate import Refused
from firmware_protocol.messages import Disarm, Message, Stop


@dataclass(frozen=True, slots=True)
class PenCommand:
    """A command for the pen on ``port``, already allowed by the gate."""

    port: str
    message: Message

    @property
    def urgent(self) -> bool:
        """Stop and Disarm: send before anything else, even before journaling."""
        return isinstance(self.message, Stop | Disarm)


class LeaseAction(enum.StrEnum):
    KEEP_RENEWING = "keep_renewing"  # the pen confirmed Armed(token): renew it
    STOP_RENEWING = "stop_renewing"  # let the lease lapse (and the pen disarm itself)


@dataclass(frozen=True, slots=True)
class LeaseDirective:
    port: str
    action: LeaseAction
    token: int | None = None
    lease_ms: int | None = None


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """Something the tablet and the telemetry stream should hear about (JSON-able detail)."""

    kind: EventKind
    at: float
    port: str
    session_id: str | None
    detail: Mapping[str, Any] = field(default_factory=dict)


UrgentSink = Callable[[PenCommand], None]


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one input. Empty when nothing happened (most telemetry samples).

    ``sent_early``: urgent commands already handed to the registry's urgent sink
    while the outcome was being built (see SessionRegistry.urgent_sink); they are
    in ``commands`` too, but not in ``urgent_commands``, so nobody sends them twice.
    """

    commands: tuple[PenCommand, ...] = ()
    leases: tuple[LeaseDirective, ...] = ()
    events: tuple[SessionEvent, ...] = ()
    audit: tuple[AuditEntry, ...] = ()
    refusal: Refused | None = None
    state_changed: bool = False
    sent_early: tuple[PenCommand, ...] = ()
    #: Sessions changed besides the one live on the input's port (an ended session
    #: given a pass recovered from the pen's counters): the journal must save them too.
    also_changed: frozenset[str] = frozenset()

    @property
    def urgent_commands(self) -> tuple[PenCommand, ...]:
        return tuple(c for c in self.commands if c.urgent and c not in self.sent_early)

    @property
    def other_commands(self) -> tuple[PenCommand, ...]:
        return tuple(c for c in self.commands if not c.urgent)


@dataclass
class OutcomeBuilder:
    """Mutable accumulator used while one input is processed."""

    commands: list[PenCommand] = field(default_factory=list)
    leases: list[LeaseDirective] = field(default_factory=list)
    events: list[SessionEvent] = field(default_factory=list)
    audit: list[AuditEntry] = field(default_factory=list)
    refusal: Refused | None = None
    state_changed: bool = False
    urgent_sink: UrgentSink | None = None
    sent_early: list[PenCommand] = field(default_factory=list)
    also_changed: set[str] = field(default_factory=set)

    def command(self, command: PenCommand) -> None:
        """Add a command; an urgent one goes to the sink at once, if there is one."""
        self.commands.append(command)
        if command.urgent and self.urgent_sink is not None:
            self.urgent_sink(command)
            self.sent_early.append(command)

    def build(self) -> Outcome:
        return Outcome(
            commands=tuple(self.commands),
            leases=tuple(self.leases),
            events=tuple(self.events),
            audit=tuple(self.audit),
            refusal=self.refusal,
            state_changed=self.state_changed,
            sent_early=tuple(self.sent_early),
            also_changed=frozenset(self.also_changed),
        )


EMPTY = Outcome()
