"""Treatment sessions: a pure, serialisable registry of sessions, pens and cartridges.

How a runtime drives it (``controller/service.py`` does exactly this):

1. Build once: ``registry = SessionRegistry(load_policy(path), lease_ms=settings.link.lease_ms)``
   (PolicyError if the lease is longer than the policy allows), or after a
   restart ``SessionRegistry.from_dict(policy, journal, lease_ms=...)`` followed
   by ``registry.recover(time.time())``.
2. Feed every input, with ``now = time.time()`` (wall clock; it stamps records):

   ===========================================  ====================================
   source                                       call
   ===========================================  ====================================
   tablet request (already authenticated)       ``handle(action, now)``
   ``LinkUp(identity)`` / ``Connected``         ``pen_connected(port, identity, now)``
   ``LinkDown(reason)`` / ``LinkFailed``        ``link_down(port, reason, now)``
   any other ``firmware_protocol`` event        ``handle_link_event(port, event, now)``
   ===========================================  ====================================

   ``port`` names the link (the configured device path or URL), not the pen:
   the registry tells pens apart by the serial and boot id of their handshake.
3. Carry out the returned :class:`Outcome` in the order ``outcome.py`` states:
   urgent commands, journal + audit, other commands, lease directives, events.
   Commands were already allowed by the gate: send them unchanged, in order;
   a command for a link that is down is dropped (the pen's lease covers it).
4. Telemetry is the hot path: ``handle_link_event`` returns the shared empty
   Outcome for almost every sample; only act when it has commands or events.

The registry is not thread-safe: call it from one thread (the event loop).
State tables: ``states.py``. Contract and safety properties: ``registry.py``.

The parts, each one responsibility:

=================  ==================================================================
``registry.py``    the facade: one method per input, each builds a Step and returns
                   its Outcome
``store.py``       sessions, pens, the cartridge ledger; persistence
``step.py``        one input being processed: gate context, send, audit, event, refuse
``therapist.py``   therapist and manager actions, dispatched from a table by type
``link_events.py`` the link: connected, lost, refused, rebooted; commands acknowledged
``pen_events.py``  the pen's messages, dispatched from a table by type
``enforcement.py`` stop, fault, the life-cycle table, re-checks, link loss, passes
``wording.py``     every sentence the therapist reads that the registry writes
``report.py``      the end-of-session report
=================  ==================================================================
"""

from controller.contract import EventKind

from .actions import (
    AcknowledgeFault,
    Action,
    Actor,
    ArmPen,
    CreateSession,
    DisarmPen,
    EndSession,
    OverrideZone,
    PauseSession,
    ResumeSession,
    Role,
    SelectZone,
    SetStrokeRate,
    SetZoneDepth,
    StartSession,
    StopPen,
)
from .ledger import CartridgeLedger
from .outcome import (
    LeaseAction,
    LeaseDirective,
    Outcome,
    PenCommand,
    SessionEvent,
)
from .records import (
    CartridgeRecord,
    FaultRecord,
    PassRecord,
    PenState,
    Session,
    ZoneOverride,
    ZoneProgress,
)
from .registry import FORMAT_VERSION, SessionRegistry
from .states import (
    ARM_TRANSITIONS,
    LIVE_STATES,
    SESSION_TRANSITIONS,
    ArmInput,
    ArmState,
    SessionInput,
)

__all__ = [
    "ARM_TRANSITIONS",
    "FORMAT_VERSION",
    "LIVE_STATES",
    "SESSION_TRANSITIONS",
    "AcknowledgeFault",
    "Action",
    "Actor",
    "ArmInput",
    "ArmPen",
    "ArmState",
    "CartridgeLedger",
    "CartridgeRecord",
    "CreateSession",
    "DisarmPen",
    "EndSession",
    "EventKind",
    "FaultRecord",
    "LeaseAction",
    "LeaseDirective",
    "Outcome",
    "OverrideZone",
    "PassRecord",
    "PauseSession",
    "PenCommand",
    "PenState",
    "ResumeSession",
    "Role",
    "SelectZone",
    "Session",
    "SessionEvent",
    "SessionInput",
    "SessionRegistry",
    "SetStrokeRate",
    "SetZoneDepth",
    "StartSession",
    "StopPen",
    "ZoneOverride",
    "ZoneProgress",
]
