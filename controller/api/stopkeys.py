"""Stop keys: how a tablet that is signed out (or whose sign-in expired) still stops its pens.

The problem (issue 14.1): a therapist's token ends (sign-out, expiry, a restart of
the page with the token gone) while their pen is armed. The page must still show
"a pen of yours is armed" and a STOP that works, without a password typed in a
hurry.

The choice: when a therapist opens (or returns to) a session of their own, the
page asks for a **stop key**, 256 random bits bound to that one session and its
pen, and keeps it in the browser (``localStorage``). Without a token, the key
does exactly two things: say whether its pen is armed or running
(``POST /api/stop-keys/status``) and stop it (``POST /api/stop-keys/stop``).

Why not the alternatives:

* a **public "stop all pens"** button needs no secret at all, so anyone on the
  clinic's network could stop every treatment at will, over and over, and see
  which pens are in use: a nuisance at best and an easy denial of service;
* **re-authenticating to STOP** puts a password between an emergency and the
  needle.

What a stop key risks: whoever copies it from the tablet can stop that one pen
until its session ends, which is what anyone signed in may do anyway (product.md
§8: anyone signed in may stop any pen), and it lowers risk; it reveals neither
the client nor the therapist, cannot arm, select, set or end anything, and dies
with its session (or after ``max_age_s``). The stop is audited as the key's
owner's, through the same ``StopPen`` action a signed-in STOP uses. Keys live in
this process's memory: a restart of the API forgets them, as it forgets tokens
(a restarted controller interrupts every session and disarms every pen anyway).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from controller.sessions import Actor


@dataclass(frozen=True, slots=True)
class StopKey:
    """What one key may stop: one session's pen, on behalf of the session's owner."""

    session_id: str
    port: str
    owner: Actor
    issued_at: float


@dataclass
class StopKeyStore:
    """Random stop keys held server-side; at most ``per_owner`` per owner (oldest dropped)."""

    max_age_s: float = 12 * 3600.0
    per_owner: int = 16
    clock: Callable[[], float] = time.monotonic
    _keys: dict[str, StopKey] = field(default_factory=dict)

    def issue(self, owner: Actor, session_id: str, port: str) -> str:
        """A key that stops ``session_id``'s pen; the same session's earlier key stays valid."""
        self._purge()
        theirs = [k for k, v in self._keys.items() if v.owner.actor_id == owner.actor_id]
        for old in theirs[: max(0, len(theirs) - self.per_owner + 1)]:
            del self._keys[old]
        key = secrets.token_urlsafe(32)
        self._keys[key] = StopKey(session_id, port, owner, self.clock())
        return key

    def get(self, key: str) -> StopKey | None:
        """The key's grant, or None if it is unknown or too old."""
        grant = self._keys.get(key)
        if grant is not None and self.clock() - grant.issued_at > self.max_age_s:
            del self._keys[key]
            return None
        return grant

    def forget(self, key: str) -> None:
        self._keys.pop(key, None)

    def _purge(self) -> None:
        now = self.clock()
        for key in [k for k, v in self._keys.items() if now - v.issued_at > self.max_age_s]:
            del self._keys[key]
