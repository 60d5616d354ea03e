"""Treatment sessions: a pure, serialisable registry of sessions, pens and cartridges.

* :class:`SessionRegistry` takes therapist actions, pen/link events and time as
  arguments and returns :class:`Outcome` objects (gate-approved commands, lease
  directives, events, audit entries). See ``registry.py`` for the contract and
  ``states.py`` for the state tables.
"""

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
    EventKind,
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
