"""Therapist and manager actions: the inputs the tablet API turns requests into.

Each is a frozen dataclass handed to :meth:`SessionRegistry.handle`. The API
authenticates the person; ``actor`` says who it was and in which role, and the
registry checks the role (an override needs a manager) and ownership (a session
belongs to whoever opened it, or the manager who took it over).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.StrEnum):
    THERAPIST = "therapist"
    MANAGER = "manager"
    ADMIN = "admin"  # configures the system; does not treat


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: a pseudonymous id (never a name) and the role they authenticated with."""

    actor_id: str
    role: Role


@dataclass(frozen=True, slots=True)
class CreateSession:
    """Open a session for a client (pseudonymous ``client_ref``) on the pen at ``port``."""

    session_id: str
    port: str
    client_ref: str
    plan_id: str
    actor: Actor


@dataclass(frozen=True, slots=True)
class StartSession:
    session_id: str
    actor: Actor


@dataclass(frozen=True, slots=True)
class SelectZone:
    session_id: str
    zone_id: str
    actor: Actor


@dataclass(frozen=True, slots=True)
class SetZoneDepth:
    """Set the needle depth (µm) for the selected zone."""

    session_id: str
    depth_um: int
    actor: Actor


@dataclass(frozen=True, slots=True)
class SetStrokeRate:
    session_id: str
    rate_hz: int
    actor: Actor


@dataclass(frozen=True, slots=True)
class ArmPen:
    session_id: str
    actor: Actor


@dataclass(frozen=True, slots=True)
class DisarmPen:
    session_id: str
    actor: Actor


@dataclass(frozen=True, slots=True)
class StopPen:
    """The therapist's stop button: stop the needle and disarm at once."""

    session_id: str
    actor: Actor


@dataclass(frozen=True, slots=True)
class PauseSession:
    session_id: str
    actor: Actor


@dataclass(frozen=True, slots=True)
class ResumeSession:
    """Continue a paused or interrupted session (it does not arm the pen)."""

    session_id: str
    actor: Actor


@dataclass(frozen=True, slots=True)
class AcknowledgeFault:
    """The therapist has checked the pen and the client after a fault."""

    session_id: str
    actor: Actor


@dataclass(frozen=True, slots=True)
class EndSession:
    session_id: str
    actor: Actor


@dataclass(frozen=True, slots=True)
class OverrideZone:
    """A manager changes a zone's limits for this session only, with a reason.

    ``None`` keeps the current value. Depth is in µm and may never exceed the
    device ceiling; passes may never exceed the policy's ``max_passes_ceiling``.
    """

    session_id: str
    zone_id: str
    actor: Actor
    reason: str
    max_depth_um: int | None = None
    max_passes: int | None = None


@dataclass(frozen=True, slots=True)
class TakeOverSession:
    """A manager takes a session over from its therapist, with a reason (audited).

    The manager becomes the session's owner: from then on only they act on it
    (anyone signed in may still stop or disarm its pen).
    """

    session_id: str
    actor: Actor
    reason: str


class SignInResult(enum.StrEnum):
    """What became of one attempt to sign in to the tablet API."""

    SIGNED_IN = "signed_in"
    BAD_CREDENTIALS = "bad_credentials"
    THROTTLED = "throttled"  # refused unheard: too many failures for the name or the source
    SIGNED_OUT = "signed_out"


@dataclass(frozen=True, slots=True)
class RecordSignIn:
    """A sign-in, failed sign-in or sign-out, for the audit log only: it changes nothing.

    It travels as an action so the record joins the one hash-chained audit log the
    safety core writes, in order with everything else. ``actor_id``/``role`` are
    the user's when the name matched one, else None (the typed name is never
    recorded: people type passwords into the name field). Never a password.
    """

    result: SignInResult
    source: str  # the client's address as the API trusts it
    actor_id: str | None = None
    role: Role | None = None
    attempts: int = 1  # THROTTLED: how many were refused since the last record
    session_id: str = ""  # no session: present because every action names one

    @property
    def actor(self) -> Actor:
        """The user; only defined for a known name (the registry never refuses this action)."""
        if self.actor_id is None or self.role is None:
            raise ValueError("a sign-in attempt for an unknown name has no actor")
        return Actor(self.actor_id, self.role)


Action = (
    CreateSession
    | StartSession
    | SelectZone
    | SetZoneDepth
    | SetStrokeRate
    | ArmPen
    | DisarmPen
    | StopPen
    | PauseSession
    | ResumeSession
    | AcknowledgeFault
    | EndSession
    | OverrideZone
    | TakeOverSession
    | RecordSignIn
)
